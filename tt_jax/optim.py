"""The reference optimisers (RAdam, Ranger) and learning-rate decay, as optax transformations.

The reference (albanie/collaborative-experts) trains CE with `utils/ranger.py::Ranger` and
CE+ / TeachText with `utils/radam.py::RAdam`, and multiplies the learning rate by 0.95 once per
epoch (`StepLR(step_size=1, gamma=0.95)`). Here:

    radam  = chain(scale_by_reference_radam(), decay_then_step(lr, wd))
    ranger = chain(scale_by_reference_radam(b1=0.95, eps=1e-5, strict threshold),
                   decay_then_step(lr, wd), per_parameter_lookahead(6, 0.5))
    adam, adamw = the optax building blocks with torch's weight-decay conventions

Three pieces are custom because the optax ones do not reproduce the reference:

- `scale_by_reference_radam`: `optax.scale_by_radam` puts eps inside the bias correction
  (m_hat / (sqrt(v_hat) + eps)) while the reference adds eps to the raw sqrt(v); it counts steps
  globally where the reference counts per parameter; and it computes the rectification term rho_t
  in float32 with a cancellation (its rectification factor is 1.2 % off at t = 6) where the
  reference uses float64. Here rho_t comes from a cancellation-free series and matches float64
  to float32 precision.
- `decay_then_step`: rounds the decoupled decay and the step separately, in the reference's order,
  where `chain(add_decayed_weights, scale_by_learning_rate)` sums them first. With it the
  12-step RAdam trajectory fixture is reproduced bit for bit (4 ulps of drift without it).
- `per_parameter_lookahead`: `optax.lookahead` turns the parameters into `LookaheadParams(fast,
  slow)`, so every consumer of the parameters (loss, evaluation, checkpoints, weight conversion)
  would need a Ranger special case, and it counts steps globally. The reference keeps the slow
  weights in the optimiser state and counts steps per parameter; so does this one. The parameters
  the model trains on and is evaluated with are therefore always the plain parameter tree (the
  reference's `p.data`, i.e. the fast weights).

Missing gradients. The reference skips a parameter whose `.grad` is None: no decay, no moment
update, its own step counter does not advance. JAX always produces a gradient (zero for unused
parameters), so "no gradient" is said explicitly: the update functions of `radam` and `ranger`
accept an optional keyword `has_grad`, a pytree with the structure of the parameters whose leaves
are boolean scalars (Python bools or traced `bool[]`). Where a leaf is False its update is zero
and its state (moments, step counter, lookahead counter and slow weights) is kept. A zero
gradient is a gradient: moments decay, the step advances and decay applies, as in the reference.
Omitting `has_grad` means every parameter has a gradient. The learning-rate schedule counts global
steps, as the reference scheduler does.

Usage in a train step (all of it jit-compatible):

    tx = build_optimizer("radam", epoch_decay_schedule(1e-3, 0.95, steps_per_epoch), 1e-5)
    opt_state = tx.init(params)
    updates, opt_state = tx.update(grads, opt_state, params)   # params are required
    # or, with parameters known to have no gradient: tx.update(..., has_grad={...: False, ...})
    params = optax.apply_updates(params, updates)
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from tt_jax.errors import UserInputError


class OptimizerConfigError(UserInputError):
    """An optimiser name or schedule setting that describes no optimiser."""

# Reference `utils/radam.py` defaults (the TeachText configs pass only lr and weight_decay).
RADAM_B1 = 0.9
RADAM_B2 = 0.999
RADAM_EPS = 1e-8
# "N_sma >= 5" in `utils/radam.py`; the RAdam paper (Liu et al., ICLR 2020, Alg. 2) uses rho_t > 4.
RADAM_THRESHOLD = 5.0

# Reference `utils/ranger.py` defaults: betas (.95, 0.999), eps 1e-5, N_sma_threshhold 5 compared
# with a strict `>`, lookahead k = 6, alpha = 0.5.
RANGER_B1 = 0.95
RANGER_B2 = 0.999
RANGER_EPS = 1e-5
RANGER_THRESHOLD = 5.0
RANGER_SYNC_PERIOD = 6
RANGER_SLOW_STEP_SIZE = 0.5

# B_2k / (2k)! for k = 1..6 (Bernoulli numbers B_2..B_12): the Taylor coefficients of
# y / expm1(y) and of (a/2) coth(a/2), used by `radam_rectification`.
_BERNOULLI_OVER_FACTORIAL = (
    1.0 / 12.0,
    -1.0 / 720.0,
    1.0 / 30240.0,
    -1.0 / 1209600.0,
    1.0 / 47900160.0,
    -691.0 / 1307674368000.0,
)
# The series is used for x = t * log(1/b2) <= 1; there its truncation error is < 1e-10 relative.
# Beyond, rho_inf - 2t / expm1(x) loses at most 2 bits to cancellation.
_SERIES_LIMIT = 1.0


class RAdamRectification(NamedTuple):
    """Per-step RAdam scalars, as the reference's `N_sma` / `step_size` (float32)."""

    rho: jax.Array  # N_sma = rho_t, the length of the approximated SMA
    step_size: jax.Array  # multiplies m / (sqrt(v) + eps) if rectified, m otherwise
    rectified: jax.Array  # bool: rho_t >= threshold (> threshold when strict)


