"""Parity with the reference implementation on every model fixture in the fixture folder.

Each fixture is a training step recorded from the reference PyTorch code: its config goes through
`tt_jax.interop` (the path a user takes to import a reference config and checkpoint), its
state_dict through the converter, and then our model, losses, gradients, BatchNorm statistics,
optimiser step, eval similarities and metrics must reproduce the recorded numbers. Gradients
and updated parameters come from the production training step (`make_objective` +
`make_train_step` on a device mesh, see `production_train_step`); losses and BatchNorm statistics
are checked from it and from a plain forward pass, which also gives the embeddings and
intermediates. Tolerances: similarities, embeddings, losses <= 1e-5 relative; gradients and
updated parameters <= 1e-4 relative; metrics exact.

A fixture is checked on what it records: every recorded quantity must be one our replay produces
and must match, and a check of a category the fixture holds nothing of is skipped, with the
reason, rather than passed. The `check_*` functions take a `ReplayedStep`, so they run just as
well on a fixture written to a temporary folder: the regression tests at the end do that with
copies of a fixture that lack some categories or have one number moved.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from reference_fixtures import MODEL, Fixture, discover, subtree, write_fixture
from tt_jax import interop, losses, metrics, optim, parallel
from tt_jax.models import build_model, count_parameters
from tt_jax.models.similarity import retrieval_similarity, training_similarity
from tt_jax.objective import ObjectiveOptions, make_objective
from tt_jax.teachers import PrecomputedTeacher
from tt_jax.train import make_train_step
from tt_jax.train_state import TrainState

MODEL_FIXTURES = discover(MODEL)
EMBEDDING_RTOL = 1e-5
GRADIENT_RTOL = 1e-4
BATCH_NORM_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")
STUDENT_TEXT = "student_text"
LOSS_KEYS = {"ranking": "loss_rank", "distillation": "loss_distil", "total": "loss_total"}


def assert_close(actual, expected, rtol, name):
    """|actual - expected| <= rtol * max|expected| over the array (scale-relative tolerance)."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, f"{name}: shape {actual.shape} != {expected.shape}"
    scale = max(float(np.max(np.abs(expected))), np.finfo(np.float32).tiny)
    error = float(np.max(np.abs(actual - expected))) / scale
    assert error <= rtol, f"{name}: relative error {error:.3g} > {rtol:g}"


def assert_recorded_are_produced(recorded, produced, what):
    """A recorded quantity our replay does not produce is a failure, never a silent skip."""
    missing = sorted(set(recorded) - set(produced))
    assert not missing, f"the fixture records {what} that our replay does not produce: {missing}"


@dataclasses.dataclass
class ReplayedStep:
    """Our replay of one fixture next to the recorded arrays (`expected`)."""

    name: str
    expected: dict
    meta: dict
    model_config: object
    has_teachers: bool
    # Plain (unsharded) train-mode forward pass and the loss helpers on its similarity matrix.
    train_sims: np.ndarray
    teacher_target: Optional[np.ndarray]
    loss_terms: dict  # "ranking", "distillation" (with teachers), "total"
    train_text: dict
    train_video: dict
    forward_batch_stats: dict  # reference names
    intermediates: dict  # split -> {fixture act name: value}
    # The production training step.
    step_loss_terms: dict
    grads: dict  # reference names
    after_step: dict  # reference names: params after the optimiser, BN stats after the forward
    # Eval-mode pass from the recorded after_step state; None when the fixture has no eval inputs.
    eval_sims: Optional[np.ndarray]
    eval_text: dict
    eval_video: dict


def _unwrap_sown(tree):
    """Flax's sow stores each value in a 1-tuple; return the values as numpy arrays."""
    if isinstance(tree, tuple) and len(tree) == 1:
        return _unwrap_sown(tree[0])
    if isinstance(tree, dict) or hasattr(tree, "items"):
        return {key: _unwrap_sown(value) for key, value in tree.items()}
    return np.asarray(tree)


def intermediates_by_fixture_name(sown) -> dict[str, np.ndarray]:
    """Our sown intermediates keyed as the fixtures key `*/act/*` (e.g. `ce_mask/audio`).

    The CE module's values ("ce/...") sit at the top level of the fixture layout.
    """
    flat = {}

    def visit(prefix, node):
        if isinstance(node, dict):
            for key, value in node.items():
                visit(f"{prefix}{key}/", value)
        else:
            flat[prefix.rstrip("/")] = node

    visit("", _unwrap_sown(sown))
    return {key.removeprefix("ce/"): value for key, value in flat.items()}


