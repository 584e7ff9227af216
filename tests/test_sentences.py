"""Sentences as word2vec token features (the reference's word handling) and search by sentence."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from gensim.models import KeyedVectors
from gensim.parsing.preprocessing import STOPWORDS

from test_evaluate import setup
from tt_jax.models import init_variables
from tt_jax.search import SearchError, search
from tt_jax.sentences import (
    SentenceError,
    Word2VecEncoder,
    look_up_words,
    plain_split,
    symspell_speller,
    token_features,
)


def tiny_vectors(words, dim=4, seed=0) -> KeyedVectors:
    vectors = KeyedVectors(vector_size=dim)
    vectors.add_vectors(list(words), np.random.default_rng(seed).normal(size=(len(words), dim)).astype(np.float32))
    return vectors


def row_of(vectors: KeyedVectors, word: str) -> np.ndarray:
    return vectors.vectors[vectors.key_to_index[word]]


@pytest.mark.parametrize("suffix, binary", [(".bin", True), (".txt", False), (".kv", None)])
def test_a_vectors_file_gives_each_known_word_its_vector_in_order_without_stopwords(tmp_path, suffix, binary):
    words = ["man", "cooking", "pasta", "a", "is", "kitchen"]
    vectors = tiny_vectors(words)
    path = tmp_path / f"vectors{suffix}"
    if suffix == ".kv":
        vectors.save(str(path))
    else:
        vectors.save_word2vec_format(str(path), binary=binary)
    encoder = Word2VecEncoder.from_file(path, split=plain_split, speller=None)
    encoded = encoder.encode("a man is cooking pasta in the kitchen")
    # "a", "is", "in", "the" are gensim stopwords: gone, even where the vocabulary has them.
    assert {"a", "is", "in", "the"} <= STOPWORDS
    assert encoded.words == ("man", "cooking", "pasta", "kitchen")
    want = np.stack([row_of(vectors, w) for w in encoded.words])
    np.testing.assert_allclose(encoded.features, want, rtol=1e-6)  # the text format rounds to 6 digits
    assert encoded.features.dtype == np.float32


def test_words_are_looked_up_as_written_then_lemma_then_split_then_spelling():
    vocabulary = {"dog", "run", "round", "table", "cooking"}
    lemmas = {"dogs": "dog", "running": "run"}

    def split(sentence):
        return [(word, lemmas.get(word, word)) for word in sentence.split()]

    def speller(word):
        return {"cookng": ["cooking"], "tabel": ["label", "table"], "zzz": []}.get(word, [])

    found, not_found = look_up_words("dogs running roundtable cookng tabel zzz dog", vocabulary, split, speller)
    # The first correction *in the vocabulary* is taken ("label" is not in it).
    assert found == ["dog", "run", "round", "table", "cooking", "table", "dog"]
    assert not_found == ["zzz"]
    # Without lemmas or a speller (the plain tokenizer), only exact words and the split table.
    found, not_found = look_up_words("dogs roundtable cookng, dog.", vocabulary, plain_split, None)
    assert (found, not_found) == (["round", "table", "dog"], ["dogs", "cookng", ",", "."])


def test_symspell_corrects_within_two_edits_from_its_dictionary(tmp_path):
    dictionary = tmp_path / "frequencies.txt"
    dictionary.write_text("cooking 500\ncooling 20\nkitchen 300\n")
    speller = symspell_speller(dictionary)
    assert speller("cookng")[0] == "cooking"  # one edit; "cooling" is two
    assert speller("kitchn") == ["kitchen"]
    assert speller("zebra") == []


def test_a_sentence_with_no_known_word_is_the_mean_of_the_first_sorted_vocabulary_vectors(monkeypatch):
    from tt_jax import sentences

    words = ["zeta", "alpha", "mu", "beta", "omega"]
    vectors = tiny_vectors(words, seed=3)
    monkeypatch.setattr(sentences, "UNKNOWN_VECTOR_SAMPLES", 3)  # the reference averages 50,000
    encoded = Word2VecEncoder(vectors, split=plain_split, speller=None).encode("qwerty zxcv here")
    want = np.mean([row_of(vectors, w).astype(np.float64) for w in ("alpha", "beta", "mu")], axis=0)
    np.testing.assert_allclose(encoded.features, want[None].astype(np.float32), rtol=1e-6)
    assert encoded.words == () and encoded.not_found == ("qwerty", "zxcv")  # "here" is a stopword


def test_token_features_are_zero_padded_and_cut_to_max_tokens():
    vectors = tiny_vectors(["red", "green", "blue", "pink"])
    encoder = Word2VecEncoder(vectors, split=plain_split, speller=None)
    features, encoded = token_features(["red green blue pink", "green"], encoder, max_tokens=3)
    assert features.shape == (2, 3, 4)
    np.testing.assert_array_equal(features[0], np.stack([row_of(vectors, w) for w in ("red", "green", "blue")]))
    np.testing.assert_array_equal(features[1, 0], row_of(vectors, "green"))
    np.testing.assert_array_equal(features[1, 1:], 0)
    assert [e.words for e in encoded] == [("red", "green", "blue", "pink"), ("green",)]


def test_bad_sentences_and_vectors_files_are_refused(tmp_path):
    encoder = Word2VecEncoder(tiny_vectors(["one"]), split=plain_split, speller=None)
    with pytest.raises(SentenceError, match="non-empty list of strings"):
        token_features("one", encoder, 4)
    with pytest.raises(SentenceError, match="must be a string, got int"):
        token_features(["one", 7], encoder, 4)
    with pytest.raises(SentenceError, match="no word vectors file at"):
        Word2VecEncoder.from_file(tmp_path / "missing.bin")
    broken = tmp_path / "broken.bin"
    broken.write_bytes(b"not vectors at all")
    with pytest.raises(SentenceError, match="not a readable word vectors file"):
        Word2VecEncoder.from_file(broken)


def test_a_sentence_of_a_captions_tokens_finds_what_the_caption_finds():
    """Name each token of a caption as a word: the sentence of those words is that caption's
    features, so searching by it returns what searching by the caption returns."""
    model, store = setup()
    variables = init_variables(model, jax.random.key(3))
    table = store.text["poor"]
    video, caption = 2, 0
    start, length = int(table.starts[video, caption]), int(table.lengths[video, caption])
    tokens = np.asarray(table.tokens[start : start + length], np.float32)
    vectors = KeyedVectors(vector_size=tokens.shape[1])
    words = [f"token{i}" for i in range(length)]
    vectors.add_vectors(words, tokens)
    encoder = Word2VecEncoder(vectors, split=plain_split, speller=None)
    common = dict(store=store, model=model, variables=variables, text_name="poor", k=store.num_videos)
    by_caption = search(captions=[(video, caption)], **common)
    by_sentence = search([" ".join(words)], encoder=encoder, **common)
    np.testing.assert_array_equal(by_sentence.videos, by_caption.videos)
    np.testing.assert_allclose(by_sentence.scores, by_caption.scores, rtol=1e-5, atol=1e-6)
    assert by_sentence.query_captions == [" ".join(words)] and by_sentence.encoded[0].words == tuple(words)

    with pytest.raises(SearchError, match="sentence queries need encoder="):
        search(["a dog"], **common)
    other = Word2VecEncoder(tiny_vectors(["dog"], dim=tokens.shape[1] + 1), split=plain_split, speller=None)
    with pytest.raises(SearchError, match=r"the encoder gives \d+-d token features but the model reads"):
        search(["a dog"], encoder=other, **common)