class ReferenceRAdamState(NamedTuple):
    """State of `scale_by_reference_radam`; every field has the structure of the parameters."""

    count: Any  # int32[] per parameter: its own step counter t (reference `state['step']`)
    mu: Any  # float32, first moment m (reference `exp_avg`)
    nu: Any  # float32, second moment v (reference `exp_avg_sq`)


class PerParameterLookaheadState(NamedTuple):
    """State of `per_parameter_lookahead`; both fields have the structure of the parameters."""

    count: Any  # int32[] per parameter: steps taken (reference Ranger `state['step']`)
    slow: Any  # slow weights (reference Ranger `state['slow_buffer']`)


def radam_rectification(
    step: jax.typing.ArrayLike,
    b1: float = RADAM_B1,
    b2: float = RADAM_B2,
    threshold: float = RADAM_THRESHOLD,
    strict_threshold: bool = False,
) -> RAdamRectification:
    """RAdam's rho_t and step size at (1-based) step t, accurate to float32 precision.

    rho_inf = 2/(1-b2) - 1 and rho_t = rho_inf - 2 t b2^t / (1-b2^t) (Liu et al., ICLR 2020,
    Alg. 2). Rectified: step_size =
    sqrt((1-b2^t) (rho_t-4)(rho_t-2) rho_inf / ((rho_inf-4)(rho_inf-2) rho_t)) / (1-b1^t);
    otherwise step_size = 1 / (1-b1^t) (reference `utils/radam.py`).

    Evaluated literally in float32, rho_t is the small difference of two numbers near rho_inf
    (~2000 for b2 = 0.999), which costs ~8 bits. With a = -log(b2) and x = a t the difference
    has the closed form rho_t = t - (2/a) sum_k B_2k/(2k)! (x^2k - a^2k), which is used for x <= 1
    and has no cancellation; 1 - b^t is computed as -expm1(t log b).

    Args:
      step: int or int array, the step count t >= 1 (any shape).
      b1, b2: the moment decay rates.
      threshold: rectify when rho_t >= threshold (RAdam) or rho_t > threshold (Ranger, strict).
      strict_threshold: use `>` instead of `>=`.
    Returns:
      RAdamRectification of float32 arrays (bool for `rectified`) with the shape of `step`.
    """
    t = jnp.asarray(step).astype(jnp.float32)
    a = -math.log(b2)
    x = t * a
    one_minus_b2t = -jnp.expm1(-x)
    one_minus_b1t = -jnp.expm1(t * math.log(b1))

    rho_inf = 2.0 / (1.0 - b2) - 1.0
    x_squared = jnp.square(jnp.minimum(x, _SERIES_LIMIT))
    series = jnp.zeros_like(t)
    x_power = jnp.ones_like(t)
    for k, coefficient in enumerate(_BERNOULLI_OVER_FACTORIAL, start=1):
        x_power = x_power * x_squared
        series = series + coefficient * (x_power - a ** (2 * k))
    rho_series = t - (2.0 / a) * series
    rho_direct = rho_inf - 2.0 * t / jnp.expm1(x)
    rho = jnp.where(x <= _SERIES_LIMIT, rho_series, rho_direct)

    rectified = rho > threshold if strict_threshold else rho >= threshold
    constant = rho_inf / ((rho_inf - 4.0) * (rho_inf - 2.0))
    safe_rho = jnp.maximum(rho, threshold)  # keeps the unused branch finite
    rectified_size = jnp.sqrt(
        one_minus_b2t * (safe_rho - 4.0) * (safe_rho - 2.0) / safe_rho * constant
    ) / one_minus_b1t
    step_size = jnp.where(rectified, rectified_size, 1.0 / one_minus_b1t)
    return RAdamRectification(rho=rho, step_size=step_size, rectified=rectified)


