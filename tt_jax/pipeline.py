"""The TeachText recipe from one config: teachers, the distilled student, the baseline, a report.

    <workdir>/teachers/<name>/                one run per "recipe" teacher of config.teachers
    <workdir>/denoising/<digest>/denoise-less<R>.pkl  with config.denoising.max_rank: the captions
                                              the teachers rank within the top R (release format)
    <workdir>/student_teachtext/seed_<s>/     the student distilled from every teacher
    <workdir>/student_baseline/seed_<s>/      the same student without distillation
    <workdir>/report.json, report.md          every model's val and test metrics, mean ± std

Each run resumes from its workdir and is skipped once it has finished, so rerunning the same
command after an interruption (or with more seeds) only does what is missing. `pipeline.stages`
selects the stages to run; the report covers every run that has finished. The data is loaded
once, with what every run of the recipe reads, and handed to each run.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
from etils import epath
from typing import Any, Mapping, Optional

import jax
import ml_collections
from absl import logging

from tt_jax import combined_teachers, parallel, reporting, train
from tt_jax.config import (
    ConfigError,
    TeacherEntry,
    check_config,
    default_config,
    identity_digest,
    run_identity,
    teacher_entries,
    teacher_model_config,
)
from tt_jax.data.caption_masks import write_caption_masks
from tt_jax.data.release_layout import DATASETS
from tt_jax.data.sources import DataNeeds, load_splits
from tt_jax.data.training_split import training_store
from tt_jax.denoising_settings import DenoisingSettings
from tt_jax.host_memory import release_finished_run
from tt_jax.trained import RESULTS_FILE, check_same_run, checked_workdir, read_results, write_json

STUDENT_TEACHTEXT = "student_teachtext"
STUDENT_BASELINE = "student_baseline"
DENOISING_FOLDER = "denoising"


@dataclasses.dataclass(frozen=True)
class RecipeRun:
    """One training run of the recipe."""

    stage: str
    name: str  # the model's name in the report
    seed: int
    workdir: epath.Path
    config: ml_collections.ConfigDict


def _entries(config: ml_collections.ConfigDict) -> list[TeacherEntry]:
    entries = teacher_entries(config)
    clashing = [entry.name for entry in entries if entry.name in (STUDENT_TEACHTEXT, STUDENT_BASELINE)]
    if clashing:
        raise ConfigError(f"teacher names {clashing} are the students' names; rename them in config.teachers")
    return entries


def _run_config(config: ml_collections.ConfigDict, changes: Mapping[str, Any]) -> ml_collections.ConfigDict:
    """A copy of `config` for one run, with `changes` ({"a.b": value}) applied."""
    run = copy.deepcopy(config)
    with run.unlocked():
        for dotted, value in changes.items():
            *parents, leaf = dotted.split(".")
            node = run
            for parent in parents:
                node = node[parent]
            node[leaf] = value
    return run


def teacher_config(config: ml_collections.ConfigDict, entry: TeacherEntry) -> ml_collections.ConfigDict:
    """The run config that trains the "recipe" teacher `entry` (the student's model with its
    model_changes, reading its text embedding, without teachers of its own, on every caption the
    data gives: the recipe's denoising masks are for its students)."""
    return _run_config(
        config,
        {
            "model": ml_collections.ConfigDict(teacher_model_config(config, entry)),
            "seed": config.pipeline.teacher_seed,
            "data.text_embedding": entry.text_embedding,
            "teachers": [],
            "distillation.terms": [],
            "denoising": default_config().denoising,
        },
    )


def teacher_workdir(config: ml_collections.ConfigDict, workdir: epath.Path, entry: TeacherEntry) -> epath.Path:
    """Where the recipe trains the "recipe" teacher `entry`: <workdir>/teachers/<name>, or, with
    pipeline.teachers_dir, <teachers_dir>/<name>-<digest of the teacher's run identity> (shared
    by every recipe whose teacher is the same run)."""
    if not config.pipeline.teachers_dir:
        return workdir / "teachers" / entry.name
    identity = run_identity(check_config(teacher_config(config, entry)))
    return epath.Path(config.pipeline.teachers_dir) / f"{entry.name}-{identity_digest(identity)}"


def student_config(
    config: ml_collections.ConfigDict, workdir: epath.Path, seed: int, *, distilled: bool
) -> ml_collections.ConfigDict:
    """The run config of a student: every teacher of the list ("recipe" ones read from their runs
    in `workdir/teachers/`) and the distillation terms, or neither for the baseline."""
    masks = masks_path(config, workdir)
    changes = {"data.caption_masks": str(masks)} if masks is not None else {}
    if not distilled:
        return _run_config(config, {**changes, "seed": seed, "teachers": [], "distillation.terms": []})
    teachers = []
    for entry in _entries(config):
        if entry.source == "recipe":
            entry = dataclasses.replace(entry, path=str(teacher_workdir(config, workdir, entry)))
        teachers.append(entry.to_dict())
    return _run_config(config, {**changes, "seed": seed, "teachers": teachers})


def recipe_runs(config: ml_collections.ConfigDict, workdir: epath.Path) -> list[RecipeRun]:
    """Every run of the recipe, in training order."""
    runs = []
    for entry in _entries(config):
        if entry.source == "recipe":
            runs.append(
                RecipeRun("teachers", entry.name, config.pipeline.teacher_seed, teacher_workdir(config, workdir, entry),
                          teacher_config(config, entry))
            )
    for stage, distilled in ((STUDENT_TEACHTEXT, True), (STUDENT_BASELINE, False)):
        for seed in config.pipeline.seeds:
            runs.append(
                RecipeRun(stage, stage, seed, workdir / stage / f"seed_{seed}",
                          student_config(config, workdir, seed, distilled=distilled))
            )
    return runs


def _is_finished(run: RecipeRun) -> bool:
    finished = read_results(run.workdir)
    return finished is not None and finished.get("num_epochs") == run.config.train.num_epochs


def recipe_data_needs(runs: list[RecipeRun]) -> DataNeeds:
    """What any of `runs` reads: the recipe loads it once for all of them."""
    readers, precomputed = [], []
    for run in runs:
        run_readers, run_precomputed = train.data_readers(run.config)
        readers += run_readers
        precomputed += run_precomputed
    return DataNeeds.of(readers, precomputed)


def _teachers_identity(config: ml_collections.ConfigDict, live_only: bool = False) -> dict:
    """What a result computed from the teachers follows from, as digests that stay the same when
    tt_jax gains a key at its default: the training data and each teacher (a "recipe" teacher by
    its run identity, another by its entry)."""
    data = {key: value for key, value in run_identity(config).items() if key.startswith("data.")}
    teachers = [
        identity_digest(run_identity(check_config(teacher_config(config, entry)))) if entry.source == "recipe"
        else entry.to_dict()
        for entry in _entries(config)
        if entry.is_live or not live_only
    ]
    return {"data": identity_digest(data), "teachers": teachers}


def _masks_identity(config: ml_collections.ConfigDict) -> dict:
    """What the denoising masks follow from: the settings, the training data and the teachers."""
    return {"settings": DenoisingSettings.from_config(config).to_dict(), **_teachers_identity(config)}


def masks_path(config: ml_collections.ConfigDict, workdir: epath.Path) -> Optional[epath.Path]:
    """The denoising stage's mask file, or None when the config does not denoise:
    <workdir>/denoising/<digest of what the masks follow from>/denoise-less<R>.pkl. The folder
    name is part of every student's identity (tt_jax.config.run_identity), so a student trained
    on other masks (other teachers, data or settings) is never taken for this one."""
    settings = DenoisingSettings.from_config(config)
    if settings is None:
        return None
    digest = hashlib.sha256(json.dumps(_masks_identity(config), sort_keys=True).encode()).hexdigest()[:10]
    return workdir / DENOISING_FOLDER / digest / f"{settings.file_stem}.pkl"


def _combined_teachers(config: ml_collections.ConfigDict, workdir: epath.Path) -> Optional[tuple[list, dict]]:
    """(live teacher entries with their paths, identity) of the teachers evaluated as one model,
    or None when fewer than two live teachers."""
    student = student_config(config, workdir, config.pipeline.seeds[0], distilled=True)
    entries = [entry for entry in teacher_entries(student) if entry.is_live]
    if len(entries) < 2:
        return None
    return entries, {**_teachers_identity(config, live_only=True), "aggregation": combined_teachers.aggregation_of(config)}


def _summary_path(masks: epath.Path) -> epath.Path:
    return masks.with_suffix(".json")


def masks_are_current(config: ml_collections.ConfigDict, workdir: epath.Path) -> bool:
    """Whether the denoising stage's masks exist for this config (its folder is named by what
    they follow from; the summary, written last, marks them complete)."""
    masks = masks_path(config, workdir)
    return masks is not None and masks.is_file() and _summary_path(masks).is_file()


def denoising_stage(config: ml_collections.ConfigDict, workdir: epath.Path, stores: Mapping[str, Any]) -> dict:
    """Ranks the training captions with the distilled student's teachers and writes the masks,
    the training list and then a summary (fraction of captions dropped, videos dropped); returns
    the summary. Masks made for this config already are kept."""
    from tt_jax.denoising import denoise  # imports the models
    from tt_jax.teachers import load_teachers

    masks = masks_path(config, workdir)
    if masks_are_current(config, workdir):
        logging.info("denoising: %s is up to date", masks)
        return json.loads(_summary_path(masks).read_text())
    settings = DenoisingSettings.from_config(config)
    student = check_config(student_config(config, workdir, config.pipeline.seeds[0], distilled=True))
    with student.unlocked():
        student.data.caption_masks = ""
    store = training_store(student.data, stores["train"])  # the fraction the students train on
    mesh = parallel.make_mesh()
    teachers, variables = load_teachers(student, teacher_entries(student), store, parallel.replicated(mesh))
    with jax.default_matmul_precision(config.train.matmul_precision):
        result = denoise(teachers, variables, store, settings, mesh=mesh, chunk_videos=config.train.eval_chunk_videos)
    del variables
    summary = {**result.summary, "identity": _masks_identity(config)}
    logging.info(
        "denoising (max_rank %d, rule %s): %d of %d training captions dropped (%.1f%%), %d of %d videos left with none",
        settings.max_rank, settings.rule, summary["captions"] - summary["captions_kept"], summary["captions"],
        100 * summary["fraction_dropped"], summary["videos_dropped"], summary["training_videos"],
    )
    if jax.process_index() == 0:
        write_caption_masks(masks, store.video_ids, result.keep, store.caption_mask)
        write_json(_summary_path(masks), summary)  # last: the masks are complete
    parallel.wait_for_every_process("denoising masks written")  # every host's students read the file
    return summary


def check_recipe(config: ml_collections.ConfigDict, workdir) -> list[RecipeRun]:
    """Everything that can be checked of a recipe before any data is loaded or anything is
    written: its config, every unfinished run's terms and data, the denoising settings, and that
    every run directory holding results holds this run; returns its runs."""
    config = check_config(config)
    workdir = checked_workdir(workdir)
    stages = set(config.pipeline.stages)
    if STUDENT_TEACHTEXT in stages and not config.distillation.terms:
        raise ConfigError(
            "the student_teachtext stage trains the distilled student, and config.distillation.terms is empty: "
            "list its terms, or leave the stage out of pipeline.stages"
        )
    runs = recipe_runs(config, workdir)
    to_train = [run for run in runs if run.stage in stages and not _is_finished(run)]
    if DenoisingSettings.from_config(config) is not None:
        if not config.teachers:
            raise ConfigError("denoising ranks the training captions with the teachers, and config.teachers is empty")
        if config.data.caption_masks:
            raise ConfigError(
                f"denoising.max_rank makes the students' caption masks and data.caption_masks names others "
                f"({config.data.caption_masks}); choose one"
            )
        layout = DATASETS.get(config.data.dataset) if config.data.source in ("release", "tfds") else None
        if layout is not None and layout.fuse_captions:
            raise ConfigError(
                f"{layout.name} fuses each video's captions into one query, so denoising would drop whole videos "
                "(the reference ignores caption masks there); leave denoising.max_rank unset"
            )
        students = [run for run in to_train if run.stage != "teachers"]
        if students and "denoising" not in stages and not masks_are_current(config, workdir):
            raise ConfigError(
                f"the students read the denoising masks {masks_path(config, workdir)}, which the denoising stage has "
                "not made for this config; add 'denoising' to pipeline.stages"
            )
    for recipe_run in runs:
        finished = read_results(recipe_run.workdir)
        if finished is not None:  # refused here, before any stage writes a file the run came from
            check_same_run(finished.get("identity"), run_identity(recipe_run.config), f"{recipe_run.workdir / RESULTS_FILE}")
        if recipe_run.stage == "teachers" and config.pipeline.teachers_dir and finished is not None \
                and finished.get("num_epochs") != config.train.num_epochs:
            raise ConfigError(
                f"the shared teacher {recipe_run.workdir} was trained for {finished.get('num_epochs')} epochs and this "
                f"recipe trains for {config.train.num_epochs}; students distilled from it elsewhere read it as it is, "
                "so use another pipeline.teachers_dir"
            )
    for recipe_run in to_train:
        train.check_run_before_loading(recipe_run.config)
    return runs


def run(config: ml_collections.ConfigDict, workdir, *, stores: Optional[Mapping[str, Any]] = None) -> dict:
    """Runs the selected stages and writes the report; returns {model: {split: {seed: metrics}},
    "num_parameters"} of every finished run (the input of `tt_jax.reporting.write_report`).

    stores: the split stores, holding what `recipe_data_needs` of the runs asks for (an ablation
    study loads them once for all its recipes); None loads them from `config.data` if needed.
    """
    config, workdir = check_config(config), checked_workdir(workdir)
    runs = check_recipe(config, workdir)
    stages = set(config.pipeline.stages)
    selected = [run for run in runs if run.stage in stages]
    to_train = [run for run in selected if not _is_finished(run)]
    make_masks = (
        DenoisingSettings.from_config(config) is not None and "denoising" in stages and not masks_are_current(config, workdir)
    )
    # One copy of the data for every run (a release can take most of host memory), holding what
    # any run of the recipe reads (whichever stages run, so the data is always the same); finished
    # runs only check their results, so nothing is loaded when every run has finished.
    combined = _combined_teachers(config, workdir)
    make_combined = "teachers" in stages and combined is not None and not combined_teachers.is_current(workdir, combined[1])
    if stores is None and (to_train or make_masks or make_combined):
        stores = load_splits(config.data, recipe_data_needs(runs))

    def after_teachers() -> None:
        if make_combined:  # the teachers as one model: Phi of their similarity matrices
            combined_teachers.combined_teachers_stage(config, combined[0], combined[1], workdir, stores)
        if make_masks:  # rank the captions with the trained teachers
            denoising_stage(config, workdir, stores)

    pending = True
    for recipe_run in selected:
        if pending and recipe_run.stage != "teachers":
            after_teachers()
            pending = False
        logging.info("%s: %s (seed %s) in %s", recipe_run.stage, recipe_run.name, recipe_run.seed, recipe_run.workdir)
        train.train_and_evaluate(recipe_run.config, recipe_run.workdir, stores=stores)
        release_finished_run()  # each run starts from what the recipe holds: the stores
    if pending:
        after_teachers()
    del stores

    results: dict = {}
    combined_results = read_results(workdir / combined_teachers.COMBINED_TEACHERS) if combined is not None else None
    if combined_results is not None and not combined_teachers.is_current(workdir, combined[1]):
        combined_results = None  # made for other teachers: not this recipe's
    for recipe_run in runs:
        if combined_results is not None and recipe_run.stage != "teachers":  # after the teachers in the report
            results[combined_teachers.COMBINED_TEACHERS] = {
                "num_parameters": combined_results["num_parameters"],
                **{split: {config.pipeline.teacher_seed: combined_results[split]}
                   for split in ("val", "test") if split in combined_results},
            }
            combined_results = None
        finished = read_results(recipe_run.workdir)
        if finished is None:
            continue
        entry = results.setdefault(recipe_run.name, {"num_parameters": finished["num_parameters"]})
        for split in ("val", "test"):
            if split in finished:
                entry.setdefault(split, {})[recipe_run.seed] = finished[split]
    if "report" in stages and results:
        reporting.write_report(workdir, results, is_main_process=jax.process_index() == 0)
    return results
