"""Reading one dataset of the feature releases into train / val / test FeatureStores.

    stores = read_release(ReleaseRequest(dataset="activitynet", data_dir="data", experts=...,
                                         text_max_tokens={"gpt2-xl-finetune": 49}))

Every pickle goes through the restricted unpickler (`safe_pickle`), is read once, and is turned
into the stores' arrays entry by entry, each entry dropped from the unpickled dict once the last
split that needs it has its copy: peak memory stays near the size of the features kept, not
twice it. Splits listed by the same file (ActivityNet's val1 is validation and test) share one
store. Conventions follow the reference loaders (`teachtext_ce_spec.md` section 5):

* a fixed expert is [D] (or [1, D]) per video; a variable one [T, D], cut to its max_tokens and
  zero padded; the float `nan` (or an all-NaN array) marks a missing expert, allowed only for
  flaky experts, which may also leave a video out;
* a video's captions are its list of [n_tokens, D] arrays: training keeps all of them, evaluation
  the first `test_captions` (MSRVTT 20, MSVD 81, VaTeX 10); paragraph datasets (ActivityNet,
  DiDeMo, QuerYD) stack a video's sentences into one query, in order; tokens past a model's
  max_tokens are never read, so they are not kept;
* precomputed teachers and denoising masks cover training videos; a mask that removes every
  caption of a video drops that video (logged), as the reference never samples it.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import pathlib
from typing import Any, Mapping, Optional, Sequence

import numpy as np
from absl import logging

from tt_jax.data.feature_store import FeatureStore, TokenTable
from tt_jax.data.release_layout import (
    DATASETS,
    DENOISING,
    DENOISING_FOLDER,
    HICKLE_NOTE,
    TEACHER_FILES,
    TEACHER_FOLDER,
    DatasetLayout,
)
from tt_jax.data.safe_pickle import MissingFileError, load_pickle
from tt_jax.errors import UserInputError, list_some
from tt_jax.host_memory import return_freed_memory
from tt_jax.models.config import ExpertConfig

class ReleaseError(UserInputError):
    """Release files that do not hold what the layout and the config say; the message names the file."""


@dataclasses.dataclass(frozen=True)
class ReleaseRequest:
    """What a run needs from a release: which files to read and how to shape them.

    experts: the model's experts (name, input_dim, temporal, max_tokens, flaky).
    text_max_tokens: {text embedding: tokens kept per query} for every embedding to load.
    precomputed_teachers: text embeddings whose TeachText teacher pickle to load (TEACHER_FILES).
    denoising: None or a DENOISING key ("less100", "less80").
    expert_files: {expert: path under the feature root} replacing the layout's.
    """

    dataset: str
    data_dir: str
    experts: tuple[ExpertConfig, ...]
    text_max_tokens: Mapping[str, int]
    split: Optional[str] = None  # the layout's default when None
    root_feat_folder: Optional[str] = None  # the layout's when None
    precomputed_teachers: tuple[str, ...] = ()
    denoising: Optional[str] = None
    feature_dtype: str = "float32"
    expert_files: Mapping[str, str] = dataclasses.field(default_factory=dict)

    def to_json(self) -> str:
        """The request as canonical JSON (a cache key; `from_json` reads it back)."""
        fields = dataclasses.asdict(self)
        fields["experts"] = [dataclasses.asdict(expert) for expert in self.experts]
        return json.dumps(fields, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "ReleaseRequest":
        fields = json.loads(text)
        fields["experts"] = tuple(ExpertConfig(**expert) for expert in fields["experts"])
        fields["precomputed_teachers"] = tuple(fields["precomputed_teachers"])
        return cls(**fields)

    @property
    def layout(self) -> DatasetLayout:
        if self.dataset not in DATASETS:
            raise ReleaseError(f"unknown dataset {self.dataset!r}; the releases are {sorted(DATASETS)}")
        return DATASETS[self.dataset]

    @property
    def root(self) -> pathlib.Path:
        return pathlib.Path(self.data_dir) / self.layout.folder / (self.root_feat_folder or self.layout.root_feat_folder)


def _expected_layout(request: ReleaseRequest) -> str:
    layout = request.layout
    splits = layout.splits[request.split or layout.default_split]
    return (
        f"expected the {layout.name} release unpacked as {request.root}/ holding {splits.train}, "
        f"{splits.val}, {splits.test}, {layout.text_folder}/<embedding>.pkl and the expert pickles "
        f"(e.g. {next(iter(layout.expert_files.values()))}); set --config.data.data_dir to the folder "
        f"that holds {layout.folder}/"
    )


def _read_pickle(request: ReleaseRequest, relative: str) -> Any:
    if relative.endswith(".hickle"):
        raise ReleaseError(f"{request.root / relative} {HICKLE_NOTE}")
    try:
        return load_pickle(request.root / relative)
    except MissingFileError as error:
        raise ReleaseError(f"{error}; {_expected_layout(request)}") from None


def _read_list(request: ReleaseRequest, relative: str) -> list[str]:
    path = request.root / relative
    if not path.is_file():
        raise ReleaseError(f"split list {path} does not exist; {_expected_layout(request)}")
    ids = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if request.layout.strip_extension:
        ids = [line.split(".")[0] for line in ids]
    if not ids:
        raise ReleaseError(f"split list {path} is empty: a split needs at least one video")
    repeated = [i for i, count in collections.Counter(ids).items() if count > 1]
    if repeated:
        raise ReleaseError(f"split list {path} names videos more than once: {list_some(repeated)}")
    return ids


def _numeric(value: Any, path: pathlib.Path, what: str) -> np.ndarray:
    """`value` as a numeric array, or a ReleaseError naming the file and the entry."""
    array = np.asarray(value)
    if array.dtype.kind not in "biuf":
        raise ReleaseError(f"{path}: {what} should hold numbers, found {array.dtype} ({value!r:.60})")
    return array


def _as_mapping(table: Any, path: pathlib.Path, what: str) -> dict:
    if not isinstance(table, dict):
        raise ReleaseError(f"{path}: expected a dict of video id -> {what}, found a {type(table).__name__}")
    return table


class _Consumer:
    """Hands out a table's entries to the splits that need them; drops each entry after its last use."""

    TRIM_EVERY = 1 << 26  # bytes of dropped entries between two heap trims

    def __init__(self, table: dict, lists: Sequence[Sequence[str]]):
        self._table = table
        self._uses = collections.Counter(video for ids in lists for video in ids)
        self._dropped = 0

    def take(self, video: str, default: Any = None) -> Any:
        self._uses[video] -= 1
        if self._uses[video] > 0:
            return self._table.get(video, default)
        entry = self._table.pop(video, default)
        self._dropped += _nbytes(entry)
        if self._dropped >= self.TRIM_EVERY:  # the entry's memory is freed once its copy is made,
            self._dropped = 0  # i.e. before the next take: trimming here returns the earlier ones
            return_freed_memory()
        return entry


