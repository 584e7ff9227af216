"""Training one model, top to bottom: `train_and_evaluate(config, workdir)`.

The student `config.model` reads `config.data.text_embedding` and is distilled from the entries of
`config.teachers` (none: the ranking loss alone). In order, `_train` sets up the data, the mesh,
the train state (created directly where it lives), the teachers, the compiled step and the
evaluators, resumes from the workdir, runs the epochs and writes the results:

* every epoch is one pass over the training videos in the stateless sampler's order (one caption
  per video); every `train.eval_every_epochs` epochs (and after the last) a validation pass picks
  the best epoch by validation t2v geometric mean (ties: the later epoch, as the reference); the
  learning rate decays once per epoch;
* `latest` and `best` Orbax checkpoints hold the train state and the sampler position, so a run
  restarted in its workdir continues exactly where the last checkpoint left it, and only if the
  config describes the same run (`tt_jax.config.run_identity`);
* the loss is read back to the host only at logging steps and before each save (where a NaN or inf
  raises `TrainingDivergedError` and nothing non-finite is ever saved), so the device queue is never
  drained by the loop; the loop runs under `jax.transfer_guard(train.transfer_guard)`;
* SIGTERM saves `latest` and raises `Preempted`;
* at the end the best checkpoint is evaluated on the test split and `results.json` is written.
"""

from __future__ import annotations

import contextlib
from etils import epath
import signal
import time
from typing import Any, Callable, Iterator, Mapping, Optional

import jax
import ml_collections
import numpy as np
import optax
from absl import logging

from tt_jax import optim, parallel
from tt_jax.checkpoint import Checkpointer
from tt_jax.config import TeacherEntry, check_config, run_identity, teacher_entries
from tt_jax.data import sampler
from tt_jax.data.feature_store import FeatureStore
from tt_jax.data.sources import DataNeeds, check_experts_in_data, load_splits
from tt_jax.data.training_split import training_store
from tt_jax.denoising_settings import DenoisingSettings
from tt_jax.errors import UserInputError
from tt_jax.evaluate import Evaluator
from tt_jax.metrics import METRIC_NAMES
from tt_jax.models import build_model, count_parameters
from tt_jax.distillation.terms import check_terms_for_run, distillation_terms, initial_distillation_state
from tt_jax.objective import ObjectiveOptions, make_epoch_update, make_objective
from tt_jax.reporting import MetricWriter, progress
from tt_jax.teachers import PrecomputedTeacher, live_model_config, load_teachers, teacher_embedding_dims
from tt_jax.train_state import TrainState, abstract_train_state, create_train_state
from tt_jax.trained import (
    RESULTS_FILE,
    check_same_run,
    checked_workdir,
    model_config_of,
    read_results,
    run_optimizer,
    write_json,
)

SELECTION_METRIC = "geometric_mean_R1-R5-R10"  # of t2v on validation (DESIGN: model selection)

__all__ = ["Preempted", "TrainState", "TrainingDivergedError", "data_needs", "data_readers", "make_train_step", "run_stores", "train_and_evaluate"]


class TrainingDivergedError(UserInputError):
    """The loss became NaN or inf; the message names the step and the last good checkpoint."""


class Preempted(Exception):
    """SIGTERM arrived; `latest` was saved and the same command resumes the run."""


def make_train_step(
    objective: Callable[..., tuple[jax.Array, tuple[dict, Any]]],
    optimizer: optax.GradientTransformation,
    learning_rate: Optional[optax.Schedule] = None,
):
    """A jitted (state, teacher_variables, batch) -> (state, scalars) step; the state is donated.

    `objective` is `tt_jax.objective.make_objective(...)`: gradients reach only the student.
    `learning_rate`: the optimiser's own schedule, logged as the rate this step used.
    """

    def step(state: TrainState, teacher_variables, batch):
        (total, (loss_scalars, batch_stats)), grads = jax.value_and_grad(objective, has_aux=True)(
            state.params, state.batch_stats, teacher_variables, batch, state.step, state.distillation
        )
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        new_state = TrainState(
            step=state.step + 1,
            params=optax.apply_updates(state.params, updates),
            batch_stats=batch_stats,
            opt_state=opt_state,
            distillation=state.distillation,
        )
        scalars = {"loss": total, **loss_scalars, "grad_norm": optax.tree.norm(grads)}
        if learning_rate is not None:
            scalars["learning_rate"] = learning_rate(state.step)
        return new_state, scalars

    return jax.jit(step, donate_argnums=0)


