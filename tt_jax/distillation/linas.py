"""LINAS's relational distillation with its masks (silenceFS/LINAS model.py and trainer.py,
commit c9e459a; spec sections 4.3-4.4). With s = S - Phi(S_t) entrywise and h the Huber loss:

  diag   sum_i h(s_ii)                 the positives only (the released train_all.sh)
  full   sum_ij h(s_ij)
  adapt  B sum_ij W_ij h(s_ij)         W = softmax over each caption's videos of
                                       M = p1 I + p2 (1 1^T - I): weight e^p1 / (e^p1 + (B-1) e^p2)
                                       on the positive, e^p2 / (...) on each negative; p1 = p2 = 1
                                       at the start (W = 1/B: the full sum).

The adaptive mask is learnt by EM: the student's steps hold W fixed (no gradient); once per epoch
an M-step on one validation batch (every embedding detached) takes Adam steps (lr 1e-3, gradient
clipped at norm 2) on (p1, p2) for

    B sum_ij W_ij h(s_ij) / (|Phi(S_t)_ij| + 1e-6),

which moves weight toward whichever group, positives or negatives, the student matches best
relative to the teacher. The released code builds the mask once from (p1, p2) and never rebuilds
it, so its "adapt" trains with W = 1/B throughout; and its student step never calls zero_grad(),
so the student is optimised with the running sum of its gradients. Both are fixed by default
(`rebuild_mask`, and `zero_gradients` of either LINAS term, applied by the run's optimiser:
`tt_jax.optim.accumulated_gradients`); setting either to False reproduces the released code.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from tt_jax.distillation.view import aggregate, distance
from tt_jax.parallel import first_local_row, sum_over_devices

LINAS_MASKS = ("diag", "full", "adapt")
INITIAL_MASK_PARAMETERS = (1.0, 1.0)  # pa1, pa2 in model.py
RELATIVE_ERROR_EPS = 1e-6  # train_mask's |s^T| + 1e-6
MASK_GRADIENT_CLIP = 2.0  # trainer.py clip_grad_norm_(..., 2)


def adaptive_weights(parameters: jax.Array, rows: int, videos: int, first_row=0) -> jax.Array:
    """[rows, videos] W: softmax over the videos of M = p1 on the positive, p2 elsewhere (no gradient)."""
    parameters = jax.lax.stop_gradient(parameters)
    positive = (first_row + jnp.arange(rows))[:, None] == jnp.arange(videos)[None, :]
    return jax.nn.softmax(jnp.where(positive, parameters[0], parameters[1]), axis=1)


def positive_weight(parameters: jax.Array, videos: int) -> jax.Array:
    """W's weight on each caption's own video, e^p1 / (e^p1 + (B - 1) e^p2) (1/B at the start)."""
    return adaptive_weights(parameters, 1, videos)[0, 0]


def effective_parameters(state, rebuild_mask: bool) -> jax.Array:
    """The (p1, p2) the student's steps weight with: the learnt ones, or with the released code's
    mask that is never rebuilt, the initial ones."""
    return state["parameters"] if rebuild_mask else jnp.asarray(INITIAL_MASK_PARAMETERS, jnp.float32)


def _huber_rows(student, teachers, aggregation, delta):
    target = jax.lax.stop_gradient(aggregate(teachers, aggregation))
    return distance(student - target, "huber", delta), target


def linas_relational_loss(student, teachers, *, mask="diag", aggregation="mean", delta=1.0, mask_parameters=None):
    """The whole-array L_Drel; S [B, B] (captions x videos), teachers [T, B, B]."""
    per_entry, _ = _huber_rows(student, teachers, aggregation, delta)
    batch = student.shape[0]
    if mask == "diag":
        return jnp.sum(jnp.diagonal(per_entry))
    if mask == "full":
        return jnp.sum(per_entry)
    if mask == "adapt":
        parameters = jnp.asarray(INITIAL_MASK_PARAMETERS if mask_parameters is None else mask_parameters)
        return batch * jnp.sum(adaptive_weights(parameters, batch, batch) * per_entry)
    raise ValueError(f"unknown LINAS mask {mask!r}; choose one of {LINAS_MASKS}")


def mask_objective(parameters, student, teachers, *, aggregation="mean", delta=1.0, first_row=0, videos=None):
    """The M-step objective B sum W h(s) / (|Phi| + 1e-6), differentiable in `parameters` only
    (rows [b, B] give their share of it; whole matrices the whole)."""
    per_entry, target = _huber_rows(jax.lax.stop_gradient(student), teachers, aggregation, delta)
    rows, batch = student.shape
    positive = (first_row + jnp.arange(rows))[:, None] == jnp.arange(batch)[None, :]
    weights = jax.nn.softmax(jnp.where(positive, parameters[0], parameters[1]), axis=1)
    return batch * jnp.sum(weights * per_entry / (jnp.abs(target) + RELATIVE_ERROR_EPS))


def mask_optimizer(learning_rate: float) -> optax.GradientTransformation:
    return optax.chain(optax.clip_by_global_norm(MASK_GRADIENT_CLIP), optax.adam(learning_rate))


def initial_mask_state(learning_rate: float) -> dict:
    parameters = jnp.asarray(INITIAL_MASK_PARAMETERS, jnp.float32)
    return {"parameters": parameters, "optimizer": mask_optimizer(learning_rate).init(parameters)}


def linas_relational_share(view, state=None, *, mask="diag", aggregation="mean", delta=1.0, rebuild_mask=True):
    """This device's share of L_Drel (the adapt mask's parameters come from `state`)."""
    per_entry, _ = _huber_rows(view.rows, view.teacher_rows(), aggregation, delta)
    rows, batch = per_entry.shape
    first_row = first_local_row(rows)
    if mask == "diag":
        positive = (first_row + jnp.arange(rows))[:, None] == jnp.arange(batch)[None, :]
        return jnp.sum(jnp.where(positive, per_entry, 0.0))
    if mask == "full":
        return jnp.sum(per_entry)
    parameters = effective_parameters(state, rebuild_mask)
    return batch * jnp.sum(adaptive_weights(parameters, rows, batch, first_row) * per_entry)


def mask_step(state, view, *, learning_rate, steps=1, aggregation="mean", delta=1.0):
    """The M-step on one (validation) batch: `steps` clipped Adam steps on (p1, p2)."""
    rows = view.rows.shape[0]
    first_row = first_local_row(rows)
    teachers = view.teacher_rows()
    optimizer = mask_optimizer(learning_rate)

    def one_step(_, state):
        share_gradient = jax.grad(mask_objective)(
            state["parameters"], view.rows, teachers, aggregation=aggregation, delta=delta, first_row=first_row
        )
        gradient = sum_over_devices(share_gradient)
        updates, opt_state = optimizer.update(gradient, state["optimizer"], state["parameters"])
        return {"parameters": optax.apply_updates(state["parameters"], updates), "optimizer": opt_state}

    return jax.lax.fori_loop(0, steps, one_step, state)
