"""The TeachText objective on a device mesh: ranking loss + distillation, as sums of row blocks.

Each device holds b = B / N videos of the global batch. It embeds them (BatchNorm statistics
averaged over devices), computes its [b, B] rows of the student and teacher matrices against the
all-gathered videos, and its share of each loss; the shares are summed over devices. N devices
therefore compute what one device computes on the whole batch (tested for N = 1, 2, 4, 8).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec

from tt_jax import losses
from tt_jax.errors import UserInputError
from tt_jax.models import CENet
from tt_jax.parallel import DATA_AXIS, first_local_row, gather_rows, sum_over_devices
from tt_jax.teachers import Teacher, model_text, similarity_rows, teacher_similarity_rows


@dataclasses.dataclass(frozen=True)
class ObjectiveOptions:
    """Loss settings; defaults are the reference's (trainer/trainer.py, model/loss.py)."""

    margin: float
    fix_norm: bool = True
    distillation_weight: float = 1.0
    teacher_aggregation: str = "mean"
    distillation_distance: str = "huber"

    def __post_init__(self):
        if self.teacher_aggregation not in losses.TEACHER_AGGREGATIONS:
            raise ObjectiveConfigError(
                f"unknown teacher aggregation {self.teacher_aggregation!r}; "
                f"choose one of {list(losses.TEACHER_AGGREGATIONS)}"
            )
        if self.distillation_distance not in losses.DISTILLATION_DISTANCES:
            raise ObjectiveConfigError(
                f"unknown distillation distance {self.distillation_distance!r}; "
                f"choose one of {list(losses.DISTILLATION_DISTANCES)}"
            )
        if not (self.margin >= 0 and self.distillation_weight >= 0):
            raise ObjectiveConfigError(
                f"margin and distillation weight must be non-negative numbers, got "
                f"{self.margin} and {self.distillation_weight}"
            )


class ObjectiveConfigError(UserInputError):
    """Loss settings that name no loss."""


def make_objective(
    student: CENet,
    teachers: Sequence[Teacher],
    options: ObjectiveOptions,
    mesh: Mesh,
    *,
    student_text: str,
) -> Callable[..., tuple[jax.Array, tuple[dict, Any]]]:
    """objective(params, batch_stats, teacher_variables, batch) -> (total, (terms, batch_stats)).

    `student` must be built with axis_name="data" (BatchNorm synchronised over the mesh).
    batch holds global batch-sharded arrays: "experts", "availability", "text" (text embedding
    name -> [B, 1, N, D], N the longest length any model reads) and, for precomputed teachers,
    "teacher_embeddings".
    teacher_variables: {teacher name: variables} for the live teachers (replicated).
    """
    if student.axis_name != DATA_AXIS:
        raise ValueError(f"the student must be built with axis_name={DATA_AXIS!r} to train on a mesh")
    teachers = tuple(teachers)

    def local_objective(params, batch_stats, teacher_variables, batch):
        embeddings, new_state = student.apply(
            {"params": params, "batch_stats": batch_stats},
            batch["experts"],
            batch["availability"],
            model_text(batch, student_text, student.config),
            train=True,
            mutable=["batch_stats"],
        )
        rows = similarity_rows(embeddings, student.config)  # [b, B]
        local_rows, global_batch = rows.shape
        first_row = first_local_row(local_rows)
        row_positives = rows[jnp.arange(local_rows), first_row + jnp.arange(local_rows)]
        ranking_sum = losses.ranking_hinge_sum(
            rows, row_positives, gather_rows(row_positives), first_row, options.margin, fix_norm=options.fix_norm
        )
        ranking = sum_over_devices(ranking_sum) / losses.ranking_term_count(global_batch, fix_norm=options.fix_norm)
        terms = {"ranking_loss": ranking}
        total = ranking
        if teachers:
            teacher_rows = jnp.stack(
                [teacher_similarity_rows(t, teacher_variables.get(t.name), batch) for t in teachers]
            )
            target = losses.aggregate_teachers(teacher_rows, options.teacher_aggregation)
            per_entry = losses.distillation_per_entry(rows, target, distance=options.distillation_distance)
            distillation = sum_over_devices(jnp.sum(per_entry)) / (global_batch * global_batch)
            terms["distillation_loss"] = distillation
            total = total + options.distillation_weight * distillation
        return total, (terms, new_state["batch_stats"])

    replicated, sharded = PartitionSpec(), PartitionSpec(DATA_AXIS)
    return jax.shard_map(
        local_objective,
        mesh=mesh,
        in_specs=(replicated, replicated, replicated, sharded),
        out_specs=(replicated, (replicated, replicated)),
    )
