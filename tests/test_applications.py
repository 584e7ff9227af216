"""TeachText's applications in the recipe: the denoising stage, TeachVideo teachers, the training
fraction, and the checks that stop a bad setting before anything trains."""

from __future__ import annotations

import json

import numpy as np
import pytest

from test_train import REPO, tiny_config
from tt_jax import pipeline, train
from tt_jax.config import ConfigError, check_config, identity_differences, run_identity
from tt_jax.data.caption_masks import read_caption_masks
from tt_jax.data.sources import DataConfigError, load_splits
from tt_jax.data.training_split import training_store
from tt_jax.denoising_settings import DenoisingError
from tt_jax.errors import UserInputError
from tt_jax.trained import read_results, read_run_config


def repo_config(name: str, arg: str = ""):
    """A config of the repository's configs/ folder (tests/configs is another folder)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"{name}_config", REPO / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg or None)


def short(config, **changes):
    """One seed, two epochs: enough to produce every file of the recipe."""
    config.pipeline.seeds = (0,)
    config.train.num_epochs = 2
    for dotted, value in changes.items():
        group, key = dotted.split("__")
        config[group][key] = value
    return config


@pytest.fixture(scope="module")
def denoised(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("denoised")
    config = short(tiny_config(), denoising__max_rank=8)
    return workdir, config, pipeline.run(config, workdir)


@pytest.mark.slow  # trains a recipe: the slow job
def test_the_denoising_stage_writes_masks_the_students_train_on(denoised):
    workdir, config, results = denoised
    masks_file = pipeline.masks_path(check_config(config), workdir)
    assert masks_file.name == "denoise-less8.pkl" and masks_file.parent.parent == workdir / "denoising"
    summary = json.loads(masks_file.with_suffix(".json").read_text())
    masks = read_caption_masks(masks_file)
    stores = load_splits(check_config(config).data, pipeline.recipe_data_needs(pipeline.recipe_runs(check_config(config), workdir)))
    train_ids = stores["train"].video_ids
    assert sorted(masks) == sorted(train_ids)  # one mask per training video, over its captions
    kept = sum(int(mask.sum()) for mask in masks.values())
    assert summary["captions_kept"] == kept and summary["captions"] == int(stores["train"].caption_mask.sum())
    assert summary["videos_dropped"] == sum(1 for mask in masks.values() if not mask.any())
    listed = masks_file.with_suffix(".txt").read_text().split()
    assert listed == [video for video in train_ids if masks[video].any()]
    for stage in ("student_teachtext", "student_baseline"):
        run_config = read_run_config(workdir / stage / "seed_0")
        assert run_config.data.caption_masks == str(masks_file)
        trained_on = training_store(run_config.data, stores["train"])
        assert trained_on.video_ids == tuple(listed)
        assert read_results(workdir / stage / "seed_0")["num_epochs"] == 2


@pytest.mark.slow  # trains a recipe: the slow job
def test_the_teachers_train_on_every_caption(denoised):
    workdir, _, _ = denoised
    teacher = read_run_config(workdir / "teachers" / "teacher_rich")
    assert teacher.denoising.max_rank is None and not teacher.data.caption_masks


@pytest.mark.slow  # trains a recipe: the slow job
def test_a_rerun_keeps_the_masks_and_trains_nothing(denoised):
    workdir, config, results = denoised
    masks_file = pipeline.masks_path(check_config(config), workdir)
    written = masks_file.stat().st_mtime_ns
    again = pipeline.run(config, workdir)
    assert masks_file.stat().st_mtime_ns == written
    assert again == results


@pytest.mark.slow  # trains a recipe: the slow job
def test_where_the_recipe_keeps_its_masks_is_not_part_of_a_student_s_identity(denoised, tmp_path):
    workdir, config, _ = denoised
    here = pipeline.student_config(check_config(config), workdir, 0, distilled=True)
    elsewhere = pipeline.student_config(check_config(config), tmp_path, 0, distilled=True)
    assert here.data.caption_masks != elsewhere.data.caption_masks
    assert run_identity(check_config(here)) == run_identity(check_config(elsewhere))


@pytest.mark.slow  # trains a recipe: the slow job
def test_masks_of_other_teachers_are_another_baseline(denoised):
    """The baseline reads no teacher, yet its masks come from them: other teachers, other run."""
    workdir, config, _ = denoised
    other = tiny_config()
    short(other, denoising__max_rank=8)
    other.teachers[0]["model_changes"] = dict(text_dim=8, shared_dim=4)
    same = pipeline.student_config(check_config(config), workdir, 0, distilled=False)
    changed = pipeline.student_config(check_config(other), workdir, 0, distilled=False)
    assert same.data.caption_masks != changed.data.caption_masks
    assert "data.caption_masks" in identity_differences(run_identity(check_config(same)), run_identity(check_config(changed)))


@pytest.mark.slow  # trains a recipe: the slow job
def test_a_rerun_of_another_recipe_is_refused_before_any_stage_writes(denoised):
    """Another teacher seed in the same workdir: the finished teacher is named before the
    denoising stage could rewrite the masks its students came from."""
    workdir, config, _ = denoised
    with pytest.raises(UserInputError, match="teacher_rich.*seed"):
        pipeline.check_recipe(_with_teacher_seed(config, 1), workdir)


def _with_teacher_seed(config, seed):
    changed = check_config(config)
    with changed.unlocked():
        changed.pipeline.teacher_seed = seed
    return changed


@pytest.mark.parametrize("rank", [0, -3])
def test_a_threshold_below_one_is_refused(rank, tmp_path):
    with pytest.raises(DenoisingError, match="at least 1"):
        pipeline.run(short(tiny_config(), denoising__max_rank=rank), tmp_path)
    assert not any(tmp_path.iterdir())


def test_denoising_without_teachers_is_refused(tmp_path):
    config = short(tiny_config(), denoising__max_rank=5)
    config.teachers = []
    config.distillation.terms = []
    config.pipeline.stages = ("student_baseline",)
    with pytest.raises(ConfigError, match="teachers"):
        pipeline.run(config, tmp_path)


def test_release_masks_and_the_recipe_s_masks_exclude_each_other():
    config = repo_config("msrvtt", "less100")
    config.denoising.max_rank = 40
    with pytest.raises(ConfigError, match="choose one"):
        check_config(config)


def test_a_single_run_with_denoising_needs_its_mask_file(tmp_path):
    config = check_config(short(tiny_config(), denoising__max_rank=5))
    with pytest.raises(UserInputError, match="data.caption_masks"):
        train.train_and_evaluate(config, tmp_path / "run")
    assert not (tmp_path / "run").exists()


@pytest.mark.slow  # trains a recipe: the slow job
def test_masks_that_remove_every_caption_stop_before_the_students(tmp_path, monkeypatch):
    """Every teacher rank is made worse than R: the stage refuses, and no student has trained."""
    from tt_jax import denoising as ranks

    real = ranks.teacher_ranks

    def hopeless(*args, **kwargs):
        result = real(*args, **kwargs)
        return np.where(np.isnan(result), result, np.float32(1e9))

    monkeypatch.setattr(ranks, "teacher_ranks", hopeless)
    with pytest.raises(DenoisingError, match="removes every one"):
        pipeline.run(short(tiny_config(), denoising__max_rank=3), tmp_path)
    assert read_results(tmp_path / "teachers" / "teacher_rich") is not None
    assert not (tmp_path / "student_teachtext").exists() and not (tmp_path / "student_baseline").exists()


# -- TeachVideo ---------------------------------------------------------------------------------------


@pytest.mark.slow  # trains a recipe: the slow job
def test_a_teachvideo_student_reads_one_expert_its_teacher_every_expert(tmp_path):
    config = short(tiny_config())
    every_expert = [dict(expert) for expert in config.model.experts]
    config.teachers = [dict(name="teacher_video", source="recipe", text_embedding="poor",
                            model_changes=dict(experts=every_expert))]
    config.model.experts = [expert for expert in every_expert if expert["name"] == "scene"]
    config.pipeline.stages = ("teachers", "student_teachtext")
    results = pipeline.run(config, tmp_path)
    assert set(results) == {"teacher_video", "student_teachtext"}
    student = read_run_config(tmp_path / "student_teachtext" / "seed_0")
    teacher = read_run_config(tmp_path / "teachers" / "teacher_video")
    assert [expert["name"] for expert in student.model.experts] == ["scene"]
    assert sorted(expert["name"] for expert in teacher.model.experts) == ["audio", "scene"]
    assert results["student_teachtext"]["num_parameters"] < results["teacher_video"]["num_parameters"]


def test_the_teachvideo_variants_compose_video_and_text_teachers():
    tt = check_config(repo_config("msrvtt", "teachvideo"))
    assert [expert["name"] for expert in tt.model.experts] == ["imagenet.senet154.0"]
    every = sorted(expert["name"] for expert in repo_config("msrvtt").model.experts)
    for entry in tt.teachers:  # the gpt2-xl-finetune teacher reads the student's text: the video teacher
        assert sorted(expert["name"] for expert in entry["model_changes"]["experts"]) == every
    ce_plus = check_config(repo_config("msrvtt", "ce_plus,teachvideo"))
    assert [entry["name"] for entry in ce_plus.teachers] == ["teacher_video"]
    assert [term["method"] for term in ce_plus.distillation.terms] == ["teachtext"]
    small = check_config(repo_config("demo", "teachvideo"))
    assert [expert["name"] for expert in small.model.experts] == ["scene"]


def test_a_teacher_reading_an_expert_the_release_lacks_is_named_before_loading():
    config = repo_config("msrvtt", "teachvideo")
    config.teachers[0]["model_changes"]["experts"].append(dict(name="thermal.camera", input_dim=8))
    with pytest.raises(DataConfigError, match=r"teacher 'teacher_w2v' reads the experts \['thermal.camera'\]"):
        train.check_run_before_loading(check_config(config))


def test_a_student_expert_the_release_lacks_is_named_before_loading():
    config = repo_config("msrvtt", "ce_plus")
    config.model.experts = [*config.model.experts, dict(name="thermal", input_dim=8)]
    with pytest.raises(DataConfigError, match=r"the student reads the experts \['thermal'\]"):
        train.check_run_before_loading(check_config(config))
    config.data.expert_files = {"thermal": "thermal/features.pkl"}  # named by the config: fine
    train.check_run_before_loading(check_config(config))


# -- the training fraction ----------------------------------------------------------------------------


@pytest.mark.slow  # trains a recipe: the slow job
def test_a_fraction_of_the_training_data_trains_teachers_and_students_on_it(tmp_path):
    config = short(tiny_config(), data__train_fraction=0.5)
    config.pipeline.stages = ("teachers", "student_baseline")
    pipeline.run(config, tmp_path)
    for run in ("teachers/teacher_rich", "student_baseline/seed_0"):
        steps = [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        last = max(entry["step"] for entry in steps)
        # 64 training videos halved, batch 16: 2 steps per epoch, 2 epochs
        assert last == 4, run


@pytest.mark.parametrize("fraction", [0, 1.5, -0.2])
def test_a_fraction_outside_zero_to_one_is_refused(fraction):
    config = tiny_config()
    config.data.train_fraction = fraction
    with pytest.raises(ConfigError, match="train_fraction"):
        check_config(config)


# -- the teachers as one model ------------------------------------------------------------------------


def _t2v_recall_at(similarity: np.ndarray, captions_per_video: int, mask: np.ndarray, k: int) -> float:
    """Percentage of real captions whose own video is among the k most similar (numpy, no ties)."""
    own = np.arange(similarity.shape[0]) // captions_per_video
    better = (similarity > similarity[np.arange(len(own)), own][:, None]).sum(axis=1)
    real = mask.reshape(-1) > 0
    return 100.0 * float(np.mean(better[real] < k))


@pytest.mark.slow  # trains a recipe: the slow job
def test_the_teachers_combined_are_evaluated_as_the_mean_of_their_similarities(tmp_path):
    from tt_jax.evaluate import evaluate

    config = short(tiny_config())
    config.teachers = [
        dict(name="teacher_rich", source="recipe", text_embedding="rich", model_changes=dict(text_dim=8)),
        dict(name="teacher_poor", source="recipe", text_embedding="poor"),
    ]
    config.pipeline.stages = ("teachers", "report")
    results = pipeline.run(config, tmp_path)
    assert list(results) == ["teacher_rich", "teacher_poor", "teachers_combined"]
    stores = load_splits(check_config(config).data, pipeline.recipe_data_needs(pipeline.recipe_runs(check_config(config), tmp_path)))
    test = stores["test"]
    sims = [evaluate(test, workdir=tmp_path / "teachers" / name, return_similarity=True)["similarity"]
            for name in ("teacher_rich", "teacher_poor")]
    mean = np.mean(sims, axis=0)
    combined = results["teachers_combined"]["test"][0]["t2v"]
    for k in (1, 5, 10):
        assert combined[f"R{k}"] == pytest.approx(_t2v_recall_at(mean, test.max_captions, test.caption_mask, k), abs=1e-6)
    report = json.loads((tmp_path / "report.json").read_text())
    assert "teachers_combined" in json.dumps(report)


def test_denoising_a_dataset_of_fused_paragraphs_is_refused(tmp_path):
    config = repo_config("activitynet")
    config.denoising.max_rank = 40
    with pytest.raises(ConfigError, match="fuses each video's captions"):
        pipeline.check_recipe(config, tmp_path)
