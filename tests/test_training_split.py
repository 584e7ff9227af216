"""What a run trains on: a seeded, nested fraction of the training videos, then its caption masks."""

from __future__ import annotations

import math

import ml_collections
import numpy as np
import pytest

from tt_jax.data.caption_masks import CaptionMaskError, write_caption_masks
from tt_jax.data.feature_store import FeatureStore, TokenTable
from tt_jax.data.training_split import fraction_order, fraction_rows, training_store
from tt_jax.errors import UserInputError

VIDEO_IDS = tuple(f"video{index}" for index in range(37))
FRACTIONS = (0.25, 0.5, 0.75, 1.0)


def chosen(video_ids, fraction, seed) -> set:
    return {video_ids[row] for row in fraction_rows(video_ids, fraction, seed)}


def test_fraction_order_is_a_permutation():
    order = fraction_order(VIDEO_IDS, 0)
    assert sorted(order.tolist()) == list(range(len(VIDEO_IDS)))


@pytest.mark.parametrize("seed", [0, 5])
def test_fractions_of_one_seed_are_nested_and_of_size_ceil_f_v(seed):
    """Each fraction keeps ceil(f V) distinct videos, in store order, and the smaller fraction's
    videos are among the larger's (the paper's training-data fraction curve)."""
    previous = set()
    for fraction in FRACTIONS:
        rows = fraction_rows(VIDEO_IDS, fraction, seed)
        assert len(rows) == len(set(rows.tolist())) == math.ceil(fraction * len(VIDEO_IDS))
        assert np.all(np.diff(rows) > 0)  # sorted: store order
        videos = {VIDEO_IDS[row] for row in rows}
        assert previous <= videos
        previous = videos
    assert previous == set(VIDEO_IDS)


def test_small_fractions_round_up():
    assert len(fraction_rows(VIDEO_IDS, 0.1, 0)) == 4  # ceil(3.7)
    assert len(fraction_rows(VIDEO_IDS, 1e-9, 0)) == 1


def test_fractions_are_deterministic_and_depend_on_the_seed():
    first = fraction_rows(VIDEO_IDS, 0.5, 0)
    np.testing.assert_array_equal(first, fraction_rows(VIDEO_IDS, 0.5, 0))
    assert chosen(VIDEO_IDS, 0.5, 0) != chosen(VIDEO_IDS, 0.5, 1)


def test_fractions_do_not_depend_on_the_order_of_the_video_ids():
    """The subset is a function of the ids (hashed with the seed), not of their order."""
    permuted = tuple(np.random.default_rng(3).permutation(VIDEO_IDS))
    for fraction in FRACTIONS:
        assert chosen(permuted, fraction, 2) == chosen(VIDEO_IDS, fraction, 2)


@pytest.mark.parametrize("fraction", [0, -0.1, 1.5])
def test_invalid_fractions_raise(fraction):
    with pytest.raises(UserInputError, match=r"train_fraction must lie in \(0, 1\]"):
        fraction_rows(VIDEO_IDS, fraction, 0)


# -- training_store --------------------------------------------------------------------------------


def split_store(num_videos: int = 12) -> FeatureStore:
    """Videos with 1..3 captions (some empty slots); expert rows tell the videos apart."""
    rng = np.random.default_rng(0)
    counts = rng.integers(1, 4, num_videos)
    lengths = np.where(np.arange(3) < counts[:, None], 1, 0)
    return FeatureStore(
        video_ids=tuple(f"clip{index}" for index in range(num_videos)),
        experts={"scene": np.arange(num_videos * 2, dtype=np.float32).reshape(num_videos, 2)},
        availability={"scene": np.ones(num_videos)},
        text={"w2v": TokenTable.from_padded(rng.standard_normal((num_videos, 3, 1, 2)), lengths)},
    )


def keep_for(store: FeatureStore, seed: int) -> np.ndarray:
    """Random kept captions; every third video keeps none."""
    rng = np.random.default_rng(seed)
    keep = (rng.random(store.caption_mask.shape) < 0.6) & (store.caption_mask > 0)
    keep[:, 0] = True
    keep[::3] = False
    return keep


def as_config(kind: str, values: dict):
    return ml_collections.ConfigDict(values) if kind == "configdict" else dict(values)


@pytest.mark.parametrize("kind", ["dict", "configdict"])
def test_training_store_applies_the_fraction_then_the_masks(tmp_path, kind):
    """Masks written for the fraction's videos only (as the denoising stage does) apply: the
    fraction is taken first, then the masks drop the videos left without a caption. Masks applied
    first would miss the other videos and fail."""
    store = split_store()
    fraction, seed = 0.5, 3
    rows = fraction_rows(store.video_ids, fraction, seed)
    subset = store.select(rows)
    keep = keep_for(subset, seed=1)
    path, _ = write_caption_masks(tmp_path / "masks.pkl", subset.video_ids, keep, subset.caption_mask)
    config = as_config(kind, {"train_fraction": fraction, "train_fraction_seed": seed, "caption_masks": str(path)})

    trained = training_store(config, store)
    kept = [index for index in range(len(rows)) if keep[index].any()]
    assert 0 < len(kept) < len(rows)
    assert list(trained.video_ids) == [store.video_ids[rows[index]] for index in kept]
    np.testing.assert_array_equal(trained.caption_weights, keep[kept].astype(np.float64))
    np.testing.assert_array_equal(trained.experts["scene"], store.experts["scene"][rows[kept]])

    # The same masks cannot serve another seed's fraction: they lack its videos.
    other = as_config(kind, {"train_fraction": fraction, "train_fraction_seed": seed + 1, "caption_masks": str(path)})
    if chosen(store.video_ids, fraction, seed + 1) - set(subset.video_ids):
        with pytest.raises(CaptionMaskError, match="no entry for"):
            training_store(other, store)


@pytest.mark.parametrize("kind", ["dict", "configdict"])
def test_training_store_with_masks_alone_or_a_fraction_alone(tmp_path, kind):
    store = split_store()
    keep = keep_for(store, seed=2)
    path, _ = write_caption_masks(tmp_path / "masks.pkl", store.video_ids, keep, store.caption_mask)
    masked = training_store(as_config(kind, {"caption_masks": str(path)}), store)
    assert list(masked.video_ids) == [video for row, video in enumerate(store.video_ids) if keep[row].any()]

    halved = training_store(as_config(kind, {"train_fraction": 0.5, "train_fraction_seed": 0}), store)
    assert set(halved.video_ids) == chosen(store.video_ids, 0.5, 0)
    assert halved.caption_weights is None


def test_training_store_without_a_fraction_or_masks_is_the_store_itself():
    store = split_store()
    assert training_store({}, store) is store
    assert training_store(ml_collections.ConfigDict({"train_fraction": 1.0, "caption_masks": ""}), store) is store
