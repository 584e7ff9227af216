"""Ablation studies: `python -m tt_jax.ablate --config configs/demo.py --study distillation_types`.

A study is a set of named variants of one base config, each a set of config changes
({"dotted.key": value}); every variant is a recipe (tt_jax.pipeline) in
<workdir>/<study>/<variant>, training the distilled student (or, for a "baseline" variant, the
student without distillation) over the base config's seeds. Teachers are trained once for every
variant and study that reads the same teacher run (`pipeline.teachers_dir` = <workdir>/teachers),
variants with the same config are trained once, and a rerun skips finished runs like the recipe.
The data is loaded once for every variant that reads the same data.

The study writes <workdir>/<study>.md (the table), .json (every seed's metrics) and .png: bars, or
lines over a numeric setting, of the test t2v geometric mean of R1/R5/R10, mean with the standard
deviation over seeds as error bars (TeachText paper, appendix G's figures).

"Teachers as one model" is the metric of Phi of the variant's live teachers' similarity matrices
(tt_jax.combined_teachers): with live teachers only, what its student is distilled towards.

Built-in studies (`STUDIES`), named after the paper's figures: distillation_types (Fig 6b/10a),
distances (10b), aggregation (8b), num_teachers (6a), denoising (9a), teachvideo (7b),
train_fraction (12a) and batch_size (8a). A config can define its own in `config.study`:

    config.study = dict(name="margins", plot="lines", x_label="margin", variants=[
        dict(name="m0.05", x=0.05, changes={"train.margin": 0.05}),
        dict(name="m0.2", x=0.2, changes={"train.margin": 0.2}),
        dict(name="baseline", student="baseline", changes={}),   # drawn as a reference line
    ])
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import os
import sys
from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import ml_collections
import numpy as np
from absl import app, flags, logging
from etils import epath

from tt_jax import pipeline
from tt_jax.config import check_config, default_config, run_identity, teacher_entries
from tt_jax.data.sources import load_splits
from tt_jax.errors import UserInputError
from tt_jax.trained import checked_workdir, write_json

METRIC = "geometric_mean_R1-R5-R10"
STUDENTS = ("teachtext", "baseline")
PLOTS = ("bars", "lines")


class StudyError(UserInputError):
    """A study that cannot be run as given; the message names the study and the variant."""


@dataclasses.dataclass(frozen=True)
class Variant:
    """One point of a study. student: which student of the recipe it trains and reports;
    x: its position on a line plot (None: a reference, drawn across the plot); line: its series."""

    name: str
    changes: Mapping[str, Any]
    student: str = "teachtext"
    x: Optional[float] = None
    line: str = ""


@dataclasses.dataclass(frozen=True)
class Study:
    name: str
    title: str
    variants: tuple[Variant, ...]
    plot: str = "bars"
    x_label: str = ""


# -- the built-in studies --------------------------------------------------------------------------


def _baseline(changes: Optional[Mapping[str, Any]] = None) -> Variant:
    return Variant("baseline", dict(changes or {}), student="baseline", line="baseline")


def _terms_study(name: str, title: str, terms: Mapping[str, list]) -> Callable[[Any], Study]:
    def build(config: Any) -> Study:
        variants = [Variant(label, {"distillation.terms": value}) for label, value in terms.items()]
        return Study(name, title, (_baseline(), *variants))

    return build


_distillation_types = _terms_study(
    "distillation_types",
    "Distillation type (TeachText Fig 6b / 10a)",
    {
        "teachtext": [dict(method="teachtext")],
        "rank_k": [dict(method="rank_k", k=5)],
        "rank_k_listwise": [dict(method="rank_k_listwise", k=5)],
        "pdist": [dict(method="pdist")],
        "pdist_dist": [dict(method="pdist_dist")],
        "relational": [dict(method="relational")],
    },
)
_distances = _terms_study(
    "distances",
    "Distance between similarity matrices (TeachText Fig 10b)",
    {name: [dict(method="teachtext", distance=name)] for name in ("l1", "l2", "huber")},
)
_aggregation = _terms_study(
    "aggregation",
    "Aggregation of the teachers, Phi (TeachText Fig 8b)",
    {name: [dict(method="teachtext", aggregation=name)] for name in ("mean", "min", "max")},
)


def teacher_entries_as_dicts(config: Any) -> list[dict]:
    return [entry.to_dict() for entry in teacher_entries(config)]


def _teachers(config: Any) -> list[dict]:
    """The base config's teacher entries; a study that needs them refuses a config without."""
    entries = teacher_entries_as_dicts(config)
    if not entries:
        raise StudyError("this study needs the base config's teachers, and it has none (config.teachers)")
    return entries