def _nbytes(entry: Any) -> int:
    if isinstance(entry, np.ndarray):
        return entry.nbytes
    if isinstance(entry, (list, tuple)):
        return sum(_nbytes(item) for item in entry)
    if isinstance(entry, dict):
        return sum(_nbytes(item) for item in entry.values())
    return 0


def _is_missing(value: Any) -> bool:
    """The release's mark of a missing expert: the float nan, or an array of nothing but NaN."""
    if isinstance(value, float):
        return np.isnan(value)
    array = np.asarray(value)
    return array.dtype.kind == "f" and array.size > 0 and bool(np.all(np.isnan(array)))


# -- experts --------------------------------------------------------------------------------------


def _expert_features(
    request: ReleaseRequest, expert: ExpertConfig, lists: Sequence[Sequence[str]], dtype: np.dtype
) -> list[tuple[np.ndarray, np.ndarray]]:
    """[(features [V, D] or [V, T, D], availability [V])] per list, from the expert's pickle."""
    relative = request.expert_files.get(expert.name) or request.layout.expert_files.get(expert.name)
    if relative is None:
        raise ReleaseError(
            f"the {request.layout.name} release has no file for expert {expert.name!r}; it has "
            f"{sorted(request.layout.expert_files)} (or name one with --config.data.expert_files)"
        )
    path = request.root / relative
    shipped = request.layout.expert_files.get(expert.name, "")
    if shipped.endswith(".hickle") and relative != shipped and not path.exists():
        raise ReleaseError(f"{path} does not exist: the release ships expert {expert.name!r} as {shipped}, which {HICKLE_NOTE}")
    table = _as_mapping(_read_pickle(request, relative), path, "feature array")
    absent = sorted({v for ids in lists for v in ids if v not in table})
    if absent and not expert.flaky:
        raise ReleaseError(
            f"{path} has no features for {len(absent)} videos of the split lists, {list_some(absent)}; "
            f"expert {expert.name!r} is not flaky, so every video needs it: check that the split lists "
            "and the feature files come from the same release"
        )
    consumer = _Consumer(table, lists)
    vlad = expert.temporal == "vlad"
    results = []
    for ids in lists:
        shape = (len(ids), expert.max_tokens, expert.input_dim) if vlad else (len(ids), expert.input_dim)
        features = np.zeros(shape, dtype)
        present = np.ones(len(ids), np.float32)
        not_allowed = []
        for row, video in enumerate(ids):
            value = consumer.take(video, default=np.nan)
            if _is_missing(value):
                present[row] = 0
                if not expert.flaky:
                    not_allowed.append(video)
                continue
            array = _numeric(value, path, f"video {video!r}")
            if not vlad and array.ndim == 2 and array.shape[0] == 1:
                array = array[0]  # a [1, D] vector broadcasts as [D] in the reference
            expected_dim_axis = 1 if vlad else 0
            if array.ndim != expected_dim_axis + 1 or array.shape[-1] != expert.input_dim:
                layout = f"[T, {expert.input_dim}]" if vlad else f"[{expert.input_dim}]"
                raise ReleaseError(
                    f"{path}: video {video!r} has features of shape {array.shape}, expected {layout} "
                    f"(expert {expert.name!r}, input_dim {expert.input_dim} in the config)"
                )
            if not np.all(np.isfinite(array)):
                raise ReleaseError(
                    f"{path}: video {video!r} has NaN/inf among its features; a missing expert is the "
                    "float nan, not a partly NaN array"
                )
            if vlad:
                array = array[: expert.max_tokens]
                features[row, : len(array)] = array
            else:
                features[row] = array
        if not_allowed:
            raise ReleaseError(
                f"{path}: expert {expert.name!r} is missing (nan) for videos {list_some(not_allowed)}, but it is "
                "not flaky; mark it flaky in the model config (the reference allows only audio, speech, ocr "
                "and face to be missing) or fix the file"
            )
        results.append((features, present))
    return results


