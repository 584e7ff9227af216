"""The feature store: ragged token tables, batches, evaluation inputs and validation errors."""

from __future__ import annotations

import numpy as np
import pytest

from tt_jax.data.feature_store import FeatureStore, FeatureStoreError, TokenTable
from tt_jax.errors import UserInputError
from tt_jax.models import ExpertConfig, ModelConfig


def numbered_table() -> TokenTable:
    """Video 0: captions of 2 and 1 tokens; video 1: 3 tokens and an empty slot. Token t is [t, -t]."""
    tokens = np.array([[t, -t] for t in range(1, 7)], np.float32)  # 6 tokens, D = 2
    return TokenTable(tokens=tokens, starts=np.array([[0, 2], [3, 6]]), lengths=np.array([[2, 1], [3, 0]]))


def every_slot_one_token() -> TokenTable:
    """A second text table whose slots differ from `numbered_table`'s (video 1 has two captions)."""
    return TokenTable.from_padded(np.ones((2, 2, 1, 3)), np.ones((2, 2)))


def model_config(text_dim: int = 2) -> ModelConfig:
    return ModelConfig(
        experts=(ExpertConfig("scene", 3), ExpertConfig("audio", 2, "vlad", 2, 4, flaky=True)),
        text_dim=text_dim,
        text_vlad_clusters=2,
        text_max_tokens=3,
        shared_dim=4,
    )


def small_store(**changes) -> FeatureStore:
    """Two videos matching `model_config()`; audio missing (NaN, as in the release) for video 1."""
    audio = np.arange(16, dtype=np.float32).reshape(2, 4, 2)
    audio[1] = np.nan
    values = dict(
        video_ids=("a", "b"),
        experts={"scene": np.array([[1, 2, 3], [4, 5, 6]], np.float32), "audio": audio},
        availability={"scene": np.ones(2), "audio": np.array([1.0, 0.0])},
        text={"w2v": numbered_table()},
    )
    values.update(changes)
    return FeatureStore(**values)


def test_padded_gathers_truncates_and_zero_pads():
    table = numbered_table()
    padded = table.padded(np.array([1, 0, 0]), np.array([[0, 1], [1, 0], [0, 0]]), max_tokens=2)
    expected = np.zeros((3, 2, 2, 2), np.float32)
    expected[0, 0] = [[4, -4], [5, -5]]  # video 1 caption 0: 3 tokens truncated to 2
    # expected[0, 1] stays zero: video 1 has no caption 1
    expected[1, 0] = [[3, -3], [0, 0]]  # video 0 caption 1: one token, then padding
    expected[1, 1] = [[1, -1], [2, -2]]
    expected[2, 0] = expected[2, 1] = [[1, -1], [2, -2]]
    np.testing.assert_array_equal(padded, expected)
    assert padded.dtype == np.float32


def test_padded_from_float16_storage_is_float32():
    table = numbered_table()
    half = TokenTable(tokens=table.tokens.astype(np.float16), starts=table.starts, lengths=table.lengths)
    padded = half.padded(np.array([0]), np.array([[0]]), max_tokens=4)
    assert padded.dtype == np.float32
    np.testing.assert_array_equal(padded[0, 0, :, 0], [1, 2, 0, 0])


def test_from_padded_keeps_only_real_tokens_in_row_major_order():
    padded = np.zeros((2, 2, 3, 1), np.float32)
    padded[0, 0, :2, 0] = [10, 11]
    padded[0, 1, :3, 0] = [20, 21, 22]
    padded[1, 0, :1, 0] = [30]
    padded[1, 1, :, 0] = [99, 99, 99]  # beyond length 0: must be dropped
    table = TokenTable.from_padded(padded, np.array([[2, 3], [1, 0]]))
    np.testing.assert_array_equal(table.tokens[:, 0], [10, 11, 20, 21, 22, 30])
    np.testing.assert_array_equal(table.starts, [[0, 2], [5, 6]])
    padded_back = table.padded(np.array([0, 1]), np.array([[1], [0]]), 3)
    np.testing.assert_array_equal(padded_back[:, 0, :, 0], [[20, 21, 22], [30, 0, 0]])


def test_from_lists_reads_the_release_layout_with_uneven_caption_counts():
    table = TokenTable.from_lists([
        [np.full((2, 2), 1.0), np.full((1, 2), 2.0)],
        [np.full((3, 2), 3.0)],
    ])
    np.testing.assert_array_equal(table.lengths, [[2, 1], [3, 0]])
    np.testing.assert_array_equal(table.starts[:, 0], [0, 3])
    padded = table.padded(np.array([1]), np.array([[0, 1]]), 3)
    np.testing.assert_array_equal(padded[0, :, :, 0], [[3, 3, 3], [0, 0, 0]])


def test_token_table_rejects_captions_past_the_token_array():
    with pytest.raises(FeatureStoreError, match="ends at token 5"):
        TokenTable(tokens=np.zeros((4, 2)), starts=np.array([[0, 2]]), lengths=np.array([[2, 3]]))


