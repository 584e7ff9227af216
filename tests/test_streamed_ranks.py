"""Ranks streamed from packed embeddings equal the ranks of the whole similarity matrix, on any
number of devices, with ties, masked captions and missing experts."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from tt_jax import metrics, parallel
from tt_jax.errors import UserInputError
from tt_jax.packed_embeddings import GalleryLayout, PackedGallery, PackedQueries, pack_gallery, pack_queries
from tt_jax.streamed_ranks import streamed_ranks

DEVICES = (1, 2, 4, 8)


def exact_split(rng, num_videos=11, captions=3, dims=3, experts=2, *, missing=True):
    """Packed embeddings whose similarities are exact in float32 (entries in quarters, mixture
    weights 1/2, so numerators are sums of exact products and denominators 1/2 or 1): ties in
    the data are ties in every computation, and a numpy float64 matrix equals the device's.
    Duplicated videos and captions make ties on purpose."""
    names = [f"e{m}" for m in range(experts)]
    video = {name: rng.integers(-2, 3, (num_videos, dims)) / 4 for name in names}
    for name in names:
        video[name][1] = video[name][0]  # video 1 ties with video 0 for every caption
    availability = np.ones((num_videos, experts))
    if missing:
        availability[rng.random(num_videos) < 0.3, 1] = 0  # some videos lack the second expert
    text = {name: rng.integers(-2, 3, (num_videos * captions, dims)) / 4 for name in names}
    for name in names:
        text[name][captions] = text[name][0]  # caption 0 of video 1 repeats caption 0 of video 0
    weights = np.full((num_videos * captions, experts), 1 / experts)
    queries = pack_queries({n: jnp.asarray(t, jnp.float32) for n, t in text.items()}, jnp.asarray(weights), names)
    gallery = pack_gallery({n: jnp.asarray(v, jnp.float32) for n, v in video.items()}, jnp.asarray(availability), names)
    return queries, gallery


def numpy_similarity(queries: PackedQueries, gallery: PackedGallery, keep_missing_modalities=False) -> np.ndarray:
    """S[q, v] = <T[q], G[v]> / <w[q], a[v]> in float64, from the packed form's definition."""
    numerator = np.asarray(queries.vectors, np.float64) @ np.asarray(gallery.vectors, np.float64).T
    if keep_missing_modalities:
        return numerator
    return numerator / (np.asarray(queries.moe_weights, np.float64) @ np.asarray(gallery.availability, np.float64).T)


def caption_masks(rng, num_videos, captions):
    masks = (rng.random((num_videos, captions)) > 0.3).astype(np.float64)
    masks[:, 0] = 1
    masks[2] = 0  # video 2 has no rankable caption
    return masks


@pytest.mark.parametrize("missing_caption_sentinel", [True, False])
def test_streamed_ranks_equal_the_matrix_ranks_with_ties_on_every_mesh(missing_caption_sentinel):
    rng = np.random.default_rng(0)
    queries, gallery = exact_split(rng)
    masks = caption_masks(rng, 11, 3)
    expected_t2v, expected_v2t = metrics.retrieval_ranks(
        numpy_similarity(queries, gallery).astype(np.float32), masks, missing_caption_sentinel=missing_caption_sentinel
    )
    expected_t2v = np.asarray(expected_t2v, np.float64)[masks.reshape(-1) != 0]
    assert np.any(expected_t2v % 1 == 0.5)  # the data has ties
    targets = np.arange(33) // 3
    for devices in DEVICES:
        for block in (None, 8):
            got = streamed_ranks(queries, gallery, targets, masks, mesh=parallel.make_mesh(devices), block=block,
                                 missing_caption_sentinel=missing_caption_sentinel).ranks
            np.testing.assert_array_equal(got.text_to_video, expected_t2v, err_msg=f"{devices} devices, block {block}")
            np.testing.assert_array_equal(got.video_to_text, np.asarray(expected_v2t, np.float64))
    assert np.isinf(got.video_to_text[2])


def test_keep_missing_modalities_ranks_the_unweighted_sum():
    rng = np.random.default_rng(1)
    names = ["a", "b"]
    text = {n: jnp.asarray(rng.integers(-2, 3, (12, 3)) / 4, jnp.float32) for n in names}
    video = {n: jnp.asarray(rng.integers(-2, 3, (6, 3)) / 4, jnp.float32) for n in names}
    queries = pack_queries(text, jnp.full((12, 2), 0.5), names, keep_missing_modalities=True)
    gallery = pack_gallery(video, jnp.asarray(rng.integers(0, 2, (6, 2)), jnp.float32), names, keep_missing_modalities=True)
    sims = numpy_similarity(queries, gallery, keep_missing_modalities=True)
    np.testing.assert_array_equal(sims, sum(np.asarray(text[n]) @ np.asarray(video[n]).T for n in names))
    expected_t2v, expected_v2t = metrics.retrieval_ranks(sims.astype(np.float32), None)
    got = streamed_ranks(queries, gallery, np.arange(12) // 2, keep_missing_modalities=True,
                         mesh=parallel.make_mesh(4)).ranks
    np.testing.assert_array_equal(got.text_to_video, expected_t2v)
    np.testing.assert_array_equal(got.video_to_text, expected_v2t)


