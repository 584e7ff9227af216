"""What a distillation term sees on one device of the sharded step, and the math they share.

Inside the step's `jax.shard_map` each device holds b = B / N captions (one per video) and
computes their [b, B] similarity rows against every video of the global batch. A term receives a
`StepView` of those rows, this device's embeddings and the teachers', and returns its share of a
scalar: the objective sums the shares over devices (`psum`), so N devices give what one gives.
Terms that need more than their rows (columns, every row's embedding, a global mean) ask for it
with the explicit collectives of `tt_jax.parallel`.
"""

from __future__ import annotations

from typing import Optional

import flax
import jax
import jax.numpy as jnp

# torch.nn.functional.normalize's eps: a vector shorter than this is divided by it instead.
NORMALIZE_EPS = 1e-12


@flax.struct.dataclass
class TeacherView:
    """One teacher on this device; every array is under stop_gradient.

    rows: [b, B] its similarity rows S_t. text / video: expert -> [b, D] its per-expert caption and
    video embeddings (None for a teacher that has none).
    """

    rows: jax.Array
    text: Optional[dict] = None
    video: Optional[dict] = None


@flax.struct.dataclass
class StudentView:
    """The student's embeddings on this device (one caption per video): text / video expert ->
    [b, D], mixture weights [b, M], availability [b, M], in `expert_names` order."""

    text: dict
    video: dict
    moe_weights: jax.Array
    availability: jax.Array


@flax.struct.dataclass
class StepView:
    """Everything a term may read. rows: the student's [b, B] rows S (gradients flow into it)."""

    rows: jax.Array
    student: StudentView
    teachers: tuple
    expert_names: tuple = flax.struct.field(pytree_node=False, default=())
    keep_missing_modalities: bool = flax.struct.field(pytree_node=False, default=False)

    @property
    def global_batch(self) -> int:
        return self.rows.shape[1]

    @property
    def local_rows(self) -> int:
        return self.rows.shape[0]

    def teacher_rows(self) -> jax.Array:
        """[T, b, B] every teacher's rows."""
        return jnp.stack([teacher.rows for teacher in self.teachers])


TEACHER_AGGREGATIONS = ("mean", "min", "max")
DISTANCES = ("huber", "l1", "l2")


def aggregate(teacher_similarities: jax.Array, aggregation: str) -> jax.Array:
    """Phi over a [T, ...] stack of teacher similarities: elementwise mean (TeachText), min or max."""
    if aggregation == "mean":
        return jnp.sum(teacher_similarities, axis=0) / teacher_similarities.shape[0]
    if aggregation == "min":
        return jnp.min(teacher_similarities, axis=0)
    if aggregation == "max":
        return jnp.max(teacher_similarities, axis=0)
    raise ValueError(f"unknown teacher aggregation {aggregation!r}; choose one of {TEACHER_AGGREGATIONS}")


def distance(difference: jax.Array, kind: str = "huber", delta: float = 1.0) -> jax.Array:
    """Elementwise distance of a difference x: "huber" h_delta(x) (0.5 x^2 where |x| <= delta,
    delta (|x| - delta / 2) beyond; torch SmoothL1Loss for delta = 1), "l1" |x|, "l2" 0.5 x^2
    (spec section 2.4 item 2: the Huber loss's quadratic part, so huber with a large delta is l2)."""
    if kind == "huber":
        magnitude = jnp.abs(difference)
        quadratic = jnp.minimum(magnitude, delta)
        return 0.5 * quadratic * quadratic + delta * (magnitude - quadratic)
    if kind == "l1":
        return jnp.abs(difference)
    if kind == "l2":
        return 0.5 * difference * difference
    raise ValueError(f"unknown distance {kind!r}; choose one of {DISTANCES}")


def safe_normalize(x: jax.Array, axis: int = -1) -> jax.Array:
    """x / max(||x||, 1e-12) along `axis` (torch F.normalize), with finite gradients at x = 0:
    a zero vector stays zero and passes no gradient."""
    squared = jnp.sum(x * x, axis=axis, keepdims=True)
    positive = squared > 0
    norm = jnp.sqrt(jnp.where(positive, squared, 1.0))
    return x / jnp.where(positive, jnp.maximum(norm, NORMALIZE_EPS), NORMALIZE_EPS)


def kl_rows(target_logits: jax.Array, student_logits: jax.Array, axis: int = -1) -> jax.Array:
    """KL(softmax(target) || softmax(student)) along `axis`, 0 where the target's probability is 0
    (torch kl_div's xlogy convention), so that -inf (masked) target logits give no NaN."""
    log_p = jax.nn.log_softmax(target_logits, axis=axis)
    log_q = jax.nn.log_softmax(student_logits, axis=axis)
    p = jnp.exp(log_p)
    return jnp.sum(jnp.where(p > 0, p * (log_p - log_q), 0.0), axis=axis)


def concatenated(embeddings: dict, experts) -> jax.Array:
    """[n, sum D] of the per-expert embeddings, in `experts` order."""
    return jnp.concatenate([embeddings[name] for name in experts], axis=-1)