# -- text -----------------------------------------------------------------------------------------


def _caption_lists(
    table: dict, path: pathlib.Path, ids: Sequence[str], consumer: _Consumer
) -> list[list[np.ndarray]]:
    """Each video's captions as a list of [n_tokens, D] arrays, checked."""
    absent = [video for video in ids if video not in table]
    if absent:
        raise ReleaseError(
            f"{path} has no captions for {len(absent)} videos of the split, {list_some(absent)}; check that the "
            "split lists and the text features come from the same release"
        )
    videos = []
    for video in ids:
        captions = consumer.take(video)
        if not isinstance(captions, (list, tuple)) or not captions:
            raise ReleaseError(f"{path}: video {video!r} should map to a non-empty list of captions, got {captions!r:.80}")
        arrays = [_numeric(caption, path, f"caption {k} of video {video!r}") for k, caption in enumerate(captions)]
        for index, array in enumerate(arrays):
            if array.ndim != 2:
                raise ReleaseError(
                    f"{path}: caption {index} of video {video!r} has shape {array.shape}; expected [n_tokens, D]"
                )
            if array.shape[0] == 0:
                raise ReleaseError(
                    f"{path}: caption {index} of video {video!r} has no tokens; every caption needs at least "
                    "one (regenerate the text features, or remove the video from the split)"
                )
        videos.append(arrays)
    return videos


