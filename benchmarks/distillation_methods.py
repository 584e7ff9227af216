"""Every distillation method on the built-in demo data, on equal footing: one table of test t2v
geometric mean, mean ± std over seeds, against the same student without distillation.

    python benchmarks/distillation_methods.py --workdir runs/methods            # 3 seeds, ~40 min on 2 cores
    python benchmarks/distillation_methods.py --workdir runs/methods --methods teachtext,ttcap --seeds 0

The demo's three teachers (configs/demo.py) are trained once, in <workdir>/teachers; every
variant is the demo's student (w2v text, same architecture, optimiser, epochs and seeds) with one
list of distillation terms, each at the weight and settings of its source (tt_jax/distillation),
nothing tuned to this data. Each variant is a recipe run in <workdir>/<variant>, so an interrupted
study resumes and a finished variant is read back. The table (also <workdir>/methods.md and
methods.json) says, per variant, the difference to the baseline and whether it exceeds the larger
of the two seed standard deviations.
"""

from __future__ import annotations

import argparse
import copy
import json
import pathlib
import statistics
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from absl import logging  # noqa: E402

from configs import demo  # noqa: E402
from tt_jax import pipeline  # noqa: E402
from tt_jax.trained import read_results  # noqa: E402

METRIC = "geometric_mean_R1-R5-R10"
ALL_TEACHERS = None  # a variant reading every demo teacher
SELF_TEACHER = ("teacher_w2v",)  # the student's own inputs and architecture: self-learning

# variant -> (terms, teachers it reads). The baseline has no terms and no teachers.
VARIANTS = {
    "baseline": ([], ()),
    "teachtext": ([dict(method="teachtext")], ALL_TEACHERS),
    "teachtext_l2": ([dict(method="teachtext", distance="l2")], ALL_TEACHERS),
    "rank_k": ([dict(method="rank_k", k=10)], ALL_TEACHERS),
    "rank_k_listwise": ([dict(method="rank_k_listwise", k=10)], ALL_TEACHERS),
    "pdist": ([dict(method="pdist")], ALL_TEACHERS),
    "pdist_dist": ([dict(method="pdist_dist")], ALL_TEACHERS),
    "relational": ([dict(method="relational")], ALL_TEACHERS),
    "relational_text": ([dict(method="relational", on="text")], ALL_TEACHERS),
    "embedding_regression": ([dict(method="embedding_regression")], ALL_TEACHERS),
    "kl_batch": ([dict(method="kl_batch")], ALL_TEACHERS),
    "kl_batch_exp": ([dict(method="kl_batch", schedule=dict(kind="exp"))], ALL_TEACHERS),
    "linas_feature": ([dict(method="linas_feature")], ALL_TEACHERS),
    "linas_diag": ([dict(method="linas_relational", mask="diag")], ALL_TEACHERS),
    "linas_adapt": ([dict(method="linas_relational", mask="adapt")], ALL_TEACHERS),
    "linas_feature_relational": (
        [dict(method="linas_feature"), dict(method="linas_relational", mask="diag")], ALL_TEACHERS
    ),
    "cecap": ([dict(method="caption")], ()),
    "video": ([dict(method="video")], ()),
    "ttcap": ([dict(method="teachtext"), dict(method="caption")], ALL_TEACHERS),
    "self_learning": ([dict(method="teachtext")], SELF_TEACHER),
}


def variant_config(base, workdir: pathlib.Path, terms, teachers, seeds):
    """The demo config of one variant: its terms, the shared teachers as finished runs."""
    config = copy.deepcopy(base)
    entries = [entry for entry in base.teachers if teachers is ALL_TEACHERS or entry["name"] in teachers]
    with config.unlocked():
        config.teachers = [
            dict(name=entry["name"], source="run", text_embedding=entry["text_embedding"],
                 path=str(workdir / "teachers" / entry["name"]))
            for entry in entries
        ]
        config.distillation.terms = terms
        config.pipeline.seeds = tuple(seeds)
        config.pipeline.stages = ("student_teachtext",) if terms else ("student_baseline",)
    return config


def seed_values(workdir: pathlib.Path, stage: str, seeds) -> list[float]:
    values = []
    for seed in seeds:
        results = read_results(workdir / stage / f"seed_{seed}")
        if results is not None and "test" in results:
            values.append(results["test"]["t2v"][METRIC])
    return values


def summary(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.pstdev(values) if len(values) > 1 else 0.0)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", default="runs/methods")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--methods", default=",".join(VARIANTS), help="comma-separated variants (the baseline always runs)")
    parser.add_argument("--num_epochs", type=int, default=None, help="default: the demo's")
    args = parser.parse_args(argv)
    logging.set_verbosity(logging.WARNING)
    workdir = pathlib.Path(args.workdir).resolve()
    seeds = [int(seed) for seed in args.seeds.split(",")]
    chosen = ["baseline"] + [name for name in args.methods.split(",") if name and name != "baseline"]
    unknown = [name for name in chosen if name not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {list(VARIANTS)}")

    base = demo.get_config()
    if args.num_epochs:
        base.train.num_epochs = args.num_epochs
    teachers_only = copy.deepcopy(base)
    teachers_only.pipeline.stages = ("teachers",)
    pipeline.run(teachers_only, workdir)

    rows = {}
    for name in chosen:
        terms, teachers = VARIANTS[name]
        config = variant_config(base, workdir, terms, teachers, seeds)
        pipeline.run(config, workdir / name)
        stage = pipeline.STUDENT_TEACHTEXT if terms else pipeline.STUDENT_BASELINE
        rows[name] = seed_values(workdir / name, stage, seeds)
        print(f"{name}: {rows[name]}", flush=True)

    base_mean, base_std = summary(rows["baseline"])
    lines = [
        f"Test t2v geometric mean of R1/R5/R10 (%), mean ± std over seeds {seeds}; demo data and student.",
        "",
        "| Variant | Terms | Teachers | t2v GeoM | vs baseline | beats baseline by more than the spread |",
        "|---|---|---|---|---|---|",
    ]
    table = {}
    for name in chosen:
        terms, teachers = VARIANTS[name]
        mean, std = summary(rows[name])
        spread = max(std, base_std)
        difference = mean - base_mean
        if name == "baseline":
            verdict = "—"
        elif min(len(rows[name]), len(rows["baseline"])) < 2:
            verdict = "one seed: no spread"
        else:
            verdict = "yes" if difference > spread else ("worse" if difference < -spread else "no")
        described = " + ".join(
            term["method"] + "".join(f" {k}={v}" for k, v in term.items() if k != "method") for term in terms
        ) or "none"
        who = "none" if teachers == () else ("all 3" if teachers is ALL_TEACHERS else ", ".join(teachers))
        lines.append(
            f"| {name} | {described} | {who} | {mean:.1f} ± {std:.1f} | {difference:+.1f} | {verdict} |"
        )
        table[name] = {"seeds": rows[name], "mean": mean, "std": std, "difference": difference, "beats_baseline": verdict}
    text = "\n".join(lines) + "\n"
    print(text)
    (workdir / "methods.md").write_text(text, encoding="utf-8")
    (workdir / "methods.json").write_text(json.dumps(table, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
