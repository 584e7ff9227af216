"""Every distillation term on 1, 2, 4 and 8 devices gives the value and gradients of its
whole-array form on the one matrix (DESIGN decision 9: N devices compute what one computes).

Each case is a term as a config lists it. The sharded side runs the production path: the rows are
this device's captions against the all-gathered videos, the term gets a `StepView` and returns its
share, and the shares are summed over devices. The whole-array side calls the public function of
`tt_jax.distillation` on the full [B, B] matrix. Gradients are taken with respect to the student's
embeddings and mixture weights, so every gather and collective is differentiated through.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec

from tt_jax import distillation as distill
from tt_jax import parallel
from tt_jax.distillation import linas
from tt_jax.distillation.view import StepView, StudentView, TeacherView
from tt_jax.models.similarity import weighted_similarity

BATCH, DIM, TEACHERS = 8, 6, 2
EXPERTS = ("a", "b")
MASK_PARAMETERS = (0.3, 1.7)  # an adapt mask away from its uniform start


def problem(seed: int = 0):
    rng = np.random.default_rng(seed)
    student = {
        "text": {e: rng.normal(size=(BATCH, DIM)).astype(np.float32) / 2 for e in EXPERTS},
        "video": {e: rng.normal(size=(BATCH, DIM)).astype(np.float32) / 2 for e in EXPERTS},
        "moe_weights": rng.dirichlet(np.ones(len(EXPERTS)), BATCH).astype(np.float32),
    }
    availability = np.ones((BATCH, len(EXPERTS)), np.float32)
    availability[1::3, 1] = 0  # some videos miss expert b
    student["video"]["a"][2] = student["video"]["a"][5]  # a repeated point: RKD's clamped distances
    teachers = {
        "rows": rng.uniform(-1, 1, (TEACHERS, BATCH, BATCH)).astype(np.float32),
        "text": {e: rng.normal(size=(TEACHERS, BATCH, DIM)).astype(np.float32) / 2 for e in EXPERTS},
        "video": {e: rng.normal(size=(TEACHERS, BATCH, DIM)).astype(np.float32) / 2 for e in EXPERTS},
    }
    teachers["rows"][:, 3, 4] = teachers["rows"][:, 3, 6]  # a tie in a teacher row (rank-k)
    return student, availability, teachers


def whole_similarity(student, availability):
    return weighted_similarity(student["text"], student["video"], student["moe_weights"], availability, EXPERTS)


def teacher_pairs(teachers):
    return [
        ({e: teachers["text"][e][t] for e in EXPERTS}, {e: teachers["video"][e][t] for e in EXPERTS})
        for t in range(TEACHERS)
    ]


def features_of(student):
    return student["text"], student["video"]


# (term entry, whole-array oracle(student, availability, teachers) -> scalar)
CASES = {
    "teachtext_huber": (dict(method="teachtext"), lambda s, a, t: distill.teachtext_loss(whole_similarity(s, a), t["rows"])),
    "teachtext_l1_max": (
        dict(method="teachtext", distance="l1", aggregation="max"),
        lambda s, a, t: distill.teachtext_loss(whole_similarity(s, a), t["rows"], aggregation="max", kind="l1"),
    ),
    "teachtext_huber_delta": (
        dict(method="teachtext", delta=0.1, aggregation="min"),
        lambda s, a, t: distill.teachtext_loss(whole_similarity(s, a), t["rows"], aggregation="min", delta=0.1),
    ),
    "rank_k": (dict(method="rank_k", k=3), lambda s, a, t: distill.rank_k_loss(whole_similarity(s, a), t["rows"], k=3)),
    "rank_k_listwise": (
        dict(method="rank_k_listwise", k=5, temperature=0.5),
        lambda s, a, t: distill.rank_k_listwise_loss(whole_similarity(s, a), t["rows"], k=5, temperature=0.5),
    ),
    "pdist": (dict(method="pdist"), lambda s, a, t: distill.pdist_loss(whole_similarity(s, a), t["rows"])),
    "pdist_dist": (dict(method="pdist_dist"), lambda s, a, t: distill.pdist_dist_loss(whole_similarity(s, a), t["rows"])),
    "relational_similarity": (
        dict(method="relational"),
        lambda s, a, t: distill.rkd_loss(whole_similarity(s, a), distill.aggregate(jnp.asarray(t["rows"]), "mean")),
    ),
    "relational_text": (
        dict(method="relational", on="text", distance_weight=0.5, angle_weight=1.5),
        lambda s, a, t: sum(
            distill.rkd_loss(
                jnp.concatenate([s["text"][e] for e in EXPERTS], 1),
                jnp.concatenate([text[e] for e in EXPERTS], 1),
                distance_weight=0.5,
                angle_weight=1.5,
            )
            for text, _ in teacher_pairs(t)
        ) / TEACHERS,
    ),
    "embedding_regression": (
        dict(method="embedding_regression"),
        lambda s, a, t: distill.embedding_regression_loss(*features_of(s), teacher_pairs(t), EXPERTS),
    ),
    "linas_feature": (
        dict(method="linas_feature", video_weight=0.5),
        lambda s, a, t: distill.linas_feature_loss(*features_of(s), teacher_pairs(t), EXPERTS, video_weight=0.5),
    ),
    "kl_batch": (dict(method="kl_batch"), lambda s, a, t: distill.kl_batch_loss(whole_similarity(s, a), t["rows"])),
    "kl_batch_columns_hot": (
        dict(method="kl_batch", directions="columns", temperature=0.01),
        lambda s, a, t: distill.kl_batch_loss(whole_similarity(s, a), t["rows"], directions="columns", temperature=0.01),
    ),
    "linas_diag": (
        dict(method="linas_relational"),
        lambda s, a, t: distill.linas_relational_loss(whole_similarity(s, a), t["rows"], mask="diag"),
    ),
    "linas_full": (
        dict(method="linas_relational", mask="full"),
        lambda s, a, t: distill.linas_relational_loss(whole_similarity(s, a), t["rows"], mask="full"),
    ),
    "linas_adapt": (
        dict(method="linas_relational", mask="adapt"),
        lambda s, a, t: distill.linas_relational_loss(
            whole_similarity(s, a), t["rows"], mask="adapt", mask_parameters=jnp.asarray(MASK_PARAMETERS)
        ),
    ),
    "caption": (
        dict(method="caption"),
        lambda s, a, t: distill.caption_distillation_loss(s["text"], s["video"], s["moe_weights"], a, EXPERTS),
    ),
    "caption_detached": (
        dict(method="caption", temperature=0.5, detach_target=True),
        lambda s, a, t: distill.caption_distillation_loss(
            s["text"], s["video"], s["moe_weights"], a, EXPERTS, temperature=0.5, detach_target=True
        ),
    ),
    "video": (
        dict(method="video", temperature=2.0),
        lambda s, a, t: distill.video_distillation_loss(s["text"], s["video"], s["moe_weights"], a, EXPERTS, temperature=2.0),
    ),
}


def _mask_state(term):
    if not term.has_state:
        return {}
    state = linas.initial_mask_state(term.settings["mask_learning_rate"])
    return {**state, "parameters": jnp.asarray(MASK_PARAMETERS, jnp.float32)}


def _view(student, availability, teachers) -> StepView:
    """Inside shard_map: this device's rows against every video, as the objective builds them."""
    video = {e: parallel.gather_rows(v) for e, v in student["video"].items()}
    rows = weighted_similarity(
        student["text"], video, student["moe_weights"], parallel.gather_rows(availability), EXPERTS
    )
    teacher_views = tuple(
        TeacherView(
            rows=teachers["rows"][t],
            text={e: teachers["text"][e][t] for e in EXPERTS},
            video={e: teachers["video"][e][t] for e in EXPERTS},
        )
        for t in range(TEACHERS)
    )
    return StepView(
        rows=rows,
        student=StudentView(student["text"], student["video"], student["moe_weights"], availability),
        teachers=teacher_views,
        expert_names=EXPERTS,
    )


