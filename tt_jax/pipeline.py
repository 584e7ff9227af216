"""The TeachText recipe from one config: teachers, the distilled student, the baseline, a report.

    <workdir>/teachers/<name>/                one run per teacher (config.teachers)
    <workdir>/student_teachtext/seed_<s>/     the student distilled from every teacher
    <workdir>/student_baseline/seed_<s>/      the same student without distillation
    <workdir>/report.json, report.md          every model's val and test metrics, mean ± std

Each run resumes from its workdir and is skipped once it has finished, so rerunning the same
command after an interruption (or with more seeds) only does what is missing. `pipeline.stages`
selects the stages to run; the report covers every run that has finished.
"""

from __future__ import annotations

import copy
import pathlib
from typing import Any, Mapping

import jax
import ml_collections
from absl import logging

from tt_jax import reporting, train
from tt_jax.config import ConfigError, check_config
from tt_jax.trained import checked_workdir, read_results

STUDENT_TEACHTEXT = "student_teachtext"
STUDENT_BASELINE = "student_baseline"


def _teacher_entries(config: ml_collections.ConfigDict) -> list[dict]:
    entries = []
    for entry in config.teachers:
        entry = dict(entry)
        unknown = sorted(set(entry) - {"name", "text_embedding", "model", "checkpoint", "trust_pickle"})
        missing = sorted({"name", "text_embedding"} - set(entry))
        if unknown or missing:
            raise ConfigError(
                f"config.teachers entry {entry}: missing keys {missing}, unknown keys {unknown}; an entry has "
                "name, text_embedding and optionally model (changes to config.model), checkpoint, trust_pickle"
            )
        entries.append(entry)
    names = [entry["name"] for entry in entries]
    if len(set(names)) != len(names) or any(name in (STUDENT_TEACHTEXT, STUDENT_BASELINE) for name in names):
        raise ConfigError(f"teacher names must be unique and not a student's name, got {names}")
    return entries


def _run_config(config: ml_collections.ConfigDict, changes: Mapping[str, Any]) -> ml_collections.ConfigDict:
    """A copy of `config` for one run: the recipe-level teachers cleared, `changes` ({"a.b": value})
    applied."""
    run = copy.deepcopy(config)
    with run.unlocked():
        run.teachers = []
        for dotted, value in changes.items():
            *parents, leaf = dotted.split(".")
            node = run
            for parent in parents:
                node = node[parent]
            node[leaf] = value
    return run


def teacher_config(config: ml_collections.ConfigDict, entry: Mapping[str, Any]) -> ml_collections.ConfigDict:
    """The run config that trains the teacher `entry` (the student's model with its changes)."""
    model = config.model.to_dict()
    model.update(dict(entry.get("model", {})))
    return _run_config(
        config,
        {
            "model": ml_collections.ConfigDict(model),
            "seed": config.pipeline.teacher_seed,
            "data.text_embedding": entry["text_embedding"],
            "distillation.teachers": [],
            "distillation.precomputed_teachers": [],
        },
    )


def teacher_checkpoint(workdir: pathlib.Path, entry: Mapping[str, Any]) -> str:
    """Where the student reads teacher `entry` from: its given checkpoint or its run here."""
    return str(entry.get("checkpoint") or workdir / "teachers" / entry["name"])


def student_config(
    config: ml_collections.ConfigDict, workdir: pathlib.Path, seed: int, *, distilled: bool
) -> ml_collections.ConfigDict:
    if not distilled:
        return _run_config(
            config, {"seed": seed, "distillation.teachers": [], "distillation.precomputed_teachers": []}
        )
    teachers = []
    for entry in _teacher_entries(config):
        teacher = {"name": entry["name"], "text_embedding": entry["text_embedding"]}
        teacher["checkpoint"] = teacher_checkpoint(workdir, entry)
        if train.is_reference_checkpoint(teacher["checkpoint"]):  # the converter needs the architecture
            teacher["model"] = teacher_config(config, entry).model.to_dict()
            teacher["trust_pickle"] = bool(entry.get("trust_pickle", False))
        teachers.append(teacher)
    return _run_config(config, {"seed": seed, "distillation.teachers": teachers})


def _runs(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> list[tuple[str, str, Any, Any]]:
    """(stage, model name, seed, run workdir) of every run of the recipe, in training order."""
    runs = []
    for entry in _teacher_entries(config):
        if not entry.get("checkpoint"):
            runs.append(("teachers", entry["name"], config.pipeline.teacher_seed, workdir / "teachers" / entry["name"]))
    for seed in config.pipeline.seeds:
        runs.append((STUDENT_TEACHTEXT, STUDENT_TEACHTEXT, seed, workdir / STUDENT_TEACHTEXT / f"seed_{seed}"))
    for seed in config.pipeline.seeds:
        runs.append((STUDENT_BASELINE, STUDENT_BASELINE, seed, workdir / STUDENT_BASELINE / f"seed_{seed}"))
    return runs


def _config_for(config, workdir, stage: str, name: str, seed: int) -> ml_collections.ConfigDict:
    if stage == "teachers":
        entry = next(entry for entry in _teacher_entries(config) if entry["name"] == name)
        return teacher_config(config, entry)
    return student_config(config, workdir, seed, distilled=stage == STUDENT_TEACHTEXT)


def run(config: ml_collections.ConfigDict, workdir) -> dict:
    """Runs the selected stages and writes the report; returns {model: {split: {seed: metrics}},
    "num_parameters"} of every finished run (the input of `tt_jax.reporting.write_report`)."""
    config = check_config(config)
    workdir = checked_workdir(workdir)
    stages = set(config.pipeline.stages)
    if STUDENT_TEACHTEXT in stages and not config.teachers and not config.distillation.precomputed_teachers:
        raise ConfigError(
            "the student_teachtext stage needs teachers: list them in config.teachers (or "
            "config.distillation.precomputed_teachers), or leave the stage out of pipeline.stages"
        )
    runs = _runs(config, workdir)
    for stage, name, seed, run_dir in runs:
        if stage not in stages:
            continue
        logging.info("%s: training %s (seed %s) in %s", stage, name, seed, run_dir)
        train.train_and_evaluate(_config_for(config, workdir, stage, name, seed), run_dir)

    results: dict = {}
    for stage, name, seed, run_dir in runs:
        finished = read_results(run_dir)
        if finished is None:
            continue
        entry = results.setdefault(name, {"num_parameters": finished["num_parameters"]})
        for split in ("val", "test"):
            if split in finished:
                entry.setdefault(split, {})[seed] = finished[split]
    if "report" in stages and results:
        reporting.write_report(workdir, results, is_main_process=jax.process_index() == 0)
    return results