def _num_teachers(config: Any) -> Study:
    """The first n teachers of the list, n = 1..N, in the list's order and in the reverse order."""
    entries = _teachers(config)
    variants = [_baseline()]
    for line, order in (("list order", entries), ("reversed order", entries[::-1])):
        for count in range(1, len(order) + 1):
            names = "+".join(entry["name"] for entry in order[:count])
            variants.append(Variant(names, {"teachers": order[:count]}, x=count, line=line))
    return Study("num_teachers", "Number and order of teachers (TeachText Fig 6a)", tuple(variants), "lines",
                 "teachers (the first n of the list)")


DENOISING_RANKS = (5, 10, 40, 80, 100)


def _denoising(config: Any) -> Study:
    _teachers(config)
    every_caption = {"denoising.max_rank": None}  # also when the base config denoises
    variants = [_baseline(every_caption), Variant("teachtext", every_caption, line="teachtext, every caption")]
    variants += [
        Variant(f"less{rank}", {"denoising.max_rank": rank}, x=rank, line="teachtext, denoised") for rank in DENOISING_RANKS
    ]
    return Study("denoising", "Denoising threshold R (TeachText Fig 9a)", tuple(variants), "lines",
                 "R: captions kept when the teachers rank their video within the top R")


def _teachvideo(config: Any) -> Study:
    """Students reading 1..E experts (always-present experts first), without teachers, with one
    video teacher (every expert, the student's text) and with the video teacher beside the text
    teachers (TeachVideo composed with TeachText in one Phi pool)."""
    model = config.model.to_dict() if hasattr(config.model, "to_dict") else dict(config.model)
    experts = sorted(model["experts"], key=lambda expert: (bool(expert.get("flaky", False)), expert["name"]))
    if len(experts) < 2:
        raise StudyError("the teachvideo study needs a base model with at least two experts")
    video_teacher = dict(
        name="teacher_video", source="recipe", text_embedding=config.data.text_embedding,
        model_changes=dict(experts=experts),
    )
    # The base config's teachers as they are, those the recipe trains reading every expert.
    text_teachers = [
        {**entry, "model_changes": {**entry.get("model_changes", {}), "experts": experts}} if entry["source"] == "recipe"
        else entry
        for entry in teacher_entries_as_dicts(config)
    ]
    variants = []
    for count in range(1, len(experts)):
        student = {"model.experts": experts[:count]}
        names = "+".join(expert["name"] for expert in experts[:count])
        variants += [
            Variant(f"{names}/baseline", student, student="baseline", x=count, line="baseline"),
            Variant(f"{names}/teachvideo", {**student, "teachers": [video_teacher]}, x=count, line="TeachVideo"),
        ]
        if text_teachers:
            variants.append(Variant(f"{names}/teachvideo+teachtext", {**student, "teachers": [video_teacher, *text_teachers]},
                                    x=count, line="TeachVideo + TeachText"))
    variants.append(Variant("all experts/baseline", {}, student="baseline", line="every expert, baseline"))
    return Study("teachvideo", "TeachVideo: students with fewer experts (TeachText Fig 7b)", tuple(variants), "lines",
                 "video experts the student reads")


def _baseline_and_teachtext_over(name: str, title: str, key: str, values: Sequence[float], x_label: str):
    """A study of one setting: the baseline and the TeachText student at each value."""

    def build(config: Any) -> Study:
        variants = []
        for value in values:
            changes = {key: value}
            variants += [
                Variant(f"{value:g}/baseline", changes, student="baseline", x=value, line="baseline"),
                Variant(f"{value:g}/teachtext", changes, x=value, line="teachtext"),
            ]
        return Study(name, title, tuple(variants), "lines", x_label)

    return build