def _where_present(has_grad, new_tree, old_tree):
    """Leaves of `new_tree` where the parameter has a gradient, of `old_tree` elsewhere."""
    if has_grad is None:
        return new_tree
    return jax.tree.map(lambda h, new, old: jnp.where(h, new, old), has_grad, new_tree, old_tree)


def _zero_where_missing(has_grad, updates):
    """`updates` with the leaves of parameters without a gradient set to zero."""
    return _where_present(has_grad, updates, jax.tree.map(jnp.zeros_like, updates))


def scale_by_reference_radam(
    b1: float = RADAM_B1,
    b2: float = RADAM_B2,
    eps: float = RADAM_EPS,
    threshold: float = RADAM_THRESHOLD,
    strict_threshold: bool = False,
) -> optax.GradientTransformationExtraArgs:
    """The RAdam direction of the reference `utils/radam.py` (before decay and learning rate).

    Per parameter, in float32 (the reference keeps float32 state whatever the parameter dtype):
      v <- b2 v + (1-b2) g^2 ;  m <- b1 m + (1-b1) g ;  t <- t + 1
      direction = step_size(t) * m / (sqrt(v) + eps)   if rectified(t)
                  step_size(t) * m                     otherwise
    with step_size / rectified from `radam_rectification`. Unlike `optax.scale_by_radam`, eps is
    added to sqrt(v) itself (not to the bias-corrected sqrt(v_hat)), the step counter is per
    parameter, and rho_t is accurate (see `radam_rectification`).

    The update accepts the keyword `has_grad` (see the module docstring): where False, the
    direction is zero and the parameter's moments and counter are left as they were.
    """

    def init_fn(params):
        return ReferenceRAdamState(
            count=jax.tree.map(lambda _: jnp.zeros([], jnp.int32), params),
            mu=jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), jnp.float32), params),
            nu=jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), jnp.float32), params),
        )

    def leaf_update(grad, mu, nu, step_size, rectified):
        grad32 = grad.astype(jnp.float32)
        # Python-float scalars become float32 constants, as the reference's `(1 - beta)`.
        nu = b2 * nu + ((1.0 - b2) * grad32) * grad32
        mu = b1 * mu + (1.0 - b1) * grad32
        normalised = jnp.where(rectified, mu / (jnp.sqrt(nu) + eps), mu)
        return (step_size * normalised).astype(grad.dtype), mu, nu

    def update_fn(updates, state, params=None, *, has_grad=None, **extra_args):
        del params, extra_args
        treedef = jax.tree.structure(updates)
        if treedef.num_leaves == 0:
            return updates, state
        count = jax.tree.map(lambda c: c + 1, state.count)
        # The per-step scalars of all parameters in one vector op. Each parameter then finds its
        # scalars by looking its count up in that vector: slicing at the parameter's position
        # instead would put a different constant in every parameter's fused kernel, and XLA
        # compiles each unique kernel separately (twice the compile time on a 122-leaf model).
        all_counts = jnp.stack(treedef.flatten_up_to(count))
        rect = radam_rectification(all_counts, b1, b2, threshold, strict_threshold)

        def scalars_for(leaf_count):
            position = jnp.argmax(all_counts == leaf_count)
            return rect.step_size[position], rect.rectified[position]

        step_size, rectified = jax.tree.transpose(
            treedef, jax.tree.structure((0, 0)), jax.tree.map(scalars_for, count)
        )
        per_leaf = jax.tree.map(leaf_update, updates, state.mu, state.nu, step_size, rectified)
        direction, mu, nu = jax.tree.transpose(treedef, jax.tree.structure((0, 0, 0)), per_leaf)
        new_state = ReferenceRAdamState(
            count=_where_present(has_grad, count, state.count),
            mu=_where_present(has_grad, mu, state.mu),
            nu=_where_present(has_grad, nu, state.nu),
        )
        return _zero_where_missing(has_grad, direction), new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


