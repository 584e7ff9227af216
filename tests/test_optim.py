"""Tests for tt_jax.optim: reference RAdam / Ranger, missing gradients, epoch lr decay.

Fixture-driven tests check what each fixture in the folder records: a trajectory with any
number of parameters and steps, a model fixture's recorded gradients.
"""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from reference_fixtures import MODEL, OPTIMIZER, discover, write_fixture
from tt_jax import optim

# Reference RAdam as the TeachText configs use it (radam_trajectory.json "hyper_parameters").
TT_LR = 1e-3
TT_WEIGHT_DECAY = 1e-5
# Reference Ranger as the CE configs use it (base_config.json: lr 0.1, weight decay 1e-3).
CE_LR = 0.1
CE_WEIGHT_DECAY = 1e-3

# Updated parameters must agree to this relative error (project tolerance is 1e-4; never loosen).
PARAM_RTOL = 1e-6


def max_relative_error(ours, reference, before=None) -> float:
    """max |ours - reference| / |reference|; with `before`, relative to max(|reference|, |before|).

    Pass the parameter before the step where p - lr * g nearly cancels: there the result is a few
    ulps of the operands but can be many ulps of itself, whichever rounding order is used.
    """
    ours = np.asarray(ours, np.float64)
    reference = np.asarray(reference, np.float64)
    scale = np.abs(reference)
    if before is not None:
        scale = np.maximum(scale, np.abs(np.asarray(before, np.float64)))
    scale = np.maximum(scale, np.finfo(np.float32).tiny)
    return float(np.max(np.abs(ours - reference) / scale))


def max_error_relative_to_scale(ours, reference) -> float:
    """max |ours - reference| / max |reference| over the tensor.

    For optimiser moments: each is a sum of terms of both signs, so an entry can cancel to near
    zero, where one ulp of its terms is many ulps of itself.
    """
    ours, reference = np.asarray(ours, np.float64), np.asarray(reference, np.float64)
    scale = max(float(np.max(np.abs(reference), initial=0.0)), np.finfo(np.float32).tiny)
    return float(np.max(np.abs(ours - reference), initial=0.0)) / scale


def jitted_step(tx):
    """One jitted optimiser step: (params, state, grads, has_grad) -> (params, state)."""

    @jax.jit
    def step(params, state, grads, has_grad):
        updates, state = tx.update(grads, state, params, has_grad=has_grad)
        return optax.apply_updates(params, updates), state

    return step


OPTIMIZER_FIXTURES = discover(OPTIMIZER)
MODEL_FIXTURES = discover(MODEL)
# What a trajectory fixture records for each parameter pI (radam_trajectory.json "arrays").
TRAJECTORY_ARRAYS = (
    "init", "grads", "grad_is_none", "after", "exp_avg_final", "exp_avg_sq_final",
    "state_step_final",
)
SCHEDULE_ARRAYS = ("N_sma", "step_size", "rectified")


@dataclasses.dataclass(frozen=True)
class Trajectory:
    """An optimiser trajectory fixture: whatever parameters and number of steps it records."""

    name: str
    arrays: dict
    meta: dict
    names: tuple[str, ...]
    steps: int


def load_trajectory(fixture) -> Trajectory:
    """The fixture's parameters and step count, checked for a consistent layout."""
    arrays, meta = fixture.arrays(), fixture.meta()
    names = tuple(sorted(key[: -len("/init")] for key in arrays if key.endswith("/init")))
    assert names, f"{fixture.name}: no parameter trajectory (pI/init)"
    missing = [f"{n}/{a}" for n in names for a in TRAJECTORY_ARRAYS if f"{n}/{a}" not in arrays]
    missing += [f"schedule/{a}" for a in SCHEDULE_ARRAYS if f"schedule/{a}" not in arrays]
    assert not missing, f"{fixture.name}: missing arrays {missing}"
    per_step = ("grads", "grad_is_none", "after")
    rows = {f"{n}/{a}": len(arrays[f"{n}/{a}"]) for n in names for a in per_step}
    rows.update({f"schedule/{a}": len(arrays[f"schedule/{a}"]) for a in SCHEDULE_ARRAYS})
    steps = set(rows.values())
    assert len(steps) == 1 and min(steps) >= 1, f"{fixture.name}: inconsistent step counts {rows}"
    (steps,) = steps
    recorded_steps = meta.get("spec", {}).get("steps", steps)
    assert recorded_steps == steps, f"{fixture.name}: spec.steps {recorded_steps}, {steps} recorded"
    return Trajectory(fixture.name, arrays, meta, names, steps)


