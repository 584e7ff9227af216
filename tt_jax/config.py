"""The experiment config: every key, its default, the one check of a whole config, and a run's identity.

A config file (`configs/*.py`) starts from `default_config()` and changes what it needs, so a
typo in a file or on the command line (`--config.train.lerning_rate=...`) is an error that lists
the valid keys, not a silently ignored setting. `check_config` validates everything (teacher
entries included) before any data is loaded or anything compiles.

Teachers are one list, `config.teachers`, of entries saying what each teacher is and what it reads:

    source        "recipe"      trained by the recipe's teachers stage in <workdir>/teachers/<name>
                  "run"         an existing run directory of ours (path: its workdir)
                  "reference"   a reference PyTorch checkpoint (path: the .pth file)
                  "precomputed" the release's teacher embeddings (the reference's teacher files)
    text_embedding the text embedding it reads (for "precomputed": which release teacher file)
    model_changes changes to `config.model` giving its architecture ("recipe", "reference");
                  a "run" teacher's architecture is read from its run directory
    path          where a "run" or "reference" teacher is
    trust_pickle  a reference .pth may unpickle Python objects (only for files you trust)

The data a run loads (text embeddings at the longest length any model reads, teacher files) is
derived from the student and this list (`tt_jax.data.sources`), never kept in sync by hand.

A run's identity (`run_identity`) is every key that changes what is trained; only the keys of
`RESTARTABLE_KEYS` may change between restarts of one run (DESIGN decision 12).

Defaults are the reference's TeachText settings where it has one (`teachtext_ce_spec.md`).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import re
from typing import Any, Mapping

import ml_collections

from tt_jax.denoising_settings import DenoisingSettings
from tt_jax.distillation.schedules import Schedule
from tt_jax.distillation.terms import METHODS, distillation_terms, parse_terms
from tt_jax.errors import UserInputError
from tt_jax.models.config import ExpertConfig, ModelConfig, as_model_config

# Keys whose values are free-form dicts or lists of dicts, checked by their consumers.
_FREE_FORM = {"model", "data.synthetic", "data.expert_files", "teachers", "distillation.terms", "study"}

# Top-level shortcuts for the settings most often changed on the command line
# (`--config.data_dir=/data --config.num_epochs=5 --config.seeds=0,1`): when set, they replace
# the nested keys they name.
SHORTCUTS = {"data_dir": "data.data_dir", "num_epochs": "train.num_epochs", "seeds": "pipeline.seeds"}

PIPELINE_STAGES = ("teachers", "denoising", "student_teachtext", "student_baseline", "report")
TEACHER_SOURCES = ("recipe", "run", "reference", "precomputed")
TRANSFER_GUARDS = ("allow", "log", "disallow")

# Keys of earlier config layouts, and what replaced them.
_MOVED_KEYS = {
    "distillation.teachers": "config.teachers entries with source='run' (path: the teacher's workdir) or "
    "source='reference' (path: the .pth file, model_changes: its architecture)",
    "distillation.precomputed_teachers": "config.teachers entries with source='precomputed'",
    "data.teachers": "config.teachers entries with source='precomputed' (the files to load are derived from them)",
    "data.text_embeddings": "nothing: the text embeddings to load are derived from data.text_embedding and "
    "config.teachers; remove the key",
    "distillation.weight": "the 'weight' of a config.distillation.terms entry, e.g. [dict(method='teachtext', weight=...)]",
    "distillation.aggregation": "the 'aggregation' setting of a config.distillation.terms entry",
    "distillation.distance": "the 'distance' setting of a config.distillation.terms entry (huber, l1, l2)",
}

# Keys that may change between restarts of one run without changing what it trains: run length,
# logging and checkpoint cadence, evaluation chunking, where the same data lives, and the
# host-device transfer guard. Every other key is part of the run's identity.
RESTARTABLE_KEYS = (
    "train.num_epochs",
    "train.log_every_steps",
    "train.checkpoint_every_steps",
    "train.eval_every_epochs",
    "train.eval_chunk_videos",
    "train.transfer_guard",
    "data.data_dir",
    "data.tfds_dir",
)
# Keys that describe the recipe around the runs (which runs, which seeds), not what one run trains.
RECIPE_KEYS = ("pipeline", "study", *SHORTCUTS)


class ConfigError(UserInputError):
    """A config key or value that the trainer does not know."""


def default_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0  # the run's seed: initialisation and the sampler
    config.data_dir = ml_collections.config_dict.placeholder(str)  # shortcut for data.data_dir
    config.num_epochs = ml_collections.config_dict.placeholder(int)  # shortcut for train.num_epochs
    config.seeds = ml_collections.config_dict.placeholder(tuple)  # shortcut for pipeline.seeds

    # The student's architecture (ModelConfig fields; see tt_jax/models/config.py). "model" always
    # means this: a teacher's architecture is the student's with the entry's model_changes.
    config.model = ml_collections.ConfigDict()

    config.data = ml_collections.ConfigDict()
    config.data.source = "synthetic"  # synthetic | release (a dataset of the feature releases) | tfds
    config.data.text_embedding = "w2v"  # the text embedding the student reads
    config.data.synthetic = ml_collections.ConfigDict()  # make_synthetic_dataset keyword arguments
    # source "release" (tt_jax/data/release.py): <data_dir>/<dataset folder>/<root_feat_folder>/.
    config.data.dataset = ""  # msrvtt | activitynet | didemo | msvd | lsmdc | vatex | queryd
    config.data.data_dir = "data"  # the folder that holds the unpacked dataset folders
    config.data.split = ""  # the dataset's split choice ("" = its default, e.g. MSRVTT "full")
    config.data.root_feat_folder = ""  # "" = the dataset's (high-quality/structured-symlinks)
    config.data.denoising = ""  # "" | less100 | less80: caption masks (and the less80 train list)
    # A mask file in the release format ({video: 0/1 per caption}, tt_jax/data/caption_masks.py)
    # applied to the training split, e.g. the one the recipe's denoising stage writes.
    config.data.caption_masks = ""
    # Train on a seeded fraction of the training videos (nested: one seed's 0.25 lies inside its 0.5);
    # the recipe's teachers train on the same fraction.
    config.data.train_fraction = 1.0
    config.data.train_fraction_seed = 0
    config.data.feature_dtype = "float32"  # float16 halves host memory
    config.data.expert_files = {}  # {expert: file under the feature root} replacing the dataset's
    # source "tfds": the folder holding the release prepared by `python -m tt_jax.prepare`.
    config.data.tfds_dir = ""
    # Rank only each validation video's first caption, as the reference validates during training
    # on MSRVTT (num_test_captions: 1); the test split always uses every caption.
    config.data.val_first_caption_only = False

    config.train = ml_collections.ConfigDict()
    config.train.batch_size = 64  # global batch, split over every device
    config.train.num_epochs = 10
    config.train.optimizer = "radam"  # TeachText configs use RAdam (utils/radam.py)
    config.train.learning_rate = 1e-3
    config.train.weight_decay = 1e-5
    config.train.lr_decay_gamma = 0.95  # StepLR(step_size=1, gamma=0.95), once per epoch
    config.train.margin = 0.09381161988446174  # base_config.json MaxMarginRankingLoss margin
    config.train.fix_norm = True
    config.train.log_every_steps = 50  # also how often the loss is checked for NaN/inf
    # Validation, the best-model choice and the `latest` checkpoint happen every this many epochs
    # (and after the last one); the reference validates after every epoch.
    config.train.eval_every_epochs = 1
    config.train.checkpoint_every_steps = 0  # 0: save `latest` only when validating
    config.train.eval_chunk_videos = 256
    # "default" keeps XLA's default (TF32/bf16 passes on some accelerators); "highest" asks for
    # full float32 matmuls, to compare GPU runs with CPU runs or the reference.
    config.train.matmul_precision = "default"
    # jax.transfer_guard around the training loop: "disallow" makes an implicit host<->device copy
    # an error (the loop makes only explicit ones), "log" reports them, "allow" ignores them.
    config.train.transfer_guard = "disallow"

    config.distillation = ml_collections.ConfigDict()
    # The run's distillation terms, each a dict with a "method" and its settings
    # (tt_jax/distillation/terms.py; README: Distillation methods). The default is TeachText's:
    # Huber (delta 1) towards the teachers' mean similarity, added unweighted as the reference.
    # An empty list trains on the ranking loss alone.
    config.distillation.terms = [dict(method="teachtext")]

    # Caption denoising from teacher ranks (tt_jax/denoising.py): the recipe's denoising stage ranks
    # every training caption against every training video with the teachers, and the students
    # sample only the captions whose video is ranked within the top max_rank (unset: every caption).
    config.denoising = ml_collections.ConfigDict()
    config.denoising.max_rank = ml_collections.config_dict.placeholder(int)
    config.denoising.rule = "aggregate"  # aggregate (Phi's rank) | any (drop if any teacher's rank > R) | all
    config.denoising.aggregation = "mean"  # Phi over the teachers' similarities: mean | min | max
    config.denoising.ties = "optimistic"  # optimistic | average (CE's tie-break)

    # The run's teachers (see the module docstring): the distilled student reads every entry; the
    # recipe trains the "recipe" ones first; the baseline student reads none.
    config.teachers = []
    config.pipeline = ml_collections.ConfigDict()
    config.pipeline.seeds = (0, 1, 2)  # student seeds (paper tables: mean ± std over seeds)
    config.pipeline.teacher_seed = 0
    config.pipeline.stages = PIPELINE_STAGES
    # Where the "recipe" teachers are trained: "" = <workdir>/teachers/<name>; a folder shared by
    # several recipes (an ablation study's variants) keeps each teacher in <folder>/<name>-<digest of
    # its run identity>, so recipes whose teachers are the same run train them once.
    config.pipeline.teachers_dir = ""
    # An ablation study (tt_jax/ablate.py): dict(name, variants=[dict(name, changes={"key": value})],
    # plot="bars" | "lines", x_label=...); empty for the recipe alone.
    config.study = ml_collections.ConfigDict()
    return config


# -- teachers ------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TeacherEntry:
    """One checked entry of `config.teachers` (see the module docstring for the fields)."""

    name: str
    source: str
    text_embedding: str
    model_changes: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    path: str = ""
    trust_pickle: bool = False

    @property
    def is_live(self) -> bool:
        """Whether the teacher is a model run inside the student's step (else: stored embeddings)."""
        return self.source != "precomputed"

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "model_changes": _plain(self.model_changes)}


