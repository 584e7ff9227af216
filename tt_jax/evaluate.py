"""Retrieval evaluation of one model on one split: an `Evaluator` object for the training loop and
for notebooks, and `evaluate(...)` as the one-call notebook entry point.

An `Evaluator` is built once per (model, split): it fixes the chunking of the split's videos and
compiles one embedding function for that chunk shape, whatever the variables. `run(variables)`
takes the variables where they live (on the mesh, during training): nothing is copied to the host
and back. Each chunk of videos is split over the mesh's devices (BatchNorm runs in eval mode, so
chunking and sharding change nothing), the [V*K, V] similarity matrix is built on device, and
`tt_jax.metrics` ranks it.

    from tt_jax.evaluate import evaluate
    result = evaluate(store, workdir="runs/demo/student_teachtext/seed_0", return_similarity=True)
    result["t2v"]["R1"], result["similarity"].shape
"""

from __future__ import annotations

import functools
from typing import Any, Iterator, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from tt_jax import metrics, parallel
from tt_jax.data.feature_store import FeatureStore
from tt_jax.errors import UserInputError
from tt_jax.models import CENet, Embeddings
from tt_jax.models.similarity import retrieval_similarity
from tt_jax.trained import load_trained

DEFAULT_CHUNK_VIDEOS = 256


@functools.partial(jax.jit, static_argnums=1)
def _joined(chunks: list[Embeddings], num_videos: int) -> Embeddings:
    """The chunks' rows in order, without the last chunk's padding."""
    return jax.tree.map(lambda *leaves: jnp.concatenate(leaves)[:num_videos], *chunks)


class Evaluator:
    """Metrics of `model` reading `text_name` on `store`, for any variables of that model.

    chunk_videos: videos embedded per call (rounded up to a multiple of the mesh's devices; the
      last chunk is padded with repeated rows and trimmed), so memory does not grow with the split.
    first_caption_only: rank only each video's first caption, as the reference's validation
      during training does (`num_test_captions: 1`).
    """

    def __init__(
        self,
        model: CENet,
        store: FeatureStore,
        text_name: str,
        *,
        mesh: Optional[Mesh] = None,
        chunk_videos: int = DEFAULT_CHUNK_VIDEOS,
        first_caption_only: bool = False,
    ):
        if chunk_videos <= 0:
            raise UserInputError(f"chunk_videos must be positive, got {chunk_videos}")
        store.validate(model.config, text_name)
        self.model, self.store, self.text_name = model, store, text_name
        self.mesh = mesh if mesh is not None else parallel.make_mesh()
        devices = self.mesh.size
        chunk_videos = min(chunk_videos, store.num_videos)
        self.chunk_videos = -(-chunk_videos // devices) * devices
        query_masks = np.asarray(store.caption_mask, np.float64)
        if first_caption_only:
            query_masks = query_masks * (np.arange(query_masks.shape[1]) == 0)
        self.query_masks = query_masks
        config = model.config
        self._embed = jax.jit(
            functools.partial(model.apply, train=False),
            out_shardings=parallel.batch_sharded(self.mesh),
        )
        self._similarity = jax.jit(
            functools.partial(
                retrieval_similarity,
                expert_names=config.expert_names,
                keep_missing_modalities=config.keep_missing_modalities,
            ),
            out_shardings=parallel.replicated(self.mesh),
        )

    def _chunk_inputs(self, start: int) -> tuple[dict, dict, jax.Array]:
        """The model's inputs for the chunk of videos from `start`, split over the mesh."""
        rows = np.arange(start, min(start + self.chunk_videos, self.store.num_videos))
        padded = np.concatenate([rows, np.full(self.chunk_videos - len(rows), rows[0])])
        experts, availability, text, _ = self.store.eval_inputs(
            self.text_name, self.model.config.text_max_tokens, videos=padded
        )
        names = self.model.config.expert_names
        host = ({name: experts[name] for name in names}, {name: availability[name] for name in names}, text)
        return parallel.shard_host_arrays(host, self.mesh)

    def embedding_chunks(self, variables: Any) -> Iterator[tuple[int, Embeddings]]:
        """(first video, Embeddings of chunk_videos videos) for each chunk of the split, in order;
        the last chunk is padded with repeated rows (its rows past the split's end are not videos)."""
        for start in range(0, self.store.num_videos, self.chunk_videos):
            yield start, self._embed(variables, *self._chunk_inputs(start))

    def embed(self, variables: Any) -> Embeddings:
        """Embeddings of every video and caption slot of the split (device arrays, V rows)."""
        return _joined([chunk for _, chunk in self.embedding_chunks(variables)], self.store.num_videos)

    def similarity(self, variables: Any) -> jax.Array:
        """The [V*K, V] similarity matrix on device (row v*K + k is caption k of video v)."""
        return self._similarity(self.embed(variables))

    def run(self, variables: Any, *, return_similarity: bool = False) -> dict:
        """{"t2v": metrics, "v2t": metrics} (plus "similarity" [V*K, V] as numpy when asked;
        row v*K + k is caption k of video v)."""
        sims = self.similarity(variables)
        result = dict(metrics.retrieval_metrics(sims, self.query_masks))
        if return_similarity:
            result["similarity"] = np.asarray(jax.device_get(sims))
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
    mesh = parallel.make_mesh()
    if workdir is not None:
        trained = load_trained(workdir, checkpoint=checkpoint, sharding=parallel.replicated(mesh))
        model, variables = trained.model, trained.variables
        text_name = text_name or trained.text_name
    if variables is None or text_name is None:
        raise UserInputError("evaluate(model=...) also needs variables=... and text_name=...")
    variables = jax.device_put(variables, parallel.replicated(mesh))
    evaluator = Evaluator(
        model, store, text_name, mesh=mesh, chunk_videos=chunk_videos, first_caption_only=first_caption_only
    )
    return evaluator.run(variables, return_similarity=return_similarity)
