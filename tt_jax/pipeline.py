"""The TeachText recipe from one config: teachers, the distilled student, the baseline, a report.

    <workdir>/teachers/<name>/                one run per "recipe" teacher of config.teachers
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
from etils import epath
from typing import Any, Mapping

import jax
import ml_collections
from absl import logging

from tt_jax import reporting, train
from tt_jax.config import ConfigError, TeacherEntry, check_config, teacher_entries, teacher_model_config
from tt_jax.data.sources import DataNeeds, load_splits
from tt_jax.host_memory import release_finished_run
from tt_jax.trained import checked_workdir, read_results

STUDENT_TEACHTEXT = "student_teachtext"
STUDENT_BASELINE = "student_baseline"


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
    model_changes, reading its text embedding, without teachers of its own)."""
    return _run_config(
        config,
        {
            "model": ml_collections.ConfigDict(teacher_model_config(config, entry)),
            "seed": config.pipeline.teacher_seed,
            "data.text_embedding": entry.text_embedding,
            "teachers": [],
            "distillation.terms": [],
        },
    )


def student_config(
    config: ml_collections.ConfigDict, workdir: epath.Path, seed: int, *, distilled: bool
) -> ml_collections.ConfigDict:
    """The run config of a student: every teacher of the list ("recipe" ones read from their runs
    in `workdir/teachers/`) and the distillation terms, or neither for the baseline."""
    if not distilled:
        return _run_config(config, {"seed": seed, "teachers": [], "distillation.terms": []})
    teachers = []
    for entry in _entries(config):
        if entry.source == "recipe":
            entry = dataclasses.replace(entry, path=str(workdir / "teachers" / entry.name))
        teachers.append(entry.to_dict())
    return _run_config(config, {"seed": seed, "teachers": teachers})


def recipe_runs(config: ml_collections.ConfigDict, workdir: epath.Path) -> list[RecipeRun]:
    """Every run of the recipe, in training order."""
    runs = []
    for entry in _entries(config):
        if entry.source == "recipe":
            runs.append(
                RecipeRun("teachers", entry.name, config.pipeline.teacher_seed, workdir / "teachers" / entry.name,
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


def run(config: ml_collections.ConfigDict, workdir) -> dict:
    """Runs the selected stages and writes the report; returns {model: {split: {seed: metrics}},
    "num_parameters"} of every finished run (the input of `tt_jax.reporting.write_report`)."""
    config = check_config(config)
    workdir = checked_workdir(workdir)
    stages = set(config.pipeline.stages)
    if STUDENT_TEACHTEXT in stages and not config.distillation.terms:
        raise ConfigError(
            "the student_teachtext stage trains the distilled student, and config.distillation.terms is empty: "
            "list its terms, or leave the stage out of pipeline.stages"
        )
    runs = recipe_runs(config, workdir)
    selected = [run for run in runs if run.stage in stages]
    to_train = [run for run in selected if not _is_finished(run)]
    for recipe_run in to_train:  # every run's terms, before the first run trains
        train.check_terms_before_loading(recipe_run.config)
    # One copy of the data for every run (a release can take most of host memory), holding what
    # any run of the recipe reads (whichever stages run, so the data is always the same); finished
    # runs only check their results, so nothing is loaded when every run has finished.
    stores = load_splits(config.data, recipe_data_needs(runs)) if to_train else None
    for recipe_run in selected:
        logging.info("%s: %s (seed %s) in %s", recipe_run.stage, recipe_run.name, recipe_run.seed, recipe_run.workdir)
        train.train_and_evaluate(recipe_run.config, recipe_run.workdir, stores=stores)
        release_finished_run()  # each run starts from what the recipe holds: the stores
    del stores

    results: dict = {}
    for recipe_run in runs:
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
