"""Reference config and state_dict conversion."""

from __future__ import annotations

import json
import sys

import jax
import numpy as np
import pytest

from reference_fixtures import MODEL, discover, subtree
from tt_jax import interop
from tt_jax.models import ExpertConfig, ModelConfig, build_model, init_variables
from tt_jax.models.config import ModelConfigError


def small_config() -> ModelConfig:
    return ModelConfig(
        experts=(ExpertConfig("rgb", 6), ExpertConfig("audio", 3, "vlad", 2, 4, True)),
        text_dim=5,
        text_vlad_clusters=2,
        text_ghost_clusters=1,
        text_max_tokens=3,
        shared_dim=4,
    )


def test_state_dict_round_trip_is_exact():
    config = small_config()
    variables = init_variables(build_model(config), jax.random.key(0))
    state_dict = interop.to_reference_state_dict(variables, config)
    assert state_dict["ce.moe_fc.weight"].shape == (2, 10)  # torch (out, in)
    assert state_dict["pooling.audio.batch_norm.num_batches_tracked"].dtype == np.int64
    back = interop.from_reference_state_dict(state_dict, config)
    jax.tree.map(np.testing.assert_array_equal, back, jax.tree.map(np.asarray, variables))


@pytest.mark.parametrize("fixture", discover(MODEL), ids=lambda f: f.name)
def test_name_table_covers_the_reference_state_dict_exactly(fixture):
    config = interop.model_config_from_reference(fixture.meta()["effective_config"])
    reference_names = set(subtree(fixture.arrays(), "params"))
    assert set(interop.reference_name_table(config)) == reference_names


def test_missing_and_unexpected_keys_are_listed():
    config = small_config()
    state_dict = interop.to_reference_state_dict(init_variables(build_model(config), jax.random.key(0)), config)
    del state_dict["ce.moe_fc.bias"]
    state_dict["ce.extra.weight"] = np.zeros(3)
    with pytest.raises(interop.StateDictError, match=r"1 missing.*ce\.moe_fc\.bias.*1 unexpected.*ce\.extra\.weight"):
        interop.from_reference_state_dict(state_dict, config)


def test_shape_mismatch_names_the_parameter():
    config = small_config()
    state_dict = interop.to_reference_state_dict(init_variables(build_model(config), jax.random.key(0)), config)
    state_dict["ce.text_GU.0.fc.weight"] = np.zeros((4, 11), np.float32)
    with pytest.raises(interop.StateDictError, match=r"ce\.text_GU\.0\.fc\.weight: expected shape \(4, 10\)"):
        interop.from_reference_state_dict(state_dict, config)


def test_inheritance_merges_dicts_and_replaces_lists(tmp_path):
    configs = tmp_path / "configs"
    (configs / "ds").mkdir(parents=True)
    (configs / "base.json").write_text(json.dumps({"experts": {"modalities": ["a", "b"], "text_feat": "w2v"}, "arch": {"args": {"x": 1, "y": 2}}}))
    (configs / "ds" / "child.json").write_text(json.dumps({"inherit_from": "configs/base.json", "experts": {"modalities": ["c"]}, "arch": {"args": {"y": 3}}}))
    merged = interop.load_reference_config(configs / "ds" / "child.json")
    assert merged == {"experts": {"modalities": ["c"], "text_feat": "w2v"}, "arch": {"args": {"x": 1, "y": 3}}}


def test_missing_reference_config_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        interop.load_reference_config(tmp_path / "nope.json")


def test_unrecognised_config_lists_what_was_expected():
    with pytest.raises(ModelConfigError, match="not a reference config"):
        interop.model_config_from_reference({"foo": 1})


def test_effective_config_gives_fixture_dimensions():
    fixture = next((f for f in discover(MODEL) if f.name == "msrvtt_ce_plus_small"), None)
    if fixture is None:
        pytest.skip("the fixture folder holds no msrvtt_ce_plus_small, whose values this test states")
    reference = fixture.meta()["effective_config"]
    config = interop.model_config_from_reference(reference)
    assert config.expert_names == tuple(reference["expert_order"])
    for name, (pooled_dim, shared_dim) in reference["expert_dims_in_out"].items():
        assert config.expert(name).pooled_dim == pooled_dim
        assert config.embedding_dim(config.expert(name)) == shared_dim
    hyper = interop.training_hyperparameters_from_reference(reference)
    assert hyper["margin"] == 0.09381161988446174
    assert (hyper["optimizer"], hyper["learning_rate"], hyper["weight_decay"]) == ("radam", 0.001, 1e-05)
    assert hyper["distillation"] and len(hyper["teachers"]) == 3


def test_unsupported_reference_options_are_refused():
    """num_h_layers != 0 is refused for CE (collaborative gating) configs."""
    ce_references = [
        f.meta()["effective_config"]
        for f in discover(MODEL)
        if f.meta()["effective_config"]["arch_args"].get("use_ce") == "pairwise"
    ]
    if not ce_references:
        pytest.skip("no collaborative-gating model fixture in the fixture folder")
    reference = ce_references[0]
    reference = dict(reference, arch_args=dict(reference["arch_args"], num_h_layers=2))
    with pytest.raises(ModelConfigError, match="num_h_layers=2"):
        interop.model_config_from_reference(reference)


def test_reading_a_checkpoint_without_torch_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now fails, installed or not
    path = tmp_path / "model.pth"
    path.write_bytes(b"not really")
    with pytest.raises(ImportError, match=r"pip install 'tt_jax\[torch\]'"):
        interop.load_reference_checkpoint(path)
