"""The whole-array distillation losses of `tt_jax.distillation` against float64 numpy references
written from the formulas of the distillation specification (sections 1, 2.3-2.4, 3.4, 3.8,
4.3-4.4, 5 and 7), with the readings the module docstrings choose where the specification is
ambiguous. Inputs are float32 for JAX; each reference recomputes in float64 from the same values.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tt_jax.distillation import (
    Schedule,
    caption_distillation_loss,
    decay_factor,
    embedding_regression_loss,
    kl_batch_loss,
    linas_feature_loss,
    linas_relational_loss,
    mask_objective,
    pdist_dist_loss,
    pdist_loss,
    rank_k_listwise_loss,
    rank_k_loss,
    rkd_angle_loss,
    rkd_distance_loss,
    rkd_loss,
    teachtext_loss,
    term_weight,
    video_distillation_loss,
)
from tt_jax.models.similarity import weighted_similarity

RTOL = 1e-5
ATOL = 1e-7
BATCHES = (2, 5, 8)
AGGREGATIONS = ("mean", "min", "max")

# -- numpy references, from the specification ------------------------------------------------------


def np_huber(x, delta=1.0):
    """h_delta(x) = x^2 / 2 where |x| <= delta, delta (|x| - delta / 2) beyond (spec 1)."""
    x = np.asarray(x, np.float64)
    return np.where(np.abs(x) <= delta, 0.5 * x * x, delta * (np.abs(x) - 0.5 * delta))


def np_distance(x, kind, delta=1.0):
    """huber, l1 = |x|, l2 = x^2 / 2 (spec 2.4 item 2)."""
    x = np.asarray(x, np.float64)
    if kind == "huber":
        return np_huber(x, delta)
    if kind == "l1":
        return np.abs(x)
    if kind == "l2":
        return 0.5 * x * x
    raise AssertionError(kind)


def np_aggregate(teachers, aggregation):
    """Phi over the teacher axis: element-wise mean, min or max (spec 2.2)."""
    teachers = np.asarray(teachers, np.float64)
    return {"mean": np.mean, "min": np.min, "max": np.max}[aggregation](teachers, axis=0)


def np_log_softmax(x):
    """Stable log-softmax of a 1-d array."""
    x = np.asarray(x, np.float64)
    shifted = x - np.max(x)
    return shifted - np.log(np.sum(np.exp(shifted)))


def np_kl(target_logits, student_logits):
    """KL(softmax(target) || softmax(student)) of two 1-d logit vectors, 0 where P_k = 0 (spec 1)."""
    log_p, log_q = np_log_softmax(target_logits), np_log_softmax(student_logits)
    p = np.exp(log_p)
    return float(sum(p[k] * (log_p[k] - log_q[k]) for k in range(len(p)) if p[k] > 0))


def np_descending_order(row):
    """The teacher's order of a row: descending, the lower index first among ties."""
    return np.argsort(-np.asarray(row, np.float64), kind="stable")


def np_logsumexp(x):
    x = np.asarray(x, np.float64)
    top = np.max(x)
    return top + math.log(np.sum(np.exp(x - top)))


def np_teachtext(student, teachers, aggregation, kind, delta):
    """1/|S| sum_ij h(S_ij - Phi_ij) (spec 2.3)."""
    target = np_aggregate(teachers, aggregation)
    student = np.asarray(student, np.float64)
    rows, columns = student.shape
    total = 0.0
    for i in range(rows):
        for j in range(columns):
            total += float(np_distance(student[i, j] - target[i, j], kind, delta))
    return total / (rows * columns)


def np_rank_k(student, teachers, k, aggregation, kind, delta):
    """1/(B K) sum_i sum_{j in topK_i(Phi)} h(S_ij - Phi_ij) (spec 2.4 item 3)."""
    target = np_aggregate(teachers, aggregation)
    student = np.asarray(student, np.float64)
    total = 0.0
    for i in range(student.shape[0]):
        for j in np_descending_order(target[i])[:k]:
            total += float(np_distance(student[i, j] - target[i, j], kind, delta))
    return total / (student.shape[0] * k)


def np_rank_k_listwise(student, teachers, k, aggregation, temperature):
    """-1/B sum_i sum_{r<=K} [s_i(r) - log sum_{l=r}^{K} exp s_i(l)], s = S / temperature taken in
    the teacher's top-K order of row i (spec 2.4 item 3)."""
    target = np_aggregate(teachers, aggregation)
    student = np.asarray(student, np.float64)
    total = 0.0
    for i in range(student.shape[0]):
        scores = student[i, np_descending_order(target[i])[:k]] / temperature
        for r in range(k):
            total += scores[r] - np_logsumexp(scores[r:])
    return -total / student.shape[0]


def np_pdist(student, teachers, aggregation, eps=1e-6):
    """1/(B C) sum_i ||S_i: - Phi_i: + eps||_2 (spec 2.4 item 4)."""
    target = np_aggregate(teachers, aggregation)
    student = np.asarray(student, np.float64)
    norms = [math.sqrt(np.sum((student[i] - target[i] + eps) ** 2)) for i in range(student.shape[0])]
    return float(np.mean(norms))


def np_similarity_distance(similarity):
    """sqrt(max(2 - 2 S, 1e-12)), element-wise."""
    return np.sqrt(np.maximum(2.0 - 2.0 * np.asarray(similarity, np.float64), 1e-12))


def np_pdist_dist(student, teachers, aggregation, delta):
    """Mean Huber between the distance matrices of the student and the target (spec 2.4 item 4)."""
    target = np_aggregate(teachers, aggregation)
    difference = np_similarity_distance(student) - np_similarity_distance(target)
    return float(np.mean(np_huber(difference, delta)))


def np_kl_batch(student, teachers, temperature, aggregation, directions="both"):
    """KL_batchmean over rows of S / T plus the same over rows of the transposes (spec 3.8)."""
    target = np_aggregate(teachers, aggregation)
    student = np.asarray(student, np.float64)
    batch = student.shape[0]
    total = 0.0
    if directions in ("both", "rows"):
        total += sum(np_kl(target[i] / temperature, student[i] / temperature) for i in range(batch)) / batch
    if directions in ("both", "columns"):
        total += sum(np_kl(target[:, j] / temperature, student[:, j] / temperature) for j in range(batch)) / batch
    return total


def np_rkd_pairwise(points):
    """RKD pdist: sqrt(max(|e_i|^2 + |e_j|^2 - 2 e_i.e_j, 1e-12)), the diagonal 0 (spec 5)."""
    points = np.asarray(points, np.float64)
    n = points.shape[0]
    d = np.zeros((n, n))
    for i in range(n):
        for j in range(n):
            if i != j:
                squared = points[i] @ points[i] + points[j] @ points[j] - 2.0 * points[i] @ points[j]
                d[i, j] = math.sqrt(max(squared, 1e-12))
    return d


