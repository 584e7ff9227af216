"""The synthetic dataset: determinism, shapes, missing data, and that richer text is really richer."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tt_jax.data.synthetic import (
    TEACHTEXT_TEXT_EMBEDDINGS,
    SyntheticDataError,
    make_synthetic_dataset,
)
from tt_jax.models import ExpertConfig, ModelConfig

TEXT = {
    "w2v": {"dim": 24, "quality": 0.3},
    "gpt2-xl": {"dim": 16, "quality": 0.7},
    "gpt2-xl-finetune": {"dim": 16, "quality": 1.0},
}


def model_config(**changes) -> ModelConfig:
    values = dict(
        experts=(
            ExpertConfig("scene", 12),
            ExpertConfig("motion", 8),
            ExpertConfig("audio", 6, "vlad", 2, 5, flaky=True),
            ExpertConfig("face", 4, flaky=True),
        ),
        text_dim=24,
        text_vlad_clusters=2,
        text_max_tokens=6,
        shared_dim=8,
    )
    values.update(changes)
    return ModelConfig(**values)


def dataset(seed=0, text=TEXT, **options):
    sizes = dict(num_train_videos=40, num_val_videos=10, num_test_videos=20, captions_per_video=3)
    sizes.update(options)
    return make_synthetic_dataset(model_config(), seed=seed, text_embeddings=text, **sizes)


def all_arrays(store):
    arrays = {f"expert {name}": array for name, array in store.experts.items()}
    arrays.update({f"availability {name}": array for name, array in store.availability.items()})
    for name, table in store.text.items():
        arrays.update({f"{name} tokens": table.tokens, f"{name} lengths": table.lengths})
    return arrays


def test_same_seed_same_arrays_and_another_seed_others():
    first, again, other = dataset(seed=3), dataset(seed=3), dataset(seed=4)
    for split in ("train", "val", "test"):
        for name, array in all_arrays(first[split]).items():
            np.testing.assert_array_equal(array, all_arrays(again[split])[name], err_msg=name)
    assert not np.array_equal(first["train"].experts["scene"], other["train"].experts["scene"])


def test_splits_are_different_videos_of_one_world():
    stores = dataset()
    assert stores["train"].video_ids[:2] == ("train-000000", "train-000001")
    assert not set(stores["train"].video_ids) & set(stores["test"].video_ids)
    assert not np.allclose(stores["train"].experts["scene"][:10], stores["test"].experts["scene"][:10])


def test_adding_a_text_embedding_changes_no_other_array():
    fewer = dataset(text={"w2v": TEXT["w2v"]})["train"]
    more = dataset()["train"]
    for name, array in all_arrays(fewer).items():
        np.testing.assert_array_equal(array, all_arrays(more)[name], err_msg=name)


def test_shapes_follow_the_config_and_the_text_embeddings():
    store = dataset(max_text_tokens=7, min_text_tokens=3)["val"]
    assert store.num_videos == 10 and store.max_captions == 3
    assert store.experts["scene"].shape == (10, 12)
    assert store.experts["audio"].shape == (10, 5, 6)  # [V, max_tokens, input_dim]
    for name, spec in TEXT.items():
        table = store.text[name]
        assert table.dim == spec["dim"]
        assert table.lengths.shape == (10, 3)
        assert table.lengths.min() >= 3 and table.lengths.max() <= 7
        assert len(table.tokens) == table.lengths.sum()
    store.validate(model_config(), "w2v")


def test_a_split_without_videos_is_left_out():
    assert set(dataset(num_val_videos=0)) == {"train", "test"}


def test_flaky_experts_go_missing_at_the_requested_rate_and_never_hold_nan():
    store = dataset(num_train_videos=600, missing_rate=0.3)["train"]
    for name in ("audio", "face"):  # 600 videos: standard error of the rate 0.019
        assert abs(store.availability[name].mean() - 0.7) < 0.06
        missing = store.availability[name] == 0
        assert np.all(store.experts[name][missing] == 0)
        assert np.all(np.any(store.experts[name][~missing].reshape(int((~missing).sum()), -1) != 0, axis=1))
    assert np.all(store.availability["scene"] == 1) and np.all(store.availability["motion"] == 1)
    for name, array in all_arrays(store).items():
        assert np.all(np.isfinite(array)), name


def test_vlad_experts_are_token_sequences_of_random_length():
    store = dataset(num_train_videos=200, missing_rate=0.0)["train"]
    real_tokens = np.any(store.experts["audio"] != 0, axis=-1)  # [V, T]
    lengths = real_tokens.sum(axis=1)
    np.testing.assert_array_equal(real_tokens, np.arange(5) < lengths[:, None])  # real tokens first, then zeros
    assert lengths.min() >= 1 and set(lengths.tolist()) == {1, 2, 3, 4, 5}


def test_every_video_keeps_an_expert_when_all_are_flaky():
    config = model_config(experts=(ExpertConfig("a", 3, flaky=True), ExpertConfig("b", 3, flaky=True)))
    store = make_synthetic_dataset(
        config, num_train_videos=300, num_val_videos=0, num_test_videos=0, captions_per_video=1,
        text_embeddings=TEXT, seed=0, missing_rate=0.6,
    )["train"]
    assert np.all(store.availability["a"] + store.availability["b"] >= 1)


def test_missing_captions_leave_trailing_empty_slots():
    store = dataset(num_train_videos=300, captions_per_video=5, missing_caption_rate=0.5)["train"]
    mask = store.caption_mask
    assert np.all(mask[:, 0] == 1)
    np.testing.assert_array_equal(mask, np.arange(5) < mask.sum(axis=1, keepdims=True))  # leading slots only
    assert abs(mask[:, 1:].mean() - 0.5) < 0.05
    for table in store.text.values():
        np.testing.assert_array_equal(table.lengths > 0, mask > 0)


def _mean_pooled_text(store, name):
    """[V*K, D] mean of each caption's tokens (row v*K + k), by summing the ragged rows."""
    table = store.text[name]
    caption_of_token = np.repeat(np.arange(table.lengths.size), table.lengths.ravel())
    sums = np.zeros((table.lengths.size, table.dim))
    np.add.at(sums, caption_of_token, table.tokens)
    return sums / np.maximum(table.lengths.ravel(), 1)[:, None]


