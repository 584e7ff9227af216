"""Text-video retrieval metrics (R@k, median and mean rank), matching the reference exactly.

The reference (`model/metric.py` of albanie/collaborative-experts) sorts every row of the
distance matrix in numpy and searches the sorted row for the ground truth. Sorting is not needed:
a tie-averaged rank is a count, "how many candidates score higher, plus half of the others that
score the same". Here those counts run on device over blocks of rows, so the extra memory is
O(block) however large the gallery is; a host (numpy) matrix is streamed to the device block by
block and never copied whole.

Layout (the reference's): `sims` is `[V*K, V]`, row `v*K + k` is caption `k` of video `v` and its
only relevant video is `v`; `query_masks` is `[V, K]` with 1 for a real caption. Ranks are 0-based.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from tt_jax.reference_gmean import reference_geometric_mean

# The reference gives missing captions the distance 1e8, i.e. the similarity -1e8
# (`MISSING_VAL` in v2t_metrics, model/metric.py).
MISSING_CAPTION_SIMILARITY = -1e8

# The reference's metrics (`cols2metrics`), the columns of the report's tables.
REFERENCE_METRIC_NAMES = ("R1", "R5", "R10", "R50", "MedR", "MeanR", "geometric_mean_R1-R5-R10")
# Plus R@100 and SumR = R1 + R5 + R10 + R100, the summary DL-DKD and LINAS report.
METRIC_NAMES = REFERENCE_METRIC_NAMES + ("R100", "SumR")

# Automatic chunking keeps a block of rows at about this many entries: 4 MiB of float32 stays in
# a CPU's cache (measured 2-3x faster than 64 MiB blocks on 20k x 20k); accelerators want
# larger blocks to fill the device.
_ENTRIES_PER_CHUNK_ON_CPU = 1 << 20
_ENTRIES_PER_CHUNK_ON_ACCELERATOR = 1 << 24

# Ranks are returned in float32, which holds every half-integer below 2**23 exactly: a column may
# therefore hold at most this many caption rows.
_MAX_CANDIDATES = 1 << 23


@dataclasses.dataclass(frozen=True)
class RetrievalRanks:
    """Per-query 0-based ranks on host, in float64, as the reference's metrics see them.

    text_to_video: [number of real captions], real captions only, in row order.
    video_to_text: [V], np.inf for a video that has no rankable caption.
    """

    text_to_video: np.ndarray
    video_to_text: np.ndarray


# --------------------------------------------------------------------------------------------
# Device side: ranks as counts.
# --------------------------------------------------------------------------------------------


def _working_dtype(dtype: Any) -> np.dtype:
    """The dtype similarities are compared in.

    float64 stays float64 only under jax_enable_x64; otherwise it is narrowed to float32, which can
    merge values that differ only beyond float32 precision into ties. float16 and bfloat16 widen
    to float32 exactly (so the -1e8 sentinel is representable).
    """
    if np.dtype(dtype) == np.float64 and jax.config.jax_enable_x64:
        return np.dtype(np.float64)
    return np.dtype(np.float32)


def order_preserving_integers(values: jax.Array) -> jax.Array:
    """Maps floats to signed integers with the same order and the same ties.

    Integer comparisons are exact on every backend, whereas XLA on CPU flushes subnormal floats
    to zero and would create ties that numpy does not see. -0.0 and +0.0 both map to 0 (they are
    equal floats). NaN must be rejected separately.
    """
    integer_dtype = jnp.dtype(f"int{8 * values.dtype.itemsize}")
    bits = jax.lax.bitcast_convert_type(values, integer_dtype)
    magnitude = bits & jnp.array(jnp.iinfo(integer_dtype).max, integer_dtype)
    return jnp.where(bits < 0, -magnitude, bits)


def half_rank_points(candidates: jax.Array, target: jax.Array) -> jax.Array:
    """2 per candidate above `target`, 1 per tie: summed, minus 1, that is twice the rank.

    rank = #(higher) + (#(equal) - 1) / 2, the mean position of the target among its ties once the
    row is sorted (t2v_metrics / v2t_metrics in model/metric.py). Doubling keeps it an integer.
    """
    return jnp.where(candidates > target, 2, jnp.where(candidates == target, 1, 0))


def _missing_caption_key(dtype: Any) -> jax.Array:
    return order_preserving_integers(jnp.asarray(MISSING_CAPTION_SIMILARITY, dtype))


def _best_caption_per_video(
    own_captions: jax.Array, own_is_real: jax.Array, missing_caption_sentinel: bool
) -> tuple[jax.Array, jax.Array]:
    """own_captions: [V, K] similarity of each caption to its own video (working dtype).

    Returns (order key of the best rankable caption [V], whether there is one [V]). v2t ranks a
    video by its best caption: a rank only grows with the distance, so the minimum over captions
    that the reference loops for is the rank of the highest similarity.
    """
    keys = order_preserving_integers(own_captions)
    sentinel = _missing_caption_key(own_captions.dtype)
    if missing_caption_sentinel:
        # Reference: masked captions become the sentinel, then any caption equal to the sentinel
        # is skipped, a real one whose similarity is exactly -1e8 included.
        keys = jnp.where(own_is_real, keys, sentinel)
        rankable = keys != sentinel
    else:
        rankable = own_is_real
    lowest = jnp.iinfo(keys.dtype).min
    best = jnp.max(jnp.where(rankable, keys, lowest), axis=1)
    return best, jnp.any(rankable, axis=1)


class _BlockCounts(NamedTuple):
    doubled_t2v_ranks: jax.Array  # [C] twice the t2v rank of each row of the block
    doubled_v2t_points: jax.Array  # [V] the block's new rows' share of twice the v2t ranks (+1)
    non_finite: jax.Array  # [] NaN/inf entries among the block's new rows


def _count_block(
    block: jax.Array,
    block_is_real: jax.Array,
    first_row: jax.Array,
    first_new_row: jax.Array,
    best_caption: jax.Array,
    *,
    captions_per_video: int,
    missing_caption_sentinel: bool,
) -> _BlockCounts:
    """Counts for rows [first_row, first_row + C) of sims; block: [C, V], block_is_real: [C].

    Rows below `first_new_row` were counted by the previous block (the last block is moved back
    to end at the last row rather than padded) and are left out of the v2t and NaN counts.
    """
    num_rows = block.shape[0]
    row_ids = first_row + jnp.arange(num_rows)
    is_new_row = row_ids >= first_new_row

    keys = order_preserving_integers(block)
    relevant = jnp.take_along_axis(keys, (row_ids // captions_per_video)[:, None], axis=1)
    # One variadic reduction over the row counts both the rank points and the NaN/inf entries:
    # XLA then reads the block once for the two (twice as fast on CPU as two sums).
    t2v_points, non_finite_per_row = jax.lax.reduce(
        (
            half_rank_points(keys, relevant).astype(jnp.int32),
            (~jnp.isfinite(block)).astype(jnp.int32),
        ),
        (jnp.int32(0), jnp.int32(0)),
        lambda left, right: (left[0] + right[0], left[1] + right[1]),
        (1,),
    )
    non_finite = jnp.sum(jnp.where(is_new_row, non_finite_per_row, 0), dtype=jnp.int32)

    if missing_caption_sentinel:
        column_keys = jnp.where(block_is_real[:, None], keys, _missing_caption_key(block.dtype))
        counted = is_new_row
    else:
        column_keys = keys
        counted = is_new_row & block_is_real
    v2t_points = jnp.where(
        counted[:, None], half_rank_points(column_keys, best_caption[None, :]), 0
    )
    return _BlockCounts(
        doubled_t2v_ranks=t2v_points - 1,
        doubled_v2t_points=jnp.sum(v2t_points, axis=0, dtype=jnp.int32),
        non_finite=non_finite,
    )


def _ranks_from_doubled(
    doubled_t2v: jax.Array, doubled_v2t_points: jax.Array, has_rankable_caption: jax.Array
) -> tuple[jax.Array, jax.Array]:
    t2v_ranks = doubled_t2v.astype(jnp.float32) * 0.5
    # The "- 1" of the tie-averaged rank, applied once after all blocks.
    v2t_ranks = (doubled_v2t_points - 1).astype(jnp.float32) * 0.5
    return t2v_ranks, jnp.where(has_rankable_caption, v2t_ranks, jnp.inf)


def _chunk_rows(
    num_rows: int, num_videos: int, chunk_size: int | None, platform: str | None = None
) -> int:
    """Rows per block: chunk_size, or a cache-sized block for `platform` (default backend)."""
    if chunk_size is None:
        on_cpu = (platform or jax.default_backend()) == "cpu"
        entries = _ENTRIES_PER_CHUNK_ON_CPU if on_cpu else _ENTRIES_PER_CHUNK_ON_ACCELERATOR
        chunk_size = max(1, entries // num_videos)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive number of rows, got {chunk_size!r}")
    return min(chunk_size, num_rows)


def _ranks_on_device(
    sims: jax.Array,
    caption_is_real: jax.Array,
    chunk_size: int | None,
    missing_caption_sentinel: bool,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Traceable: (t2v ranks [V*K], v2t ranks [V], NaN/inf count) for a matrix on device."""
    num_rows, num_videos = sims.shape
    captions_per_video = num_rows // num_videos
    rows_per_chunk = _chunk_rows(num_rows, num_videos, chunk_size)
    work_dtype = _working_dtype(sims.dtype)

    own_captions = sims.reshape(num_videos, captions_per_video, num_videos)[
        jnp.arange(num_videos), :, jnp.arange(num_videos)
    ]  # [V, K]
    best_caption, has_rankable_caption = _best_caption_per_video(
        own_captions.astype(work_dtype),
        caption_is_real.reshape(num_videos, captions_per_video),
        missing_caption_sentinel,
    )

    def visit_chunk(chunk_index, carry):
        doubled_t2v, doubled_v2t, non_finite = carry
        first_new_row = chunk_index * rows_per_chunk
        first_row = jnp.minimum(first_new_row, num_rows - rows_per_chunk)
        counts = _count_block(
            jax.lax.dynamic_slice(sims, (first_row, 0), (rows_per_chunk, num_videos)).astype(
                work_dtype
            ),
            jax.lax.dynamic_slice(caption_is_real, (first_row,), (rows_per_chunk,)),
            first_row,
            first_new_row,
            best_caption,
            captions_per_video=captions_per_video,
            missing_caption_sentinel=missing_caption_sentinel,
        )
        return (
            jax.lax.dynamic_update_slice(doubled_t2v, counts.doubled_t2v_ranks, (first_row,)),
            doubled_v2t + counts.doubled_v2t_points,
            non_finite + counts.non_finite,
        )

    doubled_t2v, doubled_v2t, non_finite = jax.lax.fori_loop(
        0,
        -(-num_rows // rows_per_chunk),
        visit_chunk,
        (
            jnp.zeros(num_rows, jnp.int32),
            jnp.zeros(num_videos, jnp.int32),
            jnp.zeros((), jnp.int32),
        ),
    )
    return (*_ranks_from_doubled(doubled_t2v, doubled_v2t, has_rankable_caption), non_finite)


@functools.partial(jax.jit, static_argnames=("chunk_size", "missing_caption_sentinel"))
def unchecked_retrieval_ranks(
    sims: jax.Array,
    query_masks: jax.Array,
    *,
    chunk_size: int | None = None,
    missing_caption_sentinel: bool = True,
) -> tuple[jax.Array, jax.Array]:
    """Jittable core of `retrieval_ranks`, for use inside other jitted code.

    Trusts its input: finite sims [V*K, V], query_masks [V, K] (nonzero = real caption).
    Returns (t2v ranks [V*K], v2t ranks [V]) in float32, as `retrieval_ranks` does.
    """
    num_rows = sims.shape[0]
    t2v_ranks, v2t_ranks, _ = _ranks_on_device(
        sims, query_masks.reshape(num_rows) != 0, chunk_size, missing_caption_sentinel
    )
    return t2v_ranks, v2t_ranks


_checked_ranks_on_device = jax.jit(
    _ranks_on_device, static_argnames=("chunk_size", "missing_caption_sentinel")
)


@functools.partial(jax.jit, static_argnames=("missing_caption_sentinel",))
def _best_caption_jit(own_captions, own_is_real, *, missing_caption_sentinel):
    return _best_caption_per_video(own_captions, own_is_real, missing_caption_sentinel)


_count_block_jit = jax.jit(
    _count_block, static_argnames=("captions_per_video", "missing_caption_sentinel")
)


def _ranks_streamed_from_host(
    sims: np.ndarray,
    caption_is_real: np.ndarray,
    chunk_size: int | None,
    missing_caption_sentinel: bool,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Like `_ranks_on_device` for a numpy matrix, sending one block of rows at a time.

    A Python loop over blocks (not over queries); every block has the same shape, so the block
    function compiles once.
    """
    num_rows, num_videos = sims.shape
    captions_per_video = num_rows // num_videos
    rows_per_chunk = _chunk_rows(num_rows, num_videos, chunk_size)
    work_dtype = _working_dtype(sims.dtype)

    own_captions = sims.reshape(num_videos, captions_per_video, num_videos)[
        np.arange(num_videos), :, np.arange(num_videos)
    ]  # [V, K]
    best_caption, has_rankable_caption = _best_caption_jit(
        jnp.asarray(own_captions.astype(work_dtype)),
        jnp.asarray(caption_is_real.reshape(num_videos, captions_per_video)),
        missing_caption_sentinel=missing_caption_sentinel,
    )
    t2v_pieces = []
    doubled_v2t = jnp.zeros(num_videos, jnp.int32)
    non_finite = jnp.zeros((), jnp.int32)
    previous_block_done = None
    for first_new_row in range(0, num_rows, rows_per_chunk):
        first_row = min(first_new_row, num_rows - rows_per_chunk)
        rows = slice(first_row, first_row + rows_per_chunk)
        counts = _count_block_jit(
            jax.device_put(np.asarray(sims[rows], dtype=work_dtype)),
            jax.device_put(caption_is_real[rows]),
            first_row,
            first_new_row,
            best_caption,
            captions_per_video=captions_per_video,
            missing_caption_sentinel=missing_caption_sentinel,
        )
        t2v_pieces.append(counts.doubled_t2v_ranks[first_new_row - first_row :])
        doubled_v2t = doubled_v2t + counts.doubled_v2t_points
        non_finite = non_finite + counts.non_finite
        # Dispatch is asynchronous: without this wait the loop would queue copies of the whole
        # matrix. Waiting for the block before this one keeps two in flight, so the next copy
        # still overlaps the current count.
        if previous_block_done is not None:
            previous_block_done.block_until_ready()
        previous_block_done = counts.non_finite
    doubled_t2v = jnp.concatenate(t2v_pieces)
    return (*_ranks_from_doubled(doubled_t2v, doubled_v2t, has_rankable_caption), non_finite)


@jax.jit
def _first_non_finite_on_device(sims: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Row and column of the first NaN/inf, without a flat index that could overflow int32."""
    bad = ~jnp.isfinite(sims)
    first_row = jnp.argmax(jnp.any(bad, axis=1))
    return first_row, jnp.argmax(bad[first_row])


def _first_non_finite(sims: Any, rows_per_chunk: int) -> tuple[int, int]:
    if isinstance(sims, jax.Array):
        return tuple(int(i) for i in jax.device_get(_first_non_finite_on_device(sims)))
    for first_row in range(0, sims.shape[0], rows_per_chunk):
        bad = np.argwhere(~np.isfinite(sims[first_row : first_row + rows_per_chunk]))
        if len(bad):
            return first_row + int(bad[0][0]), int(bad[0][1])
    raise AssertionError("a non-finite value was counted but not found")


# --------------------------------------------------------------------------------------------
# Host side: checks and metrics.
# --------------------------------------------------------------------------------------------


def _validated_masks(query_masks: Any, num_videos: int, captions_per_video: int) -> np.ndarray:
    expected_shape = (num_videos, captions_per_video)
    if query_masks is None:
        return np.ones(expected_shape, np.float64)
    masks = np.asarray(query_masks)
    if masks.shape != expected_shape:
        raise ValueError(
            f"query_masks has shape {masks.shape}, expected (V, K) = {expected_shape} "
            f"for sims of shape ({num_videos * captions_per_video}, {num_videos})"
        )
    not_binary = ~np.isin(masks, (0, 1))
    if np.any(not_binary):
        where = tuple(int(i) for i in np.argwhere(not_binary)[0])
        raise ValueError(f"query_masks must hold only 0 and 1; found {masks[where]!r} at {where}")
    return masks.astype(np.float64)


def _validated_layout(sims: Any, query_masks: Any) -> tuple[Any, np.ndarray]:
    """Checks everything but finiteness (counted while ranking); returns sims (numpy or jax)
    and float64 [V, K] masks."""
    if not isinstance(sims, jax.Array):
        sims = np.asarray(sims)
    if sims.ndim != 2:
        raise ValueError(f"sims must be a 2-D [V*K, V] matrix, got shape {sims.shape}")
    num_rows, num_videos = sims.shape
    if num_rows == 0 or num_videos == 0:
        raise ValueError(f"sims is empty (shape {sims.shape}); nothing to rank")
    if not jnp.issubdtype(sims.dtype, jnp.floating):
        raise ValueError(f"sims must hold floating point similarities, got dtype {sims.dtype}")
    if num_rows % num_videos:
        raise ValueError(
            f"sims has {num_rows} rows, not a multiple of its {num_videos} columns: expected "
            "[V*K, V] with row v*K + k holding caption k of video v"
        )
    if num_rows > _MAX_CANDIDATES:
        raise ValueError(
            f"sims has {num_rows} caption rows; float32 ranks are exact only up to "
            f"{_MAX_CANDIDATES} candidates"
        )
    masks = _validated_masks(query_masks, num_videos, num_rows // num_videos)
    return sims, masks


def _placed_with(host: np.ndarray, sims: jax.Array) -> jax.Array:
    """`host` on the devices of `sims` (replicated over its mesh), in one explicit transfer."""
    sharding = sims.sharding
    if isinstance(sharding, jax.sharding.NamedSharding):
        sharding = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
    return jax.device_put(host, sharding)


def _checked_ranks(
    sims: Any, query_masks: Any, chunk_size: int | None, missing_caption_sentinel: bool
) -> tuple[jax.Array, jax.Array, np.ndarray]:
    """`retrieval_ranks`, also returning the validated float64 [V, K] masks."""
    sims, masks = _validated_layout(sims, query_masks)
    caption_is_real = masks.reshape(-1) != 0
    if isinstance(sims, jax.Array):
        platform = next(iter(sims.devices())).platform
        t2v_ranks, v2t_ranks, non_finite = _checked_ranks_on_device(
            sims,
            _placed_with(caption_is_real, sims),
            chunk_size=_chunk_rows(*sims.shape, chunk_size, platform),
            missing_caption_sentinel=missing_caption_sentinel,
        )
    else:
        t2v_ranks, v2t_ranks, non_finite = _ranks_streamed_from_host(
            sims, caption_is_real, chunk_size, missing_caption_sentinel
        )
    non_finite = int(jax.device_get(non_finite))
    if non_finite:
        row, column = _first_non_finite(sims, _chunk_rows(*sims.shape, chunk_size))
        raise ValueError(
            f"sims holds {non_finite} non-finite value(s) (NaN or inf); the first is "
            f"{sims[row, column]} at row {row}, column {column}"
        )
    return t2v_ranks, v2t_ranks, masks


def retrieval_ranks(
    sims: Any,
    query_masks: Any,
    *,
    chunk_size: int | None = None,
    missing_caption_sentinel: bool = True,
) -> tuple[jax.Array, jax.Array]:
    """0-based tie-averaged ranks, counted on device, after checking the input.

    sims: [V*K, V] similarities, a jax.Array (ranked where it lives) or numpy (streamed to the
      device in blocks). Compared in float32, or float64 under jax_enable_x64.
    query_masks: [V, K], 1 = real caption (None: all real).
    chunk_size: rows per block; extra memory is O(chunk_size * V). None: about 1M entries per
      block on CPU (cache-sized), 16M on an accelerator.
    missing_caption_sentinel: True reproduces the reference's v2t, where masked captions sit at
      similarity -1e8 and a real caption whose similarity equals -1e8 is skipped. False leaves
      masked captions out of v2t entirely and never skips a real caption. t2v is unaffected.

    Returns (t2v [V*K] float32 for every row, masked rows included; v2t [V] float32, inf for a
    video without a rankable caption).
    """
    t2v_ranks, v2t_ranks, _ = _checked_ranks(
        sims, query_masks, chunk_size, missing_caption_sentinel
    )
    return t2v_ranks, v2t_ranks


def metrics_from_ranks(ranks: Any, num_queries: float) -> dict[str, float]:
    """R@k, MedR, MeanR, the geometric mean of R1-R5-R10 and SumR, in float64 on host.

    ranks: [N] 0-based ranks; num_queries: the denominator of R@k (the reference uses the number
    of real captions for t2v and V for v2t). Formulas of `cols2metrics` in model/metric.py, in
    percent; R1 needs rank == 0, so a tie at the top (0.5) is a miss.
    """
    ranks = np.asarray(ranks, dtype=np.float64)
    metrics = {
        "R1": 100 * float(np.sum(ranks == 0)) / num_queries,
        "R5": 100 * float(np.sum(ranks < 5)) / num_queries,
        "R10": 100 * float(np.sum(ranks < 10)) / num_queries,
        "R50": 100 * float(np.sum(ranks < 50)) / num_queries,
        "R100": 100 * float(np.sum(ranks < 100)) / num_queries,
        "MedR": np.median(ranks) + 1,
        "MeanR": np.mean(ranks) + 1,
    }
    metrics["geometric_mean_R1-R5-R10"] = reference_geometric_mean(
        metrics["R1"], metrics["R5"], metrics["R10"]
    )
    metrics["SumR"] = metrics["R1"] + metrics["R5"] + metrics["R10"] + metrics["R100"]
    return {name: float(metrics[name]) for name in METRIC_NAMES}


def retrieval_metrics_and_ranks(
    sims: Any,
    query_masks: Any,
    *,
    missing_caption_sentinel: bool = True,
    chunk_size: int | None = None,
) -> tuple[dict[str, dict[str, float]], RetrievalRanks]:
    """`retrieval_metrics` plus the per-query ranks the metrics were computed from."""
    t2v_ranks, v2t_ranks, masks = _checked_ranks(
        sims, query_masks, chunk_size, missing_caption_sentinel
    )
    t2v_ranks, v2t_ranks = jax.device_get((t2v_ranks, v2t_ranks))
    ranks = RetrievalRanks(
        text_to_video=np.asarray(t2v_ranks, np.float64)[masks.reshape(-1) != 0],
        video_to_text=np.asarray(v2t_ranks, np.float64),
    )
    metrics = {
        "t2v": metrics_from_ranks(ranks.text_to_video, masks.sum()),
        "v2t": metrics_from_ranks(ranks.video_to_text, masks.shape[0]),
    }
    return metrics, ranks


def retrieval_metrics(
    sims: Any,
    query_masks: Any,
    *,
    missing_caption_sentinel: bool = True,
    chunk_size: int | None = None,
) -> dict[str, dict[str, float]]:
    """{"t2v": metrics, "v2t": metrics} for a [V*K, V] similarity matrix, as the reference's
    t2v_metrics / v2t_metrics compute them. See `retrieval_ranks` for the arguments."""
    metrics, _ = retrieval_metrics_and_ranks(
        sims,
        query_masks,
        missing_caption_sentinel=missing_caption_sentinel,
        chunk_size=chunk_size,
    )
    return metrics