def test_missing_expert_rows_become_zero_without_touching_the_callers_array():
    audio = np.ones((2, 4, 2), np.float32)
    audio[1] = np.nan
    store = small_store(experts={"scene": np.ones((2, 3), np.float32), "audio": audio})
    np.testing.assert_array_equal(store.experts["audio"][1], np.zeros((4, 2)))
    np.testing.assert_array_equal(store.experts["audio"][0], np.ones((4, 2)))
    assert np.isnan(audio[1]).all()  # the caller's array is unchanged


def test_features_already_zero_where_missing_are_not_copied():
    audio = np.ones((2, 4, 2), np.float32)
    audio[1] = 0
    store = small_store(experts={"scene": np.ones((2, 3), np.float32), "audio": audio})
    assert store.experts["audio"] is audio


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"video_ids": ("a", "b", "c")}, r"availability\['audio'\]: expected 3 rows"),
        ({"availability": {"scene": np.ones(3), "audio": np.ones(2)}}, r"availability\['scene'\]"),
        ({"availability": {"scene": np.ones(2)}}, "must name the same experts"),
        ({"video_ids": ("a", "a")}, "repeated: \\['a'\\]"),
        ({"caption_weights": np.array([[1.0, 1.0], [1.0, 1.0]])}, "slots that hold no caption, for videos \\['b'\\]"),
        ({"caption_weights": np.ones((2, 3))}, r"caption_weights: expected shape \(2, 2\)"),
        ({"text": {}}, "at least one text embedding"),
        (
            {"text": {"w2v": numbered_table(), "gpt": every_slot_one_token()}},
            "same caption slots",
        ),
    ],
)
def test_construction_rejects_inconsistent_arrays_naming_them(changes, message):
    with pytest.raises(FeatureStoreError, match=message) as error:
        small_store(**changes)
    assert isinstance(error.value, UserInputError)


def test_batch_returns_copies_of_the_requested_rows():
    store = small_store()
    batch = store.batch(np.array([1, 0]), np.array([[0], [1]]), text_names=["w2v"], max_text_tokens=2)
    np.testing.assert_array_equal(batch["experts"]["scene"], [[4, 5, 6], [1, 2, 3]])
    np.testing.assert_array_equal(batch["availability"]["audio"], [0, 1])
    np.testing.assert_array_equal(batch["experts"]["audio"][0], np.zeros((4, 2)))
    np.testing.assert_array_equal(batch["text"]["w2v"][:, 0, :, 0], [[4, 5], [3, 0]])
    assert "teacher_embeddings" not in batch
    batch["experts"]["scene"][:] = -1
    np.testing.assert_array_equal(store.experts["scene"], [[1, 2, 3], [4, 5, 6]])


def test_batch_pads_each_text_embedding_to_its_own_length():
    other = TokenTable(
        tokens=np.ones((7, 5), np.float32), starts=np.array([[0, 3], [4, 7]]), lengths=np.array([[3, 1], [3, 0]])
    )
    store = small_store(text={"w2v": numbered_table(), "gpt": other})
    batch = store.batch(
        np.array([0]), np.array([[0, 1]]), text_names=["w2v", "gpt"], max_text_tokens={"w2v": 2, "gpt": 4}
    )
    assert batch["text"]["w2v"].shape == (1, 2, 2, 2)
    assert batch["text"]["gpt"].shape == (1, 2, 4, 5)
    np.testing.assert_array_equal(batch["text"]["gpt"][0, :, :, 0], [[1, 1, 1, 0], [1, 0, 0, 0]])
    with pytest.raises(FeatureStoreError, match="no text embedding"):
        store.batch(np.array([0]), np.array([[0]]), text_names=["openai"], max_text_tokens=2)
    with pytest.raises(FeatureStoreError, match="caption indices"):
        store.batch(np.array([0]), np.array([[2]]), text_names=["w2v"], max_text_tokens=2)


def test_batch_gathers_teacher_embeddings_of_the_sampled_captions():
    teacher_text = np.arange(2 * 2 * 3, dtype=np.float32).reshape(2, 2, 3)  # [V, K, D]
    teacher = {"video": {"scene": np.array([[1, 1, 1], [2, 2, 2]], np.float32)}, "text": {"scene": teacher_text}}
    store = small_store(teacher_embeddings={"gpt2-xl": teacher})
    batch = store.batch(np.array([1, 0]), np.array([[0], [1]]), text_names=["w2v"], max_text_tokens=2)
    gathered = batch["teacher_embeddings"]["gpt2-xl"]
    np.testing.assert_array_equal(gathered["video"]["scene"], [[2, 2, 2], [1, 1, 1]])
    np.testing.assert_array_equal(gathered["text"]["scene"], [[[6, 7, 8]], [[3, 4, 5]]])


