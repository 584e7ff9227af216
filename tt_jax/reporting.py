"""What a run tells the people watching it: metric logs, progress bars and the final report.

Only process 0 writes (DESIGN decision 8): every writer here takes `is_main_process` / `enabled`
and does nothing on the other processes, so the training loop calls it unconditionally.

Files under a workdir:
    metrics.jsonl   one JSON object per `write_scalars` call: {"step", "time", <scalars>}
    tensorboard/    TensorBoard event files with the same scalars
    config.json     the experiment config
    report.json     per model and split: every seed's metrics, their mean and std over seeds
    report.md       the same as markdown tables
"""

from __future__ import annotations

import json
from etils import epath
import sys
import time
from typing import Any, Iterable, Iterator, Mapping, Optional, TypeVar

import jax
import numpy as np

# tensorboardX writes TensorBoard event files with only numpy and protobuf: no TensorFlow (a
# multi-GB install that fights JAX over the accelerator) and no PyTorch. It is maintained, small,
# and its files are read by the standard `tensorboard` viewer.
import tensorboardX
import tqdm

from tt_jax.errors import UserInputError
from tt_jax.metrics import METRIC_NAMES as ALL_METRIC_NAMES
from tt_jax.metrics import REFERENCE_METRIC_NAMES as METRIC_NAMES  # the table's columns

# Metrics the report carries where every seed has them (runs evaluated before they existed do not).
OPTIONAL_METRIC_NAMES = tuple(name for name in ALL_METRIC_NAMES if name not in METRIC_NAMES)

T = TypeVar("T")

DIRECTIONS = ("t2v", "v2t")
# Column titles of the markdown tables, in METRIC_NAMES order.
_COLUMN_TITLES = {
    "R1": "R1",
    "R5": "R5",
    "R10": "R10",
    "R50": "R50",
    "MedR": "MdR",
    "MeanR": "MnR",
    "geometric_mean_R1-R5-R10": "GeoM",
}
STD_DEFINITION = "population standard deviation over seeds (numpy.std, ddof=0)"


class ReportError(UserInputError):
    """Results that cannot be summarised as given; the message names the model, split and seed."""


# -- metric logs ---------------------------------------------------------------------------------


def _appendable(path: epath.Path) -> bool:
    """Whether a file can be appended to: a local (or mounted) one, not an object in a bucket."""
    return "://" not in str(path)


class MetricWriter:
    """Scalars to `workdir/metrics.jsonl` and `workdir/tensorboard/`; config to `config.json`.

    Nothing is written when `is_main_process` is False, so every process may call it. The JSONL
    file is appended to (a resumed run continues it) and flushed after every line, so a killed
    run leaves only complete lines. Object stores (a `gs://` workdir) cannot append: there the
    file is rewritten whole at every line, each write replacing the object at once. Non-finite
    scalars are written as NaN/Infinity, which Python's `json` reads back.
    """

    def __init__(self, workdir, *, is_main_process: bool):
        self.enabled = is_main_process
        self.workdir = epath.Path(workdir)
        self._jsonl = None
        self._lines: Optional[list[str]] = None  # the whole file, where it cannot be appended to
        self._tensorboard = None
        if not self.enabled:
            return
        self.workdir.mkdir(parents=True, exist_ok=True)
        path = self.workdir / "metrics.jsonl"
        if not _appendable(path):
            self._lines = path.read_text(encoding="utf-8").splitlines(keepends=True) if path.exists() else []
        else:
            self._jsonl = path.open("a", encoding="utf-8")
        self._tensorboard = tensorboardX.SummaryWriter(logdir=str(self.workdir / "tensorboard"))

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        """Logs {name: number} at `step`; device arrays are fetched in one explicit transfer."""
        if not self.enabled:
            return
        values = {name: float(value) for name, value in jax.device_get(dict(scalars)).items()}
        if {"step", "time"} & values.keys():
            raise ReportError(f"scalar names 'step' and 'time' are reserved in metrics.jsonl, got {sorted(values)}")
        step = int(step)
        line = json.dumps({"step": step, "time": time.time(), **values}) + "\n"
        if self._lines is not None:
            self._lines.append(line)
            (self.workdir / "metrics.jsonl").write_text("".join(self._lines), encoding="utf-8")
        else:
            self._jsonl.write(line)
            self._jsonl.flush()
        for name, value in values.items():
            self._tensorboard.add_scalar(name, value, global_step=step)

    def write_config(self, config: Any) -> None:
        """Saves an ml_collections ConfigDict (or a plain dict) as `config.json`."""
        if not self.enabled:
            return
        if hasattr(config, "to_json_best_effort"):
            text = config.to_json_best_effort(indent=2, sort_keys=True)
        else:
            text = json.dumps(config, indent=2, sort_keys=True, default=str)
        (self.workdir / "config.json").write_text(text + "\n", encoding="utf-8")

    def flush(self) -> None:
        if self.enabled:
            if self._jsonl is not None:
                self._jsonl.flush()
            self._tensorboard.flush()

    def close(self) -> None:
        if self.enabled:
            if self._jsonl is not None:
                self._jsonl.close()
            self._tensorboard.close()
            self._jsonl = self._tensorboard = self._lines = None
            self.enabled = False

    def __enter__(self) -> "MetricWriter":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def progress(
    iterable: Iterable[T],
    *,
    total: Optional[int] = None,
    description: str = "",
    enabled: bool = True,
    force: bool = False,
) -> Iterator[T]:
    """`iterable` with a tqdm bar on stderr, shown on process 0 (`enabled`) when stderr is a terminal.

    `force` shows it even when stderr is not a terminal (e.g. a notebook or a log file). Without a
    bar the iterable is returned as it is, so logs of batch jobs stay free of carriage returns.
    """
    if not enabled or not (force or sys.stderr.isatty()):
        return iter(iterable)
    return iter(tqdm.tqdm(iterable, total=total, desc=description, file=sys.stderr, dynamic_ncols=True))


