"""Caption denoising from teacher ranks (TeachText paper, section 5.3; spec section 2.5).

Every training caption is ranked against every training video by the frozen teachers. A caption
whose own video the teachers rank worse than R is taken for noise and never sampled again:

    r_c = 1 + #{v != v_c : S(c, v) > S(c, v_c)}          (optimistic ties, the default)
    r_c = 1 + #{v != v_c : S > S(c, v_c)} + #{v != v_c : S = S(c, v_c)} / 2   ("average")

with S the teachers' aggregate Phi (elementwise mean, min or max of their similarity matrices,
rule "aggregate"), or each teacher's own S: rule "any" drops a caption that any teacher ranks
worse than R, rule "all" one that every teacher does. Videos left with no caption leave training.

The [captions, videos] matrix is never whole: each chunk of videos' captions is scored against
every video and reduced to ranks on device, so memory is O(chunk * K * V) per teacher (MSRVTT:
130k captions x 6.5k videos). A live teacher's similarity is its eval-mode retrieval similarity;
a precomputed one's the plain sum over experts of its stored embeddings, as in training.

The recipe's `denoising` stage (tt_jax.pipeline) writes the masks in the release format
(tt_jax.data.caption_masks) with a summary, and the students read them (`data.caption_masks`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Iterator, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from tt_jax import parallel
from tt_jax.data.feature_store import FeatureStore
from tt_jax.denoising_settings import DenoisingError, DenoisingSettings, kept_captions
from tt_jax.distillation.view import aggregate
from tt_jax.evaluate import Evaluator
from tt_jax.models.similarity import weighted_similarity
from tt_jax.teachers import LiveTeacher, Teacher

@functools.partial(jax.jit, static_argnames=("aggregation", "ties"))
def caption_ranks(similarities: jax.Array, targets: jax.Array, *, aggregation: str = "mean", ties: str = "optimistic") -> jax.Array:
    """[T + 1, Q] ranks of each query's own video: row 0 under Phi of the T teachers, row 1 + t
    under teacher t. similarities: [T, Q, V]; targets: [Q] the column of each query's video."""
    stacked = jnp.concatenate([aggregate(similarities, aggregation)[None], similarities])  # [T + 1, Q, V]
    own = jnp.take_along_axis(stacked, targets[None, :, None], axis=2)  # [T + 1, Q, 1]
    better = jnp.sum(stacked > own, axis=2, dtype=jnp.int32)
    if ties == "optimistic":
        return (1 + better).astype(jnp.float32)
    level = jnp.sum(stacked == own, axis=2, dtype=jnp.int32) - 1  # the own video always equals itself
    return 1 + better.astype(jnp.float32) + 0.5 * level.astype(jnp.float32)


# -- the teachers' similarity, chunk by chunk ------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("expert_names", "keep_missing_modalities"))
def _live_rows(chunk_embeddings, video, availability, *, expert_names, keep_missing_modalities):
    """[c * K, V] eval-mode similarity of a chunk's captions against every video."""
    batch, captions, experts = chunk_embeddings.moe_weights.shape
    return weighted_similarity(
        {name: text.reshape(batch * captions, -1) for name, text in chunk_embeddings.text.items()},
        video,
        chunk_embeddings.moe_weights.reshape(batch * captions, experts),
        availability,
        expert_names,
        keep_missing_modalities=keep_missing_modalities,
    )


def _live_chunks(
    teacher: LiveTeacher, variables: Any, store: FeatureStore, mesh: Mesh, chunk_videos: int
) -> Iterator[tuple[int, jax.Array]]:
    """(first video, [c * K, V] similarity rows) of each chunk of videos' captions for a live
    teacher: one pass embeds every video (only the video side is kept), a second the chunks'
    captions. The last chunk is padded (its rows past the split are not captions)."""
    evaluator = Evaluator(teacher.model, store, teacher.text_name, mesh=mesh, chunk_videos=chunk_videos)
    video_parts, availability_parts = [], []
    for _, embeddings in evaluator.embedding_chunks(variables):
        video_parts.append(embeddings.video)
        availability_parts.append(embeddings.availability)
    count = store.num_videos
    video = {name: jnp.concatenate([part[name] for part in video_parts])[:count] for name in video_parts[0]}
    availability = jnp.concatenate(availability_parts)[:count]
    del video_parts, availability_parts
    config = teacher.model.config
    if evaluator.chunk_videos != chunk_videos:
        raise ValueError(f"the evaluator chunks {evaluator.chunk_videos} videos, the ranks {chunk_videos}")
    for start, embeddings in evaluator.embedding_chunks(variables):
        yield start, _live_rows(
            embeddings, video, availability,
            expert_names=config.expert_names, keep_missing_modalities=config.keep_missing_modalities,
        )


@jax.jit
def _stored_rows(text: dict, video: dict) -> jax.Array:
    """[c * K, V]: the plain sum over experts of stored caption x video embeddings."""
    total = None
    for name in sorted(text):
        term = jnp.dot(text[name].reshape(-1, text[name].shape[-1]), video[name].T)
        total = term if total is None else total + term
    return total


