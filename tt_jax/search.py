"""Top-k search and retrieval analysis for notebooks.

`top_k` finds each query's k best videos the way `tt_jax.streamed_ranks` ranks: every device
scans its share of the gallery one [B, B] block at a time, keeps a running top k per query, and
the devices' lists are merged at the end. Ties keep the lowest video index (`jax.lax.top_k`
keeps the lower index first, and blocks and devices are visited in video order), so the result
is the same on any number of devices. `approximate=True` uses `jax.lax.approx_max_k` inside each
block (fast on TPU; exact on CPU and GPU, where it falls back to a full sort).

`search` embeds queries with a trained model (sentences through a `tt_jax.sentences` encoder,
captions of a split by index, or token features) and returns the top videos of a store;
`retrieval_overlap` counts the queries two models get right (TeachText's Fig 3 and 13).

    from tt_jax.search import search
    from tt_jax.sentences import Word2VecEncoder
    found = search(["a man is cooking"], store=store, workdir="runs/msrvtt/student_teachtext/seed_0",
                   encoder=Word2VecEncoder.from_file("GoogleNews-vectors-negative300.bin"), k=5)
    found.video_ids, found.scores, found.encoded[0].not_found
    search(store=store, workdir=..., captions=[(0, 0), (3, 1)])  # captions of the split
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec

from tt_jax import parallel
from tt_jax.data.feature_store import FeatureStore
from tt_jax.errors import UserInputError
from tt_jax.evaluate import Evaluator
from tt_jax.packed_embeddings import (
    GalleryLayout,
    PackedGallery,
    PackedQueries,
    block_similarity,
    check_dimensions,
    pack_split,
    place_gallery,
    place_queries,
)
from tt_jax.sentences import EncodedSentence, SentenceEncoder, token_features
from tt_jax.trained import load_trained


class SearchError(UserInputError):
    """A search that cannot run as asked; the message says what to change."""


def check_k(k: Any, num_videos: int) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise SearchError(f"top-k needs k >= 1 videos per query; got k = {k!r}")
    if k > num_videos:
        raise SearchError(f"top-k asks for k = {k} videos but the gallery holds {num_videos}; choose k <= {num_videos}")
    return int(k)


def _local_top_k(queries, gallery, *, layout, k, keep_missing_modalities, approximate):
    block, local_videos = layout.block, layout.videos_per_device
    query_blocks, video_blocks = layout.padded_queries // block, local_videos // block
    first_video = jax.lax.axis_index(parallel.DATA_AXIS) * local_videos

    def visit(index, carry):
        best_scores, best_videos = carry
        query_start, video_start = (index // video_blocks) * block, (index % video_blocks) * block
        part = jax.tree.map(lambda leaf: jax.lax.dynamic_slice_in_dim(leaf, query_start, block), queries)
        videos = jax.tree.map(lambda leaf: jax.lax.dynamic_slice_in_dim(leaf, video_start, block), gallery)
        video_ids = first_video + video_start + jnp.arange(block)
        sims = jnp.where((video_ids < layout.num_videos)[None, :],
                         block_similarity(part, videos, keep_missing_modalities=keep_missing_modalities), -jnp.inf)
        if approximate and k < block:
            sims, positions = jax.lax.approx_max_k(sims, k)
            candidates = video_ids[positions]
        else:
            candidates = jnp.broadcast_to(video_ids, sims.shape)
        old_scores = jax.lax.dynamic_slice_in_dim(best_scores, query_start, block)
        old_videos = jax.lax.dynamic_slice_in_dim(best_videos, query_start, block)
        merged_scores = jnp.concatenate([old_scores, sims], axis=1)  # earlier (lower) videos first
        merged_videos = jnp.concatenate([old_videos, candidates], axis=1)
        top, position = jax.lax.top_k(merged_scores, k)
        top_videos = jnp.take_along_axis(merged_videos, position, axis=1)
        return (jax.lax.dynamic_update_slice_in_dim(best_scores, top, query_start, 0),
                jax.lax.dynamic_update_slice_in_dim(best_videos, top_videos, query_start, 0))

    start = (jnp.full((layout.padded_queries, k), -jnp.inf, jnp.float32),
             jnp.full((layout.padded_queries, k), -1, jnp.int32))
    scores, videos = jax.lax.fori_loop(0, query_blocks * video_blocks, visit, parallel.varying_over_devices(start))
    all_scores = jax.lax.all_gather(scores, parallel.DATA_AXIS, axis=1, tiled=True)  # [Qp, N*k], device order
    all_videos = jax.lax.all_gather(videos, parallel.DATA_AXIS, axis=1, tiled=True)
    top, position = jax.lax.top_k(all_scores, k)
    # Every device now holds the same lists; the first device's, as a replicated value.
    first = jax.lax.axis_index(parallel.DATA_AXIS) == 0
    return parallel.from_holder(top, first), parallel.from_holder(jnp.take_along_axis(all_videos, position, axis=1), first)


@functools.lru_cache(maxsize=16)
def _compiled_top_k(mesh: Mesh, layout: GalleryLayout, k: int, keep_missing_modalities: bool, approximate: bool):
    replicated, sharded = PartitionSpec(), PartitionSpec(parallel.DATA_AXIS)
    body = functools.partial(_local_top_k, layout=layout, k=k, keep_missing_modalities=keep_missing_modalities,
                             approximate=approximate)
    return jax.jit(jax.shard_map(
        body, mesh=mesh, in_specs=(PackedQueries(replicated, replicated), PackedGallery(sharded, sharded)),
        out_specs=(replicated, replicated),
    ))


def top_k(
    queries: PackedQueries,
    gallery: PackedGallery,
    k: int,
    *,
    num_videos: Optional[int] = None,
    mesh: Optional[Mesh] = None,
    block: Optional[int] = None,
    keep_missing_modalities: bool = False,
    approximate: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """(scores [Q, k] float32, videos [Q, k] int32) of each query's k best videos, best first."""
    mesh = mesh if mesh is not None else parallel.make_mesh()
    check_dimensions(queries, gallery)
    num_videos = gallery.vectors.shape[0] if num_videos is None else num_videos
    k = check_k(k, num_videos)
    layout = GalleryLayout.for_mesh(queries.vectors.shape[0], num_videos, mesh, block)
    scores, videos = _compiled_top_k(mesh, layout, k, keep_missing_modalities, approximate)(
        place_queries(queries, layout, mesh), place_gallery(gallery, layout, mesh)
    )
    scores, videos = jax.device_get((scores, videos))
    return np.asarray(scores[: layout.num_queries]), np.asarray(videos[: layout.num_queries])


