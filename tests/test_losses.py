"""Losses against closed forms and explicit numpy loops over the definitions."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tt_jax import losses
from tt_jax.distillation import aggregate, teachtext_loss


def distillation_loss(student, teacher, *, distance="huber"):
    """TeachText's distillation towards one teacher matrix."""
    return teachtext_loss(student, jnp.asarray(teacher)[None], kind=distance)


def numpy_ranking_loss(sims, margin, fix_norm=True):
    batch = len(sims)
    terms = []
    for i in range(batch):
        for j in range(batch):
            if fix_norm and i == j:
                continue
            terms.append(max(0.0, margin - sims[i, i] + sims[i, j]))  # caption i, negative video j
            terms.append(max(0.0, margin - sims[j, j] + sims[i, j]))  # video j, negative caption i
    return np.mean(terms)


@pytest.mark.parametrize("fix_norm", [True, False])
def test_ranking_loss_matches_explicit_sum(fix_norm):
    sims = np.random.default_rng(0).uniform(-1, 1, (6, 6)).astype(np.float32)
    expected = numpy_ranking_loss(sims.astype(np.float64), 0.2, fix_norm)
    actual = losses.max_margin_ranking_loss(jnp.asarray(sims), 0.2, fix_norm=fix_norm)
    np.testing.assert_allclose(actual, expected, rtol=1e-6)


def test_ranking_loss_closed_forms():
    # Perfectly separated by more than the margin: zero loss.
    assert float(losses.max_margin_ranking_loss(jnp.eye(4), 0.5)) == 0.0
    # All scores equal: every off-diagonal term is the margin; with fix_norm=False the mean also
    # counts the 2B diagonal terms, each equal to the margin too.
    assert float(losses.max_margin_ranking_loss(jnp.zeros((5, 5)), 0.3)) == pytest.approx(0.3)
    assert float(losses.max_margin_ranking_loss(jnp.zeros((5, 5)), 0.3, fix_norm=False)) == pytest.approx(0.3)


def test_huber_distillation_has_both_branches():
    student = jnp.array([[0.0, 0.5], [2.0, -1.5]])
    teacher = jnp.zeros((2, 2))
    # |d| < 1: 0.5 d^2 ; otherwise |d| - 0.5 (torch SmoothL1Loss, beta = 1)
    expected = np.mean([0.0, 0.125, 1.5, 1.0])
    assert float(distillation_loss(student, teacher)) == pytest.approx(expected)
    assert float(distillation_loss(student, teacher, distance="l1")) == pytest.approx(np.mean([0, 0.5, 2, 1.5]))
    # l2 is the Huber loss's quadratic part, 0.5 d^2 (spec 2.4 item 2)
    assert float(distillation_loss(student, teacher, distance="l2")) == pytest.approx(np.mean([0, 0.125, 2, 1.125]))


def test_distillation_sends_no_gradient_to_the_teacher():
    student = jnp.array([[0.2, 0.1], [0.3, 0.4]])
    teacher = jnp.array([[1.0, 0.0], [0.0, 1.0]])
    teacher_gradient = jax.grad(lambda t: distillation_loss(student, t))(teacher)
    np.testing.assert_array_equal(teacher_gradient, 0.0)
    student_gradient = jax.grad(lambda s: distillation_loss(s, teacher))(student)
    np.testing.assert_allclose(student_gradient, (student - teacher) / 4, rtol=1e-6)


@pytest.mark.parametrize("aggregation,reduce", [("mean", np.mean), ("min", np.min), ("max", np.max)])
def test_teacher_aggregation(aggregation, reduce):
    stack = np.random.default_rng(1).normal(size=(3, 4, 4)).astype(np.float32)
    np.testing.assert_allclose(aggregate(jnp.asarray(stack), aggregation), reduce(stack, axis=0), rtol=1e-6)


def test_teacher_similarity_is_plain_sum_over_experts():
    rng = np.random.default_rng(2)
    text = {e: rng.normal(size=(3, 1, 5)).astype(np.float32) for e in "ab"}
    video = {e: rng.normal(size=(3, 5)).astype(np.float32) for e in "ab"}
    expected = text["a"][:, 0] @ video["a"].T + text["b"][:, 0] @ video["b"].T
    np.testing.assert_allclose(losses.teacher_similarity_from_embeddings(text, video, "ab"), expected, rtol=1e-5)


def test_teachtext_loss_adds_weighted_distillation():
    rng = np.random.default_rng(3)
    student = jnp.asarray(rng.uniform(-1, 1, (4, 4)).astype(np.float32))
    teachers = jnp.asarray(rng.uniform(-1, 1, (2, 4, 4)).astype(np.float32))
    terms = losses.teachtext_loss(student, teachers, margin=0.1, distillation_weight=2.5)
    expected_distillation = distillation_loss(student, teachers.mean(0))
    assert float(terms["distillation"]) == pytest.approx(float(expected_distillation), rel=1e-6)
    assert float(terms["total"]) == pytest.approx(float(terms["ranking"]) + 2.5 * float(expected_distillation), rel=1e-6)
    without = losses.teachtext_loss(student, None, margin=0.1)
    assert float(without["total"]) == float(without["ranking"])


def test_bad_loss_inputs_are_named():
    with pytest.raises(ValueError, match="square"):
        losses.max_margin_ranking_loss(jnp.zeros((3, 4)), 0.1)
    with pytest.raises(ValueError, match="at least 2 videos"):
        losses.max_margin_ranking_loss(jnp.zeros((1, 1)), 0.1)
    with pytest.raises(ValueError, match="unknown teacher aggregation 'median'"):
        aggregate(jnp.zeros((2, 3, 3)), "median")
    with pytest.raises(ValueError, match="unknown distance 'kl'"):
        distillation_loss(jnp.zeros((2, 2)), jnp.zeros((2, 2)), distance="kl")
    with pytest.raises(ValueError, match=r"stack of the student's \(2, 2\) matrix"):
        distillation_loss(jnp.zeros((2, 2)), jnp.zeros((3, 3)))
