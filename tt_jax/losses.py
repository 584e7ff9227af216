"""The retrieval loss: CE's max-margin ranking loss, whole and as a device's row share.

All functions are pure and take similarity matrices S with S[i, j] = sim(caption i, video j) and
the positives on the diagonal. References: `model/loss.py::MaxMarginRankingLoss` and
`trainer/trainer.py::_train_epoch` of albanie/collaborative-experts; TeachText (Croitoru et al.,
ICCV 2021), Eq. 2-4. The distillation terms are in `tt_jax.distillation`; `teachtext_loss` here
is the whole TeachText objective on one matrix, the oracle of the sharded step.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import jax
import jax.numpy as jnp

from tt_jax.distillation import teachtext as teachtext_terms
from tt_jax.distillation.view import aggregate



def _check_square(similarity: jax.Array, name: str) -> None:
    if similarity.ndim != 2 or similarity.shape[0] != similarity.shape[1]:
        raise ValueError(f"{name} must be a square [B, B] matrix, got shape {similarity.shape}")
    if similarity.shape[0] < 2:
        raise ValueError(f"{name} needs at least 2 videos in the batch, got {similarity.shape[0]}")


def ranking_hinge_sum(
    rows: jax.Array,
    row_positives: jax.Array,
    column_positives: jax.Array,
    first_row: jax.Array | int,
    margin: float,
    *,
    fix_norm: bool = True,
) -> jax.Array:
    """Sum of the hinge terms of rows [first_row, first_row + b) of a [B, B] similarity matrix.

    rows: [b, B] those rows; row_positives: [b] their diagonal entries S[i, i]; column_positives:
    [B] the whole diagonal. Terms relu(m - S[i,i] + S[i,j]) (caption i against video j) and
    relu(m - S[j,j] + S[i,j]) (video j against caption i); with fix_norm the i == j terms are left
    out. A device holding a block of rows computes its share; the shares add up to the full sum.
    """
    caption_anchor = jax.nn.relu(margin - (row_positives[:, None] - rows))
    video_anchor = jax.nn.relu(margin - (column_positives[None, :] - rows))
    total = caption_anchor + video_anchor
    if fix_norm:
        row_ids = first_row + jnp.arange(rows.shape[0])
        off_diagonal = row_ids[:, None] != jnp.arange(rows.shape[1])[None, :]
        total = jnp.where(off_diagonal, total, 0.0)
    return jnp.sum(total)


def ranking_term_count(batch: int, *, fix_norm: bool = True) -> int:
    """Number of hinge terms averaged over: 2 B (B - 1) with fix_norm, else 2 B^2."""
    return 2 * batch * (batch - 1) if fix_norm else 2 * batch * batch


def max_margin_ranking_loss(similarity: jax.Array, margin: float, *, fix_norm: bool = True) -> jax.Array:
    """Bidirectional hinge loss over in-batch negatives, no hard-negative mining.

    With fix_norm (every reference config) the i == j terms are left out and the mean runs over
    the remaining 2 B (B - 1) terms; without it over all 2 B^2, whose 2 B diagonal terms each
    equal m.
    """
    _check_square(similarity, "similarity")
    positives = jnp.diagonal(similarity)
    total = ranking_hinge_sum(similarity, positives, positives, 0, margin, fix_norm=fix_norm)
    return total / ranking_term_count(similarity.shape[0], fix_norm=fix_norm)


def teacher_similarity_from_embeddings(
    text: Mapping[str, jax.Array], video: Mapping[str, jax.Array], experts: Sequence[str]
) -> jax.Array:
    """S_t = sum over experts of text_e [B, D] @ video_e [B, D]^T: one precomputed teacher.

    This is the reference trainer's plain sum over the experts stored in a teacher pickle: no
    mixture weights and no renormalisation (they are presumed folded into the stored text
    embeddings). `text` entries may be [B, 1, D] as the reference collates them.
    """
    total = None
    for name in experts:
        query = text[name].reshape(text[name].shape[0], -1)
        term = jnp.dot(query, video[name].T)
        total = term if total is None else total + term
    if total is None:
        raise ValueError("a teacher needs at least one expert")
    return total


def teachtext_loss(
    student_similarity: jax.Array,
    teacher_similarities: jax.Array | None,
    *,
    margin: float,
    distillation_weight: float = 1.0,
    aggregation: str = "mean",
    distance: str = "huber",
    fix_norm: bool = True,
) -> dict[str, jax.Array]:
    """Ranking loss plus weighted distillation towards the aggregated teachers.

    Returns {"total", "ranking", "distillation", "teacher_target"}; with no teachers the
    distillation term is 0 and the target is absent.
    """
    ranking = max_margin_ranking_loss(student_similarity, margin, fix_norm=fix_norm)
    if teacher_similarities is None:
        return {"total": ranking, "ranking": ranking, "distillation": jnp.zeros_like(ranking)}
    target = aggregate(teacher_similarities, aggregation)
    distillation = teachtext_terms.teachtext_loss(
        student_similarity, teacher_similarities, aggregation=aggregation, kind=distance
    )
    return {
        "total": ranking + distillation_weight * distillation,
        "ranking": ranking,
        "distillation": distillation,
        "teacher_target": target,
    }
