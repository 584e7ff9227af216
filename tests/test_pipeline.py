"""The recipe: teachers, distilled and baseline students over seeds, the report; the command line."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from test_train import REPO, TINY, read_jsonl, tiny_config
from tt_jax import interop, pipeline, train
from tt_jax.config import ConfigError
from tt_jax.errors import UserInputError
from tt_jax.trained import RunDirectoryError, load_trained, read_results, read_run_config


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("recipe")
    return workdir, pipeline.run(tiny_config(), workdir)


def test_the_recipe_trains_every_model_and_reports_each_seed(recipe):
    workdir, results = recipe
    assert set(results) == {"teacher_rich", "student_teachtext", "student_baseline"}
    assert set(results["teacher_rich"]["test"]) == {0}
    for student in ("student_teachtext", "student_baseline"):
        assert set(results[student]["test"]) == {0, 1}
    report = json.loads((workdir / "report.json").read_text())
    summary = report["models"]["student_teachtext"]["splits"]["test"]
    assert summary["num_seeds"] == 2
    runs = [json.loads((workdir / "student_teachtext" / f"seed_{s}" / "results.json").read_text()) for s in (0, 1)]
    r1 = [run["test"]["t2v"]["R1"] for run in runs]
    assert summary["mean"]["t2v"]["R1"] == pytest.approx(sum(r1) / 2)
    assert summary["std"]["t2v"]["R1"] == pytest.approx(abs(r1[0] - r1[1]) / 2)
    assert "student_baseline" in (workdir / "report.md").read_text()


def test_the_student_distils_from_the_teacher_the_baseline_does_not(recipe):
    workdir, _ = recipe
    distilled = read_run_config(workdir / "student_teachtext" / "seed_0")
    assert [dict(t) for t in distilled.teachers] == [
        {"name": "teacher_rich", "source": "recipe", "text_embedding": "rich", "model_changes": {"text_dim": 8},
         "path": str(workdir / "teachers" / "teacher_rich"), "trust_pickle": False}
    ]
    assert read_run_config(workdir / "student_baseline" / "seed_0").teachers == []
    assert distilled.data.text_embedding == "poor" and distilled.seed == 0
    assert read_run_config(workdir / "teachers" / "teacher_rich").model.text_dim == 8
    teachtext_rows = read_jsonl(workdir / "student_teachtext" / "seed_1" / "metrics.jsonl")
    baseline_rows = read_jsonl(workdir / "student_baseline" / "seed_1" / "metrics.jsonl")
    assert any(row.get("distillation_loss", 0) > 0 for row in teachtext_rows)
    assert not any("distillation_loss" in row for row in baseline_rows)


def test_rerunning_the_recipe_trains_nothing_again(recipe):
    workdir, results = recipe
    logs = sorted(workdir.rglob("metrics.jsonl"))
    sizes = [path.stat().st_size for path in logs]
    assert pipeline.run(tiny_config(), workdir) == results
    assert [path.stat().st_size for path in logs] == sizes


def test_a_teacher_checkpoint_of_another_text_embedding_is_refused(recipe, tmp_path):
    workdir, _ = recipe
    config = tiny_config()
    config.teachers = [dict(name="teacher_rich", source="run", text_embedding="poor",
                            path=str(workdir / "teachers" / "teacher_rich"))]
    config.pipeline.stages = ["student_teachtext"]
    with pytest.raises(UserInputError, match="should read the text embedding 'poor'.*trained on 'rich'"):
        pipeline.run(config, tmp_path)
    config.teachers = [dict(name="teacher_rich", source="run", text_embedding="rich", path=str(tmp_path / "nothing"))]
    with pytest.raises(RunDirectoryError, match="holds no training run"):
        pipeline.run(config, tmp_path)
    config.teachers = [dict(name="teacher_rich", source="recipe", text_embedding="rich", epochs=3)]
    with pytest.raises(ConfigError, match=r"unknown keys \['epochs'\]"):
        pipeline.run(config, tmp_path)
    config.teachers = [dict(name="teacher_rich", source="run", text_embedding="rich")]
    with pytest.raises(ConfigError, match=r"source 'run'.*lacks \['path'\]"):
        pipeline.run(config, tmp_path)


def save_as_reference_checkpoint(run_dir, path, **extra) -> None:
    """The best checkpoint of one of our runs, written as the reference writes its `.pth` files:
    {"state_dict": {reference name: tensor}, ...} (base/base_trainer.py)."""
    torch = pytest.importorskip("torch")
    trained = load_trained(run_dir)
    state_dict = interop.to_reference_state_dict(jax.device_get(trained.variables), trained.model.config)
    torch.save({"state_dict": {name: torch.from_numpy(np.array(value)) for name, value in state_dict.items()},
                "epoch": 3, **extra}, path)


def reference_teacher_config(checkpoint, **entry):
    config = tiny_config()
    config.teachers = [dict(name="teacher_rich", source="reference", text_embedding="rich",
                            model_changes=dict(text_dim=8), path=str(checkpoint), **entry)]
    config.pipeline.seeds = (0,)
    config.pipeline.stages = ("student_teachtext",)
    return config


@pytest.mark.slow  # a further training run; the .pth trust check stays in the default suite
def test_a_reference_pth_teacher_teaches_as_the_run_it_came_from(recipe, tmp_path):
    """The same teacher weights read from a reference PyTorch checkpoint (through the converter)
    instead of our run directory: the distilled student ends bit-for-bit the same."""
    workdir, results = recipe
    checkpoint = tmp_path / "teacher_rich.pth"
    save_as_reference_checkpoint(workdir / "teachers" / "teacher_rich", checkpoint)
    from_pth = pipeline.run(reference_teacher_config(checkpoint), tmp_path / "recipe")
    assert from_pth["student_teachtext"]["test"][0] == results["student_teachtext"]["test"][0]
    assert from_pth["student_teachtext"]["val"][0] == results["student_teachtext"]["val"][0]
    ours = load_trained(workdir / "student_teachtext" / "seed_0").variables
    theirs = load_trained(tmp_path / "recipe" / "student_teachtext" / "seed_0").variables
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(theirs), jax.device_get(ours))


def test_a_reference_pth_that_pickles_objects_needs_trust(recipe, tmp_path):
    """The reference also pickles its config object: refused unless the user trusts the file."""
    workdir, _ = recipe
    checkpoint = tmp_path / "teacher_rich.pth"
    save_as_reference_checkpoint(workdir / "teachers" / "teacher_rich", checkpoint,
                                 config=argparse.Namespace(seed=0))
    with pytest.raises(interop.StateDictError, match="holds more than tensors.*trust_pickle=True"):
        pipeline.run(reference_teacher_config(checkpoint), tmp_path / "refused")
    config = reference_teacher_config(checkpoint, trust_pickle=True)
    config.train.num_epochs = 1
    assert set(pipeline.run(config, tmp_path / "trusted")) == {"student_teachtext"}


def run_main(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run(
        [sys.executable, "-m", "tt_jax.main", *args], env=env, cwd=REPO, capture_output=True, text=True, timeout=600
    )


def test_the_command_line_rejects_unknown_keys_with_the_valid_ones(tmp_path):
    done = run_main(f"--config={TINY}:baseline", f"--workdir={tmp_path}", "--config.train.lerning_rate=1")
    assert done.returncode == 2
    assert "lerning_rate" in done.stderr and "learning_rate" in done.stderr
    assert "Traceback" not in done.stderr
    done = run_main(f"--config={TINY}:nonsense", f"--workdir={tmp_path}")
    assert done.returncode == 2 and "unknown argument 'nonsense'" in done.stderr


def test_the_command_line_runs_a_stage_and_prints_the_report(tmp_path):
    done = run_main(f"--config={TINY}:baseline", f"--workdir={tmp_path}", "--config.num_epochs=1", "--config.seeds=3,")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| student_baseline |" in done.stdout
    assert json.loads((tmp_path / "report.json").read_text())["models"].keys() == {"student_baseline"}
    assert read_results(tmp_path / "student_baseline" / "seed_3")["num_epochs"] == 1  # the shortcuts took effect


def distilled_config(workdir, terms):
    """The tiny student distilled from the recipe's finished teacher with `terms`."""
    config = tiny_config()
    with config.unlocked():
        config.teachers = [dict(name="teacher_rich", source="run", text_embedding="rich",
                                path=str(workdir / "teachers" / "teacher_rich"))]
        config.distillation.terms = terms
        config.train.log_every_steps = 1
    return config


