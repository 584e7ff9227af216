"""The reference's model variants on a feature-release dataset, as experiment configs.

A dataset config (`configs/<dataset>.py`) states that dataset's numbers (`DatasetSettings`, each
with its source) and calls `release_config(settings, arg)`, where `arg` is the part after the
colon of `--config configs/<dataset>.py:<arg>`: comma-separated words choosing

    the model      tt_ce_plus (default) | tt_ce | ce_plus | ce | moee | cecap | ttcap
    the teachers   live (default: trained by the recipe, run inside the student's step) |
                   precomputed (the release's teacher files, as the reference) |
                   self (self-learning: one teacher, the student's own architecture and text,
                   trained first by the recipe; TeachText Fig. 10a)
    denoising      less100 | less80 (caption masks; less80 also swaps the training list)
    the split      any of the dataset's split choices (MSRVTT: full, jsfusion, miech)
    TeachVideo     teachvideo: the student reads one expert (TEACHVIDEO_EXPERT); live teachers
                   read every expert of the variant, and a video teacher (that model reading
                   the student's text) joins them unless one of them is it already
                   (tt_ce_plus's gpt2-xl-finetune teacher): one Phi pool of text and video
                   teachers (TeachText Fig 7b)
    teacher arch   moee_teachers: the live text teachers are MoEE models (TeachText Fig 11)

Variants (`teachtext_ce_spec.md` section 6; configs/<ds>/*.json of the reference):
  moee        MoEE: the CE experts and text feature, no collaborative gating;
  ce          CE: 9 experts (MSVD 7), openai text (the original CE tars), Ranger;
  ce_plus     CE+: the 7 "refined" experts, gpt2-xl-finetune text, RAdam lr 1e-3 wd 1e-5;
  tt_ce(_plus) the same student distilled from the three TeachText teachers, CE models reading
              w2v, gpt2-xl and gpt2-xl-finetune. The release's teachers use the refined experts;
              live teachers use the student's (the same set for tt_ce_plus), so that one copy of
              the features serves every model of the recipe.
  cecap       CE+ with caption distillation ("From Within to Between": the student's own
              caption-caption similarities as targets, no teachers), temperature cap_t per dataset;
  ttcap       TeachText-CE+ plus the same caption distillation (CrossKD configs_crosskd/).
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Optional

import ml_collections

from tt_jax.config import default_config
from tt_jax.data.release_layout import DATASETS, DENOISING, TEACHER_FILES
from tt_jax.interop.reference_config import TEXT_EMBEDDING_DIMS, VLAD_EXPERT_TOKEN_DIMS

MODELS = ("tt_ce_plus", "tt_ce", "ce_plus", "ce", "moee", "cecap", "ttcap")
# The student's one expert in the teachvideo variant: a per-frame appearance expert, the cheapest
# kind to extract at test time. The paper does not say which subsets its Fig 7b used (spec section 9).
TEACHVIDEO_EXPERT = "imagenet.senet154.0"
TEACHER_SOURCES = ("live", "precomputed", "self")

# Input dims of the fixed experts: feat_aggregation feat_dims["embed"] in base_config.json.
FIXED_EXPERT_DIMS = {
    "imagenet.resnext101_32x48d.0": 2048,
    "imagenet.senet154.0": 2048,
    "r2p1d.r2p1d-ig65m.0": 512,
    "r2p1d.r2p1d-ig65m-kinetics.0": 512,
    "scene.densenet161.0": 2208,
    "i3d.i3d.0": 1024,
}
FLAKY_EXPERTS = ("audio", "speech", "ocr", "face")  # base_config.json feat_aggregation "flaky": true
# The refined expert set of configs/<ds>/train-full-ce-refined.json: CE+ students and the teachers.
REFINED_EXPERTS = (
    "audio",
    "imagenet.resnext101_32x48d.0",
    "imagenet.senet154.0",
    "r2p1d.r2p1d-ig65m-kinetics.0",
    "r2p1d.r2p1d-ig65m.0",
    "scene.densenet161.0",
    "speech",
)
# The CE expert set of the data_loader_<ds>.json configs.
CE_EXPERTS = (
    "audio",
    "face",
    "i3d.i3d.0",
    "imagenet.resnext101_32x48d.0",
    "imagenet.senet154.0",
    "ocr",
    "r2p1d.r2p1d-ig65m.0",
    "scene.densenet161.0",
    "speech",
)
CE_PLUS_TEXT = "gpt2-xl-finetune"  # text_feat of the *-gpt2-xl-finetuned-* configs
CE_PLUS_OPTIMIZER = ("radam", 1e-3, 1e-5)  # optimizer of the *-gpt2-xl-finetuned-* configs


@dataclasses.dataclass(frozen=True)
class DatasetSettings:
    """One dataset's reference numbers; each dataset config says where every one comes from."""

    dataset: str  # a key of tt_jax.data.release_layout.DATASETS
    batch_size: int
    num_epochs: int
    margin: float
    text_vlad_clusters: int
    text_ghost_clusters: int
    max_text_tokens: int
    vlad_clusters: Mapping[str, int]  # of the variable-length experts (audio, speech, ocr)
    max_tokens: Mapping[str, int]  # of the variable-length experts
    ce_optimizer: tuple[str, float, float]  # (name, lr, weight decay) of the CE / MoEE configs
    ce_text: str = "openai"  # text_feat of the CE / MoEE configs
    ce_experts: tuple[str, ...] = CE_EXPERTS
    refined_experts: tuple[str, ...] = REFINED_EXPERTS
    face_dim: int = 512  # experts.face_dim
    val_first_caption_only: bool = False  # num_test_captions 1 during training (MSRVTT)
    # Changes for the MoEE variant (only MSRVTT's train-full-moee.json has its own numbers):
    # any of margin, text_vlad_clusters, text_ghost_clusters, max_text_tokens, vlad_clusters,
    # max_tokens, include_self.
    moee_changes: Mapping[str, object] = dataclasses.field(default_factory=dict)
    expert_files: Mapping[str, str] = dataclasses.field(default_factory=dict)
    # cap_t of tqvinhcs/CrossKD configs_crosskd/<dataset>: MSRVTT 5, ActivityNet 10, DiDeMo 8, MSVD 2;
    # the datasets CrossKD has no config for keep MSRVTT's.
    caption_temperature: float = 5.0


