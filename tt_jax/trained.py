"""A training run's directory, and reading a trained model back from it.

    <workdir>/config.json        the run's resolved config (written before the first step)
    <workdir>/checkpoints/       Orbax `latest/` (to resume) and `best/` (best validation epoch)
    <workdir>/metrics.jsonl      training and validation scalars; tensorboard/ holds the same
    <workdir>/results.json       written once the run has finished: best validation and test metrics

Teachers, the evaluator and notebooks all load models through `load_trained`.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any, Optional

import jax
import ml_collections
import optax

from tt_jax import optim
from tt_jax.checkpoint import Checkpointer
from tt_jax.errors import UserInputError
from tt_jax.models import CENet, ModelConfig, as_model_config, build_model
from tt_jax.train_state import abstract_train_state

CONFIG_FILE = "config.json"
RESULTS_FILE = "results.json"


class RunDirectoryError(UserInputError):
    """A directory that does not hold the training run it is expected to hold."""


@dataclasses.dataclass(frozen=True)
class TrainedModel:
    """A model ready for `model.apply(variables, ..., train=False)`, and where it came from."""

    model: CENet
    variables: Any  # {"params", "batch_stats"}, on the default device
    text_name: str  # the text embedding it reads
    config: ml_collections.ConfigDict  # the run config it was trained with
    meta: dict  # the checkpoint's step, sampler position and validation metrics


def checked_workdir(workdir) -> pathlib.Path:
    """The workdir as a path; URLs are refused, since run files are written with plain file calls."""
    if "://" in str(workdir):
        raise RunDirectoryError(
            f"workdir {workdir} is a URL; give a directory path (on a pod, one every host sees, e.g. a "
            "bucket mounted with gcsfuse)"
        )
    return pathlib.Path(workdir)


def model_config_of(config: Any) -> ModelConfig:
    return as_model_config(config.model)


def run_fingerprint(config: Any) -> dict:
    """What a checkpoint must match to be resumed by (or loaded as) the run `config` describes.

    Training length and logging may change between restarts; what the state means may not.
    """
    train = config.train
    return {
        "model": model_config_of(config).to_dict(),
        "text_embedding": config.data.text_embedding,
        "optimizer": str(train.optimizer).lower(),
        "batch_size": int(train.batch_size),
        "seed": int(config.seed),
        "teachers": sorted(teacher["name"] for teacher in config.distillation.teachers),
    }


def run_optimizer(train_config: Any, steps_per_epoch: int) -> optax.GradientTransformation:
    """The run's optimiser: `train.optimizer` with the per-epoch decayed learning rate."""
    schedule = optim.epoch_decay_schedule(train_config.learning_rate, train_config.lr_decay_gamma, steps_per_epoch)
    return optim.build_optimizer(train_config.optimizer, schedule, train_config.weight_decay)


def write_json(path: pathlib.Path, value: Any) -> None:
    """Writes through a temporary file and a rename, so a killed process never leaves half a file."""
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(value, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    temporary.replace(path)


def read_run_config(workdir) -> ml_collections.ConfigDict:
    path = pathlib.Path(workdir) / CONFIG_FILE
    if not path.is_file():
        raise RunDirectoryError(f"{workdir} holds no training run: {path} does not exist")
    try:
        return ml_collections.ConfigDict(json.loads(path.read_text(encoding="utf-8")))
    except json.JSONDecodeError as error:
        raise RunDirectoryError(f"{path} is not valid JSON ({error}); the run directory is damaged") from error


def read_results(workdir) -> Optional[dict]:
    """The finished run's results.json, or None while it has not finished."""
    path = pathlib.Path(workdir) / RESULTS_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def load_trained(workdir, *, checkpoint: str = "best") -> TrainedModel:
    """The model of the run in `workdir`, from its best (or latest) checkpoint."""
    if checkpoint not in ("best", "latest"):
        raise RunDirectoryError(f"checkpoint must be 'best' or 'latest', got {checkpoint!r}")
    config = read_run_config(workdir)
    model = build_model(model_config_of(config))
    abstract = abstract_train_state(
        model, run_optimizer(config.train, steps_per_epoch=1), jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    )
    with Checkpointer(workdir, fingerprint=run_fingerprint(config)) as checkpointer:
        restore = checkpointer.restore_best if checkpoint == "best" else checkpointer.restore_latest
        restored = restore(abstract)
    if restored is None:
        raise RunDirectoryError(
            f"{workdir} has no {checkpoint} checkpoint yet; train it first (the run has not finished an epoch)"
        )
    state, meta = restored
    return TrainedModel(
        model=model,
        variables=state.variables,
        text_name=config.data.text_embedding,
        config=config,
        meta=meta,
    )
