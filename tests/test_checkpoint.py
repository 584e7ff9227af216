"""Checkpointer: round trips, latest vs best, identities, NaN refusal, sharding, crash safety."""

import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from tt_jax.checkpoint import Checkpointer, CheckpointError
from tt_jax.errors import UserInputError
from tt_jax.train import TrainState

IDENTITY = {"model.hidden_size": 8, "model.experts": ["rgb", "audio"], "data.text_embedding": "w2v"}


def make_state(step: int, *, fill: float | None = None) -> TrainState:
    """A TrainState-shaped pytree with optax Adam state; every float leaf is `fill` (default step)."""
    value = float(step if fill is None else fill)
    params = {
        "dense": {"kernel": jnp.full((8, 4), value, jnp.float32), "bias": jnp.full((4,), value, jnp.float32)},
        "gate": {"scale": jnp.full((4,), value, jnp.float32)},
    }
    opt_state = jax.tree.map(
        lambda x: jnp.full_like(x, value) if jnp.issubdtype(x.dtype, jnp.floating) else x,
        optax.adam(1e-3).init(params),
    )
    return TrainState(
        step=jnp.asarray(step, jnp.int32),
        params=params,
        batch_stats={"bn": {"mean": jnp.full((4,), value, jnp.float32)}},
        opt_state=opt_state,
    )


def assert_trees_equal(actual, expected):
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(e))


def test_round_trip_restores_the_train_state_with_its_optax_state(tmp_path):
    state = make_state(7)
    with Checkpointer(tmp_path, identity=IDENTITY) as checkpointer:
        checkpointer.save_latest(state, position={"epoch": 1, "step_in_epoch": 3}, metrics={"loss": 0.5})
        checkpointer.wait()
    with Checkpointer(tmp_path, identity=IDENTITY) as checkpointer:
        restored, meta = checkpointer.restore_latest(jax.eval_shape(lambda: state))
    assert_trees_equal(restored, state)
    assert isinstance(restored, TrainState)
    assert type(restored.opt_state[0]) is type(state.opt_state[0])  # optax ScaleByAdamState
    assert meta == {"step": 7, "position": {"epoch": 1, "step_in_epoch": 3}, "metrics": {"loss": 0.5}}


@flax.struct.dataclass
class StateBeforeDistillationTerms:
    """The train state as checkpoints were written before it carried the terms' state."""

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any


def test_a_checkpoint_from_before_the_distillation_field_restores_with_it_empty(tmp_path):
    state = make_state(5)
    old = StateBeforeDistillationTerms(state.step, state.params, state.batch_stats, state.opt_state)
    with Checkpointer(tmp_path, identity=IDENTITY) as checkpointer:
        checkpointer.save_latest(old, position={})
        checkpointer.wait()
    with Checkpointer(tmp_path, identity=IDENTITY) as checkpointer:
        restored, _ = checkpointer.restore_latest(jax.eval_shape(lambda: state))
        assert isinstance(restored, TrainState) and restored.distillation == {}
        assert_trees_equal(restored, state)
        with_mask = state.replace(distillation={"linas": {"parameters": jnp.ones(2)}})
        with pytest.raises(ValueError):  # a state the checkpoint cannot fill is not made up
            checkpointer.restore_latest(jax.eval_shape(lambda: with_mask))


def test_the_state_may_be_donated_as_soon_as_save_returns(tmp_path):
    """The train step donates its state; an asynchronous save must already hold a host copy."""
    donate_and_advance = jax.jit(lambda state: jax.tree.map(lambda x: x * 0 - 1, state), donate_argnums=0)
    state = make_state(4)
    with Checkpointer(tmp_path, identity=IDENTITY) as checkpointer:
        checkpointer.save_latest(state, position={})
        # While Orbax still copies the arrays to host, XLA keeps them alive rather than reuse them.
        advanced = donate_and_advance(state)
        checkpointer.wait()
        restored, _ = checkpointer.restore_latest(advanced)
    assert_trees_equal(restored, make_state(4))