def _recorded_teachers(arrays, meta):
    """The fixture's precomputed teachers and their embeddings in the batch layout, or ((), {}).

    Teacher t's experts are summed in the recorded `distil_order` (or sorted, if not recorded).
    """
    distil = subtree(arrays, "train/in/distil")
    if not distil:
        return (), {}
    stored_order = meta.get("distil_order", {})
    teacher_ids = sorted({key.split("/")[0] for key in distil}, key=lambda t: (len(t), t))
    teachers, embeddings = [], {}
    for teacher_id in teacher_ids:
        recorded = sorted({key.split("/")[1] for key in distil if key.startswith(f"{teacher_id}/")})
        experts = tuple(stored_order.get(teacher_id, recorded))
        name = f"teacher_{teacher_id}"
        teachers.append(PrecomputedTeacher(name, experts))
        embeddings[name] = {
            "text": {e: distil[f"{teacher_id}/{e}/text"] for e in experts},
            "video": {e: distil[f"{teacher_id}/{e}/vid"] for e in experts},
        }
    return tuple(teachers), embeddings


def gradient_recorder() -> optax.GradientTransformation:
    """Passes the gradients on unchanged and keeps them in its state, so a test can read them."""
    return optax.GradientTransformation(
        init=lambda params: jax.tree.map(jnp.zeros_like, params),
        update=lambda updates, state, params=None: (updates, updates),
    )


@functools.lru_cache(maxsize=None)
def production_train_step(model_config, margin, fix_norm, teachers, optimizer_config) -> Callable:
    """run(params, batch_stats, batch) -> (scalars, grads, new params, new batch_stats) through the
    production objective and train step; built once per setting, so fixtures that share a model
    reuse its compilation. All use of the training code's API is here.

    optimizer_config: (name, learning_rate, weight_decay). The mesh has one device: that N
    devices compute what one computes is tested in test_objective.py, and one device compiles
    fastest.
    """
    mesh = parallel.make_mesh(1)
    options = ObjectiveOptions(margin=margin, fix_norm=fix_norm)
    objective = make_objective(
        build_model(model_config, axis_name=parallel.DATA_AXIS),
        teachers,
        options,
        mesh,
        student_text=STUDENT_TEXT,
    )
    name, learning_rate, weight_decay = optimizer_config
    optimizer = optax.chain(gradient_recorder(), optim.build_optimizer(name, learning_rate, weight_decay))
    step = make_train_step(objective, optimizer)

    def run(params, batch_stats, batch):
        state = TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            batch_stats=batch_stats,
            opt_state=optimizer.init(params),
        )
        new_state, scalars = step(
            parallel.put_replicated(state, mesh), parallel.put_replicated({}, mesh),
            parallel.global_batch_from_process_data(batch, mesh),
        )
        new_state, scalars = jax.device_get((new_state, scalars))
        return scalars, new_state.opt_state[0], new_state.params, new_state.batch_stats

    return run


@functools.lru_cache(maxsize=None)
def _forward(model_config, train: bool):
    """Jitted plain forward pass returning (embeddings, mutable collections), per model and mode."""
    model = build_model(model_config)
    mutable = ["batch_stats", "intermediates"] if train else ["intermediates"]

    def forward(variables, experts, availability, text):
        return model.apply(variables, experts, availability, text, train=train, mutable=mutable)

    return jax.jit(forward)


