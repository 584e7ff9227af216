"""What a run trains on: a seeded fraction of the training videos, then its denoising masks.

Both act on the loaded training store, so one load of the data serves every run of a recipe or
a study: each run selects its own rows (a copy of the expert rows it keeps; the token arrays,
the largest, are shared).

* `data.train_fraction` f keeps ceil(f V) videos: those first in an order fixed by
  `data.train_fraction_seed` and each video's id (a hash, so the subset does not depend on the
  order of the split list). One seed gives nested subsets: the videos of f = 0.25 are among
  those of f = 0.5 (TeachText paper, Fig 12a's training-data fraction).
* `data.caption_masks` names a mask file in the release format (tt_jax.data.caption_masks), for
  example the one the recipe's denoising stage writes.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any, Sequence

import numpy as np

from tt_jax.data.caption_masks import apply_caption_masks, read_caption_masks
from tt_jax.data.feature_store import FeatureStore
from tt_jax.errors import UserInputError


def fraction_order(video_ids: Sequence[str], seed: int) -> np.ndarray:
    """[V] row indices in the order the fractions take videos (a seeded hash of each id)."""
    keys = np.array(
        [int.from_bytes(hashlib.blake2b(f"{seed}/{video}".encode(), digest_size=8).digest(), "little") for video in video_ids],
        dtype=np.uint64,
    )
    return np.argsort(keys, kind="stable")


def fraction_rows(video_ids: Sequence[str], fraction: float, seed: int) -> np.ndarray:
    """The rows (in store order) of the ceil(fraction V) videos the fraction keeps."""
    if not 0 < fraction <= 1:
        raise UserInputError(f"data.train_fraction must lie in (0, 1], got {fraction!r}")
    count = math.ceil(round(fraction * len(video_ids), 9))  # 0.07 * 100 is 7.000000000000001 in floats
    return np.sort(fraction_order(video_ids, seed)[:count])


def training_store(data_config: Any, store: FeatureStore) -> FeatureStore:
    """The training store a run of `data_config` samples from (the store itself when neither a
    fraction nor masks apply)."""
    fraction = float(data_config.get("train_fraction", 1.0))
    if fraction != 1.0:
        store = store.select(fraction_rows(store.video_ids, fraction, int(data_config.get("train_fraction_seed", 0))))
    masks_path = data_config.get("caption_masks") or ""
    if masks_path:
        store = apply_caption_masks(store, read_caption_masks(masks_path), str(masks_path))
    return store
