"""The built-in demo: the whole TeachText recipe on synthetic data, on one CPU in minutes.

Three teachers, one per text embedding of the synthetic dataset (stand-ins for w2v, gpt2-xl and
fine-tuned gpt2-xl), then the student reading the poorest embedding (w2v) with and without
distillation, over three seeds. Architecture follows the reference CE+ family (pairwise
collaborative gating, text NetVLAD with a ghost cluster, a variable-length flaky expert through
NetVLAD); sizes are shrunk to run on a laptop.
"""

import ml_collections

from tt_jax.config import default_config
from tt_jax.data.synthetic import TEACHTEXT_TEXT_EMBEDDINGS

# Three text embeddings in the roles of TeachText's. Every one sees the whole concept; quality
# sets how much per-caption nuisance hides it, token_noise each one's own per-token noise: the
# student's w2v stand-in is the noisiest, the fine-tuned gpt2-xl stand-in the cleanest.
TEXT_EMBEDDINGS = TEACHTEXT_TEXT_EMBEDDINGS


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """arg: comma-separated words: "quick" (one seed and ten epochs, to check a setup in a minute);
    "ttcap" (TeachText plus caption distillation), "cecap" (caption distillation alone, no
    teachers) or "self" (self-learning: one teacher, the student's own model and text);
    "teachvideo" (the student reads the scene expert alone, the teachers all three; the w2v
    teacher is then the video teacher: the student's text, every expert); "moee_teachers"
    (the teachers are MoEE models: no collaborative gating); "noisy"
    (a third of the training captions describe another video) and "denoise" (drop the captions
    the teachers rank worse than 5)."""
    config = default_config()
    config.model = ml_collections.ConfigDict(
        dict(
            experts=[
                dict(name="audio", input_dim=16, temporal="vlad", vlad_clusters=4, max_tokens=6, flaky=True),
                dict(name="motion", input_dim=48),
                dict(name="scene", input_dim=64),
            ],
            text_dim=TEXT_EMBEDDINGS["w2v"]["dim"],
            text_vlad_clusters=4,
            text_ghost_clusters=1,  # MSRVTT configs use one text ghost cluster
            text_max_tokens=8,
            shared_dim=32,
        )
    )
    config.data.text_embedding = "w2v"
    # Few training videos: the regime where a student overfits its noisy text and the teachers'
    # similarities have the most to add.
    config.data.synthetic = ml_collections.ConfigDict(
        dict(
            seed=0,
            num_train_videos=150,
            num_val_videos=200,
            num_test_videos=300,
            captions_per_video=4,
            text_embeddings=TEXT_EMBEDDINGS,
            hide_directions=False,
        )
    )
    config.train.batch_size = 32
    config.train.num_epochs = 200  # 5 steps each: 1000 steps
    config.train.lr_decay_gamma = 1.0  # no decay over these short epochs (the reference decays 0.95 per epoch)
    config.train.eval_every_epochs = 5
    config.train.log_every_steps = 25

    config.teachers = [
        dict(name=f"teacher_{name}", source="recipe", text_embedding=name, model_changes=dict(text_dim=spec["dim"]))
        for name, spec in TEXT_EMBEDDINGS.items()
    ]
    config.pipeline.seeds = (0, 1, 2)
    for word in [w.strip() for w in (arg or "").split(",") if w.strip()]:
        if word == "quick":
            config.pipeline.seeds = (0,)
            config.train.num_epochs = 10
        elif word == "ttcap":
            config.distillation.terms = [dict(method="teachtext"), dict(method="caption")]
        elif word == "cecap":
            config.teachers = []
            config.distillation.terms = [dict(method="caption")]
        elif word == "self":
            config.teachers = [entry for entry in config.teachers if entry["text_embedding"] == "w2v"]
        elif word == "teachvideo":  # TeachVideo: a student reading one expert; teachers read all three
            every_expert = [dict(expert) for expert in config.model.experts]
            for entry in config.teachers:
                entry["model_changes"] = {**entry["model_changes"], "experts": every_expert}
            config.model.experts = [expert for expert in every_expert if expert["name"] == "scene"]
        elif word == "moee_teachers":  # teachers of another architecture: MoEE (no collaborative gating)
            for entry in config.teachers:
                entry["model_changes"] = {**entry["model_changes"], "collaborative_gating": False}
        elif word == "noisy":  # a third of the training captions describe another video
            config.data.synthetic.wrong_caption_rate = 1 / 3
        elif word == "denoise":  # TeachText's denoising: keep the captions the teachers rank in the top 5
            config.denoising.max_rank = 5
        else:
            raise ValueError(
                "configs/demo.py takes quick, ttcap, cecap, self, teachvideo, moee_teachers, noisy and denoise "
                f"(comma-separated), got {word!r}"
            )
    return config