def _pooled_video(store):
    """[V, sum of dims]: experts concatenated, token experts averaged over their real tokens."""
    parts = []
    for features in store.experts.values():
        if features.ndim == 3:
            real = np.any(features != 0, axis=-1)
            features = features.sum(axis=1) / np.maximum(real.sum(axis=1), 1)[:, None]
        parts.append(features)
    return np.concatenate(parts, axis=1)


def _ridge_probe_r1(stores, name, ridge=1.0):
    """t2v R@1 on test of a closed-form ridge map from pooled caption tokens to pooled video features."""
    train, test = stores["train"], stores["test"]
    inputs = _mean_pooled_text(train, name)
    targets = np.repeat(_pooled_video(train), train.max_captions, axis=0)
    weights = np.linalg.solve(inputs.T @ inputs + ridge * np.eye(inputs.shape[1]), inputs.T @ targets)
    queries = _mean_pooled_text(test, name) @ weights
    gallery = _pooled_video(test)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    gallery /= np.linalg.norm(gallery, axis=1, keepdims=True)
    best = np.argmax(queries @ gallery.T, axis=1)
    return np.mean(best == np.repeat(np.arange(test.num_videos), test.max_captions))


@pytest.mark.parametrize("seed", [0, 1])
def test_richer_text_embeddings_retrieve_better(seed):
    """The default TeachText-like embeddings, read by a linear probe: poor < better < best."""
    text = TEACHTEXT_TEXT_EMBEDDINGS
    stores = dataset(seed=seed, text=text, num_train_videos=300, num_val_videos=0, num_test_videos=100)
    recall = {name: _ridge_probe_r1(stores, name) for name in text}
    # Chance is 0.01; over seeds 0-5 the probe measured 0.28-0.38 / 0.53-0.56 / 0.69-0.75.
    assert recall["w2v"] > 0.1
    assert recall["gpt2-xl"] > recall["w2v"] + 0.08
    assert recall["gpt2-xl-finetune"] > recall["gpt2-xl"] + 0.08


def _first_tokens_of_two_captions(hide_directions: bool, videos: int = 3000):
    """{name: ([V, D], [V, D])} the only token of captions 0 and 1 of every video, in a world
    without topics and with captions that are exact views of their video (caption_noise 0)."""
    config = {"experts": [{"name": "scene", "input_dim": 6}], "text_dim": 4, "text_vlad_clusters": 1, "text_max_tokens": 1}
    store = make_synthetic_dataset(
        config, num_train_videos=videos, num_val_videos=0, num_test_videos=0, captions_per_video=2, seed=0,
        num_topics=0, caption_noise=0.0, min_text_tokens=1, hide_directions=hide_directions,
    )["train"]
    rows = np.arange(videos)
    return {
        name: tuple(table.padded(rows, np.full((videos, 1), k), 1)[:, 0, 0] for k in (0, 1))
        for name, table in store.text.items()
    }


