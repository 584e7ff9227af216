"""Ranking a large gallery from embeddings: time and peak memory of `tt_jax.streamed_ranks`.

    python benchmarks/streamed_ranks_benchmark.py                       # the three rows below
    python benchmarks/streamed_ranks_benchmark.py --rows=small          # one row, a smoke test

Rows (queries x videos): 20k x 1M and 100k x 100k, ranked only by the streamed path (today's dense
path would need an 80 GB and a 40 GB similarity matrix), and 20k x 20k by both: the streamed path
and the dense one (the whole matrix built on device, then `tt_jax.metrics.retrieval_ranks`).
Embeddings are synthetic, as the evaluation packs them: 7 experts x 256 dimensions, softmax mixture
weights per query, and each video missing each expert but the first with probability 0.2. The
gallery is built on the device in slices, already padded and sharded to its layout, so the only
copy of it is the one that is ranked.

Columns: seconds; entries (queries x videos) ranked per second; the time per 10^9 entries; the
floor, i.e. the time per 10^9 entries of the block products alone ([B, D] x [D, B] matmuls at this
machine's measured rate, 2 D flops per entry); and the peak resident memory above what was resident
before ranking (the embeddings themselves), sampled every 10 ms from /proc/self/status. Rows under
10^9 entries are compiled (run once) before they are timed; for the larger rows compiling is a few
seconds of the total. Rows run in one process one after another; on a CPU compare the ratios,
absolute times are for an accelerator.
"""

from __future__ import annotations

import pathlib
import sys
import threading
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from tt_jax import metrics, parallel  # noqa: E402
from tt_jax.packed_embeddings import (  # noqa: E402
    GalleryLayout,
    PackedGallery,
    PackedQueries,
    block_similarity,
    gallery_sharding,
)
from tt_jax.streamed_ranks import streamed_ranks  # noqa: E402

EXPERTS, DIMS, MISSING = 7, 256, 0.2
ROWS = {
    "20k x 1M": (20_000, 1_000_000, False),
    "100k x 100k": (100_000, 100_000, False),
    "20k x 20k": (20_000, 20_000, True),  # queries = videos: the dense path's layout
    "small": (4_096, 4_096, True),
}
_ROWS = flags.DEFINE_list("rows", ["20k x 1M", "100k x 100k", "20k x 20k"], f"Rows to run, of {list(ROWS)}.")
_SLICE = 16_384  # gallery rows generated per call


def _unit_experts(key, rows: int) -> jax.Array:
    """[rows, EXPERTS * DIMS]: one unit vector per expert, side by side."""
    x = jax.random.normal(key, (rows, EXPERTS, DIMS), jnp.float32)
    return (x / jnp.linalg.norm(x, axis=-1, keepdims=True)).reshape(rows, EXPERTS * DIMS)


def _availability(key, rows: int) -> jax.Array:
    present = jax.random.uniform(key, (rows, EXPERTS)) > MISSING
    return present.at[:, 0].set(True).astype(jnp.float32)


def synthetic_gallery(num_videos: int, layout: GalleryLayout, mesh) -> PackedGallery:
    """The padded, sharded gallery, written slice by slice into one donated buffer."""
    sharding = gallery_sharding(mesh)
    empty = jax.jit(
        lambda: PackedGallery(jnp.zeros((layout.padded_videos, EXPERTS * DIMS), jnp.float32),
                              jnp.zeros((layout.padded_videos, EXPERTS), jnp.float32)),
        out_shardings=PackedGallery(sharding, sharding),
    )

    rows_per_call = min(_SLICE, layout.padded_videos)

    def write(gallery, start):
        key = jax.random.fold_in(jax.random.key(1), start)
        availability = _availability(jax.random.fold_in(key, 1), rows_per_call)
        vectors = _unit_experts(key, rows_per_call) * jnp.repeat(availability, DIMS, axis=1)
        rows = jnp.arange(rows_per_call) + start < num_videos
        vectors, availability = vectors * rows[:, None], availability * rows[:, None]
        return PackedGallery(
            jax.lax.dynamic_update_slice_in_dim(gallery.vectors, vectors, start, 0),
            jax.lax.dynamic_update_slice_in_dim(gallery.availability, availability, start, 0),
        )

    write = jax.jit(write, donate_argnums=0, out_shardings=PackedGallery(sharding, sharding))
    gallery = empty()
    for start in range(0, layout.padded_videos, rows_per_call):
        gallery = write(gallery, min(start, layout.padded_videos - rows_per_call))
    return jax.block_until_ready(gallery)


