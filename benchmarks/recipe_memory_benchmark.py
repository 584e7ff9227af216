"""Peak resident memory of the TeachText recipe (live teachers, then the distilled student).

    python benchmarks/recipe_memory_benchmark.py                                  # ActivityNet, scaled model
    python benchmarks/recipe_memory_benchmark.py --text_vlad_clusters=0           # the reference model size
    python benchmarks/recipe_memory_benchmark.py --dataset=msrvtt --train_videos=128

Writes a fake release in the reference layout (`tt_jax.data.fake_release`) at the reference
feature dims with few videos, then runs `python -m tt_jax.main` on the dataset's config for one
epoch, one seed and the stages `teachers,student_teachtext` in a child process. The parent samples
the child's resident memory (psutil, every few milliseconds) and reads its exact peak from the
kernel (`wait4` max RSS) when it exits; the child reports, at every phase boundary (each run's
start and end, teachers loaded, first and last train step, each evaluation), its resident memory
and the bytes and count of live JAX buffers (on CPU, device memory is host memory).

The budget is what the distilled student needs at once: its train state (params, gradients and
two optimiser moments, float32), every live teacher's parameters, and the features the stores
hold. "peak / budget" is the ratio to keep below 1.5; "peak - base / budget" leaves out the
process's resident memory before the recipe starts (Python, jax, XLA's code).

`--text_vlad_clusters` scales the model: the text gated units' input is text_dim x clusters,
which holds most parameters (0 keeps the dataset's reference value, 39 for ActivityNet: 376M).
The child is killed when its resident memory exceeds `--kill_rss_gib`.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import threading
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
PHASE_MARK = "RECIPE_MEMORY_PHASE "
GIB = 1024**3


# -- the child: the recipe with phase reports -----------------------------------------------------


def _rss_bytes() -> int:
    for line in pathlib.Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def _report(phase: str, **extra) -> None:
    """One phase line on stderr: resident memory and the live JAX buffers now."""
    import jax

    arrays = [array for array in jax.live_arrays() if not array.is_deleted()]
    buffers = {}  # a host view made by jax.device_get on CPU is a second array over the same buffer
    for array in arrays:
        for shard in array.addressable_shards:
            try:
                pointer = shard.data.unsafe_buffer_pointer()
            except jax.errors.JaxRuntimeError:  # donated after the list was taken
                continue
            buffers[(shard.device.id, pointer)] = shard.data.nbytes
    live_bytes = sum(buffers.values())
    record = {"phase": phase, "rss": _rss_bytes(), "live_bytes": live_bytes, "live_arrays": len(arrays), **extra}
    print(PHASE_MARK + json.dumps(record), file=sys.stderr, flush=True)


def _install_phase_reports() -> None:
    """Wraps the recipe's functions so that each phase boundary reports its memory."""
    from tt_jax import pipeline, train

    run_and_evaluate = train.train_and_evaluate

    def reporting_train_and_evaluate(config, workdir, **kwargs):
        name = pathlib.Path(workdir).name
        if name.startswith("seed_"):
            name = pathlib.Path(workdir).parent.name
        _report(f"{name}: start")
        try:
            return run_and_evaluate(config, workdir, **kwargs)
        finally:
            _report(f"{name}: end")

    pipeline.train.train_and_evaluate = reporting_train_and_evaluate

    load_teachers = train.load_teachers

    def reporting_load_teachers(*args, **kwargs):
        result = load_teachers(*args, **kwargs)
        if result[0]:
            _report("teachers loaded")
        return result

    train.load_teachers = reporting_load_teachers

    make_train_step = train.make_train_step

    def reporting_make_train_step(*args, **kwargs):
        step_fn = make_train_step(*args, **kwargs)
        calls = {"count": 0}

        def reporting_step(state, teacher_variables, batch):
            outputs = step_fn(state, teacher_variables, batch)
            calls["count"] += 1
            if calls["count"] <= 2:
                import jax

                jax.block_until_ready(outputs)
                _report(f"train step {calls['count']}")
            return outputs

        return reporting_step

    train.make_train_step = reporting_make_train_step

    evaluator_run = train.Evaluator.run

    def reporting_evaluator_run(self, *args, **kwargs):
        _report("evaluation start")
        result = evaluator_run(self, *args, **kwargs)
        _report("evaluation end")
        return result

    train.Evaluator.run = reporting_evaluator_run

    for method in ("save_best", "save_latest", "wait", "restore_best"):
        original = getattr(train.Checkpointer, method)

        def reporting_method(self, *args, _original=original, _method=method, **kwargs):
            result = _original(self, *args, **kwargs)
            _report(f"checkpoint {_method}")
            return result

        setattr(train.Checkpointer, method, reporting_method)