_TEACHER_FIELDS = tuple(field.name for field in dataclasses.fields(TeacherEntry))
_TEACHER_REQUIRED = ("name", "source", "text_embedding")
# Fields each source needs (beyond the required ones) and may not have.
_NEEDS = {"recipe": (), "run": ("path",), "reference": ("path",), "precomputed": ()}
_FORBIDS = {
    "recipe": ("trust_pickle",),
    "run": ("model_changes", "trust_pickle"),
    "reference": (),
    "precomputed": ("model_changes", "path", "trust_pickle"),
}


def teacher_entries(config: Any) -> list[TeacherEntry]:
    """The checked `config.teachers`: one validator for the recipe and a single run alike."""
    entries = []
    for index, raw in enumerate(config.get("teachers") or ()):
        where = f"config.teachers[{index}]"
        if not hasattr(raw, "items"):
            raise ConfigError(f"{where} must be a dict with keys {list(_TEACHER_FIELDS)}, got {raw!r}")
        values = dict(raw.items())
        unknown = sorted(set(values) - set(_TEACHER_FIELDS))
        missing = [key for key in _TEACHER_REQUIRED if not values.get(key)]
        if unknown or missing:
            hint = " (checkpoint is now path, model is now model_changes)" if {"checkpoint", "model"} & set(unknown) else ""
            raise ConfigError(
                f"{where} {values}: missing keys {missing}, unknown keys {unknown}{hint}; an entry has "
                f"{list(_TEACHER_FIELDS)}, of which {list(_TEACHER_REQUIRED)} are required"
            )
        source = values["source"]
        if source not in TEACHER_SOURCES:
            raise ConfigError(f"{where}.source is {source!r}; choose one of {list(TEACHER_SOURCES)}")
        needed = [key for key in _NEEDS[source] if not values.get(key)]
        forbidden = [key for key in _FORBIDS[source] if values.get(key)]
        if needed or forbidden:
            raise ConfigError(
                f"{where} ({values['name']!r}, source {source!r}) needs {list(_NEEDS[source]) or 'nothing more'}"
                f" and takes no {list(_FORBIDS[source])}; it lacks {needed} and sets {forbidden}"
            )
        changes = values.get("model_changes") or {}
        if not hasattr(changes, "items"):
            raise ConfigError(f"{where}.model_changes must be a dict of config.model keys, got {changes!r}")
        entries.append(
            TeacherEntry(
                name=str(values["name"]),
                source=source,
                text_embedding=str(values["text_embedding"]),
                model_changes=_plain(changes),
                path=str(values.get("path") or ""),
                trust_pickle=bool(values.get("trust_pickle", False)),
            )
        )
    names = [entry.name for entry in entries]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ConfigError(f"config.teachers names must be unique; {repeated} appear more than once")
    return entries