@functools.lru_cache(maxsize=None)
def trajectory_radam(lr, weight_decay, b1, b2, eps):
    """(RAdam, its jitted step), built once per setting so trajectories of equal shapes share a
    compilation."""
    tx = optim.radam(lr, weight_decay, b1=b1, b2=b2, eps=eps)
    return tx, jitted_step(tx)


def replay_trajectory(trajectory: Trajectory):
    """Our RAdam over the fixture's gradients: (params after each step, final state)."""
    arrays, hyper = trajectory.arrays, trajectory.meta["hyper_parameters"]
    b1, b2 = hyper["betas"]
    tx, step = trajectory_radam(hyper["lr"], hyper["weight_decay"], b1, b2, hyper["eps"])
    names = trajectory.names
    params = {name: jnp.asarray(arrays[f"{name}/init"]) for name in names}
    state = tx.init(params)
    history = []
    for t in range(trajectory.steps):
        has_grad = {name: jnp.asarray(not arrays[f"{name}/grad_is_none"][t]) for name in names}
        # Rows of missing gradients are NaN in the file; has_grad says they are absent.
        grads = {
            name: jnp.asarray(np.nan_to_num(arrays[f"{name}/grads"][t], nan=0.0)) for name in names
        }
        params, state = step(params, state, grads, has_grad)
        history.append(jax.device_get(params))
    return history, state


def check_every_step(trajectory: Trajectory, replayed) -> None:
    history, _ = replayed
    assert len(history) == trajectory.steps
    for t, params in enumerate(history, start=1):
        for name in trajectory.names:
            after = trajectory.arrays[f"{name}/after"]
            before = trajectory.arrays[f"{name}/init"] if t == 1 else after[t - 2]
            error = max_relative_error(params[name], after[t - 1], before=before)
            assert error <= PARAM_RTOL, f"{name} after step {t}: max relative error {error:.3g}"


def check_final_moments_and_step_counters(trajectory: Trajectory, replayed) -> None:
    _, state = replayed
    radam_state = state[0]
    assert isinstance(radam_state, optim.ReferenceRAdamState)
    arrays = trajectory.arrays
    for name in trajectory.names:
        assert int(radam_state.count[name]) == int(arrays[f"{name}/state_step_final"]), name
        for ours, key in ((radam_state.mu, "exp_avg_final"), (radam_state.nu, "exp_avg_sq_final")):
            error = max_error_relative_to_scale(ours[name], arrays[f"{name}/{key}"])
            assert error <= PARAM_RTOL, f"{name}/{key}: error relative to its scale {error:.3g}"


def check_rectification_schedule(trajectory: Trajectory) -> None:
    """Our rectification terms at the fixture's global steps equal its float64 values."""
    arrays = trajectory.arrays
    b1, b2 = trajectory.meta["hyper_parameters"]["betas"]
    steps = jnp.arange(1, trajectory.steps + 1)
    schedule = jax.jit(lambda t: optim.radam_rectification(t, b1, b2))(steps)
    np.testing.assert_allclose(schedule.rho, arrays["schedule/N_sma"], rtol=1e-6)
    np.testing.assert_allclose(schedule.step_size, arrays["schedule/step_size"], rtol=1e-6)
    np.testing.assert_array_equal(schedule.rectified, arrays["schedule/rectified"])


def test_fixture_folder_holds_an_optimiser_trajectory():
    assert OPTIMIZER_FIXTURES, "no optimiser fixture (schedule/* + pI/init) in the fixture folder"


