"""Denoising masks in the release format: writing, reading (ours and through the release reader),
applying them to a training store, and FeatureStore.select that applying relies on."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from tt_jax.data.caption_masks import CaptionMaskError, apply_caption_masks, read_caption_masks, write_caption_masks
from tt_jax.data.fake_release import write_fake_release
from tt_jax.data.feature_store import FeatureStore, FeatureStoreError, TokenTable
from tt_jax.data.release import ReleaseRequest, read_release
from tt_jax.data.release_layout import DENOISING, DENOISING_FOLDER
from tt_jax.models import ExpertConfig

SLOTS = 3


def mask_store(num_videos: int = 6, seed: int = 0, caption_weights=None) -> FeatureStore:
    """A training split whose videos have 1..3 captions (video 0: 3, video 1: 2, so both full
    and empty slots occur), a flaky expert missing for some videos and one precomputed teacher."""
    rng = np.random.default_rng(seed)
    counts = rng.integers(1, SLOTS + 1, num_videos)
    counts[0], counts[1] = SLOTS, SLOTS - 1
    caption_mask = np.arange(SLOTS) < counts[:, None]
    lengths = np.where(caption_mask, rng.integers(1, 4, (num_videos, SLOTS)), 0)
    present = (np.arange(num_videos) % 3 != 2).astype(np.float32)
    return FeatureStore(
        video_ids=tuple(f"video{index}" for index in range(num_videos)),
        experts={
            "scene": rng.standard_normal((num_videos, 3)).astype(np.float32),
            "audio": rng.standard_normal((num_videos, 2, 2)).astype(np.float32) * present[:, None, None],
        },
        availability={"scene": np.ones(num_videos), "audio": present},
        text={
            "w2v": TokenTable.from_padded(rng.standard_normal((num_videos, SLOTS, 3, 2)), lengths),
            "gpt2-xl": TokenTable.from_padded(rng.standard_normal((num_videos, SLOTS, 2, 4)), np.minimum(lengths, 2)),
        },
        caption_weights=caption_weights,
        teacher_embeddings={
            "w2v": {
                "video": {"e1": rng.standard_normal((num_videos, 5)).astype(np.float32)},
                "text": {"e1": rng.standard_normal((num_videos, SLOTS, 5)).astype(np.float32)},
            }
        },
    )


def random_keep(store: FeatureStore, seed: int, drop_rows=(2,)) -> np.ndarray:
    """[V, K] kept captions: random on real slots, none for the videos `drop_rows`, and at least
    one for every other video."""
    rng = np.random.default_rng(seed)
    real = store.caption_mask > 0
    keep = (rng.random(real.shape) < 0.5) & real
    keep[np.arange(store.num_videos), 0] = True
    keep[list(drop_rows)] = False
    return keep


# -- write / read ----------------------------------------------------------------------------------


def test_written_masks_read_back_and_the_list_names_the_videos_that_keep_a_caption(tmp_path):
    """The .pkl holds each video's 0/1 mask over its own captions only (release format, int64);
    read_caption_masks gives them back as float64; the .txt lists, in store order, exactly the
    videos with at least one kept caption."""
    store = mask_store()
    keep = random_keep(store, seed=1, drop_rows=(2, 4))
    pkl, txt = write_caption_masks(tmp_path / "sub" / "masks.pkl", store.video_ids, keep, store.caption_mask)
    assert pkl == tmp_path / "sub" / "masks.pkl" and txt == tmp_path / "sub" / "masks.txt"
    counts = store.caption_mask.sum(axis=1).astype(int)
    with open(pkl, "rb") as handle:
        raw = pickle.load(handle)
    assert list(raw) == list(store.video_ids)
    read = read_caption_masks(pkl)
    assert list(read) == list(store.video_ids)
    for row, video in enumerate(store.video_ids):
        assert raw[video].dtype == np.int64
        np.testing.assert_array_equal(raw[video], keep[row, : counts[row]].astype(np.int64))
        assert read[video].dtype == np.float64
        np.testing.assert_array_equal(read[video], keep[row, : counts[row]])
    listed = txt.read_text().split("\n")
    assert listed[-1] == ""  # one id a line, newline-terminated
    assert listed[:-1] == [video for row, video in enumerate(store.video_ids) if keep[row].any()]
    assert "video2" not in listed and "video4" not in listed
    assert not list(tmp_path.glob("sub/*.tmp"))  # the temporary file was renamed away


def test_write_rejects_captions_that_do_not_fill_the_leading_slots(tmp_path):
    caption_mask = np.array([[1, 0, 1], [1, 1, 0]])
    with pytest.raises(ValueError, match="leading slots"):
        write_caption_masks(tmp_path / "m.pkl", ("a", "b"), np.ones((2, 3), bool), caption_mask)


def test_read_rejects_masks_that_are_not_a_dict_of_0_1_arrays(tmp_path):
    path = tmp_path / "m.pkl"
    path.write_bytes(pickle.dumps([0, 1]))
    with pytest.raises(CaptionMaskError, match="must hold a dict"):
        read_caption_masks(path)
    path.write_bytes(pickle.dumps({"a": np.array([1.0, 0.5])}))
    with pytest.raises(CaptionMaskError, match=r"video 'a' has values other than 0 and 1"):
        read_caption_masks(path)


# -- through the release reader --------------------------------------------------------------------

EXPERTS = (ExpertConfig("scene.densenet161.0", 4),)


@pytest.mark.parametrize("denoising", ["less80", "less100"])
def test_written_masks_are_read_by_the_release_reader(tmp_path, denoising):
    """Masks made for the release's full training list, written under the release's mask name
    (for less80 the .txt next to them is the release's less80 train list), read back through
    read_release: the training store holds exactly the videos with a kept caption, in list order,
    with the masks as caption weights."""
    root = write_fake_release(tmp_path, "msrvtt", experts=EXPERTS, text_dims={"w2v": 3}, teachers=False,
                              num_videos={"train": 10, "val": 3, "test": 3})
    request = ReleaseRequest(dataset="msrvtt", data_dir=str(tmp_path), experts=EXPERTS, text_max_tokens={"w2v": 4})
    full = read_release(request)["train"]
    keep = random_keep(full, seed=3, drop_rows=(1, 6))
    mask_file, train_list = DENOISING[denoising]
    _, written_list = write_caption_masks(root / DENOISING_FOLDER / mask_file, full.video_ids, keep, full.caption_mask)
    if train_list is not None:
        assert written_list.name == train_list  # our list replaces the release's

    train = read_release(ReleaseRequest(dataset="msrvtt", data_dir=str(tmp_path), experts=EXPERTS,
                                        text_max_tokens={"w2v": 4}, denoising=denoising))["train"]
    rows = [row for row in range(full.num_videos) if keep[row].any()]
    assert list(train.video_ids) == [full.video_ids[row] for row in rows]
    assert full.video_ids[1] not in train.video_ids and full.video_ids[6] not in train.video_ids
    np.testing.assert_array_equal(train.caption_weights, keep[rows].astype(np.float64))
    np.testing.assert_array_equal(train.caption_mask, full.caption_mask[rows])


# -- apply_caption_masks ---------------------------------------------------------------------------


def masks_of(store: FeatureStore, keep: np.ndarray) -> dict:
    counts = store.caption_mask.sum(axis=1).astype(int)
    return {video: keep[row, : counts[row]].astype(np.float64) for row, video in enumerate(store.video_ids)}


def test_apply_weights_the_kept_captions_and_drops_videos_left_without_one():
    """Weights are the masks on the real slots (0 on empty ones); videos with no kept caption
    leave, the others keep their rows' data in order; entries for other videos are ignored."""
    store = mask_store()
    keep = random_keep(store, seed=5, drop_rows=(0, 3))
    masks = masks_of(store, keep)
    masks["not_in_the_split"] = np.array([1.0])
    applied = apply_caption_masks(store, masks, "in the test")
    rows = [row for row in range(store.num_videos) if keep[row].any()]
    assert list(applied.video_ids) == [store.video_ids[row] for row in rows]
    np.testing.assert_array_equal(applied.caption_weights, keep[rows].astype(np.float64))
    np.testing.assert_array_equal(applied.sampling_weights, keep[rows].astype(np.float64))
    for name in store.experts:
        np.testing.assert_array_equal(applied.experts[name], store.experts[name][rows])


def test_masks_on_masked_captions_must_pass_both():
    """A store that already has caption weights (e.g. the release's masks) keeps a caption only
    where the old weight and the new mask both keep it."""
    base = mask_store()
    previous = random_keep(base, seed=7, drop_rows=()).astype(np.float64)
    store = mask_store(caption_weights=previous)
    keep = random_keep(store, seed=8, drop_rows=())
    applied = apply_caption_masks(store, masks_of(store, keep), "in the test")
    both = previous * keep
    rows = np.flatnonzero(both.sum(axis=1) > 0)
    assert list(applied.video_ids) == [store.video_ids[row] for row in rows]
    np.testing.assert_array_equal(applied.caption_weights, both[rows])


def test_apply_rejects_masks_missing_a_training_video():
    store = mask_store()
    masks = masks_of(store, random_keep(store, seed=0))
    del masks["video4"]
    with pytest.raises(CaptionMaskError, match=r"masks in the test have no entry for 1 training videos: \['video4'\]"):
        apply_caption_masks(store, masks, "in the test")


def test_apply_rejects_masks_with_the_wrong_caption_count():
    store = mask_store()
    masks = masks_of(store, random_keep(store, seed=0))
    masks["video0"] = np.ones(SLOTS - 1)  # video 0 has SLOTS captions
    with pytest.raises(CaptionMaskError, match=rf"video0 \({SLOTS - 1} entries, {SLOTS} captions\)"):
        apply_caption_masks(store, masks, "in the test")


def test_apply_rejects_masks_that_remove_every_caption():
    store = mask_store()
    masks = masks_of(store, np.zeros(store.caption_mask.shape, bool))
    with pytest.raises(CaptionMaskError, match="remove every caption of every training video"):
        apply_caption_masks(store, masks, "in the test")


# -- FeatureStore.select ---------------------------------------------------------------------------


def test_select_keeps_each_rows_data_in_the_given_order():
    """Every per-video array (experts, availability, text tokens, caption weights, teacher
    embeddings) of the selected store is the source's row, in the order of `rows`."""
    weights = random_keep(mask_store(), seed=2, drop_rows=()).astype(np.float64)
    store = mask_store(caption_weights=weights)
    rows = np.array([4, 0, 2, 5])
    picked = store.select(rows)
    assert picked.video_ids == tuple(store.video_ids[row] for row in rows)
    assert picked.num_videos == len(rows) and picked.max_captions == SLOTS
    for name in store.experts:
        np.testing.assert_array_equal(picked.experts[name], store.experts[name][rows])
        np.testing.assert_array_equal(picked.availability[name], store.availability[name][rows])
    slots = np.tile(np.arange(SLOTS), (len(rows), 1))
    for name, table in store.text.items():
        np.testing.assert_array_equal(picked.text[name].padded(np.arange(len(rows)), slots, 3), table.padded(rows, slots, 3))
        assert picked.text[name].tokens is table.tokens  # shared, not copied
    np.testing.assert_array_equal(picked.caption_mask, store.caption_mask[rows])
    np.testing.assert_array_equal(picked.caption_weights, weights[rows])
    for part in ("video", "text"):
        for expert, array in store.teacher_embeddings["w2v"][part].items():
            np.testing.assert_array_equal(picked.teacher_embeddings["w2v"][part][expert], array[rows])


def test_select_replaces_the_weights_when_given_and_checks_the_rows():
    store = mask_store()
    rows = [1, 3]
    new = store.caption_mask[rows] * 0.5
    picked = store.select(rows, caption_weights=new)
    np.testing.assert_array_equal(picked.caption_weights, new)
    assert store.select(rows).caption_weights is None
    for bad in ([store.num_videos], [-1], [[0, 1]]):
        with pytest.raises(FeatureStoreError, match="select: rows must be indices"):
            store.select(bad)
