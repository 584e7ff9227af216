"""Training one model: the jitted step, and the epoch loop around it.

`train_and_evaluate(config, workdir)` trains `config.model` reading `config.data.text_embedding`,
distilling from `config.distillation`'s teachers when it names any:

* every epoch is one pass over the training videos in the stateless sampler's order (one caption
  per video), then a validation pass; the best epoch by validation t2v geometric mean is kept
  (ties: the later epoch, as the reference); the learning rate decays once per epoch;
* `latest` and `best` Orbax checkpoints hold the train state and the sampler position, so a run
  restarted in its workdir continues exactly where the last checkpoint left it;
* SIGTERM saves `latest` and raises `Preempted`; a non-finite loss raises
  `TrainingDivergedError` without saving anything after the last good checkpoint;
* at the end the best checkpoint is evaluated on the test split and `results.json` is written.
"""

from __future__ import annotations

import contextlib
import pathlib
import signal
import time
from typing import Any, Callable, Iterator, Mapping, Optional

import jax
import ml_collections
import numpy as np
import optax
from absl import logging

from tt_jax import parallel
from tt_jax.checkpoint import Checkpointer
from tt_jax.config import check_config
from tt_jax.data import sampler
from tt_jax.data.feature_store import FeatureStore
from tt_jax.data.sources import load_splits
from tt_jax.errors import UserInputError
from tt_jax.evaluate import evaluate_variables
from tt_jax.interop import from_reference_state_dict, load_reference_checkpoint
from tt_jax.metrics import METRIC_NAMES
from tt_jax.models import ModelConfig, as_model_config, build_model, count_parameters
from tt_jax.objective import ObjectiveOptions, make_objective
from tt_jax.reporting import MetricWriter, progress
from tt_jax.teachers import LiveTeacher, PrecomputedTeacher, Teacher
from tt_jax.train_state import TrainState, abstract_train_state, create_train_state
from tt_jax.trained import (
    RESULTS_FILE,
    RunDirectoryError,
    checked_workdir,
    load_trained,
    model_config_of,
    read_results,
    run_fingerprint,
    run_optimizer,
    write_json,
)

SELECTION_METRIC = "geometric_mean_R1-R5-R10"  # of t2v on validation (DESIGN: model selection)


class TrainingDivergedError(UserInputError):
    """The loss became NaN or inf; the message names the step and the last good checkpoint."""


class Preempted(Exception):
    """SIGTERM arrived; `latest` was saved and the same command resumes the run."""


def make_train_step(
    objective: Callable[..., tuple[jax.Array, tuple[dict, Any]]],
    optimizer: optax.GradientTransformation,
):
    """A jitted (state, teacher_variables, batch) -> (state, scalars) step; the state is donated.

    `objective` is `tt_jax.objective.make_objective(...)`: gradients reach only the student.
    """

    def step(state: TrainState, teacher_variables, batch):
        (total, (terms, batch_stats)), grads = jax.value_and_grad(objective, has_aux=True)(
            state.params, state.batch_stats, teacher_variables, batch
        )
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        new_state = TrainState(
            step=state.step + 1,
            params=optax.apply_updates(state.params, updates),
            batch_stats=batch_stats,
            opt_state=opt_state,
        )
        scalars = {"loss": total, **terms, "grad_norm": optax.tree.norm(grads)}
        return new_state, scalars

    return jax.jit(step, donate_argnums=0)


# -- teachers ------------------------------------------------------------------------------------


def is_reference_checkpoint(path: str) -> bool:
    """Whether a teacher checkpoint is a reference PyTorch file (else: one of our run directories)."""
    return str(path).endswith((".pth", ".pt", ".tar"))