def teacher_model_config(config: Any, entry: TeacherEntry) -> dict:
    """The architecture of a "recipe" or "reference" teacher: config.model with its changes."""
    model = _plain(config.model)
    model.update(_plain(entry.model_changes))
    return model


# -- the whole config ----------------------------------------------------------------------------


def _plain(value: Any) -> Any:
    """ConfigDicts, tuples and FieldReferences as plain JSON values (dicts, lists, numbers)."""
    if hasattr(value, "to_dict"):
        value = value.to_dict()
    return json.loads(json.dumps(value, sort_keys=True, default=list))


def _unknown_keys(config: Any, reference: Any, prefix: str) -> list[tuple[str, list[str]]]:
    problems = []
    for key in config.keys():
        path = f"{prefix}{key}"
        if path in _MOVED_KEYS:
            raise ConfigError(f"config.{path} is no longer a key; use {_MOVED_KEYS[path]} (README: Teachers)")
        if key not in reference:
            problems.append((path, sorted(reference.keys())))
        elif path not in _FREE_FORM and isinstance(reference[key], ml_collections.ConfigDict):
            if not isinstance(config[key], ml_collections.ConfigDict):
                raise ConfigError(f"config.{path} must be a group of settings, got {config[key]!r}")
            problems += _unknown_keys(config[key], reference[key], path + ".")
    return problems