TRAIN_FRACTIONS = (0.25, 0.5, 0.75, 1.0)
BATCH_SIZES = (8, 16, 32, 64)
_train_fraction = _baseline_and_teachtext_over(
    "train_fraction", "Fraction of the training data, teachers included (TeachText Fig 12a)", "data.train_fraction",
    TRAIN_FRACTIONS, "fraction of training videos",
)
_batch_size = _baseline_and_teachtext_over(
    "batch_size", "Batch size, teachers included (TeachText Fig 8a)", "train.batch_size", BATCH_SIZES, "batch size"
)


STUDIES: dict[str, Callable[[Any], Study]] = {
    "distillation_types": _distillation_types,
    "distances": _distances,
    "aggregation": _aggregation,
    "num_teachers": _num_teachers,
    "denoising": _denoising,
    "teachvideo": _teachvideo,
    "train_fraction": _train_fraction,
    "batch_size": _batch_size,
}


def study_from_config(config: Any) -> Study:
    """The study a config defines in `config.study` (see the module docstring)."""
    raw = config.study.to_dict() if hasattr(config.study, "to_dict") else dict(config.study)
    allowed = {"name", "title", "variants", "plot", "x_label"}
    unknown = sorted(set(raw) - allowed)
    if unknown or not raw.get("name") or not raw.get("variants"):
        raise StudyError(
            f"config.study {raw}: needs 'name' and 'variants' and takes {sorted(allowed)}; unknown keys {unknown}"
        )
    variants = []
    for index, entry in enumerate(raw["variants"]):
        fields = {field.name for field in dataclasses.fields(Variant)}
        if not isinstance(entry, Mapping) or "name" not in entry or set(entry) - fields:
            raise StudyError(f"config.study.variants[{index}] must be a dict with 'name' and any of {sorted(fields)}, got {entry!r}")
        variants.append(Variant(**{"changes": {}, **dict(entry)}))
    return Study(raw["name"], raw.get("title", raw["name"]), tuple(variants), raw.get("plot", "bars"), raw.get("x_label", ""))


def select_study(config: Any, name: Optional[str]) -> Study:
    """The built-in study `name`, or the config's own (config.study) when no name is given."""
    if name and config.get("study"):
        raise StudyError(f"the config defines its own study ({config.study.get('name')!r}) and --study names {name!r}; choose one")
    if name:
        if name not in STUDIES:
            raise StudyError(f"unknown study {name!r}; the built-in studies are {sorted(STUDIES)} (or define one in config.study)")
        return STUDIES[name](config)
    if not config.get("study"):
        raise StudyError(f"name a study with --study ({', '.join(sorted(STUDIES))}) or define one in config.study")
    return study_from_config(config)


# -- variants as recipes ----------------------------------------------------------------------------


def _valid_keys(node: Any) -> list[str]:
    return sorted(node.keys()) if hasattr(node, "keys") else []


def variant_config(base: ml_collections.ConfigDict, study: Study, variant: Variant, workdir: epath.Path) -> ml_collections.ConfigDict:
    """The recipe config of one variant: the base with its changes, the student it reports and
    the shared teachers' folder; a key that names nothing is a StudyError."""
    where = f"study {study.name!r}, variant {variant.name!r}"
    if variant.student not in STUDENTS:
        raise StudyError(f"{where}: student is {variant.student!r}; choose one of {list(STUDENTS)}")
    config = copy.deepcopy(base)
    reference = default_config()
    with config.unlocked():
        for dotted, value in variant.changes.items():
            *parents, leaf = str(dotted).split(".")
            node, known = config, reference
            for depth, parent in enumerate(parents):
                if not hasattr(node, "keys") or parent not in node:
                    raise StudyError(f"{where}: unknown config key {dotted!r} ({'.'.join(parents[:depth + 1])!r} is not a "
                                     f"group; valid keys there are {_valid_keys(node)})")
                node = node[parent]
                known = known.get(parent) if hasattr(known, "get") else None
            free_form = known is None or not isinstance(known, ml_collections.ConfigDict) or not known
            if not hasattr(node, "keys") or (leaf not in node and not free_form):
                raise StudyError(f"{where}: unknown config key {dotted!r}; valid keys there are {_valid_keys(node)}")
            node[leaf] = ml_collections.ConfigDict(value) if isinstance(value, Mapping) and value else value
        if not config.pipeline.teachers_dir:
            config.pipeline.teachers_dir = str(workdir / "teachers")
        config.study = ml_collections.ConfigDict()
        student_stage = pipeline.STUDENT_TEACHTEXT if variant.student == "teachtext" else pipeline.STUDENT_BASELINE
        config.pipeline.stages = ("teachers", "denoising", student_stage, "report") if variant.student == "teachtext" \
            else (student_stage, "report")
    try:
        return check_config(config)
    except UserInputError as error:
        raise StudyError(f"{where}: {error}") from None