def load_teachers(config: Any, train_store: FeatureStore) -> tuple[list[Teacher], dict]:
    """The run's teachers and the host variables of the live ones ({name: variables})."""
    teachers: list[Teacher] = []
    variables = {}
    for entry in config.distillation.teachers:
        entry = dict(entry)
        unknown = sorted(set(entry) - {"name", "text_embedding", "checkpoint", "model", "trust_pickle"})
        missing = sorted({"name", "text_embedding", "checkpoint"} - set(entry))
        if unknown or missing:
            raise RunDirectoryError(
                f"distillation teacher entry {entry}: missing keys {missing}, unknown keys {unknown}; an entry "
                "has name, text_embedding, checkpoint and, for reference .pth files, model and trust_pickle"
            )
        name, text_name, source = entry["name"], entry["text_embedding"], entry["checkpoint"]
        if is_reference_checkpoint(source):
            if "model" not in entry:
                raise RunDirectoryError(f"teacher {name!r}: a reference checkpoint needs 'model' (its model config)")
            model_config = as_model_config(entry["model"])
            state_dict = load_reference_checkpoint(source, trust_pickle=bool(entry.get("trust_pickle", False)))
            teacher_variables = from_reference_state_dict(state_dict, model_config)
        else:
            trained = load_trained(source)
            if trained.text_name != text_name:
                raise RunDirectoryError(
                    f"teacher {name!r} should read the text embedding {text_name!r}, but its checkpoint in "
                    f"{source} was trained on {trained.text_name!r}"
                )
            model_config, teacher_variables = trained.model.config, jax.device_get(trained.variables)
        train_store.validate(model_config, text_name)
        teachers.append(LiveTeacher(name, build_model(model_config), text_name))
        variables[name] = teacher_variables
    stored = train_store.teacher_embeddings or {}
    for name in config.distillation.precomputed_teachers:
        if name not in stored:
            raise RunDirectoryError(
                f"precomputed teacher {name!r} is not in the training features; they hold {sorted(stored)}"
            )
        teachers.append(PrecomputedTeacher(name, tuple(sorted(stored[name]["video"]))))
    return teachers, variables


def _text_lengths(student: ModelConfig, text_name: str, teachers: list[Teacher]) -> dict[str, int]:
    """{text embedding: padded token count} of every model in the step."""
    lengths = {text_name: student.text_max_tokens}
    for teacher in teachers:
        if not isinstance(teacher, LiveTeacher):
            continue
        length = teacher.model.config.text_max_tokens
        if lengths.setdefault(teacher.text_name, length) != length:
            raise UserInputError(
                f"teacher {teacher.name!r} pads {teacher.text_name!r} to {length} tokens but another model "
                f"reading it pads to {lengths[teacher.text_name]}; give them the same text_max_tokens"
            )
    return lengths


# -- stopping cleanly ----------------------------------------------------------------------------


@contextlib.contextmanager
def _sigterm_flag() -> Iterator[dict]:
    """{"received": bool}, set by SIGTERM while the block runs (single-process runs).

    Multi-process runs use JAX's preemption sync point instead, which makes every process stop
    at the same step.
    """
    flag = {"received": False}
    if jax.process_count() > 1:
        yield flag
        return

    def handler(signum, frame):
        del signum, frame
        flag["received"] = True

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread (e.g. some notebook kernels): no preemption handling
        yield flag
        return
    try:
        yield flag
    finally:
        signal.signal(signal.SIGTERM, previous)


def _preempted(flag: Mapping[str, bool], global_step: int) -> bool:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        return multihost_utils.reached_preemption_sync_point(global_step)
    return flag["received"]


def _check_finite(scalars: Mapping[str, Any], global_step: int, last_saved: Optional[int], workdir) -> None:
    loss = float(scalars["loss"])
    if np.isfinite(loss):
        return
    kept = (
        f"the last good checkpoint is step {last_saved} in {workdir}/checkpoints/latest"
        if last_saved is not None
        else "no checkpoint was saved before it"
    )
    raise TrainingDivergedError(
        f"the training loss became {loss} at step {global_step}; {kept} and nothing after it was saved. "
        "Lower train.learning_rate or check the input features, then rerun (the run resumes from that checkpoint)."
    )


# -- the loop ------------------------------------------------------------------------------------


