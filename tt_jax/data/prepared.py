"""A release converted once into a TensorFlow Datasets ArrayRecord dataset, and read back.

    python -m tt_jax.prepare --config configs/activitynet.py --config.data_dir=/data --tfds_dir=/shared/tfds
    python -m tt_jax.main --config configs/activitynet.py --config.data.source=tfds --config.data.tfds_dir=/shared/tfds

Why: on a pod every host would otherwise read and convert the release pickles. The prepared copy
on shared storage is converted once, versioned (`<tfds_dir>/tt_release/<name>/<version>/`, the
name saying which dataset, split and a hash of what was asked for), sharded into ArrayRecord files
that every host reads with random access and without TensorFlow, and checksummed: sha256 of every
file, checked before loading. Reading it gives the same FeatureStores as reading the release
(the tests compare every array and batch).

One example per video, in store row order (shuffling disabled): its experts and availability,
each text embedding's tokens and per-slot lengths, and, for training videos, the caption weights
and precomputed teacher embeddings (empty arrays elsewhere: one feature spec serves every split).
A split listed by the same file as another (ActivityNet's val1 is validation and test) is
written once. Each split is written as TFDS splits `<split>_partNNNN` of at most PART_BYTES
(see `_parts`), each sharded into ArrayRecord files; `tt_sizes.json` lists them with the sizes
loading preallocates.
"""

from __future__ import annotations

import functools
import hashlib
import json
import pathlib
from typing import Any, Optional

import numpy as np
from absl import logging

from tt_jax.data.feature_store import FeatureStore, TokenTable
from tt_jax.data.release import ReleaseRequest, read_release
from tt_jax.errors import UserInputError

NAME = "tt_release"
FORMAT_VERSION = "1.0.0"
CHECKSUMS_FILE = "tt_checksums.json"
SIZES_FILE = "tt_sizes.json"
PART_BYTES = 512 << 20  # rows of one TFDS split, at most (see _parts)
_READ_BLOCK = 128  # records decoded at a time when loading (ActivityNet: about 50 MB)


class PreparedDatasetError(UserInputError):
    """A prepared dataset that is absent, incomplete or altered; the message says what to run."""


def _tfds():
    try:
        import tensorflow_datasets as tfds  # noqa: PLC0415 (optional dependency)
    except ImportError as error:
        raise PreparedDatasetError(
            "prepared datasets need TensorFlow Datasets (not TensorFlow): pip install -e '.[tfds]'"
        ) from error
    return tfds


def config_name(request: ReleaseRequest) -> str:
    """`<dataset>-<split>-<hash>`: the hash covers everything that shapes the arrays, not where
    the release lies."""
    fields = json.loads(request.to_json())
    fields.pop("data_dir")
    digest = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:12]
    return f"{request.dataset}-{request.split or request.layout.default_split}-{digest}"


def prepared_dir(request: ReleaseRequest, tfds_dir) -> pathlib.Path:
    return pathlib.Path(tfds_dir) / NAME / config_name(request) / FORMAT_VERSION


def _parts(store: FeatureStore) -> list[tuple[int, int]]:
    """[(first row, end row)] of consecutive rows holding at most PART_BYTES each (at least one row).

    Why parts: TFDS's writer keeps a split in memory up to 1 GB and past that spills it through
    TensorFlow's file API, which the extra does not install; each part is a TFDS split of its own.
    """
    row_bytes = np.zeros(store.num_videos, np.int64)
    for features in store.experts.values():
        row_bytes += features[0].nbytes if store.num_videos else 0
    for table in store.text.values():
        row_bytes += table.lengths.sum(axis=1).astype(np.int64) * table.dim * table.tokens.itemsize
    for teacher in (store.teacher_embeddings or {}).values():
        for part in teacher.values():
            for array in part.values():
                row_bytes += array[0].nbytes
    part_of_row = (np.cumsum(row_bytes) - row_bytes) // PART_BYTES
    edges = np.flatnonzero(np.diff(part_of_row)) + 1
    bounds = [0, *edges.tolist(), store.num_videos]
    return list(zip(bounds[:-1], bounds[1:]))