def _token_table(
    videos: list[Optional[list[np.ndarray]]],
    *,
    path: pathlib.Path,
    fuse: bool,
    caption_slots: Optional[int],
    max_tokens: int,
    dtype: np.dtype,
) -> TokenTable:
    """Ragged tokens of `videos` ([captions of [n, D]] each): fused into one query per video or
    cut to `caption_slots` captions (None: keep all), each query cut to `max_tokens`.

    Consumes `videos`: each entry is released once copied, so the caption arrays and the table
    are not both held in full.
    """
    dims = {array.shape[1] for captions in videos for array in captions}
    if len(dims) != 1:
        raise ReleaseError(f"{path}: token features of different dimensions {sorted(dims)}; expected one D")
    (dim,) = dims
    if fuse:  # the paragraph: every sentence in order, as one query (np.vstack in the reference)
        counts = [[min(sum(len(a) for a in captions), max_tokens)] for captions in videos]
    else:
        keep = caption_slots if caption_slots is not None else max(len(captions) for captions in videos)
        counts = [[min(len(a), max_tokens) for a in captions[:keep]] for captions in videos]
    slots = max(len(c) for c in counts)
    lengths = np.zeros((len(videos), slots), np.int32)
    for row, video_counts in enumerate(counts):
        lengths[row, : len(video_counts)] = video_counts
    tokens = np.empty((int(lengths.sum()), dim), dtype)  # pages are committed as they are written
    cursor = freed = 0
    for row, video_counts in enumerate(counts):
        captions, videos[row] = videos[row], None
        freed += _nbytes(captions)
        if freed >= _Consumer.TRIM_EVERY:  # the previous videos' arrays are free by now
            freed = 0
            return_freed_memory()
        queries = [np.concatenate(captions)] if fuse else captions
        for query, count in zip(queries, video_counts):
            part = query[:count]
            if not np.all(np.isfinite(part)):
                raise ReleaseError(f"{path}: NaN/inf among the token features (row {row} of the split); the file is damaged")
            tokens[cursor : cursor + count] = part
            cursor += count
    starts = (np.cumsum(lengths, axis=None) - lengths.ravel()).reshape(lengths.shape)
    return TokenTable(tokens=tokens, starts=starts, lengths=lengths)


def _caption_index(index: Mapping, video: str, captions: int, path: pathlib.Path) -> int:
    """The caption MSRVTT 1k-A queries `video` with, checked against its caption count."""
    if video not in index:
        raise ReleaseError(f"{path} has no caption index for test video {video!r}")
    value = index[video]
    if not isinstance(value, (int, np.integer)) or not 0 <= int(value) < captions:
        raise ReleaseError(f"{path}: test video {video!r} has caption index {value!r}, but {captions} captions")
    return int(value)


# -- teachers and denoising -----------------------------------------------------------------------


def _teacher_embeddings(
    request: ReleaseRequest, embedding: str, train_ids: Sequence[str], caption_slots: int, dtype: np.dtype
) -> dict:
    """{"video": {expert: [V, D]}, "text": {expert: [V, K, D]}} of one TeachText teacher file."""
    if embedding not in TEACHER_FILES:
        raise ReleaseError(f"no TeachText teacher reads {embedding!r}; the release has {sorted(TEACHER_FILES)}")
    relative = f"{TEACHER_FOLDER}/{TEACHER_FILES[embedding]}"
    path = request.root / relative
    table = _as_mapping(_read_pickle(request, relative), path, '{"vid_embds", "text_embds"}')
    absent = [video for video in train_ids if video not in table]
    if absent:
        raise ReleaseError(
            f"teacher file {path} lacks {len(absent)} training videos, {list_some(absent)}; a precomputed teacher "
            "must cover every training video (or train live teachers instead)"
        )
    consumer = _Consumer(table, [train_ids])
    video: dict[str, np.ndarray] = {}
    text: dict[str, np.ndarray] = {}
    for row, video_id in enumerate(train_ids):
        entry = consumer.take(video_id)
        layout_ok = isinstance(entry, dict) and all(isinstance(entry.get(k), dict) for k in ("vid_embds", "text_embds"))
        if not layout_ok:
            raise ReleaseError(
                f"{path}: video {video_id!r} should map to {{'vid_embds': {{expert: [D]}}, 'text_embds': {{expert: [K, D]}}}}"
            )
        if row == 0:
            for expert, vector in entry["vid_embds"].items():
                dim = _numeric(vector, path, f"video {video_id!r}, expert {expert!r}").size
                video[expert] = np.zeros((len(train_ids), dim), dtype)
                text[expert] = np.zeros((len(train_ids), caption_slots, dim), dtype)
        if set(entry["vid_embds"]) != set(video) or set(entry["text_embds"]) != set(video):
            raise ReleaseError(f"{path}: video {video_id!r} names experts other than {sorted(video)}")
        for expert, row_video in video.items():
            what = f"video {video_id!r}, expert {expert!r}"
            vector = _numeric(entry["vid_embds"][expert], path, what).reshape(-1)
            captions = _numeric(entry["text_embds"][expert], path, what)
            dim = row_video.shape[1]
            if vector.shape != (dim,) or captions.ndim not in (1, 2) or captions.shape[-1] != dim:
                raise ReleaseError(
                    f"{path}: {what} has embeddings of shapes {vector.shape} and {captions.shape}, expected [{dim}] "
                    f"and [captions, {dim}]"
                )
            row_video[row] = vector
            captions = captions.reshape(-1, dim)[:caption_slots]
            text[expert][row, : len(captions)] = captions
    return {"video": video, "text": text}


