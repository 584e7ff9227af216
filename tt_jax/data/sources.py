"""From a run's `config.data` to its train / val / test FeatureStores.

`config.data.source` names where the features come from: "synthetic" generates them from
`config.data.synthetic` (keyword arguments of `make_synthetic_dataset`); "release" reads
`config.data.dataset` of the feature releases from `config.data.data_dir` (tt_jax/data/release.py);
"tfds" reads the same data from its prepared copy in `config.data.tfds_dir` (tt_jax/data/prepared.py).
What to load is derived from the models that read the data (`DataNeeds`): the union of their
video experts, each text embedding at the longest length any of them reads (each model is then
fed its own length), and the precomputed teacher files. The recipe loads the needs of all its
runs once and hands the same stores to every run (tt_jax.pipeline).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
from typing import Any, Iterable, Mapping, Sequence

from tt_jax.data.feature_store import FeatureStore
from tt_jax.data.release import ReleaseRequest, read_release
from tt_jax.data.release_layout import DATASETS
from tt_jax.data.synthetic import make_synthetic_dataset
from tt_jax.errors import UserInputError
from tt_jax.models.config import ExpertConfig, as_model_config

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


@dataclasses.dataclass(frozen=True)
class DataNeeds:
    """What the models of a run (or of a recipe) read from the data."""

    experts: tuple[ExpertConfig, ...]  # sorted by name
    text_max_tokens: dict[str, int]  # {text embedding: the longest token count any model reads}
    precomputed_teachers: tuple[str, ...] = ()  # release teacher files, by text embedding

    @classmethod
    def of(cls, readers: Iterable[tuple[Any, str]], precomputed_teachers: Sequence[str] = ()) -> "DataNeeds":
        """The needs of models reading (model config, text embedding) pairs."""
        experts: dict[str, ExpertConfig] = {}
        lengths: dict[str, int] = {}
        for model_config, text_name in readers:
            model = as_model_config(model_config)
            for expert in model.experts:
                if experts.setdefault(expert.name, expert) != expert:
                    raise DataConfigError(
                        f"two models of the run read the expert {expert.name!r} differently ({experts[expert.name]} "
                        f"and {expert}); the data holds one copy of each expert"
                    )
            lengths[text_name] = max(lengths.get(text_name, 0), model.text_max_tokens)
        return cls(
            experts=tuple(sorted(experts.values(), key=lambda expert: expert.name)),
            text_max_tokens=dict(sorted(lengths.items())),
            precomputed_teachers=tuple(sorted(set(precomputed_teachers))),
        )


def _synthetic_stores(data_config: Any, needs: DataNeeds) -> dict[str, FeatureStore]:
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
        "experts": [dataclasses.asdict(expert) for expert in needs.experts],
        "text_dim": 1,
        "text_vlad_clusters": 1,
        "text_max_tokens": max(needs.text_max_tokens.values()),
    }
    return _synthetic(json.dumps(shape, sort_keys=True), json.dumps(parameters, sort_keys=True))


def check_experts_in_data(data_config: Any, models: Mapping[str, Any]) -> None:
    """Every expert a model reads ({who: model config}, e.g. a TeachVideo teacher reading more
    experts than the student) must be one the dataset has: for a release (or its prepared copy),
    a file of its layout or of data.expert_files (synthetic data generates whatever experts the
    models read)."""
    if data_config.get("source") not in ("release", "tfds") or data_config.get("dataset") not in DATASETS:
        return  # synthetic data; an unknown dataset is reported by the reader
    layout = DATASETS[data_config["dataset"]]
    known = set(layout.expert_files) | set(_plain(data_config.get("expert_files") or {}))
    for who, model in models.items():
        unknown = [expert.name for expert in as_model_config(model).experts if expert.name not in known]
        if unknown:
            raise DataConfigError(
                f"{who} reads the experts {unknown}, which the {layout.name} release does not have; it has "
                f"{sorted(known)} (name a file for another expert with data.expert_files)"
            )


def release_request(data_config: Any, needs: DataNeeds) -> ReleaseRequest:
    """What `config.data` (source "release" or "tfds") asks of a release for `needs`."""
    if not data_config.get("dataset"):
        raise DataConfigError(f"config.data.source is {data_config.get('source')!r} but config.data.dataset names no dataset")
    return ReleaseRequest(
        dataset=data_config["dataset"],
        data_dir=str(data_config["data_dir"]),
        experts=needs.experts,
        text_max_tokens=dict(needs.text_max_tokens),
        split=data_config.get("split") or None,
        root_feat_folder=data_config.get("root_feat_folder") or None,
        precomputed_teachers=needs.precomputed_teachers,
        denoising=data_config.get("denoising") or None,
        feature_dtype=data_config.get("feature_dtype", "float32"),
        expert_files=_plain(data_config.get("expert_files") or {}),
    )


def _release(request: ReleaseRequest, tfds_dir: str) -> dict[str, FeatureStore]:
    if tfds_dir:
        from tt_jax.data.prepared import load_prepared  # needs the optional tfds extra

        return load_prepared(request, tfds_dir)
    return read_release(request)


def load_splits(data_config: Any, needs: DataNeeds) -> dict[str, FeatureStore]:
    """{split name: FeatureStore} of `config.data`, holding what `needs` asks for.

    A release is read anew on every call (it can take most of host memory, so nothing keeps a
    copy behind the caller's back); synthetic data is small and cached.
    """
    source = data_config.get("source", "synthetic")
    if source == "synthetic":
        return _synthetic_stores(data_config, needs)
    if source == "release":
        return _release(release_request(data_config, needs), "")
    if source == "tfds":
        if not data_config.get("tfds_dir"):
            raise DataConfigError("config.data.source is 'tfds' but config.data.tfds_dir names no folder")
        return _release(release_request(data_config, needs), str(data_config["tfds_dir"]))
    raise DataConfigError(f"config.data.source {source!r} is not one of {list(SOURCES)}")