def _part_name(split: str, index: int) -> str:
    return f"{split}_part{index:04d}"


def _splits(request: ReleaseRequest) -> dict[str, str]:
    """{split: split written}: "test" maps to "val" when the layout lists them in one file."""
    files = request.layout.splits[request.split or request.layout.default_split]
    return {"train": "train", "val": "val", "test": "val" if files.test == files.val else "test"}


def _features(tfds, stores: dict[str, FeatureStore]):
    train = stores["train"]
    float_type = next(iter(train.experts.values())).dtype if train.experts else np.float32

    def tensor(shape, dtype=float_type):
        return tfds.features.Tensor(shape=shape, dtype=dtype)

    teachers = train.teacher_embeddings or {}
    return tfds.features.FeaturesDict(
        {
            "video_id": tfds.features.Text(),
            "experts": {name: tensor(array.shape[1:]) for name, array in train.experts.items()},
            "availability": {name: tfds.features.Scalar(dtype=np.float32) for name in train.availability},
            "text": {
                name: {"tokens": tensor((None, table.dim)), "lengths": tensor((None,), np.int32)}
                for name, table in train.text.items()
            },
            "caption_weights": tensor((None,), np.float64),
            "teachers": {
                name: {
                    "video": {e: tensor((None,)) for e in teacher["video"]},
                    "text": {e: tensor((None, array.shape[-1])) for e, array in teacher["text"].items()},
                }
                for name, teacher in teachers.items()
            },
        }
    )


def _examples(store: FeatureStore, rows: range, teacher_dims: dict):
    """(key, example) per video row of `rows`, in row order; teacher_dims: {teacher: {expert: D}}."""
    dtype = next(iter(store.text.values())).tokens.dtype
    for row in rows:
        video = store.video_ids[row]
        text = {}
        for name, table in store.text.items():
            starts, lengths = table.starts[row], table.lengths[row]
            tokens = [table.tokens[start : start + length] for start, length in zip(starts, lengths)]
            text[name] = {"tokens": np.concatenate(tokens), "lengths": lengths.astype(np.int32)}
        teachers = {}
        for name, dims in teacher_dims.items():
            stored = (store.teacher_embeddings or {}).get(name)
            teachers[name] = {  # empty outside the training split
                "video": {e: stored["video"][e][row] if stored else np.zeros(0, dtype) for e in dims},
                "text": {e: stored["text"][e][row] if stored else np.zeros((0, dim), dtype) for e, dim in dims.items()},
            }
        weights = store.caption_weights[row] if store.caption_weights is not None else np.zeros(0)
        yield row, {
            "video_id": video,
            "experts": {name: features[row] for name, features in store.experts.items()},
            "availability": {name: np.float32(present[row]) for name, present in store.availability.items()},
            "text": text,
            "caption_weights": np.asarray(weights, np.float64),
            "teachers": teachers,
        }


@functools.lru_cache(maxsize=1)
def _builder_class():
    tfds = _tfds()

    class TtRelease(tfds.core.GeneratorBasedBuilder):
        """One dataset of the feature releases as read by `read_release` for one request."""

        VERSION = tfds.core.Version(FORMAT_VERSION)
        RELEASE_NOTES = {FORMAT_VERSION: "Stores of tt_jax.data.release.read_release, one example per video."}

        def __init__(self, *, request: ReleaseRequest, **kwargs):
            self._request = request
            self._stores = None
            config = tfds.core.BuilderConfig(name=config_name(request), description=request.to_json())
            super().__init__(config=config, **kwargs)

        def release_stores(self) -> dict[str, FeatureStore]:
            if self._stores is None:
                self._stores = read_release(self._request)
            return self._stores

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self, features=_features(tfds, self.release_stores()), disable_shuffling=True
            )

        def _split_generators(self, dl_manager):
            del dl_manager
            stores = self.release_stores()
            teachers = stores["train"].teacher_embeddings or {}
            dims = {name: {e: a.shape[-1] for e, a in teacher["video"].items()} for name, teacher in teachers.items()}
            generators = {}
            for split in sorted(set(_splits(self._request).values())):
                for index, (start, end) in enumerate(_parts(stores[split])):
                    generators[_part_name(split, index)] = self._generate_examples(stores[split], range(start, end), dims)
            return generators

        def _generate_examples(self, store, rows, teacher_dims):
            return _examples(store, rows, teacher_dims)

    TtRelease.name = NAME
    return TtRelease


