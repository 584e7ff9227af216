"""Latest and best checkpoints of one training run, written with Orbax (DESIGN decision 6).

Layout under the run's workdir:

    checkpoints/latest/<step>/{state,meta}   the last `keep_latest` saves, for resuming
    checkpoints/best/<step>/{state,meta}     the single best save, for evaluation and reports

`state` is the train state pytree (Orbax `StandardSave`: params, BatchNorm statistics, optimiser
state, step); `meta` is a small JSON document holding the step, the sampler position, the metrics
and the run's identity (`tt_jax.config.run_identity`), so that the position, the metrics and a
mismatch can be read without loading any array.

Why Orbax and not our own files: it writes every step into a temporary directory and renames it
when complete, so a run killed mid-save (SIGKILL, preemption) leaves the previous checkpoint intact;
it saves asynchronously; it restores each array directly with the sharding the caller asks for;
and on a pod it coordinates the processes. Every process must call every save and restore method.
"""

from __future__ import annotations

import dataclasses

import json
from etils import epath
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from tt_jax.config import identity_differences
from tt_jax.errors import UserInputError
from tt_jax.host_memory import return_freed_memory

_STATE = "state"
_META = "meta"


class CheckpointError(UserInputError):
    """A checkpoint that cannot be written or used as asked; the message says what to do."""


def _as_json(value: Any, what: str) -> Any:
    """`value` as plain JSON types (numpy/JAX scalars and arrays become numbers and lists)."""

    def convert(obj):
        if isinstance(obj, (np.generic, np.ndarray, jax.Array)):
            return np.asarray(obj).tolist()
        raise TypeError(f"{type(obj).__name__} is not JSON-serialisable")

    try:
        return json.loads(json.dumps(value, default=convert))
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"the checkpoint {what} must be JSON-serialisable: {error}") from error


def _must_be_finite(state: Any) -> Any:
    """The part of `state` that must be finite: its params and batch_stats, or all of it.

    Not the optimiser state: some optax states hold inf on purpose (e.g. a best-loss-so-far).
    """
    fields = [name for name in ("params", "batch_stats") if hasattr(state, name)]
    return {name: getattr(state, name) for name in fields} if fields else state


@jax.jit
def _finite_flags(leaves: list[jax.Array]) -> list[jax.Array]:
    return [jnp.all(jnp.isfinite(leaf)) for leaf in leaves]


def first_non_finite_leaf(state: Any) -> Optional[str]:
    """The path of the first float leaf of the params (and BatchNorm statistics) holding NaN/inf.

    One jitted reduction and one small device-to-host copy of per-leaf flags; None if all finite.
    Checks the whole state when it has no `params` attribute.
    """
    paths_and_leaves = [
        (path, leaf)
        for path, leaf in jax.tree_util.tree_flatten_with_path(_must_be_finite(state))[0]
        if jnp.issubdtype(jnp.result_type(leaf), jnp.inexact)
    ]
    if not paths_and_leaves:
        return None
    flags = jax.device_get(_finite_flags([leaf for _, leaf in paths_and_leaves]))
    for (path, _), finite in zip(paths_and_leaves, flags):
        if not finite:
            return jax.tree_util.keystr(path)
    return None


