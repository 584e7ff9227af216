"""The training objective on a device mesh: ranking loss + distillation terms, as sums of row blocks.

Each device holds b = B / N videos of the global batch. It embeds them (BatchNorm statistics
averaged over devices), computes its [b, B] rows of the student and teacher matrices against the
all-gathered videos, and its share of each loss; the shares are summed over devices. N devices
therefore compute what one device computes on the whole batch (tested for N = 1, 2, 4, 8).

The distillation is the run's list of terms (`tt_jax.distillation`): each gets a `StepView` of
what the step has and returns its share; the total is

    ranking + sum over terms of weight_t(step) * term_t,

and each term's value (and scheduled weight) is reported beside the loss.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec

from tt_jax import losses
from tt_jax.distillation import linas
from tt_jax.distillation.terms import DistillationTerm, initial_distillation_state, parse_terms
from tt_jax.distillation.view import StepView, StudentView
from tt_jax.errors import UserInputError
from tt_jax.models import CENet, Embeddings
from tt_jax.parallel import DATA_AXIS, first_local_row, gather_rows, sum_over_devices
from tt_jax.teachers import Teacher, model_text, similarity_rows, teacher_view


def teachtext_terms() -> tuple[DistillationTerm, ...]:
    """TeachText's own distillation: Huber (delta 1) towards the teachers' mean, weight 1."""
    return parse_terms([{"method": "teachtext"}])


@dataclasses.dataclass(frozen=True)
class ObjectiveOptions:
    """Loss settings; defaults are the reference's (trainer/trainer.py, model/loss.py).

    terms: the distillation terms; None means TeachText's when there are teachers (and none
    without). steps_per_epoch: what an epoch is to the terms' weight schedules (needed when a
    term has one).
    """

    margin: float
    fix_norm: bool = True
    terms: Optional[tuple[DistillationTerm, ...]] = None
    steps_per_epoch: Optional[int] = None

    def __post_init__(self):
        if not self.margin >= 0:
            raise ObjectiveConfigError(f"the margin must be a non-negative number, got {self.margin}")
        scheduled = [term.name for term in self.terms or () if term.scheduled]
        if scheduled and not self.steps_per_epoch:
            raise ObjectiveConfigError(f"the terms {scheduled} follow a weight schedule: give steps_per_epoch")


class ObjectiveConfigError(UserInputError):
    """Loss settings that name no loss."""


def _student_view(embeddings: Embeddings) -> StudentView:
    """One caption per video: the K axis (1 in training) averaged, as the similarity rows are."""
    return StudentView(
        text={name: jnp.mean(value, axis=1) for name, value in embeddings.text.items()},
        video=dict(embeddings.video),
        moe_weights=jnp.mean(embeddings.moe_weights, axis=1),
        availability=embeddings.availability,
    )


def _step_view(rows, embeddings: Embeddings, model_config, teachers, teacher_variables, batch) -> StepView:
    """What the terms see on this device: the student's rows and embeddings, every teacher's view."""
    return StepView(
        rows=rows,
        student=_student_view(embeddings),
        teachers=tuple(teacher_view(t, teacher_variables.get(t.name), batch) for t in teachers),
        expert_names=tuple(model_config.expert_names),
        keep_missing_modalities=model_config.keep_missing_modalities,
    )


def _resolved_terms(options: ObjectiveOptions, teachers) -> tuple[DistillationTerm, ...]:
    if options.terms is not None:
        return tuple(options.terms)
    return teachtext_terms() if teachers else ()


def make_objective(
    student: CENet,
    teachers: Sequence[Teacher],
    options: ObjectiveOptions,
    mesh: Mesh,
    *,
    student_text: str,
) -> Callable[..., tuple[jax.Array, tuple[dict, Any]]]:
    """objective(params, batch_stats, teacher_variables, batch, step=0, distillation_state=None)
    -> (total, (scalars, batch_stats)).

    `student` must be built with axis_name="data" (BatchNorm synchronised over the mesh).
    batch holds global batch-sharded arrays: "experts", "availability", "text" (text embedding
    name -> [B, 1, N, D], N the longest length any model reads) and, for precomputed teachers,
    "teacher_embeddings". teacher_variables: {teacher name: variables} for the live teachers
    (replicated). step: the optimiser step (the terms' schedules read it); distillation_state:
    `initial_distillation_state(terms)` as the train state carries it.
    """
    if student.axis_name != DATA_AXIS:
        raise ValueError(f"the student must be built with axis_name={DATA_AXIS!r} to train on a mesh")
    teachers = tuple(teachers)
    terms = _resolved_terms(options, teachers)

    def local_objective(params, batch_stats, teacher_variables, batch, step, distillation_state):
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
        scalars = {"ranking_loss": ranking}
        total = ranking
        if terms:
            view = _step_view(rows, embeddings, student.config, teachers, teacher_variables, batch)
            distillation = jnp.zeros((), jnp.float32)
            for term in terms:
                value = sum_over_devices(term.share(view, distillation_state.get(term.name)))
                weight = term.weight_at(step, options.steps_per_epoch or 1)
                scalars[f"distill/{term.name}"] = value
                if term.scheduled:
                    scalars[f"distill_weight/{term.name}"] = weight
                if term.has_state:  # the adaptive mask's weight on the positives, as the step used it
                    parameters = linas.effective_parameters(distillation_state[term.name], term.settings["rebuild_mask"])
                    scalars[f"distill_mask/{term.name}"] = linas.positive_weight(parameters, global_batch)
                distillation = distillation + weight * value
            scalars["distillation_loss"] = distillation
            total = total + distillation
        return total, (scalars, new_state["batch_stats"])

    replicated, sharded = PartitionSpec(), PartitionSpec(DATA_AXIS)
    sharded_objective = jax.shard_map(
        local_objective,
        mesh=mesh,
        in_specs=(replicated, replicated, replicated, sharded, replicated, replicated),
        out_specs=(replicated, (replicated, replicated)),
    )

    def objective(params, batch_stats, teacher_variables, batch, step=0, distillation_state=None):
        state = initial_distillation_state(terms) if distillation_state is None else distillation_state
        return sharded_objective(params, batch_stats, teacher_variables, batch, jnp.asarray(step, jnp.int32), state)

    return objective


def make_epoch_update(
    student: CENet, teachers: Sequence[Teacher], options: ObjectiveOptions, mesh: Mesh, *, student_text: str
) -> Optional[Callable]:
    """update(params, batch_stats, teacher_variables, batch, distillation_state) -> distillation_state:
    the once-per-epoch step of the stateful terms (the adaptive LINAS mask's M-step, on a
    validation batch, the student in eval mode, every embedding detached); None if no term has state."""
    terms = [term for term in _resolved_terms(options, teachers) if term.has_state]
    if not terms:
        return None
    teachers = tuple(teachers)

    def local_update(params, batch_stats, teacher_variables, batch, distillation_state):
        embeddings = student.apply(
            {"params": params, "batch_stats": batch_stats},
            batch["experts"],
            batch["availability"],
            model_text(batch, student_text, student.config),
            train=False,
        )
        rows = jax.lax.stop_gradient(similarity_rows(embeddings, student.config))
        view = _step_view(rows, embeddings, student.config, teachers, teacher_variables, batch)
        updated = dict(distillation_state)
        for term in terms:
            settings = term.settings
            updated[term.name] = linas.mask_step(
                distillation_state[term.name], view, learning_rate=settings["mask_learning_rate"],
                steps=settings["mask_steps"], aggregation=settings["aggregation"], delta=settings["delta"],
            )
        return updated

    replicated, sharded = PartitionSpec(), PartitionSpec(DATA_AXIS)
    return jax.jit(
        jax.shard_map(
            local_update,
            mesh=mesh,
            in_specs=(replicated, replicated, replicated, sharded, replicated),
            out_specs=replicated,
        )
    )