@functools.lru_cache(maxsize=None)
def replay(fixture: Fixture) -> ReplayedStep:
    """Our replay of `fixture` (cached: the parity tests and the regression tests share it)."""
    arrays, meta = fixture.arrays(), fixture.meta()
    reference_config = meta["effective_config"]
    model_config = interop.model_config_from_reference(reference_config)
    hyper = interop.training_hyperparameters_from_reference(reference_config)
    variables = interop.from_reference_state_dict(subtree(arrays, "params"), model_config)
    names = model_config.expert_names
    teachers, teacher_embeddings = _recorded_teachers(arrays, meta) if hyper["distillation"] else ((), {})
    if hyper["distillation"] and not teachers:
        raise AssertionError(f"{fixture.name}: the config distils, but no teacher embeddings are recorded")

    train_in = subtree(arrays, "train/in")
    experts_in = {n: train_in[f"experts/{n}"] for n in names}
    availability_in = {n: train_in[f"ind/{n}"] for n in names}

    text_in = train_in["text"]
    embeddings, state = _forward(model_config, True)(variables, experts_in, availability_in, text_in)
    sims = training_similarity(embeddings, names)
    teacher_sims = None
    if teachers:
        teacher_sims = jnp.stack(
            [
                losses.teacher_similarity_from_embeddings(
                    teacher_embeddings[t.name]["text"], teacher_embeddings[t.name]["video"], t.experts
                )
                for t in teachers
            ]
        )
    terms = losses.teachtext_loss(sims, teacher_sims, margin=hyper["margin"], fix_norm=hyper["fix_norm"])
    if not teachers:
        del terms["distillation"]

    run_step = production_train_step(
        model_config,
        hyper["margin"],
        hyper["fix_norm"],
        teachers,
        (hyper["optimizer"], hyper["learning_rate"], hyper["weight_decay"]),
    )
    batch = {"experts": experts_in, "availability": availability_in, "text": {STUDENT_TEXT: text_in}}
    if teachers:
        batch["teacher_embeddings"] = teacher_embeddings
    scalars, grads, new_params, new_batch_stats = run_step(
        variables["params"], variables["batch_stats"], batch
    )
    step_terms = {"ranking": scalars["ranking_loss"], "total": scalars["loss"]}
    if teachers:
        step_terms["distillation"] = scalars["distillation_loss"]

    eval_in = subtree(arrays, "eval/in")
    eval_sims, eval_text, eval_video, eval_intermediates = None, {}, {}, {}
    if eval_in:
        eval_variables = interop.from_reference_state_dict(subtree(arrays, "after_step"), model_config)
        eval_embeddings, eval_state = _forward(model_config, False)(
            eval_variables,
            {n: eval_in[f"experts/{n}"] for n in names},
            {n: eval_in[f"ind/{n}"] for n in names},
            eval_in["text"],
        )
        eval_sims = np.asarray(retrieval_similarity(eval_embeddings, names))
        eval_text = {n: np.asarray(v) for n, v in eval_embeddings.text.items()}
        eval_video = {n: np.asarray(v) for n, v in eval_embeddings.video.items()}
        eval_intermediates = intermediates_by_fixture_name(eval_state["intermediates"])

    # One conversion for both: gradients carry parameter names, BatchNorm buffers their own.
    grads_and_forward_batch_stats = interop.to_reference_state_dict(
        {"params": grads, "batch_stats": state["batch_stats"]}, model_config
    )
    return ReplayedStep(
        name=fixture.name,
        expected=arrays,
        meta=meta,
        model_config=model_config,
        has_teachers=bool(teachers),
        train_sims=np.asarray(sims),
        teacher_target=None if teacher_sims is None else np.asarray(terms["teacher_target"]),
        loss_terms={k: float(v) for k, v in terms.items() if k != "teacher_target"},
        train_text={n: np.asarray(v) for n, v in embeddings.text.items()},
        train_video={n: np.asarray(v) for n, v in embeddings.video.items()},
        forward_batch_stats=grads_and_forward_batch_stats,
        intermediates={
            "train": intermediates_by_fixture_name(state["intermediates"]),
            "eval": eval_intermediates,
        },
        step_loss_terms={k: float(v) for k, v in step_terms.items()},
        grads=grads_and_forward_batch_stats,
        after_step=interop.to_reference_state_dict(
            {"params": new_params, "batch_stats": new_batch_stats}, model_config
        ),
        eval_sims=eval_sims,
        eval_text=eval_text,
        eval_video=eval_video,
    )


# ----- Checks: each raises AssertionError on a mismatch and skips when nothing is recorded -------


def _require(recorded, reason):
    if not recorded:
        pytest.skip(reason)


def check_parameter_count(replayed: ReplayedStep):
    recorded = replayed.meta["effective_config"].get("num_params")
    _require(recorded is not None, f"{replayed.name} records no parameter count")
    assert count_parameters(replayed.model_config) == recorded


def check_train_similarity(replayed: ReplayedStep):
    _require("train/out/sims" in replayed.expected, f"{replayed.name} records no train similarity matrix")
    assert_close(replayed.train_sims, replayed.expected["train/out/sims"], EMBEDDING_RTOL, "train sims")


