"""Test-time cost of a TeachVideo student: evaluation time per 1k queries, one expert against all.

    python benchmarks/teachvideo_eval_benchmark.py                     # MSRVTT CE+ sizes, 1k-A (1000 x 1)
    python benchmarks/teachvideo_eval_benchmark.py --videos=300 --repeats=3 --tiny

Two students from configs/msrvtt.py, measured in the same process: the CE+ student reading its
seven experts, and the `teachvideo` student reading one (imagenet.senet154.0), which TeachVideo
trains from teachers reading all seven. Each evaluates a split of `--videos` videos with
`--captions` captions each (default 1000 x 1, MSRVTT's 1k-A test) through `tt_jax.evaluate.Evaluator`:
every video and caption embedded, the [queries, videos] similarity built, every query ranked.
Features are random (timing does not depend on their values). Both are compiled and warmed up
first; they then take turns `--repeats` times and the median turn is kept, so a change of load hits
both alike. "x full" is the student's time over the full student's: what the smaller student saves
at test time, besides extracting six fewer expert features per video (not measured here). On a CPU
only the ratio means something; absolute times are for an accelerator.
"""

from __future__ import annotations

import importlib.util
import pathlib
import statistics
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from tt_jax import parallel  # noqa: E402
from tt_jax.data.feature_store import FeatureStore, TokenTable  # noqa: E402
from tt_jax.evaluate import Evaluator  # noqa: E402
from tt_jax.models import ModelConfig, as_model_config, build_model, count_parameters, init_variables  # noqa: E402

_VIDEOS = flags.DEFINE_integer("videos", 1000, "Videos of the evaluated split.")
_CAPTIONS = flags.DEFINE_integer("captions", 1, "Captions per video (queries = videos x captions).")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Turns per student; the median turn is reported.")
_TINY = flags.DEFINE_boolean("tiny", False, "Shrink the embedding sizes (shared_dim 16) for a smoke test.")


def _msrvtt_config(arg: str | None):
    spec = importlib.util.spec_from_file_location("msrvtt_config", REPO / "configs" / "msrvtt.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def random_store(model: ModelConfig, videos: int, captions: int, seed: int = 0) -> FeatureStore:
    rng = np.random.default_rng(seed)
    experts = {expert.name: rng.normal(size=(videos, *expert.input_shape)).astype(np.float32) for expert in model.experts}
    availability = {expert.name: np.ones(videos, np.float32) for expert in model.experts}
    tokens = rng.normal(size=(videos, captions, model.text_max_tokens, model.text_dim)).astype(np.float32)
    lengths = np.full((videos, captions), model.text_max_tokens)
    return FeatureStore(video_ids=tuple(f"v{i}" for i in range(videos)), experts=experts, availability=availability,
                        text={"text": TokenTable.from_padded(tokens, lengths)})


def main(argv):
    del argv
    students = {}
    for name, arg in (("CE+ (7 experts)", "ce_plus"), ("TeachVideo student (1 expert)", "ce_plus,teachvideo")):
        model = as_model_config(_msrvtt_config(arg).model)
        if _TINY.value:
            model = ModelConfig(**{**model.__dict__, "shared_dim": 16})
        students[name] = model
    # One store holding the union of the experts (the full student's), read by both.
    store = random_store(students["CE+ (7 experts)"], _VIDEOS.value, _CAPTIONS.value)
    mesh = parallel.make_mesh()
    evaluators, variables = {}, {}
    for name, model in students.items():
        network = build_model(model)
        variables[name] = jax.device_put(init_variables(network, jax.random.key(0)), parallel.replicated(mesh))
        evaluators[name] = Evaluator(network, store, "text", mesh=mesh)
        evaluators[name].run(variables[name])  # compile and warm up
    times = {name: [] for name in students}
    for _ in range(_REPEATS.value):
        for name, evaluator in evaluators.items():
            start = time.perf_counter()
            evaluator.run(variables[name])  # ends with the metrics on the host
            times[name].append(time.perf_counter() - start)
    queries = _VIDEOS.value * _CAPTIONS.value
    full = statistics.median(times["CE+ (7 experts)"])
    print(f"{jax.devices()[0].platform}, {len(jax.devices())} device(s); {queries} queries x {_VIDEOS.value} videos; "
          f"median of {_REPEATS.value} turns")
    print("| Student | Parameters | s per 1k queries | x full |")
    print("|---|---|---|---|")
    for name, model in students.items():
        median = statistics.median(times[name])
        print(f"| {name} | {count_parameters(model) / 1e6:.1f}M | {median / queries * 1000:.3f} | {median / full:.2f} |")


if __name__ == "__main__":
    app.run(main)