def _file_checksums(directory: pathlib.Path) -> dict[str, str]:
    sums = {}
    for path in sorted(directory.iterdir()):
        if path.is_file() and path.name != CHECKSUMS_FILE:
            digest = hashlib.sha256()
            with path.open("rb") as handle:
                for block in iter(lambda: handle.read(1 << 24), b""):
                    digest.update(block)
            sums[path.name] = digest.hexdigest()
    return sums


def prepare_release(request: ReleaseRequest, tfds_dir, *, num_shards: Optional[int] = None) -> pathlib.Path:
    """Converts the release of `request` into `<tfds_dir>/tt_release/...` (skipped when done) and
    returns the prepared folder. num_shards: ArrayRecord files per part of a split (default: by
    size; at most the videos of the smallest part)."""
    tfds = _tfds()
    directory = prepared_dir(request, tfds_dir)
    if (directory / CHECKSUMS_FILE).is_file():
        return directory
    builder = _builder_class()(request=request, data_dir=str(tfds_dir), file_format="array_record")
    written = set(_splits(request).values())
    if num_shards:  # TFDS needs at least one example per shard of every (part) split
        fewest_rows = min(end - start for split in written for start, end in _parts(builder.release_stores()[split]))
        if fewest_rows < num_shards:
            logging.info("%d shards asked for, but a part holds %d videos: writing %d", num_shards, fewest_rows, fewest_rows)
            num_shards = fewest_rows
    download_config = tfds.download.DownloadConfig(num_shards=num_shards) if num_shards else None
    builder.download_and_prepare(download_config=download_config)
    sizes = {split: size for split, size in _sizes(builder.release_stores()).items() if split in written}
    (directory / SIZES_FILE).write_text(json.dumps(sizes, indent=2, sort_keys=True) + "\n")
    (directory / CHECKSUMS_FILE).write_text(json.dumps(_file_checksums(directory), indent=2, sort_keys=True) + "\n")
    return directory


def _verified(directory: pathlib.Path, request: ReleaseRequest) -> None:
    if not (directory / CHECKSUMS_FILE).is_file():
        raise PreparedDatasetError(
            f"{directory} holds no finished prepared dataset of this request (dataset {request.dataset}, split "
            f"{request.split or request.layout.default_split}); prepare it with `python -m tt_jax.prepare` and the "
            "same config and --tfds_dir"
        )
    expected = json.loads((directory / CHECKSUMS_FILE).read_text())
    actual = _file_checksums(directory)
    changed = sorted(name for name in expected.keys() | actual.keys() if expected.get(name) != actual.get(name))
    if changed:
        raise PreparedDatasetError(
            f"{directory}: files changed, missing or added since preparation: {changed[:5]}; prepare the dataset "
            "again (delete the folder, then `python -m tt_jax.prepare`)"
        )


def _sizes(stores: dict[str, FeatureStore]) -> dict:
    """{split: {"videos", "tokens": {embedding: total}, "parts": [TFDS split names]}}: what
    loading reads and preallocates."""
    return {
        split: {
            "videos": store.num_videos,
            "tokens": {name: len(table.tokens) for name, table in store.text.items()},
            "parts": [_part_name(split, index) for index in range(len(_parts(store)))],
        }
        for split, store in stores.items()
    }


