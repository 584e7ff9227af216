"""Denoising masks in the release format: which training captions a run may sample.

The release's denoising files (`denoising_masks/denoise-less100.pkl`, reference
`base/base_dataset.py`) are one pickle, {train video id: 0/1 array over that video's captions},
and, for a mask that leaves videos without a caption, a training list of the videos it keeps
(`denoise-less80.txt`). A caption is drawn with probability mask / sum(mask), so a video whose
captions are all masked must leave the training list (its probabilities would be 0/0).

`write_caption_masks` writes both files, so the reference code can read masks made here;
`read_caption_masks` reads either ours or the release's; `apply_caption_masks` turns them into a
training store's sampling weights.
"""

from __future__ import annotations

import pathlib
import pickle
from typing import Mapping, Sequence

import numpy as np
from absl import logging

from tt_jax.data.feature_store import FeatureStore
from tt_jax.data.safe_pickle import load_pickle
from tt_jax.errors import UserInputError, list_some


class CaptionMaskError(UserInputError):
    """A mask file that does not describe the training split it is applied to."""


def write_caption_masks(
    path: str | pathlib.Path, video_ids: Sequence[str], keep: np.ndarray, caption_mask: np.ndarray
) -> tuple[pathlib.Path, pathlib.Path]:
    """Writes `path` (.pkl: {video: int64 0/1 per caption}) and the training list next to it
    (.txt: the videos left with a caption); returns both paths.

    keep: [V, K] whether each caption slot is kept; caption_mask: [V, K] 1 where the slot holds a
    caption (a video's captions fill its leading slots, as in every store).
    """
    path = pathlib.Path(path)
    keep, caption_mask = np.asarray(keep, bool), np.asarray(caption_mask) > 0
    counts = caption_mask.sum(axis=1)
    if np.any(caption_mask != (np.arange(caption_mask.shape[1]) < counts[:, None])):
        raise ValueError("write_caption_masks: a video's captions must fill its leading slots")
    masks = {video: keep[row, : counts[row]].astype(np.int64) for row, video in enumerate(video_ids)}
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    with temporary.open("wb") as handle:
        pickle.dump(masks, handle, protocol=4)
    temporary.replace(path)  # never a half-written mask file under the final name
    kept_list = path.with_suffix(".txt")
    temporary = kept_list.with_name(kept_list.name + ".tmp")
    temporary.write_text("".join(f"{video}\n" for video, mask in masks.items() if mask.any()))
    temporary.replace(kept_list)
    return path, kept_list


def read_caption_masks(path: str | pathlib.Path) -> dict[str, np.ndarray]:
    """{video id: float64 0/1 array over its captions} from a mask pickle (ours or the release's)."""
    table = load_pickle(path)
    if not isinstance(table, Mapping):
        raise CaptionMaskError(f"{path} must hold a dict of video id -> 0/1 caption mask, got {type(table).__name__}")
    masks = {}
    for video, mask in table.items():
        try:
            values = np.asarray(mask, np.float64).reshape(-1)
        except (TypeError, ValueError):
            raise CaptionMaskError(f"{path}: the mask of video {video!r} is not a numeric array") from None
        if not np.all((values == 0) | (values == 1)):
            raise CaptionMaskError(f"{path}: the mask of video {video!r} has values other than 0 and 1")
        masks[str(video)] = values
    return masks


def apply_caption_masks(store: FeatureStore, masks: Mapping[str, np.ndarray], where: str) -> FeatureStore:
    """The training store that samples only the captions `masks` keep, without the videos left
    with none (logged). `where` names the masks in messages (e.g. their file)."""
    absent = [video for video in store.video_ids if video not in masks]
    if absent:
        raise CaptionMaskError(
            f"the denoising masks {where} have no entry for {len(absent)} training videos: {list_some(absent)}; "
            "they were made for another training split"
        )
    caption_mask = store.caption_mask
    counts = caption_mask.sum(axis=1).astype(int)
    weights = np.zeros_like(caption_mask)
    wrong = []
    for row, video in enumerate(store.video_ids):
        mask = masks[video]
        if len(mask) != counts[row]:
            wrong.append(f"{video} ({len(mask)} entries, {counts[row]} captions)")
            continue
        weights[row, : counts[row]] = mask
    if wrong:
        raise CaptionMaskError(f"the denoising masks {where} do not match the training captions of videos {list_some(wrong)}")
    previous = store.caption_weights
    if previous is not None:  # masks on top of masks: a caption must pass both
        weights = weights * previous
    kept = np.flatnonzero(weights.sum(axis=1) > 0)
    if kept.size == 0:
        raise CaptionMaskError(
            f"the denoising masks {where} remove every caption of every training video; keep more "
            "captions (a larger denoising.max_rank)"
        )
    if kept.size < store.num_videos:
        dropped = [store.video_ids[row] for row in np.flatnonzero(weights.sum(axis=1) == 0)]
        logging.info(
            "denoising masks %s remove every caption of %d of %d training videos; they leave training: %s",
            where, len(dropped), store.num_videos, list_some(dropped),
        )
    return store.select(kept, caption_weights=weights[kept])