def _data_key(config: Any) -> str:
    """Variants whose data configs differ only in what selects training rows read the same data."""
    data = json.loads(json.dumps(config.data.to_dict(), sort_keys=True, default=list))
    for key in ("train_fraction", "train_fraction_seed", "caption_masks"):
        data.pop(key, None)
    return json.dumps(data, sort_keys=True)


def _recipe_key(config: Any) -> str:
    """Variants are the same recipe when they run the same stages and seeds and every run has
    the same identity (a default written out is the same run)."""
    runs = pipeline.recipe_runs(config, epath.Path("/"))
    described = {
        "stages": list(config.pipeline.stages),
        "runs": [[run.stage, run.seed, run_identity(run.config)] for run in runs],
    }
    return hashlib.sha256(json.dumps(described, sort_keys=True, default=list).encode()).hexdigest()


def _folder_name(variant: str) -> str:
    return variant.replace("/", "_")


@dataclasses.dataclass(frozen=True)
class PlannedVariant:
    variant: Variant
    config: ml_collections.ConfigDict
    workdir: epath.Path  # the recipe's workdir (shared by variants with the same config)


def plan_study(base: ml_collections.ConfigDict, study: Study, workdir) -> list[PlannedVariant]:
    """Every variant's recipe config and workdir, each checked, before anything is trained."""
    workdir = checked_workdir(workdir)
    if study.plot not in PLOTS:
        raise StudyError(f"study {study.name!r}: plot is {study.plot!r}; choose one of {list(PLOTS)}")
    names = [variant.name for variant in study.variants]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise StudyError(f"study {study.name!r}: variant names must be unique; {repeated} repeat")
    if study.plot == "lines" and not any(variant.x is not None for variant in study.variants):
        raise StudyError(f"study {study.name!r} is drawn as lines, and no variant gives its position x")
    folders = [_folder_name(name) for name in names]
    clashing = sorted({name for name, folder in zip(names, folders) if folders.count(folder) > 1})
    if clashing:
        raise StudyError(f"study {study.name!r}: variants {clashing} would share one folder; rename them")
    planned, seen = [], {}
    for variant in study.variants:
        config = variant_config(base, study, variant, workdir)
        folder = seen.setdefault(_recipe_key(config), workdir / study.name / _folder_name(variant.name))
        try:
            pipeline.check_recipe(config, folder)
        except UserInputError as error:
            raise StudyError(f"study {study.name!r}, variant {variant.name!r}: {error}") from None
        planned.append(PlannedVariant(variant, config, folder))
    return planned


def _seed_metrics(results: Mapping[str, Any], variant: Variant) -> tuple[str, dict]:
    model = pipeline.STUDENT_TEACHTEXT if variant.student == "teachtext" else pipeline.STUDENT_BASELINE
    split = "test" if "test" in results.get(model, {}) else "val"
    return split, {int(seed): metrics for seed, metrics in results.get(model, {}).get(split, {}).items()}


