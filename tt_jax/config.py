"""The experiment config: every key, its default, and the check that rejects unknown ones.

A config file (`configs/*.py`) starts from `default_config()` and changes what it needs, so a
typo in a file or on the command line (`--config.train.lerning_rate=...`) is an error that lists
the valid keys, not a silently ignored setting. Free-form entries (the model, the synthetic
generator's parameters, teacher entries) are checked where they are used.

Defaults are the reference's TeachText settings where it has one (`teachtext_ce_spec.md`).
"""

from __future__ import annotations

from typing import Any

import ml_collections

from tt_jax.errors import UserInputError

# Keys whose values are free-form dicts or lists of dicts, checked by their consumers.
_FREE_FORM = {"model", "data.synthetic", "data.expert_files", "teachers", "distillation.teachers"}

# Top-level shortcuts for the settings most often changed on the command line
# (`--config.data_dir=/data --config.num_epochs=5 --config.seeds=0,1`): when set, they replace
# the nested keys they name.
SHORTCUTS = {"data_dir": "data.data_dir", "num_epochs": "train.num_epochs", "seeds": "pipeline.seeds"}

PIPELINE_STAGES = ("teachers", "student_teachtext", "student_baseline", "report")


class ConfigError(UserInputError):
    """A config key or value that the trainer does not know."""


def default_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0  # the run's seed: initialisation and the sampler
    config.data_dir = ml_collections.config_dict.placeholder(str)  # shortcut for data.data_dir
    config.num_epochs = ml_collections.config_dict.placeholder(int)  # shortcut for train.num_epochs
    config.seeds = ml_collections.config_dict.placeholder(tuple)  # shortcut for pipeline.seeds

    # The student (ModelConfig fields; see tt_jax/models/config.py).
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
    # Every text embedding the recipe reads (student and live teachers), loaded once for all its
    # runs; empty: only data.text_embedding.
    config.data.text_embeddings = ()
    config.data.teachers = ()  # TeachText teacher files to load, by text embedding (precomputed teachers)
    config.data.denoising = ""  # "" | less100 | less80: caption masks (and the less80 train list)
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
    config.train.log_every_steps = 50
    # Validation, the best-model choice and the `latest` checkpoint happen every this many epochs
    # (and after the last one); the reference validates after every epoch.
    config.train.eval_every_epochs = 1
    config.train.checkpoint_every_steps = 0  # 0: save `latest` only when validating
    config.train.eval_chunk_videos = 256
    # "default" keeps XLA's default (TF32/bf16 passes on some accelerators); "highest" asks for
    # full float32 matmuls, to compare GPU runs with CPU runs or the reference.
    config.train.matmul_precision = "default"

    config.distillation = ml_collections.ConfigDict()
    config.distillation.weight = 1.0  # the reference adds the loss unweighted
    config.distillation.aggregation = "mean"  # mean | min | max over teachers
    config.distillation.distance = "huber"  # huber (SmoothL1, beta 1) | l1 | l2
    # Live teachers of this run: [{"name", "text_embedding", "checkpoint"}], checkpoint being the
    # workdir of one of our runs, or a reference .pth (then also "model": the teacher's config).
    config.distillation.teachers = []
    # Names of teachers whose embeddings the dataset stores (the release format).
    config.distillation.precomputed_teachers = []

    # The recipe (tt_jax.pipeline): teachers to train, each {"name", "text_embedding", "model":
    # changes to config.model, optional "checkpoint" to use instead of training one}.
    config.teachers = []
    config.pipeline = ml_collections.ConfigDict()
    config.pipeline.seeds = (0, 1, 2)  # student seeds (paper tables: mean ± std over seeds)
    config.pipeline.teacher_seed = 0
    config.pipeline.stages = PIPELINE_STAGES
    return config


def _unknown_keys(config: Any, reference: Any, prefix: str) -> list[tuple[str, list[str]]]:
    problems = []
    for key in config.keys():
        path = f"{prefix}{key}"
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
    unknown key, naming the valid ones."""
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
    if merged.train.eval_every_epochs < 1 or merged.train.num_epochs < 1:
        raise ConfigError(
            f"train.num_epochs and train.eval_every_epochs must be at least 1, got "
            f"{merged.train.num_epochs} and {merged.train.eval_every_epochs}"
        )
    if not merged.model:
        raise ConfigError("config.model is empty: describe the student (see configs/demo.py)")
    return merged