def data_readers(config: Any, entries: Optional[list[TeacherEntry]] = None) -> tuple[list, list[str]]:
    """([(model config, text embedding)] of the student and every live teacher of `entries`
    (default: the config's), [release teacher files of the precomputed ones])."""
    entries = teacher_entries(config) if entries is None else entries
    readers = [(model_config_of(config), config.data.text_embedding)]
    readers += [(live_model_config(config, entry), entry.text_embedding) for entry in entries if entry.is_live]
    return readers, [entry.text_embedding for entry in entries if not entry.is_live]


def data_needs(config: Any, entries: Optional[list[TeacherEntry]] = None) -> DataNeeds:
    """What the run's models read, each text embedding at the longest length any of them reads."""
    return DataNeeds.of(*data_readers(config, entries))


def check_run_before_loading(config: Any) -> None:
    """What can be checked of a run from its config alone, so that a recipe stops before its
    first run rather than at the student's: every model's experts are in the dataset, and the
    terms' needs (teachers present and read, k within the batch, live teachers' embedding
    dimensions)."""
    model_config = model_config_of(config)
    models, teacher_dims = {"the student": model_config}, {}
    for entry in teacher_entries(config):
        if entry.is_live:
            teacher = live_model_config(config, entry)
            models[f"teacher {entry.name!r}"] = teacher
            teacher_dims[entry.name] = {expert.name: teacher.embedding_dim(expert) for expert in teacher.experts}
        else:
            teacher_dims[entry.name] = None  # known once its release file is loaded
    check_experts_in_data(config.data, models)
    check_terms_for_run(
        distillation_terms(config),
        num_teachers=len(teacher_dims),
        smallest_batch=config.train.batch_size,
        student_dims={expert.name: model_config.embedding_dim(expert) for expert in model_config.experts},
        teacher_dims=teacher_dims,
    )


def run_stores(config: Any) -> dict[str, FeatureStore]:
    """{split: FeatureStore} holding what a run of `config` reads (e.g. for a notebook)."""
    return load_splits(config.data, data_needs(config))


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


class _LossWatch:
    """Reads the loss back to the host only when asked (logging steps, before saves), so the loop
    never waits for the device otherwise; raises TrainingDivergedError on NaN or inf."""

    def __init__(self, workdir: epath.Path):
        self.workdir = workdir
        self.last_finite_step: Optional[int] = None
        self.last_saved: Optional[int] = None

    def check(self, scalars: Mapping[str, Any], global_step: int) -> dict[str, float]:
        """The step's scalars on the host, after checking the loss and the gradient norm (a finite
        loss with non-finite gradients has made the state non-finite all the same)."""
        values = {name: float(value) for name, value in jax.device_get(dict(scalars)).items()}
        if np.isfinite(values["loss"]) and np.isfinite(values["grad_norm"]):
            self.last_finite_step = global_step
            return values
        what = "loss" if not np.isfinite(values["loss"]) else "gradient norm"
        kept = (
            f"the last good checkpoint is step {self.last_saved} in {self.workdir}/checkpoints/latest"
            if self.last_saved is not None
            else "no checkpoint was saved before it"
        )
        seen = f" (last seen finite at step {self.last_finite_step})" if self.last_finite_step is not None else ""
        raise TrainingDivergedError(
            f"the training {what} became {values['loss' if what == 'loss' else 'grad_norm']} by step "
            f"{global_step}{seen}; {kept} and nothing after it was saved. Check the input features and "
            "rerun (the run resumes from that checkpoint), or train with a lower train.learning_rate in a "
            "new --workdir (the learning rate is part of the run's identity)."
        )


