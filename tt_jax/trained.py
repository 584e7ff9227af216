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
from etils import epath
from typing import Any, Mapping, Optional

import jax
import ml_collections
import optax

from tt_jax import optim
from tt_jax.checkpoint import Checkpointer
from tt_jax.config import identity_differences, run_identity
from tt_jax.errors import UserInputError
from tt_jax.models import CENet, ModelConfig, as_model_config, build_model
from tt_jax.distillation.terms import distillation_terms, initial_distillation_state
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


def checked_workdir(workdir) -> epath.Path:
    """The workdir as an `etils.epath` path, the path layer Orbax uses: a local directory or a
    bucket URL (`gs://bucket/run` on a pod, where every host must see the same workdir)."""
    return epath.Path(workdir)


def model_config_of(config: Any) -> ModelConfig:
    return as_model_config(config.model)


def check_same_run(saved_identity: Any, current: Mapping[str, Any], where: str) -> None:
    """Raises RunDirectoryError unless `saved_identity` (from results.json) is `current`, the
    identity of the run a config describes, naming each differing key with both values."""
    if not isinstance(saved_identity, dict):
        raise RunDirectoryError(
            f"{where} was written by an older tt_jax that did not record what the run trained; choose a new "
            "--workdir (or delete this one) to train the run again"
        )
    differences = identity_differences(saved_identity, current)
    if not differences:
        return
    raise RunDirectoryError(
        f"{where} holds another run: {differences}. Only "
        "the run length, logging, checkpoint and evaluation cadence, evaluation chunking and data "
        "locations may change on a rerun (tt_jax.config.RESTARTABLE_KEYS); choose a new --workdir "
        "for a different setting"
    )


def run_optimizer(config: Any, learning_rate: optax.ScalarOrSchedule) -> optax.GradientTransformation:
    """The run's optimiser: `train.optimizer` with `learning_rate` (the run's epoch decay schedule),
    fed the running sum of the gradients where a term reproduces a trainer that never zeroes them."""
    train_config = config.train
    optimizer = optim.build_optimizer(train_config.optimizer, learning_rate, train_config.weight_decay)
    if any(term.settings.get("zero_gradients") is False for term in distillation_terms(config)):
        optimizer = optax.chain(optim.accumulated_gradients(), optimizer)
    return optimizer


def _any_schedule(train_config: Any) -> optax.Schedule:
    """A schedule of the run's kind: the optimiser state's structure, not its values, depends on it."""
    return optim.epoch_decay_schedule(train_config.learning_rate, train_config.lr_decay_gamma, 1)


def write_json(path: epath.Path, value: Any) -> None:
    """Writes through a temporary file and a rename, so a killed process never leaves half a file."""
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(value, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    temporary.replace(path)


def read_run_config(workdir) -> ml_collections.ConfigDict:
    path = epath.Path(workdir) / CONFIG_FILE
    if not path.is_file():
        raise RunDirectoryError(f"{workdir} holds no training run: {path} does not exist")
    try:
        return ml_collections.ConfigDict(json.loads(path.read_text(encoding="utf-8")))
    except json.JSONDecodeError as error:
        raise RunDirectoryError(f"{path} is not valid JSON ({error}); the run directory is damaged") from error


def read_results(workdir) -> Optional[dict]:
    """The finished run's results.json, or None while it has not finished."""
    path = epath.Path(workdir) / RESULTS_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def load_trained(
    workdir, *, checkpoint: str = "best", sharding: Optional[jax.sharding.Sharding] = None
) -> TrainedModel:
    """The model of the run in `workdir`, from its best (or latest) checkpoint, restored directly
    with `sharding` (default: this process's first device)."""
    if checkpoint not in ("best", "latest"):
        raise RunDirectoryError(f"checkpoint must be 'best' or 'latest', got {checkpoint!r}")
    config = read_run_config(workdir)
    model = build_model(model_config_of(config))
    if sharding is None:
        sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    optimizer = run_optimizer(config, _any_schedule(config.train))
    distillation = initial_distillation_state(distillation_terms(config))
    abstract = abstract_train_state(model, optimizer, sharding, distillation)
    with Checkpointer(workdir, identity=run_identity(config)) as checkpointer:
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
