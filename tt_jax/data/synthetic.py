"""Synthetic retrieval datasets with real structure, for demos and tests without downloads.

A small generative "world" stands in for videos, captions and feature extractors:

* Every video has a latent concept `c` [L] of unit variance: a topic centre plus its own variation
  (videos of one topic are similar, as MSRVTT's categories make them).
* Every video expert observes `c` through its own fixed random projection plus noise; "vlad"
  experts as a short noisy token sequence of random length; flaky experts are missing for a
  fraction of videos (zero rows, availability 0).
* Every caption has a latent `z = c + caption_noise * noise`: captions are noisy views of their video.
  With `wrong_caption_rate` > 0, that share of the training captions describe another video
  instead (label noise, what TeachText's denoising removes); validation and test stay clean.
* A text embedding of quality q in (0, 1] turns a caption into tokens: a fixed random projection of
  `z` to its D_t token dims, scaled by sqrt(q); plus a nuisance vector of the caption (its wording
  as that embedding encodes it), N(0, (1 - q) I) and the same for every token of the caption; plus
  independent noise per token (std `token_noise`, or the embedding's own "token_noise"). Token
  counts vary per caption and per embedding (tokenisers differ). Every embedding sees all L concept
  directions: quality only sets how much nuisance hides them (with hide_directions=True a poorer
  embedding also loses directions: it sees only the first ceil(L (1 + q) / 2) of a basis shared by
  all embeddings).

The default embeddings (TEACHTEXT_TEXT_EMBEDDINGS) play TeachText's roles: a w2v-like one (q 0.3,
wide, noisy tokens) that the student reads, and gpt2-xl-like ones (q 0.7 and 1.0, cleaner tokens)
that the teachers read. Why this shape: the student's text holds the whole concept, so what it
lacks is not information but enough training pairs to learn to read the concept through the
nuisance. With few training videos (the demo trains on 150) the ranking loss soon separates every
training pair and stops teaching, while the teachers' similarity matrix, which the student's input
can in principle reproduce, keeps pulling every one of the B^2 entries towards concept similarity:
that is where distillation pays (README: the demo's table, reproduced by `python -m tt_jax.main`).
When a poorer embedding also loses concept directions (hide_directions=True), the student cannot
see part of what the teachers see and distillation gains little; the demo does not use that world.
"""

from __future__ import annotations

import dataclasses
import math
import zlib
from typing import Any, Mapping, Optional

import numpy as np

from tt_jax.data.feature_store import FeatureStore, TokenTable
from tt_jax.errors import UserInputError
from tt_jax.models.config import ModelConfig, as_model_config

SPLIT_NAMES = ("train", "val", "test")

# Three text embeddings in the roles of TeachText's: the poor w2v the student reads, gpt2-xl and the
# fine-tuned gpt2-xl the teachers read. Dims are small stand-ins for 300 / 1600 / 1600; w2v is the
# widest so that its nuisance has many directions to hide in (the student overfits it). The richer
# an embedding, the less nuisance and the less per-token noise it carries.
TEACHTEXT_TEXT_EMBEDDINGS = {
    "w2v": {"dim": 128, "quality": 0.3, "token_noise": 1.0},
    "gpt2-xl": {"dim": 64, "quality": 0.7, "token_noise": 0.3},
    "gpt2-xl-finetune": {"dim": 64, "quality": 1.0, "token_noise": 0.1},
}


class SyntheticDataError(UserInputError):
    """Synthetic data parameters that describe no dataset."""


@dataclasses.dataclass(frozen=True)
class _World:
    """The fixed parts of the generative model, shared by every split of a dataset."""

    experts: tuple  # ExpertConfig, sorted by name
    latent_dim: int  # L
    expert_projections: dict  # expert -> [L, D_e]
    topic_centres: Optional[np.ndarray]  # [num_topics, L]; None: concepts without topics
    text_projections: dict  # embedding -> [L, D_t], the concept directions it sees, scaled by sqrt(q)
    nuisance_scales: dict  # embedding -> sqrt(1 - q), the std of its per-caption nuisance


def _stable_key(key: Any) -> int:
    """An int for a SeedSequence entropy entry; strings hash stably across runs (unlike hash())."""
    return zlib.crc32(key.encode()) if isinstance(key, str) else int(key)