def test_a_batch_carries_only_the_teachers_asked_for():
    teacher = {"video": {"scene": np.ones((2, 3), np.float32)}, "text": {"scene": np.ones((2, 2, 3), np.float32)}}
    store = small_store(teacher_embeddings={"w2v": teacher, "gpt2-xl": teacher})
    args = (np.array([1, 0]), np.array([[0], [1]]))
    assert set(store.batch(*args, text_names=["w2v"], max_text_tokens=2)["teacher_embeddings"]) == {"w2v", "gpt2-xl"}
    assert set(store.batch(*args, text_names=["w2v"], max_text_tokens=2, teacher_names=["w2v"])["teacher_embeddings"]) == {"w2v"}
    assert "teacher_embeddings" not in store.batch(*args, text_names=["w2v"], max_text_tokens=2, teacher_names=[])
    with pytest.raises(FeatureStoreError, match=r"no precomputed teachers \['openai'\]"):
        store.batch(*args, text_names=["w2v"], max_text_tokens=2, teacher_names=["openai"])


def test_teacher_embeddings_with_the_wrong_caption_count_are_rejected():
    teacher = {"video": {"scene": np.ones((2, 3))}, "text": {"scene": np.ones((2, 1, 3))}}
    message = r"teacher_embeddings\['t'\]\['text'\]\['scene'\]: expected shape \(2, 2, 3\)"
    with pytest.raises(FeatureStoreError, match=message):
        small_store(teacher_embeddings={"t": teacher})


def test_eval_inputs_cover_every_caption_slot():
    store = small_store()
    experts, availability, text, query_masks = store.eval_inputs("w2v", 3)
    assert text.shape == (2, 2, 3, 2)
    np.testing.assert_array_equal(query_masks, [[1, 1], [1, 0]])
    np.testing.assert_array_equal(text[1, 0, :, 0], [4, 5, 6])
    np.testing.assert_array_equal(text[1, 1], np.zeros((3, 2)))
    assert experts["scene"].shape == (2, 3) and availability["audio"].tolist() == [1, 0]
    _, _, chunk, chunk_masks = store.eval_inputs("w2v", 3, videos=np.array([1]))
    np.testing.assert_array_equal(chunk, text[1:])
    np.testing.assert_array_equal(chunk_masks, [[1, 0]])


def test_sampling_weights_default_to_the_caption_mask():
    assert small_store().sampling_weights.tolist() == [[1, 1], [1, 0]]
    weights = np.array([[0.0, 2.0], [1.0, 0.0]])
    np.testing.assert_array_equal(small_store(caption_weights=weights).sampling_weights, weights)


def test_validate_accepts_a_consistent_store():
    small_store().validate(model_config(), "w2v")


def _replace_expert(name, array, availability=None):
    store = small_store()
    experts = dict(store.experts, **{name: array})
    present = dict(store.availability, **({name: availability} if availability is not None else {}))
    return FeatureStore(store.video_ids, experts, present, store.text)


@pytest.mark.parametrize(
    "store, config, message",
    [
        (lambda: small_store(video_ids=(), experts={"scene": np.zeros((0, 3)), "audio": np.zeros((0, 4, 2))},
                             availability={"scene": np.zeros(0), "audio": np.zeros(0)},
                             text={"w2v": TokenTable(np.zeros((0, 2)), np.zeros((0, 1)), np.zeros((0, 1)))}),
         model_config(), "holds no video"),
        (lambda: small_store(), ModelConfig(experts=(ExpertConfig("face", 3),), text_dim=2, text_vlad_clusters=1,
                                            text_max_tokens=3), r"experts \['face'\] that the feature store lacks"),
        (lambda: _replace_expert("scene", np.zeros((2, 5))), model_config(),
         r"expert 'scene': the model expects per-video features \[input_dim\] = \(3,\), the store holds \(5,\)"),
        (lambda: _replace_expert("audio", np.zeros((2, 6, 2))), model_config(),
         r"expert 'audio'.*\(4, 2\), the store holds \(6, 2\)"),
        (lambda: _replace_expert("scene", np.array([[1, 2, 3], [np.nan, 0, 0]], np.float32)), model_config(),
         r"NaN/inf in expert 'scene', marked present, for videos \['b'\]"),
        (lambda: _replace_expert("audio", np.ones((2, 4, 2)), np.array([1.0, 0.5])), model_config(), "must be 0 or 1"),
        (lambda: _replace_expert("scene", np.ones((2, 3)), np.array([1.0, 0.0])), model_config(),
         r"'scene' is not flaky .* missing for videos \['b'\]"),
        (lambda: small_store(), model_config(), "holds \\['w2v'\\]"),
        (lambda: small_store(), model_config(text_dim=7), "expects 7-d tokens"),
        (lambda: small_store(text={"w2v": TokenTable.from_lists([[np.ones((1, 2))], []], dim=2)}), model_config(),
         r"videos \['b'\] have no caption"),
        (lambda: small_store(caption_weights=np.array([[1.0, 0.0], [0.0, 0.0]])), model_config(),
         r"all zero for videos \['b'\]"),
        (lambda: small_store(text={"w2v": TokenTable(np.array([[1, 1], [np.inf, 0], [1, 1]], np.float32),
                                                        np.array([[0], [1]]), np.array([[1], [2]]))}),
         model_config(), "NaN/inf in text 'w2v' tokens \\(first in video 'b'\\)"),
    ],
)
def test_validate_names_the_problem(store, config, message):
    text_name = "gpt2-xl" if message.startswith("holds") else "w2v"
    with pytest.raises(FeatureStoreError, match=message):
        store().validate(config, text_name)