class DecayThenStepState(NamedTuple):
    """State of `decay_then_step`."""

    count: jax.Array  # int32[]: updates so far, all parameters together (the lr schedule's step)


def decay_then_step(
    learning_rate: optax.ScalarOrSchedule, weight_decay: float = 0.0
) -> optax.GradientTransformationExtraArgs:
    """Last stage of reference RAdam / Ranger: decoupled weight decay, then the step.

    Per parameter, with d the incoming direction (`scale_by_reference_radam`):
      decayed = p + (-weight_decay * lr) * p ;  stepped = decayed + (-lr) * d
    and the update is stepped - p, which `optax.apply_updates` turns back into `stepped` exactly
    whenever p and stepped are within a factor 2 of each other (Sterbenz), i.e. almost always.

    Why not `chain(add_decayed_weights(wd), scale_by_learning_rate(lr))`: that computes
    p + (-lr) * (d + wd * p), one rounding where the reference (`utils/radam.py`) rounds the decay
    and the step separately; on the RAdam trajectory fixture it drifts by up to 4 float32 ulps in
    12 steps, this stage reproduces every step bit for bit.

    lr is `learning_rate(count)` for a schedule (count = updates taken so far, global as the
    reference scheduler), and the decay applies to every parameter (BN and biases included).
    Where `has_grad` is False the update is zero: no decay, no step (the reference skips
    `grad is None`).
    """

    def init_fn(params):
        del params
        return DecayThenStepState(count=jnp.zeros([], jnp.int32))

    def update_fn(updates, state, params=None, *, has_grad=None, **extra_args):
        del extra_args
        if params is None:
            raise ValueError("decay_then_step needs the parameters: update(grads, state, params)")
        lr = learning_rate(state.count) if callable(learning_rate) else learning_rate
        # For a Python-float lr this is float32(-wd * lr) of a float64 product, as the reference.
        decay_factor = -weight_decay * lr

        def leaf_update(direction, param):
            decayed = param + decay_factor * param
            stepped = decayed + (-lr) * direction
            return (stepped - param).astype(direction.dtype)

        new_updates = jax.tree.map(leaf_update, updates, params)
        return _zero_where_missing(has_grad, new_updates), DecayThenStepState(state.count + 1)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def per_parameter_lookahead(
    sync_period: int = RANGER_SYNC_PERIOD,
    slow_step_size: float = RANGER_SLOW_STEP_SIZE,
) -> optax.GradientTransformationExtraArgs:
    """Lookahead (Zhang et al. 2019) with the slow weights in the state, as reference Ranger.

    Must come last in a chain (it turns the final update into a jump to the slow weights).
    Per parameter, after its t-th update (t counted per parameter):
      fast = params + updates
      if t % sync_period == 0:  slow <- slow + slow_step_size * (fast - slow);  fast <- slow
    The slow weights start equal to the initial parameters. Where `has_grad` is False the update is
    zero and the counter and slow weights are kept.
    """
    if sync_period < 1:
        raise ValueError(f"sync_period must be >= 1, got {sync_period}")

    def init_fn(params):
        return PerParameterLookaheadState(
            count=jax.tree.map(lambda _: jnp.zeros([], jnp.int32), params),
            # A copy: donating params and state to a jitted step must not donate one buffer twice.
            slow=jax.tree.map(lambda p: jnp.array(p, copy=True), params),
        )

    def leaf_update(update, param, slow, count):
        count = count + 1
        fast = param + update
        sync = count % sync_period == 0
        synced_slow = slow + slow_step_size * (fast - slow)
        new_slow = jnp.where(sync, synced_slow, slow)
        new_update = jnp.where(sync, synced_slow - param, update)
        return new_update.astype(update.dtype), new_slow, count

    def update_fn(updates, state, params=None, *, has_grad=None, **extra_args):
        del extra_args
        if params is None:
            raise ValueError("per_parameter_lookahead needs the parameters: update(g, s, params)")
        per_leaf = jax.tree.map(leaf_update, updates, params, state.slow, state.count)
        new_updates, slow, count = jax.tree.transpose(
            jax.tree.structure(updates), jax.tree.structure((0, 0, 0)), per_leaf
        )
        new_state = PerParameterLookaheadState(
            count=_where_present(has_grad, count, state.count),
            slow=_where_present(has_grad, slow, state.slow),
        )
        return _zero_where_missing(has_grad, new_updates), new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def radam(
    learning_rate: optax.ScalarOrSchedule,
    weight_decay: float = 0.0,
    b1: float = RADAM_B1,
    b2: float = RADAM_B2,
    eps: float = RADAM_EPS,
    threshold: float = RADAM_THRESHOLD,
    strict_threshold: bool = False,
) -> optax.GradientTransformationExtraArgs:
    """Reference `utils/radam.py::RAdam` (as the TeachText configs use it).

    Decoupled weight decay on every parameter (BN scales and biases included), then the RAdam
    step: p <- p - lr wd p ; p <- p - lr * direction (`scale_by_reference_radam`,
    `decay_then_step`). Accepts `has_grad` (see the module docstring).
    """
    return optax.chain(
        scale_by_reference_radam(b1, b2, eps, threshold, strict_threshold),
        decay_then_step(learning_rate, weight_decay),
    )