@pytest.mark.slow  # a further training run
def test_a_run_logs_each_term_its_schedule_and_the_mask_it_learns(recipe, tmp_path):
    """Every term's value, a scheduled weight and the adaptive mask are in metrics.jsonl, and the
    logged loss is the ranking loss plus each weight times its term."""
    workdir, _ = recipe
    terms = [
        dict(method="teachtext"),
        dict(method="caption"),
        dict(method="kl_batch", schedule=dict(kind="exp", k=0.5)),
        dict(method="linas_relational", mask="adapt", mask_learning_rate=0.1, mask_steps=5),
    ]
    config = distilled_config(workdir, terms)
    train.train_and_evaluate(config, tmp_path / "run")
    rows = [row for row in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "loss" in row]
    steps_per_epoch, batch = 4, config.train.batch_size
    assert [row["step"] for row in rows] == list(range(1, 3 * steps_per_epoch + 1))
    for row in rows:
        epoch = (row["step"] - 1) // steps_per_epoch  # the weight of the step that produced the row
        assert row["distill_weight/kl_batch"] == pytest.approx(0.1 * 0.5**epoch)
        weighted = row["distill/teachtext"] + row["distill/caption"] + row["distill/linas_relational"]
        weighted += row["distill_weight/kl_batch"] * row["distill/kl_batch"]
        assert row["loss"] == pytest.approx(row["ranking_loss"] + weighted, rel=1e-5)
        assert row["distillation_loss"] == pytest.approx(weighted, rel=1e-5)
        assert all(row[f"distill/{name}"] > 0 for name in ("teachtext", "caption", "kl_batch", "linas_relational"))
    masks = {(row["step"] - 1) // steps_per_epoch: row["distill_mask/linas_relational"] for row in rows}
    assert masks[0] == pytest.approx(1 / batch)  # p1 = p2: the full sum until the first M-step
    assert masks[1] != pytest.approx(1 / batch) and masks[2] != pytest.approx(masks[1])


@pytest.mark.slow  # a further training run
def test_the_released_mask_that_is_never_rebuilt_stays_uniform(recipe, tmp_path):
    workdir, _ = recipe
    terms = [dict(method="linas_relational", mask="adapt", rebuild_mask=False, mask_learning_rate=0.1)]
    config = distilled_config(workdir, terms)
    with config.unlocked():
        config.train.num_epochs = 2
    train.train_and_evaluate(config, tmp_path / "run")
    rows = [row for row in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "loss" in row]
    assert [row["distill_mask/linas_relational"] for row in rows] == pytest.approx([1 / config.train.batch_size] * len(rows))


@pytest.mark.parametrize(
    "terms, with_teachers, message",
    [
        ([dict(method="rank_k", k=40)], True, r"k = 40, more than the 16 videos of the run's smallest batch"),
        ([dict(method="teachtext")], False, r"\['teachtext'\] distil from teachers, and config.teachers is empty"),
        ([dict(method="caption")], True, r"lists 1 teachers but no term of config.distillation.terms reads them"),
    ],
)
def test_a_term_the_run_cannot_feed_stops_before_training(recipe, tmp_path, terms, with_teachers, message):
    workdir, _ = recipe
    config = distilled_config(workdir, terms)
    if not with_teachers:
        with config.unlocked():
            config.teachers = []
    with pytest.raises(UserInputError, match=message):
        train.train_and_evaluate(config, tmp_path / "run")
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_embedding_regression_across_mismatched_dimensions_is_refused():
    """Which expert, which dimensions, and what to do instead."""
    from tt_jax.distillation.terms import check_terms_for_run, parse_terms

    terms = parse_terms([dict(method="embedding_regression")])
    with pytest.raises(UserInputError, match=r"differ in scene: student 8, teacher 16; give the teacher the student's"):
        check_terms_for_run(terms, num_teachers=1, smallest_batch=16, student_dims={"audio": 8, "scene": 8},
                            teacher_dims={"wide": {"audio": 8, "scene": 16}})
    with pytest.raises(UserInputError, match=r"audio: student 8, teacher absent"):
        check_terms_for_run(terms, num_teachers=1, smallest_batch=16, student_dims={"audio": 8},
                            teacher_dims={"video_only": {"scene": 8}})
    check_terms_for_run(terms, num_teachers=1, smallest_batch=16, student_dims={"audio": 8},
                        teacher_dims={"same": {"audio": 8, "scene": 16}})  # extra teacher experts are fine


def test_the_recipe_checks_every_run_s_terms_before_training_any(tmp_path):
    """A student term the run cannot feed stops the recipe before its teachers train."""
    config = tiny_config()
    with config.unlocked():
        config.distillation.terms = [dict(method="rank_k", k=40)]
    with pytest.raises(UserInputError, match=r"k = 40, more than the 16 videos"):
        pipeline.run(config, tmp_path / "recipe")
    assert not (tmp_path / "recipe" / "teachers").exists()
