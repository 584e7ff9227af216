"""Memory a run holds: one train state at a time, teachers once, nothing left after it returns.

Measured with `jax.live_arrays()` (each device buffer counted once: a host view that
`jax.device_get` makes on CPU is a second array over the same buffer), so the bounds do not
depend on the allocator. Sizes come from the model's abstract train state.
"""

from __future__ import annotations

import importlib.util
import pathlib

import jax
import numpy as np
import pytest

from tt_jax import optim, parallel, train
from tt_jax.config import teacher_entries
from tt_jax.models import build_model
from tt_jax.train_state import abstract_train_state
from tt_jax.trained import run_optimizer

REPO = pathlib.Path(__file__).resolve().parents[1]


def tiny_baseline_config():
    spec = importlib.util.spec_from_file_location("tiny_config", REPO / "tests" / "configs" / "tiny.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config("baseline")
    config.train.num_epochs = 2
    return config


def live_buffer_bytes() -> int:
    """Bytes of the distinct device buffers alive now."""
    buffers = {}
    for array in jax.live_arrays():
        if array.is_deleted():
            continue
        for shard in array.addressable_shards:
            try:
                pointer = shard.data.unsafe_buffer_pointer()
            except jax.errors.JaxRuntimeError:  # donated after the list was taken
                continue
            buffers[(shard.device.id, pointer)] = shard.data.nbytes
    return sum(buffers.values())


def tree_bytes(tree) -> int:
    return sum(int(np.prod(leaf.shape)) * np.dtype(leaf.dtype).itemsize for leaf in jax.tree.leaves(tree))


def replicated_state_bytes(config) -> int:
    """A train state (params, BatchNorm statistics, optimiser moments) on every device of the mesh."""
    model = build_model(train.model_config_of(config))
    schedule = optim.epoch_decay_schedule(config.train.learning_rate, config.train.lr_decay_gamma, 1)
    return tree_bytes(abstract_train_state(model, run_optimizer(config, schedule))) * len(jax.devices())


@pytest.fixture(scope="module")
def measured_run(tmp_path_factory):
    """A finished run, with the live device bytes at the start of every evaluation it made."""
    config = tiny_baseline_config()
    workdir = tmp_path_factory.mktemp("run")
    evaluations = []
    run = train.Evaluator.run

    def measuring_run(self, *args, **kwargs):
        evaluations.append(live_buffer_bytes())
        return run(self, *args, **kwargs)

    before = live_buffer_bytes()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train.Evaluator, "run", measuring_run)
        results = train.train_and_evaluate(config, workdir)
    after = live_buffer_bytes()
    return dict(config=config, workdir=workdir, results=results, evaluations=evaluations, before=before, after=after)


def test_the_best_checkpoint_is_tested_without_the_trained_state(measured_run):
    config, evaluations = measured_run["config"], measured_run["evaluations"]
    assert len(evaluations) == config.train.num_epochs + 1  # every validation, then the test split
    state = replicated_state_bytes(config)
    # The test split is evaluated after every save has been written: what is live then is the
    # restored best checkpoint alone, never next to the trained state (two states, optimiser
    # moments included) or a copy of its parameters.
    tested = evaluations[-1] - measured_run["before"]
    assert tested <= 1.1 * state, f"live device bytes at evaluations {evaluations}, one train state is {state}"


def test_nothing_of_a_finished_run_stays_on_the_devices(measured_run):
    assert measured_run["after"] <= measured_run["before"]


def test_teacher_variables_are_restored_once_onto_the_mesh(measured_run):
    """Only the variables, where the step reads them: no optimiser moments, no host copy."""
    teacher_run = measured_run["config"]
    config = tiny_baseline_config()
    config.teachers = [
        {"name": "teacher", "source": "run", "text_embedding": teacher_run.data.text_embedding,
         "path": str(measured_run["workdir"])}
    ]
    mesh = parallel.make_mesh()
    train_store = train.run_stores(config)["train"]
    before = live_buffer_bytes()
    teachers, variables = train.load_teachers(config, teacher_entries(config), train_store, parallel.replicated(mesh))
    loaded = live_buffer_bytes() - before

    assert [teacher.name for teacher in teachers] == ["teacher"]
    for leaf in jax.tree.leaves(variables):
        assert isinstance(leaf, jax.Array), type(leaf)
        assert leaf.sharding.is_equivalent_to(parallel.replicated(mesh), leaf.ndim)
    assert loaded == tree_bytes(variables["teacher"]) * mesh.size


@pytest.mark.slow
def test_the_default_recipe_peaks_below_one_and_a_half_times_what_it_must_hold(tmp_path):
    """The ActivityNet default recipe (TeachText-CE+, three live teachers trained first) at the
    reference model sizes (376.0M parameters), on a fake release with few videos, one epoch: its
    peak resident memory stays below 1.5 x (student train state + teachers + features). It was
    killed by the OOM killer at 24.3 GB on a 24 GB machine before (benchmarks/recipe_memory_benchmark.py)."""
    import argparse
    import importlib.util

    spec = importlib.util.spec_from_file_location("recipe_memory", REPO / "benchmarks" / "recipe_memory_benchmark.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    config = bench._load_config("activitynet", {})
    data_dir = str(tmp_path / "data")
    bench._write_release(config, data_dir, "activitynet", 64, 32)
    budget = bench._budget(config, data_dir)
    args = argparse.Namespace(dataset="activitynet", kill_rss_gib=20.0, verbose=False, extra=[])
    result = bench.run_recipe(args, data_dir, str(tmp_path / "run"), {})
    assert result["returncode"] == 0, result["tail"]
    total = budget["student_state"] + budget["teachers"] + budget["features"]
    assert result["peak"] <= 1.5 * total, f"peak {result['peak'] / 2**30:.2f} GiB, budget {total / 2**30:.2f} GiB"
