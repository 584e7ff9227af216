"""The teachers evaluated as one model: Phi of their similarity matrices (TeachText Fig 6a, 8b).

What distillation aims at: the student is trained towards Phi(S_1, ..., S_N) of its teachers, so
the retrieval metrics of that matrix itself say how good the target is, and whether the student,
reading one text embedding, gets near an ensemble that reads all of them (the "mean of several
text embeddings at test time" baseline of Fig 5b when the teachers differ only in their text).

The recipe evaluates it after its teachers stage, for two or more live teachers (precomputed ones
have no validation or test embeddings), with the aggregation of the run's teachtext term, and
writes <workdir>/teachers_combined/results.json, which the report reads like any run's.
"""

from __future__ import annotations

import json
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
from absl import logging
from etils import epath

from tt_jax import metrics, parallel
from tt_jax.data.feature_store import FeatureStore
from tt_jax.distillation.view import aggregate
from tt_jax.evaluate import Evaluator
from tt_jax.models import count_parameters
from tt_jax.teachers import LiveTeacher
from tt_jax.trained import write_json

COMBINED_TEACHERS = "teachers_combined"


def combined_metrics(
    teachers: Sequence[LiveTeacher], variables: Mapping[str, Any], store: FeatureStore, *,
    aggregation: str = "mean", mesh=None, chunk_videos: int = 256, first_caption_only: bool = False,
) -> dict:
    """{"t2v", "v2t"} metrics of Phi over the teachers' [V*K, V] eval similarity matrices on `store`.

    The matrices are combined on device as they come (a running sum, min or max), so memory holds
    a few of them whatever the number of teachers."""
    mesh = mesh if mesh is not None else parallel.make_mesh()
    combined = None
    for teacher in teachers:
        evaluator = Evaluator(teacher.model, store, teacher.text_name, mesh=mesh, chunk_videos=chunk_videos,
                              first_caption_only=first_caption_only)
        sims = evaluator.similarity(variables[teacher.name])
        if combined is None:
            combined = sims
        elif aggregation == "mean":
            combined = combined + sims
        else:
            combined = aggregate(jnp.stack([combined, sims]), aggregation)
    if aggregation == "mean":
        combined = combined / len(teachers)
    return dict(metrics.retrieval_metrics(combined, evaluator.query_masks))


def results_path(workdir: epath.Path) -> epath.Path:
    return workdir / COMBINED_TEACHERS / "results.json"


def is_current(workdir: epath.Path, identity: Mapping[str, Any]) -> bool:
    """Whether the combined teachers' results exist for `identity` (aggregation included)."""
    path = results_path(workdir)
    return path.is_file() and json.loads(path.read_text()).get("identity") == json.loads(json.dumps(identity, sort_keys=True))


def aggregation_of(config: Any) -> str:
    """Phi of the run's teachtext term (mean without one)."""
    for term in config.distillation.terms:
        if term.get("method") == "teachtext":
            return term.get("aggregation", "mean")
    return "mean"


def combined_teachers_stage(
    config: Any, entries: Sequence[Any], identity: Mapping[str, Any], workdir: epath.Path, stores: Mapping[str, FeatureStore]
) -> None:
    """Writes <workdir>/teachers_combined/results.json for the live teacher `entries` (their paths
    resolved) unless it exists for the same `identity` (which names the aggregation)."""
    from tt_jax.teachers import load_teachers  # loads checkpoints

    path = results_path(workdir)
    if is_current(workdir, identity):
        return
    aggregation = aggregation_of(config)
    mesh = parallel.make_mesh()
    teachers, variables = load_teachers(config, list(entries), stores["train"], parallel.replicated(mesh))
    results = {"identity": identity, "num_epochs": None, "teachers": [teacher.name for teacher in teachers],
               "num_parameters": sum(count_parameters(teacher.model.config) for teacher in teachers)}
    with jax.default_matmul_precision(config.train.matmul_precision):
        for split in ("val", "test"):
            if split in stores:
                results[split] = combined_metrics(
                    teachers, variables, stores[split], aggregation=aggregation, mesh=mesh,
                    chunk_videos=config.train.eval_chunk_videos,
                    first_caption_only=config.data.val_first_caption_only and split == "val",
                )
    logging.info("the %d teachers combined (%s): test t2v %s", len(teachers), aggregation, results.get("test", {}).get("t2v"))
    if jax.process_index() == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, results)
    parallel.wait_for_every_process("combined teachers written")  # every host reads them for its report
