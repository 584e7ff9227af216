"""Retrieval ranks straight from embeddings, streamed over blocks and sharded over devices.

The [Q, V] similarity matrix is never built. Each device holds every query and 1/N of the
gallery's videos, computes one [B, B] block of similarities at a time and turns it into rank
counts on the spot: a tie-averaged rank is "how many candidates score higher, plus half of those
that score the same" (`tt_jax.metrics` explains the counting and matches the reference). A
query's t2v count is summed over the devices; a video's v2t count stays on the device holding
it. Memory is the embeddings plus O(B^2) per device, and ranks are exact integers (doubled) for
any number of candidates.

Each query's similarity to its own video is computed once, by the device holding that video,
and stands in for that entry of every block, so "the relevant video ties with itself" holds
exactly. Blocks have one shape whatever the number of devices, so 1 device and N devices compute
every similarity with the same program and give the same ranks.

Optionally the t2v ranks are also counted under a per-video rescoring `scale * s - offset[v]`
(QB-Norm's inverted softmax in log space, or CSLS; `tt_jax.qbnorm`), chosen per query.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec

from tt_jax import parallel
from tt_jax.errors import UserInputError
from tt_jax.metrics import MISSING_CAPTION_SIMILARITY, RetrievalRanks, half_rank_points, order_preserving_integers
from tt_jax.packed_embeddings import (
    GalleryLayout,
    PackedGallery,
    PackedQueries,
    block_similarity,
    check_dimensions,
    pair_similarity,
    place_gallery,
    place_queries,
)

_LOWEST_KEY = np.iinfo(np.int32).min


@dataclasses.dataclass(frozen=True)
class Rescoring:
    """t2v scores `scale * s[q, v] - offsets[v]`, used for every query, or (dynamic) only for
    queries whose raw top-1 video is in `activation` [V]."""

    scale: float
    offsets: jax.Array  # [padded videos], sharded like the gallery
    activation: Optional[jax.Array] = None  # [padded videos] bool, sharded like the gallery


class _Counts(NamedTuple):
    doubled_t2v: jax.Array  # [Qp] twice the t2v rank plus one, summed over devices
    doubled_v2t: jax.Array  # [Vp] twice the v2t rank plus one, sharded like the gallery
    has_rankable_caption: jax.Array  # [Vp] bool, sharded like the gallery
    non_finite: jax.Array  # [] NaN/inf similarities among real rows and videos
    rescored: jax.Array  # [Qp] bool: the query's t2v count is the rescored one


def _rows(tree, start, size):
    return jax.tree.map(lambda leaf: jax.lax.dynamic_slice_in_dim(leaf, start, size), tree)


def _add_at(total: jax.Array, start, part: jax.Array) -> jax.Array:
    return jax.lax.dynamic_update_slice_in_dim(
        total, jax.lax.dynamic_slice_in_dim(total, start, part.shape[0]) + part, start, axis=0
    )


def _local_counts(
    queries: PackedQueries,
    targets: jax.Array,
    in_layout: jax.Array,
    is_real: jax.Array,
    gallery: PackedGallery,
    offsets: Optional[jax.Array],
    activation: Optional[jax.Array],
    *,
    layout: GalleryLayout,
    keep_missing_modalities: bool,
    missing_caption_sentinel: bool,
    scale: Optional[float],
) -> _Counts:
    """Per device: every query against this device's `layout.videos_per_device` videos."""
    block, local_videos = layout.block, layout.videos_per_device
    query_blocks, video_blocks = layout.padded_queries // block, local_videos // block
    first_video = jax.lax.axis_index(parallel.DATA_AXIS) * local_videos
    local_target = targets - first_video
    target_here = (local_target >= 0) & (local_target < local_videos)
    similarity = functools.partial(block_similarity, keep_missing_modalities=keep_missing_modalities)

    # Each query's similarity to its own video, from the device that holds the video.
    def own_block(index, own):
        start = index * block
        holder_rows = jnp.clip(jax.lax.dynamic_slice_in_dim(local_target, start, block), 0, local_videos - 1)
        videos = jax.tree.map(lambda leaf: leaf[holder_rows], gallery)
        values = pair_similarity(_rows(queries, start, block), videos, keep_missing_modalities=keep_missing_modalities)
        return jax.lax.dynamic_update_slice_in_dim(own, values, start, axis=0)

    own = jax.lax.fori_loop(0, query_blocks, own_block, parallel.varying_over_devices(jnp.zeros(layout.padded_queries, jnp.float32)))
    own = parallel.from_holder(own, target_here)
    own_keys = order_preserving_integers(own)

    # v2t: a video is ranked by its best rankable caption (metrics._best_caption_per_video).
    sentinel = order_preserving_integers(jnp.asarray(MISSING_CAPTION_SIMILARITY, jnp.float32))
    rankable = is_real & (own_keys != sentinel) if missing_caption_sentinel else is_real
    segment = jnp.where(rankable & target_here, local_target, local_videos)
    best_caption = jax.ops.segment_max(jnp.where(rankable, own_keys, _LOWEST_KEY), segment, local_videos + 1)[:local_videos]
    has_rankable = jax.ops.segment_max(rankable.astype(jnp.int32), segment, local_videos + 1)[:local_videos] > 0

    if scale is not None:
        safe_target = jnp.clip(local_target, 0, local_videos - 1)
        own_offsets = parallel.from_holder(offsets[safe_target], target_here)
        own_rescored_keys = order_preserving_integers(scale * own - own_offsets)

    def visit(index, carry):
        doubled_t2v, doubled_t2v_rescored, doubled_v2t, non_finite, top_key, top_video = carry
        query_start, video_start = (index // video_blocks) * block, (index % video_blocks) * block
        sims = similarity(_rows(queries, query_start, block), _rows(gallery, video_start, block))
        video_ids = first_video + video_start + jnp.arange(block)
        valid = (video_ids < layout.num_videos)[None, :]
        block_targets = jax.lax.dynamic_slice_in_dim(targets, query_start, block)
        is_own = block_targets[:, None] == video_ids[None, :]
        block_own = jax.lax.dynamic_slice_in_dim(own_keys, query_start, block)
        keys = jnp.where(is_own, block_own[:, None], order_preserving_integers(sims))

        t2v_points = jnp.sum(jnp.where(valid, half_rank_points(keys, block_own[:, None]), 0), axis=1, dtype=jnp.int32)
        doubled_t2v = _add_at(doubled_t2v, query_start, t2v_points)

        block_real = jax.lax.dynamic_slice_in_dim(is_real, query_start, block)[:, None]
        block_in_layout = jax.lax.dynamic_slice_in_dim(in_layout, query_start, block)[:, None]
        if missing_caption_sentinel:
            column_keys, counted = jnp.where(block_real, keys, sentinel), block_in_layout
        else:
            column_keys, counted = keys, block_real
        block_best = jax.lax.dynamic_slice_in_dim(best_caption, video_start, block)
        v2t_points = jnp.sum(jnp.where(counted, half_rank_points(column_keys, block_best[None, :]), 0), axis=0, dtype=jnp.int32)
        doubled_v2t = _add_at(doubled_v2t, video_start, v2t_points)
        non_finite = non_finite + jnp.sum(~jnp.isfinite(sims) & valid & block_in_layout, dtype=jnp.int32)

        if scale is not None:
            block_offsets = jax.lax.dynamic_slice_in_dim(offsets, video_start, block)
            block_rescored_own = jax.lax.dynamic_slice_in_dim(own_rescored_keys, query_start, block)
            rescored = jnp.where(is_own, block_rescored_own[:, None], order_preserving_integers(scale * sims - block_offsets[None, :]))
            points = jnp.sum(jnp.where(valid, half_rank_points(rescored, block_rescored_own[:, None]), 0), axis=1, dtype=jnp.int32)
            doubled_t2v_rescored = _add_at(doubled_t2v_rescored, query_start, points)
            # The raw top-1 video of each query (the lowest index among ties).
            candidates = jnp.where(valid, keys, _LOWEST_KEY)
            block_top = jnp.max(candidates, axis=1)
            block_top_video = video_ids[jnp.argmax(candidates, axis=1)]
            old_key = jax.lax.dynamic_slice_in_dim(top_key, query_start, block)
            old_video = jax.lax.dynamic_slice_in_dim(top_video, query_start, block)
            better = block_top > old_key
            top_key = jax.lax.dynamic_update_slice_in_dim(top_key, jnp.where(better, block_top, old_key), query_start, 0)
            top_video = jax.lax.dynamic_update_slice_in_dim(top_video, jnp.where(better, block_top_video, old_video), query_start, 0)
        return doubled_t2v, doubled_t2v_rescored, doubled_v2t, non_finite, top_key, top_video

    zeros_q = jnp.zeros(layout.padded_queries, jnp.int32)
    carry = (zeros_q, zeros_q, jnp.zeros(local_videos, jnp.int32), jnp.zeros((), jnp.int32),
             jnp.full(layout.padded_queries, _LOWEST_KEY, jnp.int32), zeros_q)
    doubled_t2v, doubled_t2v_rescored, doubled_v2t, non_finite, top_key, top_video = jax.lax.fori_loop(
        0, query_blocks * video_blocks, visit, parallel.varying_over_devices(carry)
    )
    doubled_t2v = parallel.sum_over_devices(doubled_t2v)
    rescored = jnp.zeros(layout.padded_queries, bool)
    if scale is not None:
        doubled_t2v_rescored = parallel.sum_over_devices(doubled_t2v_rescored)
        if activation is None:
            rescored = jnp.ones(layout.padded_queries, bool)
        else:
            # The device whose video is the best overall holds the query's top-1 (lowest device
            # first among ties, as device order is video order).
            all_keys = jax.lax.all_gather(top_key, parallel.DATA_AXIS)  # [N, Qp]
            winner = jnp.argmax(all_keys, axis=0)
            mine = winner == jax.lax.axis_index(parallel.DATA_AXIS)
            active = activation[jnp.clip(top_video - first_video, 0, local_videos - 1)]
            rescored = parallel.from_holder(active.astype(jnp.int32), mine) > 0
        doubled_t2v = jnp.where(rescored, doubled_t2v_rescored, doubled_t2v)
    return _Counts(doubled_t2v, doubled_v2t, has_rankable, parallel.sum_over_devices(non_finite), rescored)


@functools.lru_cache(maxsize=32)
def _compiled_counts(mesh: Mesh, layout: GalleryLayout, keep_missing_modalities: bool, missing_caption_sentinel: bool,
                     scale: Optional[float], dynamic: bool):
    """One compiled program per (mesh, layout, options): an evaluator reuses it for every call."""
    replicated, sharded = PartitionSpec(), PartitionSpec(parallel.DATA_AXIS)
    body = functools.partial(
        _local_counts, layout=layout, keep_missing_modalities=keep_missing_modalities,
        missing_caption_sentinel=missing_caption_sentinel, scale=scale,
    )
    gallery_specs = PackedGallery(sharded, sharded)
    return jax.jit(
        jax.shard_map(
            body,
            mesh=mesh,
            in_specs=(PackedQueries(replicated, replicated), replicated, replicated, replicated, gallery_specs,
                      sharded if scale is not None else None, sharded if dynamic else None),
            out_specs=_Counts(replicated, sharded, sharded, replicated, replicated),
        )
    )


@dataclasses.dataclass(frozen=True)
class StreamedRanks:
    """What `streamed_ranks` returns: the ranks, and which queries were rescored."""

    ranks: RetrievalRanks
    rescored_fraction: Optional[float] = None


def query_rows(targets, query_masks, num_videos: int) -> tuple[np.ndarray, np.ndarray]:
    """Checked (targets [Q] int32, is_real [Q] bool) for queries of videos `targets`."""
    targets = np.asarray(targets)
    if targets.ndim != 1 or not np.issubdtype(targets.dtype, np.integer):
        raise UserInputError(f"targets must be a 1-D array of video indices, got shape {targets.shape} dtype {targets.dtype}")
    if len(targets) and (targets.min() < 0 or targets.max() >= num_videos):
        bad = int(np.argmax((targets < 0) | (targets >= num_videos)))
        raise UserInputError(f"query {bad} names video {targets[bad]}, outside the gallery's {num_videos} videos")
    is_real = np.ones(len(targets), bool) if query_masks is None else np.asarray(query_masks).reshape(-1) != 0
    if is_real.shape != targets.shape:
        raise UserInputError(f"query_masks has {is_real.size} entries for {targets.size} queries")
    return targets.astype(np.int32), is_real


def streamed_ranks(
    queries: PackedQueries,
    gallery: PackedGallery,
    targets,
    query_masks=None,
    *,
    num_videos: Optional[int] = None,
    mesh: Optional[Mesh] = None,
    block: Optional[int] = None,
    keep_missing_modalities: bool = False,
    missing_caption_sentinel: bool = True,
    rescoring: Optional[Rescoring] = None,
) -> StreamedRanks:
    """t2v and v2t ranks of `queries` against `gallery`, without the similarity matrix.

    targets: [Q] the relevant video of each query; query_masks: [Q] (or [V, K]) 1 = real query
      (masked queries are not ranked in t2v and sit at -1e8 in v2t, as in `tt_jax.metrics`).
    num_videos: the real videos when `gallery` is already padded to its layout (the rest are
      padding); default: every row.
    rescoring: count t2v under QB-Norm or CSLS scores (`tt_jax.qbnorm.rescoring`).
    Returns ranks as `tt_jax.metrics.RetrievalRanks` (float64, exact for any gallery size).
    """
    mesh = mesh if mesh is not None else parallel.make_mesh()
    check_dimensions(queries, gallery)
    num_videos = gallery.vectors.shape[0] if num_videos is None else num_videos
    layout = GalleryLayout.for_mesh(queries.vectors.shape[0], num_videos, mesh, block)
    targets, is_real = query_rows(targets, query_masks, num_videos)
    if len(targets) != layout.num_queries:
        raise UserInputError(f"{len(targets)} targets for {layout.num_queries} queries")
    padding = layout.padded_queries - layout.num_queries
    host_rows = (
        np.concatenate([targets, np.zeros(padding, np.int32)]),
        np.concatenate([np.ones(len(targets), bool), np.zeros(padding, bool)]),
        np.concatenate([is_real, np.zeros(padding, bool)]),
    )
    rows_on_mesh = jax.device_put(host_rows, parallel.replicated(mesh))
    placed_queries = place_queries(queries, layout, mesh)
    placed_gallery = place_gallery(gallery, layout, mesh)
    scale = None if rescoring is None else float(rescoring.scale)
    dynamic = rescoring is not None and rescoring.activation is not None
    counts = _compiled_counts(mesh, layout, keep_missing_modalities, missing_caption_sentinel, scale, dynamic)(
        placed_queries, *rows_on_mesh, placed_gallery,
        None if rescoring is None else rescoring.offsets, rescoring.activation if dynamic else None,
    )
    non_finite = int(parallel.host_values(counts.non_finite))
    if non_finite:
        raise UserInputError(
            f"{non_finite} similarities are NaN or inf (a video with no expert, or non-finite embeddings); "
            "check the gallery's availability and the embeddings"
        )
    doubled_t2v, doubled_v2t, has_rankable, rescored = parallel.host_values(
        (counts.doubled_t2v, counts.doubled_v2t, counts.has_rankable_caption, counts.rescored)
    )
    t2v = (np.asarray(doubled_t2v[: layout.num_queries], np.float64) - 1) / 2
    v2t = (np.asarray(doubled_v2t[:num_videos], np.float64) - 1) / 2
    ranks = RetrievalRanks(
        text_to_video=t2v[is_real],
        video_to_text=np.where(np.asarray(has_rankable[:num_videos]), v2t, np.inf),
    )
    fraction = None if rescoring is None else float(np.mean(np.asarray(rescored[: layout.num_queries])[is_real]))
    return StreamedRanks(ranks, fraction)