def _flat_metrics(prefix: str, result: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    return {f"{prefix}/{direction}_{name}": result[direction][name] for direction in ("t2v", "v2t") for name in METRIC_NAMES}


def _stores(config: Any, model_config: ModelConfig) -> dict[str, FeatureStore]:
    stores = load_splits(config.data, config.model)
    for split in ("train", "val"):
        if split not in stores:
            raise UserInputError(
                f"the data has no {split!r} split (it has {sorted(stores)}); training needs train and val"
            )
    for store in stores.values():
        store.validate(model_config, config.data.text_embedding)
    return stores


def train_and_evaluate(config: ml_collections.ConfigDict, workdir) -> dict:
    """Trains (or resumes, or, if finished, just reads) the run in `workdir`; returns its results:
    {"val": best validation metrics, "test": test metrics of that checkpoint (if the data has a
    test split), "best_epoch", "best_step", "num_parameters", "num_epochs", "train_seconds"}."""
    config = check_config(config)
    workdir = checked_workdir(workdir)
    finished = read_results(workdir)
    if finished is not None and finished.get("num_epochs") == config.train.num_epochs:
        if finished.get("fingerprint") != run_fingerprint(config):
            raise RunDirectoryError(
                f"{workdir} holds a finished run of another model or setting ({RESULTS_FILE} differs in "
                "model, text embedding, optimiser, batch size, seed or teachers); choose a new --workdir"
            )
        logging.info("%s has finished; reading its results", workdir)
        return finished
    with jax.default_matmul_precision(config.train.matmul_precision):
        return _train(config, workdir)


def _train(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> dict:
    train_config = config.train
    model_config = model_config_of(config)
    text_name = config.data.text_embedding
    stores = _stores(config, model_config)
    train_store = stores["train"]

    mesh = parallel.make_mesh()
    devices = mesh.size
    parallel.check_batch_divisible(train_config.batch_size, mesh)
    steps_in_epoch = sampler.steps_per_epoch(train_store.num_videos, train_config.batch_size, multiple_of=devices)
    optimizer = run_optimizer(train_config, steps_in_epoch)
    model = build_model(model_config)
    teachers, teacher_variables = load_teachers(config, train_store)
    text_lengths = _text_lengths(model_config, text_name, teachers)
    precomputed_names = [teacher.name for teacher in teachers if isinstance(teacher, PrecomputedTeacher)]
    options = ObjectiveOptions(
        margin=train_config.margin,
        fix_norm=train_config.fix_norm,
        distillation_weight=config.distillation.weight,
        teacher_aggregation=config.distillation.aggregation,
        distillation_distance=config.distillation.distance,
    )
    objective = make_objective(
        build_model(model_config, axis_name=parallel.DATA_AXIS), teachers, options, mesh, student_text=text_name
    )
    step_fn = make_train_step(objective, optimizer)
    teacher_variables = parallel.put_replicated(teacher_variables, mesh)
    schedule = lambda step: train_config.learning_rate * train_config.lr_decay_gamma ** (step // steps_in_epoch)

    is_main = jax.process_index() == 0
    checkpointer = Checkpointer(workdir, fingerprint=run_fingerprint(config))
    writer = MetricWriter(workdir, is_main_process=is_main)
    writer.write_config(config)
    abstract = abstract_train_state(model, optimizer, parallel.replicated(mesh))
    try:
        restored = checkpointer.restore_latest(abstract)
        if restored is None:
            state = parallel.put_replicated(create_train_state(model, optimizer, jax.random.key(config.seed)), mesh)
            position, last_saved = sampler.SamplerPosition(), None
        else:
            state, meta = restored
            position, last_saved = sampler.SamplerPosition.from_dict(meta["position"]), meta["step"]
            logging.info("resuming %s from step %d (epoch %d, step %d)", workdir, last_saved, position.epoch, position.step)
        best = checkpointer.best_metrics()

        def validate() -> dict:
            host_variables = jax.device_get(state.variables)
            return evaluate_variables(
                model,
                host_variables,
                stores["val"],
                text_name,
                chunk_videos=train_config.eval_chunk_videos,
                first_caption_only=config.data.val_first_caption_only,
            )

        global_step = position.epoch * steps_in_epoch + position.step
        start = time.perf_counter()
        with _sigterm_flag() as sigterm:
            while position.epoch < train_config.num_epochs:
                epoch = position.epoch
                pending = None  # the previous step's scalars, checked one step late to keep the device busy
                for _ in progress(
                    range(position.step, steps_in_epoch),
                    total=steps_in_epoch - position.step,
                    description=f"epoch {epoch + 1}/{train_config.num_epochs}",
                    enabled=is_main,
                ):
                    videos, captions = sampler.process_batch_indices(
                        config.seed, epoch, position.step, train_store.sampling_weights, train_config.batch_size,
                        process_index=jax.process_index(), process_count=jax.process_count(), multiple_of=devices,
                    )
                    batch = train_store.batch(
                        videos, captions, text_names=list(text_lengths), max_text_tokens=text_lengths,
                        teacher_names=precomputed_names,
                    )
                    state, scalars = step_fn(state, teacher_variables, parallel.global_batch_from_process_data(batch, mesh))
                    if pending is not None:
                        _check_finite(pending, global_step, last_saved, workdir)
                    pending = scalars
                    position = sampler.advance(position, steps_in_epoch)
                    global_step += 1
                    if global_step % train_config.log_every_steps == 0:
                        writer.write_scalars(global_step, {**scalars, "learning_rate": schedule(global_step - 1)})
                    if _preempted(sigterm, global_step):
                        _check_finite(scalars, global_step, last_saved, workdir)
                        checkpointer.save_latest(state, position=position.to_dict())
                        checkpointer.wait()
                        raise Preempted(
                            f"stopped by SIGTERM at step {global_step}; saved {workdir}/checkpoints/latest. "
                            "Run the same command again to resume."
                        )
                    every = train_config.checkpoint_every_steps
                    if every and global_step % every == 0 and position.step != 0:
                        _check_finite(scalars, global_step, last_saved, workdir)
                        checkpointer.save_latest(state, position=position.to_dict())
                        last_saved = global_step
                if pending is not None:
                    _check_finite(pending, global_step, last_saved, workdir)
                if (epoch + 1) % train_config.eval_every_epochs and epoch + 1 != train_config.num_epochs:
                    continue

                val = validate()
                gmean = val["t2v"][SELECTION_METRIC]
                logging.info(
                    "%s epoch %d/%d: val t2v R@1 %.2f, geometric mean %.2f",
                    workdir.name, epoch + 1, train_config.num_epochs, val["t2v"]["R1"], gmean,
                )
                writer.write_scalars(global_step, {**_flat_metrics("val", val), "epoch": epoch + 1})
                if best is None or gmean >= best["t2v"][SELECTION_METRIC]:  # ties: the later epoch wins
                    best = {**val, "epoch": epoch + 1, "step": global_step}
                    checkpointer.save_best(state, position=position.to_dict(), metrics=best)
                checkpointer.save_latest(state, position=position.to_dict())
                last_saved = global_step
        checkpointer.wait()
        seconds = time.perf_counter() - start

        if best is None:
            raise UserInputError(f"train.num_epochs is {train_config.num_epochs}: nothing was trained")
        best_state, _ = checkpointer.restore_best(abstract)
        results = {
            "val": {direction: best[direction] for direction in ("t2v", "v2t")},
            "best_epoch": best["epoch"],
            "best_step": best["step"],
            "num_epochs": train_config.num_epochs,
            "num_parameters": count_parameters(model_config),
            "train_seconds": seconds,
            "fingerprint": run_fingerprint(config),
        }
        if "test" in stores:
            test = evaluate_variables(
                model, jax.device_get(best_state.variables), stores["test"], text_name,
                chunk_videos=train_config.eval_chunk_videos,
            )
            results["test"] = {direction: test[direction] for direction in ("t2v", "v2t")}
            writer.write_scalars(global_step, _flat_metrics("test", test))
        if is_main:
            write_json(workdir / RESULTS_FILE, results)
        return results
    finally:
        writer.close()
        checkpointer.close()