def np_rkd_distance(student, teacher, delta=1.0):
    """L_D = 1/N^2 sum_ij h(d^S_ij / mu^S - d^T_ij / mu^T), mu the off-diagonal mean (spec 5)."""
    psi = []
    for points in (student, teacher):
        d = np_rkd_pairwise(points)
        n = d.shape[0]
        mu = sum(d[i, j] for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
        psi.append(d / mu)
    return float(np.mean(np_huber(psi[0] - psi[1], delta)))


def np_normalize(vector):
    """F.normalize: v / max(||v||, 1e-12)."""
    return vector / max(np.linalg.norm(vector), 1e-12)


def np_rkd_angles(points):
    """psi_A(a, b, c) = <e_ab, e_ac>, e_ab = normalize(x_b - x_a)."""
    points = np.asarray(points, np.float64)
    n = points.shape[0]
    psi = np.zeros((n, n, n))
    for a in range(n):
        for b in range(n):
            for c in range(n):
                psi[a, b, c] = np_normalize(points[b] - points[a]) @ np_normalize(points[c] - points[a])
    return psi


def np_rkd_angle(student, teacher, delta=1.0):
    """L_A = 1/N^3 sum_abc h(psi^S_A - psi^T_A) (spec 5)."""
    return float(np.mean(np_huber(np_rkd_angles(student) - np_rkd_angles(teacher), delta)))


def np_linas_weights(parameters, batch):
    """W: for each caption, a softmax over its videos of M = p1 on the positive, p2 elsewhere."""
    p1, p2 = (float(p) for p in parameters)
    weights = np.zeros((batch, batch))
    for i in range(batch):
        logits = np.array([p1 if j == i else p2 for j in range(batch)])
        weights[i] = np.exp(logits - logits.max()) / np.sum(np.exp(logits - logits.max()))
    return weights


def np_linas_relational(student, teachers, mask, aggregation, delta, parameters=(1.0, 1.0)):
    """diag: sum_i h(s_ii); full: sum_ij h(s_ij); adapt: B sum_ij W_ij h(s_ij) (spec 4.3)."""
    per_entry = np_huber(np.asarray(student, np.float64) - np_aggregate(teachers, aggregation), delta)
    batch = per_entry.shape[0]
    if mask == "diag":
        return float(sum(per_entry[i, i] for i in range(batch)))
    if mask == "full":
        return float(np.sum(per_entry))
    return float(batch * np.sum(np_linas_weights(parameters, batch) * per_entry))


def np_mask_objective(parameters, student, teachers, aggregation, delta):
    """B sum_ij W_ij h(S_ij - Phi_ij) / (|Phi_ij| + 1e-6) (spec 4.4)."""
    target = np_aggregate(teachers, aggregation)
    per_entry = np_huber(np.asarray(student, np.float64) - target, delta)
    batch = per_entry.shape[0]
    return float(batch * np.sum(np_linas_weights(parameters, batch) * per_entry / (np.abs(target) + 1e-6)))


def np_weighted_similarity(rows, columns, moe_weights, availability, experts, keep_missing=False):
    """S_ij = sum_m w^_ijm <rows_i^m, columns_j^m>, w^_ijm = w_im a_jm / sum_m' w_im' a_jm' (spec 2.1);
    with keep_missing every weight is 1."""
    moe_weights = np.asarray(moe_weights, np.float64)
    availability = np.asarray(availability, np.float64)
    n_rows, n_columns = moe_weights.shape[0], availability.shape[0]
    similarity = np.zeros((n_rows, n_columns))
    for i in range(n_rows):
        for j in range(n_columns):
            pair = np.ones(len(experts)) if keep_missing else moe_weights[i] * availability[j]
            if not keep_missing:
                pair = pair / np.sum(pair)
            similarity[i, j] = sum(
                pair[m] * float(np.asarray(rows[name][i], np.float64) @ np.asarray(columns[name][j], np.float64))
                for m, name in enumerate(experts)
            )
    return similarity


def np_caption_distillation(text, video, moe_weights, availability, experts, temperature, keep_missing=False,
                            target_text=None):
    """1/B sum_i KL(softmax_j(S^tt_ij / tau) || softmax_j(S_ij / tau)) (spec 7); `target_text`, if
    given, is the text the target S^tt is computed from."""
    target_text = text if target_text is None else target_text
    similarity = np_weighted_similarity(text, video, moe_weights, availability, experts, keep_missing)
    target = np_weighted_similarity(target_text, target_text, moe_weights, availability, experts, keep_missing)
    batch = similarity.shape[0]
    return sum(np_kl(target[i] / temperature, similarity[i] / temperature) for i in range(batch)) / batch


def np_video_distillation(text, video, moe_weights, availability, experts, temperature, keep_missing=False,
                          target_video=None):
    """1/B sum_j KL(softmax(S^vv_j: / tau) || softmax(S^T_j: / tau)) (spec 7)."""
    target_video = video if target_video is None else target_video
    similarity = np_weighted_similarity(text, video, moe_weights, availability, experts, keep_missing)
    target = np_weighted_similarity(target_video, target_video, moe_weights, availability, experts, keep_missing)
    batch = similarity.shape[0]
    return sum(np_kl(target[j] / temperature, similarity[:, j] / temperature) for j in range(batch)) / batch


def np_squared_error(student, teacher, experts):
    return sum(float(np.sum((np.asarray(student[m], np.float64) - np.asarray(teacher[m], np.float64)) ** 2))
               for m in experts)


def np_embedding_regression(student_text, student_video, teachers, experts, text, video):
    """Mean over teachers of 1/(B |experts|) (text sum ||t^S - t^T||^2 + video sum ||v^S - v^T||^2)."""
    batch = np.asarray(student_text[experts[0]]).shape[0]
    losses = []
    for teacher_text, teacher_video in teachers:
        loss = 0.0
        if text:
            loss += np_squared_error(student_text, teacher_text, experts)
        if video:
            loss += np_squared_error(student_video, teacher_video, experts)
        losses.append(loss / (batch * len(experts)))
    return float(np.mean(losses))


def np_linas_feature(student_text, student_video, teachers, experts, video_weight):
    """Mean over teachers of L_Dtext + gamma L_Dvideo, both MSELoss(sum) (spec 4.3)."""
    return float(np.mean([
        np_squared_error(student_text, teacher_text, experts)
        + video_weight * np_squared_error(student_video, teacher_video, experts)
        for teacher_text, teacher_video in teachers
    ]))


def np_decay(kind, epoch, k=None, b=1.0, floor=0.05):
    """w(e) of spec 3.4."""
    if kind == "none":
        return 1.0
    if kind == "exp":
        return (0.95 if k is None else k) ** epoch
    if kind == "linear":
        return max((-0.01 if k is None else k) * epoch + b, floor)
    if kind == "sigmoid":
        k = 800.0 if k is None else k
        return k / (k + math.exp(100.0 * epoch / k))
    raise AssertionError(kind)


def compiled_grad(function, **options):
    """jax.grad of a function of arrays, compiled once (much faster here than op-by-op)."""
    return jax.jit(jax.grad(function, **options))


def numeric_gradient(function, x, step=1e-6):
    """Central finite differences of a float64 scalar function of an array."""
    x = np.asarray(x, np.float64)
    gradient = np.zeros_like(x)
    for index in np.ndindex(x.shape):
        up, down = x.copy(), x.copy()
        up[index] += step
        down[index] -= step
        gradient[index] = (function(up) - function(down)) / (2 * step)
    return gradient


# -- inputs ----------------------------------------------------------------------------------------


def similarity_inputs(seed, batch, teachers=3, student_scale=2.0):
    """A student matrix [B, B] in [-scale, scale] and teacher matrices [T, B, B] in [-1, 1]."""
    rng = np.random.default_rng(seed)
    student = rng.uniform(-student_scale, student_scale, (batch, batch)).astype(np.float32)
    stack = rng.uniform(-1.0, 1.0, (teachers, batch, batch)).astype(np.float32)
    return student, stack


def tied_teachers(seed, batch, teachers=3):
    """Teacher matrices on a coarse grid of quarters: rows full of exact ties, in every aggregation."""
    rng = np.random.default_rng(seed)
    return (rng.integers(-2, 3, (teachers, batch, batch)) / 4.0).astype(np.float32)


def assert_close(ours, reference, rtol=RTOL, atol=ATOL):
    ours = float(ours)
    assert np.isfinite(ours)
    np.testing.assert_allclose(ours, reference, rtol=rtol, atol=atol)


EXPERTS = ("audio", "rgb", "speech")
EXPERT_DIMS = {"audio": 3, "rgb": 4, "speech": 2}


def embedding_inputs(seed, batch, missing):
    """Per-expert text/video embeddings, softmax mixture weights and a 0/1 availability matrix.
    With `missing`, some videos lack some experts (never all), and their embeddings there are
    arbitrary values that the weights must ignore."""
    rng = np.random.default_rng(seed)
    text = {m: rng.normal(size=(batch, d)).astype(np.float32) for m, d in EXPERT_DIMS.items()}
    video = {m: rng.normal(size=(batch, d)).astype(np.float32) for m, d in EXPERT_DIMS.items()}
    logits = rng.normal(size=(batch, len(EXPERTS)))
    moe_weights = (np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)).astype(np.float32)
    availability = np.ones((batch, len(EXPERTS)), np.float32)
    if missing:
        for j in range(batch):
            availability[j] = rng.integers(0, 2, len(EXPERTS))
            if availability[j].sum() == 0:
                availability[j, rng.integers(len(EXPERTS))] = 1.0
        availability[0] = [1.0, 0.0, 0.0]
        for j in range(batch):
            for m, name in enumerate(EXPERTS):
                if availability[j, m] == 0:
                    video[name][j] = 50.0 * rng.normal(size=EXPERT_DIMS[name])
    return text, video, moe_weights, availability