def ranger(
    learning_rate: optax.ScalarOrSchedule,
    weight_decay: float = 0.0,
    b1: float = RANGER_B1,
    b2: float = RANGER_B2,
    eps: float = RANGER_EPS,
    threshold: float = RANGER_THRESHOLD,
    sync_period: int = RANGER_SYNC_PERIOD,
    slow_step_size: float = RANGER_SLOW_STEP_SIZE,
) -> optax.GradientTransformationExtraArgs:
    """Reference `utils/ranger.py::Ranger` (the CE configs): RAdam + per-parameter lookahead.

    RAdam with b1 0.95, eps 1e-5 and a strict `rho_t > 5` threshold; weight decay is decoupled and
    applied before the RAdam step exactly as in `utils/radam.py`
    (`p_data_fp32.add_(-weight_decay * lr, p_data_fp32)`); then every `sync_period` steps of a
    parameter its slow weights move half-way to the fast ones and the fast weights jump there.
    The parameters to train on and evaluate with are the plain parameter tree (the fast weights,
    the reference's `p.data`). Accepts `has_grad` (see the module docstring).
    """
    return optax.chain(
        scale_by_reference_radam(b1, b2, eps, threshold, strict_threshold=True),
        decay_then_step(learning_rate, weight_decay),
        per_parameter_lookahead(sync_period, slow_step_size),
    )