def _merge_into(target: ml_collections.ConfigDict, source: Any) -> None:
    """`target.update(source)` by value: the shortcuts are placeholders (FieldReferences), which
    ConfigDict.update refuses to copy from one config into another."""
    for key in source.keys():
        value = source[key]
        if isinstance(value, ml_collections.ConfigDict) and isinstance(target.get(key), ml_collections.ConfigDict):
            _merge_into(target[key], value)
        else:
            target[key] = value


def check_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Returns `config` with every missing key filled from the defaults; raises ConfigError on an
    unknown key (naming the valid ones) or a value that names nothing."""
    reference = default_config()
    problems = _unknown_keys(config, reference, "")
    if problems:
        path, valid = problems[0]
        more = f" (and {len(problems) - 1} more unknown keys)" if len(problems) > 1 else ""
        raise ConfigError(f"unknown config key {path!r}{more}; valid keys there are {valid}")
    merged = reference
    with merged.unlocked():
        _merge_into(merged, config)
        for shortcut, dotted in SHORTCUTS.items():
            if merged[shortcut] is not None:
                group, key = dotted.split(".")
                merged[group][key] = merged[shortcut]
    stages = [stage for stage in merged.pipeline.stages if stage not in PIPELINE_STAGES]
    if stages:
        raise ConfigError(f"unknown pipeline stages {stages}; valid stages are {list(PIPELINE_STAGES)}")
    for key in ("num_epochs", "eval_every_epochs", "log_every_steps"):
        if not isinstance(merged.train[key], int) or merged.train[key] < 1:
            raise ConfigError(f"train.{key} must be a whole number of at least 1, got {merged.train[key]!r}")
    if merged.train.transfer_guard not in TRANSFER_GUARDS:
        raise ConfigError(
            f"train.transfer_guard is {merged.train.transfer_guard!r}; choose one of {list(TRANSFER_GUARDS)}"
        )
    if not merged.model:
        raise ConfigError("config.model is empty: describe the student (see configs/demo.py)")
    fraction = merged.data.train_fraction
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
        raise ConfigError(f"data.train_fraction must lie in (0, 1] (the share of training videos kept), got {fraction!r}")
    if DenoisingSettings.from_config(merged) is not None and merged.data.denoising:
        raise ConfigError(
            f"denoising.max_rank makes the run's own caption masks and data.denoising reads the release's "
            f"({merged.data.denoising!r}); choose one"
        )
    teacher_entries(merged)
    distillation_terms(merged)
    return merged


# -- a run's identity ----------------------------------------------------------------------------


def _flatten(value: Any, prefix: str) -> dict[str, Any]:
    """{"a.b[0].c": leaf} of a plain JSON value, so that a mismatch can name each key."""
    if isinstance(value, dict):
        flat = {}
        for key in sorted(value):
            flat.update(_flatten(value[key], f"{prefix}.{key}" if prefix else str(key)))
        return flat if value or not prefix else {prefix: {}}
    if isinstance(value, list) and any(isinstance(item, (dict, list)) for item in value):
        flat = {}
        for index, item in enumerate(value):
            flat.update(_flatten(item, f"{prefix}[{index}]"))
        return flat
    return {prefix: value}


# The settings of the single TeachText distillation before `distillation.terms` replaced them.
_LEGACY_DISTILLATION = ("weight", "aggregation", "distance")


def legacy_terms(distillation: Mapping[str, Any], has_teachers: bool) -> list[dict]:
    """The terms a run saved before `distillation.terms` existed was trained with: TeachText's
    term with its old settings when it had teachers, none otherwise. Its "l2" was x^2, twice
    today's 0.5 x^2, hence twice the weight."""
    if not has_teachers:
        return []
    distance = distillation.get("distance", "huber")
    weight = float(distillation.get("weight", 1.0)) * (2.0 if distance == "l2" else 1.0)
    return [dict(method="teachtext", weight=weight, aggregation=distillation.get("aggregation", "mean"), distance=distance)]


