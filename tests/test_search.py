"""Top-k search (streamed, sharded), search with a model, the overlap of two models' hits, and
the evaluator's per-query ranks and QB-Norm option."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from test_evaluate import setup
from test_streamed_ranks import DEVICES, exact_split, numpy_similarity, random_problem
from tt_jax import evaluate as evaluate_module
from tt_jax import parallel
from tt_jax.errors import UserInputError
from tt_jax.evaluate import Evaluator
from tt_jax.models import init_variables
from tt_jax.qbnorm import QBNormSettings
from tt_jax.search import SearchError, retrieval_overlap, search, top_k
from tt_jax.train import run_stores


def numpy_top_k(sims: np.ndarray, k: int):
    order = np.argsort(-sims, axis=1, kind="stable")[:, :k]  # ties: the lower index first
    return np.take_along_axis(sims, order, axis=1), order


@pytest.mark.parametrize("k", [1, 4, 11])
def test_top_k_matches_a_stable_sort_with_ties_on_every_mesh(k):
    queries, gallery = exact_split(np.random.default_rng(0))  # video 1 duplicates video 0
    sims = numpy_similarity(queries, gallery)
    want_scores, want_videos = numpy_top_k(sims, k)
    for devices in DEVICES:
        for block in (None, 8):
            scores, videos = top_k(queries, gallery, k, mesh=parallel.make_mesh(devices), block=block)
            np.testing.assert_array_equal(videos, want_videos, err_msg=f"{devices} devices, block {block}")
            np.testing.assert_array_equal(scores, want_scores.astype(np.float32))


def test_approximate_top_k_is_exact_on_cpu():
    queries, gallery = random_problem(np.random.default_rng(1), 30, 200)
    exact = top_k(queries, gallery, 5, block=64)
    approximate = top_k(queries, gallery, 5, block=64, approximate=True)
    np.testing.assert_array_equal(approximate[1], exact[1])


@pytest.mark.parametrize("k, message", [(0, "k >= 1"), (-3, "k >= 1"), (12, "k = 12 videos but the gallery holds 11")])
def test_bad_k_is_refused(k, message):
    queries, gallery = exact_split(np.random.default_rng(0))
    with pytest.raises(SearchError, match=message):
        top_k(queries, gallery, k)


def test_retrieval_overlap_counts_hits_as_the_metrics_do():
    a = np.array([0.0, 0.0, 0.5, 3.0, 9.0])
    b = np.array([0.0, 2.0, 0.0, 0.0, 4.5])
    at_1 = retrieval_overlap(a, b, 1)  # 0.5 is a tie at the top: a miss at R@1
    assert at_1 == {"both": 20.0, "only_a": 20.0, "only_b": 40.0, "neither": 20.0}
    at_5 = retrieval_overlap(a, b, 5)
    assert at_5 == {"both": 80.0, "only_a": 0.0, "only_b": 20.0, "neither": 0.0}
    with pytest.raises(SearchError, match="same queries"):
        retrieval_overlap(a, b[:3])


def test_search_by_caption_and_by_token_features_agree_with_the_evaluator_ranks():
    model, store = setup()
    variables = init_variables(model, jax.random.key(3))
    ranks = Evaluator(model, store, "poor").run(variables, return_ranks=True)["ranks"].text_to_video
    captions = [(v, c) for v in range(store.num_videos) for c in range(store.max_captions) if store.caption_mask[v, c]]
    raw = {video_id: [f"{video_id} caption {c}" for c in range(store.max_captions)] for video_id in store.video_ids}
    found = search(store=store, model=model, variables=variables, text_name="poor", captions=captions, k=store.num_videos,
                   raw_captions=raw)
    assert found.query_captions == [raw[store.video_ids[v]][c] for v, c in captions]
    assert found.videos.shape == (len(captions), store.num_videos)
    # A caption's rank is the position of its own video in its list (no ties in random features).
    positions = np.array([list(row).index(v) for row, (v, _) in zip(found.videos, captions)])
    np.testing.assert_array_equal(positions, ranks)
    assert found.video_ids[0][0] == store.video_ids[found.videos[0, 0]]
    assert np.all(np.diff(found.scores, axis=1) <= 0)
    # The same captions given as token features.
    _, _, text, _ = store.eval_inputs("poor", model.config.text_max_tokens)
    features = np.stack([text[v, c] for v, c in captions[:4]])
    by_features = search(store=store, model=model, variables=variables, text_name="poor", text_features=features, k=3)
    np.testing.assert_array_equal(by_features.videos, found.videos[:4, :3])
    np.testing.assert_allclose(by_features.scores, found.scores[:4, :3], rtol=1e-5, atol=1e-6)


def test_search_refuses_queries_it_cannot_read():
    model, store = setup()
    variables = init_variables(model, jax.random.key(3))
    common = dict(model=model, variables=variables, text_name="poor")
    with pytest.raises(SearchError, match="one kind of them: sentences .*captions=.*text_features="):
        search(store=store, **common)
    with pytest.raises(SearchError, match=f"caption \\({store.num_videos}, 0\\) is not a caption of this split"):
        search(store=store, captions=[(store.num_videos, 0)], **common)
    with pytest.raises(SearchError, match="text_features must be \\[queries, tokens"):
        search(store=store, text_features=np.zeros((2, 3, model.config.text_dim + 1)), **common)


def test_the_evaluator_gives_qbnorm_t2v_and_keeps_the_raw_metrics():
    model, store = setup()
    from test_train import tiny_config

    train_store = run_stores(tiny_config("baseline"))["train"]
    variables = init_variables(model, jax.random.key(4))
    plain = Evaluator(model, store, "poor").run(variables)
    settings = QBNormSettings("dis", beta=20.0)
    normalised = Evaluator(model, store, "poor", qbnorm_settings=settings, bank_store=train_store).run(variables)
    assert normalised["t2v_raw"] == plain["t2v"] and normalised["v2t"] == plain["v2t"]
    assert normalised["qbnorm"]["bank_size"] == int(np.sum(train_store.caption_mask))
    assert 0 <= normalised["qbnorm"]["rescored_fraction"] <= 1
    with pytest.raises(UserInputError, match="needs both qbnorm_settings"):
        Evaluator(model, store, "poor", qbnorm_settings=settings)


def test_a_similarity_matrix_too_large_to_return_is_refused_with_the_alternatives(monkeypatch):
    model, store = setup()
    monkeypatch.setattr(evaluate_module, "MAX_RETURNED_SIMILARITIES", 10)
    with pytest.raises(UserInputError, match="use return_ranks=True for per-query ranks, or tt_jax.search.top_k"):
        Evaluator(model, store, "poor").run(init_variables(model, jax.random.key(0)), return_similarity=True)