def random_problem(rng, num_queries, num_videos, dims=6, experts=3):
    vectors = rng.normal(size=(num_videos, dims * experts)).astype(np.float32)
    availability = (rng.random((num_videos, experts)) > 0.3).astype(np.float32)
    availability[:, 0] = 1
    weights = rng.dirichlet(np.full(experts, 5.0), num_queries).astype(np.float32)  # away from 0, as softmax weights are
    queries = PackedQueries(rng.normal(size=(num_queries, dims * experts)).astype(np.float32), weights)
    gallery = PackedGallery(vectors * np.repeat(availability, dims, axis=1), availability)
    return queries, gallery


def test_a_gallery_larger_than_the_queries_ranks_the_same_on_every_mesh():
    """Queries of any videos (not the V*K layout): a gallery of 300 videos and 50 queries, some
    of the same video; host (numpy) inputs placed piece by piece."""
    rng = np.random.default_rng(2)
    queries, gallery = random_problem(rng, 50, 300)
    targets = rng.integers(0, 300, 50)
    targets[1] = targets[0]
    sims = numpy_similarity(queries, gallery)
    own = sims[np.arange(50), targets][:, None]
    expected = np.sum(sims > own, axis=1)
    # float32 on device against float64 here: compare the queries with no competitor within 1e-4.
    clear = np.all((np.abs(sims - own) > 1e-4) | (np.arange(300)[None, :] == targets[:, None]), axis=1)
    assert clear.mean() > 0.8
    results = [streamed_ranks(queries, gallery, targets, mesh=parallel.make_mesh(d), block=32).ranks for d in DEVICES]
    for ranks in results:
        np.testing.assert_array_equal(ranks.text_to_video, results[0].text_to_video)
        np.testing.assert_array_equal(ranks.video_to_text, results[0].video_to_text)
    np.testing.assert_array_equal(results[0].text_to_video[clear], expected[clear])
    # v2t: only videos with a query are ranked; the rest have no caption.
    assert np.isinf(results[0].video_to_text).sum() == 300 - len(set(targets.tolist()))


def test_an_already_padded_sharded_gallery_is_used_in_place():
    rng = np.random.default_rng(3)
    queries, gallery = random_problem(rng, 20, 37)
    mesh = parallel.make_mesh(4)
    layout = GalleryLayout.for_mesh(20, 37, mesh, 8)
    from tt_jax.packed_embeddings import place_gallery

    placed = place_gallery(gallery, layout, mesh)
    assert placed.vectors.shape[0] == layout.padded_videos == 64
    assert place_gallery(placed, layout, mesh) is placed
    targets = rng.integers(0, 37, 20)
    in_place = streamed_ranks(queries, placed, targets, num_videos=37, mesh=mesh, block=8).ranks
    from_host = streamed_ranks(queries, gallery, targets, mesh=mesh, block=8).ranks
    np.testing.assert_array_equal(in_place.text_to_video, from_host.text_to_video)


def test_a_video_without_any_expert_is_reported_not_ranked():
    rng = np.random.default_rng(4)
    queries, gallery = random_problem(rng, 10, 5)
    availability = np.asarray(gallery.availability).copy()
    availability[3] = 0
    gallery = PackedGallery(gallery.vectors, availability)
    with pytest.raises(UserInputError, match="NaN or inf"):
        streamed_ranks(queries, gallery, np.arange(10) // 2)


@pytest.mark.parametrize(
    "targets, masks, block, message",
    [
        (np.array([0, 1, 5]), None, None, "query 2 names video 5, outside the gallery's 5 videos"),
        (np.array([0.0, 1.0, 2.0]), None, None, "targets must be a 1-D array of video indices"),
        (np.array([0, 1, 2]), np.ones(4), None, "query_masks has 4 entries for 3 queries"),
        (np.array([0, 1, 2]), None, 0, "block size must be a positive number of rows"),
    ],
)
def test_bad_targets_masks_and_blocks_are_named(targets, masks, block, message):
    queries, gallery = random_problem(np.random.default_rng(5), 3, 5)
    with pytest.raises(UserInputError, match=message):
        streamed_ranks(queries, gallery, targets, masks, block=block)


def test_queries_and_gallery_of_different_experts_are_refused():
    queries, _ = random_problem(np.random.default_rng(6), 3, 5, experts=3)
    _, gallery = random_problem(np.random.default_rng(6), 3, 5, experts=2)
    with pytest.raises(UserInputError, match="pack both with the same experts"):
        streamed_ranks(queries, gallery, np.array([0, 1, 2]))


def test_a_gallery_too_large_for_the_devices_says_what_it_needs(monkeypatch):
    from tt_jax import packed_embeddings

    queries, gallery = random_problem(np.random.default_rng(7), 10, 4000)
    monkeypatch.setattr(packed_embeddings, "device_bytes_free", lambda mesh: 100_000)
    with pytest.raises(UserInputError, match=r"ranking 10 queries against 4,000 videos needs about .* GiB on each of "
                                             r"the 2 devices \(its share of the gallery .*use more devices"):
        streamed_ranks(queries, gallery, np.arange(10), mesh=parallel.make_mesh(2), block=64)