def jnp_dict(arrays):
    return {name: jnp.asarray(value) for name, value in arrays.items()}


# -- TeachText and its variants (spec 2.3-2.4) ----------------------------------------------------


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("aggregation", AGGREGATIONS)
@pytest.mark.parametrize("kind, delta", [("huber", 1.0), ("huber", 0.3), ("l1", 1.0), ("l2", 1.0)])
def test_teachtext_matches_the_mean_elementwise_distance(batch, aggregation, kind, delta):
    """teachtext_loss is the mean over all B^2 entries of h(S - Phi(S_t)), diagonal included,
    with both Huber branches exercised (differences up to 3 against delta 1 or 0.3)."""
    student, teachers = similarity_inputs(batch, batch)
    ours = teachtext_loss(jnp.asarray(student), jnp.asarray(teachers), aggregation=aggregation, kind=kind, delta=delta)
    assert_close(ours, np_teachtext(student, teachers, aggregation, kind, delta))


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("kind", ["huber", "l1", "l2"])
def test_teachtext_is_zero_when_the_student_equals_its_target(batch, kind):
    """A student equal to every teacher gives a zero loss whatever the aggregation (two copies, so
    that the mean x + x over 2 is exact in float32)."""
    student, _ = similarity_inputs(batch + 10, batch)
    teachers = np.stack([student] * 2)
    for aggregation in AGGREGATIONS:
        ours = teachtext_loss(jnp.asarray(student), jnp.asarray(teachers), aggregation=aggregation, kind=kind)
        assert abs(float(ours)) <= 1e-12


@pytest.mark.parametrize("batch", BATCHES)
def test_huber_with_a_huge_delta_is_l2(batch):
    """h_delta(x) = x^2 / 2 for |x| <= delta, so a delta beyond every difference gives the l2 loss."""
    student, teachers = similarity_inputs(batch + 20, batch)
    huber = teachtext_loss(jnp.asarray(student), jnp.asarray(teachers), kind="huber", delta=1e6)
    l2 = teachtext_loss(jnp.asarray(student), jnp.asarray(teachers), kind="l2")
    np.testing.assert_allclose(float(huber), float(l2), rtol=1e-6)