@dataclasses.dataclass(frozen=True)
class SearchResult:
    """videos, scores: [Q, k] gallery indices and similarities, best first; video_ids: their
    names; query_captions: the query sentences (given, or from raw captions; else None);
    encoded: for sentence queries, the words each was read as and the words not found."""

    videos: np.ndarray
    scores: np.ndarray
    video_ids: list
    query_captions: Optional[list] = None
    encoded: Optional[list[EncodedSentence]] = None


def _caption_rows(captions: Sequence[tuple[int, int]], store: FeatureStore) -> np.ndarray:
    rows = np.asarray(captions, np.int64).reshape(-1, 2) if len(captions) else np.zeros((0, 2), np.int64)
    if not len(rows):
        raise SearchError("search needs at least one query caption, given as (video index, caption index)")
    for video, caption in rows:
        if not (0 <= video < store.num_videos and 0 <= caption < store.max_captions) or store.caption_mask[video, caption] == 0:
            raise SearchError(
                f"caption ({video}, {caption}) is not a caption of this split: it has {store.num_videos} videos, "
                f"up to {store.max_captions} captions each (caption_mask says which exist)"
            )
    return rows


def search(
    sentences: Optional[Sequence[str]] = None,
    *,
    store: FeatureStore,
    encoder: Optional[SentenceEncoder] = None,
    workdir: Optional[str] = None,
    model: Any = None,
    variables: Any = None,
    text_name: Optional[str] = None,
    captions: Optional[Sequence[tuple[int, int]]] = None,
    text_features: Optional[np.ndarray] = None,
    k: int = 10,
    raw_captions: Optional[Mapping[str, Sequence[str]]] = None,
    checkpoint: str = "best",
    approximate: bool = False,
) -> SearchResult:
    """The top-k videos of `store` for each query, from a run's `workdir` or `model` + `variables`.

    sentences: queries as text, turned into token features by `encoder` (a
      `tt_jax.sentences.SentenceEncoder` of the model's text embedding, e.g. `Word2VecEncoder`
      for a model trained on "w2v").
    captions: queries as (video index, caption index) pairs of `store`.
    text_features: queries as token features [Q, tokens, text_dim] of the model's text embedding
      (zero rows past a query's last token), e.g. from `tt_jax.data` or your own encoder.
    raw_captions: {video id: [sentence, ...]} (`tt_jax.data.release.read_raw_captions`), to name
      the query captions in the result.
    """
    if sum(query is not None for query in (sentences, captions, text_features)) != 1:
        raise SearchError(
            "search needs queries, one kind of them: sentences ['a man is cooking', ...] with encoder=..., "
            "captions=[(video, caption), ...] or text_features=[Q, tokens, dim]"
        )
    if sentences is not None and encoder is None:
        raise SearchError(
            "sentence queries need encoder=... to turn them into the model's token features, e.g. "
            "tt_jax.sentences.Word2VecEncoder.from_file('GoogleNews-vectors-negative300.bin') for a w2v model"
        )
    if (workdir is None) == (model is None):
        raise SearchError("search needs either workdir=... or model=... and variables=..., not both")
    mesh = parallel.make_mesh()
    if workdir is not None:
        trained = load_trained(workdir, checkpoint=checkpoint, sharding=parallel.replicated(mesh))
        model, variables, text_name = trained.model, trained.variables, text_name or trained.text_name
    if variables is None or text_name is None:
        raise SearchError("search(model=...) also needs variables=... and text_name=...")
    variables = jax.device_put(variables, parallel.replicated(mesh))
    config = model.config
    encoded = None
    if sentences is not None:
        if encoder.dim != config.text_dim:
            raise SearchError(
                f"the encoder gives {encoder.dim}-d token features but the model reads {config.text_dim}-d "
                f"{text_name!r} features; use the encoder of the text embedding the model was trained on"
            )
        text_features, encoded = token_features(sentences, encoder, config.text_max_tokens)
    evaluator = Evaluator(model, store, text_name, mesh=mesh)
    split_queries, gallery = evaluator.packed(variables)
    query_captions = list(sentences) if sentences is not None else None
    if captions is not None:
        rows = _caption_rows(captions, store)
        flat = jax.device_put(rows[:, 0] * store.max_captions + rows[:, 1], parallel.replicated(mesh))
        queries = jax.tree.map(lambda leaf: leaf[flat], split_queries)
        if raw_captions is not None:
            query_captions = [list(raw_captions[store.video_ids[v]])[c] for v, c in rows]
    else:
        features = np.asarray(text_features, np.float32)
        if features.ndim != 3 or features.shape[2] != config.text_dim or features.shape[1] > config.text_max_tokens:
            raise SearchError(
                f"text_features must be [queries, tokens <= {config.text_max_tokens}, {config.text_dim}] token features "
                f"of the model's text embedding; got shape {features.shape}"
            )
        features = np.pad(features, [(0, 0), (0, config.text_max_tokens - features.shape[1]), (0, 0)])
        # One video (the split's first, ignored) with every query as one of its captions.
        experts, availability, _, _ = store.eval_inputs(text_name, config.text_max_tokens, videos=np.array([0]))
        names = config.expert_names
        embeddings = jax.jit(functools.partial(model.apply, train=False))(
            variables, {n: experts[n] for n in names}, {n: availability[n] for n in names}, features[None]
        )
        queries, _ = pack_split(embeddings, names, keep_missing_modalities=config.keep_missing_modalities)
    scores, videos = top_k(queries, gallery, k, mesh=mesh, keep_missing_modalities=config.keep_missing_modalities,
                           approximate=approximate)
    return SearchResult(videos, scores, [[store.video_ids[v] for v in row] for row in videos], query_captions, encoded)


def retrieval_overlap(ranks_a, ranks_b, k: int = 1) -> dict[str, float]:
    """Shares (percent) of queries that model A and model B retrieve within the top k (R@k hits:
    rank < k, so a tie at the top is a miss at k = 1): {"both", "only_a", "only_b", "neither"}.
    ranks_a, ranks_b: 0-based per-query ranks of the same queries (e.g. `evaluate(...,
    return_ranks=True)["ranks"].text_to_video`)."""
    a, b = np.asarray(ranks_a, np.float64), np.asarray(ranks_b, np.float64)
    if a.shape != b.shape or a.ndim != 1 or not len(a):
        raise SearchError(f"the two models' ranks must be of the same queries; got shapes {a.shape} and {b.shape}")
    k = check_k(k, np.inf)
    # As `metrics.metrics_from_ranks` counts: R@1 needs rank 0, R@k (k > 1) a rank below k.
    hit_a, hit_b = (a == 0, b == 0) if k == 1 else (a < k, b < k)
    shares = {"both": hit_a & hit_b, "only_a": hit_a & ~hit_b, "only_b": ~hit_a & hit_b, "neither": ~hit_a & ~hit_b}
    return {name: 100 * float(np.mean(hits)) for name, hits in shares.items()}