@pytest.fixture(scope="module", params=OPTIMIZER_FIXTURES, ids=lambda f: f.name)
def trajectory(request) -> Trajectory:
    return load_trajectory(request.param)


@pytest.fixture(scope="module")
def replayed_trajectory(trajectory):
    return replay_trajectory(trajectory)


def test_radam_reproduces_every_step_of_the_reference_trajectory(trajectory, replayed_trajectory):
    check_every_step(trajectory, replayed_trajectory)


def test_radam_final_moments_and_per_parameter_step_counters_match(trajectory, replayed_trajectory):
    check_final_moments_and_step_counters(trajectory, replayed_trajectory)


def test_rectification_schedule_matches_the_reference_float64_values(trajectory):
    check_rectification_schedule(trajectory)


# ----- Regression: a shorter trajectory (fewer parameters, fewer steps) ------------------------


def numpy_reference_moments(trajectory: Trajectory, name: str, steps: int):
    """(exp_avg, exp_avg_sq, own step count) of `name` after `steps` steps, in numpy as the
    fixture's `algorithm` describes them: float32 state, a missing gradient leaves all three
    unchanged. The reference's torch kernels fuse `m*b1 + (1-b1)*g` and `v*b2 + ((1-b2)*g)*g` into
    one rounding (fused multiply-add), emulated here by adding in float64 and rounding once."""
    b1, b2 = trajectory.meta["hyper_parameters"]["betas"]
    # 1 - beta is formed in float64 and then rounded, as the reference passes it to torch.
    one_minus_b1, one_minus_b2 = np.float32(1 - b1), np.float32(1 - b2)
    m = np.zeros_like(trajectory.arrays[f"{name}/init"])
    v = np.zeros_like(m)
    count = 0
    for t in range(steps):
        if trajectory.arrays[f"{name}/grad_is_none"][t]:
            continue
        g = trajectory.arrays[f"{name}/grads"][t].astype(np.float64)
        decayed_m = (m * np.float32(b1)).astype(np.float64)
        decayed_v = (v * np.float32(b2)).astype(np.float64)
        m = (decayed_m + np.float64(one_minus_b1) * g).astype(np.float32)
        scaled_g = (one_minus_b2 * g.astype(np.float32)).astype(np.float64)
        v = (decayed_v + scaled_g * g).astype(np.float32)
        count += 1
    return m, v, count


def truncated_trajectory_arrays(trajectory: Trajectory, names, steps) -> dict:
    """The fixture's arrays for the first `steps` steps of `names`, with the final optimiser state
    at that step from `numpy_reference_moments`."""
    arrays = {}
    for name in names:
        m, v, count = numpy_reference_moments(trajectory, name, steps)
        arrays[f"{name}/init"] = trajectory.arrays[f"{name}/init"]
        for key in ("grads", "grad_is_none", "after"):
            arrays[f"{name}/{key}"] = trajectory.arrays[f"{name}/{key}"][:steps]
        arrays[f"{name}/exp_avg_final"], arrays[f"{name}/exp_avg_sq_final"] = m, v
        arrays[f"{name}/state_step_final"] = np.asarray(count, np.int64)
    for key in SCHEDULE_ARRAYS:
        arrays[f"schedule/{key}"] = trajectory.arrays[f"schedule/{key}"][:steps]
    return arrays


def test_numpy_reference_moments_reproduce_the_recorded_final_state(trajectory):
    """The derivation the shorter trajectory relies on, checked on the full recorded one."""
    arrays = trajectory.arrays
    for name in trajectory.names:
        m, v, count = numpy_reference_moments(trajectory, name, trajectory.steps)
        assert count == int(arrays[f"{name}/state_step_final"]), name
        for ours, key in ((m, "exp_avg_final"), (v, "exp_avg_sq_final")):
            assert max_error_relative_to_scale(ours, arrays[f"{name}/{key}"]) <= PARAM_RTOL, key