def _check_resumable(position: sampler.SamplerPosition, state_step: int, steps_in_epoch: int, devices: int, workdir) -> None:
    """The checkpoint's sampler position must mean the same step on this mesh: the epoch's length
    depends on the number of devices (its last batch is cut to a multiple of it)."""
    if position.step < steps_in_epoch and position.epoch * steps_in_epoch + position.step == state_step:
        return
    raise UserInputError(
        f"the checkpoint in {workdir} stopped at step {position.step} of epoch {position.epoch + 1} after "
        f"{state_step} steps, which on these {devices} devices ({steps_in_epoch} steps per epoch) is another "
        "point of training; resume on the number of devices it was trained on"
    )


def _epoch_update_batch(config, val_store: FeatureStore, precomputed: list[str], text_lengths, mesh):
    """batch(epoch): the validation batch of an epoch's update of the stateful terms (the
    adaptive LINAS mask's M-step): the first batch of the validation split in the sampler's
    order for that epoch, as large as the training batch where the split allows."""
    missing = [name for name in precomputed if name not in (val_store.teacher_embeddings or {})]
    if missing:
        raise UserInputError(
            f"the adaptive LINAS mask learns on a validation batch, and the validation split holds no embeddings "
            f"of the precomputed teachers {missing}; use live teachers, or the LINAS mask 'diag' or 'full'"
        )
    size = min(config.train.batch_size, val_store.num_videos // mesh.size * mesh.size)
    if size < 2:
        raise UserInputError(f"the validation split's {val_store.num_videos} videos make no batch for the adaptive LINAS mask")

    def batch(epoch: int):
        videos, captions = sampler.process_batch_indices(
            config.seed, epoch, 0, val_store.sampling_weights, size,
            process_index=jax.process_index(), process_count=jax.process_count(), multiple_of=mesh.size,
        )
        host = val_store.batch(
            videos, captions, text_names=list(text_lengths), max_text_tokens=text_lengths, teacher_names=precomputed
        )
        return parallel.global_batch_from_process_data(host, mesh)

    return batch


def _flat_metrics(prefix: str, result: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    return {f"{prefix}/{direction}_{name}": result[direction][name] for direction in ("t2v", "v2t") for name in METRIC_NAMES}


# -- one run -------------------------------------------------------------------------------------


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir, *, stores: Optional[Mapping[str, FeatureStore]] = None
) -> dict:
    """Trains (or resumes, or, if finished, just reads) the run in `workdir`; returns its results:
    {"val": best validation metrics, "test": test metrics of that checkpoint (if the data has a
    test split), "best_epoch", "best_step", "num_parameters", "num_epochs", "train_seconds",
    "identity"}.

    stores: the split stores to train on, holding at least what `data_needs(config)` asks for
    (the recipe loads them once for all its runs); None loads them from `config.data`.
    """
    config = check_config(config)
    workdir = checked_workdir(workdir)
    identity = run_identity(config)
    # The workdir must hold this run, or nothing yet: checked before any data is loaded or any
    # file written, so a refused rerun changes nothing.
    finished = read_results(workdir)
    if finished is not None:
        check_same_run(finished.get("identity"), identity, f"{workdir / RESULTS_FILE}")
        if finished.get("num_epochs") == config.train.num_epochs:
            logging.info("%s has finished; reading its results", workdir)
            return finished
    check_run_before_loading(config)
    if DenoisingSettings.from_config(config) is not None and not config.data.caption_masks:
        raise UserInputError(
            "denoising.max_rank is set, and the masks it describes are made by the recipe's denoising stage "
            "(python -m tt_jax.main); for a single run on a mask file of your own, leave denoising.max_rank unset "
            "and give the file as data.caption_masks"
        )
    with Checkpointer(workdir, identity=identity) as checkpointer:
        checkpointer.check_identity()
        with jax.default_matmul_precision(config.train.matmul_precision):
            return _train(config, workdir, stores, identity, checkpointer)


def _train(
    config: ml_collections.ConfigDict, workdir: epath.Path, stores, identity: dict, checkpointer: Checkpointer
) -> dict:
    train_config, text_name = config.train, config.data.text_embedding
    entries = teacher_entries(config)
    terms = distillation_terms(config)
    needs = data_needs(config, entries)

    # ---- data: what every model of the run reads, loaded once ---------------------------------
    if stores is None:
        stores = load_splits(config.data, needs)
    for split in ("train", "val"):
        if split not in stores:
            raise UserInputError(f"the data has no {split!r} split (it has {sorted(stores)}); training needs train and val")
    train_store = training_store(config.data, stores["train"])  # its fraction and denoising masks

    # ---- mesh, model, optimiser and the train state, created where it lives --------------------
    model_config = model_config_of(config)
    mesh = parallel.make_mesh()
    replicated = parallel.replicated(mesh)
    parallel.check_batch_divisible(train_config.batch_size, mesh)
    steps_in_epoch = sampler.steps_per_epoch(train_store.num_videos, train_config.batch_size, multiple_of=mesh.size)
    learning_rate = optim.epoch_decay_schedule(train_config.learning_rate, train_config.lr_decay_gamma, steps_in_epoch)
    optimizer = run_optimizer(config, learning_rate)
    model = build_model(model_config)  # evaluation (BatchNorm in eval mode needs no devices axis)
    train_store.validate(model_config, text_name)  # the evaluators validate val and test
    initial_distillation = initial_distillation_state(terms)
    abstract = abstract_train_state(model, optimizer, replicated, initial_distillation)

    # ---- teachers: frozen variables placed on the mesh directly ------------------------------
    teachers, teacher_variables = load_teachers(config, entries, train_store, replicated)
    precomputed = [teacher.key for teacher in teachers if isinstance(teacher, PrecomputedTeacher)]
    text_lengths = needs.text_max_tokens  # each embedding once, at the longest length read
    check_terms_for_run(
        terms,
        num_teachers=len(teachers),
        smallest_batch=sampler.last_batch_size(train_store.num_videos, train_config.batch_size, multiple_of=mesh.size),
        student_dims={expert.name: model_config.embedding_dim(expert) for expert in model_config.experts},
        teacher_dims={teacher.name: teacher_embedding_dims(teacher, train_store) for teacher in teachers},
    )

    # ---- the compiled step, the terms' epoch update and the evaluators -----------------------
    options = ObjectiveOptions(
        margin=train_config.margin, fix_norm=train_config.fix_norm, terms=terms, steps_per_epoch=steps_in_epoch
    )
    student = build_model(model_config, axis_name=parallel.DATA_AXIS)
    objective = make_objective(student, teachers, options, mesh, student_text=text_name)
    step_fn = make_train_step(objective, optimizer, learning_rate)
    epoch_update = make_epoch_update(student, teachers, options, mesh, student_text=text_name)
    if epoch_update is not None:
        mask_batch = _epoch_update_batch(config, stores["val"], precomputed, text_lengths, mesh)
    evaluators = {
        split: Evaluator(
            model, stores[split], text_name, mesh=mesh, chunk_videos=train_config.eval_chunk_videos,
            first_caption_only=config.data.val_first_caption_only and split == "val",
        )
        for split in ("val", "test") if split in stores
    }

    # ---- resume ------------------------------------------------------------------------------
    is_main = jax.process_index() == 0
    writer = MetricWriter(workdir, is_main_process=is_main)
    writer.write_config(config)
    loss_watch = _LossWatch(workdir)
    try:
        restored = checkpointer.restore_latest(abstract)
        if restored is None:
            init = jax.jit(
                lambda: create_train_state(model, optimizer, jax.random.key(config.seed), initial_distillation),
                out_shardings=replicated,
            )
            state, position = init(), sampler.SamplerPosition()
        else:
            state, meta = restored
            position, loss_watch.last_saved = sampler.SamplerPosition.from_dict(meta["position"]), meta["step"]
            _check_resumable(position, int(jax.device_get(state.step)), steps_in_epoch, mesh.size, workdir)
            logging.info("resuming %s from step %d (epoch %d, step %d)", workdir, meta["step"], position.epoch, position.step)
        best = checkpointer.best_metrics()
        scalars = None  # the last step's, once one has run

        def save_latest(scalars) -> None:
            loss_watch.check(scalars, global_step)
            checkpointer.save_latest(state, position=position.to_dict())
            loss_watch.last_saved = global_step

        def stop_preempted() -> None:
            checkpointer.wait()
            raise Preempted(
                f"stopped by SIGTERM at step {global_step}; saved {workdir}/checkpoints/latest. "
                "Run the same command again to resume."
            )

        # ---- the loop --------------------------------------------------------------------------
        global_step = position.epoch * steps_in_epoch + position.step
        start = time.perf_counter()
        with _sigterm_flag() as sigterm, jax.transfer_guard(train_config.transfer_guard):
            while position.epoch < train_config.num_epochs:
                epoch, preempted = position.epoch, False
                for _ in progress(
                    range(position.step, steps_in_epoch),
                    total=steps_in_epoch - position.step,
                    description=f"epoch {epoch + 1}/{train_config.num_epochs}",
                    enabled=is_main,
                ):
                    videos, captions = sampler.process_batch_indices(
                        config.seed, epoch, position.step, train_store.sampling_weights, train_config.batch_size,
                        process_index=jax.process_index(), process_count=jax.process_count(), multiple_of=mesh.size,
                    )
                    batch = train_store.batch(
                        videos, captions, text_names=list(text_lengths), max_text_tokens=text_lengths,
                        teacher_names=precomputed,
                    )
                    state, scalars = step_fn(state, teacher_variables, parallel.global_batch_from_process_data(batch, mesh))
                    position = sampler.advance(position, steps_in_epoch)
                    global_step += 1
                    if global_step % train_config.log_every_steps == 0:
                        writer.write_scalars(global_step, loss_watch.check(scalars, global_step))
                    if _preempted(sigterm, global_step):
                        preempted = True
                        if position.step == 0:
                            break  # the epoch is complete: validate it before saving its end
                        save_latest(scalars)
                        stop_preempted()
                    every = train_config.checkpoint_every_steps
                    if every and global_step % every == 0 and position.step != 0:
                        save_latest(scalars)
                if epoch_update is not None and position.step == 0:  # the epoch is complete
                    distillation = epoch_update(
                        state.params, state.batch_stats, teacher_variables, mask_batch(epoch), state.distillation
                    )
                    state = state.replace(distillation=distillation)
                if (epoch + 1) % train_config.eval_every_epochs and epoch + 1 != train_config.num_epochs:
                    if preempted:
                        save_latest(scalars)
                        stop_preempted()
                    continue

                loss_watch.check(scalars, global_step)  # never validate, or save, a diverged state
                val = evaluators["val"].run(state.variables)
                gmean = val["t2v"][SELECTION_METRIC]
                logging.info(
                    "%s epoch %d/%d: val t2v R@1 %.2f, geometric mean %.2f",
                    workdir.name, epoch + 1, train_config.num_epochs, val["t2v"]["R1"], gmean,
                )
                writer.write_scalars(global_step, {**_flat_metrics("val", val), "epoch": epoch + 1})
                if best is None or gmean >= best["t2v"][SELECTION_METRIC]:  # ties: the later epoch wins
                    best = {**val, "epoch": epoch + 1, "step": global_step}
                    checkpointer.save_best(state, position=position.to_dict(), metrics=best)
                save_latest(scalars)
                if preempted:
                    stop_preempted()
        checkpointer.wait()
        seconds = time.perf_counter() - start

        # ---- results: the best checkpoint on the test split ------------------------------------
        if best is None:
            raise UserInputError(f"train.num_epochs is {train_config.num_epochs}: nothing was trained")
        del state, teacher_variables  # never two train states at once: the best one replaces them
        results = {
            "val": {direction: best[direction] for direction in ("t2v", "v2t")},
            "best_epoch": best["epoch"],
            "best_step": best["step"],
            "num_epochs": train_config.num_epochs,
            "num_parameters": count_parameters(model_config),
            "train_seconds": seconds,
            "identity": identity,
        }
        if "test" in evaluators:
            best_variables = checkpointer.restore_best(abstract)[0].variables  # the moments are dropped here
            test = evaluators["test"].run(best_variables)
            results["test"] = {direction: test[direction] for direction in ("t2v", "v2t")}
            writer.write_scalars(global_step, _flat_metrics("test", test))
        if is_main:
            write_json(workdir / RESULTS_FILE, results)
        return results
    finally:
        writer.close()
