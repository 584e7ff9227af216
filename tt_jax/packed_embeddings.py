"""Queries and galleries as one matrix each, for retrieval over galleries of any size.

The CE similarity (`tt_jax.models.similarity`) is
    S[q, v] = sum_m w[q, m] a[v, m] <t_m[q], v_m[v]> / sum_m w[q, m] a[v, m].
Its numerator is one inner product once each query's expert embeddings are scaled by their mixture
weights and each video's by its availability and the experts are laid side by side:
    S[q, v] = <T[q], G[v]> / <w[q], a[v]>.
So a block of similarities is one matrix product (rather than one per expert plus M elementwise
passes over the block), and a gallery is one [V, D] array that can be sharded by rows.

A gallery is stored padded to whole blocks on every device (`GalleryLayout`): padding rows are
zeros, and `num_videos` says which rows are real.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Mapping, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from tt_jax import parallel
from tt_jax.errors import UserInputError
from tt_jax.models.ce import Embeddings

# Square blocks of this many queries x videos: 4 MiB of float32 stays in a CPU's cache; an
# accelerator wants larger blocks to fill the device.
BLOCK_ON_CPU = 1024
BLOCK_ON_ACCELERATOR = 4096


class PackedQueries(NamedTuple):
    """vectors: [Q, D] each expert's text embedding times its mixture weight, experts side by side.
    moe_weights: [Q, M] the mixture weights (the similarity's denominator)."""

    vectors: jax.Array
    moe_weights: jax.Array


class PackedGallery(NamedTuple):
    """vectors: [V, D] each expert's video embedding times its availability, experts side by side.
    availability: [V, M] 1 where the video has the expert."""

    vectors: jax.Array
    availability: jax.Array


def pack_queries(
    text: Mapping[str, jax.Array],
    moe_weights: jax.Array,
    expert_names: Sequence[str],
    *,
    keep_missing_modalities: bool = False,
) -> PackedQueries:
    """text: expert -> [Q, D_m]; moe_weights: [Q, M] in `expert_names` order."""
    parts = [
        text[name] if keep_missing_modalities else text[name] * moe_weights[:, index : index + 1]
        for index, name in enumerate(expert_names)
    ]
    return PackedQueries(jnp.concatenate(parts, axis=1).astype(jnp.float32), moe_weights.astype(jnp.float32))


def pack_gallery(
    video: Mapping[str, jax.Array],
    availability: jax.Array,
    expert_names: Sequence[str],
    *,
    keep_missing_modalities: bool = False,
) -> PackedGallery:
    """video: expert -> [V, D_m]; availability: [V, M] in `expert_names` order."""
    parts = [
        video[name] if keep_missing_modalities else video[name] * availability[:, index : index + 1]
        for index, name in enumerate(expert_names)
    ]
    return PackedGallery(jnp.concatenate(parts, axis=1).astype(jnp.float32), availability.astype(jnp.float32))


def pack_split(
    embeddings: Embeddings, expert_names: Sequence[str], *, keep_missing_modalities: bool = False
) -> tuple[PackedQueries, PackedGallery]:
    """A split's embeddings ([V] videos, [V, K] caption slots) as V*K queries (row v*K + k is
    caption k of video v, the evaluation layout) and a V-video gallery."""
    videos, captions, experts = embeddings.moe_weights.shape
    text = {name: t.reshape(videos * captions, -1) for name, t in embeddings.text.items()}
    queries = pack_queries(
        text, embeddings.moe_weights.reshape(videos * captions, experts), expert_names,
        keep_missing_modalities=keep_missing_modalities,
    )
    gallery = pack_gallery(
        embeddings.video, embeddings.availability, expert_names, keep_missing_modalities=keep_missing_modalities
    )
    return queries, gallery


def block_similarity(queries: PackedQueries, gallery: PackedGallery, *, keep_missing_modalities: bool) -> jax.Array:
    """[C, B] similarities of C queries against B videos (a video with no expert gives NaN)."""
    numerator = jnp.dot(queries.vectors, gallery.vectors.T)
    if keep_missing_modalities:  # every weight is 1 (the reference option of that name)
        return numerator
    return numerator / jnp.dot(queries.moe_weights, gallery.availability.T)


def pair_similarity(queries: PackedQueries, videos: PackedGallery, *, keep_missing_modalities: bool) -> jax.Array:
    """[C] similarity of query i with video i (row-aligned inputs)."""
    numerator = jnp.sum(queries.vectors * videos.vectors, axis=1)
    if keep_missing_modalities:
        return numerator
    return numerator / jnp.sum(queries.moe_weights * videos.availability, axis=1)


def default_block(num_videos: int, platform: str | None = None) -> int:
    """The block side for a gallery of this size: cache-sized on CPU, larger on an accelerator,
    never (much) larger than the gallery. It depends on neither the queries nor the number of
    devices, so every similarity is computed by the same program however many devices share the
    gallery, and a query bank ranked against the gallery shares its padding."""
    on_cpu = (platform or jax.default_backend()) == "cpu"
    block = BLOCK_ON_CPU if on_cpu else BLOCK_ON_ACCELERATOR
    return min(block, -(-max(num_videos, 1) // 8) * 8)


@dataclasses.dataclass(frozen=True)
class GalleryLayout:
    """How `num_videos` videos and `num_queries` queries are padded to whole blocks: the gallery
    to `padded_videos` rows (a whole number of blocks on each of `num_devices` devices), the
    queries to `padded_queries` rows."""

    num_queries: int
    num_videos: int
    block: int
    num_devices: int

    def __post_init__(self):
        if isinstance(self.block, bool) or not isinstance(self.block, int) or self.block < 1:
            raise UserInputError(f"the block size must be a positive number of rows, got {self.block!r}")
        if self.num_videos < 1:
            raise UserInputError("the gallery holds no video; nothing to rank")

    @classmethod
    def for_mesh(cls, num_queries: int, num_videos: int, mesh: Mesh, block: int | None = None) -> "GalleryLayout":
        platform = mesh.devices.flat[0].platform
        block = default_block(num_videos, platform) if block is None else block
        return cls(num_queries, num_videos, block, mesh.size)

    @property
    def padded_queries(self) -> int:
        return max(1, -(-self.num_queries // self.block)) * self.block

    @property
    def padded_videos(self) -> int:
        per_device = self.block * self.num_devices
        return -(-self.num_videos // per_device) * per_device

    @property
    def videos_per_device(self) -> int:
        return self.padded_videos // self.num_devices


# Live [B, B] arrays while a block is ranked (similarities, order keys, masks, rank points): an
# upper bound used only to say whether a problem fits.
_BLOCK_TEMPORARIES = 8


def device_bytes_free(mesh: Mesh) -> Optional[int]:
    """Memory one device of the mesh can still take: the allocator's limit on an accelerator; on a
    CPU the host's available memory shared by its devices; None where neither is known. With
    several processes, the least of every process's answer: each process can ask only its own
    devices, and all must take the same decision (one that refused alone would leave the others
    waiting in the ranking's collectives)."""
    free = _local_bytes_free(next(d for d in mesh.devices.flat if d.process_index == jax.process_index()))
    if jax.process_count() == 1:
        return free
    from jax.experimental import multihost_utils

    every = np.asarray(multihost_utils.process_allgather(np.int64(-1 if free is None else free)))
    return None if np.any(every < 0) else int(every.min())


def _local_bytes_free(device) -> Optional[int]:
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if stats and "bytes_limit" in stats:
        return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024 // max(1, len(jax.local_devices()))
    except OSError:
        return None
    return None


def check_fits(layout: "GalleryLayout", dims: int, experts: int, mesh: Mesh, *, gallery_placed: bool) -> None:
    """Refuses, before any work, a problem whose streamed form does not fit one device: its share
    of the gallery, every query, and the blocks in flight."""
    row_bytes = 4 * (dims + experts)
    parts = {
        "its share of the gallery": 0 if gallery_placed else layout.videos_per_device * row_bytes,
        "the queries": layout.padded_queries * (row_bytes + 6 * 4),
        "the blocks in flight": _BLOCK_TEMPORARIES * 4 * layout.block**2,
    }
    needed, free = sum(parts.values()), device_bytes_free(mesh)
    if free is not None and needed > free:
        shown = ", ".join(f"{name} {size / 2**30:.2f} GiB" for name, size in parts.items() if size)
        raise UserInputError(
            f"ranking {layout.num_queries:,} queries against {layout.num_videos:,} videos needs about "
            f"{needed / 2**30:.2f} GiB on each of the {layout.num_devices} devices ({shown}), and a device has "
            f"{free / 2**30:.2f} GiB free: use more devices (the gallery is split over them), rank the queries "
            "in several calls, or pass a smaller block"
        )


def gallery_sharding(mesh: Mesh) -> NamedSharding:
    """Rows of the gallery split over every device of the mesh."""
    return NamedSharding(mesh, PartitionSpec(parallel.DATA_AXIS))


def _padded_rows(array: jax.Array, rows: int) -> jax.Array:
    return jnp.pad(array, [(0, rows - array.shape[0])] + [(0, 0)] * (array.ndim - 1))


def _host_rows_on_mesh(array: np.ndarray, rows: int, sharding: NamedSharding) -> jax.Array:
    """A host array zero-padded to `rows`, placed piece by piece: each process builds only the
    pieces of its own devices (no padded copy of the whole array on the host)."""
    array = np.asarray(array, np.float32)

    def piece(index):
        wanted = index[0]
        start, stop, _ = wanted.indices(rows)
        part = array[start:min(stop, array.shape[0])]
        return np.pad(part, [(0, (stop - start) - part.shape[0])] + [(0, 0)] * (array.ndim - 1))

    with jax.transfer_guard_host_to_device("allow"):
        return jax.make_array_from_callback((rows,) + array.shape[1:], sharding, piece)


@functools.lru_cache(maxsize=64)
def _pad_function(rows: int, sharding: NamedSharding):
    """One compiled padding per (rows, sharding): an evaluator pads the same shapes every epoch."""
    return jax.jit(lambda tree: jax.tree.map(lambda leaf: _padded_rows(leaf, rows), tree), out_shardings=sharding)


def _placed(tree, rows: int, sharding: NamedSharding):
    """Every leaf padded to `rows` and laid out with `sharding` (as is, where it already is)."""
    if all(isinstance(leaf, jax.Array) for leaf in tree):
        if all(leaf.shape[0] == rows and leaf.sharding.is_equivalent_to(sharding, leaf.ndim) for leaf in tree):
            return tree
        return _pad_function(rows, sharding)(tree)
    return type(tree)(*(_host_rows_on_mesh(jax.device_get(leaf), rows, sharding) for leaf in tree))


def place_gallery(gallery: PackedGallery, layout: GalleryLayout, mesh: Mesh) -> PackedGallery:
    """The gallery padded to `layout` and sharded by rows over the mesh (as is, if it already is)."""
    rows = gallery.vectors.shape[0]
    if rows not in (layout.num_videos, layout.padded_videos):
        raise UserInputError(
            f"the gallery has {rows} rows; expected {layout.num_videos} videos (or {layout.padded_videos} "
            "rows padded to whole blocks)"
        )
    placed = rows == layout.padded_videos and all(
        isinstance(leaf, jax.Array) and leaf.sharding.is_equivalent_to(gallery_sharding(mesh), leaf.ndim) for leaf in gallery
    )
    check_fits(layout, gallery.vectors.shape[1], gallery.availability.shape[1], mesh, gallery_placed=placed)
    return _placed(gallery, layout.padded_videos, gallery_sharding(mesh))


def place_queries(queries: PackedQueries, layout: GalleryLayout, mesh: Mesh) -> PackedQueries:
    """The queries padded to whole blocks, on every device (each device ranks every query against
    its share of the gallery)."""
    if queries.vectors.shape[0] != layout.num_queries:
        raise UserInputError(f"expected {layout.num_queries} queries, got {queries.vectors.shape[0]}")
    return _placed(queries, layout.padded_queries, parallel.replicated(mesh))


def check_dimensions(queries: PackedQueries, gallery: PackedGallery) -> None:
    """Queries and gallery must pack the same experts the same way."""
    if queries.vectors.shape[1] != gallery.vectors.shape[1] or queries.moe_weights.shape[1] != gallery.availability.shape[1]:
        raise UserInputError(
            f"queries pack {queries.vectors.shape[1]} dimensions over {queries.moe_weights.shape[1]} experts, the "
            f"gallery {gallery.vectors.shape[1]} over {gallery.availability.shape[1]}: pack both with the same experts"
        )