def child_main(main_argv: list[str]) -> None:
    sys.path.insert(0, str(REPO))
    from absl import app

    from tt_jax import main as entry
    from tt_jax.cli import parse_flags

    # config_flags reads the command line as the config flag is defined: give it tt_jax.main's.
    sys.argv = [entry.__file__, *main_argv]
    _report("before recipe")
    _install_phase_reports()
    app.run(entry.main, argv=sys.argv, flags_parser=parse_flags)


# -- the parent: data, budget, sampling, table ---------------------------------------------------


def _load_config(dataset: str, overrides: dict):
    import importlib.util

    spec = importlib.util.spec_from_file_location("dataset_config", REPO / "configs" / f"{dataset}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    for key, value in overrides.items():
        config.model[key] = value
    return config


def _budget(config, data_dir: str) -> dict:
    """Student state + live teachers + features, in bytes, from parameter counts and the stores."""
    from tt_jax.config import teacher_entries, teacher_model_config
    from tt_jax.data.feature_store import distinct_nbytes
    from tt_jax.models import count_parameters
    from tt_jax.train import run_stores

    with config.unlocked():
        config.data.data_dir = data_dir
    student = count_parameters(config.model)
    teachers = [
        count_parameters(teacher_model_config(config, entry)) for entry in teacher_entries(config) if entry.is_live
    ]
    features = distinct_nbytes(run_stores(config))
    float_bytes = 4
    return {
        "student_params": student,
        "teacher_params": teachers,
        "student_state": 4 * student * float_bytes,  # params, gradients, two moments
        "teachers": sum(teachers) * float_bytes,
        "features": features,
    }


def _write_release(config, data_dir: str, dataset: str, train_videos: int, eval_videos: int) -> None:
    from tt_jax.data.fake_release import write_fake_release
    from tt_jax.interop.reference_config import TEXT_EMBEDDING_DIMS
    from tt_jax.models import as_model_config
    from tt_jax.train import data_needs

    captions, tokens = ((3, 5), (8, 20)) if dataset == "activitynet" else ((20, 20), (5, 15))
    write_fake_release(
        data_dir, dataset, experts=as_model_config(config.model).experts,
        text_dims={name: TEXT_EMBEDDING_DIMS[name] for name in data_needs(config).text_max_tokens},
        num_videos=(("train", train_videos), ("val", eval_videos), ("test", eval_videos)),
        captions_per_video=captions, tokens_per_caption=tokens, missing_rate=0.1, teachers=False,
    )


class _Sampler(threading.Thread):
    """Samples a process's resident memory until it exits; kills it above a limit."""

    def __init__(self, pid: int, kill_bytes: int, period: float = 0.01):
        super().__init__(daemon=True)
        import psutil

        self.process = psutil.Process(pid)
        self.kill_bytes = kill_bytes
        self.period = period
        self.peak = 0
        self.killed = False
        self.done = threading.Event()

    def run(self) -> None:
        import psutil

        while not self.done.is_set():
            try:
                rss = self.process.memory_info().rss
            except psutil.Error:
                return
            self.peak = max(self.peak, rss)
            if rss > self.kill_bytes:
                self.killed = True
                self.process.kill()
                return
            time.sleep(self.period)


def run_recipe(args, data_dir: str, workdir: str, overrides: dict) -> dict:
    main_argv = [
        f"--config={REPO / 'configs' / (args.dataset + '.py')}",
        f"--workdir={workdir}",
        f"--config.data_dir={data_dir}",
        "--config.num_epochs=1",
        "--config.seeds=0",
        "--config.pipeline.stages=(\"teachers\",\"student_teachtext\")",
        *[f"--config.model.{key}={value}" for key, value in overrides.items()],
        *args.extra,
    ]
    # The command as a user runs it: one CPU device (a test process's fake devices would replicate
    # the state on each of them).
    xla_flags = " ".join(f for f in os.environ.get("XLA_FLAGS", "").split() if "force_host_platform_device_count" not in f)
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO), XLA_FLAGS=xla_flags)
    env.setdefault("JAX_COMPILATION_CACHE_DIR", str(pathlib.Path(workdir) / "compilation_cache"))
    start = time.perf_counter()
    child = subprocess.Popen(
        [sys.executable, __file__, "--child", json.dumps(main_argv)],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    sampler = _Sampler(child.pid, int(args.kill_rss_gib * GIB))
    sampler.start()
    phases, tail = [], []

    def read_stderr():
        for line in child.stderr:
            if line.startswith(PHASE_MARK):
                record = json.loads(line[len(PHASE_MARK):])
                record["time"] = time.perf_counter() - start
                record["sampled_peak"] = sampler.peak
                phases.append(record)
                if args.verbose:
                    print(_phase_row(record), flush=True)
            else:
                tail.append(line)
                del tail[:-40]

    reader = threading.Thread(target=read_stderr, daemon=True)
    reader.start()
    stdout = child.stdout.read()
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    sampler.done.set()
    reader.join()
    return {
        "returncode": child.returncode,
        "killed": sampler.killed,
        "peak": max(usage.ru_maxrss * 1024, sampler.peak),
        "sampled_peak": sampler.peak,
        "phases": phases,
        "seconds": time.perf_counter() - start,
        "tail": "".join(tail),
        "stdout": stdout,
    }


def _phase_row(record: dict) -> str:
    return (
        f"{record['time']:>7.1f}  {record['phase']:<40} {record['rss'] / GIB:>8.2f} "
        f"{record['live_bytes'] / GIB:>9.2f} {record['live_arrays']:>7d} {record['sampled_peak'] / GIB:>11.2f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="activitynet", choices=("activitynet", "msrvtt"))
    parser.add_argument("--train_videos", type=int, default=64, help="training videos (batch 32: 2 steps)")
    parser.add_argument("--eval_videos", type=int, default=32, help="val (and test) videos")
    parser.add_argument("--text_vlad_clusters", type=int, default=4, help="0: the reference model size")
    parser.add_argument("--kill_rss_gib", type=float, default=18.0)
    parser.add_argument("--dir", default="", help="where to write release and runs (default: a temporary folder)")
    parser.add_argument("--verbose", action="store_true", help="print each phase as it happens")
    parser.add_argument("extra", nargs="*", help="more flags for tt_jax.main (after --)")
    args = parser.parse_args()

    sys.path.insert(0, str(REPO))
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    overrides = {"text_vlad_clusters": args.text_vlad_clusters} if args.text_vlad_clusters else {}
    config = _load_config(args.dataset, overrides)
    with tempfile.TemporaryDirectory(dir=args.dir or None) as folder:
        data_dir = f"{folder}/data"
        _write_release(config, data_dir, args.dataset, args.train_videos, args.eval_videos)
        budget = _budget(config, data_dir)
        result = run_recipe(args, data_dir, f"{folder}/run", overrides)

    total = budget["student_state"] + budget["teachers"] + budget["features"]
    print(
        f"{args.dataset}: {args.train_videos} train / {args.eval_videos} val videos, student "
        f"{budget['student_params'] / 1e6:.1f}M params, teachers "
        f"{', '.join(f'{count / 1e6:.1f}M' for count in budget['teacher_params'])}; "
        f"exit {result['returncode']}{' (killed above the limit)' if result['killed'] else ''}, "
        f"{result['seconds']:.0f} s\n"
    )
    header = f"{'time s':>7}  {'phase':<40} {'RSS GiB':>8} {'live GiB':>9} {'arrays':>7} {'peak so far':>11}"
    print(header)
    print("-" * len(header))
    for record in result["phases"]:
        print(_phase_row(record))
    base = result["phases"][0]["rss"] if result["phases"] else 0
    print()
    print(f"student state  {budget['student_state'] / GIB:8.2f} GiB (params, gradients, two moments)")
    print(f"teachers       {budget['teachers'] / GIB:8.2f} GiB")
    print(f"features       {budget['features'] / GIB:8.2f} GiB")
    print(f"budget         {total / GIB:8.2f} GiB")
    print(f"base RSS       {base / GIB:8.2f} GiB (before the recipe)")
    print(f"peak RSS       {result['peak'] / GIB:8.2f} GiB")
    print(f"peak / budget  {result['peak'] / total:8.2f}")
    print(f"peak - base / budget {(result['peak'] - base) / total:8.2f}")
    if result["returncode"] != 0:
        print("\nthe recipe failed; the end of its log:\n" + result["tail"], file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        child_main(json.loads(sys.argv[2]))
    else:
        main()