@pytest.fixture(scope="module")
def shorter_trajectory_source() -> Trajectory:
    if not OPTIMIZER_FIXTURES:
        pytest.skip("no optimiser trajectory in the fixture folder to derive from")
    source = load_trajectory(OPTIMIZER_FIXTURES[0])
    if len(source.names) < 2 or source.steps < 2:
        size = f"{len(source.names)} params, {source.steps} steps"
        pytest.skip(f"{source.name} is too short to shorten ({size})")
    return source


def test_a_shorter_trajectory_is_checked_on_what_it_holds_and_a_perturbed_copy_fails(
    shorter_trajectory_source, tmp_path
):
    """Half the parameters for just over half the steps (so still both RAdam branches), written
    and discovered like any trajectory fixture."""
    source = shorter_trajectory_source
    names, steps = source.names[: max(1, len(source.names) // 2)], source.steps // 2 + 1
    arrays = truncated_trajectory_arrays(source, names, steps)
    spec = dict(source.meta.get("spec", {}), steps=steps)
    if "params" in spec:
        spec["params"] = spec["params"][: len(names)]
    shapes = {key: value for key, value in source.meta.get("shapes", {}).items() if key in arrays}
    meta = dict(source.meta, spec=spec, shapes=shapes)
    first = names[0]
    perturbed = dict(arrays)
    perturbed[f"{first}/after"] = np.array(arrays[f"{first}/after"])
    last = perturbed[f"{first}/after"][steps - 1].reshape(-1)
    last[0] += 100 * PARAM_RTOL * float(np.max(np.abs(last)))
    write_fixture(tmp_path, "shorter", arrays, meta)
    write_fixture(tmp_path, "shorter_perturbed", perturbed, meta)

    found = {fixture.name: load_trajectory(fixture) for fixture in discover(OPTIMIZER, tmp_path)}
    assert sorted(found) == ["shorter", "shorter_perturbed"]
    shorter = found["shorter"]
    assert (len(shorter.names), shorter.steps) == (len(names), steps)
    assert len(shorter.names) < len(source.names) and shorter.steps < source.steps
    replayed = replay_trajectory(shorter)
    check_every_step(shorter, replayed)
    check_final_moments_and_step_counters(shorter, replayed)
    check_rectification_schedule(shorter)

    moved = found["shorter_perturbed"]
    with pytest.raises(AssertionError, match=f"{first} after step {steps}: max relative error"):
        check_every_step(moved, replay_trajectory(moved))
    moved_final_state = {
        f"{first}/exp_avg_sq_final": lambda v: v + 100 * PARAM_RTOL * np.max(np.abs(v)),
        f"{first}/state_step_final": lambda v: v + 1,
    }
    for key, change in moved_final_state.items():
        moved_arrays = {**shorter.arrays, key: change(shorter.arrays[key])}
        moved_state = dataclasses.replace(shorter, arrays=moved_arrays)
        with pytest.raises(AssertionError):
            check_final_moments_and_step_counters(moved_state, replayed)


def test_a_trajectory_with_inconsistent_step_counts_is_refused(trajectory, tmp_path):
    arrays = dict(trajectory.arrays)
    arrays[f"{trajectory.names[0]}/after"] = arrays[f"{trajectory.names[0]}/after"][:-1]
    with pytest.raises(AssertionError, match="inconsistent step counts"):
        load_trajectory(write_fixture(tmp_path, "inconsistent", arrays, trajectory.meta))


def reference_rectification_float64(t, b1, b2, threshold, strict):
    """(rho_t, step_size) in float64, literally as written in reference utils/radam.py."""
    rho_inf = 2.0 / (1.0 - b2) - 1.0
    b2_t = b2**t
    rho = rho_inf - 2.0 * t * b2_t / (1.0 - b2_t)
    rectified = rho > threshold if strict else rho >= threshold
    if rectified:
        r = (1 - b2_t) * (rho - 4) / (rho_inf - 4) * (rho - 2) / rho * rho_inf / (rho_inf - 2)
        return rho, math.sqrt(r) / (1.0 - b1**t), True
    return rho, 1.0 / (1.0 - b1**t), False


@pytest.mark.parametrize("b1, b2", [(0.9, 0.999), (0.95, 0.999), (0.9, 0.99), (0.9, 0.9999)])
def test_rectification_is_float32_accurate_for_long_runs(b1, b2):
    # A literal float32 evaluation (as in optax.scale_by_radam) is ~0.7 % off in rho_t at t = 6.
    steps = np.unique(np.concatenate([np.arange(1, 2500), np.geomspace(1, 1e7, 100).astype(int)]))
    ours = jax.jit(lambda t: optim.radam_rectification(t, b1, b2))(jnp.asarray(steps))
    expected = np.array(
        [reference_rectification_float64(int(t), b1, b2, 5.0, False) for t in steps]
    )
    np.testing.assert_allclose(ours.rho, expected[:, 0], rtol=1e-6)
    np.testing.assert_allclose(ours.step_size, expected[:, 1], rtol=1e-6)
    np.testing.assert_array_equal(ours.rectified, expected[:, 2].astype(bool))


def test_first_radam_step_is_decay_plus_plain_sgd():
    # t = 1: rho_1 = 1 < 5, m = (1-b1) g, step_size = 1/(1-b1): p <- p (1 - lr wd) - lr g.
    rng = np.random.default_rng(0)
    params = {
        "w": rng.normal(size=(7, 3)).astype(np.float32),
        "b": rng.normal(size=(3,)).astype(np.float32),
    }
    grads = {k: rng.normal(scale=0.1, size=v.shape).astype(np.float32) for k, v in params.items()}
    tx = optim.radam(TT_LR, TT_WEIGHT_DECAY)
    updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    new_params = optax.apply_updates(params, updates)
    for key in params:
        p = params[key].astype(np.float64)
        expected = p * (1.0 - TT_LR * TT_WEIGHT_DECAY) - TT_LR * grads[key].astype(np.float64)
        assert max_relative_error(new_params[key], expected) <= PARAM_RTOL, key


@pytest.mark.parametrize("fixture", MODEL_FIXTURES, ids=lambda f: f.name)
def test_one_step_on_the_model_fixture_matches_after_step(fixture):
    """The fixture's own gradients through our optimiser give its recorded parameters."""
    meta, data = fixture.meta(), fixture.arrays()
    optimizer_config = meta["effective_config"]["optimizer"]
    names = [key[len("grads/") :] for key in data if key.startswith("grads/")]
    if not names:
        pytest.skip(f"{fixture.name} records no gradients")
    unmatched = [n for n in names if f"params/{n}" not in data or f"after_step/{n}" not in data]
    assert not unmatched, f"gradients without params/ or after_step/ entries: {unmatched}"
    params = {name: data[f"params/{name}"] for name in names}
    grads = {name: data[f"grads/{name}"] for name in names}
    after = {name: data[f"after_step/{name}"] for name in names}
    args = optimizer_config["args"]
    tx = optim.build_optimizer(optimizer_config["type"], args["lr"], args.get("weight_decay", 0.0))
    updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    new_params = jax.device_get(optax.apply_updates(params, updates))
    for name in names:
        error = max_relative_error(new_params[name], after[name], before=params[name])
        assert error <= PARAM_RTOL, f"{name}: max relative error {error:.3g}"


def test_missing_gradient_freezes_parameter_and_state_but_zero_gradient_does_not():
    params = {"missing": np.full((3,), 2.0, np.float32), "zero": np.full((3,), 2.0, np.float32)}
    tx = optim.ranger(CE_LR, CE_WEIGHT_DECAY)
    state = tx.init(params)
    step = jitted_step(tx)
    warm_grads = {k: np.full((3,), 0.5, np.float32) for k in params}
    params, state = step(params, state, warm_grads, {"missing": True, "zero": True})
    zero_grads = {k: np.zeros((3,), np.float32) for k in params}
    new_params, new_state = step(params, state, zero_grads, {"missing": False, "zero": True})

    np.testing.assert_array_equal(new_params["missing"], params["missing"])
    radam_before, radam_after = state[0], new_state[0]
    assert int(radam_after.count["missing"]) == int(radam_before.count["missing"]) == 1
    np.testing.assert_array_equal(radam_after.mu["missing"], radam_before.mu["missing"])
    np.testing.assert_array_equal(radam_after.nu["missing"], radam_before.nu["missing"])
    lookahead_before, lookahead_after = state[2], new_state[2]
    assert int(lookahead_after.count["missing"]) == int(lookahead_before.count["missing"]) == 1
    np.testing.assert_array_equal(lookahead_after.slow["missing"], lookahead_before.slow["missing"])
    # A zero gradient is a gradient: the step advances, the moments decay, the parameter moves.
    assert int(radam_after.count["zero"]) == 2
    np.testing.assert_allclose(radam_after.mu["zero"], 0.95 * radam_before.mu["zero"], rtol=1e-6)
    assert np.all(np.asarray(new_params["zero"]) != np.asarray(params["zero"]))


# ----- Ranger against an independent float64 numpy implementation ------------------------------


def numpy_ranger(
    initial, grads, has_grad, lr, weight_decay, b1=0.95, b2=0.999, eps=1e-5, k=6, alpha=0.5
):
    """Ranger (reference utils/ranger.py semantics) in float64: one parameter, list of steps."""
    p = initial.astype(np.float64)
    slow = p.copy()
    m = np.zeros_like(p)
    v = np.zeros_like(p)
    t = 0
    trajectory = []
    for g, present in zip(grads, has_grad):
        if present:
            g = g.astype(np.float64)
            m = b1 * m + (1 - b1) * g
            v = b2 * v + (1 - b2) * g * g
            t += 1
            rho, step_size, rectified = reference_rectification_float64(t, b1, b2, 5.0, strict=True)
            p = p - weight_decay * lr * p
            direction = m / (np.sqrt(v) + eps) if rectified else m
            p = p - step_size * lr * direction
            if t % k == 0:
                slow = slow + alpha * (p - slow)
                p = slow.copy()
        trajectory.append(p.copy())
    return trajectory


def test_ranger_matches_an_independent_numpy_ranger():
    rng = np.random.default_rng(7)
    steps = 14
    shapes = {"kernel": (5, 4), "bias": (4,), "scale": (3,)}
    params = {k: rng.normal(scale=0.5, size=s).astype(np.float32) for k, s in shapes.items()}
    grads = [
        {
            k: (rng.normal(size=s) * 10.0 ** rng.uniform(-4, 0)).astype(np.float32)
            for k, s in shapes.items()
        }
        for _ in range(steps)
    ]
    grads[3]["bias"][:] = 0.0  # a zero gradient still counts as a step
    present = [{k: True for k in shapes} for _ in range(steps)]
    # "scale" misses two gradients: its lookahead syncs at its own steps 6 and 12 (global 8, 14).
    present[4]["scale"] = present[9]["scale"] = False

    tx = optim.build_optimizer("ranger", CE_LR, CE_WEIGHT_DECAY)
    step = jitted_step(tx)
    state = tx.init(params)
    ours = []
    current = params
    for t in range(steps):
        current, state = step(current, state, grads[t], present[t])
        ours.append(jax.device_get(current))

    for key in shapes:
        expected = numpy_ranger(
            params[key],
            [g[key] for g in grads],
            [h[key] for h in present],
            CE_LR,
            CE_WEIGHT_DECAY,
        )
        for t in range(steps):
            error = max_relative_error(ours[t][key], expected[t])
            assert error <= PARAM_RTOL, f"{key} after step {t + 1}: max relative error {error:.3g}"
    assert int(state[2].count["scale"]) == steps - 2
    np.testing.assert_allclose(state[2].slow["kernel"], ours[11]["kernel"], rtol=PARAM_RTOL)


# ----- Learning-rate schedule and builders -----------------------------------------------------


@pytest.mark.parametrize("fixture", MODEL_FIXTURES, ids=lambda f: f.name)
def test_epoch_decay_multiplies_lr_by_gamma_once_per_epoch(fixture):
    meta = fixture.meta()["effective_config"]
    if "lr_scheduler" not in meta or "lr_after_first_epoch_scheduler_step" not in meta:
        pytest.skip(f"{fixture.name} records no learning-rate schedule")
    base_lr = meta["optimizer"]["args"]["lr"]
    gamma = meta["lr_scheduler"]["args"]["gamma"]
    steps_per_epoch = 3
    schedule = optim.epoch_decay_schedule(base_lr, gamma, steps_per_epoch)
    for epoch in range(6):
        for step in range(epoch * steps_per_epoch, (epoch + 1) * steps_per_epoch):
            np.testing.assert_allclose(schedule(step), base_lr * gamma**epoch, rtol=1e-6)
    np.testing.assert_allclose(
        schedule(steps_per_epoch), meta["lr_after_first_epoch_scheduler_step"][0], rtol=1e-6
    )


def test_radam_uses_the_scheduled_lr_for_decay_and_step():
    # A zero gradient keeps m = 0, so only the decay acts: p *= 1 - wd * lr(step).
    schedule = optim.epoch_decay_schedule(CE_LR, 0.5, steps_per_epoch=2)
    tx = optim.radam(schedule, CE_WEIGHT_DECAY)
    params = {"w": np.ones((2,), np.float32)}
    state = tx.init(params)
    step = jitted_step(tx)
    expected = 1.0
    for t in range(5):
        params, state = step(params, state, {"w": np.zeros((2,), np.float32)}, None)
        expected *= 1.0 - CE_WEIGHT_DECAY * CE_LR * 0.5 ** (t // 2)
        np.testing.assert_allclose(params["w"], expected, rtol=1e-6)


@pytest.mark.parametrize("name", ["adam", "adamw", "radam", "ranger", "RAdam", "Ranger"])
def test_build_optimizer_runs_every_optimiser_under_jit(name):
    params = {"w": np.ones((3, 2), np.float32)}
    tx = optim.build_optimizer(name, 1e-2, 1e-4)
    grads = {"w": np.full((3, 2), 0.1, np.float32)}
    updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    assert np.all(np.isfinite(updates["w"])) and np.all(np.asarray(updates["w"]) < 0)


def test_adam_rejects_has_grad_instead_of_ignoring_it():
    params = {"w": np.ones((2,), np.float32)}
    tx = optim.build_optimizer("adam", 1e-3)
    with pytest.raises(ValueError, match="has_grad"):
        tx.update(params, tx.init(params), params, has_grad={"w": False})


def test_unknown_optimiser_name_lists_the_valid_ones():
    with pytest.raises(ValueError, match="adam, adamw, radam, ranger"):
        optim.build_optimizer("sgd", 0.1)


def test_accumulated_gradients_hand_on_the_running_sum():
    """A loop that never zeroes its gradients: step t is taken with g_1 + ... + g_t."""
    optimizer = optax.chain(optim.accumulated_gradients(), optax.sgd(0.5))
    params = {"w": jnp.zeros(3)}
    state = optimizer.init(params)
    gradients = [jnp.array([1.0, -2.0, 0.5]), jnp.array([0.25, 1.0, -1.0])]
    expected = params["w"]
    for index, gradient in enumerate(gradients):
        updates, state = optimizer.update({"w": gradient}, state, params)
        params = optax.apply_updates(params, updates)
        expected = expected - 0.5 * sum(gradients[: index + 1])
        np.testing.assert_allclose(params["w"], expected, rtol=1e-6)


def test_only_a_term_that_keeps_the_released_gradients_accumulates_them():
    from test_train import tiny_config
    from tt_jax.trained import run_optimizer

    config = tiny_config()
    plain = run_optimizer(config, 1e-3).init({"w": jnp.zeros(2)})
    with config.unlocked():
        config.distillation.terms = [dict(method="linas_feature", zero_gradients=False)]
    accumulating = run_optimizer(config, 1e-3).init({"w": jnp.zeros(2)})
    assert len(accumulating) == 2 and jax.tree.structure(accumulating[1]) == jax.tree.structure(plain)
    np.testing.assert_array_equal(accumulating[0]["w"], 0.0)
