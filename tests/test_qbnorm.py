"""QB-Norm (IS, DIS) and CSLS against a numpy implementation written from the method's
definition (distillation_methods_spec.md section 6), streamed and sharded or on whole arrays."""

from __future__ import annotations

import numpy as np
import pytest

from test_streamed_ranks import DEVICES, numpy_similarity, random_problem
from tt_jax import parallel, qbnorm
from tt_jax.qbnorm import QBNormError, QBNormSettings
from tt_jax.streamed_ranks import streamed_ranks


def numpy_qbnorm(test: np.ndarray, bank: np.ndarray, method: str, beta: float, k: int):
    """(scores [Q, G], rescored [Q]) in float64, exp space for IS as the paper writes it."""
    if method == "csls":
        nearest = -np.sort(-bank, axis=0)[:k]  # each video's k most similar bank queries
        return 2 * test - nearest.mean(axis=0)[None, :], np.ones(len(test), bool)
    inverted = np.exp(beta * test) / np.exp(beta * bank).sum(axis=0)[None, :]
    if method == "is":
        return inverted, np.ones(len(test), bool)
    activation = np.unique(np.argsort(-bank, axis=1, kind="stable")[:, :k])
    top1 = np.argsort(-test, axis=1, kind="stable")[:, 0]
    rescored = np.isin(top1, activation)
    return np.where(rescored[:, None], inverted, test), rescored


def problem(seed=0, num_queries=40, num_videos=60, bank_size=7):
    rng = np.random.default_rng(seed)
    queries, gallery = random_problem(rng, num_queries, num_videos, dims=4)
    bank, _ = random_problem(rng, bank_size, num_videos, dims=4)
    # Similarities within [-1, 1], as cosines are: exp(beta s) stays within float64 for the oracle.
    largest = max(np.abs(numpy_similarity(q, gallery)).max() for q in (queries, bank))
    queries, bank = (q._replace(vectors=q.vectors / np.float32(largest)) for q in (queries, bank))
    targets = rng.integers(0, num_videos, num_queries)
    return queries, gallery, bank, targets


SETTINGS = [QBNormSettings("dis", beta=5.0), QBNormSettings("dis", beta=20.0, k=3), QBNormSettings("is", beta=5.0),
            QBNormSettings("csls", k=4)]


@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: f"{s.method}-beta{s.beta}-k{s.neighbours}")
def test_streamed_qbnorm_ranks_match_numpy_on_every_mesh(settings):
    queries, gallery, bank, targets = problem()
    test_sims, bank_sims = numpy_similarity(queries, gallery), numpy_similarity(bank, gallery)
    scores, rescored = numpy_qbnorm(test_sims, bank_sims, settings.method, settings.beta, settings.neighbours)
    if settings.method in ("is", "dis"):  # compare margins in log space, where the device ranks
        scores = np.where(rescored[:, None], np.log(np.where(rescored[:, None], scores, 1.0)), scores)
    own = scores[np.arange(len(targets)), targets][:, None]
    expected = np.sum(scores > own, axis=1).astype(np.float64)
    clear = np.all((np.abs(scores - own) > 1e-3) | (np.arange(60)[None, :] == targets[:, None]), axis=1)
    assert clear.mean() > 0.8
    if settings.method == "dis":
        assert 0 < rescored.mean() < 1  # some queries' top-1 falls outside the activation set

    results = []
    for devices in DEVICES:
        mesh = parallel.make_mesh(devices)
        rescoring = qbnorm.rescoring(settings, bank, gallery, mesh=mesh, block=16)
        results.append(streamed_ranks(queries, gallery, targets, mesh=mesh, block=16, rescoring=rescoring))
    for result in results:
        np.testing.assert_array_equal(result.ranks.text_to_video, results[0].ranks.text_to_video)
        assert result.rescored_fraction == results[0].rescored_fraction
    np.testing.assert_array_equal(results[0].ranks.text_to_video[clear], expected[clear])
    assert results[0].rescored_fraction == pytest.approx(rescored.mean())
    raw = streamed_ranks(queries, gallery, targets, block=16).ranks
    if settings.method == "dis":  # a query left out keeps its raw rank
        np.testing.assert_array_equal(results[0].ranks.text_to_video[~rescored], raw.text_to_video[~rescored])
    np.testing.assert_array_equal(results[0].ranks.video_to_text, raw.video_to_text)  # v2t is never rescored