def check_teacher_target(replayed: ReplayedStep):
    recorded = replayed.expected.get("train/out/teacher_sims")
    _require(recorded is not None, f"{replayed.name} records no teacher target (no distillation)")
    assert replayed.teacher_target is not None, "the fixture records a teacher target but no teacher inputs"
    assert_close(replayed.teacher_target, recorded, EMBEDDING_RTOL, "S_T")


def check_loss(replayed: ReplayedStep, term: str, source: str):
    """One loss term, from the plain loss helpers ("forward") or the production step ("step")."""
    key = f"train/out/{LOSS_KEYS[term]}"
    _require(key in replayed.expected, f"{replayed.name} records no {LOSS_KEYS[term]}")
    ours = replayed.loss_terms if source == "forward" else replayed.step_loss_terms
    assert term in ours, f"the fixture records {LOSS_KEYS[term]} but our replay has no {term} term"
    assert_close(ours[term], replayed.expected[key], EMBEDDING_RTOL, f"{LOSS_KEYS[term]} ({source})")


def _check_embeddings(replayed, split, text, video):
    for side, ours in (("text_embds", text), ("vid_embds", video)):
        recorded = subtree(replayed.expected, f"{split}/out/{side}")
        _require(recorded, f"{replayed.name} records no {split}/out/{side}")
        assert_recorded_are_produced(recorded, ours, f"{split} {side}")
        for name, value in recorded.items():
            assert_close(ours[name], value, EMBEDDING_RTOL, f"{split} {side} {name}")


def check_train_embeddings(replayed: ReplayedStep):
    _check_embeddings(replayed, "train", replayed.train_text, replayed.train_video)


def check_intermediates(replayed: ReplayedStep, split: str):
    """Every recorded `*/act/*` array (NetVLAD outputs, MoE logits and, for CE, projections, pair
    outputs and messages) against ours; the recorded names must be a subset of ours."""
    recorded = subtree(replayed.expected, f"{split}/act")
    _require(recorded, f"{replayed.name} records no {split} intermediates")
    ours = replayed.intermediates[split]
    assert_recorded_are_produced(recorded, ours, f"{split} intermediates")
    for name, value in recorded.items():
        assert_close(ours[name], value, EMBEDDING_RTOL, f"{split} {name}")


def _largest_gradient(replayed: ReplayedStep) -> float:
    grads = subtree(replayed.expected, "grads") or replayed.grads
    return max(float(np.max(np.abs(g))) for g in grads.values())


def check_gradients(replayed: ReplayedStep):
    """Every recorded gradient, relative to the scale of the whole gradient.

    A bias feeding a BatchNorm has an exactly zero gradient; both sides then hold float32
    rounding noise (~1e-6 of the largest entry), so the absolute floor of the tolerance is 1e-5
    times the largest gradient entry of the whole model.
    """
    expected = subtree(replayed.expected, "grads")
    _require(expected, f"{replayed.name} records no gradients")
    assert_recorded_are_produced(expected, replayed.grads, "gradients")
    largest = _largest_gradient(replayed)
    for name, value in expected.items():
        error = np.max(np.abs(replayed.grads[name] - value))
        bound = max(GRADIENT_RTOL * float(np.max(np.abs(value))), 1e-5 * largest)
        assert error <= bound, f"grad {name}: error {error:.3g} > {bound:.3g}"


def check_batch_norm_statistics(replayed: ReplayedStep, source: str):
    """Running mean/var (unbiased update) and num_batches_tracked after the train forward, from
    the plain forward pass ("forward") or the production step ("step")."""
    after_step = subtree(replayed.expected, "after_step")
    recorded = {k: v for k, v in after_step.items() if k.endswith(BATCH_NORM_BUFFERS)}
    _require(recorded, f"{replayed.name} records no BatchNorm statistics")
    ours = replayed.forward_batch_stats if source == "forward" else replayed.after_step
    assert_recorded_are_produced(recorded, ours, "BatchNorm statistics")
    for name, value in recorded.items():
        if name.endswith("num_batches_tracked"):
            assert int(ours[name]) == int(value), f"{name} ({source}): {int(ours[name])} != {int(value)}"
        else:
            assert_close(ours[name], value, EMBEDDING_RTOL, f"{name} ({source})")