def _terms_identity(terms: list[dict]) -> dict[str, Any]:
    resolved = _plain([term.to_dict() for term in parse_terms(terms)])
    return _flatten({"distillation": {"terms": resolved}}, "")


def migrated_identity(saved: Mapping[str, Any]) -> dict[str, Any]:
    """A saved identity in today's keys: one written before `distillation.terms` existed names the
    old distillation settings (or none, for a run without teachers) instead of the terms."""
    saved = dict(saved)
    if any(key.startswith("distillation.terms") for key in saved):
        return saved
    old = {key: saved.pop(f"distillation.{key}") for key in _LEGACY_DISTILLATION if f"distillation.{key}" in saved}
    has_teachers = bool(old) or any(key.startswith("teachers[") for key in saved)
    return {**saved, **_terms_identity(legacy_terms(old, has_teachers))}


def run_identity(config: Any) -> dict[str, Any]:
    """{dotted key: value} of every setting of `config` (checked) that changes what is trained.

    Everything but RESTARTABLE_KEYS and the recipe's own keys; the distillation terms with every
    setting resolved, so that a default made explicit is the same run. A "recipe" teacher is identified
    by its entry (and the rest of the config), not by where the recipe keeps its run directory,
    so a recipe's workdir can move; `trust_pickle` is a permission, not a setting.
    """
    plain = _plain(config)
    for key in RECIPE_KEYS:
        plain.pop(key, None)
    plain["model"] = as_model_config(plain["model"]).to_dict()  # resolved: every field, defaults included
    plain["teachers"] = [
        {
            key: value
            for key, value in entry.to_dict().items()
            if key != "trust_pickle" and not (key == "path" and entry.source == "recipe")
        }
        for entry in teacher_entries(config)
    ]
    data = plain.get("data", {})
    if plain.get("denoising", {}).get("max_rank") is not None and data.get("caption_masks"):
        # The recipe's masks: their folder is named by what they follow from (teachers, data,
        # settings; tt_jax.pipeline.masks_path), and that name, not the recipe's workdir (which
        # can move), is the identity.
        parts = str(data["caption_masks"]).rstrip("/").split("/")
        data["caption_masks"] = "/".join(parts[-2:])
    if any(entry.source == "recipe" for entry in teacher_entries(config)):
        # The recipe trains its teachers with this seed; in a shared pipeline.teachers_dir another
        # seed is another teacher folder, which the entries (without their paths) do not show.
        plain["pipeline"] = {"teacher_seed": int(config.pipeline.teacher_seed)}
    distillation = plain.setdefault("distillation", {})
    if "terms" not in distillation:  # a config saved before the terms existed
        old = {key: distillation.pop(key) for key in _LEGACY_DISTILLATION if key in distillation}
        distillation["terms"] = legacy_terms(old, bool(plain["teachers"]))
    distillation["terms"] = _plain([term.to_dict() for term in parse_terms(distillation["terms"])])
    flat = _flatten(plain, "")
    for key in RESTARTABLE_KEYS:
        flat.pop(key, None)
    return flat