def test_quality_is_the_share_of_a_token_that_is_about_its_video():
    """Two captions of one video share only the concept part of their tokens (variance q per dim,
    against 1 - q of per-caption nuisance and token_noise^2 of per-token noise): their tokens
    correlate q / (1 + token_noise^2), which orders the default embeddings poor < better < best."""
    tokens = _first_tokens_of_two_captions(hide_directions=False)
    measured = {}
    for name, spec in TEACHTEXT_TEXT_EMBEDDINGS.items():
        first, second = (x - x.mean(axis=0) for x in tokens[name])
        measured[name] = np.sum(first * second) / np.sqrt(np.sum(first**2) * np.sum(second**2))
        expected = spec["quality"] / (1 + spec["token_noise"] ** 2)
        assert abs(measured[name] - expected) < 0.05, (name, measured[name], expected)
    assert measured["w2v"] < measured["gpt2-xl"] < measured["gpt2-xl-finetune"]


def _signal_rank(first: np.ndarray, second: np.ndarray, at_most: int) -> int:
    """How many directions two captions of a video share: the rank of their cross-covariance, read
    at its largest gap between consecutive singular values among the leading `at_most` + 1
    (per-caption noise averages out; the noise floor's own tail is left out)."""
    cross = first.T @ second / len(first)
    singular = np.linalg.svd((cross + cross.T) / 2, compute_uv=False)[: at_most + 1]
    return int(np.argmax(singular[:-1] / singular[1:])) + 1


@pytest.mark.parametrize("hide_directions", [False, True])
def test_every_embedding_sees_the_whole_concept_unless_directions_are_hidden(hide_directions):
    """By default the poorest embedding carries all L = 16 concept directions (what a student
    reading it must learn is how to read them, which the teachers' similarities can teach); with
    hide_directions an embedding of quality q keeps only ceil(L (1 + q) / 2) of them."""
    tokens = _first_tokens_of_two_captions(hide_directions)
    for name, spec in TEACHTEXT_TEXT_EMBEDDINGS.items():
        expected = math.ceil(16 * (1 + spec["quality"]) / 2) if hide_directions else 16
        assert _signal_rank(*tokens[name], at_most=32) == expected, name


@pytest.mark.parametrize(
    "options, message",
    [
        ({"text": {"w2v": {"dim": 8, "quality": 0.0}}}, "quality in \\(0, 1\\]"),
        ({"text": {"w2v": {"dim": 8}}}, "needs keys 'dim' and 'quality'"),
        ({"text": {"w2v": {"dim": 8, "quality": 0.5, "noise": 1.0}}}, "optionally 'token_noise'"),
        ({"text": {"w2v": {"dim": 8, "quality": 0.5, "token_noise": -1.0}}}, "token_noise must be non-negative"),
        ({"text": {}}, "at least one embedding"),
        ({"missing_rate": 1.0}, "missing_rate must lie in"),
        ({"min_text_tokens": 9}, "exceeds max_text_tokens"),
    ],
)
def test_impossible_parameters_are_explained(options, message):
    with pytest.raises(SyntheticDataError, match=message):
        dataset(**options)


def test_an_embedding_can_have_its_own_token_noise():
    config = {"experts": [{"name": "scene", "input_dim": 6}], "text_dim": 4, "text_vlad_clusters": 1, "text_max_tokens": 3}
    common = dict(num_train_videos=20, num_val_videos=0, num_test_videos=0, captions_per_video=2, seed=0,
                  min_text_tokens=3, caption_noise=0.0)
    clean = {"a": {"dim": 4, "quality": 1.0, "token_noise": 0.0}}
    store = make_synthetic_dataset(config, text_embeddings=clean, **common)["train"]
    tokens = store.text["a"].padded(np.arange(20), np.zeros((20, 1), int), 3)
    # Without token noise every token of a caption is the same vector.
    np.testing.assert_allclose(tokens[:, 0, 1:], np.broadcast_to(tokens[:, 0, :1], tokens[:, 0, 1:].shape), atol=1e-6)
    noisy = {"a": {"dim": 4, "quality": 1.0, "token_noise": 0.5}}
    tokens = make_synthetic_dataset(config, text_embeddings=noisy, **common)["train"].text["a"].padded(
        np.arange(20), np.zeros((20, 1), int), 3)
    assert 0.3 < np.std(tokens[:, 0, 1:] - tokens[:, 0, :1]) / np.sqrt(2) < 0.7
