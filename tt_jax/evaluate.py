"""Retrieval evaluation of one model on a whole split, for the training loop and for notebooks.

The model embeds the split in fixed-size chunks of videos (one compiled function whatever the
split's size: the last chunk is padded with repeated rows and trimmed), the [V*K, V] similarity
matrix is built on device, and `tt_jax.metrics` ranks it. BatchNorm runs in eval mode, so
chunking changes nothing.

    from tt_jax.evaluate import evaluate
    result = evaluate(store, workdir="runs/demo/student_teachtext/seed_0", return_similarity=True)
    result["t2v"]["R1"], result["similarity"].shape
"""

from __future__ import annotations

import functools
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from tt_jax import metrics
from tt_jax.data.feature_store import FeatureStore
from tt_jax.errors import UserInputError
from tt_jax.models import CENet, Embeddings
from tt_jax.models.similarity import retrieval_similarity

DEFAULT_CHUNK_VIDEOS = 256


@functools.partial(jax.jit, static_argnums=0)
def _embed_chunk(model: CENet, variables: Any, experts, availability, text) -> Embeddings:
    return model.apply(variables, experts, availability, text, train=False)


@functools.partial(jax.jit, static_argnums=1)
def _similarity(embeddings: Embeddings, expert_names: tuple) -> jax.Array:
    return retrieval_similarity(embeddings, expert_names)


def embed_split(
    model: CENet, variables: Any, store: FeatureStore, text_name: str, *, chunk_videos: int = DEFAULT_CHUNK_VIDEOS
) -> Embeddings:
    """Embeddings of every video and every caption slot of `store` (device arrays, V rows)."""
    if chunk_videos <= 0:
        raise UserInputError(f"chunk_videos must be positive, got {chunk_videos}")
    num_videos = store.num_videos
    chunk_videos = min(chunk_videos, num_videos)
    chunks = []
    for start in range(0, num_videos, chunk_videos):
        rows = np.arange(start, min(start + chunk_videos, num_videos))
        padded = np.concatenate([rows, np.full(chunk_videos - len(rows), rows[0])])
        experts, availability, text, _ = store.eval_inputs(text_name, model.config.text_max_tokens, videos=padded)
        embeddings = _embed_chunk(model, variables, experts, availability, text)
        chunks.append(jax.tree.map(lambda leaf, n=len(rows): leaf[:n], embeddings))
    return jax.tree.map(lambda *leaves: jnp.concatenate(leaves), *chunks)


def evaluate_variables(
    model: CENet,
    variables: Any,
    store: FeatureStore,
    text_name: str,
    *,
    chunk_videos: int = DEFAULT_CHUNK_VIDEOS,
    first_caption_only: bool = False,
    return_similarity: bool = False,
) -> dict:
    """{"t2v": metrics, "v2t": metrics} (plus "similarity" [V*K, V] as numpy when asked).

    first_caption_only: rank only each video's first caption, as the reference's validation
    during training does (`num_test_captions: 1`).
    """
    embeddings = embed_split(model, variables, store, text_name, chunk_videos=chunk_videos)
    sims = _similarity(embeddings, model.config.expert_names)
    query_masks = np.asarray(store.caption_mask, np.float64)
    if first_caption_only:
        query_masks = query_masks * (np.arange(query_masks.shape[1]) == 0)
    result = dict(metrics.retrieval_metrics(sims, query_masks))
    if return_similarity:
        result["similarity"] = np.asarray(sims)
    return result


def evaluate(
    store: FeatureStore,
    *,
    workdir: Optional[str] = None,
    model: Optional[CENet] = None,
    variables: Any = None,
    text_name: Optional[str] = None,
    checkpoint: str = "best",
    chunk_videos: int = DEFAULT_CHUNK_VIDEOS,
    first_caption_only: bool = False,
    return_similarity: bool = False,
) -> dict:
    """Metrics of a trained model on `store`: pass a run's `workdir`, or `model` and `variables`.

    workdir: a directory written by `tt_jax.train.train_and_evaluate`; its `checkpoint` ("best" or
      "latest") is evaluated with the text embedding it was trained on (unless `text_name`).
    model, variables, text_name: a model in hand, e.g. in a notebook after training.
    Returns {"t2v": {...}, "v2t": {...}} and, with return_similarity, "similarity" [V*K, V]
    (row v*K + k is caption k of video v).
    """
    if (workdir is None) == (model is None):
        raise UserInputError("evaluate needs either workdir=... or model=... and variables=..., not both")
    if workdir is not None:
        from tt_jax.trained import load_trained  # the run directory format lives with training

        trained = load_trained(workdir, checkpoint=checkpoint)
        model, variables = trained.model, trained.variables
        text_name = text_name or trained.text_name
    if variables is None or text_name is None:
        raise UserInputError("evaluate(model=...) also needs variables=... and text_name=...")
    store.validate(model.config, text_name)
    return evaluate_variables(
        model,
        variables,
        store,
        text_name,
        chunk_videos=chunk_videos,
        first_caption_only=first_caption_only,
        return_similarity=return_similarity,
    )