def _rejecting_has_grad(tx: optax.GradientTransformation, name: str):
    """`tx` with an update that refuses `has_grad` instead of silently ignoring it."""
    tx = optax.with_extra_args_support(tx)

    def update_fn(updates, state, params=None, *, has_grad=None, **extra_args):
        if has_grad is not None:
            raise ValueError(f"optimiser {name!r} does not support has_grad; use radam or ranger")
        return tx.update(updates, state, params, **extra_args)

    return optax.GradientTransformationExtraArgs(tx.init, update_fn)


def adam(
    learning_rate: optax.ScalarOrSchedule,
    weight_decay: float = 0.0,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
) -> optax.GradientTransformationExtraArgs:
    """torch.optim.Adam: weight decay is an L2 term added to the gradient (coupled)."""
    return _rejecting_has_grad(
        optax.chain(
            optax.add_decayed_weights(weight_decay),
            optax.scale_by_adam(b1=b1, b2=b2, eps=eps),
            optax.scale_by_learning_rate(learning_rate),
        ),
        "adam",
    )


def adamw(
    learning_rate: optax.ScalarOrSchedule,
    weight_decay: float = 0.0,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
) -> optax.GradientTransformationExtraArgs:
    """torch.optim.AdamW: decoupled weight decay p <- p - lr * wd * p on every parameter."""
    return _rejecting_has_grad(
        optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay), "adamw"
    )


_OPTIMIZERS = {"adam": adam, "adamw": adamw, "radam": radam, "ranger": ranger}


def build_optimizer(
    name: str,
    learning_rate: optax.ScalarOrSchedule,
    weight_decay: float = 0.0,
    **kwargs,
) -> optax.GradientTransformationExtraArgs:
    """The optimiser called `name` (case-insensitive, so the reference's "RAdam" / "Ranger" work).

    kwargs go to the builder (`radam`, `ranger`, `adam`, `adamw`), e.g. b1, eps.
    """
    builder = _OPTIMIZERS.get(name.lower())
    if builder is None:
        valid = ", ".join(sorted(_OPTIMIZERS))
        raise OptimizerConfigError(f"unknown optimiser {name!r}; valid names: {valid}")
    return builder(learning_rate, weight_decay, **kwargs)


# Reference `configs/base_config.json`: StepLR(step_size=1, gamma=0.95), stepped once per epoch.
REFERENCE_LR_GAMMA = 0.95


def epoch_decay_schedule(
    base_lr: float, gamma: float = REFERENCE_LR_GAMMA, steps_per_epoch: int = 1
) -> optax.Schedule:
    """lr(step) = base_lr * gamma ** (step // steps_per_epoch): StepLR stepped after every epoch.

    `step` is the number of optimiser updates already taken (optax's schedule count), so every
    update of epoch n (0-based) uses base_lr * gamma**n. steps_per_epoch is the number of batches
    per epoch, the last partial batch included (the reference uses drop_last=False).
    """
    if steps_per_epoch < 1:
        raise OptimizerConfigError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}")
    return optax.exponential_decay(
        init_value=base_lr, transition_steps=steps_per_epoch, decay_rate=gamma, staircase=True
    )


def accumulated_gradients() -> optax.GradientTransformation:
    """Hands on the sum of every gradient so far instead of this step's: what a PyTorch loop that
    never calls `optimizer.zero_grad()` optimises with (LINAS's released trainer, spec 4.4).
    Kept only to reproduce that code (the LINAS terms' `zero_gradients=False`)."""

    def init(params):
        return jax.tree.map(jnp.zeros_like, params)

    def update(updates, state, params=None):
        del params
        total = jax.tree.map(jnp.add, state, updates)
        return total, total

    return optax.GradientTransformation(init, update)