@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: f"{s.method}-beta{s.beta}-k{s.neighbours}")
def test_normalized_similarities_on_whole_arrays_match_numpy(settings):
    queries, gallery, bank, _ = problem(seed=1)
    test_sims, bank_sims = numpy_similarity(queries, gallery), numpy_similarity(bank, gallery)
    expected, rescored = numpy_qbnorm(test_sims, bank_sims, settings.method, settings.beta, settings.neighbours)
    got = np.asarray(qbnorm.normalized_similarities(test_sims, bank_sims, settings), np.float64)
    if settings.method in ("is", "dis"):
        np.testing.assert_allclose(got[rescored], np.log(expected[rescored]), rtol=1e-5, atol=1e-4)
        np.testing.assert_allclose(got[~rescored], expected[~rescored], rtol=1e-6, atol=1e-6)
    else:
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_log_space_survives_a_temperature_that_overflows_exp():
    queries, gallery, bank, targets = problem(seed=2)
    huge = QBNormSettings("is", beta=500.0)  # exp(500 * s) overflows float32 for s > 0.18
    rescoring = qbnorm.rescoring(huge, bank, gallery, block=16)
    ranks = streamed_ranks(queries, gallery, targets, block=16, rescoring=rescoring).ranks.text_to_video
    assert np.all(np.isfinite(ranks)) and np.all(ranks >= 0)


def test_the_bank_subsample_is_seeded_sorted_and_of_the_asked_size():
    rows = qbnorm.bank_rows(1000, QBNormSettings(bank_size=50, seed=3))
    assert len(rows) == 50 == len(set(rows.tolist())) and np.all(np.diff(rows) > 0)
    np.testing.assert_array_equal(rows, qbnorm.bank_rows(1000, QBNormSettings(bank_size=50, seed=3)))
    assert not np.array_equal(rows, qbnorm.bank_rows(1000, QBNormSettings(bank_size=50, seed=4)))
    np.testing.assert_array_equal(qbnorm.bank_rows(30, QBNormSettings(bank_size=50)), np.arange(30))


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(beta=0.0), "beta must be a positive inverse temperature; got 0.0"),
        (dict(beta=-2), "beta must be a positive"),
        (dict(beta=float("nan")), "beta must be a positive"),
        (dict(method="softmax"), "method must be one of dis, is, csls; got 'softmax'"),
        (dict(k=0), "k must be a positive number of neighbours; got 0"),
        (dict(bank_size=0), "bank_size must be a positive number of captions or None"),
    ],
)
def test_bad_settings_are_refused_with_the_field_named(fields, message):
    with pytest.raises(QBNormError, match=message):
        QBNormSettings(**fields)


def test_k_beyond_the_gallery_or_the_bank_is_refused():
    queries, gallery, bank, _ = problem()
    with pytest.raises(QBNormError, match="top 61 videos but the gallery holds 60"):
        qbnorm.rescoring(QBNormSettings("dis", k=61), bank, gallery)
    with pytest.raises(QBNormError, match="k = 8 nearest bank queries but the bank holds 7"):
        qbnorm.rescoring(QBNormSettings("csls", k=8), bank, gallery)
    with pytest.raises(QBNormError, match="must be \\[Q, G\\] and \\[B, G\\]"):
        qbnorm.normalized_similarities(np.zeros((3, 4)), np.zeros((2, 5)))


def test_a_bank_split_that_does_not_exist_is_named():
    with pytest.raises(QBNormError, match="no split .training.; this dataset has train, val, test"):
        qbnorm.bank_store({"train": object(), "val": object(), "test": object()}, QBNormSettings(bank="training"))
