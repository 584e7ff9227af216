"""From a run's `config.data` to its train / val / test FeatureStores.

`config.data.source` names where the features come from; "synthetic" generates them from
`config.data.synthetic` (keyword arguments of `make_synthetic_dataset`). Stores are cached per
process, so the runs of a pipeline (teachers, students, seeds) share one copy in host memory.
"""

from __future__ import annotations

import functools
import inspect
import json
from typing import Any

from tt_jax.data.feature_store import FeatureStore
from tt_jax.data.synthetic import make_synthetic_dataset
from tt_jax.errors import UserInputError

SOURCES = ("synthetic",)


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


def load_splits(data_config: Any, model_config: Any) -> dict[str, FeatureStore]:
    """{split name: FeatureStore} for `config.data`; `model_config` says which experts to generate."""
    source = data_config.get("source", "synthetic")
    if source == "synthetic":
        return _synthetic_stores(data_config, model_config)
    raise DataConfigError(f"config.data.source {source!r} is not one of {list(SOURCES)}")