def test_restore_returns_none_when_there_is_no_checkpoint(tmp_path):
    with Checkpointer(tmp_path, identity=IDENTITY) as checkpointer:
        assert checkpointer.restore_latest(make_state(0)) is None
        assert checkpointer.restore_best(make_state(0)) is None
        assert checkpointer.best_metrics() is None


def test_latest_and_best_are_kept_apart(tmp_path):
    with Checkpointer(tmp_path, identity=IDENTITY, keep_latest=1) as checkpointer:
        for step in (1, 2, 3):
            checkpointer.save_latest(make_state(step), position={"step": step})
            if step == 2:
                checkpointer.save_best(make_state(step), position={"step": step}, metrics={"gmean": np.float32(0.25)})
        checkpointer.wait()
        latest, latest_meta = checkpointer.restore_latest(make_state(0))
        best, best_meta = checkpointer.restore_best(make_state(0))
        assert checkpointer.best_metrics() == {"gmean": 0.25}
    assert int(latest.step) == 3 and latest_meta["position"] == {"step": 3}
    assert int(best.step) == 2 and best_meta["metrics"] == {"gmean": 0.25}
    assert_trees_equal(best, make_state(2))
    # keep_latest=1: the older latest checkpoints were removed, the best one is separate.
    assert sorted(p.name for p in (tmp_path / "checkpoints" / "latest").iterdir() if p.name.isdigit()) == ["3"]
    assert sorted(p.name for p in (tmp_path / "checkpoints" / "best").iterdir() if p.name.isdigit()) == ["2"]


def test_a_workdir_of_another_run_is_refused_naming_each_differing_key_with_both_values(tmp_path):
    with Checkpointer(tmp_path, identity=IDENTITY) as checkpointer:
        checkpointer.save_latest(make_state(1), position={})
        checkpointer.save_best(make_state(1), position={}, metrics={"gmean": 0.1})
    other = {**IDENTITY, "model.hidden_size": 16}
    with Checkpointer(tmp_path, identity=other) as checkpointer:
        with pytest.raises(CheckpointError, match=r"model\.hidden_size \(8 -> 16\).*--workdir") as error:
            checkpointer.restore_latest(make_state(0))
        assert "text_embedding" not in str(error.value)
        with pytest.raises(UserInputError, match="another run"):
            checkpointer.best_metrics()


def test_a_non_finite_state_is_refused_and_the_previous_checkpoint_kept(tmp_path):
    with Checkpointer(tmp_path, identity=IDENTITY) as checkpointer:
        checkpointer.save_latest(make_state(1), position={"step": 1})
        checkpointer.wait()
        diverged = make_state(2)
        diverged = diverged.replace(
            params={**diverged.params, "gate": {"scale": diverged.params["gate"]["scale"].at[1].set(jnp.inf)}}
        )
        with pytest.raises(CheckpointError, match=r"step 2.*\['params'\]\['gate'\]\['scale'\]"):
            checkpointer.save_latest(diverged, position={"step": 2})
        checkpointer.wait()
        restored, meta = checkpointer.restore_latest(make_state(0))
    assert meta["step"] == 1
    assert_trees_equal(restored, make_state(1))
    assert not any(p.name.startswith("2") for p in (tmp_path / "checkpoints" / "latest").iterdir())


def test_restore_onto_a_mesh_gives_the_requested_shardings(tmp_path):
    state = make_state(3)
    with Checkpointer(tmp_path, identity=IDENTITY) as checkpointer:
        checkpointer.save_latest(state, position={})
        mesh = jax.make_mesh((4,), ("data",))
        replicated = NamedSharding(mesh, PartitionSpec())
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), jax.eval_shape(lambda: state)
        )
        # One leaf split over the devices, to see that the per-leaf sharding is honoured.
        split_rows = NamedSharding(mesh, PartitionSpec("data"))
        kernel = abstract.params["dense"]["kernel"]
        split_kernel = jax.ShapeDtypeStruct(kernel.shape, kernel.dtype, sharding=split_rows)
        dense = {**abstract.params["dense"], "kernel": split_kernel}
        abstract = abstract.replace(params={**abstract.params, "dense": dense})
        restored, _ = checkpointer.restore_latest(abstract)
    assert_trees_equal(restored, state)
    for leaf, target in zip(jax.tree.leaves(restored), jax.tree.leaves(abstract)):
        assert leaf.sharding.is_equivalent_to(target.sharding, leaf.ndim)
    assert len(restored.params["dense"]["kernel"].addressable_shards) == 4
    assert restored.params["dense"]["kernel"].addressable_shards[0].data.shape == (2, 4)


