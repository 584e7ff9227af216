"""Ablation studies: a study's variants are recipes that share what they can (teachers, identical
configs, the data), and its table, JSON and figure report each variant's seeds."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from test_applications import repo_config
from test_train import REPO, TINY, tiny_config
from tt_jax import ablate
from tt_jax.config import check_config
from tt_jax.trained import read_results

METRIC = "geometric_mean_R1-R5-R10"


def tiny_study_config():
    config = tiny_config()
    config.pipeline.seeds = (0, 1)
    config.train.num_epochs = 1
    config.study = dict(
        name="tiny",
        plot="lines",
        x_label="weight",
        variants=[
            dict(name="baseline", student="baseline", changes={}),
            dict(name="w1", x=1.0, changes={"distillation.terms": [dict(method="teachtext", weight=1.0)]}),
            dict(name="w1_again", x=1.0, line="same", changes={"distillation.terms": [dict(method="teachtext")]}),
            dict(name="w3", x=3.0, changes={"distillation.terms": [dict(method="teachtext", weight=3.0)]}),
        ],
    )
    return check_config(config)


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("study")
    config = tiny_study_config()
    return workdir, ablate.run_study(config, ablate.select_study(config, None), workdir)


@pytest.mark.slow  # trains a study: the slow job
def test_a_study_reports_every_variant_s_seeds_from_its_runs(study):
    workdir, summary = study
    assert [row["variant"] for row in summary["variants"]] == ["baseline", "w1", "w1_again", "w3"]
    for row in summary["variants"]:
        stage = "student_baseline" if row["student"] == "baseline" else "student_teachtext"
        values = [read_results(f"{row['workdir']}/{stage}/seed_{seed}")["test"]["t2v"][METRIC] for seed in (0, 1)]
        assert sorted(row["seeds"]) == [0, 1]
        np.testing.assert_allclose([row["mean"], row["std"]], [np.mean(values), np.std(values)])
    assert json.loads((workdir / "tiny.json").read_text()) == json.loads(json.dumps(summary))
    table = (workdir / "tiny.md").read_text()
    assert all(f"| {row['variant']} |" in table for row in summary["variants"])
    assert (workdir / "tiny.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow  # trains a study: the slow job
def test_variants_with_the_same_config_share_one_recipe_and_teachers_train_once(study):
    workdir, summary = study
    by_name = {row["variant"]: row for row in summary["variants"]}
    assert by_name["w1"]["workdir"] == by_name["w1_again"]["workdir"]  # weight 1 is the default
    assert by_name["w1"]["workdir"] != by_name["w3"]["workdir"]
    assert len(list((workdir / "teachers").iterdir())) == 1  # one teacher, shared by every variant
    assert not (workdir / "tiny" / "w3" / "teachers").exists()


@pytest.mark.slow  # trains a study: the slow job
def test_rerunning_a_study_trains_nothing(study):
    workdir, summary = study
    results = sorted((workdir / "tiny").glob("*/student_*/seed_*/results.json"))
    written = [path.stat().st_mtime_ns for path in results]
    config = tiny_study_config()
    again = ablate.run_study(config, ablate.select_study(config, None), workdir)
    assert [path.stat().st_mtime_ns for path in results] == written
    assert json.loads(json.dumps(again)) == json.loads(json.dumps(summary))


def test_a_variant_naming_an_unknown_key_stops_before_anything_trains(tmp_path):
    config = tiny_study_config()
    with config.unlocked():
        config.study.variants[2]["changes"] = {"train.lerning_rate": 0.1}
    with pytest.raises(ablate.StudyError, match=r"study 'tiny', variant 'w1_again': unknown config key 'train.lerning_rate'"):
        ablate.run_study(config, ablate.select_study(config, None), tmp_path)
    assert not any(tmp_path.iterdir())


def test_a_variant_with_a_bad_value_is_named(tmp_path):
    config = tiny_study_config()
    with config.unlocked():
        config.study.variants[1]["changes"] = {"denoising.max_rank": 0}
    with pytest.raises(ablate.StudyError, match=r"variant 'w1'.*max_rank"):
        ablate.plan_study(config, ablate.select_study(config, None), tmp_path)


def test_choosing_a_study_is_unambiguous():
    config = tiny_study_config()
    with pytest.raises(ablate.StudyError, match="choose one"):
        ablate.select_study(config, "distances")
    plain = check_config(tiny_config())
    with pytest.raises(ablate.StudyError, match="unknown study 'nonsense'"):
        ablate.select_study(plain, "nonsense")
    with pytest.raises(ablate.StudyError, match="name a study"):
        ablate.select_study(plain, None)


@pytest.mark.parametrize("name", sorted(ablate.STUDIES))
def test_every_built_in_study_plans_on_the_demo_config(name, tmp_path):
    """Each built-in study's variants are valid recipes of the demo config, each a distinct run."""
    config = check_config(repo_config("demo"))
    planned = ablate.plan_study(config, ablate.STUDIES[name](config), tmp_path)
    assert len({str(item.workdir) for item in planned}) == len(planned)
    for item in planned:
        assert item.config.pipeline.teachers_dir == str(tmp_path / "teachers")


def test_the_command_line_names_a_bad_study_and_exits_2(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "tt_jax.ablate", f"--config={TINY}", "--study=nonsense", f"--workdir={tmp_path}"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 2
    assert "unknown study 'nonsense'" in done.stderr and "Traceback" not in done.stderr