def _rng(*keys: Any) -> np.random.Generator:
    """An independent stream per named part, so that adding an expert or a text embedding changes
    no other array of the dataset."""
    return np.random.default_rng([_stable_key(key) for key in keys])


def _check_parameters(text_embeddings: Mapping, **values) -> None:
    if not text_embeddings:
        raise SyntheticDataError("text_embeddings must name at least one embedding")
    for name, spec in text_embeddings.items():
        if not {"dim", "quality"} <= set(spec) <= {"dim", "quality", "token_noise"}:
            raise SyntheticDataError(
                f"text embedding {name!r} needs keys 'dim' and 'quality' (and optionally 'token_noise'), "
                f"got {sorted(spec)}"
            )
        if float(spec.get("token_noise", 0.0)) < 0:
            raise SyntheticDataError(f"text embedding {name!r}: token_noise must be non-negative")
        if int(spec["dim"]) <= 0 or not 0 < float(spec["quality"]) <= 1:
            raise SyntheticDataError(
                f"text embedding {name!r}: dim must be positive and quality in (0, 1], "
                f"got {spec['dim']}, {spec['quality']}"
            )
    for name in ("captions_per_video", "latent_dim", "max_text_tokens", "min_text_tokens"):
        if values[name] <= 0:
            raise SyntheticDataError(f"{name} must be positive, got {values[name]}")
    if values["min_text_tokens"] > values["max_text_tokens"]:
        raise SyntheticDataError(
            f"min_text_tokens {values['min_text_tokens']} exceeds max_text_tokens {values['max_text_tokens']}"
        )
    for name in ("missing_rate", "missing_caption_rate", "wrong_caption_rate"):
        if not 0 <= values[name] < 1:
            raise SyntheticDataError(f"{name} must lie in [0, 1), got {values[name]}")
    for name in ("caption_noise", "expert_noise", "token_noise", "topic_spread"):
        if values[name] < 0:
            raise SyntheticDataError(f"{name} must be non-negative, got {values[name]}")


def _make_world(
    config: ModelConfig,
    text_embeddings: Mapping,
    *,
    world_seed: int,
    latent_dim: int,
    num_topics: int,
    hide_directions: bool = False,
) -> _World:
    basis, _ = np.linalg.qr(_rng(world_seed, "basis").normal(size=(latent_dim, latent_dim)))  # [L, L] orthonormal
    expert_projections = {
        expert.name: _rng(world_seed, "expert", expert.name).normal(size=(latent_dim, expert.input_dim))
        / math.sqrt(latent_dim)
        for expert in config.experts
    }
    text_projections, nuisance_scales = {}, {}
    for name, spec in sorted(text_embeddings.items()):
        quality, dim = float(spec["quality"]), int(spec["dim"])
        visible = math.ceil(latent_dim * (1 + quality) / 2) if hide_directions else latent_dim
        # The concept's coordinates along the `visible` leading basis directions, mapped to D_t token
        # dims with variance q times the caption latent's per dim (against 1 - q of nuisance).
        token_map = _rng(world_seed, "text", name).normal(size=(visible, dim)) / math.sqrt(visible)
        text_projections[name] = math.sqrt(quality) * basis[:, :visible] @ token_map
        nuisance_scales[name] = math.sqrt(1 - quality)
    return _World(
        experts=config.experts,
        latent_dim=latent_dim,
        expert_projections=expert_projections,
        topic_centres=_rng(world_seed, "topics").normal(size=(num_topics, latent_dim)) if num_topics > 0 else None,
        text_projections=text_projections,
        nuisance_scales=nuisance_scales,
    )


