"""DL-DKD++'s batch-matrix KL distillation (HuiGuanLab/DL-DKD, branch master, commit d5ed153,
method/model.py::compute_kl_loss(mode="batch_score"); spec section 3.8):

    L = KL_batchmean(softmax_row(Phi(S_t) / T) || softmax_row(S / T))
      + KL_batchmean(softmax_row(Phi(S_t)^T / T) || softmax_row(S^T / T)),   T = 0.2,

the first over each caption's distribution over videos, the second over each video's distribution
over captions; batchmean divides each by B. With a DL-DKD weight of 0.1 and its schedules
(`tt_jax.distillation.schedules`), this is the drop-in alternative to TeachText's Huber.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from tt_jax.distillation.view import aggregate
from tt_jax.parallel import DATA_AXIS, sum_over_devices

KL_DIRECTIONS = ("both", "rows", "columns")


def kl_batch_loss(student, teachers, *, temperature=0.2, aggregation="mean", directions="both"):
    """The whole-array loss; S [B, B], teachers [T, B, B]."""
    target = jax.lax.stop_gradient(aggregate(teachers, aggregation)) / temperature
    logits = student / temperature
    batch = student.shape[0]
    total = jnp.zeros((), jnp.float32)
    for axis, direction in ((1, "rows"), (0, "columns")):
        if directions in ("both", direction):
            log_p = jax.nn.log_softmax(target, axis=axis)
            log_q = jax.nn.log_softmax(logits, axis=axis)
            p = jnp.exp(log_p)
            total = total + jnp.sum(jnp.where(p > 0, p * (log_p - log_q), 0.0)) / batch
    return total


def _column_log_softmax(local_logits):
    """log_softmax over the rows of every device: the column's log-sum-exp from a psum of
    exponentials shifted by the (gradient-free) column maximum over devices."""
    shift = jax.lax.pmax(jnp.max(jax.lax.stop_gradient(local_logits), axis=0), DATA_AXIS)
    total = sum_over_devices(jnp.sum(jnp.exp(local_logits - shift[None, :]), axis=0))
    return local_logits - (shift + jnp.log(total))[None, :]


def kl_batch_share(view, *, temperature=0.2, aggregation="mean", directions="both"):
    """This device's share: its rows' KL, and its rows' part of every column's KL."""
    target = jax.lax.stop_gradient(aggregate(view.teacher_rows(), aggregation)) / temperature
    logits = view.rows / temperature
    share = jnp.zeros((), jnp.float32)
    if directions in ("both", "rows"):
        log_p, log_q = jax.nn.log_softmax(target, axis=1), jax.nn.log_softmax(logits, axis=1)
        p = jnp.exp(log_p)
        share = share + jnp.sum(jnp.where(p > 0, p * (log_p - log_q), 0.0))
    if directions in ("both", "columns"):
        log_p, log_q = _column_log_softmax(target), _column_log_softmax(logits)
        p = jnp.exp(log_p)
        share = share + jnp.sum(jnp.where(p > 0, p * (log_p - log_q), 0.0))
    return share / view.global_batch