def _records(sources: list[Any]):
    """(row, record) of the parts in order, decoded _READ_BLOCK at a time."""
    row = 0
    for source in sources:
        for start in range(0, len(source), _READ_BLOCK):
            for record in source.__getitems__(list(range(start, min(start + _READ_BLOCK, len(source))))):
                yield row, record
                row += 1


def _store_from_records(sources: list[Any], sizes: dict) -> FeatureStore:
    """Rebuilds one FeatureStore from the records of a split's parts (in row order), block by
    block into preallocated arrays, so the decoded records are never held all at once."""
    count = sizes["videos"]
    if sum(len(source) for source in sources) != count:
        raise PreparedDatasetError(
            f"a prepared split holds {sum(len(s) for s in sources)} videos, its sizes file says {count}"
        )
    first = sources[0][0]
    experts = {name: np.empty((count,) + np.shape(value), np.asarray(value).dtype) for name, value in first["experts"].items()}
    availability = {name: np.empty(count, np.float32) for name in first["availability"]}
    tokens = {
        name: np.empty((sizes["tokens"][name], entry["tokens"].shape[1]), entry["tokens"].dtype)
        for name, entry in first["text"].items()
    }
    lengths = {name: np.empty((count, len(entry["lengths"])), np.int32) for name, entry in first["text"].items()}
    has_weights = len(first["caption_weights"]) > 0
    weights = np.empty((count, len(first["caption_weights"])), np.float64) if has_weights else None
    has_teachers = bool(first["teachers"]) and all(
        len(vector) for teacher in first["teachers"].values() for vector in teacher["video"].values()
    )
    teachers = None
    if has_teachers:
        teachers = {
            name: {part: {e: np.empty((count,) + np.shape(v), np.asarray(v).dtype) for e, v in teacher[part].items()}
                   for part in ("video", "text")}
            for name, teacher in first["teachers"].items()
        }
    video_ids, cursors = [], dict.fromkeys(tokens, 0)
    for row, record in _records(sources):
        video = record["video_id"]
        video_ids.append(video.decode() if isinstance(video, bytes) else video)
        for name in experts:
            experts[name][row] = record["experts"][name]
            availability[name][row] = record["availability"][name]
        for name, entry in record["text"].items():
            lengths[name][row] = entry["lengths"]
            tokens[name][cursors[name] : cursors[name] + len(entry["tokens"])] = entry["tokens"]
            cursors[name] += len(entry["tokens"])
        if has_weights:
            weights[row] = record["caption_weights"]
        for name, teacher in (teachers or {}).items():
            for part, arrays in teacher.items():
                for e in arrays:
                    arrays[e][row] = record["teachers"][name][part][e]
    text = {}
    for name, table_lengths in lengths.items():
        starts = (np.cumsum(table_lengths, axis=None) - table_lengths.ravel()).reshape(table_lengths.shape)
        text[name] = TokenTable(tokens=tokens[name], starts=starts, lengths=table_lengths)
    return FeatureStore(
        video_ids=video_ids, experts=experts, availability=availability, text=text,
        caption_weights=weights, teacher_embeddings=teachers,
    )


def load_prepared(request: ReleaseRequest, tfds_dir) -> dict[str, FeatureStore]:
    """{"train", "val", "test"}: the stores `read_release(request)` gives, from the prepared copy."""
    tfds = _tfds()
    directory = prepared_dir(request, tfds_dir)
    _verified(directory, request)
    sources = tfds.builder_from_directory(str(directory)).as_data_source()
    sizes = json.loads((directory / SIZES_FILE).read_text())
    stores = {
        written: _store_from_records([sources[part] for part in sizes[written]["parts"]], sizes[written])
        for written in set(_splits(request).values())
    }
    return {split: stores[written] for split, written in _splits(request).items()}