def _denoising_weights(request: ReleaseRequest, train_ids: Sequence[str]) -> tuple[list[str], dict]:
    """(train ids kept, {video: [n_captions] 0/1}): videos whose mask removes every caption are dropped."""
    mask_file, _ = DENOISING[request.denoising]
    relative = f"{DENOISING_FOLDER}/{mask_file}"
    path = request.root / relative
    table = _as_mapping(_read_pickle(request, relative), path, "0/1 caption mask")
    absent = [video for video in train_ids if video not in table]
    if absent:
        raise ReleaseError(f"denoising mask {path} has no entry for training videos {list_some(absent)}")
    masks = {video: _numeric(table[video], path, f"the mask of video {video!r}").astype(np.float64).reshape(-1)
             for video in train_ids}
    for video, mask in masks.items():
        if not np.all((mask == 0) | (mask == 1)):
            raise ReleaseError(f"denoising mask {path}: video {video!r} has values other than 0 and 1")
    dropped = [video for video in train_ids if not masks[video].any()]
    if dropped:
        logging.warning(
            "denoising mask %s removes every caption of %d training videos; they are left out of training: %s",
            path, len(dropped), list_some(dropped),
        )
    kept = [video for video in train_ids if masks[video].any()]
    if not kept:
        raise ReleaseError(f"denoising mask {path} removes every caption of every training video")
    return kept, masks


def _caption_weights(masks: Mapping[str, np.ndarray], ids: Sequence[str], table: TokenTable, path) -> np.ndarray:
    weights = np.zeros(table.lengths.shape, np.float64)
    for row, video in enumerate(ids):
        mask = masks[video]
        captions = int((table.lengths[row] > 0).sum())
        if len(mask) != captions:
            raise ReleaseError(
                f"denoising mask {path}: video {video!r} has {len(mask)} entries for {captions} captions"
            )
        weights[row, :captions] = mask
    return weights


# -- the whole release ----------------------------------------------------------------------------


