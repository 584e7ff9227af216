"""Raw sentences as the token features a model reads, so that a trained model can be searched with
any sentence (`tt_jax.search.search(["a man is cooking"], ...)`).

A model reads a text embedding's per-token features: the release's `w2v` features are word2vec
vectors, one per word of the caption, after the reference's word handling (`model/text.py` of the
Collaborative Experts code), which `Word2VecEncoder` follows:

1. gensim's stopword list is removed from the sentence (`remove_stopwords`, as the reference does
   for word2vec; case-sensitive, on whitespace-separated words);
2. each remaining word is looked up as written, then as its lemma, then through a fixed
   split-up table ("roundtable" -> "round table"), then as the spelling correction closest to it
   (SymSpell, edit distance <= 2, the first suggestion in the vocabulary); a word none of these
   finds is dropped and reported;
3. a sentence of which no word is found becomes one token, the mean vector of the first 50,000
   vocabulary words in sorted order (the reference's "unknown" vector).

The reference tokenises and lemmatises with spaCy's English pipeline and corrects with SymSpell.
Here spaCy is used where it and `en_core_web_sm` are installed; otherwise words are split on white
space with punctuation split off and are their own lemma, so an inflected word absent from the
vocabulary ("dogs'") is not found by its lemma. SymSpell is used where `symspellpy` is installed
(`pip install tt_jax[text]`); without it misspelt words are dropped. The release's features were
made with both, so a sentence that needs neither gives the same tokens either way.

Any other text embedding plugs in through `SentenceEncoder`: an object with `dim` and
`encode(sentence) -> EncodedSentence`.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Callable, Container, Optional, Protocol, Sequence

import numpy as np

from tt_jax.errors import UserInputError

# The reference's word2vec "unknown" vector averages this many vocabulary words (sorted order).
UNKNOWN_VECTOR_SAMPLES = 50_000
# Words the reference's spaCy tokenisation keeps whole but the vocabulary has only in parts.
SPLIT_WORDS = {"roundtable": ("round", "table")}
# Words (with inner hyphens or apostrophes) or single punctuation marks, as spaCy splits them off.
_PLAIN_TOKEN = re.compile(r"\w+(?:[-']\w+)*|[^\w\s]")


class SentenceError(UserInputError):
    """Sentences or a vectors file that cannot be turned into token features."""


@dataclasses.dataclass(frozen=True)
class EncodedSentence:
    """features: [n_tokens, dim] float32; words: the vocabulary words they are the vectors of;
    not_found: the sentence's words that no lookup found (dropped)."""

    features: np.ndarray
    words: tuple[str, ...]
    not_found: tuple[str, ...]


class SentenceEncoder(Protocol):
    """What `token_features` and `search` need of a text embedding."""

    dim: int

    def encode(self, sentence: str) -> EncodedSentence: ...


# A word and its lemma, as the tokenizer splits a sentence.
Splitter = Callable[[str], list[tuple[str, str]]]
# The closest spelling corrections of a word, best first.
Speller = Callable[[str], list[str]]


def plain_split(sentence: str) -> list[tuple[str, str]]:
    """Words and punctuation marks, each its own lemma (the tokenizer without spaCy)."""
    return [(word, word) for word in _PLAIN_TOKEN.findall(sentence)]


def spacy_split(pipeline: str = "en_core_web_sm") -> Splitter:
    """spaCy's tokens and lemmas, as the reference reads a sentence (raises ImportError/OSError
    where spaCy or the pipeline is not installed)."""
    import spacy  # optional: pip install spacy && python -m spacy download en_core_web_sm

    nlp = spacy.load(pipeline, disable=["parser", "ner"])
    return lambda sentence: [(token.text, token.lemma_) for token in nlp(sentence)]


def symspell_speller(dictionary: Optional[Path] = None) -> Speller:
    """SymSpell's closest corrections within edit distance 2, from its English frequency
    dictionary (or `dictionary`, lines of "word count"), as the reference corrects."""
    import importlib.resources

    from symspellpy import SymSpell, Verbosity  # optional: pip install tt_jax[text]

    # max_dictionary_edit_distance=2, prefix_length=7: the reference's settings.
    checker = SymSpell(max_dictionary_edit_distance=2, prefix_length=7)
    path = dictionary or importlib.resources.files("symspellpy") / "frequency_dictionary_en_82_765.txt"
    if not checker.load_dictionary(str(path), term_index=0, count_index=1):
        raise SentenceError(f"no spelling dictionary could be read from {path}")
    return lambda word: [s.term for s in checker.lookup(word, Verbosity.CLOSEST, max_edit_distance=2)]


def installed_splitter() -> Splitter:
    try:
        return spacy_split()
    except (ImportError, OSError):
        return plain_split