def run_study(base: ml_collections.ConfigDict, study: Study, workdir) -> dict:
    """Trains what is missing of every variant and writes <workdir>/<study>.{md,json,png};
    returns the JSON's content."""
    workdir = checked_workdir(workdir)
    planned = plan_study(check_config(base), study, workdir)
    done: dict[str, dict] = {}
    stores_by_data: dict[str, Any] = {}
    for item in planned:
        key = str(item.workdir)
        if key not in done:
            data_key = _data_key(item.config)
            if data_key not in stores_by_data:
                stores_by_data.clear()  # one dataset in memory at a time
                needs = pipeline.recipe_data_needs(
                    [run for other in planned if _data_key(other.config) == data_key
                     for run in pipeline.recipe_runs(other.config, other.workdir)]
                )
                stores_by_data[data_key] = _LazyStores(item.config.data, needs)
            logging.info("study %s: variant %s in %s", study.name, item.variant.name, item.workdir)
            done[key] = pipeline.run(item.config, item.workdir, stores=stores_by_data[data_key])
    rows = []
    for item in planned:
        split, seeds = _seed_metrics(done[str(item.workdir)], item.variant)
        values = [seeds[seed]["t2v"][METRIC] for seed in sorted(seeds)]
        rows.append({
            "variant": item.variant.name,
            "line": item.variant.line,
            "x": item.variant.x,
            "student": item.variant.student,
            "changes": json.loads(json.dumps(dict(item.variant.changes), default=list)),
            "workdir": str(item.workdir),
            "split": split,
            "seeds": seeds,
            "mean": float(np.mean(values)) if values else math.nan,
            "std": float(np.std(values)) if values else math.nan,
            "denoising": _denoising_summary(item),
            "teachers_combined": _combined(done[str(item.workdir)], split) if item.variant.student == "teachtext" else None,
        })
    summary = {"study": study.name, "title": study.title, "metric": f"t2v {METRIC}", "plot": study.plot,
               "x_label": study.x_label, "std": "population standard deviation over seeds", "variants": rows}
    if jax.process_index() == 0:
        write_json(workdir / f"{study.name}.json", summary)
        (workdir / f"{study.name}.md").write_text(study_table(summary))
        draw_study(summary, workdir / f"{study.name}.png")
    return summary


class _LazyStores(Mapping):
    """The stores of one dataset, loaded the first time a recipe reads them (never, when every
    variant has finished)."""

    def __init__(self, data_config: Any, needs: Any):
        self._data_config, self._needs, self._stores = data_config, needs, None

    def _loaded(self) -> Mapping:
        if self._stores is None:
            self._stores = load_splits(self._data_config, self._needs)
        return self._stores

    def __getitem__(self, key):
        return self._loaded()[key]

    def __iter__(self):
        return iter(self._loaded())

    def __len__(self):
        return len(self._loaded())


def _combined(results: Mapping[str, Any], split: str) -> Optional[float]:
    """The variant's teachers evaluated as one model (tt_jax.combined_teachers), when it has them."""
    seeds = results.get("teachers_combined", {}).get(split, {})
    return float(next(iter(seeds.values()))["t2v"][METRIC]) if seeds else None


def _denoising_summary(item: PlannedVariant) -> Optional[dict]:
    path = pipeline.masks_path(item.config, item.workdir)
    if path is None or not path.with_suffix(".json").is_file():
        return None
    saved = json.loads(path.with_suffix(".json").read_text())
    return {key: saved[key] for key in ("fraction_dropped", "videos_dropped", "captions", "captions_kept")}


# -- the table and the figure -----------------------------------------------------------------------