def input_specs():
    """(student rows, replicated, teachers): the student's inputs and every teacher's [T, B, ...]
    arrays split over the devices by video."""
    by_video = PartitionSpec(None, parallel.DATA_AXIS)
    teachers = {"rows": by_video, "text": {e: by_video for e in EXPERTS}, "video": {e: by_video for e in EXPERTS}}
    return PartitionSpec(parallel.DATA_AXIS), PartitionSpec(), teachers


@functools.lru_cache(maxsize=None)
def sharded_value_and_grad(case: str, devices: int):
    term = distill.parse_terms([CASES[case][0]])[0]
    mesh = parallel.make_mesh(devices)
    rows_spec, replicated, teacher_spec = input_specs()

    def local(student, availability, teachers, state):
        return parallel.sum_over_devices(term.share(_view(student, availability, teachers), state.get(term.name)))

    value = jax.shard_map(
        local, mesh=mesh, in_specs=(rows_spec, rows_spec, teacher_spec, replicated), out_specs=replicated
    )
    student, availability, teachers = problem()
    return jax.device_get(
        jax.jit(jax.value_and_grad(value))(student, availability, teachers, {term.name: _mask_state(term)})
    )


@functools.lru_cache(maxsize=None)
def whole_value_and_grad(case: str):
    student, availability, teachers = problem()
    oracle = CASES[case][1]
    return jax.device_get(jax.value_and_grad(lambda s: oracle(s, availability, teachers))(student))