def check_parameters_after_step(replayed: ReplayedStep):
    """Parameters after one step, <= 1e-4 relative to each tensor's scale.

    At t = 1 the step moves a parameter by lr * grad, so the gradient check's absolute floor
    (float32 noise of structurally-zero or cancelling gradients) carries over scaled by lr.
    """
    after_step = subtree(replayed.expected, "after_step")
    recorded = {k: v for k, v in after_step.items() if not k.endswith(BATCH_NORM_BUFFERS)}
    _require(recorded, f"{replayed.name} records no parameters after the step")
    assert_recorded_are_produced(recorded, replayed.after_step, "updated parameters")
    learning_rate = replayed.meta["effective_config"]["optimizer"]["args"]["lr"]
    floor = learning_rate * 1e-5 * _largest_gradient(replayed)
    for name, value in recorded.items():
        error = np.max(np.abs(replayed.after_step[name] - value))
        bound = max(GRADIENT_RTOL * float(np.max(np.abs(value))), floor)
        assert error <= bound, f"{name}: error {error:.3g} > {bound:.3g}"


def _require_eval(replayed: ReplayedStep):
    _require("eval/out/sims" in replayed.expected, f"{replayed.name} records no eval pass")
    assert replayed.eval_sims is not None, "the fixture records eval outputs but no eval inputs"


def check_eval_similarity_and_embeddings(replayed: ReplayedStep):
    _require_eval(replayed)
    assert_close(replayed.eval_sims, replayed.expected["eval/out/sims"], EMBEDDING_RTOL, "eval sims")
    _check_embeddings(replayed, "eval", replayed.eval_text, replayed.eval_video)


def check_eval_metrics(replayed: ReplayedStep):
    """Metrics of our own eval matrix equal the reference's (ranks are robust to 1e-7 noise here)."""
    _require_eval(replayed)
    expected = replayed.expected
    recorded = {d: subtree(expected, f"eval/out/{d}") for d in ("t2v", "v2t")}
    _require(any(recorded.values()), f"{replayed.name} records no eval metrics")
    result = metrics.retrieval_metrics(replayed.eval_sims, expected["eval/in/query_masks"])
    for direction, values in recorded.items():
        assert_recorded_are_produced(values, result[direction], f"{direction} metrics")
        for key, value in values.items():
            ours = result[direction][key]
            assert ours == value, f"{direction} {key}: {ours} != {value}"


PARITY_CHECKS: dict[str, Callable[[ReplayedStep], None]] = {
    "parameter_count": check_parameter_count,
    "train_similarity": check_train_similarity,
    "teacher_target": check_teacher_target,
    **{
        f"{term}_loss_{source}": functools.partial(check_loss, term=term, source=source)
        for term in LOSS_KEYS
        for source in ("forward", "step")
    },
    "train_embeddings": check_train_embeddings,
    "train_intermediates": functools.partial(check_intermediates, split="train"),
    "eval_intermediates": functools.partial(check_intermediates, split="eval"),
    "gradients": check_gradients,
    "batch_norm_statistics_forward": functools.partial(check_batch_norm_statistics, source="forward"),
    "batch_norm_statistics_step": functools.partial(check_batch_norm_statistics, source="step"),
    "parameters_after_step": check_parameters_after_step,
    "eval_similarity_and_embeddings": check_eval_similarity_and_embeddings,
    "eval_metrics": check_eval_metrics,
}


def run_parity_checks(replayed: ReplayedStep) -> dict[str, str]:
    """Runs every check; returns {check: skip reason} of those skipped, and raises on a mismatch."""
    skipped = {}
    for name, check in PARITY_CHECKS.items():
        try:
            check(replayed)
        except pytest.skip.Exception as skip:
            skipped[name] = str(skip)
        except AssertionError as error:
            raise AssertionError(f"{replayed.name}, check {name}: {error}") from error
    return skipped


# ----- The tests: every check on every fixture of the folder ----------------------------------


@pytest.fixture(scope="module", params=MODEL_FIXTURES, ids=lambda f: f.name)
def replayed(request) -> ReplayedStep:
    return replay(request.param)


def test_fixture_folder_holds_model_fixtures():
    assert MODEL_FIXTURES, "no model fixture (params/* + effective_config) found in the fixture folder"


@pytest.mark.parametrize("check", list(PARITY_CHECKS))
def test_parity(replayed, check):
    PARITY_CHECKS[check](replayed)


# ----- Regression: fixtures of other contents are checked on what they hold --------------------

CE_FIXTURES = [
    f for f in MODEL_FIXTURES if f.meta()["effective_config"]["arch_args"].get("use_ce") == "pairwise"
]
CE_ONLY_INTERMEDIATES = ("g_pair", "ce_mask/", "reduce_dim/")