# -- final report --------------------------------------------------------------------------------


def _checked_metrics(metrics: Any, where: str) -> dict[str, float]:
    if not isinstance(metrics, Mapping):
        raise ReportError(f"{where}: expected a dict of metrics, got {type(metrics).__name__}")
    missing = [name for name in METRIC_NAMES if name not in metrics]
    if missing:
        raise ReportError(f"{where}: metrics {missing} are missing (has {sorted(metrics)})")
    names = METRIC_NAMES + tuple(name for name in OPTIONAL_METRIC_NAMES if name in metrics)
    return {name: float(metrics[name]) for name in names}


def summarize_results(results: Mapping[str, Mapping[str, Any]]) -> dict:
    """The content of report.json: per model and split, every seed's metrics, mean and std.

    results: {model: {split: {seed: {"t2v": metrics, "v2t": metrics}}, "num_parameters": int}},
    `num_parameters` optional. Returns
    {"std": STD_DEFINITION, "models": {model: {"num_parameters": int | None, "splits": {split:
    {"num_seeds", "seeds": {seed: {direction: metrics}}, "mean": {direction: metrics},
    "std": {direction: metrics}}}}}}; seeds become strings (JSON keys).
    """
    models = {}
    for model, by_split in results.items():
        if not isinstance(by_split, Mapping):
            raise ReportError(
                f"results[{model!r}]: expected {{split: {{seed: metrics}}}}, got {type(by_split).__name__}"
            )
        num_parameters = by_split.get("num_parameters")
        splits = {}
        for split, by_seed in by_split.items():
            if split == "num_parameters":
                continue
            if not isinstance(by_seed, Mapping) or not by_seed:
                raise ReportError(f"results[{model!r}][{split!r}]: expected a non-empty {{seed: metrics}} dict")
            seeds = {
                str(seed): {
                    direction: _checked_metrics(
                        per_direction.get(direction) if isinstance(per_direction, Mapping) else None,
                        f"results[{model!r}][{split!r}][{seed!r}][{direction!r}]",
                    )
                    for direction in DIRECTIONS
                }
                for seed, per_direction in by_seed.items()
            }
            summary = {"num_seeds": len(seeds), "seeds": seeds, "mean": {}, "std": {}}
            for direction in DIRECTIONS:
                first_seed = next(iter(seeds.values()))[direction]
                names = [name for name in first_seed if all(name in seed[direction] for seed in seeds.values())]
                table = np.array([[seed[direction][name] for name in names] for seed in seeds.values()])
                summary["mean"][direction] = dict(zip(names, np.mean(table, axis=0).tolist()))
                summary["std"][direction] = dict(zip(names, np.std(table, axis=0, ddof=0).tolist()))
            splits[str(split)] = summary
        models[str(model)] = {
            "num_parameters": None if num_parameters is None else int(num_parameters),
            "splits": splits,
        }
    return {"std": STD_DEFINITION, "models": models}


def _format_value(mean: float, std: float, num_seeds: int) -> str:
    if num_seeds == 1:
        return f"{mean:.1f}"
    return f"{mean:.1f} ± {std:.1f}"


def _format_parameters(count: Optional[int]) -> str:
    if count is None:
        return "–"
    return f"{count / 1e6:.2f}M" if count >= 10_000 else str(count)


def report_tables(results: Mapping[str, Mapping[str, Any]]) -> str:
    """Markdown: one table per split, one row per model, t2v then v2t metrics and parameters.

    Values are percent for R@K, ranks for MdR/MnR; "mean ± std" over seeds when there are several.
    """
    summary = summarize_results(results)
    splits = list(dict.fromkeys(split for model in summary["models"].values() for split in model["splits"]))
    header = (
        ["Model", "Params", "Seeds"]
        + [f"t2v {_COLUMN_TITLES[name]}" for name in METRIC_NAMES]
        + [f"v2t {_COLUMN_TITLES[name]}" for name in METRIC_NAMES]
    )
    lines = []
    for split in splits:
        lines += [f"## {split}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for model, entry in summary["models"].items():
            if split not in entry["splits"]:
                continue
            split_summary = entry["splits"][split]
            n = split_summary["num_seeds"]
            cells = [model, _format_parameters(entry["num_parameters"]), str(n)]
            for direction in DIRECTIONS:
                mean, std = split_summary["mean"][direction], split_summary["std"][direction]
                cells += [_format_value(mean[name], std[name], n) for name in METRIC_NAMES]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    lines.append(f"R@K in percent, MdR/MnR are median/mean ranks; ± is the {STD_DEFINITION}.")
    return "\n".join(lines) + "\n"


def write_report(workdir, results: Mapping[str, Mapping[str, Any]], *, is_main_process: bool = True) -> None:
    """Writes `report.json` (see `summarize_results`) and `report.md` (see `report_tables`).

    Every process validates `results`; only the main one writes.
    """
    summary = summarize_results(results)
    markdown = "# Retrieval results\n\n" + report_tables(results)
    if not is_main_process:
        return
    workdir = epath.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "report.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    (workdir / "report.md").write_text(markdown, encoding="utf-8")
