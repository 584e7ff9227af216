"""Relational knowledge distillation (Park et al., CVPR 2019): match the structure of a batch,
not its points. lenscloth/RKD `metric/loss.py` (RkdDistance, RKdAngle) and `metric/utils.py`
(pdist), commit 0a6c3c0; spec section 5.

  distance  psi_D(i, j) = d_ij / mu, d the pairwise Euclidean distances (squared distance
            clamped at 1e-12 before the root, diagonal 0), mu the mean of the positive d_ij;
            L_D = mean over all N^2 pairs of h_1(psi_D^S - psi_D^T).
  angle     psi_A(a, b, c) = <e_ab, e_ac>, e_ab = normalize(x_b - x_a) (a zero difference stays 0);
            L_A = mean over all N^3 triplets of h_1(psi_A^S - psi_A^T). O(N^3) memory and time.
  weights   lambda_D = 1, lambda_A = 2 (--dist_ratio 1 --angle_ratio 2 in every RKD example).

TeachText's "relational" ablation (spec 2.4.5) applies them to each caption's similarity profile
over the batch's videos (a row of S against a row of Phi(S_t)), which needs no shared embedding
space; the second reading applies them to the concatenated text embeddings, per teacher.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from tt_jax.distillation.view import distance, safe_normalize
from tt_jax.parallel import gather_rows, sum_over_devices

SQUARED_DISTANCE_CLAMP = 1e-12  # metric/utils.py pdist: clamp(min=eps), eps = 1e-12


def pairwise_distances(rows: jax.Array, points: jax.Array, first_row=0) -> jax.Array:
    """RKD pdist of `rows` ([n, D], global indices first_row...) against `points` ([N, D]):
    sqrt(max(|x_i|^2 + |x_j|^2 - 2 x_i.x_j, 1e-12)), 0 where i == j."""
    squared = (
        jnp.sum(rows * rows, axis=1)[:, None] + jnp.sum(points * points, axis=1)[None, :] - 2.0 * rows @ points.T
    )
    distances = jnp.sqrt(jnp.maximum(squared, SQUARED_DISTANCE_CLAMP))
    same = (first_row + jnp.arange(rows.shape[0]))[:, None] == jnp.arange(points.shape[0])[None, :]
    return jnp.where(same, 0.0, distances)


def _normalised_distances(distances: jax.Array, total, count) -> jax.Array:
    return distances / (total / count)


def angles(anchors: jax.Array, points: jax.Array) -> jax.Array:
    """[n, N, N] psi_A(a, b, c) = <normalize(x_b - x_a), normalize(x_c - x_a)> for anchors a."""
    directions = safe_normalize(points[None, :, :] - anchors[:, None, :], axis=-1)
    return jnp.einsum("abd,acd->abc", directions, directions)


# -- whole arrays ----------------------------------------------------------------------------------


def rkd_distance_loss(student: jax.Array, teacher: jax.Array, *, delta: float = 1.0) -> jax.Array:
    """L_D of student [N, D] and teacher [N, D'] points (the teacher under stop_gradient)."""
    teacher = jax.lax.stop_gradient(teacher)
    psi = []
    for points in (student, teacher):
        d = pairwise_distances(points, points)
        positive = d > 0
        psi.append(_normalised_distances(d, jnp.sum(jnp.where(positive, d, 0.0)), jnp.sum(positive)))
    return jnp.mean(distance(psi[0] - psi[1], "huber", delta))


def rkd_angle_loss(student: jax.Array, teacher: jax.Array, *, delta: float = 1.0) -> jax.Array:
    """L_A of student [N, D] and teacher [N, D'] points."""
    teacher = jax.lax.stop_gradient(teacher)
    return jnp.mean(distance(angles(student, student) - angles(teacher, teacher), "huber", delta))


def rkd_loss(student, teacher, *, distance_weight=1.0, angle_weight=2.0, delta=1.0):
    """lambda_D L_D + lambda_A L_A (a zero weight skips its part)."""
    total = 0.0
    if distance_weight:
        total = total + distance_weight * rkd_distance_loss(student, teacher, delta=delta)
    if angle_weight:
        total = total + angle_weight * rkd_angle_loss(student, teacher, delta=delta)
    return jnp.asarray(total, jnp.float32)


# -- a device's share ------------------------------------------------------------------------------


def rkd_share(local_student, local_teacher, first_row, *, distance_weight=1.0, angle_weight=2.0, delta=1.0):
    """This device's share of `rkd_loss` of its rows [b, D] of the N = b * devices points: every
    point is all-gathered (the gradient returns through the gather), the mean mu is a psum."""
    local_teacher = jax.lax.stop_gradient(local_teacher)
    student, teacher = gather_rows(local_student), gather_rows(local_teacher)
    points = student.shape[0]
    share = 0.0
    if distance_weight:
        psi = []
        for rows, every in ((local_student, student), (local_teacher, teacher)):
            d = pairwise_distances(rows, every, first_row)
            positive = d > 0
            total = sum_over_devices(jnp.sum(jnp.where(positive, d, 0.0)))
            psi.append(_normalised_distances(d, total, sum_over_devices(jnp.sum(positive))))
        share = share + distance_weight * jnp.sum(distance(psi[0] - psi[1], "huber", delta)) / points**2
    if angle_weight:
        difference = angles(local_student, student) - angles(local_teacher, teacher)
        share = share + angle_weight * jnp.sum(distance(difference, "huber", delta)) / points**3
    return jnp.asarray(share, jnp.float32)