@pytest.fixture(scope="module")
def ce_fixture() -> Fixture:
    if not CE_FIXTURES:
        pytest.skip("no collaborative-gating model fixture in the fixture folder to derive from")
    return CE_FIXTURES[0]


def _is_ce_only_intermediate(key: str) -> bool:
    prefixes = tuple(f"{split}/act/{name}" for split in ("train", "eval") for name in CE_ONLY_INTERMEDIATES)
    return key.startswith(prefixes)


def _write_copy(fixture: Fixture, folder, name, keep=lambda key: True, change=None) -> None:
    """A copy of `fixture` in `folder` holding the arrays `keep` accepts (its json documents just
    those), with `change` (key -> new array) applied."""
    arrays = {key: value for key, value in fixture.arrays().items() if keep(key)}
    arrays.update(change or {})
    meta = fixture.meta()
    meta["arrays"] = {key: doc for key, doc in meta["arrays"].items() if key in arrays}
    write_fixture(folder, name, arrays, meta)


def _perturbed(value: np.ndarray, rtol: float) -> np.ndarray:
    """`value` with its first entry moved by 10 * rtol of the array's scale."""
    value = np.array(value)
    flat = value.reshape(-1)
    if np.issubdtype(value.dtype, np.integer):
        flat[0] += 1
    else:
        flat[0] += 10 * rtol * max(float(np.max(np.abs(value))), np.finfo(np.float32).tiny)
    return value


REPLAY_INPUTS = ("params/", "train/in/", "eval/in/", "after_step/")


def test_a_fixture_without_ce_intermediates_passes_on_what_it_holds_and_a_perturbed_copy_fails(
    ce_fixture, tmp_path
):
    """As a MoEE fixture would, the copy records no pair outputs, messages or projections; it must
    pass every check with nothing skipped, and a copy with one recorded number moved must fail.

    The moved number is an output, so both copies hold the same inputs (asserted) and one
    replay serves both."""
    moe_logits = ce_fixture.arrays()["train/act/moe_logits"]

    def keep(key):
        return not _is_ce_only_intermediate(key)

    _write_copy(ce_fixture, tmp_path, "without_ce_intermediates", keep=keep)
    moved = {"train/act/moe_logits": _perturbed(moe_logits, EMBEDDING_RTOL)}
    _write_copy(ce_fixture, tmp_path, "perturbed", keep=keep, change=moved)
    found = {fixture.name: fixture for fixture in discover(MODEL, tmp_path)}
    assert sorted(found) == ["perturbed", "without_ce_intermediates"]

    intact = replay(found["without_ce_intermediates"])
    assert not any(_is_ce_only_intermediate(key) for key in intact.expected)
    assert {"text_vlad", "moe_logits"} <= set(subtree(intact.expected, "train/act"))
    assert run_parity_checks(intact) == {}

    perturbed_arrays = found["perturbed"].arrays()
    inputs = [key for key in perturbed_arrays if key.startswith(REPLAY_INPUTS)]
    assert sorted(inputs) == sorted(key for key in intact.expected if key.startswith(REPLAY_INPUTS))
    assert all(np.array_equal(perturbed_arrays[k], intact.expected[k], equal_nan=True) for k in inputs)
    perturbed = dataclasses.replace(intact, name="perturbed", expected=perturbed_arrays)
    expected_failure = "perturbed, check train_intermediates: train moe_logits: relative error"
    with pytest.raises(AssertionError, match=expected_failure):
        run_parity_checks(perturbed)


def _first_recorded(prefix):
    """Key of the first recorded array under `prefix` (none: the perturbation test skips)."""

    def key_of(replayed: ReplayedStep) -> Optional[str]:
        return next((key for key in sorted(replayed.expected) if key.startswith(prefix)), None)

    return key_of


def _largest_recorded(prefix, batch_norm_buffers: bool = False):
    """Key of the recorded array under `prefix` with the largest entry: moving it by 10 times the
    relative tolerance exceeds any absolute floor, which is set by the largest gradient."""

    def key_of(replayed: ReplayedStep) -> Optional[str]:
        candidates = {
            key: float(np.max(np.abs(value)))
            for key, value in replayed.expected.items()
            if key.startswith(prefix) and key.endswith(BATCH_NORM_BUFFERS) == batch_norm_buffers
        }
        return max(candidates, key=candidates.get, default=None)

    return key_of