@functools.lru_cache(maxsize=1)
def _default_values() -> dict[str, Any]:
    """{dotted key: default} of the config schema and of the model's fields (experts' as
    "model.experts[].<field>")."""
    defaults = _flatten(_plain(default_config()), "")
    for cls, prefix in ((ModelConfig, "model."), (ExpertConfig, "model.experts[].")):
        for field in dataclasses.fields(cls):
            if field.default is not dataclasses.MISSING:
                defaults[prefix + field.name] = field.default
    return defaults


def _default_of(key: str) -> Any:
    return _default_values().get(re.sub(r"\[\d+\]", "[]", key), _NOT_SET)


_NOT_SET = "<not set>"
_TERM_KEY = re.compile(r"distillation\.terms\[(\d+)\]\.(.+)")


def _term_setting_default(identity: Mapping[str, Any], key: str) -> Any:
    """The default of a distillation term's setting, for that term's method in `identity` (a
    setting added to a method after a run was saved stands at its default there)."""
    match = _TERM_KEY.fullmatch(key)
    method = METHODS.get(identity.get(f"distillation.terms[{match.group(1)}].method")) if match else None
    if method is None:
        return _NOT_SET
    setting = match.group(2)
    if setting == "weight":
        return method.weight
    if setting.startswith("schedule."):
        field = Schedule.__dataclass_fields__.get(setting.removeprefix("schedule."))
        return _NOT_SET if field is None else field.default
    return method.settings.get(setting, _NOT_SET)


def identity_digest(identity: Mapping[str, Any]) -> str:
    """A short name of a run identity that stays the same when a key is added to tt_jax at its
    default (only the settings that differ from their defaults are hashed)."""
    kept = {key: value for key, value in identity.items() if value != _default_of(key)}
    return hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()[:10]


def identity_differences(saved: Mapping[str, Any], current: Mapping[str, Any], limit: int = 20) -> str:
    """"key (old value -> new value), ..." for every key on which two identities differ ("" if none).

    A key that one side lacks stands at its default there: a setting added to tt_jax after a run
    was saved, left at its default, is the same run.
    """
    saved, current = dict(saved), dict(current)
    if any(key.startswith("distillation.terms") for key in current):  # a run's identity of today
        saved = migrated_identity(saved)

    def value(identity, key):
        if key in identity:
            return identity[key]
        setting = _term_setting_default(identity, key)
        return _default_of(key) if setting is _NOT_SET else setting

    keys = sorted(key for key in saved.keys() | current.keys() if value(saved, key) != value(current, key))
    shown = ", ".join(f"{key} ({value(saved, key)!r} -> {value(current, key)!r})" for key in keys[:limit])
    return shown + (f" and {len(keys) - limit} more keys" if len(keys) > limit else "")
