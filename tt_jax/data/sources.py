"""From a run's `config.data` to its train / val / test FeatureStores.

`config.data.source` names where the features come from: "synthetic" generates them from
`config.data.synthetic` (keyword arguments of `make_synthetic_dataset`); "release" reads
`config.data.dataset` of the feature releases from `config.data.data_dir` (tt_jax/data/release.py);
"tfds" reads the same data from its prepared copy in `config.data.tfds_dir` (tt_jax/data/prepared.py).
Stores are cached per process, so the runs of a pipeline (teachers, students, seeds) share one
copy in host memory: a release recipe loads every text embedding and teacher file its runs read
(`data.text_embeddings`, `data.teachers`) once.
"""

from __future__ import annotations

import functools
import inspect
import json
from typing import Any

from tt_jax.data.feature_store import FeatureStore
from tt_jax.data.release import ReleaseRequest, read_release
from tt_jax.data.synthetic import make_synthetic_dataset
from tt_jax.errors import UserInputError
from tt_jax.models.config import as_model_config

SOURCES = ("synthetic", "release", "tfds")


class DataConfigError(UserInputError):
    """A `config.data` that names no dataset this package can load."""


def _plain(value: Any) -> Any:
    """ConfigDicts and tuples as JSON-able dicts and lists (a hashable cache key once dumped)."""
    if hasattr(value, "to_dict"):
        value = value.to_dict()
    return json.loads(json.dumps(value, sort_keys=True, default=list))


@functools.lru_cache(maxsize=4)
def _synthetic(shape_json: str, parameters_json: str) -> dict[str, FeatureStore]:
    return make_synthetic_dataset(json.loads(shape_json), **json.loads(parameters_json))


def _synthetic_stores(data_config: Any, model_config: Any) -> dict[str, FeatureStore]:
    parameters = _plain(data_config.get("synthetic", {}))
    accepted = set(inspect.signature(make_synthetic_dataset).parameters) - {"model_config_like"}
    unknown = sorted(set(parameters) - accepted)
    if unknown:
        raise DataConfigError(
            f"config.data.synthetic has unknown keys {unknown}; valid keys are {sorted(accepted)}"
        )
    # Only the experts and the caption length shape the generated features (each text embedding
    # has its own dim): teachers and students of one config read the same cached dataset.
    shape = {
        "experts": _plain(model_config["experts"]),
        "text_dim": 1,
        "text_vlad_clusters": 1,
        "text_max_tokens": int(model_config["text_max_tokens"]),
    }
    return _synthetic(json.dumps(shape, sort_keys=True), json.dumps(parameters, sort_keys=True))


def release_request(data_config: Any, model_config: Any) -> ReleaseRequest:
    """What `config.data` (source "release" or "tfds") asks of a release, for a model with
    `model_config`'s experts and text length: every text embedding of `data.text_embeddings`
    (default: `data.text_embedding`) and the teacher files of `data.teachers`."""
    if not data_config.get("dataset"):
        raise DataConfigError(f"config.data.source is {data_config.get('source')!r} but config.data.dataset names no dataset")
    text_names = list(data_config.get("text_embeddings") or ()) or [data_config["text_embedding"]]
    if data_config["text_embedding"] not in text_names:
        text_names.append(data_config["text_embedding"])
    model = as_model_config(model_config)
    return ReleaseRequest(
        dataset=data_config["dataset"],
        data_dir=str(data_config["data_dir"]),
        experts=model.experts,
        text_max_tokens={name: model.text_max_tokens for name in sorted(text_names)},
        split=data_config.get("split") or None,
        root_feat_folder=data_config.get("root_feat_folder") or None,
        precomputed_teachers=tuple(sorted(data_config.get("teachers") or ())),
        denoising=data_config.get("denoising") or None,
        feature_dtype=data_config.get("feature_dtype", "float32"),
        expert_files=_plain(data_config.get("expert_files") or {}),
    )


@functools.lru_cache(maxsize=1)  # a release can take most of host memory: keep one
def _release(request_json: str, tfds_dir: str) -> dict[str, FeatureStore]:
    request = ReleaseRequest.from_json(request_json)
    if tfds_dir:
        from tt_jax.data.prepared import load_prepared  # needs the optional tfds extra

        return load_prepared(request, tfds_dir)
    return read_release(request)


def load_splits(data_config: Any, model_config: Any) -> dict[str, FeatureStore]:
    """{split name: FeatureStore} for `config.data`; `model_config` says which experts to read."""
    source = data_config.get("source", "synthetic")
    if source == "synthetic":
        return _synthetic_stores(data_config, model_config)
    if source == "release":
        return _release(release_request(data_config, model_config).to_json(), "")
    if source == "tfds":
        if not data_config.get("tfds_dir"):
            raise DataConfigError("config.data.source is 'tfds' but config.data.tfds_dir names no folder")
        return _release(release_request(data_config, model_config).to_json(), str(data_config["tfds_dir"]))
    raise DataConfigError(f"config.data.source {source!r} is not one of {list(SOURCES)}")