def _expert(name: str, settings: DatasetSettings, vlad_clusters, max_tokens) -> dict:
    if name in VLAD_EXPERT_TOKEN_DIMS:
        return dict(
            name=name,
            input_dim=VLAD_EXPERT_TOKEN_DIMS[name],
            temporal="vlad",
            vlad_clusters=int(vlad_clusters[name]),
            max_tokens=int(max_tokens[name]),
            flaky=name in FLAKY_EXPERTS,
        )
    input_dim = settings.face_dim if name == "face" else FIXED_EXPERT_DIMS[name]
    return dict(name=name, input_dim=input_dim, flaky=name in FLAKY_EXPERTS)


def _parse(arg: Optional[str], settings: DatasetSettings) -> dict:
    layout = DATASETS[settings.dataset]
    choice = {"model": "tt_ce_plus", "teachers": "live", "denoising": "", "split": layout.default_split}
    for word in [w.strip() for w in (arg or "").split(",") if w.strip()]:
        if word in MODELS:
            choice["model"] = word
        elif word in TEACHER_SOURCES:
            choice["teachers"] = word
            choice["teachers_given"] = True
        elif word in DENOISING:
            choice["denoising"] = word
        elif word in layout.splits:
            choice["split"] = word
        elif word in ("teachvideo", "moee_teachers"):
            choice[word] = True
        else:
            raise ValueError(
                f"configs/{settings.dataset}.py: unknown variant {word!r}; choose from models {list(MODELS)}, "
                f"teachers {list(TEACHER_SOURCES)}, denoising {list(DENOISING)}, splits {list(layout.splits)}, "
                "and teachvideo, moee_teachers"
            )
    return choice


