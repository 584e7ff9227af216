"""Query-bank normalisation at inference (QB-Norm, Bogolin et al., CVPR 2022), and CSLS.

A gallery video that is the nearest neighbour of many queries (a "hub") crowds out the right
answers. QB-Norm rescales each video's scores by how strongly a bank of other queries (by
default the training captions) retrieves it:
  - inverted softmax (IS): s~(q, v) = exp(beta s(q, v)) / sum_b exp(beta s(b, v)), ranked here in
    log space: beta s(q, v) - LSE_b beta s(b, v);
  - dynamic inverted softmax (DIS): IS only for a query whose raw top-1 video is in the activation
    set (the videos in any bank query's top-k); other queries keep their raw scores;
  - CSLS (a baseline): 2 s(q, v) - r(v), r(v) the mean similarity of v to its k nearest bank queries.
Formulas and defaults (beta 20, k 1; CSLS k 10) from distillation_methods_spec.md section 6.

Only t2v is rescored: rows end up on different scales (log-probabilities and raw cosines), which
a per-query ranking tolerates and a per-video (v2t) ranking does not.

The bank's statistics are streamed: every device computes them for its share of the gallery, one
[B, B] block of bank similarities at a time, so a 130k-caption bank never needs its matrix.
`normalized_similarities` is the same method on whole arrays, for notebooks.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec

from tt_jax import parallel
from tt_jax.errors import UserInputError
from tt_jax.packed_embeddings import (
    GalleryLayout,
    PackedGallery,
    PackedQueries,
    block_similarity,
    check_dimensions,
    place_gallery,
    place_queries,
)
from tt_jax.streamed_ranks import Rescoring

METHODS = ("dis", "is", "csls")
# Neighbours per method when not given: DIS's activation set from each bank query's top-1
# (the QB-Norm code's default), CSLS's 10 nearest bank queries (its paper's choice).
DEFAULT_K = {"dis": 1, "is": 1, "csls": 10}


class QBNormError(UserInputError):
    """Settings or a query bank that QB-Norm cannot use; the message says which and why."""


@dataclasses.dataclass(frozen=True)
class QBNormSettings:
    """method: "dis" (default), "is" or "csls". beta: inverse temperature of IS/DIS (> 0).
    k: DIS activation top-k per bank query, or CSLS neighbours (None: the method's default).
    bank: the split whose captions form the query bank. bank_size: a seeded uniform subsample
    of that many bank captions (None: all of them)."""

    method: str = "dis"
    beta: float = 20.0
    k: Optional[int] = None
    bank: str = "train"
    bank_size: Optional[int] = None
    seed: int = 0

    def __post_init__(self):
        if self.method not in METHODS:
            raise QBNormError(f"qbnorm.method must be one of {', '.join(METHODS)}; got {self.method!r}")
        if not (isinstance(self.beta, (int, float)) and np.isfinite(self.beta) and self.beta > 0):
            raise QBNormError(f"qbnorm.beta must be a positive inverse temperature; got {self.beta!r}")
        if self.k is not None and (isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1):
            raise QBNormError(f"qbnorm.k must be a positive number of neighbours; got {self.k!r}")
        if self.bank_size is not None and (isinstance(self.bank_size, bool) or not isinstance(self.bank_size, int)
                                           or self.bank_size < 1):
            raise QBNormError(f"qbnorm.bank_size must be a positive number of captions or None; got {self.bank_size!r}")

    @property
    def neighbours(self) -> int:
        return DEFAULT_K[self.method] if self.k is None else self.k


def bank_rows(num_captions: int, settings: QBNormSettings) -> np.ndarray:
    """Indices of the bank captions used: all, or `bank_size` drawn without replacement with
    `seed` (sorted, so the bank keeps the split's order)."""
    if settings.bank_size is None or settings.bank_size >= num_captions:
        return np.arange(num_captions)
    chosen = np.random.default_rng(settings.seed).choice(num_captions, settings.bank_size, replace=False)
    return np.sort(chosen)


def bank_store(stores: Mapping[str, Any], settings: QBNormSettings) -> Any:
    """The store of the bank's split, or a message naming the splits there are."""
    if settings.bank not in stores:
        raise QBNormError(
            f"qbnorm.bank names no split {settings.bank!r}; this dataset has {', '.join(stores)}: "
            "choose one of them for the query bank (the training split by default)"
        )
    return stores[settings.bank]


def check_neighbours(settings: QBNormSettings, bank_size: int, num_videos: int) -> None:
    k = settings.neighbours
    if settings.method == "csls" and k > bank_size:
        raise QBNormError(f"CSLS asks for k = {k} nearest bank queries but the bank holds {bank_size}; lower qbnorm.k")
    if settings.method == "dis" and k > num_videos:
        raise QBNormError(f"DIS asks for each bank query's top {k} videos but the gallery holds {num_videos}; lower qbnorm.k")
    if bank_size < 1:
        raise QBNormError("the query bank is empty; choose a split with captions (qbnorm.bank)")


class _BankStatistics(NamedTuple):
    offsets: jax.Array  # [Vp] sharded
    activation: jax.Array  # [Vp] bool sharded
    non_finite: jax.Array  # []


def _merge_top(values, indices, new_values, new_indices, k):
    """Top k of two candidate lists (the first holds the lower indices: ties keep it first)."""
    merged_values = jnp.concatenate([values, new_values], axis=1)
    merged_indices = jnp.concatenate([indices, new_indices], axis=1)
    top_values, position = jax.lax.top_k(merged_values, k)
    return top_values, jnp.take_along_axis(merged_indices, position, axis=1)


def _local_bank_statistics(bank, bank_valid, gallery, *, layout, method, beta, k, keep_missing_modalities):
    block, local_videos = layout.block, layout.videos_per_device
    bank_blocks, video_blocks = layout.padded_queries // block, local_videos // block
    first_video = jax.lax.axis_index(parallel.DATA_AXIS) * local_videos
    similarity = functools.partial(block_similarity, keep_missing_modalities=keep_missing_modalities)

    def bank_block(bank_index, carry):
        offsets, activation, neighbours, non_finite = carry
        bank_start = bank_index * block
        bank_part = jax.tree.map(lambda leaf: jax.lax.dynamic_slice_in_dim(leaf, bank_start, block), bank)
        row_valid = jax.lax.dynamic_slice_in_dim(bank_valid, bank_start, block)[:, None]
        top_values = jnp.full((block, k), -jnp.inf, jnp.float32)
        top_videos = jnp.full((block, k), -1, jnp.int32)

        def video_block(video_index, inner):
            offsets, neighbours, non_finite, top_values, top_videos = inner
            video_start = video_index * block
            videos = jax.tree.map(lambda leaf: jax.lax.dynamic_slice_in_dim(leaf, video_start, block), gallery)
            video_ids = first_video + video_start + jnp.arange(block)
            valid = row_valid & (video_ids < layout.num_videos)[None, :]
            sims = similarity(bank_part, videos)
            non_finite = non_finite + jnp.sum(~jnp.isfinite(sims) & valid, dtype=jnp.int32)
            if method in ("is", "dis"):
                column = jax.nn.logsumexp(jnp.where(row_valid, beta * sims, -jnp.inf), axis=0)
                old = jax.lax.dynamic_slice_in_dim(offsets, video_start, block)
                offsets = jax.lax.dynamic_update_slice_in_dim(offsets, jnp.logaddexp(old, column), video_start, 0)
            if method == "dis":
                candidates = jnp.where(valid, sims, -jnp.inf)
                top_values, top_videos = _merge_top(
                    top_values, top_videos, candidates, jnp.broadcast_to(video_ids, candidates.shape), k
                )
            if method == "csls":
                old_values = jax.lax.dynamic_slice_in_dim(neighbours, video_start, block)
                candidates = jnp.where(row_valid, sims, -jnp.inf).T  # [videos, bank rows]
                merged = jnp.concatenate([old_values, candidates], axis=1)
                neighbours = jax.lax.dynamic_update_slice_in_dim(neighbours, jax.lax.top_k(merged, k)[0], video_start, 0)
            return offsets, neighbours, non_finite, top_values, top_videos

        offsets, neighbours, non_finite, top_values, top_videos = jax.lax.fori_loop(
            0, video_blocks, video_block, (offsets, neighbours, non_finite, *parallel.varying_over_devices((top_values, top_videos)))
        )
        if method == "dis":
            # Every device's top k, merged in device order (= video order, so ties keep the lowest index).
            all_values = jax.lax.all_gather(top_values, parallel.DATA_AXIS, axis=1, tiled=True)  # [B, N*k]
            all_videos = jax.lax.all_gather(top_videos, parallel.DATA_AXIS, axis=1, tiled=True)
            _, position = jax.lax.top_k(all_values, k)
            chosen = jnp.take_along_axis(all_videos, position, axis=1) - first_video
            mine = row_valid & (chosen >= 0) & (chosen < local_videos)
            activation = activation.at[jnp.where(mine, chosen, local_videos).reshape(-1)].set(True, mode="drop")
        return offsets, activation, neighbours, non_finite

    carry = (
        jnp.full(local_videos, -jnp.inf, jnp.float32),
        jnp.zeros(local_videos, bool),
        jnp.full((local_videos, k if method == "csls" else 1), -jnp.inf, jnp.float32),
        jnp.zeros((), jnp.int32),
    )
    offsets, activation, neighbours, non_finite = jax.lax.fori_loop(0, bank_blocks, bank_block, parallel.varying_over_devices(carry))
    if method == "csls":
        offsets = jnp.mean(neighbours, axis=1)
    return _BankStatistics(offsets, activation, parallel.sum_over_devices(non_finite))


@functools.lru_cache(maxsize=16)
def _compiled_statistics(mesh: Mesh, layout: GalleryLayout, method: str, beta: float, k: int, keep_missing_modalities: bool):
    replicated, sharded = PartitionSpec(), PartitionSpec(parallel.DATA_AXIS)
    body = functools.partial(
        _local_bank_statistics, layout=layout, method=method, beta=beta, k=k,
        keep_missing_modalities=keep_missing_modalities,
    )
    return jax.jit(
        jax.shard_map(
            body,
            mesh=mesh,
            in_specs=(PackedQueries(replicated, replicated), replicated, PackedGallery(sharded, sharded)),
            out_specs=_BankStatistics(sharded, sharded, replicated),
        )
    )


def rescoring(
    settings: QBNormSettings,
    bank: PackedQueries,
    gallery: PackedGallery,
    *,
    num_videos: Optional[int] = None,
    mesh: Optional[Mesh] = None,
    block: Optional[int] = None,
    keep_missing_modalities: bool = False,
) -> Rescoring:
    """The t2v rescoring of `settings` from the bank queries' similarities to `gallery`, for
    `tt_jax.streamed_ranks.streamed_ranks` (pass the same mesh, block and gallery)."""
    mesh = mesh if mesh is not None else parallel.make_mesh()
    check_dimensions(bank, gallery)
    num_videos = gallery.vectors.shape[0] if num_videos is None else num_videos
    bank_size = bank.vectors.shape[0]
    check_neighbours(settings, bank_size, num_videos)
    layout = GalleryLayout.for_mesh(bank_size, num_videos, mesh, block)  # the bank in the place of the queries
    valid = np.arange(layout.padded_queries) < bank_size
    statistics = _compiled_statistics(mesh, layout, settings.method, float(settings.beta), settings.neighbours,
                                      keep_missing_modalities)(
        place_queries(bank, layout, mesh), jax.device_put(valid, parallel.replicated(mesh)),
        place_gallery(gallery, layout, mesh),
    )
    non_finite = int(jax.device_get(statistics.non_finite))
    if non_finite:
        raise QBNormError(f"{non_finite} bank similarities are NaN or inf; check the bank's and the gallery's embeddings")
    if settings.method == "csls":
        return Rescoring(scale=2.0, offsets=statistics.offsets)
    return Rescoring(
        scale=float(settings.beta),
        offsets=statistics.offsets,
        activation=statistics.activation if settings.method == "dis" else None,
    )


@functools.partial(jax.jit, static_argnames=("method", "k"))
def _normalized(test_sims, bank_sims, beta, *, method, k):
    if method == "csls":
        neighbours = jax.lax.top_k(bank_sims.T, k)[0]  # [G, k]
        return 2 * test_sims - jnp.mean(neighbours, axis=1)[None, :]
    normalized = beta * test_sims - jax.nn.logsumexp(beta * bank_sims, axis=0)[None, :]
    if method == "is":
        return normalized
    _, bank_top = jax.lax.top_k(bank_sims, k)
    active = jnp.zeros(test_sims.shape[1], bool).at[bank_top.reshape(-1)].set(True)
    query_top = jnp.argmax(test_sims, axis=1)  # the lowest index among ties
    return jnp.where(active[query_top][:, None], normalized, test_sims)


def normalized_similarities(test_sims, bank_sims, settings: QBNormSettings = QBNormSettings()) -> jax.Array:
    """QB-Norm (or CSLS) on whole arrays: test_sims [Q, G] and bank_sims [B, G] from the same
    model. Returns [Q, G] scores to rank per query (t2v): IS rows in log space, DIS rows either
    normalised or raw. For large banks, use `rescoring` (streamed) instead."""
    test_sims, bank_sims = jnp.asarray(test_sims, jnp.float32), jnp.asarray(bank_sims, jnp.float32)
    if test_sims.ndim != 2 or bank_sims.ndim != 2 or test_sims.shape[1] != bank_sims.shape[1]:
        raise QBNormError(
            f"test_sims {test_sims.shape} and bank_sims {bank_sims.shape} must be [Q, G] and [B, G] over the same gallery"
        )
    check_neighbours(settings, bank_sims.shape[0], test_sims.shape[1])
    return _normalized(test_sims, bank_sims, float(settings.beta), method=settings.method, k=settings.neighbours)
