"""Retrieval evaluation of one model on one split: an `Evaluator` object for the training loop and
for notebooks, and `evaluate(...)` as the one-call notebook entry point.

An `Evaluator` is built once per (model, split): it fixes the chunking of the split's videos and
compiles one embedding function for that chunk shape, whatever the variables. `run(variables)`
takes the variables where they live (on the mesh, during training): nothing is copied to the host
and back. Each chunk of videos is split over the mesh's devices (BatchNorm runs in eval mode, so
chunking and sharding change nothing); the split's videos are then sharded over every device and
ranked against every caption by `tt_jax.streamed_ranks`, block by block, without the [V*K, V]
similarity matrix. Optionally t2v is ranked under QB-Norm (`tt_jax.qbnorm`) with a query bank of
another split's captions.

    from tt_jax.evaluate import evaluate
    result = evaluate(store, workdir="runs/demo/student_teachtext/seed_0", return_ranks=True)
    result["t2v"]["R1"], result["ranks"].text_to_video
"""

from __future__ import annotations

import functools
from typing import Any, Iterator, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from tt_jax import metrics, parallel, qbnorm
from tt_jax.data.feature_store import FeatureStore
from tt_jax.errors import UserInputError
from tt_jax.models import CENet, Embeddings
from tt_jax.models.similarity import retrieval_similarity
from tt_jax.packed_embeddings import PackedGallery, PackedQueries, pack_split
from tt_jax.streamed_ranks import streamed_ranks
from tt_jax.trained import load_trained