def _make_experts(
    world: _World, concepts: np.ndarray, split_key: tuple, *, expert_noise: float, missing_rate: float
) -> tuple[dict, dict]:
    """Expert features {e: [V, ...] float32} (zero where missing) and availability {e: [V] float32}."""
    num_videos = len(concepts)
    availability = {}
    for expert in world.experts:
        rng = _rng(*split_key, "availability", expert.name)
        present = rng.uniform(size=num_videos) >= missing_rate if expert.flaky else np.ones(num_videos, bool)
        availability[expert.name] = present
    flaky = [expert.name for expert in world.experts if expert.flaky]
    if len(flaky) == len(world.experts):  # every expert flaky: give each video at least one
        none_present = ~np.any([availability[name] for name in flaky], axis=0)
        rescue = _rng(*split_key, "rescue").integers(len(flaky), size=num_videos)
        for index, name in enumerate(flaky):
            availability[name] = availability[name] | (none_present & (rescue == index))

    experts = {}
    for expert in world.experts:
        rng = _rng(*split_key, "expert", expert.name)
        clean = concepts @ world.expert_projections[expert.name]  # [V, D_e]
        if expert.temporal == "vlad":
            shape = (num_videos, expert.max_tokens, expert.input_dim)
            features = clean[:, None, :] + expert_noise * rng.normal(size=shape)
            lengths = rng.integers(1, expert.max_tokens + 1, size=num_videos)
            features *= (np.arange(expert.max_tokens) < lengths[:, None])[..., None]
        else:
            features = clean + expert_noise * rng.normal(size=clean.shape)
        present = availability[expert.name]
        features *= present.reshape((num_videos,) + (1,) * (features.ndim - 1))
        experts[expert.name] = features.astype(np.float32)
        availability[expert.name] = present.astype(np.float32)
    return experts, availability


def _make_split(
    world: _World,
    text_embeddings: Mapping,
    *,
    split_key: tuple,
    id_prefix: str,
    num_videos: int,
    captions_per_video: int,
    caption_noise: float,
    expert_noise: float,
    token_noise: float,
    topic_spread: float,
    missing_rate: float,
    missing_caption_rate: float,
    wrong_caption_rate: float,
    min_text_tokens: int,
    max_text_tokens: int,
) -> FeatureStore:
    latent_dim = world.latent_dim
    rng = _rng(*split_key, "concepts")
    concepts = rng.normal(size=(num_videos, latent_dim))  # [V, L], unit variance
    if world.topic_centres is not None:  # a topic centre plus the video's own variation, still unit variance
        topics = rng.integers(len(world.topic_centres), size=num_videos)
        concepts = (world.topic_centres[topics] + topic_spread * concepts) / math.sqrt(1 + topic_spread**2)
    experts, availability = _make_experts(
        world, concepts, split_key, expert_noise=expert_noise, missing_rate=missing_rate
    )

    rng = _rng(*split_key, "captions")
    shape = (num_videos, captions_per_video)
    # Real captions fill the leading slots; the first always exists (every video has a caption).
    counts = 1 + rng.binomial(captions_per_video - 1, 1 - missing_caption_rate, size=num_videos)
    has_caption = np.arange(captions_per_video) < counts[:, None]  # [V, K]
    caption_latents = concepts[:, None, :] + caption_noise * rng.normal(size=shape + (latent_dim,))  # [V, K, L]
    if wrong_caption_rate > 0 and num_videos > 1:
        rng = _rng(*split_key, "wrong captions")  # its own stream: the clean captions stay as they were
        wrong = rng.uniform(size=shape) < wrong_caption_rate  # [V, K]
        other = rng.integers(num_videos - 1, size=shape)
        other += other >= np.arange(num_videos)[:, None]  # another video than its own
        caption_latents = np.where(wrong[..., None], caption_latents - concepts[:, None, :] + concepts[other], caption_latents)

    text = {}
    for name in sorted(text_embeddings):
        rng = _rng(*split_key, "text", name)
        lengths = rng.integers(min_text_tokens, max_text_tokens + 1, size=shape) * has_caption  # [V, K]
        projection = world.text_projections[name]  # [L, D_t]
        nuisance = world.nuisance_scales[name] * rng.normal(size=shape + (projection.shape[1],))  # [V, K, D_t]
        per_caption = (caption_latents @ projection + nuisance).reshape(num_videos * captions_per_video, -1)
        # per_caption: [V*K, D_t], row v*K + k
        caption_of_token = np.repeat(np.arange(num_videos * captions_per_video), lengths.ravel())  # [T]
        # The token array is the dataset's largest: built in float32, in place, with one temporary.
        tokens = per_caption.astype(np.float32)[caption_of_token]  # [T, D_t]
        noise_std = float(text_embeddings[name].get("token_noise", token_noise))
        tokens += np.float32(noise_std) * rng.standard_normal(size=tokens.shape, dtype=np.float32)
        starts = (np.cumsum(lengths, axis=None) - lengths.ravel()).reshape(shape)
        text[name] = TokenTable(tokens=tokens, starts=starts, lengths=lengths)

    return FeatureStore(
        video_ids=tuple(f"{id_prefix}{index:06d}" for index in range(num_videos)),
        experts=experts,
        availability=availability,
        text=text,
    )