def assert_close(actual, expected, what):
    actual, expected = np.asarray(actual), np.asarray(expected)
    scale = max(float(np.max(np.abs(expected))), 1e-30)
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5 * scale, err_msg=what)


@pytest.mark.parametrize("devices", [1, 2, 4, 8])
@pytest.mark.parametrize("case", sorted(CASES))
def test_a_term_on_n_devices_matches_its_whole_array_form(case, devices):
    value, grads = sharded_value_and_grad(case, devices)
    expected_value, expected_grads = whole_value_and_grad(case)
    assert np.isfinite(value) and float(expected_value) != 0.0, case
    assert_close(value, expected_value, f"{case} value on {devices} devices")
    flat, _ = jax.tree.flatten(grads)
    assert any(np.any(leaf != 0) for leaf in flat), f"{case}: no gradient reaches the student"
    for path, leaf in jax.tree_util.tree_leaves_with_path(grads):
        expected = expected_grads
        for key in path:
            expected = expected[key.key]
        assert_close(leaf, expected, f"{case} gradient {jax.tree_util.keystr(path)} on {devices} devices")


@pytest.mark.parametrize("devices", [1, 2, 4, 8])
def test_the_adaptive_mask_step_on_n_devices_matches_the_whole_batch_step(devices):
    """The M-step's gradient is a psum of row shares; its Adam step must be the whole batch's."""
    student, availability, teachers = problem()
    term = distill.parse_terms([dict(method="linas_relational", mask="adapt", mask_steps=3)])[0]
    settings = term.settings
    mesh = parallel.make_mesh(devices)
    rows_spec, replicated, teacher_spec = input_specs()

    def local(student, availability, teachers, state):
        return linas.mask_step(
            state, _view(student, availability, teachers), learning_rate=settings["mask_learning_rate"], steps=3
        )

    state = _mask_state(term)
    updated = jax.jit(
        jax.shard_map(local, mesh=mesh, in_specs=(rows_spec, rows_spec, teacher_spec, replicated), out_specs=replicated)
    )(student, availability, teachers, state)

    similarity = whole_similarity(student, availability)
    optimizer = linas.mask_optimizer(settings["mask_learning_rate"])
    parameters, opt_state = state["parameters"], state["optimizer"]
    for _ in range(3):
        gradient = jax.grad(linas.mask_objective)(parameters, similarity, teachers["rows"])
        updates, opt_state = optimizer.update(gradient, opt_state, parameters)
        parameters = optax.apply_updates(parameters, updates)
    assert_close(updated["parameters"], parameters, f"mask parameters after 3 M-steps on {devices} devices")
    assert not np.allclose(updated["parameters"], MASK_PARAMETERS)