def release_config(settings: DatasetSettings, arg: Optional[str] = None) -> ml_collections.ConfigDict:
    """The experiment config of `settings`' dataset for the variant `arg` (see module docstring)."""
    choice = _parse(arg, settings)
    model_name = choice["model"]
    plus = model_name in ("tt_ce_plus", "ce_plus", "cecap", "ttcap")
    with_teachers = model_name.startswith("tt")
    with_captions = model_name in ("cecap", "ttcap")
    if choice.get("teachers_given") and not with_teachers:
        raise ValueError(
            f"configs/{settings.dataset}.py: {model_name!r} has no teachers, so {choice['teachers']!r} says nothing; "
            "the teacher words apply to tt_ce_plus, tt_ce and ttcap"
        )
    numbers = dict(
        margin=settings.margin,
        text_vlad_clusters=settings.text_vlad_clusters,
        text_ghost_clusters=settings.text_ghost_clusters,
        max_text_tokens=settings.max_text_tokens,
        vlad_clusters=settings.vlad_clusters,
        max_tokens=settings.max_tokens,
        include_self=True,
    )
    if model_name == "moee":
        numbers.update(settings.moee_changes)
    experts = settings.refined_experts if plus else settings.ce_experts
    text_name = CE_PLUS_TEXT if plus else settings.ce_text

    config = default_config()
    config.model = ml_collections.ConfigDict(
        dict(
            experts=[_expert(name, settings, numbers["vlad_clusters"], numbers["max_tokens"]) for name in experts],
            text_dim=TEXT_EMBEDDING_DIMS[text_name],
            text_vlad_clusters=numbers["text_vlad_clusters"],
            text_ghost_clusters=numbers["text_ghost_clusters"],
            text_max_tokens=numbers["max_text_tokens"],
            shared_dim=768,  # base_config.json ce_shared_dim
            collaborative_gating=model_name != "moee",
            include_self=bool(numbers["include_self"]),
        )
    )
    config.data.source = "release"
    config.data.dataset = settings.dataset
    config.data.split = choice["split"]
    config.data.text_embedding = text_name
    config.data.denoising = choice["denoising"]
    config.data.val_first_caption_only = settings.val_first_caption_only
    config.data.expert_files = dict(settings.expert_files)

    optimizer, learning_rate, weight_decay = CE_PLUS_OPTIMIZER if plus else settings.ce_optimizer
    config.train.optimizer = optimizer
    config.train.learning_rate = learning_rate
    config.train.weight_decay = weight_decay
    config.train.batch_size = settings.batch_size
    config.train.num_epochs = settings.num_epochs
    config.train.margin = numbers["margin"]
    config.train.lr_decay_gamma = 0.95  # base_config.json StepLR(step_size=1, gamma=0.95)

    terms = []
    if with_teachers and choice["teachers"] == "self":
        # Self-learning: the teacher is the student's own model on its own inputs, trained first.
        config.teachers = [dict(name="teacher_self", source="recipe", text_embedding=text_name)]
        terms.append(dict(method="teachtext"))
    elif with_teachers:
        # The teachers, one per text embedding: with "live", CE models of the student's experts
        # (for tt_ce_plus the refined ones, as the release's teachers) trained by the recipe
        # (pipeline stage "teachers"); with "precomputed", the release's teacher files.
        source = "recipe" if choice["teachers"] == "live" else "precomputed"
        config.teachers = [
            dict(name=f"teacher_{embedding}", source=source, text_embedding=embedding)
            | ({"model_changes": dict(text_dim=TEXT_EMBEDDING_DIMS[embedding])} if source == "recipe" else {})
            for embedding in TEACHER_FILES
        ]
        terms.append(dict(method="teachtext"))
    if choice.get("moee_teachers"):
        live = [entry for entry in config.teachers if entry["source"] == "recipe"]
        if not live or choice["teachers"] == "self":
            raise ValueError(f"configs/{settings.dataset}.py: moee_teachers changes the live text teachers of tt_ce_plus, "
                             "tt_ce or ttcap (with live teachers)")
        for entry in live:
            entry["model_changes"] = {**entry.get("model_changes", {}), "collaborative_gating": False}
    if choice.get("teachvideo"):
        every_expert = [dict(expert) for expert in config.model.experts]
        if TEACHVIDEO_EXPERT not in [expert["name"] for expert in every_expert]:
            raise ValueError(f"configs/{settings.dataset}.py: the {model_name!r} experts have no {TEACHVIDEO_EXPERT!r}")
        for entry in config.teachers:
            if entry["source"] == "recipe":
                entry["model_changes"] = {**entry.get("model_changes", {}), "experts": every_expert}
        if not any(entry["source"] == "recipe" and entry["text_embedding"] == text_name for entry in config.teachers):
            # (a live teacher reading the student's text and every expert is the video teacher already)
            config.teachers = [*config.teachers, dict(name="teacher_video", source="recipe", text_embedding=text_name,
                                                      model_changes=dict(experts=every_expert))]
        config.model.experts = [expert for expert in every_expert if expert["name"] == TEACHVIDEO_EXPERT]
        if not any(term["method"] == "teachtext" for term in terms):
            terms.insert(0, dict(method="teachtext"))
    if with_captions:
        terms.append(dict(method="caption", temperature=settings.caption_temperature))
    config.distillation.terms = terms
    if not terms:
        config.pipeline.stages = ("student_baseline", "report")
    return config