def make_synthetic_dataset(
    model_config_like: Any,
    *,
    num_train_videos: int,
    num_val_videos: int,
    num_test_videos: int,
    captions_per_video: int,
    text_embeddings: Mapping[str, Mapping[str, float]] = TEACHTEXT_TEXT_EMBEDDINGS,
    seed: int,
    latent_dim: int = 16,
    num_topics: int = 8,
    topic_spread: float = 1.0,
    missing_rate: float = 0.3,
    missing_caption_rate: float = 0.0,
    wrong_caption_rate: float = 0.0,
    caption_noise: float = 0.5,
    expert_noise: float = 0.5,
    token_noise: float = 1.0,
    hide_directions: bool = False,
    min_text_tokens: int = 2,
    max_text_tokens: Optional[int] = None,
) -> dict[str, FeatureStore]:
    """Train, val and test FeatureStores of one synthetic world (splits with 0 videos are left out).

    model_config_like: a ModelConfig or dict; its experts (name, input_dim, temporal, max_tokens,
      flaky) are generated. Its text_dim is not used (every embedding has its own dim).
    text_embeddings: name -> {"dim": token dim, "quality": q in (0, 1]} and optionally
      "token_noise" (that embedding's own per-token noise std instead of `token_noise`).
      The student's ModelConfig.text_dim must equal the dim of the embedding it reads.
    seed: fixes the world (projections, topics) and, through (seed, split), every split.
    latent_dim, num_topics, topic_spread: the concept space L, its topic centres (0: no topics) and
      the share of a video's own variation against its topic's.
    hide_directions: whether an embedding of quality q sees only ceil(L (1 + q) / 2) of the L
      concept directions (True) or all of them, its quality then only setting its nuisance (False,
      the default: the world where distillation helps; see the module docstring).
    caption_noise, expert_noise, token_noise: stds of a caption's deviation from its video, of
      expert features, and of each text token (for embeddings without their own "token_noise").
    min_text_tokens, max_text_tokens: caption lengths in tokens, uniform in this range (default
      maximum: the config's text_max_tokens).
    missing_rate: fraction of videos a flaky expert is missing for (if every expert is flaky,
      a video missing all of them gets one back, so the rate is then slightly lower).
    missing_caption_rate: probability that each caption slot after the first is empty.
    wrong_caption_rate: probability that a training caption is drawn from another random video's
      concept (a mislabelled caption); it changes no other array of the dataset.
    """
    config = as_model_config(model_config_like)
    max_text_tokens = config.text_max_tokens if max_text_tokens is None else max_text_tokens
    noise = dict(caption_noise=caption_noise, expert_noise=expert_noise, token_noise=token_noise)
    _check_parameters(
        text_embeddings,
        captions_per_video=captions_per_video,
        latent_dim=latent_dim,
        max_text_tokens=max_text_tokens,
        min_text_tokens=min_text_tokens,
        missing_rate=missing_rate,
        missing_caption_rate=missing_caption_rate,
        wrong_caption_rate=wrong_caption_rate,
        topic_spread=topic_spread,
        **noise,
    )
    world = _make_world(
        config,
        text_embeddings,
        world_seed=seed,
        latent_dim=latent_dim,
        num_topics=num_topics,
        hide_directions=hide_directions,
    )
    sizes = dict(zip(SPLIT_NAMES, (num_train_videos, num_val_videos, num_test_videos)))
    if min(sizes.values()) < 0:
        raise SyntheticDataError(f"video counts must be non-negative, got {sizes}")
    return {
        split: _make_split(
            world,
            text_embeddings,
            split_key=(seed, "split", split),
            id_prefix=f"{split}-",
            num_videos=num_videos,
            captions_per_video=captions_per_video,
            topic_spread=topic_spread,
            missing_rate=missing_rate,
            missing_caption_rate=missing_caption_rate,
            wrong_caption_rate=wrong_caption_rate if split == "train" else 0.0,
            min_text_tokens=min_text_tokens,
            max_text_tokens=max_text_tokens,
            **noise,
        )
        for split, num_videos in sizes.items()
        if num_videos > 0
    }

