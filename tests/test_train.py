"""The training loop: results, model selection, resume after SIGKILL / SIGTERM, bad runs stopped."""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from tt_jax import objective, optim, parallel, train
from tt_jax.checkpoint import CheckpointError
from tt_jax.config import ConfigError
from tt_jax.train import run_stores
from tt_jax.errors import UserInputError
from tt_jax.evaluate import evaluate
from tt_jax.models import build_model
from tt_jax.teachers import PrecomputedTeacher
from tt_jax.trained import load_trained

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = REPO / "tests" / "configs" / "tiny.py"


def tiny_config(arg=None):
    spec = importlib.util.spec_from_file_location("tiny_config", TINY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def baseline_config(**train_changes):
    config = tiny_config("baseline")
    config.train.update(train_changes)
    return config


def read_jsonl(path: pathlib.Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def latest_steps(workdir: pathlib.Path) -> list[int]:
    directory = workdir / "checkpoints" / "latest"
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit()) if directory.is_dir() else []


def test_the_step_lowers_the_loss_and_distillation_pulls_towards_the_teacher():
    config = tiny_config()
    store = run_stores(config)["train"]
    mesh = parallel.make_mesh(2)
    model_config = train.model_config_of(config)
    optimizer = optim.build_optimizer("radam", 1e-2, 1e-5)
    state = train.create_train_state(build_model(model_config), optimizer, jax.random.key(0))
    # An ideal teacher: its stored embeddings make S_t = 0.9 I.
    ideal = {"video": {"e": np.eye(16, dtype=np.float32)}, "text": {"e": 0.9 * np.eye(16, dtype=np.float32)[:, None]}}
    objective_fn = objective.make_objective(
        build_model(model_config, axis_name=parallel.DATA_AXIS),
        [PrecomputedTeacher("ideal", ("e",))],
        objective.ObjectiveOptions(margin=0.1),
        mesh,
        student_text="poor",
    )
    step = train.make_train_step(objective_fn, optimizer)
    batch = store.batch(np.arange(16), np.zeros((16, 1), int), text_names=["poor"], max_text_tokens=5)
    batch = parallel.global_batch_from_process_data(dict(batch, teacher_embeddings={"ideal": ideal}), mesh)
    state = parallel.put_replicated(state, mesh)
    history = []
    for _ in range(40):
        state, scalars = step(state, {}, batch)
        history.append((float(scalars["ranking_loss"]), float(scalars["distillation_loss"])))
    assert history[-1][0] < 0.5 * history[0][0]
    assert history[-1][1] < history[0][1]
    assert int(state.step) == 40


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("run")
    return workdir, train.train_and_evaluate(baseline_config(), workdir)


def test_a_run_keeps_the_best_validation_epoch_and_tests_it(finished_run):
    workdir, results = finished_run
    epochs = [row for row in read_jsonl(workdir / "metrics.jsonl") if "epoch" in row]
    assert [row["epoch"] for row in epochs] == [1, 2, 3]
    scores = [row["val/t2v_geometric_mean_R1-R5-R10"] for row in epochs]
    best = max(index for index, score in enumerate(scores) if score == max(scores))  # ties: the later
    assert results["best_epoch"] == best + 1
    assert results["val"]["t2v"]["geometric_mean_R1-R5-R10"] == scores[best]
    assert results["best_step"] == 4 * (best + 1)  # 64 videos / batch 16
    assert json.loads((workdir / "results.json").read_text())["test"] == results["test"]
    assert (workdir / "config.json").is_file() and any((workdir / "tensorboard").iterdir())

    # The reported test metrics are those of the best checkpoint, recomputed independently here.
    test_store = run_stores(baseline_config())["test"]
    again = evaluate(test_store, workdir=workdir)
    assert again["t2v"] == results["test"]["t2v"] and again["v2t"] == results["test"]["v2t"]
    # Training learned something: better than chance (24 test videos: chance R@10 = 10/24 = 42 %).
    assert results["test"]["t2v"]["R10"] > 55


def test_the_learning_rate_decays_once_per_epoch(finished_run):
    workdir, _ = finished_run
    rates = {row["step"]: row["learning_rate"] for row in read_jsonl(workdir / "metrics.jsonl") if "learning_rate" in row}
    # Logged every 2 steps; the rate used by step s (1-based) is 1e-2 * 0.95 ** ((s - 1) // 4).
    assert rates == pytest.approx({s: 1e-2 * 0.95 ** ((s - 1) // 4) for s in range(2, 13, 2)})


def test_evaluation_in_chunks_equals_one_chunk_and_the_workdir_path(finished_run):
    workdir, _ = finished_run
    trained = load_trained(workdir)
    store = run_stores(baseline_config())["val"]
    whole = evaluate(store, model=trained.model, variables=trained.variables, text_name="poor",
                     chunk_videos=1000, return_similarity=True)
    chunked = evaluate(store, workdir=workdir, chunk_videos=7, return_similarity=True)
    assert whole["similarity"].shape == (24 * 2, 24)
    np.testing.assert_allclose(chunked["similarity"], whole["similarity"], rtol=1e-6, atol=1e-6)
    assert chunked["t2v"] == whole["t2v"]


def test_a_finished_run_is_read_back_not_retrained(finished_run):
    workdir, results = finished_run
    lines = len(read_jsonl(workdir / "metrics.jsonl"))
    assert train.train_and_evaluate(baseline_config(), workdir) == results
    assert len(read_jsonl(workdir / "metrics.jsonl")) == lines


def test_a_workdir_of_another_model_is_refused(finished_run, tmp_path):
    workdir, _ = finished_run
    other = baseline_config()
    other.model.shared_dim = 4
    with pytest.raises(UserInputError, match=r"another run: model\.shared_dim \(8 -> 4\)"):
        train.train_and_evaluate(other, workdir)
    # The same with only checkpoints (the run had not finished): the identity check refuses it.
    unfinished = tmp_path / "unfinished"
    train.train_and_evaluate(baseline_config(num_epochs=1), unfinished)
    (unfinished / "results.json").unlink()
    with pytest.raises(CheckpointError, match=r"another run: model\.shared_dim \(8 -> 4\)"):
        train.train_and_evaluate(other, unfinished)


@pytest.mark.parametrize(
    "key, value",
    [("train.margin", 0.25), ("train.learning_rate", 0.02), ("train.weight_decay", 0.5), ("train.lr_decay_gamma", 0.5),
     ("data.feature_dtype", "float16"), ("data.synthetic.caption_noise", 0.4)],
)
def test_a_rerun_with_another_objective_or_data_is_refused_not_answered_from_the_old_run(finished_run, key, value):
    """Before, only the model, text, optimiser name, batch, seed and teacher names were compared:
    these reruns silently returned the old results.json."""
    workdir, _ = finished_run
    other = baseline_config()
    group, *middle, leaf = key.split(".")
    node = other[group]
    for part in middle:
        node = node[part]
    node[leaf] = value
    with pytest.raises(UserInputError, match=rf"another run: {key.replace('.', '[.]')} \(.* -> {value!r}\)"):
        train.train_and_evaluate(other, workdir)


def test_a_rerun_may_change_only_the_restartable_keys(finished_run):
    workdir, results = finished_run
    again = baseline_config(log_every_steps=3, eval_chunk_videos=4, checkpoint_every_steps=2)
    assert train.train_and_evaluate(again, workdir) == results


def test_a_diverging_loss_stops_with_the_last_good_checkpoint(tmp_path):
    with pytest.raises(train.TrainingDivergedError, match=r"became (nan|inf) by step \d+") as stopped:
        train.train_and_evaluate(baseline_config(learning_rate=1e38, checkpoint_every_steps=1), tmp_path)
    saved = latest_steps(tmp_path)
    if saved:  # every checkpoint that exists is finite and older than the failing step
        assert f"last good checkpoint is step {saved[-1]}" in str(stopped.value)
        leaves = jax.tree.leaves(load_trained(tmp_path, checkpoint="latest").variables)
        assert all(np.all(np.isfinite(leaf)) for leaf in leaves)
    assert not (tmp_path / "results.json").exists()


def test_bad_settings_are_errors_that_say_what_to_change(tmp_path):
    with pytest.raises(UserInputError, match="not divisible by the 8 devices"):
        train.train_and_evaluate(baseline_config(batch_size=12), tmp_path / "a")
    config = baseline_config()
    with config.unlocked():
        config.train.lerning_rate = 1.0
    with pytest.raises(ConfigError, match=r"unknown config key 'train.lerning_rate'.*'learning_rate'"):
        train.train_and_evaluate(config, tmp_path / "b")
    config = baseline_config()
    config.train.optimizer = "sgdd"
    with pytest.raises(UserInputError, match="unknown optimiser 'sgdd'"):
        train.train_and_evaluate(config, tmp_path / "c")
    config = baseline_config()
    config.data.text_embedding = "gpt9"
    with pytest.raises(UserInputError, match="gpt9"):
        train.train_and_evaluate(config, tmp_path / "d")


# -- interrupted runs, in subprocesses running the command line ----------------------------------


def main_command(workdir: pathlib.Path, *overrides: str) -> list[str]:
    return [
        sys.executable, "-m", "tt_jax.main", f"--config={TINY}:baseline", f"--workdir={workdir}",
        "--config.train.num_epochs=5", "--config.train.checkpoint_every_steps=1", *overrides,
    ]


def cli_env() -> dict:
    return dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2 --xla_backend_optimization_level=0", JAX_PLATFORMS="cpu")


def run_to_end(workdir: pathlib.Path) -> None:
    done = subprocess.run(main_command(workdir), env=cli_env(), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


def interrupt(workdir: pathlib.Path, signum: int, after_step: int) -> subprocess.CompletedProcess:
    """Starts a run and sends `signum` once a checkpoint at `after_step` or later exists."""
    log = workdir.with_name(workdir.name + ".log")
    with open(log, "w") as output:  # a file, not a pipe: a full pipe would block the run's logging
        process = subprocess.Popen(main_command(workdir), env=cli_env(), cwd=REPO, stdout=output, stderr=output)
        deadline = time.monotonic() + 300
        while not any(step >= after_step for step in latest_steps(workdir / "student_baseline" / "seed_0")):
            assert process.poll() is None, f"the run ended before step {after_step}: {log.read_text()[-3000:]}"
            if time.monotonic() > deadline:
                process.kill()
                pytest.fail(f"no checkpoint appeared: {log.read_text()[-3000:]}")
            time.sleep(0.02)
        process.send_signal(signum)
        process.wait(timeout=120)
    return subprocess.CompletedProcess(process.args, process.returncode, "", log.read_text())


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("uninterrupted")
    run_to_end(workdir)
    return workdir


def assert_same_run(workdir: pathlib.Path, reference: pathlib.Path) -> None:
    run, expected = workdir / "student_baseline" / "seed_0", reference / "student_baseline" / "seed_0"
    results, expected_results = (json.loads((d / "results.json").read_text()) for d in (run, expected))
    for key in ("val", "test", "best_epoch", "best_step"):
        assert results[key] == expected_results[key], key
    for kind in ("latest", "best"):
        ours, theirs = (load_trained(d, checkpoint=kind).variables for d in (run, expected))
        jax.tree.map(np.testing.assert_array_equal, ours, theirs)


def test_a_killed_run_restarted_ends_as_an_uninterrupted_one(uninterrupted, tmp_path):
    killed = interrupt(tmp_path, signal.SIGKILL, after_step=6)  # mid epoch 2 of 5
    assert killed.returncode == -signal.SIGKILL
    assert not (tmp_path / "student_baseline" / "seed_0" / "results.json").exists()
    run_to_end(tmp_path)
    assert_same_run(tmp_path, uninterrupted)


def test_sigterm_saves_exits_cleanly_and_the_run_resumes(uninterrupted, tmp_path):
    stopped = interrupt(tmp_path, signal.SIGTERM, after_step=3)
    assert stopped.returncode == 143, stopped.stderr[-3000:]
    assert "Run the same command again to resume" in stopped.stderr
    assert "Traceback" not in stopped.stderr
    assert latest_steps(tmp_path / "student_baseline" / "seed_0")[-1] >= 3
    run_to_end(tmp_path)
    assert_same_run(tmp_path, uninterrupted)


@pytest.mark.slow  # three short runs
def test_validation_every_n_epochs_and_after_the_last(tmp_path):
    results = train.train_and_evaluate(baseline_config(eval_every_epochs=2), tmp_path)
    assert [row["epoch"] for row in read_jsonl(tmp_path / "metrics.jsonl") if "epoch" in row] == [2, 3]
    assert results["best_epoch"] in (2, 3)
    assert latest_steps(tmp_path) == [12]


def test_a_bucket_url_is_a_workdir_like_a_local_path():
    """Run files go through etils.epath, as Orbax's checkpoints do, so `--workdir gs://...` works
    on a pod (before, URLs were refused); the suite exercises the same calls on local paths."""
    from etils import epath

    from tt_jax.trained import checked_workdir

    workdir = checked_workdir("gs://bucket/tt_jax/run")
    assert isinstance(workdir, epath.Path)
    assert str(workdir / "results.json") == "gs://bucket/tt_jax/run/results.json"


def test_a_checkpoint_position_that_means_another_step_on_this_mesh_is_refused(tmp_path):
    """An epoch's length depends on the device count (its last batch is cut to a multiple of it):
    a position from another mesh would silently shift the schedule, or loop on an empty epoch."""
    from tt_jax.data.sampler import SamplerPosition

    train._check_resumable(SamplerPosition(1, 2), 6, 4, 8, tmp_path)  # 1 * 4 + 2 == 6
    with pytest.raises(UserInputError, match=r"resume on the number of devices it was trained on"):
        train._check_resumable(SamplerPosition(1, 2), 6, 5, 8, tmp_path)  # saved where epochs had 4 steps
    with pytest.raises(UserInputError, match=r"stopped at step 4 of epoch 1"):
        train._check_resumable(SamplerPosition(0, 4), 4, 4, 2, tmp_path)


def test_sigterm_on_an_epochs_last_step_validates_that_epoch_before_stopping(finished_run, tmp_path, monkeypatch):
    """Before, the epoch's end was saved first, so the resumed run never validated that epoch."""
    monkeypatch.setattr(train, "_preempted", lambda flag, global_step: global_step == 4)  # 4 steps per epoch
    with pytest.raises(train.Preempted, match="stopped by SIGTERM at step 4"):
        train.train_and_evaluate(baseline_config(), tmp_path)
    assert [row["epoch"] for row in read_jsonl(tmp_path / "metrics.jsonl") if "epoch" in row] == [1]
    assert latest_steps(tmp_path) == [4]
    monkeypatch.undo()
    results = train.train_and_evaluate(baseline_config(), tmp_path)
    _, uninterrupted = finished_run
    for key in ("val", "test", "best_epoch", "best_step"):
        assert results[key] == uninterrupted[key], key