def synthetic_queries(num_queries: int) -> PackedQueries:
    key = jax.random.key(2)
    weights = jax.nn.softmax(jax.random.normal(jax.random.fold_in(key, 1), (num_queries, EXPERTS)), axis=1)
    vectors = _unit_experts(key, num_queries) * jnp.repeat(weights, DIMS, axis=1)
    return jax.block_until_ready(PackedQueries(vectors, weights))


def resident_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


class PeakMemory:
    """The highest resident memory while the block runs, sampled every 10 ms."""

    def __enter__(self):
        self.before = self.peak = resident_bytes()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._done.wait(0.01):
            self.peak = max(self.peak, resident_bytes())

    def __exit__(self, *exc):
        self._done.set()
        self._thread.join()
        self.peak = max(self.peak, resident_bytes())

    @property
    def above_start(self) -> int:
        return self.peak - self.before


def matmul_seconds_per_entry(block: int) -> float:
    """Seconds per similarity entry of [B, D] x [D, B] products alone, on this machine."""
    a = jax.random.normal(jax.random.key(3), (block, EXPERTS * DIMS), jnp.float32)
    b = jax.random.normal(jax.random.key(4), (block, EXPERTS * DIMS), jnp.float32)
    product = jax.jit(lambda a, b: jnp.dot(a, b.T)[0, 0])
    product(a, b).block_until_ready()
    repeats = 20
    start = time.perf_counter()
    for _ in range(repeats):
        product(a, b).block_until_ready()
    return (time.perf_counter() - start) / (repeats * block * block)


def main(argv):
    del argv
    mesh = parallel.make_mesh()
    print(f"backend {jax.default_backend()}, {mesh.size} device(s); {EXPERTS} experts x {DIMS} dims")
    header = "| rows | path | seconds | entries/s | s per 1e9 entries | floor s per 1e9 | x floor | peak above start (GiB) |"
    lines = [header, "|" + "---|" * 8]
    floors = {}
    for name in _ROWS.value:
        num_queries, num_videos, dense_too = ROWS[name]
        layout = GalleryLayout.for_mesh(num_queries, num_videos, mesh)
        if layout.block not in floors:
            floors[layout.block] = matmul_seconds_per_entry(layout.block)
        floor = floors[layout.block] * 1e9
        gallery = synthetic_gallery(num_videos, layout, mesh)
        queries = synthetic_queries(num_queries)
        targets = np.random.default_rng(0).integers(0, num_videos, num_queries)
        entries = num_queries * num_videos
        if entries < 10**9:  # compile first where compiling is not negligible next to ranking
            streamed_ranks(queries, gallery, targets, num_videos=num_videos, mesh=mesh)
        with PeakMemory() as memory:
            start = time.perf_counter()
            ranked = streamed_ranks(queries, gallery, targets, num_videos=num_videos, mesh=mesh)
            seconds = time.perf_counter() - start
        per_billion = seconds / entries * 1e9
        lines.append(f"| {name} | streamed | {seconds:.1f} | {entries / seconds:.3g} | {per_billion:.1f} | {floor:.1f} | "
                     f"{per_billion / floor:.2f} | {memory.above_start / 2**30:.2f} |")
        print(lines[-1], flush=True)
        if dense_too:
            with PeakMemory() as memory:
                start = time.perf_counter()
                real = PackedGallery(gallery.vectors[:num_videos], gallery.availability[:num_videos])
                sims = jax.jit(lambda q, g: block_similarity(q, g, keep_missing_modalities=False))(queries, real)
                # The dense path ranks the [V*K, V] layout (K = 1 here: query i is video i's).
                t2v, _ = metrics.retrieval_ranks(sims, None)
                jax.block_until_ready(t2v)
                dense_seconds = time.perf_counter() - start
            per_billion = dense_seconds / entries * 1e9
            lines.append(f"| {name} | dense matrix | {dense_seconds:.1f} | {entries / dense_seconds:.3g} | "
                         f"{per_billion:.1f} | {floor:.1f} | {per_billion / floor:.2f} | {memory.above_start / 2**30:.2f} |")
            print(lines[-1], flush=True)
            del sims, t2v, real
        assert len(ranked.ranks.text_to_video) == num_queries
        del gallery, queries
    print("\n".join(lines))


if __name__ == "__main__":
    app.run(main)