class Checkpointer:
    """Latest and best checkpoints of one training run in `workdir/checkpoints/{latest,best}`.

    Saves are asynchronous: `save_*` waits for the previous save (of either kind) to be written,
    starts the device-to-host copy and returns; the files are written in the background. `wait()`
    blocks until they are on disk; the restore methods wait first. The state may be donated to the next train step at once: while Orbax still reads the
    buffers, XLA keeps them alive instead of reusing them (one extra allocation for that step).
    A save at a step that is not newer than the newest checkpoint of its kind is skipped (Orbax
    never overwrites a step); it is logged.

    Multi-host: every process must call every method with the same arguments; Orbax writes each
    process's shards and lets only process 0 write the JSON metadata.
    """

    def __init__(self, workdir, *, identity: Mapping[str, Any], keep_latest: int = 1):
        """identity: {key: value} of what the run trains (`tt_jax.config.run_identity`).

        It is stored with every checkpoint, and restoring a checkpoint whose identity differs
        fails, naming each differing key, so that a workdir is never silently resumed by a
        different model or objective.
        """
        if keep_latest < 1:
            raise CheckpointError(f"keep_latest must be at least 1, got {keep_latest}")
        workdir = epath.Path(workdir)
        self.directory = (workdir if "://" in str(workdir) else workdir.resolve()) / "checkpoints"
        self.identity = _as_json(dict(identity), "identity")

        def manager(name: str, max_to_keep: int) -> ocp.CheckpointManager:
            options = ocp.CheckpointManagerOptions(
                max_to_keep=max_to_keep,
                create=True,
                # Temporary directories left by a killed save are never restored; remove them.
                cleanup_tmp_directories=True,
                enable_async_checkpointing=True,
                # Orbax names its cross-process barriers by step: without a prefix, `latest` and
                # `best` saving the same step at once on a pod would meet at each other's barriers.
                multiprocessing_options=ocp.options.MultiprocessingOptions(barrier_sync_key_prefix=name),
            )
            return ocp.CheckpointManager(self.directory / name, options=options, item_names=(_STATE, _META))

        self._latest = manager("latest", keep_latest)
        self._best = manager("best", 1)

    # -- saving ---------------------------------------------------------------------------------

    def save_latest(self, state: Any, *, position: Mapping[str, Any], metrics: Optional[Mapping] = None) -> None:
        """Saves `state` (and the sampler `position`) as the newest checkpoint to resume from."""
        self._save(self._latest, "latest", state, position=position, metrics=metrics)

    def save_best(self, state: Any, *, position: Mapping[str, Any], metrics: Mapping[str, Any]) -> None:
        """Saves `state` as the best model, replacing the previous best.

        The caller decides what "best" means (DESIGN 6: validation geometric mean); compare against
        `best_metrics()` before calling.
        """
        self._save(self._best, "best", state, position=position, metrics=metrics)

    def _save(self, manager, kind: str, state: Any, *, position, metrics) -> None:
        step = int(jax.device_get(state.step))
        bad_leaf = first_non_finite_leaf(state)
        if bad_leaf is not None:
            raise CheckpointError(
                f"refusing to save the {kind} checkpoint at step {step}: {bad_leaf} holds NaN or inf. "
                "Training diverged; resume from the previous checkpoint, or train with a lower learning rate "
                "in a new workdir."
            )
        # One save in flight at a time: each holds a host copy of the whole state until it is
        # written, and `best` and `latest` are saved one after the other after a validation. The
        # train step's freed temporaries go back to the system first, so the copy does not add to them.
        self.wait()
        return_freed_memory()
        meta = {
            "step": step,
            "position": _as_json(dict(position), "position"),
            "metrics": None if metrics is None else _as_json(dict(metrics), "metrics"),
            "identity": self.identity,
        }
        saved = manager.save(
            step,
            args=ocp.args.Composite(**{_STATE: ocp.args.StandardSave(state), _META: ocp.args.JsonSave(meta)}),
        )
        if not saved:
            logging.warning(
                "Skipped the %s checkpoint at step %d: the newest one is at step %s.",
                kind,
                step,
                manager.latest_step(),
            )

    # -- restoring ------------------------------------------------------------------------------

    def restore_latest(self, abstract_state: Any) -> Optional[tuple[Any, dict]]:
        """(state, meta) of the newest checkpoint, or None when there is none.

        abstract_state: the state's structure, from `jax.eval_shape` or a concrete state. Leaves
        that are arrays or `jax.ShapeDtypeStruct`s with a `.sharding` are restored with that
        sharding (so restoring onto a mesh places each array directly); leaves without one get
        the sharding recorded at save time. meta: {"step", "position", "metrics"}.
        """
        return self._restore(self._latest, "latest", abstract_state)

    def restore_best(self, abstract_state: Any) -> Optional[tuple[Any, dict]]:
        """(state, meta) of the best checkpoint, or None; see `restore_latest`."""
        return self._restore(self._best, "best", abstract_state)

    def best_metrics(self) -> Optional[dict]:
        """The metrics saved with the best checkpoint (JSON only, no array is read), or None."""
        meta = self._read_meta(self._best, "best")
        return None if meta is None else meta["metrics"]

    def _read_meta(self, manager, kind: str) -> Optional[dict]:
        """The checked JSON metadata of `manager`'s newest step, or None when it has none."""
        manager.wait_until_finished()
        step = manager.latest_step()
        if step is None:
            return None
        meta = manager.restore(step, args=ocp.args.Composite(**{_META: ocp.args.JsonRestore()}))[_META]
        self._check_identity(meta.get("identity"), kind, step)
        return {key: meta.get(key) for key in ("step", "position", "metrics")}

    def _restore(self, manager, kind: str, abstract_state: Any) -> Optional[tuple[Any, dict]]:
        meta = self._read_meta(manager, kind)
        if meta is None:
            return None
        target, absent = self._restore_target(manager, meta["step"], abstract_state)
        restored = manager.restore(meta["step"], args=ocp.args.Composite(**{_STATE: ocp.args.StandardRestore(target)}))
        state = restored[_STATE]
        if absent:  # a field added to the state after this checkpoint was written, empty by default
            state = abstract_state.replace(**state)
        return state, meta

    @staticmethod
    def _restore_target(manager, step: int, abstract_state: Any) -> tuple[Any, list[str]]:
        """What to restore into: the state itself, or, for a checkpoint written before a field of
        the state existed whose value is still empty (no arrays, e.g. the distillation terms' state
        of a run without stateful terms), a dict of the fields the checkpoint has."""
        if not dataclasses.is_dataclass(abstract_state):
            return abstract_state, []
        try:
            metadata = ocp.StandardCheckpointer().metadata(epath.Path(manager.directory) / str(step) / _STATE)
            saved = set(metadata.item_metadata.keys())
        except (AttributeError, FileNotFoundError, KeyError, TypeError, ValueError):
            return abstract_state, []  # restore as is: Orbax names what does not match
        fields = [field.name for field in dataclasses.fields(abstract_state)]
        absent = [name for name in fields if name not in saved]
        if not absent or any(jax.tree.leaves(getattr(abstract_state, name)) for name in absent):
            return abstract_state, []  # restore as is: Orbax names what does not match
        return {name: getattr(abstract_state, name) for name in fields if name in saved}, absent

    def check_identity(self) -> None:
        """Raises CheckpointError unless every checkpoint here was written by this run (reads only
        the JSON metadata)."""
        self._read_meta(self._latest, "latest")
        self._read_meta(self._best, "best")

    def _check_identity(self, saved: Any, kind: str, step: int) -> None:
        where = f"the {kind} checkpoint at step {step} in {self.directory}"
        if not isinstance(saved, dict):
            raise CheckpointError(
                f"{where} records no run identity (an older tt_jax wrote it); choose a new --workdir or delete this one"
            )
        differences = identity_differences(saved, self.identity)
        if differences:
            raise CheckpointError(
                f"{where} was written by another run: {differences}. This workdir belongs to that run; "
                "choose a new --workdir or delete this one."
            )

    # -- lifetime -------------------------------------------------------------------------------

    def wait(self) -> None:
        """Blocks until every asynchronous save is on disk (call before exiting or evaluating)."""
        self._latest.wait_until_finished()
        self._best.wait_until_finished()

    def close(self) -> None:
        """Flushes pending saves and releases Orbax's background threads."""
        self._latest.close()
        self._best.close()

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