def installed_speller() -> Optional[Speller]:
    try:
        return symspell_speller()
    except ImportError:
        return None


def look_up_words(
    sentence: str, vocabulary: Container[str], split: Splitter = plain_split, speller: Optional[Speller] = None
) -> tuple[list[str], list[str]]:
    """(vocabulary words found, words not found) for a sentence, by the reference's order of
    lookups: the word, its lemma, the split-up table, the first spelling correction in the
    vocabulary."""
    found, not_found = [], []
    for word, lemma in split(sentence):
        if word in vocabulary:
            found.append(word)
        elif lemma in vocabulary:
            found.append(lemma)
        elif lemma in SPLIT_WORDS:
            for part in SPLIT_WORDS[lemma]:
                (found if part in vocabulary else not_found).append(part)
        else:
            correction = next((s for s in (speller(word) if speller else []) if s in vocabulary), None)
            if correction is None:
                not_found.append(word)
            else:
                found.append(correction)
    return found, not_found


class Word2VecEncoder:
    """Sentences as word2vec token features, from a gensim `KeyedVectors` (see the module
    docstring for the word handling). split/speller: default spaCy and SymSpell where installed."""

    def __init__(
        self,
        vectors,
        *,
        remove_stopwords: bool = True,
        split: Optional[Splitter] = None,
        speller: Optional[Speller] = ...,
    ):
        self.vectors = vectors
        self.dim = int(vectors.vector_size)
        self.remove_stopwords = remove_stopwords
        self.split = split if split is not None else installed_splitter()
        self.speller = installed_speller() if speller is ... else speller
        self._vocabulary = vectors.key_to_index
        first = sorted(self._vocabulary)[:UNKNOWN_VECTOR_SAMPLES]
        rows = np.array([self._vocabulary[word] for word in first], np.int64)
        # Rows first, then float64: GoogleNews' 3M x 300 vectors in float64 would be 7 GB.
        self.unknown_vector = np.mean(np.asarray(vectors.vectors[rows], np.float64), axis=0).astype(np.float32)

    @classmethod
    def from_file(cls, path, *, binary: Optional[bool] = None, **options) -> "Word2VecEncoder":
        """From a word2vec file (`.bin`: binary, else text; `binary` overrides) or a gensim
        `KeyedVectors.save` file (`.kv`)."""
        from gensim.models import KeyedVectors  # optional: pip install tt_jax[text]

        path = Path(path)
        if not path.is_file():
            raise SentenceError(f"no word vectors file at {path}; give a word2vec .bin/.txt or a gensim .kv file")
        try:
            if path.suffix == ".kv":
                vectors = KeyedVectors.load(str(path))
            else:
                is_binary = path.suffix == ".bin" if binary is None else binary
                vectors = KeyedVectors.load_word2vec_format(str(path), binary=is_binary)
        except (ValueError, EOFError, UnicodeDecodeError, OSError) as error:
            raise SentenceError(f"{path} is not a readable word vectors file ({error})") from None
        return cls(vectors, **options)

    def encode(self, sentence: str) -> EncodedSentence:
        if not isinstance(sentence, str):
            raise SentenceError(f"a query sentence must be a string, got {type(sentence).__name__}: {sentence!r}")
        if self.remove_stopwords:
            from gensim.parsing.preprocessing import remove_stopwords

            sentence = remove_stopwords(sentence)
        words, not_found = look_up_words(sentence, self._vocabulary, self.split, self.speller)
        if words:
            rows = np.array([self._vocabulary[word] for word in words], np.int64)
            features = np.asarray(self.vectors.vectors[rows], np.float32)
        else:
            features = self.unknown_vector[None, :]
        return EncodedSentence(features, tuple(words), tuple(not_found))


def token_features(
    sentences: Sequence[str], encoder: SentenceEncoder, max_tokens: int
) -> tuple[np.ndarray, list[EncodedSentence]]:
    """([Q, max_tokens, dim] float32 token features, zero past each sentence's last token and cut
    to its first max_tokens, as the feature store gives them; each sentence's EncodedSentence)."""
    if isinstance(sentences, str) or not len(sentences):
        raise SentenceError("sentences must be a non-empty list of strings, e.g. ['a man is cooking']")
    encoded = [encoder.encode(sentence) for sentence in sentences]
    features = np.zeros((len(encoded), max_tokens, encoder.dim), np.float32)
    for row, sentence in enumerate(encoded):
        if sentence.features.ndim != 2 or sentence.features.shape[1] != encoder.dim:
            raise SentenceError(
                f"the encoder gave features of shape {sentence.features.shape} for sentence {row}; "
                f"expected [tokens, {encoder.dim}]"
            )
        kept = sentence.features[:max_tokens]
        features[row, : len(kept)] = kept
    return features, encoded
