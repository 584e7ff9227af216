"""One split of a dataset held in host memory as numpy arrays: video experts, ragged caption tokens,
availability masks, optional denoising weights and optional precomputed teacher embeddings.

Why a store and not padded tensors: caption token features are the largest part of a dataset
(MSRVTT full-test, gpt2-xl, 30 tokens: 2990 x 20 x 30 x 1600 floats = 11 GB padded), and most
captions are much shorter than the padded length. The store keeps tokens ragged, in one array per
text embedding, and pads only the rows a batch asks for, in one vectorised gather.

Layout conventions (shared with the reference release, `teachtext_ce_spec.md` section 5):
  V videos, K caption slots per video (videos with fewer captions have empty slots, length 0);
  query row `v*K + k` is caption k of video v; experts are keyed by name, text embeddings by name
  ("w2v", "gpt2-xl", ...). Rows of a missing expert are zeros and their availability is 0 (the
  release marks them with NaN; the model zeroes them anyway, so the store does it once).
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Mapping, Optional, Sequence, Union

import numpy as np

from tt_jax.errors import UserInputError, list_some
from tt_jax.models.config import ModelConfig

_STORAGE_DTYPES = (np.dtype(np.float32), np.dtype(np.float16))


class FeatureStoreError(UserInputError):
    """Features that do not form a consistent split, or do not fit the model that should read them."""


def _as_float_storage(array, what: str) -> np.ndarray:
    """`array` as float32/float16 numpy, without a copy when it already is one."""
    array = np.asarray(array)
    if array.dtype in _STORAGE_DTYPES:
        return array
    if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
        raise FeatureStoreError(f"{what}: expected a float array, got dtype {array.dtype}")
    return array.astype(np.float32)


@dataclasses.dataclass(frozen=True, eq=False)
class TokenTable:
    """Variable-length token features of every caption of every video, stored ragged (no padding).

    Attributes:
      tokens: [total_tokens, D] float32 (or float16 to halve memory); the tokens of caption k of
        video v are `tokens[starts[v, k] : starts[v, k] + lengths[v, k]]`.
      starts: [V, K] int64 offset of each caption's first token.
      lengths: [V, K] int32 token count; 0 for a caption slot the video does not have.
    """

    tokens: np.ndarray
    starts: np.ndarray
    lengths: np.ndarray

    def __post_init__(self):
        tokens = _as_float_storage(self.tokens, "TokenTable.tokens")
        starts = np.asarray(self.starts).astype(np.int64, copy=False)
        lengths = np.asarray(self.lengths).astype(np.int32, copy=False)
        if tokens.ndim != 2:
            raise FeatureStoreError(f"TokenTable.tokens must be [total_tokens, D], got shape {tokens.shape}")
        if lengths.ndim != 2 or starts.shape != lengths.shape:
            raise FeatureStoreError(
                f"TokenTable.starts and .lengths must both be [V, K], got {starts.shape} and {lengths.shape}"
            )
        if np.any(lengths < 0) or np.any(starts < 0):
            raise FeatureStoreError("TokenTable.starts and .lengths must be non-negative")
        ends = starts + lengths
        if ends.size and ends.max() > len(tokens):
            raise FeatureStoreError(
                f"TokenTable: a caption ends at token {ends.max()} but tokens holds only {len(tokens)} rows"
            )
        object.__setattr__(self, "tokens", tokens)
        object.__setattr__(self, "starts", starts)
        object.__setattr__(self, "lengths", lengths)

    @property
    def num_videos(self) -> int:
        return self.lengths.shape[0]

    @property
    def max_captions(self) -> int:
        return self.lengths.shape[1]

    @property
    def dim(self) -> int:
        return self.tokens.shape[1]

    def padded(self, videos: np.ndarray, captions: np.ndarray, max_tokens: int) -> np.ndarray:
        """[B, C, max_tokens, D] float32 token features of captions `captions[b, c]` of videos `videos[b]`.

        Zero padded and truncated to exactly `max_tokens` (the text NetVLAD does not mask padding,
        so the padded length is part of the model). videos: [B] int; captions: [B, C] int. An empty
        caption slot gives all-zero rows. One fancy-index gather, no loop over examples.
        """
        videos = np.asarray(videos)
        captions = np.asarray(captions)
        if videos.ndim != 1 or captions.ndim != 2 or captions.shape[0] != videos.shape[0]:
            raise FeatureStoreError(
                f"padded: expected videos [B] and captions [B, C], got {videos.shape} and {captions.shape}"
            )
        if max_tokens <= 0:
            raise FeatureStoreError(f"max_tokens must be positive, got {max_tokens}")
        starts = self.starts[videos[:, None], captions]  # [B, C]
        lengths = np.minimum(self.lengths[videos[:, None], captions], max_tokens)  # [B, C]
        positions = np.arange(max_tokens)  # [N]
        valid = positions < lengths[..., None]  # [B, C, N]
        rows = np.where(valid, starts[..., None] + positions, 0)  # [B, C, N]
        if len(self.tokens) == 0:  # no token anywhere: nothing to gather
            return np.zeros(valid.shape + (self.dim,), np.float32)
        gathered = self.tokens[rows]  # [B, C, N, D], the only copy of the features
        return np.where(valid[..., None], gathered, np.float32(0)).astype(np.float32, copy=False)

    @classmethod
    def from_padded(cls, padded: np.ndarray, lengths: np.ndarray) -> "TokenTable":
        """From [V, K, N, D] zero-padded tokens and their [V, K] lengths (tokens past a length are dropped)."""
        padded = _as_float_storage(padded, "TokenTable.from_padded: padded")
        lengths = np.asarray(lengths)
        if padded.ndim != 4 or lengths.shape != padded.shape[:2]:
            raise FeatureStoreError(
                "from_padded: expected padded [V, K, N, D] and lengths [V, K], "
                f"got {padded.shape} and {lengths.shape}"
            )
        if np.any(lengths < 0) or np.any(lengths > padded.shape[2]):
            raise FeatureStoreError(f"from_padded: lengths must lie in [0, {padded.shape[2]}]")
        keep = np.arange(padded.shape[2]) < lengths[..., None]  # [V, K, N]
        tokens = padded[keep]  # row-major: video, then caption, then token order
        starts = (np.cumsum(lengths, axis=None) - lengths.ravel()).reshape(lengths.shape)
        return cls(tokens=tokens, starts=starts, lengths=lengths)

    @classmethod
    def from_lists(
        cls, captions_per_video: Sequence[Sequence[np.ndarray]], dim: Optional[int] = None
    ) -> "TokenTable":
        """From the release layout: a list over videos of lists over captions of [n_tokens, D] arrays.

        K is the largest caption count; shorter videos get empty slots. `dim` is needed only when
        there is no token at all.
        """
        counts = [len(captions) for captions in captions_per_video]
        num_videos, max_captions = len(counts), max(counts, default=0)
        arrays = [np.asarray(tokens) for captions in captions_per_video for tokens in captions]
        dims = {array.shape[1] for array in arrays if array.ndim == 2}
        if any(array.ndim != 2 for array in arrays) or len(dims) > 1:
            raise FeatureStoreError(
                f"from_lists: every caption must be a [n_tokens, D] array with one D, got dims {sorted(dims)}"
            )
        dim = dims.pop() if dims else dim
        if dim is None:
            raise FeatureStoreError("from_lists: no token anywhere; pass dim")
        lengths = np.zeros((num_videos, max_captions), np.int32)
        slot_mask = np.arange(max_captions) < np.asarray(counts, np.int64)[:, None]  # [V, K]
        lengths[slot_mask] = [len(array) for array in arrays]  # row-major order = list order
        tokens = np.concatenate(arrays, axis=0) if arrays else np.zeros((0, dim), np.float32)
        starts = (np.cumsum(lengths, axis=None) - lengths.ravel()).reshape(lengths.shape)
        return cls(tokens=_as_float_storage(tokens, "from_lists"), starts=starts, lengths=lengths)


@dataclasses.dataclass(frozen=True, eq=False)
class FeatureStore:
    """One split (train, val or test) in host memory; every array's leading dimension is V.

    Attributes:
      video_ids: V unique ids, in row order.
      experts: expert -> [V, D] ("avg") or [V, T, D] ("vlad", zero padded to that expert's
        max_tokens). Rows of missing experts are zeroed on construction; NaN in a row marked
        present is kept, for `validate` to report.
      availability: expert -> [V] float32, 1 where the video has the expert.
      text: text embedding name -> TokenTable. Every table has the same [V, K] caption layout
        (the same slots hold captions); token counts may differ (tokenisers differ).
      caption_weights: [V, K] non-negative sampling weights (denoising masks), 0 on empty slots;
        None samples uniformly over real captions.
      teacher_embeddings: precomputed teachers in the reference release format, per caption:
        name -> {"video": {expert: [V, D]}, "text": {expert: [V, K, D]}}; None when absent.
    """

    video_ids: tuple
    experts: dict
    availability: dict
    text: dict
    caption_weights: Optional[np.ndarray] = None
    teacher_embeddings: Optional[dict] = None

    def __post_init__(self):
        video_ids = tuple(self.video_ids)
        num_videos = len(video_ids)
        if len(set(video_ids)) != num_videos:
            repeated = sorted(video for video, count in collections.Counter(video_ids).items() if count > 1)
            raise FeatureStoreError(f"video_ids must be unique; repeated: {list_some(repeated)}")

        def check_leading(array: np.ndarray, what: str, trailing: Optional[tuple] = None):
            if array.ndim == 0 or array.shape[0] != num_videos:
                raise FeatureStoreError(
                    f"{what}: expected {num_videos} rows (one per video id), got shape {array.shape}"
                )
            if trailing is not None and array.shape[1:] != trailing:
                raise FeatureStoreError(f"{what}: expected shape {(num_videos,) + trailing}, got {array.shape}")

        if set(self.experts) != set(self.availability):
            raise FeatureStoreError(
                f"experts and availability must name the same experts, got {sorted(self.experts)} "
                f"and {sorted(self.availability)}"
            )
        availability = {}
        for name in sorted(self.availability):
            present = np.asarray(self.availability[name]).astype(np.float32, copy=False)
            check_leading(present, f"availability[{name!r}]", trailing=())
            availability[name] = present
        experts = {}
        for name in sorted(self.experts):
            features = _as_float_storage(self.experts[name], f"experts[{name!r}]")
            check_leading(features, f"experts[{name!r}]")
            if features.ndim not in (2, 3):
                raise FeatureStoreError(
                    f"experts[{name!r}]: expected [V, D] or [V, T, D], got shape {features.shape}"
                )
            experts[name] = _zero_missing_rows(features, availability[name], original=self.experts[name])

        if not self.text:
            raise FeatureStoreError("a feature store needs at least one text embedding")
        text = dict(sorted(self.text.items()))
        first_name, first = next(iter(text.items()))
        for name, table in text.items():
            if not isinstance(table, TokenTable):
                raise FeatureStoreError(f"text[{name!r}] must be a TokenTable, got {type(table).__name__}")
            check_leading(table.lengths, f"text[{name!r}].lengths")
            same_slots = table.lengths.shape == first.lengths.shape and np.array_equal(
                table.lengths > 0, first.lengths > 0
            )
            if not same_slots:
                raise FeatureStoreError(
                    f"text[{name!r}] and text[{first_name!r}] must have the same caption slots "
                    f"(lengths > 0 in the same places), got shapes {table.lengths.shape} and {first.lengths.shape}"
                )
        caption_shape = first.lengths.shape[1:]

        caption_weights = self.caption_weights
        if caption_weights is not None:
            caption_weights = np.asarray(caption_weights, np.float64)
            check_leading(caption_weights, "caption_weights", trailing=caption_shape)
            if not np.all(np.isfinite(caption_weights)) or np.any(caption_weights < 0):
                raise FeatureStoreError("caption_weights must be finite and non-negative")
            on_empty_slot = (caption_weights > 0) & (first.lengths == 0)
            if np.any(on_empty_slot):
                videos = np.flatnonzero(on_empty_slot.any(axis=1))
                raise FeatureStoreError(
                    "caption_weights give weight to caption slots that hold no caption, for videos "
                    f"{list_some(video_ids[v] for v in videos)}"
                )

        teachers = self.teacher_embeddings
        if teachers is not None:
            teachers = {name: _checked_teacher(name, teacher, check_leading, caption_shape)
                        for name, teacher in sorted(teachers.items())}

        object.__setattr__(self, "video_ids", video_ids)
        object.__setattr__(self, "experts", experts)
        object.__setattr__(self, "availability", availability)
        object.__setattr__(self, "text", text)
        object.__setattr__(self, "caption_weights", caption_weights)
        object.__setattr__(self, "teacher_embeddings", teachers)

    @property
    def num_videos(self) -> int:
        return len(self.video_ids)

    @property
    def max_captions(self) -> int:
        """K, the caption slots per video."""
        return next(iter(self.text.values())).max_captions

    @property
    def caption_mask(self) -> np.ndarray:
        """[V, K] float64, 1 where the slot holds a caption (the metrics' query_masks)."""
        return (next(iter(self.text.values())).lengths > 0).astype(np.float64)

    def select(self, rows: Sequence[int], caption_weights: Optional[np.ndarray] = None) -> "FeatureStore":
        """The store of videos `rows` (in that order), e.g. a fraction of the training split or the
        videos a denoising mask keeps. Token arrays are shared, not copied; `caption_weights`
        ([len(rows), K]) replace the selected rows' weights when given."""
        rows = np.asarray(rows, np.int64)
        if rows.ndim != 1 or (rows.size and (rows.min() < 0 or rows.max() >= self.num_videos)):
            raise FeatureStoreError(f"select: rows must be indices of the store's {self.num_videos} videos")
        if caption_weights is None and self.caption_weights is not None:
            caption_weights = self.caption_weights[rows]
        teachers = None
        if self.teacher_embeddings is not None:
            teachers = {
                name: {part: {expert: array[rows] for expert, array in arrays.items()} for part, arrays in teacher.items()}
                for name, teacher in self.teacher_embeddings.items()
            }
        return FeatureStore(
            video_ids=tuple(self.video_ids[row] for row in rows),
            experts={name: array[rows] for name, array in self.experts.items()},
            availability={name: array[rows] for name, array in self.availability.items()},
            text={
                name: TokenTable(tokens=table.tokens, starts=table.starts[rows], lengths=table.lengths[rows])
                for name, table in self.text.items()
            },
            caption_weights=caption_weights,
            teacher_embeddings=teachers,
        )

    @property
    def sampling_weights(self) -> np.ndarray:
        """[V, K] weights the sampler draws captions with: the denoising weights, or the caption mask."""
        return self.caption_weights if self.caption_weights is not None else self.caption_mask

    def _text_lengths(self, text_names: Sequence[str], max_text_tokens: Union[int, Mapping[str, int]]) -> dict:
        unknown = [name for name in text_names if name not in self.text]
        if unknown:
            raise FeatureStoreError(f"no text embedding {unknown}; the store holds {sorted(self.text)}")
        if isinstance(max_text_tokens, Mapping):
            missing = [name for name in text_names if name not in max_text_tokens]
            if missing:
                raise FeatureStoreError(f"max_text_tokens gives no length for text embeddings {missing}")
            return {name: int(max_text_tokens[name]) for name in text_names}
        return {name: int(max_text_tokens) for name in text_names}

    def _check_indices(self, videos: np.ndarray, captions: np.ndarray) -> None:
        if videos.ndim != 1 or captions.ndim != 2 or captions.shape[0] != videos.shape[0]:
            raise FeatureStoreError(
                f"expected videos [B] and captions [B, C], got shapes {videos.shape} and {captions.shape}"
            )
        if videos.size and (videos.min() < 0 or videos.max() >= self.num_videos):
            raise FeatureStoreError(
                f"video indices must lie in [0, {self.num_videos}), got {videos.min()}..{videos.max()}"
            )
        if captions.size and (captions.min() < 0 or captions.max() >= self.max_captions):
            raise FeatureStoreError(
                f"caption indices must lie in [0, {self.max_captions}), got {captions.min()}..{captions.max()}"
            )

    def _expert_rows(self, videos: np.ndarray) -> dict:
        """{expert: [B, ...] float32}, a copy of the rows of `videos`."""
        return {name: features[videos].astype(np.float32, copy=False) for name, features in self.experts.items()}

    def batch(
        self,
        videos: np.ndarray,
        captions: np.ndarray,
        *,
        text_names: Sequence[str],
        max_text_tokens: Union[int, Mapping[str, int]],
        teacher_names: Optional[Sequence[str]] = None,
    ) -> dict:
        """The features of one batch (fresh float32 arrays; the store is never aliased).

        videos: [B] video rows; captions: [B, C] caption slots of each (C = 1 in TeachText training).
        max_text_tokens: the padded length, one for all text embeddings or one per name.
        teacher_names: the precomputed teachers to include (default: every one the store holds).
        Returns {"experts": {e: [B, ...]}, "availability": {e: [B]}, "text": {name: [B, C, N, D]},
        and "teacher_embeddings": {t: {"video": {e: [B, D]}, "text": {e: [B, C, D]}}} if the store has them}.
        """
        videos = np.asarray(videos, np.int64)
        captions = np.asarray(captions, np.int64)
        self._check_indices(videos, captions)
        lengths = self._text_lengths(text_names, max_text_tokens)
        result = {
            "experts": self._expert_rows(videos),
            "availability": {name: present[videos] for name, present in self.availability.items()},
            "text": {name: self.text[name].padded(videos, captions, length) for name, length in lengths.items()},
        }
        teachers = self.teacher_embeddings or {}
        if teacher_names is not None:
            unknown = [name for name in teacher_names if name not in teachers]
            if unknown:
                raise FeatureStoreError(f"no precomputed teachers {unknown}; the store holds {sorted(teachers)}")
            teachers = {name: teachers[name] for name in teacher_names}
        if teachers:
            result["teacher_embeddings"] = {
                name: {
                    "video": {
                        e: emb[videos].astype(np.float32, copy=False) for e, emb in teacher["video"].items()
                    },
                    "text": {
                        e: emb[videos[:, None], captions].astype(np.float32, copy=False)
                        for e, emb in teacher["text"].items()
                    },
                }
                for name, teacher in teachers.items()
            }
        return result

    def eval_inputs(
        self, text_name: str, max_text_tokens: int, videos: Optional[np.ndarray] = None
    ) -> tuple[dict, dict, np.ndarray, np.ndarray]:
        """Every caption slot of `videos` (default: all), for evaluation.

        Returns (experts {e: [V', ...]}, availability {e: [V']}, text [V', K, N, D] float32,
        query_masks [V', K] float64). With videos=None the experts are the stored arrays themselves
        (read them, do not write); the padded text is always new memory, V'*K*N*D floats, so
        evaluate a large split in chunks of videos.
        """
        (text_length,) = self._text_lengths([text_name], max_text_tokens).values()
        if videos is None:
            experts = {name: features.astype(np.float32, copy=False) for name, features in self.experts.items()}
            availability = dict(self.availability)
            videos = np.arange(self.num_videos)
        else:
            videos = np.asarray(videos, np.int64)
            self._check_indices(videos, np.zeros((len(videos), 1), np.int64))
            experts = self._expert_rows(videos)
            availability = {name: present[videos] for name, present in self.availability.items()}
        all_captions = np.broadcast_to(np.arange(self.max_captions), (len(videos), self.max_captions))
        text = self.text[text_name].padded(videos, all_captions, text_length)
        return experts, availability, text, self.caption_mask[videos]

    def validate(self, model_config: ModelConfig, text_name: str) -> None:
        """Raises FeatureStoreError on the first problem that would make training with `model_config`
        reading `text_name` fail or silently wrong; the message names the array and the videos."""
        if self.num_videos == 0:
            raise FeatureStoreError("the feature store holds no video")
        missing = [name for name in model_config.expert_names if name not in self.experts]
        if missing:
            raise FeatureStoreError(
                f"the model reads experts {missing} that the feature store lacks; it holds {sorted(self.experts)}"
            )
        for expert in model_config.experts:
            actual = self.experts[expert.name].shape[1:]
            if actual != expert.input_shape:
                layout = "[max_tokens, input_dim]" if expert.temporal == "vlad" else "[input_dim]"
                raise FeatureStoreError(
                    f"expert {expert.name!r}: the model expects per-video features {layout} = "
                    f"{expert.input_shape}, the store holds {actual}"
                )
            present = self.availability[expert.name]
            if not np.all((present == 0) | (present == 1)):
                raise FeatureStoreError(
                    f"availability of expert {expert.name!r} must be 0 or 1, got values {np.unique(present)[:10]}"
                )
            if not expert.flaky and not np.all(present == 1):
                videos = np.flatnonzero(present != 1)
                raise FeatureStoreError(
                    f"expert {expert.name!r} is not flaky (always present) but is missing for videos "
                    f"{list_some(self.video_ids[v] for v in videos)}; mark it flaky in the config or fix the data"
                )
            features = self.experts[expert.name]
            finite = _finite_rows(features)
            bad = np.flatnonzero(~finite & (present == 1))
            if bad.size:
                raise FeatureStoreError(
                    f"NaN/inf in expert {expert.name!r}, marked present, for videos "
                    f"{list_some(self.video_ids[v] for v in bad)}; a missing expert must have availability 0"
                )
        if text_name not in self.text:
            raise FeatureStoreError(f"the model reads text {text_name!r}; the store holds {sorted(self.text)}")
        table = self.text[text_name]
        if table.dim != model_config.text_dim:
            raise FeatureStoreError(
                f"text {text_name!r}: the model expects {model_config.text_dim}-d tokens (text_dim), "
                f"the store holds {table.dim}-d"
            )
        finite = _finite_rows(table.tokens)
        if not np.all(finite):
            row = int(np.argmax(~finite))
            video = int(np.argmax(((table.starts <= row) & (row < table.starts + table.lengths)).any(axis=1)))
            raise FeatureStoreError(
                f"NaN/inf in text {text_name!r} tokens (first in video {self.video_ids[video]!r})"
            )
        no_caption = np.flatnonzero(table.lengths.sum(axis=1) == 0)
        if no_caption.size:
            raise FeatureStoreError(
                f"videos {list_some(self.video_ids[v] for v in no_caption)} have no caption; "
                "remove them from the split"
            )
        if self.caption_weights is not None:
            unweighted = np.flatnonzero(self.caption_weights.sum(axis=1) == 0)
            if unweighted.size:
                raise FeatureStoreError(
                    "caption_weights are all zero for videos "
                    f"{list_some(self.video_ids[v] for v in unweighted)}, so no caption can be sampled "
                    "for them; remove them from the training split"
                )


def distinct_nbytes(stores: Mapping[str, "FeatureStore"]) -> int:
    """Bytes of every array a set of split stores holds, each array counted once (splits listed by
    one file, such as ActivityNet's val and test, share their arrays)."""
    arrays = {}
    for store in {id(store): store for store in stores.values()}.values():
        for array in [*store.experts.values(), *store.availability.values()]:
            arrays[id(array)] = array.nbytes
        for table in store.text.values():
            for array in (table.tokens, table.starts, table.lengths):
                arrays[id(array)] = array.nbytes
        if store.caption_weights is not None:
            arrays[id(store.caption_weights)] = store.caption_weights.nbytes
    return sum(arrays.values())


def _finite_rows(array: np.ndarray, rows_per_block: int = 1 << 14) -> np.ndarray:
    """[N] whether each row of `array` is all finite, checked in blocks: a whole-array
    np.isfinite would allocate a mask a quarter the size of the largest feature table."""
    flat = array.reshape(len(array), -1)
    return np.concatenate(
        [np.isfinite(flat[start : start + rows_per_block]).all(axis=1) for start in range(0, len(flat), rows_per_block)]
        or [np.ones(0, bool)]
    )


def _zero_missing_rows(features: np.ndarray, present: np.ndarray, *, original) -> np.ndarray:
    """`features` with the rows of missing videos set to 0 (the release fills them with NaN).

    Copies only when a missing row is not already zero, and never writes into the caller's array.
    """
    missing = present == 0
    if not np.any(missing):
        return features
    missing_rows = features[missing]
    if not np.any(missing_rows != 0):  # already zero (NaN != 0 is True, so NaN rows get cleaned)
        return features
    aliases_caller = features is original or (
        isinstance(original, np.ndarray) and np.may_share_memory(features, original)
    )
    if aliases_caller or not features.flags.writeable:
        features = features.copy()
    features[missing] = 0
    return features


def _checked_teacher(name: str, teacher: Mapping, check_leading, caption_shape: tuple) -> dict:
    """A teacher's {"video": {e: [V, D]}, "text": {e: [V, K, D]}} with its shapes checked."""
    if set(teacher) != {"video", "text"}:
        raise FeatureStoreError(
            f"teacher_embeddings[{name!r}] must have keys 'video' and 'text', got {sorted(teacher)}"
        )
    if set(teacher["video"]) != set(teacher["text"]):
        raise FeatureStoreError(
            f"teacher_embeddings[{name!r}]: video and text must name the same experts, got "
            f"{sorted(teacher['video'])} and {sorted(teacher['text'])}"
        )
    video, text = {}, {}
    for expert in sorted(teacher["video"]):
        video_embedding = _as_float_storage(teacher["video"][expert], f"teacher {name!r} video {expert!r}")
        text_embedding = _as_float_storage(teacher["text"][expert], f"teacher {name!r} text {expert!r}")
        if video_embedding.ndim != 2:
            raise FeatureStoreError(
                f"teacher_embeddings[{name!r}]['video'][{expert!r}]: expected [V, D], got {video_embedding.shape}"
            )
        check_leading(video_embedding, f"teacher_embeddings[{name!r}]['video'][{expert!r}]")
        check_leading(
            text_embedding,
            f"teacher_embeddings[{name!r}]['text'][{expert!r}]",
            trailing=caption_shape + (video_embedding.shape[1],),
        )
        video[expert], text[expert] = video_embedding, text_embedding
    return {"video": video, "text": text}