def read_release(request: ReleaseRequest) -> dict[str, FeatureStore]:
    """{"train", "val", "test"}: FeatureStore of `request` (splits listed by one file share a store)."""
    layout = request.layout
    split = request.split or layout.default_split
    if split not in layout.splits:
        raise ReleaseError(f"the {layout.name} release has splits {list(layout.splits)}, not {split!r}")
    if request.feature_dtype not in ("float32", "float16"):
        raise ReleaseError(f"feature_dtype must be float32 or float16, got {request.feature_dtype!r}")
    if not request.root.is_dir():
        raise ReleaseError(f"{request.root} is not a directory; {_expected_layout(request)}")
    if request.denoising is not None and request.denoising not in DENOISING:
        raise ReleaseError(f"unknown denoising {request.denoising!r}; choose one of {sorted(DENOISING)}")
    if request.denoising is not None and layout.fuse_captions:
        raise ReleaseError(
            f"denoising masks weigh a video's captions, but {layout.name} fuses them into one query "
            "(the reference ignores caption_masks there); leave out less100 / less80"
        )
    dtype = np.dtype(request.feature_dtype)
    files = layout.splits[split]
    _, denoised_list = DENOISING.get(request.denoising, (None, None))
    train_list = f"{DENOISING_FOLDER}/{denoised_list}" if denoised_list else files.train
    list_of = {"train": train_list, "val": files.val, "test": files.test}
    unique_files = list(dict.fromkeys(list_of.values()))
    ids = {file: _read_list(request, file) for file in unique_files}
    masks = None
    if request.denoising is not None:
        ids[train_list], masks = _denoising_weights(request, ids[train_list])
    lists = [ids[file] for file in unique_files]

    experts = {file: {} for file in unique_files}
    availability = {file: {} for file in unique_files}
    for expert in request.experts:
        for file, (features, present) in zip(unique_files, _expert_features(request, expert, lists, dtype)):
            experts[file][expert.name], availability[file][expert.name] = features, present
        return_freed_memory()

    caption_index = None
    if files.test_caption_index is not None:
        caption_index = _as_mapping(
            _read_pickle(request, files.test_caption_index), request.root / files.test_caption_index, "caption index"
        )
    text = {file: {} for file in unique_files}
    for embedding, max_tokens in sorted(request.text_max_tokens.items()):
        if layout.name == "msvd" and embedding == "openai":
            raise ReleaseError(
                "MSVD's openai text features are keyed by YouTube id (openai-caption-*.pkl through "
                "dict_youtube_mapping.pkl), which this reader does not map; use the w2v or gpt2-xl features"
            )
        table = {}
        relatives = layout.text_files.get(embedding, (f"{layout.text_folder}/{embedding}.pkl",))
        for relative in relatives:
            part = _as_mapping(_read_pickle(request, relative), request.root / relative, "list of caption token arrays")
            repeated = [video for video in part if video in table]
            if repeated:
                raise ReleaseError(f"{request.root / relative} repeats videos of {relatives[0]}: {list_some(repeated)}")
            table.update(part)
            del part
        # Messages name the file, or every file of a merged table.
        path = request.root / relatives[0] if len(relatives) == 1 else f"{request.root}/{{{', '.join(relatives)}}}"
        consumer = _Consumer(table, lists)
        for file in unique_files:
            videos = _caption_lists(table, path, ids[file], consumer)
            is_train = file == train_list
            slots = None if is_train else layout.test_captions
            if caption_index is not None and file == files.test and not is_train:
                videos = [
                    [captions[_caption_index(caption_index, video, len(captions), request.root / files.test_caption_index)]]
                    for video, captions in zip(ids[file], videos)
                ]
                slots = 1
            text[file][embedding] = _token_table(
                videos, path=path, fuse=layout.fuse_captions, caption_slots=slots, max_tokens=max_tokens, dtype=dtype
            )
            del videos
        del table, consumer
        return_freed_memory()

    stores = {}
    for file in unique_files:
        is_train = file == train_list
        first_table = next(iter(text[file].values()), None)
        weights = teachers = None
        if is_train and masks is not None and first_table is not None:
            weights = _caption_weights(masks, ids[file], first_table, request.root / DENOISING_FOLDER)
        if is_train and request.precomputed_teachers:
            slots = first_table.max_captions if first_table is not None else 1
            teachers = {
                embedding: _teacher_embeddings(request, embedding, ids[file], slots, dtype)
                for embedding in request.precomputed_teachers
            }
        stores[file] = FeatureStore(
            video_ids=ids[file],
            experts=experts.pop(file),
            availability=availability.pop(file),
            text=text.pop(file),
            caption_weights=weights,
            teacher_embeddings=teachers,
        )
    return {split_name: stores[file] for split_name, file in list_of.items()}


def read_raw_captions(request: ReleaseRequest, video_ids: Sequence[str]) -> dict[str, list[str]]:
    """{video id: every caption of the video as text}, from the release's raw captions (lists of
    words), e.g. to show what a query said. They are the video's captions in release order: the
    caption slots of a training split; an evaluation split keeps the first `test_captions` (MSRVTT
    1k-A the indexed one), and paragraph datasets join them into one query."""
    relative = request.layout.raw_captions
    path = request.root / relative
    table = _as_mapping(_read_pickle(request, relative), path, "list of captions (lists of words)")
    absent = [video for video in video_ids if video not in table]
    if absent:
        raise ReleaseError(f"{path} has no captions for videos {list_some(absent)}")
    return {video: [" ".join(words) if not isinstance(words, str) else words for words in table[video]] for video in video_ids}