# (check, recorded key to move) for every check: each can fail on a number it compares.
PERTURBATIONS = [
    ("train_similarity", _first_recorded("train/out/sims")),
    ("teacher_target", _first_recorded("train/out/teacher_sims")),
    *[
        (f"{term}_loss_{source}", _first_recorded(f"train/out/{key}"))
        for term, key in LOSS_KEYS.items()
        for source in ("forward", "step")
    ],
    ("train_embeddings", _first_recorded("train/out/vid_embds/")),
    ("train_intermediates", _first_recorded("train/act/")),
    ("eval_intermediates", _first_recorded("eval/act/")),
    ("gradients", _largest_recorded("grads/")),
    ("batch_norm_statistics_forward", _first_recorded("after_step/text_pooling.batch_norm.running_var")),
    ("batch_norm_statistics_step", _first_recorded("after_step/text_pooling.batch_norm.num_batches_tracked")),
    ("parameters_after_step", _largest_recorded("after_step/")),
    ("eval_similarity_and_embeddings", _first_recorded("eval/out/sims")),
    ("eval_metrics", _first_recorded("eval/out/t2v/MeanR")),
]


def test_every_check_is_covered_by_a_perturbation():
    assert sorted(check for check, _ in PERTURBATIONS) == sorted(set(PARITY_CHECKS) - {"parameter_count"})


@pytest.mark.parametrize("check,key_of", PERTURBATIONS, ids=[check for check, _ in PERTURBATIONS])
def test_each_check_fails_when_a_number_it_compares_moves(ce_fixture, check, key_of):
    replayed = replay(ce_fixture)
    key = key_of(replayed)
    if key is None:
        pytest.skip(f"{ce_fixture.name} records nothing {check} compares")
    PARITY_CHECKS[check](replayed)  # passes as recorded
    gradient_like = check in ("gradients", "parameters_after_step")
    rtol = GRADIENT_RTOL if gradient_like else EMBEDDING_RTOL
    moved_arrays = {**replayed.expected, key: _perturbed(replayed.expected[key], rtol)}
    moved = dataclasses.replace(replayed, expected=moved_arrays)
    with pytest.raises(AssertionError):
        PARITY_CHECKS[check](moved)


def test_parameter_count_check_fails_on_another_count(ce_fixture):
    replayed = replay(ce_fixture)
    effective = replayed.meta["effective_config"]
    effective = dict(effective, num_params=effective["num_params"] + 1)
    moved = dataclasses.replace(replayed, meta=dict(replayed.meta, effective_config=effective))
    with pytest.raises(AssertionError):
        check_parameter_count(moved)


# Categories a valid fixture may lack: (recorded keys removed, checks that must then skip).
ABSENT_CATEGORIES = {
    "distillation": (
        ("train/out/teacher_sims", "train/out/loss_distil"),
        {"teacher_target", "distillation_loss_forward", "distillation_loss_step"},
    ),
    "intermediates": (("train/act/", "eval/act/"), {"train_intermediates", "eval_intermediates"}),
    "gradients": (("grads/",), {"gradients"}),
    "eval": (("eval/",), {"eval_intermediates", "eval_similarity_and_embeddings", "eval_metrics"}),
    "eval_metrics": (("eval/out/t2v", "eval/out/v2t"), {"eval_metrics"}),
}


@pytest.mark.parametrize("category", list(ABSENT_CATEGORIES))
def test_a_category_the_fixture_lacks_is_skipped_with_a_reason(ce_fixture, category):
    prefixes, skipping = ABSENT_CATEGORIES[category]
    replayed = replay(ce_fixture)
    kept = {key: value for key, value in replayed.expected.items() if not key.startswith(prefixes)}
    assert len(kept) < len(replayed.expected)
    skipped = run_parity_checks(dataclasses.replace(replayed, expected=kept))
    assert set(skipped) == skipping
    assert all(f"{ce_fixture.name} records no" in reason for reason in skipped.values())


def test_a_recorded_quantity_our_model_does_not_produce_fails(ce_fixture):
    replayed = replay(ce_fixture)
    recorded = {**replayed.expected, "train/act/h_pair": replayed.expected["train/out/sims"]}
    with pytest.raises(AssertionError, match=r"does not produce: \['h_pair'\]"):
        check_intermediates(dataclasses.replace(replayed, expected=recorded), "train")