def _rank_k_cases():
    return [(batch, k) for batch in BATCHES for k in sorted({1, max(1, batch // 2), batch})]


AGGREGATION_AND_TIES = [("mean", False), ("mean", True), ("min", True), ("max", True)]


@pytest.mark.parametrize("batch, k", _rank_k_cases())
@pytest.mark.parametrize("aggregation, ties", AGGREGATION_AND_TIES)
def test_rank_k_matches_the_mean_over_the_teachers_top_k(batch, k, aggregation, ties):
    """rank_k_loss is 1/(B K) sum over each row's teacher top-K of h(S - Phi), ties broken
    towards the lower video index (stable descending order)."""
    student, teachers = similarity_inputs(100 + batch * 10 + k, batch)
    if ties:
        teachers = tied_teachers(200 + batch * 10 + k, batch)
    ours = rank_k_loss(jnp.asarray(student), jnp.asarray(teachers), k=k, aggregation=aggregation)
    assert_close(ours, np_rank_k(student, teachers, k, aggregation, "huber", 1.0))


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("kind", ["huber", "l1", "l2"])
def test_rank_k_with_k_equal_to_the_batch_is_teachtext(batch, kind):
    """With K = B every entry is chosen, so rank_k is TeachText's mean over the matrix."""
    student, teachers = similarity_inputs(300 + batch, batch)
    args = (jnp.asarray(student), jnp.asarray(teachers))
    np.testing.assert_allclose(
        float(rank_k_loss(*args, k=batch, kind=kind)), float(teachtext_loss(*args, kind=kind)), rtol=1e-6
    )


@pytest.mark.parametrize("batch, k", _rank_k_cases())
def test_rank_k_takes_the_first_columns_of_a_constant_teacher_row(batch, k):
    """When a teacher row is all ties, its top-K are the K lowest video indices."""
    student, _ = similarity_inputs(400 + batch, batch)
    teachers = np.full((1, batch, batch), 0.25, np.float32)
    expected = float(np.mean(np_huber(student[:, :k].astype(np.float64) - 0.25)))
    assert_close(rank_k_loss(jnp.asarray(student), jnp.asarray(teachers), k=k), expected)


@pytest.mark.parametrize("batch, k", _rank_k_cases())
@pytest.mark.parametrize("aggregation, ties", AGGREGATION_AND_TIES)
@pytest.mark.parametrize("temperature", [1.0, 0.1])
def test_rank_k_listwise_matches_the_plackett_luce_likelihood(batch, k, aggregation, temperature, ties):
    """rank_k_listwise_loss is -1/B sum_i sum_r [s(r) - log sum_{l>=r} exp s(l)] of the student's
    scores / temperature in the teacher's top-K order (lower index first among ties)."""
    student, teachers = similarity_inputs(500 + batch * 10 + k, batch)
    if ties:
        teachers = tied_teachers(600 + batch * 10 + k, batch)
    ours = rank_k_listwise_loss(
        jnp.asarray(student), jnp.asarray(teachers), k=k, aggregation=aggregation, temperature=temperature
    )
    assert_close(ours, np_rank_k_listwise(student, teachers, k, aggregation, temperature), atol=1e-6)


@pytest.mark.parametrize("batch", BATCHES)
def test_rank_k_listwise_with_k_one_is_zero(batch):
    """A list of one item has likelihood 1: s - log exp s = 0 for every row."""
    student, teachers = similarity_inputs(700 + batch, batch)
    ours = rank_k_listwise_loss(jnp.asarray(student), jnp.asarray(teachers), k=1)
    assert abs(float(ours)) <= 1e-6


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_pdist_matches_the_mean_row_distance(batch, aggregation):
    """pdist_loss is 1/B sum_i ||S_i - Phi_i + 1e-6||_2 (torch pairwise_distance)."""
    student, teachers = similarity_inputs(800 + batch, batch)
    ours = pdist_loss(jnp.asarray(student), jnp.asarray(teachers), aggregation=aggregation)
    assert_close(ours, np_pdist(student, teachers, aggregation))


@pytest.mark.parametrize("batch", BATCHES)
def test_pdist_of_a_student_equal_to_its_target_is_sqrt_b_eps(batch):
    """With S = Phi every row's difference is eps in each of B entries: ||.|| = sqrt(B) 1e-6."""
    student, _ = similarity_inputs(900 + batch, batch)
    ours = pdist_loss(jnp.asarray(student), jnp.asarray(student[None]))
    np.testing.assert_allclose(float(ours), math.sqrt(batch) * 1e-6, rtol=1e-3)


def _with_clamped_entries(similarity, seed):
    """Put exact 1s and values above 1 (2 - 2S <= 0: the clamp) into a similarity matrix."""
    rng = np.random.default_rng(seed)
    similarity = similarity.copy()
    flat = similarity.reshape(-1)
    chosen = rng.choice(flat.size, size=max(1, flat.size // 3), replace=False)
    flat[chosen] = rng.choice(np.array([1.0, 1.25], np.float32), size=chosen.size)
    return similarity


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("aggregation", AGGREGATIONS)
@pytest.mark.parametrize("delta", [1.0, 0.2])
def test_pdist_dist_matches_huber_between_distance_matrices(batch, aggregation, delta):
    """pdist_dist_loss is the mean Huber between sqrt(max(2 - 2S, 1e-12)) and the same of Phi,
    including entries where the clamp applies (S >= 1)."""
    student, teachers = similarity_inputs(1000 + batch, batch, student_scale=1.0)
    student = _with_clamped_entries(student, 1100 + batch)
    teachers = np.stack([_with_clamped_entries(t, 1200 + batch + n) for n, t in enumerate(teachers)])
    ours = pdist_dist_loss(jnp.asarray(student), jnp.asarray(teachers), aggregation=aggregation, delta=delta)
    assert_close(ours, np_pdist_dist(student, teachers, aggregation, delta), atol=1e-6)


@pytest.mark.parametrize("batch", BATCHES)
def test_pdist_dist_is_zero_for_equal_matrices_and_has_finite_gradients_at_the_clamp(batch):
    """Equal student and target give 0; entries with S = 1 or S > 1 (2 - 2S <= 0) give finite
    gradients thanks to the 1e-12 clamp."""
    student, teachers = similarity_inputs(1300 + batch, batch, student_scale=1.0)
    student = _with_clamped_entries(student, 1400 + batch)
    assert abs(float(pdist_dist_loss(jnp.asarray(student), jnp.asarray(student[None])))) <= 1e-12
    gradient = compiled_grad(pdist_dist_loss)(jnp.asarray(student), jnp.asarray(teachers))
    assert np.all(np.isfinite(np.asarray(gradient)))


# -- DL-DKD++ batch KL (spec 3.8) ------------------------------------------------------------------


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("temperature", [1e-3, 0.2, 1.0, 100.0])
@pytest.mark.parametrize("aggregation, directions",
                         [("mean", "both"), ("min", "both"), ("max", "both"), ("mean", "rows"), ("max", "columns")])
def test_kl_batch_matches_the_two_batchmean_kls(batch, temperature, aggregation, directions):
    """kl_batch_loss is KL_batchmean(softmax_row(Phi/T) || softmax_row(S/T)) plus the same on the
    transposes (teacher first), finite and matching a stable log-softmax from T = 1e-3 to T = 100."""
    student, teachers = similarity_inputs(1500 + batch, batch, student_scale=1.0)
    ours = kl_batch_loss(
        jnp.asarray(student), jnp.asarray(teachers), temperature=temperature, aggregation=aggregation,
        directions=directions,
    )
    reference = np_kl_batch(student, teachers, temperature, aggregation, directions)
    assert_close(ours, reference, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("temperature", [1e-3, 0.2, 100.0])
def test_kl_batch_of_identical_matrices_is_zero(batch, temperature):
    """KL(P || P) = 0 in both directions."""
    student, _ = similarity_inputs(1600 + batch, batch, student_scale=1.0)
    ours = kl_batch_loss(jnp.asarray(student), jnp.asarray(student[None]), temperature=temperature)
    assert abs(float(ours)) <= 1e-6


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("temperature", [1e-3, 100.0])
def test_kl_batch_gradients_are_finite_at_extreme_temperatures(batch, temperature):
    """No NaN or infinity in the student's gradient, even where target probabilities underflow."""
    student, teachers = similarity_inputs(1700 + batch, batch, student_scale=1.0)
    loss = compiled_grad(lambda s, t: kl_batch_loss(s, t, temperature=temperature))
    gradient = loss(jnp.asarray(student), jnp.asarray(teachers))
    assert np.all(np.isfinite(np.asarray(gradient)))


# -- RKD (spec 5) and the relational reading on similarity rows (spec 2.4 item 5) ------------------


def rkd_points(seed, n, dim, teacher_dim):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(n, dim)).astype(np.float32), rng.normal(size=(n, teacher_dim)).astype(np.float32))


def degenerate_points(seed, n, dim):
    """Points on a grid of quarters (float32 Gram expansions are exact), with a zero vector and
    duplicated points (zero differences, identical off-diagonal pairs)."""
    rng = np.random.default_rng(seed)
    points = (rng.integers(-4, 5, (n, dim)) / 4.0).astype(np.float32)
    points[0] = 0.0
    points[-1] = points[1]
    if n >= 5:
        points[2] = points[1]
    return points


@pytest.mark.parametrize("n", BATCHES)
@pytest.mark.parametrize("dim, teacher_dim", [(3, 3), (4, 6)])
@pytest.mark.parametrize("delta", [1.0, 0.1])
def test_rkd_distance_matches_numpy(n, dim, teacher_dim, delta):
    """rkd_distance_loss is 1/N^2 sum_ij h(d^S / mu^S - d^T / mu^T) with RKD's pdist."""
    student, teacher = rkd_points(1800 + n + dim, n, dim, teacher_dim)
    ours = rkd_distance_loss(jnp.asarray(student), jnp.asarray(teacher), delta=delta)
    assert_close(ours, np_rkd_distance(student, teacher, delta), atol=1e-6)


@pytest.mark.parametrize("n", BATCHES)
@pytest.mark.parametrize("dim, teacher_dim", [(3, 3), (4, 6)])
@pytest.mark.parametrize("delta", [1.0, 0.1])
def test_rkd_angle_matches_numpy(n, dim, teacher_dim, delta):
    """rkd_angle_loss is 1/N^3 sum_abc h(<e_ab, e_ac>^S - <e_ab, e_ac>^T)."""
    student, teacher = rkd_points(1900 + n + dim, n, dim, teacher_dim)
    ours = rkd_angle_loss(jnp.asarray(student), jnp.asarray(teacher), delta=delta)
    assert_close(ours, np_rkd_angle(student, teacher, delta), atol=1e-6)


@pytest.mark.parametrize("n", BATCHES)
@pytest.mark.parametrize("distance_weight, angle_weight", [(1.0, 2.0), (0.0, 2.0), (1.0, 0.0), (0.5, 3.0)])
def test_rkd_loss_is_the_weighted_sum(n, distance_weight, angle_weight):
    """rkd_loss = lambda_D L_D + lambda_A L_A (a zero weight drops its part)."""
    student, teacher = rkd_points(2000 + n, n, 4, 6)
    ours = rkd_loss(jnp.asarray(student), jnp.asarray(teacher), distance_weight=distance_weight,
                    angle_weight=angle_weight)
    expected = distance_weight * np_rkd_distance(student, teacher) + angle_weight * np_rkd_angle(student, teacher)
    assert_close(ours, expected, atol=1e-6)


def test_rkd_loss_defaults_to_weights_one_and_two():
    """The default weights are lambda_D = 1 and lambda_A = 2 (RKD's example scripts)."""
    student, teacher = rkd_points(2050, 5, 4, 6)
    expected = np_rkd_distance(student, teacher) + 2.0 * np_rkd_angle(student, teacher)
    assert_close(rkd_loss(jnp.asarray(student), jnp.asarray(teacher)), expected, atol=1e-6)


@pytest.mark.parametrize("n", [5, 8])
@pytest.mark.parametrize("side", ["student", "teacher"])
def test_rkd_distance_counts_identical_points_at_one_micro_in_the_mean(n, side):
    """A zero vector and identical off-diagonal points: d = sqrt(1e-12) = 1e-6, which counts in
    mu; the result differs from leaving those pairs out of the mean."""
    degenerate = degenerate_points(2100 + n, n, 3)
    regular, _ = rkd_points(2200 + n, n, 3, 3)
    student, teacher = (degenerate, regular) if side == "student" else (regular, degenerate)
    ours = float(rkd_distance_loss(jnp.asarray(student), jnp.asarray(teacher)))
    assert_close(ours, np_rkd_distance(student, teacher), atol=1e-7)

    d = np_rkd_pairwise(degenerate)
    assert np.isclose(d[1, n - 1], 1e-6)
    positive_pairs = d[d > 1e-3]
    mu_without_duplicates = positive_pairs.mean()
    psi_without = d / mu_without_duplicates
    psi_other = np_rkd_pairwise(regular)
    psi_other = psi_other / psi_other[~np.eye(n, dtype=bool)].mean()
    pairs = (psi_without, psi_other) if side == "student" else (psi_other, psi_without)
    alternative = float(np.mean(np_huber(pairs[0] - pairs[1])))
    assert not np.isclose(ours, alternative, rtol=1e-4, atol=0.0)


@pytest.mark.parametrize("n", [5, 8])
@pytest.mark.parametrize("side", ["student", "teacher"])
def test_rkd_angle_counts_degenerate_triplets_in_the_n_cubed_mean(n, side):
    """Zero differences normalise to the zero vector: their angles are 0, and they still count
    in the mean over all N^3 triplets."""
    degenerate = degenerate_points(2300 + n, n, 3)
    regular, _ = rkd_points(2400 + n, n, 3, 3)
    student, teacher = (degenerate, regular) if side == "student" else (regular, degenerate)
    ours = float(rkd_angle_loss(jnp.asarray(student), jnp.asarray(teacher)))
    assert_close(ours, np_rkd_angle(student, teacher), atol=1e-7)
    angles = np_rkd_angles(degenerate)
    assert angles[0, 0, 1] == 0.0 and angles[1, n - 1, 2] == 0.0


@pytest.mark.parametrize("n", [5])
def test_rkd_gradients_are_finite_with_identical_points(n):
    """Two identical points (and a zero point) give finite student gradients for L_D, L_A and the sum."""
    student = degenerate_points(2500 + n, n, 3)
    _, teacher = rkd_points(2600 + n, n, 3, 3)
    for loss in (rkd_distance_loss, rkd_angle_loss, rkd_loss):
        gradient = compiled_grad(loss)(jnp.asarray(student), jnp.asarray(teacher))
        assert np.all(np.isfinite(np.asarray(gradient))), loss.__name__


@pytest.mark.parametrize("n", BATCHES)
def test_rkd_is_invariant_to_student_scale_and_zero_for_a_scaled_copy(n):
    """psi_D divides by the mean distance and psi_A uses unit directions: scaling (and, for the
    angle, translating) the student changes nothing, and a scaled, shifted copy of the teacher
    scores 0."""
    student, teacher = rkd_points(2700 + n, n, 3, 3)
    shifted = 2.5 * student + np.float32(0.75)
    for loss in (rkd_distance_loss, rkd_angle_loss):
        np.testing.assert_allclose(
            float(loss(jnp.asarray(2.5 * student), jnp.asarray(teacher))),
            float(loss(jnp.asarray(student), jnp.asarray(teacher))), rtol=1e-4, atol=1e-7,
        )
    np.testing.assert_allclose(
        float(rkd_angle_loss(jnp.asarray(shifted), jnp.asarray(teacher))),
        float(rkd_angle_loss(jnp.asarray(student), jnp.asarray(teacher))), rtol=1e-4, atol=1e-7,
    )
    assert float(rkd_loss(jnp.asarray(shifted), jnp.asarray(student))) <= 1e-8


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_relational_on_similarity_rows_treats_each_row_as_a_point(batch, aggregation):
    """TeachText's relational reading: RKD between the rows of S and the rows of Phi(S_t), each
    caption a point given by its similarity profile over the videos."""
    student, teachers = similarity_inputs(2800 + batch, batch)
    target = np.asarray(np_aggregate(teachers, aggregation), np.float32)
    ours = rkd_loss(jnp.asarray(student), jnp.asarray(target))
    expected = np_rkd_distance(student, target) + 2.0 * np_rkd_angle(student, target)
    assert_close(ours, expected, atol=1e-6)


# -- LINAS (spec 4.3-4.4) --------------------------------------------------------------------------


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("mask, parameters, aggregation", [
    ("diag", None, "mean"), ("diag", None, "max"), ("full", None, "min"), ("full", None, "mean"),
    ("adapt", None, "mean"), ("adapt", (2.0, -0.5), "max"), ("adapt", (-1.0, 0.3), "min"),
])
def test_linas_relational_matches_numpy(batch, aggregation, mask, parameters):
    """diag: sum_i h(s_ii); full: sum_ij h(s_ij); adapt: B sum_ij W_ij h(s_ij), W a softmax over
    each caption's videos of p1 (positive) / p2 (negatives), (1, 1) by default."""
    student, teachers = similarity_inputs(2900 + batch, batch)
    ours = linas_relational_loss(
        jnp.asarray(student), jnp.asarray(teachers), mask=mask, aggregation=aggregation,
        mask_parameters=None if parameters is None else jnp.asarray(parameters, jnp.float32),
    )
    expected = np_linas_relational(student, teachers, mask, aggregation, 1.0, parameters or (1.0, 1.0))
    assert_close(ours, expected, atol=1e-6)


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("p", [1.0, -2.0, 3.5])
def test_linas_adapt_with_equal_parameters_is_the_full_sum(batch, p):
    """p1 = p2 makes W = 1/B everywhere, so B sum W h = sum h (the full mask)."""
    student, teachers = similarity_inputs(3000 + batch, batch)
    args = (jnp.asarray(student), jnp.asarray(teachers))
    adapt = linas_relational_loss(*args, mask="adapt", mask_parameters=jnp.asarray([p, p], jnp.float32))
    full = linas_relational_loss(*args, mask="full")
    np.testing.assert_allclose(float(adapt), float(full), rtol=1e-5)


@pytest.mark.parametrize("batch", BATCHES)
def test_linas_adapt_puts_the_closed_form_weight_on_the_positives(batch):
    """With errors on the positives only, adapt = B * e^p1 / (e^p1 + (B - 1) e^p2) * sum_i h(s_ii)."""
    rng = np.random.default_rng(3100 + batch)
    teachers = rng.uniform(-1, 1, (1, batch, batch)).astype(np.float32)
    student = teachers[0].copy()
    np.fill_diagonal(student, np.diagonal(student) + rng.uniform(-2, 2, batch).astype(np.float32))
    p1, p2 = 0.7, -0.4
    ours = linas_relational_loss(jnp.asarray(student), jnp.asarray(teachers), mask="adapt",
                                 mask_parameters=jnp.asarray([p1, p2], jnp.float32))
    weight = math.exp(p1) / (math.exp(p1) + (batch - 1) * math.exp(p2))
    diagonal = np.diagonal(student).astype(np.float64) - np.diagonal(teachers[0]).astype(np.float64)
    assert_close(ours, batch * weight * float(np.sum(np_huber(diagonal))), atol=1e-6)


def mask_inputs(seed, batch, teachers=3):
    """Teachers of magnitude in [0.1, 1] with a common sign per entry, so |Phi| >= 0.1 for every
    aggregation and the relative error is well conditioned."""
    rng = np.random.default_rng(seed)
    sign = rng.choice([-1.0, 1.0], size=(batch, batch))
    stack = (sign[None] * rng.uniform(0.1, 1.0, (teachers, batch, batch))).astype(np.float32)
    student = rng.uniform(-2.0, 2.0, (batch, batch)).astype(np.float32)
    return student, stack


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("aggregation, parameters", [("mean", (1.0, 1.0)), ("min", (0.5, -1.5)),
                                                     ("max", (-2.0, 0.25)), ("mean", (-0.5, 1.5))])
def test_mask_objective_value_and_gradient_match_numpy(batch, aggregation, parameters):
    """mask_objective = B sum_ij W_ij h(S_ij - Phi_ij) / (|Phi_ij| + 1e-6), and its gradient in
    (p1, p2) matches a float64 central finite difference."""
    student, teachers = mask_inputs(3200 + batch, batch)
    args = (jnp.asarray(student), jnp.asarray(teachers))
    theta = jnp.asarray(parameters, jnp.float32)
    assert_close(mask_objective(theta, *args, aggregation=aggregation),
                 np_mask_objective(parameters, student, teachers, aggregation, 1.0), rtol=1e-5, atol=1e-5)
    ours = np.asarray(compiled_grad(lambda p, s, t: mask_objective(p, s, t, aggregation=aggregation))(theta, *args))
    expected = numeric_gradient(lambda p: np_mask_objective(p, student, teachers, aggregation, 1.0),
                                np.asarray(parameters, np.float64))
    np.testing.assert_allclose(ours, expected, rtol=1e-4, atol=1e-4 * (1.0 + np.max(np.abs(expected))))


@pytest.mark.parametrize("batch, block", [(8, 3)])
def test_mask_objective_of_row_blocks_sums_to_the_whole(batch, block):
    """Rows [b, B] with their first global row give their share: the shares add up to the whole."""
    student, teachers = mask_inputs(3300 + batch, batch)
    theta = jnp.asarray([0.3, -0.8], jnp.float32)
    shares = [
        float(mask_objective(theta, jnp.asarray(student[start:start + block]),
                             jnp.asarray(teachers[:, start:start + block]), first_row=start))
        for start in range(0, batch, block)
    ]
    assert_close(sum(shares), np_mask_objective((0.3, -0.8), student, teachers, "mean", 1.0), atol=1e-5)


@pytest.mark.parametrize("batch", BATCHES)
def test_linas_masks_pass_no_gradient_across_the_em_steps(batch):
    """The student step holds W fixed (no gradient into (p1, p2)) and the M-step holds every
    similarity fixed (no gradient into S)."""
    student, teachers = mask_inputs(3400 + batch, batch)
    args = (jnp.asarray(student), jnp.asarray(teachers))
    theta = jnp.asarray([0.5, -0.5], jnp.float32)
    into_mask = compiled_grad(lambda p: linas_relational_loss(*args, mask="adapt", mask_parameters=p))(theta)
    assert np.all(np.asarray(into_mask) == 0.0)
    into_student = compiled_grad(lambda s: mask_objective(theta, s, args[1]))(args[0])
    assert np.all(np.asarray(into_student) == 0.0)


# -- feature-level distillation (TeachText "Embd regress", LINAS spec 4.3) -------------------------


def feature_inputs(seed, batch, teachers):
    """Student text / video embeddings (with one expert no teacher has) and teachers' embeddings."""
    rng = np.random.default_rng(seed)
    dims = {"audio": 3, "rgb": 4, "extra": 2}
    student_text = {m: rng.normal(size=(batch, d)).astype(np.float32) for m, d in dims.items()}
    student_video = {m: rng.normal(size=(batch, d)).astype(np.float32) for m, d in dims.items()}
    teacher_list = [
        ({m: rng.normal(size=(batch, dims[m])).astype(np.float32) for m in ("audio", "rgb")},
         {m: rng.normal(size=(batch, dims[m])).astype(np.float32) for m in ("audio", "rgb")})
        for _ in range(teachers)
    ]
    return student_text, student_video, teacher_list, ("audio", "rgb")


def jnp_teachers(teachers):
    return [(jnp_dict(text), jnp_dict(video)) for text, video in teachers]


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("teachers", [1, 3])
@pytest.mark.parametrize("text, video", [(True, True), (True, False), (False, True)])
def test_embedding_regression_matches_numpy(batch, teachers, text, video):
    """Mean over teachers of 1/(B |experts|) times the summed squared errors of the chosen sides,
    over the shared experts only."""
    student_text, student_video, teacher_list, experts = feature_inputs(3500 + batch + teachers, batch, teachers)
    ours = embedding_regression_loss(jnp_dict(student_text), jnp_dict(student_video), jnp_teachers(teacher_list),
                                     experts, text=text, video=video)
    assert_close(ours, np_embedding_regression(student_text, student_video, teacher_list, experts, text, video))


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("teachers", [1, 3])
@pytest.mark.parametrize("video_weight", [1.0, 0.0, 0.25])
def test_linas_feature_matches_numpy(batch, teachers, video_weight):
    """Mean over teachers of sum ||t^S - t^T||^2 + gamma sum ||v^S - v^T||^2 (MSELoss sum)."""
    student_text, student_video, teacher_list, experts = feature_inputs(3600 + batch + teachers, batch, teachers)
    ours = linas_feature_loss(jnp_dict(student_text), jnp_dict(student_video), jnp_teachers(teacher_list),
                              experts, video_weight=video_weight)
    assert_close(ours, np_linas_feature(student_text, student_video, teacher_list, experts, video_weight))


@pytest.mark.parametrize("batch", BATCHES)
def test_feature_losses_are_zero_when_the_student_copies_its_teacher(batch):
    """A student equal to its single teacher on the shared experts scores 0 (its extra expert is ignored)."""
    student_text, student_video, teacher_list, experts = feature_inputs(3700 + batch, batch, 1)
    copy_text = {**student_text, **teacher_list[0][0]}
    copy_video = {**student_video, **teacher_list[0][1]}
    for loss in (embedding_regression_loss, linas_feature_loss):
        assert float(loss(jnp_dict(copy_text), jnp_dict(copy_video), jnp_teachers(teacher_list), experts)) == 0.0


# -- the teacher side gets no gradient -------------------------------------------------------------

TEACHER_MATRIX_LOSSES = {
    "teachtext": lambda s, t: teachtext_loss(s, t),
    "teachtext_l1": lambda s, t: teachtext_loss(s, t, kind="l1", aggregation="max"),
    "rank_k": lambda s, t: rank_k_loss(s, t, k=2),
    "rank_k_listwise": lambda s, t: rank_k_listwise_loss(s, t, k=3, temperature=0.5),
    "pdist": lambda s, t: pdist_loss(s, t),
    "pdist_dist": lambda s, t: pdist_dist_loss(s, t, aggregation="min"),
    "kl_batch": lambda s, t: kl_batch_loss(s, t),
    "relational": lambda s, t: rkd_loss(s, jnp.mean(t, axis=0)),
    "linas_diag": lambda s, t: linas_relational_loss(s, t, mask="diag"),
    "linas_adapt": lambda s, t: linas_relational_loss(s, t, mask="adapt"),
    "mask_objective": lambda s, t: mask_objective(jnp.asarray([0.2, 0.1], jnp.float32), s, t),
}


@pytest.mark.parametrize("name", sorted(TEACHER_MATRIX_LOSSES))
@pytest.mark.parametrize("batch", [5, 8])
def test_teacher_matrices_get_no_gradient(name, batch):
    """Teacher quantities are under stop_gradient: the gradient w.r.t. the teacher stack is exactly 0."""
    student, teachers = similarity_inputs(3800 + batch, batch, student_scale=1.0)
    gradient = compiled_grad(TEACHER_MATRIX_LOSSES[name], argnums=1)(jnp.asarray(student), jnp.asarray(teachers))
    assert np.all(np.asarray(gradient) == 0.0)


@pytest.mark.parametrize("batch", [5, 8])
@pytest.mark.parametrize("loss", [embedding_regression_loss, linas_feature_loss])
def test_teacher_embeddings_get_no_gradient(batch, loss):
    """The feature losses pass no gradient into any teacher embedding, and some into the student."""
    student_text, student_video, teacher_list, experts = feature_inputs(3900 + batch, batch, 2)
    teachers = jnp_teachers(teacher_list)
    to_teachers = compiled_grad(lambda t: loss(jnp_dict(student_text), jnp_dict(student_video), t, experts))(teachers)
    assert all(np.all(np.asarray(leaf) == 0.0) for leaf in jax.tree_util.tree_leaves(to_teachers))
    to_student = compiled_grad(lambda s: loss(s, jnp_dict(student_video), teachers, experts))(jnp_dict(student_text))
    assert any(np.any(np.asarray(leaf) != 0.0) for leaf in jax.tree_util.tree_leaves(to_student))


# -- "From Within to Between" (spec 7) -------------------------------------------------------------


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("temperature", [5.0, 0.5])
@pytest.mark.parametrize("missing", [False, True])
@pytest.mark.parametrize("keep_missing", [False, True])
def test_caption_distillation_matches_numpy(batch, temperature, missing, keep_missing):
    """L_cap = 1/B sum_i KL(softmax_j(S^tt_ij / tau) || softmax_j(S_ij / tau)), every pair (i, j)
    weighted with caption i's availability-renormalised mixture weights against video j."""
    text, video, moe, availability = embedding_inputs(4000 + batch, batch, missing)
    ours = caption_distillation_loss(jnp_dict(text), jnp_dict(video), jnp.asarray(moe), jnp.asarray(availability),
                                     EXPERTS, temperature=temperature, keep_missing_modalities=keep_missing)
    expected = np_caption_distillation(text, video, moe, availability, EXPERTS, temperature, keep_missing)
    assert_close(ours, expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("temperature", [1.0, 5.0])
@pytest.mark.parametrize("missing", [False, True])
@pytest.mark.parametrize("keep_missing", [False, True])
def test_video_distillation_matches_numpy(batch, temperature, missing, keep_missing):
    """L_vid = 1/B sum_j KL(softmax(S^vv_j: / tau) || softmax(S_:j / tau)): each video's distribution
    over captions pulled toward its distribution over the batch's videos."""
    text, video, moe, availability = embedding_inputs(4100 + batch, batch, missing)
    ours = video_distillation_loss(jnp_dict(text), jnp_dict(video), jnp.asarray(moe), jnp.asarray(availability),
                                   EXPERTS, temperature=temperature, keep_missing_modalities=keep_missing)
    expected = np_video_distillation(text, video, moe, availability, EXPERTS, temperature, keep_missing)
    assert_close(ours, expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("missing", [False, True])
def test_within_losses_vanish_when_captions_equal_their_videos(batch, missing):
    """With t_i = v_i, S^tt = S, so L_cap = 0; with uniform mixture weights and every expert
    present the pair weights are symmetric, S^vv = S^T, so L_vid = 0 too."""
    text, video, moe, availability = embedding_inputs(4200 + batch, batch, missing)
    cap = caption_distillation_loss(jnp_dict(video), jnp_dict(video), jnp.asarray(moe), jnp.asarray(availability),
                                    EXPERTS)
    assert abs(float(cap)) <= 1e-6
    uniform = jnp.full(moe.shape, 1.0 / len(EXPERTS), jnp.float32)
    vid = video_distillation_loss(jnp_dict(video), jnp_dict(video), uniform, jnp.ones(availability.shape), EXPERTS)
    assert abs(float(vid)) <= 1e-6


def _flat_gradient_check(ours: dict, numpy_loss, arrays: dict, rtol=2e-3):
    """Compare a JAX gradient dict with float64 central differences of `numpy_loss(arrays)`."""
    for name in arrays:
        def partial(x, name=name):
            return numpy_loss({**arrays, name: x})

        expected = numeric_gradient(partial, arrays[name])
        scale = 1e-6 + np.max(np.abs(expected))
        np.testing.assert_allclose(np.asarray(ours[name]), expected, rtol=rtol, atol=rtol * scale, err_msg=name)


@pytest.mark.parametrize("batch", [4])
@pytest.mark.parametrize("missing", [False, True])
@pytest.mark.parametrize("detach_target", [False, True])
def test_caption_distillation_gradient_follows_detach_target(batch, missing, detach_target):
    """detach_target=False sends gradient into the text embeddings through S^tt as well as S;
    detach_target=True gives the gradient with S^tt held constant (float64 finite differences)."""
    text, video, moe, availability = embedding_inputs(4300 + batch, batch, missing)
    temperature = 1.0
    text64 = {m: v.astype(np.float64) for m, v in text.items()}
    video64 = {m: v.astype(np.float64) for m, v in video.items()}

    ours_text, ours_video = compiled_grad(
        lambda t, v: caption_distillation_loss(t, v, jnp.asarray(moe), jnp.asarray(availability), EXPERTS,
                                               temperature=temperature, detach_target=detach_target),
        argnums=(0, 1),
    )(jnp_dict(text), jnp_dict(video))

    def text_loss(t):
        return np_caption_distillation(t, video64, moe, availability, EXPERTS, temperature,
                                       target_text=text64 if detach_target else t)

    _flat_gradient_check(ours_text, text_loss, text64)
    _flat_gradient_check(ours_video, lambda v: np_caption_distillation(
        text64, v, moe, availability, EXPERTS, temperature), video64)

    other = compiled_grad(
        lambda t: caption_distillation_loss(t, jnp_dict(video), jnp.asarray(moe), jnp.asarray(availability), EXPERTS,
                                            temperature=temperature, detach_target=not detach_target)
    )(jnp_dict(text))
    difference = max(float(np.max(np.abs(np.asarray(ours_text[m]) - np.asarray(other[m])))) for m in EXPERTS)
    assert difference > 1e-3


@pytest.mark.parametrize("batch", [4])
@pytest.mark.parametrize("detach_target", [False, True])
def test_caption_distillation_detached_gradient_equals_a_constant_target(batch, detach_target):
    """With detach_target=True the gradient equals that of the same KL with S^tt passed in as a
    constant; with False it does not."""
    text, video, moe, availability = embedding_inputs(4400 + batch, batch, True)
    moe_j, availability_j = jnp.asarray(moe), jnp.asarray(availability)
    temperature = 2.0
    constant_target = weighted_similarity(jnp_dict(text), jnp_dict(text), moe_j, availability_j, EXPERTS)

    def with_constant_target(t):
        similarity = weighted_similarity(t, jnp_dict(video), moe_j, availability_j, EXPERTS)
        log_p = jax.nn.log_softmax(constant_target / temperature, axis=1)
        log_q = jax.nn.log_softmax(similarity / temperature, axis=1)
        return jnp.mean(jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=1))

    reference = compiled_grad(with_constant_target)(jnp_dict(text))
    ours = compiled_grad(lambda t: caption_distillation_loss(t, jnp_dict(video), moe_j, availability_j, EXPERTS,
                                                        temperature=temperature, detach_target=detach_target))(
        jnp_dict(text))
    same = all(np.allclose(np.asarray(ours[m]), np.asarray(reference[m]), rtol=1e-5, atol=1e-7) for m in EXPERTS)
    assert same == detach_target


@pytest.mark.parametrize("batch", [4])
@pytest.mark.parametrize("detach_target", [False, True])
def test_video_distillation_gradient_follows_detach_target(batch, detach_target):
    """The same for L_vid: gradient into the video embeddings through S^vv unless detached."""
    text, video, moe, availability = embedding_inputs(4500 + batch, batch, True)
    temperature = 1.0
    text64 = {m: v.astype(np.float64) for m, v in text.items()}
    video64 = {m: v.astype(np.float64) for m, v in video.items()}
    ours = compiled_grad(
        lambda v: video_distillation_loss(jnp_dict(text), v, jnp.asarray(moe), jnp.asarray(availability), EXPERTS,
                                          temperature=temperature, detach_target=detach_target)
    )(jnp_dict(video))

    def video_loss(v):
        return np_video_distillation(text64, v, moe, availability, EXPERTS, temperature,
                                     target_video=video64 if detach_target else v)

    _flat_gradient_check(ours, video_loss, video64)


# -- DL-DKD schedules (spec 3.4) -------------------------------------------------------------------

SPEC_TABLE = {  # e: (exp, linear, sigmoid), "Values of w(e)"
    0: (1.0, 1.0, 0.99875),
    10: (0.5987, 0.90, 0.99566),
    20: (0.3585, 0.80, 0.98500),
    50: (0.0769, 0.50, 0.6070),
    95: (0.0077, 0.05, 0.0055),
}


@pytest.mark.parametrize("epoch", sorted(SPEC_TABLE))
@pytest.mark.parametrize("column, kind", [(0, "exp"), (1, "linear"), (2, "sigmoid")])
def test_decay_factor_reproduces_the_spec_table(epoch, column, kind):
    """w(e) at the tabulated epochs, to the table's last printed digit."""
    value = float(decay_factor(Schedule(kind=kind), epoch))
    np.testing.assert_allclose(value, SPEC_TABLE[epoch][column], rtol=0, atol=5e-5 + 1e-7)


@pytest.mark.parametrize("kind, k", [("none", None), ("exp", None), ("exp", 0.8), ("linear", None),
                                     ("linear", -0.03), ("sigmoid", None), ("sigmoid", 50.0)])
@pytest.mark.parametrize("epoch", [0.0, 0.5, 3.0, 17.25, 53.5, 99.0])
def test_decay_factor_matches_the_formulas(kind, k, epoch):
    """none 1; exp k^e; linear max(k e + b, floor); sigmoid k / (k + exp(100 e / k)), for fractional
    epochs and non-default constants."""
    value = float(decay_factor(Schedule(kind=kind, k=k), epoch))
    np.testing.assert_allclose(value, np_decay(kind, epoch, k), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("b, floor", [(0.8, 0.1), (1.0, 0.0), (0.5, 0.3)])
def test_linear_decay_uses_its_intercept_and_floor(b, floor):
    """linear: w(e) = max(k e + b, floor) with the given b and floor."""
    schedule = Schedule(kind="linear", b=b, floor=floor)
    for epoch in (0, 10, 40, 90, 150):
        np.testing.assert_allclose(float(decay_factor(schedule, epoch)), np_decay("linear", epoch, b=b, floor=floor),
                                   rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("decay", ["exp", "linear", "sigmoid"])
@pytest.mark.parametrize("weight", [0.1, 1.0, 0.5])
@pytest.mark.parametrize("epoch", [0, 1, 10, 50, 95])
def test_term_weight_scales_and_the_up_variants_grow(decay, weight, epoch):
    """lambda = weight w(e) for a decay; weight (1 - w(e)) + 0.1 for its "up" variant (spec 3.4
    with weight 0.1: 0.1 (1 - w(e)) + 0.1)."""
    steps_per_epoch = 4
    step = epoch * steps_per_epoch + 1
    w = np_decay(decay, epoch)
    down = float(term_weight(weight, Schedule(kind=decay), step, steps_per_epoch))
    up = float(term_weight(weight, Schedule(kind=f"{decay}_up"), step, steps_per_epoch))
    np.testing.assert_allclose(down, weight * w, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(up, weight * (1.0 - w) + 0.1, rtol=1e-5, atol=1e-7)


def test_constant_schedule_keeps_the_weight():
    """kind "none" gives lambda = weight at every step."""
    for step in (0, 5, 1234):
        assert float(term_weight(0.7, Schedule(), step, 10)) == pytest.approx(0.7, rel=1e-7)


@pytest.mark.parametrize("decay", ["exp", "linear", "sigmoid", "exp_up"])
@pytest.mark.parametrize("steps_per_epoch", [1, 7, 1000, 12288])
def test_epoch_unit_is_the_floor_and_step_unit_is_fractional(decay, steps_per_epoch):
    """unit "epoch": e = floor(step / steps_per_epoch), so the weight changes exactly at epoch
    boundaries; unit "step": e = step / steps_per_epoch."""
    def expected(e):
        w = np_decay(decay.removesuffix("_up"), e)
        return 0.5 * (1 - w) + 0.1 if decay.endswith("_up") else 0.5 * w

    for epoch in (0, 1, 3, 42, 99):
        for offset in (-1, 0, 1, steps_per_epoch // 2):
            step = epoch * steps_per_epoch + offset
            if step < 0:
                continue
            by_epoch = float(term_weight(0.5, Schedule(kind=decay, unit="epoch"), step, steps_per_epoch))
            by_step = float(term_weight(0.5, Schedule(kind=decay, unit="step"), step, steps_per_epoch))
            np.testing.assert_allclose(by_epoch, expected(step // steps_per_epoch), rtol=1e-5, atol=1e-7,
                                       err_msg=f"epoch unit, step {step}")
            np.testing.assert_allclose(by_step, expected(step / steps_per_epoch), rtol=1e-5, atol=1e-7,
                                       err_msg=f"step unit, step {step}")