def test_best_metrics_reads_no_array(tmp_path):
    with Checkpointer(tmp_path, identity=IDENTITY) as checkpointer:
        checkpointer.save_best(make_state(5), position={}, metrics={"gmean": 0.75, "R1": 0.5})
    # Remove the arrays: best_metrics must still answer from the JSON metadata alone.
    shutil.rmtree(tmp_path / "checkpoints" / "best" / "5" / "state")
    with Checkpointer(tmp_path, identity=IDENTITY) as checkpointer:
        assert checkpointer.best_metrics() == {"gmean": 0.75, "R1": 0.5}


_SAVE_LOOP = textwrap.dedent(
    """
    import sys
    import jax.numpy as jnp
    from tt_jax.checkpoint import Checkpointer
    from tt_jax.train import TrainState

    def make_state(step):
        # Large enough that a save takes a while, so that kills land mid-write.
        return TrainState(
            step=jnp.asarray(step, jnp.int32),
            params={"w": jnp.full((256, 512), float(step)), "b": jnp.full((512,), float(step))},
            batch_stats={},
            opt_state={"mu": jnp.full((256, 512), float(step))},
        )

    checkpointer = Checkpointer(sys.argv[1], identity={"model": "kill-test"})
    restored = checkpointer.restore_latest(make_state(0))
    start = 0 if restored is None else restored[1]["step"]
    for step in range(start + 1, start + 100_000):
        checkpointer.save_latest(make_state(step), position={"step": step})
        print(step, flush=True)
    """
)


@pytest.mark.slow  # a subprocess killed mid-save
def test_a_save_killed_with_sigkill_leaves_a_consistent_checkpoint(tmp_path):
    script = tmp_path / "save_loop.py"
    script.write_text(_SAVE_LOOP)
    workdir = tmp_path / "run"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    rng = random.Random(0)
    restored_steps = []
    for _ in range(3):
        process = subprocess.Popen(
            [sys.executable, str(script), str(workdir)],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=env,
            text=True,
        )
        try:
            first = process.stdout.readline()  # the loop is running
            assert first, "the save loop died before its first save"
            time.sleep(rng.uniform(0.0, 0.4))
        finally:
            process.send_signal(signal.SIGKILL)
            printed = [int(line) for line in [first, *process.stdout.read().split()] if line.strip()]
            process.wait()

        with Checkpointer(workdir, identity={"model": "kill-test"}) as checkpointer:
            abstract = TrainState(
                step=jnp.zeros((), jnp.int32),
                params={"w": jnp.zeros((256, 512)), "b": jnp.zeros((512,))},
                batch_stats={},
                opt_state={"mu": jnp.zeros((256, 512))},
            )
            state, meta = checkpointer.restore_latest(abstract)
        step = int(state.step)
        # save(k) returns after waiting for save(k - 1) to commit, and save(k + 2) starts after
        # "k + 1" is printed: the restored step is within one of the last printed one.
        assert printed[-1] - 1 <= step <= printed[-1] + 1, (step, printed[-1])
        for leaf in jax.tree.leaves(state.params) + jax.tree.leaves(state.opt_state):
            np.testing.assert_array_equal(np.asarray(leaf), float(step))
        assert meta["position"] == {"step": step}
        restored_steps.append(step)
    assert restored_steps == sorted(restored_steps)