def study_table(summary: Mapping[str, Any]) -> str:
    """The study as a markdown table: every variant's mean ± std over seeds."""
    lines = [
        f"# {summary['title']}",
        "",
        f"{summary['metric']} (%) on the {summary['variants'][0]['split']} split, mean ± {summary['std']}.",
        "",
        "| Variant | Line | x | Student | Seeds | t2v GeoM | Teachers as one model | Captions dropped |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in summary["variants"]:
        dropped = f"{100 * row['denoising']['fraction_dropped']:.1f}% ({row['denoising']['videos_dropped']} videos)" \
            if row.get("denoising") else ""
        x = "" if row["x"] is None else f"{row['x']:g}"
        combined = "" if row.get("teachers_combined") is None else f"{row['teachers_combined']:.1f}"
        lines.append(
            f"| {row['variant']} | {row['line']} | {x} | {row['student']} | {len(row['seeds'])} | "
            f"{row['mean']:.1f} ± {row['std']:.1f} | {combined} | {dropped} |"
        )
    return "\n".join(lines) + "\n"


def draw_study(summary: Mapping[str, Any], path) -> None:
    """The study's figure: bars per variant, or one line per series over x with references
    (variants without x) drawn across; error bars are the std over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = summary["variants"]
    figure, axes = plt.subplots(figsize=(7, 4))
    if summary["plot"] == "bars":
        positions = np.arange(len(rows))
        axes.bar(positions, [row["mean"] for row in rows], yerr=[row["std"] for row in rows], capsize=4,
                 color=["0.6" if row["student"] == "baseline" else "C0" for row in rows])
        axes.set_xticks(positions, [row["variant"] for row in rows], rotation=30, ha="right")
    else:
        lines: dict[str, list] = {}
        for row in rows:
            if row["x"] is not None:
                lines.setdefault(row["line"] or row["student"], []).append(row)
        for index, (label, points) in enumerate(lines.items()):
            points = sorted(points, key=lambda row: row["x"])
            axes.errorbar([row["x"] for row in points], [row["mean"] for row in points],
                          yerr=[row["std"] for row in points], marker="o", capsize=4, label=label, color=f"C{index}")
        for index, row in enumerate(row for row in rows if row["x"] is None):
            colour = f"C{len(lines) + index}"
            axes.axhline(row["mean"], linestyle="--", color=colour, label=f"{row['line'] or row['variant']}")
            axes.axhspan(row["mean"] - row["std"], row["mean"] + row["std"], color=colour, alpha=0.15)
        positions = sorted({row["x"] for row in rows if row["x"] is not None})
        axes.set_xticks(positions, [f"{x:g}" for x in positions])
        axes.set_xlabel(summary["x_label"])
        axes.legend(fontsize=8)
    axes.set_ylabel(f"{summary['metric'].replace('geometric_mean_R1-R5-R10', 'GeoM R1/R5/R10')} (%)")
    axes.set_title(summary["title"])
    axes.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    path = epath.Path(path)
    with path.open("wb") as handle:
        figure.savefig(handle, format="png", dpi=120)
    plt.close(figure)


# -- the command line --------------------------------------------------------------------------------

if __name__ == "__main__":
    from ml_collections import config_flags

    from tt_jax.cli import DEFAULT_CONFIG, EXIT_BAD_INPUT, EXIT_PREEMPTED, parse_flags

    _CONFIG = config_flags.DEFINE_config_file("config", DEFAULT_CONFIG, "Base config file.", lock_config=True)
    _WORKDIR = flags.DEFINE_string("workdir", "runs/ablate", "Where the studies' runs, tables and figures are written.")
    _STUDY = flags.DEFINE_string("study", None, f"A built-in study: {', '.join(STUDIES)}; or none, for config.study.")

    def main(argv: Sequence[str]) -> int:
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments: {argv[1:]}")
        if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
            jax.config.update("jax_compilation_cache_dir", _WORKDIR.value.rstrip("/") + "/compilation_cache")
            jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
        if os.environ.get("TT_JAX_DISTRIBUTED") == "1":
            jax.distributed.initialize()  # as tt_jax.main: coordinator and ids from the TPU / SLURM environment
        from tt_jax.train import Preempted

        try:
            config = check_config(_CONFIG.value)
            summary = run_study(config, select_study(config, _STUDY.value), _WORKDIR.value)
        except UserInputError as error:
            logging.error("%s", error)
            print(f"error: {error}", file=sys.stderr)
            return EXIT_BAD_INPUT
        except Preempted as stop:  # the variant's run saved; the same command resumes the study
            logging.warning("%s", stop)
            print(str(stop), file=sys.stderr)
            return EXIT_PREEMPTED
        print(study_table(summary))
        return 0

    sys.exit(app.run(main, flags_parser=parse_flags))