DEFAULT_CHUNK_VIDEOS = 256
# The largest similarity matrix `return_similarity` hands back: 2**28 float32 entries, 1 GiB.
MAX_RETURNED_SIMILARITIES = 1 << 28


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
    block: the side of the similarity blocks ranked at a time (default: `packed_embeddings.default_block`).
    qbnorm_settings, bank_store: rank t2v under QB-Norm with a query bank of `bank_store`'s captions
      (embedded by the same variables); the raw t2v metrics are kept as "t2v_raw".
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
        block: Optional[int] = None,
        qbnorm_settings: Optional[qbnorm.QBNormSettings] = None,
        bank_store: Optional[FeatureStore] = None,
    ):
        if chunk_videos <= 0:
            raise UserInputError(f"chunk_videos must be positive, got {chunk_videos}")
        if (qbnorm_settings is None) != (bank_store is None):
            raise UserInputError(
                "QB-Norm needs both qbnorm_settings=QBNormSettings(...) and bank_store=<the bank split's store>"
            )
        store.validate(model.config, text_name)
        self.model, self.store, self.text_name = model, store, text_name
        self.mesh = mesh if mesh is not None else parallel.make_mesh()
        self.block, self.qbnorm = block, qbnorm_settings
        devices = self.mesh.size
        chunk_videos = min(chunk_videos, store.num_videos)
        self.chunk_videos = -(-chunk_videos // devices) * devices
        query_masks = np.asarray(store.caption_mask, np.float64)
        if first_caption_only:
            query_masks = query_masks * (np.arange(query_masks.shape[1]) == 0)
        self.query_masks = query_masks
        self.targets = np.arange(query_masks.size) // query_masks.shape[1]  # row v*K + k: caption k of video v
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
        self._pack = jax.jit(
            functools.partial(
                pack_split, expert_names=config.expert_names, keep_missing_modalities=config.keep_missing_modalities
            )
        )
        self._bank = None
        if qbnorm_settings is not None:
            self._bank = Evaluator(model, bank_store, text_name, mesh=self.mesh, chunk_videos=chunk_videos)
            real = np.flatnonzero(np.asarray(bank_store.caption_mask).reshape(-1) != 0)
            self._bank_rows = real[qbnorm.bank_rows(len(real), qbnorm_settings)]

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

    def packed(self, variables: Any) -> tuple[PackedQueries, PackedGallery]:
        """The split's V*K caption slots and V videos, packed for ranking (`tt_jax.packed_embeddings`)."""
        return self._pack(self.embed(variables))

    def similarity(self, variables: Any) -> jax.Array:
        """The [V*K, V] similarity matrix on device (row v*K + k is caption k of video v)."""
        return self._similarity(self.embed(variables))

    def bank_queries(self, variables: Any) -> PackedQueries:
        """The QB-Norm query bank: the bank split's real captions (or their seeded subsample)."""
        queries, _ = self._bank.packed(variables)
        rows = jax.device_put(self._bank_rows, parallel.replicated(self.mesh))
        return jax.tree.map(lambda leaf: leaf[rows], queries)

    def ranks(self, variables: Any) -> tuple[metrics.RetrievalRanks, Optional[tuple[metrics.RetrievalRanks, float]]]:
        """(ranks, None), or with QB-Norm (raw ranks, (QB-Norm ranks, share of queries rescored))."""
        queries, gallery = self.packed(variables)
        keep_missing = self.model.config.keep_missing_modalities
        raw = streamed_ranks(
            queries, gallery, self.targets, self.query_masks, mesh=self.mesh, block=self.block,
            keep_missing_modalities=keep_missing,
        )
        if self.qbnorm is None:
            return raw.ranks, None
        rescoring = qbnorm.rescoring(
            self.qbnorm, self.bank_queries(variables), gallery, mesh=self.mesh, block=self.block,
            keep_missing_modalities=keep_missing,
        )
        normalised = streamed_ranks(
            queries, gallery, self.targets, self.query_masks, mesh=self.mesh, block=self.block,
            keep_missing_modalities=keep_missing, rescoring=rescoring,
        )
        return raw.ranks, (normalised.ranks, normalised.rescored_fraction)

    def run(self, variables: Any, *, return_similarity: bool = False, return_ranks: bool = False) -> dict:
        """{"t2v": metrics, "v2t": metrics}; with QB-Norm "t2v" is ranked under it and the raw
        t2v metrics are "t2v_raw". Also "ranks" (`metrics.RetrievalRanks`, the ones the metrics
        were computed from) and "similarity" [V*K, V] as numpy when asked (row v*K + k is caption
        k of video v; refused for splits above MAX_RETURNED_SIMILARITIES entries)."""
        if return_similarity:
            check_returnable(self.query_masks.size, self.store.num_videos)
        ranks, normalised = self.ranks(variables)
        result = {
            "t2v": metrics.metrics_from_ranks(ranks.text_to_video, self.query_masks.sum()),
            "v2t": metrics.metrics_from_ranks(ranks.video_to_text, self.query_masks.shape[0]),
        }
        if normalised is not None:
            normalised_ranks, fraction = normalised
            result["t2v_raw"] = result["t2v"]
            result["t2v"] = metrics.metrics_from_ranks(normalised_ranks.text_to_video, self.query_masks.sum())
            result["qbnorm"] = {"method": self.qbnorm.method, "bank_size": len(self._bank_rows), "rescored_fraction": fraction}
            ranks = metrics.RetrievalRanks(normalised_ranks.text_to_video, ranks.video_to_text)
        if return_ranks:
            result["ranks"] = ranks
        if return_similarity:
            result["similarity"] = np.asarray(jax.device_get(self.similarity(variables)))
        return result


def check_returnable(num_queries: int, num_videos: int) -> None:
    """Refuses a similarity matrix too large to hand back whole."""
    entries = num_queries * num_videos
    if entries > MAX_RETURNED_SIMILARITIES:
        raise UserInputError(
            f"the similarity matrix would hold {num_queries} x {num_videos} = {entries:,} entries "
            f"({entries * 4 / 2**30:.1f} GiB), above the {MAX_RETURNED_SIMILARITIES:,} that return_similarity "
            "hands back; use return_ranks=True for per-query ranks, or tt_jax.search.top_k for each "
            "query's best videos"
        )


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
    return_ranks: bool = False,
    qbnorm_settings: Optional[qbnorm.QBNormSettings] = None,
    bank_store: Optional[FeatureStore] = None,
    block: Optional[int] = None,
) -> dict:
    """Metrics of a trained model on `store`: pass a run's `workdir`, or `model` and `variables`.

    workdir: a directory written by `tt_jax.train.train_and_evaluate`; its `checkpoint` ("best" or
      "latest") is evaluated with the text embedding it was trained on (unless `text_name`).
    model, variables, text_name: a model in hand, e.g. in a notebook after training.
    qbnorm_settings, bank_store: QB-Norm for t2v, with `bank_store`'s captions as the query bank
      (e.g. the training split's store).
    Returns what `Evaluator.run` returns: {"t2v": {...}, "v2t": {...}}, with return_ranks the
    per-query "ranks", with return_similarity "similarity" [V*K, V] (row v*K + k is caption k of
    video v), with QB-Norm "t2v_raw" and "qbnorm".
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
        model, store, text_name, mesh=mesh, chunk_videos=chunk_videos, first_caption_only=first_caption_only,
        block=block, qbnorm_settings=qbnorm_settings, bank_store=bank_store,
    )
    return evaluator.run(variables, return_similarity=return_similarity, return_ranks=return_ranks)