def _stored_chunks(key: str, store: FeatureStore, mesh: Mesh, chunk_videos: int) -> Iterator[tuple[int, jax.Array]]:
    """(first video, [c * K, V] rows) of each chunk for a precomputed teacher, padded as the live ones."""
    stored = (store.teacher_embeddings or {}).get(key)
    if stored is None:
        raise DenoisingError(f"the training split holds no embeddings of the precomputed teacher {key!r}")
    video = jax.device_put({name: np.asarray(array, np.float32) for name, array in stored["video"].items()},
                           parallel.replicated(mesh))
    for start in range(0, store.num_videos, chunk_videos):
        rows = np.arange(start, start + chunk_videos) % store.num_videos  # the padding rows are discarded
        text = {name: np.asarray(array[rows], np.float32) for name, array in stored["text"].items()}
        yield start, _stored_rows(jax.device_put(text, parallel.replicated(mesh)), video)


def teacher_ranks(
    teachers: Sequence[Teacher],
    variables: Any,
    store: FeatureStore,
    *,
    aggregation: str = "mean",
    ties: str = "optimistic",
    mesh: Optional[Mesh] = None,
    chunk_videos: int = 256,
) -> np.ndarray:
    """[T + 1, V, K] float32 ranks of every caption's own video among the store's V videos (row 0
    under Phi, then each teacher's); NaN on empty caption slots. `variables`: {name: variables}
    of the live teachers."""
    if not teachers:
        raise DenoisingError("denoising ranks the captions with the teachers, and the run has none (config.teachers)")
    mesh = mesh if mesh is not None else parallel.make_mesh()
    chunk = -(-min(chunk_videos, store.num_videos) // mesh.size) * mesh.size
    sources = [
        _live_chunks(teacher, variables[teacher.name], store, mesh, chunk)
        if isinstance(teacher, LiveTeacher)
        else _stored_chunks(teacher.key, store, mesh, chunk)
        for teacher in teachers
    ]
    captions = store.max_captions
    # Replicated ranks: every process reads them whole (the similarity rows may be split over devices).
    ranks_of = jax.jit(functools.partial(caption_ranks, aggregation=aggregation, ties=ties),
                       out_shardings=parallel.replicated(mesh))
    ranks = np.full((len(teachers) + 1, store.num_videos, captions), np.nan, np.float32)
    for start, chunks in zip(range(0, store.num_videos, chunk), zip(*sources, strict=True), strict=True):
        if any(first != start for first, _ in chunks):
            raise ValueError(f"the teachers' chunks start at {[first for first, _ in chunks]}, expected {start}")
        videos = np.arange(start, start + chunk) % store.num_videos
        targets = jax.device_put(np.repeat(videos, captions).astype(np.int32), parallel.replicated(mesh))
        chunk_ranks = np.asarray(jax.device_get(ranks_of(jnp.stack([rows for _, rows in chunks]), targets)))
        real = min(chunk, store.num_videos - start)
        ranks[:, start : start + real] = chunk_ranks.reshape(len(teachers) + 1, chunk, captions)[:, :real]
    ranks[:, store.caption_mask == 0] = np.nan
    return ranks


@dataclasses.dataclass(frozen=True)
class DenoisingResult:
    """keep: [V, K] the captions kept; ranks: [T + 1, V, K] (NaN on empty slots); summary: counts."""

    keep: np.ndarray
    ranks: np.ndarray
    summary: dict


def denoise(
    teachers: Sequence[Teacher],
    variables: Any,
    store: FeatureStore,
    settings: DenoisingSettings,
    *,
    mesh: Optional[Mesh] = None,
    chunk_videos: int = 256,
) -> DenoisingResult:
    """The masks of `settings` on the training `store`; raises DenoisingError when they would
    remove every caption."""
    ranks = teacher_ranks(
        teachers, variables, store, aggregation=settings.aggregation, ties=settings.ties, mesh=mesh,
        chunk_videos=chunk_videos,
    )
    real = store.caption_mask > 0
    keep = kept_captions(np.nan_to_num(ranks, nan=np.inf), settings.max_rank, settings.rule) & real
    captions, kept = int(real.sum()), int(keep.sum())
    videos_left = int(keep.any(axis=1).sum())
    if kept == 0:
        raise DenoisingError(
            f"denoising with max_rank {settings.max_rank} and rule {settings.rule!r} removes every one of the "
            f"{captions} training captions (the teachers rank no caption's video within the top {settings.max_rank}); "
            "raise denoising.max_rank, or use the rule 'all' or 'aggregate'"
        )
    per_teacher = {
        teacher.name: float(1 - np.mean(ranks[1 + index][real] <= settings.max_rank)) for index, teacher in enumerate(teachers)
    }
    summary = {
        "settings": settings.to_dict(),
        "training_videos": store.num_videos,
        "captions": captions,
        "captions_kept": kept,
        "fraction_dropped": 1 - kept / captions,
        "videos_dropped": store.num_videos - videos_left,
        "fraction_dropped_per_teacher": per_teacher,
        "median_rank": float(np.median(ranks[0][real])),
    }
    return DenoisingResult(keep=keep, ranks=ranks, summary=summary)
