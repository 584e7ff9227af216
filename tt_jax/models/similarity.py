"""From embeddings to the retrieval similarity matrix (reference `sharded_cross_view_inner_product`).

S[q, v] = sum_m w'[q, v, m] <text_m[q], video_m[v]>, where the mixture weights are renormalised
per (query, video) over the experts that video has:
    w'[q, v, m] = w[q, m] avail[v, m] / sum_m' w[q, m'] avail[v, m'].
The numerator and the denominator are accumulated separately so that memory stays O(Q * V)
rather than O(Q * V * M).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import jax
import jax.numpy as jnp

from tt_jax.models.ce import Embeddings


def weighted_similarity(
    text: Mapping[str, jax.Array],
    video: Mapping[str, jax.Array],
    moe_weights: jax.Array,
    availability: jax.Array,
    expert_names: Sequence[str],
    *,
    keep_missing_modalities: bool = False,
) -> jax.Array:
    """[Q, V] similarity of Q queries against V videos.

    Args:
      text: expert -> [Q, D_m] query embeddings.
      video: expert -> [V, D_m] video embeddings.
      moe_weights: [Q, M] mixture weights, columns in `expert_names` order.
      availability: [V, M] 1/0 expert availability of each video.
      keep_missing_modalities: the reference option of that name: every (query, video, expert)
        weight is 1, whatever the mixture weights and availabilities (spec section 2.5), so
        S[q, v] = sum_m <text_m[q], video_m[v]>. No reference config sets it.
    """
    numerator = jnp.zeros((moe_weights.shape[0], availability.shape[0]), jnp.float32)
    for index, name in enumerate(expert_names):
        expert_similarity = jnp.dot(text[name], video[name].T)  # [Q, V]
        if keep_missing_modalities:
            numerator = numerator + expert_similarity
            continue
        weighted = moe_weights[:, index : index + 1] * expert_similarity
        numerator = numerator + weighted * availability[:, index][None, :]
    if keep_missing_modalities:
        return numerator
    return numerator / jnp.dot(moe_weights, availability.T)


def retrieval_similarity(
    embeddings: Embeddings, expert_names: Sequence[str], *, keep_missing_modalities: bool = False
) -> jax.Array:
    """[B*K, B] similarity of every caption against every video; row q = b*K + k.

    This is the evaluation layout ('indep' caption mode): caption k of video b is row b*K + k.
    """
    batch, captions, num_experts = embeddings.moe_weights.shape
    text = {name: t.reshape(batch * captions, -1) for name, t in embeddings.text.items()}
    return weighted_similarity(
        text,
        embeddings.video,
        embeddings.moe_weights.reshape(batch * captions, num_experts),
        embeddings.availability,
        expert_names,
        keep_missing_modalities=keep_missing_modalities,
    )


def training_similarity(
    embeddings: Embeddings, expert_names: Sequence[str], *, keep_missing_modalities: bool = False
) -> jax.Array:
    """[B, B] train-mode matrix: the K captions of each video averaged (reference 'avg' merge)."""
    batch, captions, _ = embeddings.moe_weights.shape
    sims = retrieval_similarity(embeddings, expert_names, keep_missing_modalities=keep_missing_modalities)
    return jnp.mean(sims.reshape(batch, captions, -1), axis=1)
