"""The config: one teacher list with one validator, what a run loads derived from it, and a run's
identity covering every key that changes what is trained."""

from __future__ import annotations

import ml_collections
import numpy as np
import pytest

from test_train import tiny_config
from tt_jax import config as config_module
from tt_jax.config import RESTARTABLE_KEYS, ConfigError, check_config, identity_differences, run_identity
from tt_jax.data.sources import release_request
from tt_jax.distillation import DistillationConfigError, distillation_terms
from tt_jax.teachers import model_text
from tt_jax.models import as_model_config
from tt_jax.train import data_needs, run_stores


def leaf_keys(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    keys = []
    for key in config.keys():
        value = config[key]
        path = f"{prefix}{key}"
        if isinstance(value, ml_collections.ConfigDict) and path not in ("model", "data.synthetic", "data.expert_files"):
            keys += leaf_keys(value, path + ".")
        else:
            keys.append(path)
    return keys


def changed(value):
    """A different value of the same kind."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value * 2 + 1
    if isinstance(value, str):
        return value + "_other"
    if isinstance(value, (tuple, list)):
        return type(value)([*value, value[0] if value else "x"])
    if isinstance(value, ml_collections.ConfigDict) or isinstance(value, dict):
        return {**dict(value), "changed": 1}
    raise AssertionError(f"no changed value for {value!r}")


def with_value(config, dotted: str, value):
    config = ml_collections.ConfigDict(config.to_dict())
    *parents, leaf = dotted.split(".")
    node = config
    for parent in parents:
        node = node[parent]
    with config.unlocked():
        node[leaf] = value
    return config


def distilled_config():
    config = check_config(tiny_config())
    with config.unlocked():
        config.teachers = [dict(name="teacher_rich", source="run", text_embedding="rich", path="/runs/teacher")]
    return check_config(config)


def test_every_key_but_the_restartable_ones_changes_the_identity():
    """Any key of the schema, present or added later, is part of the identity unless it is listed
    as restartable or belongs to the recipe around the runs."""
    base = distilled_config()
    keys = [key for key in leaf_keys(base) if key.split(".")[0] not in config_module.RECIPE_KEYS]
    assert {"distillation.terms", "train.margin",
            "train.learning_rate", "train.weight_decay", "train.lr_decay_gamma", "data.dataset", "data.split",
            "data.denoising", "data.source", "data.feature_dtype", "model", "teachers"} <= set(keys)
    for key in keys:
        value = base[key] if "." not in key else eval(f"base.{key}")
        if key == "teachers":  # the same teacher reading another embedding
            value = [dict(base.teachers[0], text_embedding="poor")]
        elif key == "distillation.terms":  # the same method with another setting
            value = [dict(method="teachtext", delta=2.0)]
        elif key == "denoising.max_rank":  # unset by default: denoising on
            value = 5
        elif key == "model":  # another architecture
            value = {**base.model.to_dict(), "shared_dim": base.model.shared_dim + 1}
        else:
            value = changed(value)
        other = with_value(base, key, value)
        if key in RESTARTABLE_KEYS:
            assert run_identity(other) == run_identity(base), key
        else:
            assert run_identity(other) != run_identity(base), key


def test_a_mismatch_names_each_differing_key_with_its_old_and_new_value():
    base = distilled_config()
    other = with_value(with_value(base, "train.margin", 0.5), "distillation.terms", [dict(method="teachtext", distance="l1")])
    message = identity_differences(run_identity(base), run_identity(other))
    assert f"train.margin ({base.train.margin!r} -> 0.5)" in message
    assert "distillation.terms[0].distance ('huber' -> 'l1')" in message
    assert "learning_rate" not in message


def test_the_identity_is_of_the_resolved_model_and_tolerates_settings_added_later():
    base = distilled_config()
    explicit = with_value(base, "model.use_mish", True)  # the default, now written out
    assert identity_differences(run_identity(base), run_identity(explicit)) == ""
    saved = dict(run_identity(base))
    del saved["model.use_mish"], saved["train.margin"]  # as if saved before these keys existed
    del saved["distillation.terms[0].delta"], saved["distillation.terms[0].schedule.unit"]  # a term's too
    assert identity_differences(saved, run_identity(base)) == ""
    assert "train.margin" in identity_differences(saved, run_identity(with_value(base, "train.margin", 0.5)))


def test_precomputed_teachers_and_a_teachers_source_are_part_of_the_identity():
    base = distilled_config()
    precomputed = with_value(base, "teachers", [dict(name="teacher_rich", source="precomputed", text_embedding="rich")])
    assert run_identity(precomputed) != run_identity(base)
    assert "teachers[0].source ('run' -> 'precomputed')" in identity_differences(run_identity(base), run_identity(precomputed))


def test_a_recipe_teacher_is_identified_by_its_entry_not_where_the_recipe_keeps_it():
    base = check_config(tiny_config())
    entry = dict(base.teachers[0])
    here = with_value(base, "teachers", [dict(entry, path="/a/teachers/teacher_rich")])
    moved = with_value(base, "teachers", [dict(entry, path="/b/teachers/teacher_rich")])
    assert run_identity(here) == run_identity(moved)
    wider = with_value(base, "teachers", [dict(entry, model_changes={"text_dim": 8, "shared_dim": 16})])
    assert run_identity(wider) != run_identity(here)


def test_the_distillation_terms_are_identified_with_every_setting_resolved():
    base = distilled_config()
    explicit = with_value(base, "distillation.terms", [dict(method="teachtext", weight=1.0, delta=1.0, schedule=dict(kind="none"))])
    assert run_identity(explicit) == run_identity(base)
    renamed = with_value(base, "distillation.terms", [dict(method="teachtext", name="tt")])  # only the logs' label
    assert run_identity(renamed) == run_identity(base)
    scheduled = with_value(base, "distillation.terms", [dict(method="teachtext", schedule=dict(kind="exp"))])
    assert "distillation.terms[0].schedule.kind ('none' -> 'exp')" in identity_differences(run_identity(base), run_identity(scheduled))
    baseline = check_config(tiny_config("baseline"))  # no teachers: the student's own terms still count
    assert run_identity(with_value(baseline, "distillation.terms", [dict(method="caption")])) != run_identity(baseline)


@pytest.mark.parametrize(
    "entry, message",
    [
        (dict(name="t", source="run", text_embedding="rich"), r"lacks \['path'\]"),
        (dict(name="t", source="precomputed", text_embedding="rich", model_changes={"text_dim": 8}), r"sets \['model_changes'\]"),
        (dict(name="t", source="somewhere", text_embedding="rich"), r"source is 'somewhere'; choose one of"),
        (dict(name="t", text_embedding="rich", checkpoint="/x"), r"missing keys \['source'\].*checkpoint is now path"),
        ("teacher_rich", r"must be a dict"),
    ],
)
def test_one_validator_names_what_is_wrong_in_a_teacher_entry(entry, message):
    config = tiny_config()
    config.teachers = [entry]
    with pytest.raises(ConfigError, match=message):
        check_config(config)


def test_repeated_teacher_names_are_refused():
    config = tiny_config()
    config.teachers = [dict(name="t", source="recipe", text_embedding="rich")] * 2
    with pytest.raises(ConfigError, match=r"\['t'\] appear more than once"):
        check_config(config)


@pytest.mark.parametrize("old_key", ["distillation.teachers", "distillation.precomputed_teachers", "data.teachers", "data.text_embeddings", "distillation.weight", "distillation.distance"])
def test_keys_of_the_old_layout_say_what_replaced_them(old_key):
    config = tiny_config()
    group, key = old_key.split(".")
    with config.unlocked():
        config[group][key] = ["teacher_rich"]
    with pytest.raises(ConfigError, match=f"config.{old_key} is no longer a key; use "):
        check_config(config)


def test_each_text_embedding_is_loaded_at_the_longest_length_any_model_reads(tmp_path):
    """A teacher reading more tokens than the student sees all of them (before, every embedding
    was cut at the student's text_max_tokens)."""
    config = check_config(tiny_config())  # student: "poor" at 5 tokens
    with config.unlocked():
        config.teachers = [
            dict(name="long_rich", source="recipe", text_embedding="rich", model_changes={"text_dim": 8, "text_max_tokens": 9}),
            dict(name="long_poor", source="recipe", text_embedding="poor", model_changes={"text_max_tokens": 7}),
        ]
        config.data.source, config.data.dataset, config.data.data_dir = "release", "msrvtt", str(tmp_path)
    needs = data_needs(check_config(config))
    assert needs.text_max_tokens == {"poor": 7, "rich": 9}
    assert release_request(config.data, needs).text_max_tokens == {"poor": 7, "rich": 9}


def test_each_model_is_fed_its_own_token_count_from_the_longest_loaded():
    config = check_config(tiny_config())
    with config.unlocked():
        config.teachers = [dict(name="long", source="recipe", text_embedding="poor", model_changes={"text_max_tokens": 9})]
        config.data.synthetic.num_train_videos = 16
    store = run_stores(config)["train"]
    assert int(store.text["poor"].lengths.max()) > 5  # captions longer than the student reads exist
    videos, captions = np.arange(8), np.zeros((8, 1), int)
    batch = store.batch(videos, captions, text_names=["poor"], max_text_tokens=data_needs(config).text_max_tokens)
    student = as_model_config(config.model)
    five = store.batch(videos, captions, text_names=["poor"], max_text_tokens=5)["text"]["poor"]
    np.testing.assert_array_equal(np.asarray(model_text(batch, "poor", student)), five)
    assert batch["text"]["poor"].shape[2] == 9


@pytest.mark.parametrize(
    "terms, message",
    [
        ([dict(method="hubr")], r"method is 'hubr'; choose one of \[.*'teachtext'"),
        ([dict(method="teachtext", temprature=1.0)], r"unknown settings \['temprature'\]; teachtext takes \['aggregation', 'delta', 'distance'\]"),
        ([dict(method="kl_batch", temperature=0.0)], r"temperature must be greater than 0, got 0.0 \(a temperature divides"),
        ([dict(method="caption", temperature=-1)], r"temperature must be greater than 0"),
        ([dict(method="teachtext", distance="kl")], r"distance is 'kl'; choose one of \['huber', 'l1', 'l2'\]"),
        ([dict(method="rank_k", k=0)], r"k must be a whole number of at least 1, got 0"),
        ([dict(method="teachtext", weight=-1.0)], r"weight must be 0 or more"),
        ([dict(method="teachtext", schedule=dict(kind="cosine"))], r"schedule: kind 'cosine' is not one of \['none', 'exp'"),
        ([dict(method="teachtext", schedule=dict(kind="exp", every="epoch"))], r"schedule has unknown keys \['every'\]"),
        ([dict(method="teachtext", schedule=dict(kind="exp", unit="batch"))], r"unit 'batch' is not one of \['epoch', 'step'\]"),
        ([dict(method="teachtext"), dict(method="teachtext", delta=0.5)], r"names must be unique; \['teachtext'\]"),
        (["teachtext"], r"terms\[0\] must be a dict with a 'method'"),
        ([dict(method="caption", detach_target="yes")], r"detach_target must be true or false"),
        ([dict(method="teachtext", weight=float("inf"))], r"weight must be a finite number, got inf"),
        ([dict(method="teachtext", schedule=dict(kind="exp", k=True))], r"schedule.k must be a finite number, got True"),
        ([dict(method="teachtext", schedule=dict(kind="exp", k="fast"))], r"schedule.k must be a finite number, got 'fast'"),
        ([dict(method="embedding_regression", text=False, video=False)], r"regresses neither side"),
    ],
)
def test_a_bad_distillation_term_names_what_is_valid(terms, message):
    config = tiny_config()
    with config.unlocked():
        config.distillation.terms = terms
    with pytest.raises(DistillationConfigError, match=message):
        check_config(config)


def test_two_terms_of_one_method_with_their_own_names_are_one_config():
    config = tiny_config()
    with config.unlocked():
        config.distillation.terms = [dict(method="teachtext"), dict(method="teachtext", name="teachtext_sharp", delta=0.1)]
    terms = distillation_terms(check_config(config))
    assert [(term.name, term.settings["delta"]) for term in terms] == [("teachtext", 1.0), ("teachtext_sharp", 0.1)]


def test_a_run_saved_before_the_terms_existed_is_the_same_run():
    """Identities and config.json files written with the single distillation's settings (weight,
    aggregation, distance) still describe their run: finished teachers stay usable."""
    base = distilled_config()
    old = {"distillation.weight": 1.0, "distillation.aggregation": "mean", "distillation.distance": "huber"}
    saved = {key: value for key, value in run_identity(base).items() if not key.startswith("distillation.")}
    assert identity_differences({**saved, **old}, run_identity(base)) == ""
    old_l2 = {**old, "distillation.distance": "l2", "distillation.weight": 1.5}  # x^2 then, 0.5 x^2 now
    now_l2 = with_value(base, "distillation.terms", [dict(method="teachtext", distance="l2", weight=3.0)])
    assert identity_differences({**saved, **old_l2}, run_identity(now_l2)) == ""
    assert identity_differences({**saved, **old}, run_identity(now_l2)) != ""

    baseline = with_value(check_config(tiny_config("baseline")), "distillation.terms", [])
    without_terms = {key: value for key, value in run_identity(baseline).items() if not key.startswith("distillation.")}
    assert identity_differences(without_terms, run_identity(baseline)) == ""  # no teachers: no distillation keys then

    legacy_config = ml_collections.ConfigDict(base.to_dict())
    with legacy_config.unlocked():
        legacy_config.distillation = ml_collections.ConfigDict({"weight": 1.0, "aggregation": "mean", "distance": "huber"})
    assert run_identity(legacy_config) == run_identity(base)
