"""Caption denoising from teacher ranks (spec section 2.5) against an independent numpy oracle.

The oracle below is written from the spec, one caption at a time, and never calls the library:

    r_c = 1 + #{v != v_c : S(c, v) > S(c, v_c)}                 (optimistic ties)
    r_c += 0.5 * #{v != v_c : S(c, v) == S(c, v_c)}             ("average" ties)

with S either Phi (elementwise mean / min / max over the teachers) or one teacher's own matrix.
Rule "aggregate" keeps a caption iff its rank under Phi is <= R; "any" drops it when any teacher's
own rank exceeds R; "all" drops it only when every teacher's does. Videos left with no kept
caption leave training.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from tt_jax import parallel
from tt_jax.data.feature_store import FeatureStore, TokenTable
from tt_jax.denoising import caption_ranks, denoise, teacher_ranks
from tt_jax.denoising_settings import DenoisingError, DenoisingSettings, kept_captions
from tt_jax.teachers import PrecomputedTeacher

AGGREGATIONS = ("mean", "min", "max")
TIES = ("optimistic", "average")
RULES = ("aggregate", "any", "all")


# -- the oracle -----------------------------------------------------------------------------------


def oracle_phi(similarities: np.ndarray, aggregation: str) -> np.ndarray:
    """[Q, V] Phi of [T, Q, V] teacher similarities, in float64."""
    stack = np.asarray(similarities, np.float64)
    return {"mean": stack.mean(axis=0), "min": stack.min(axis=0), "max": stack.max(axis=0)}[aggregation]


def oracle_rank_rows(similarity: np.ndarray, targets, ties: str) -> np.ndarray:
    """[Q] rank of each query's own video in one [Q, V] matrix, by explicit counting."""
    ranks = np.empty(len(targets), np.float64)
    for query, target in enumerate(targets):
        own = similarity[query, target]
        better = equal = 0
        for video in range(similarity.shape[1]):
            if video == target:
                continue
            better += similarity[query, video] > own
            equal += similarity[query, video] == own
        ranks[query] = 1 + better + (0.5 * equal if ties == "average" else 0)
    return ranks


def oracle_ranks(similarities: np.ndarray, targets, aggregation: str, ties: str) -> np.ndarray:
    """[T + 1, Q]: row 0 under Phi, then each teacher's own ranks."""
    similarities = np.asarray(similarities, np.float64)
    rows = [oracle_rank_rows(oracle_phi(similarities, aggregation), targets, ties)]
    rows += [oracle_rank_rows(teacher, targets, ties) for teacher in similarities]
    return np.stack(rows)


def oracle_keep(ranks: np.ndarray, max_rank: int, rule: str) -> np.ndarray:
    """[Q] kept captions from the oracle's [T + 1, Q] ranks, caption by caption as the spec words it."""
    keep = np.empty(ranks.shape[1], bool)
    for query in range(ranks.shape[1]):
        worse = [rank > max_rank for rank in ranks[1:, query]]  # each teacher: rank worse than R
        if rule == "aggregate":
            keep[query] = ranks[0, query] <= max_rank
        elif rule == "any":
            keep[query] = not any(worse)
        else:  # "all"
            keep[query] = not all(worse)
    return keep


def assert_no_near_ties(similarities: np.ndarray, targets, tolerance: float = 1e-4):
    """Precondition of the continuous-value tests: no other video lies within `tolerance` of the
    own video's similarity, so float32 (library) and float64 (oracle) must order them alike."""
    stack = np.asarray(similarities, np.float64)
    matrices = [oracle_phi(stack, aggregation) for aggregation in AGGREGATIONS] + list(stack)
    for matrix in matrices:
        own = matrix[np.arange(len(targets)), targets][:, None]
        gap = np.abs(matrix - own)
        gap[np.arange(len(targets)), targets] = np.inf
        assert gap.min() > tolerance, "fixture has a near tie; pick another seed"


# -- caption_ranks and kept_captions on raw similarity matrices -----------------------------------

QUERIES, VIDEOS = 24, 9


def random_case(seed: int, teachers: int, kind: str):
    """[T, Q, V] float32 similarities and [Q] targets. kind: "continuous" (normal values),
    "integer" (values in {-2..2}: many exact ties) or "quarter" (normals rounded to multiples of
    0.25, exact in float32 and under the mean of up to 4 teachers)."""
    rng = np.random.default_rng(seed)
    values = rng.standard_normal((teachers, QUERIES, VIDEOS))
    if kind == "integer":
        values = rng.integers(-2, 3, (teachers, QUERIES, VIDEOS)).astype(np.float64)
    elif kind == "quarter":
        values = np.round(values * 4) / 4
    targets = rng.integers(0, VIDEOS, QUERIES)
    targets[:VIDEOS] = np.arange(VIDEOS)  # every column is somebody's own video
    return values.astype(np.float32), targets


@pytest.mark.parametrize("teachers", [1, 3])
@pytest.mark.parametrize("aggregation", AGGREGATIONS)
@pytest.mark.parametrize("ties", TIES)
def test_caption_ranks_match_the_oracle_on_random_similarities(teachers, aggregation, ties):
    """Continuous random similarities (no ties): every row of ranks (Phi's and each teacher's)
    and the kept captions of every rule and several R agree with the oracle."""
    for seed in range(3):
        similarities, targets = random_case(seed, teachers, "continuous")
        assert_no_near_ties(similarities, targets)
        expected = oracle_ranks(similarities, targets, aggregation, ties)
        got = np.asarray(caption_ranks(jnp.asarray(similarities), jnp.asarray(targets, jnp.int32),
                                       aggregation=aggregation, ties=ties))
        assert got.shape == (teachers + 1, QUERIES)
        np.testing.assert_array_equal(got, expected)
        for max_rank in (1, 3, VIDEOS // 2, VIDEOS):
            for rule in RULES:
                np.testing.assert_array_equal(kept_captions(got, max_rank, rule), oracle_keep(expected, max_rank, rule))


@pytest.mark.parametrize("kind", ["integer", "quarter"])
@pytest.mark.parametrize("teachers", [1, 3])
@pytest.mark.parametrize("aggregation", AGGREGATIONS)
@pytest.mark.parametrize("ties", TIES)
def test_caption_ranks_match_the_oracle_with_exact_ties(kind, teachers, aggregation, ties):
    """Similarities with many exact ties (with the own video too): optimistic ties count only
    strictly better videos, average ties add half of the tied ones; the values are exact in float32,
    so the oracle's float64 comparisons must agree exactly."""
    saw_own_tie = False
    for seed in range(3):
        similarities, targets = random_case(seed, teachers, kind)
        expected = oracle_ranks(similarities, targets, aggregation, ties)
        saw_own_tie |= bool(np.any(oracle_ranks(similarities, targets, aggregation, "average")
                                   != oracle_ranks(similarities, targets, aggregation, "optimistic")))
        got = np.asarray(caption_ranks(jnp.asarray(similarities), jnp.asarray(targets, jnp.int32),
                                       aggregation=aggregation, ties=ties))
        np.testing.assert_array_equal(got, expected)
        for max_rank in (1, 2, VIDEOS // 2, VIDEOS - 1):
            for rule in RULES:
                np.testing.assert_array_equal(kept_captions(got, max_rank, rule), oracle_keep(expected, max_rank, rule))
    assert saw_own_tie, "the fixture should tie some caption's own video with another"


def test_average_ties_are_half_a_rank_per_tied_video():
    """A hand-checked row: own value 1 with two better and three equal videos."""
    row = np.array([[[1.0, 2.0, 1.0, 3.0, 1.0, 0.0, 1.0]]], np.float32)  # own video: column 0
    targets = jnp.zeros(1, jnp.int32)
    assert float(caption_ranks(jnp.asarray(row), targets, ties="optimistic")[0, 0]) == 3.0
    assert float(caption_ranks(jnp.asarray(row), targets, ties="average")[0, 0]) == 3.0 + 1.5
    assert oracle_rank_rows(row[0], [0], "average")[0] == 4.5


def test_kept_captions_rejects_an_unknown_rule():
    with pytest.raises(DenoisingError, match="rule"):
        kept_captions(np.ones((2, 3)), 1, "most")


# -- denoise end to end with precomputed teachers -------------------------------------------------

NUM_VIDEOS, SLOTS, DIM = 10, 3, 4
# Two precomputed teachers stored under other keys than their names, with different experts.
TEACHERS = (
    PrecomputedTeacher("alpha", ("e1", "e2"), stored_name="w2v"),
    PrecomputedTeacher("beta", ("e1",), stored_name="gpt2-xl"),
)


def denoising_store(seed: int) -> FeatureStore:
    """A small training split with integer-valued teacher embeddings (exact similarities):

    * video 1 has an empty caption slot (caption_mask 0, length 0 in the TokenTable), whose stored
      teacher text embeddings are garbage pointing at its own video (they must be ignored);
    * video 0 is pure noise: its video embedding is 3 * ones and its captions point the other
      way, so every teacher ranks every one of its captions last (it loses all its captions);
    * videos 2 and 3 share their teacher video embeddings, so the captions of both tie their own
      video with another one under every teacher.
    """
    rng = np.random.default_rng(seed)
    counts = rng.integers(1, SLOTS + 1, NUM_VIDEOS)
    counts[0], counts[1], counts[2], counts[3] = SLOTS, SLOTS - 1, SLOTS, SLOTS
    caption_mask = np.arange(SLOTS) < counts[:, None]
    lengths = np.where(caption_mask, rng.integers(1, 3, (NUM_VIDEOS, SLOTS)), 0)
    tokens = rng.standard_normal((NUM_VIDEOS, SLOTS, 2, 3)).astype(np.float32)
    teachers = {}
    for teacher in TEACHERS:
        video, text = {}, {}
        for expert in teacher.experts:
            video[expert] = rng.integers(-2, 3, (NUM_VIDEOS, DIM)).astype(np.float32)
            video[expert][0] = 3.0
            video[expert][3] = video[expert][2]
            text[expert] = rng.integers(-2, 3, (NUM_VIDEOS, SLOTS, DIM)).astype(np.float32)
            text[expert][0] = -1.0
            text[expert][~caption_mask] = 5 * video[expert][np.nonzero(~caption_mask)[0]]
        teachers[teacher.key] = {"video": video, "text": text}
    return FeatureStore(
        video_ids=tuple(f"video{index}" for index in range(NUM_VIDEOS)),
        experts={"scene": rng.standard_normal((NUM_VIDEOS, 3)).astype(np.float32)},
        availability={"scene": np.ones(NUM_VIDEOS)},
        text={"w2v": TokenTable.from_padded(tokens, lengths)},
        teacher_embeddings=teachers,
    )


def oracle_similarities(store: FeatureStore, teachers=TEACHERS) -> np.ndarray:
    """[T, V * K, V]: each precomputed teacher's plain sum over experts of text . video."""
    matrices = []
    for teacher in teachers:
        stored = store.teacher_embeddings[teacher.key]
        total = np.zeros((store.num_videos * store.max_captions, store.num_videos))
        for expert in stored["video"]:
            text = np.asarray(stored["text"][expert], np.float64).reshape(-1, DIM)
            total += text @ np.asarray(stored["video"][expert], np.float64).T
        matrices.append(total)
    return np.stack(matrices)


def oracle_denoising(store: FeatureStore, settings: DenoisingSettings, teachers=TEACHERS):
    """(ranks [T + 1, V, K] with NaN on empty slots, keep [V, K]) by the oracle."""
    targets = np.repeat(np.arange(store.num_videos), store.max_captions)
    ranks = oracle_ranks(oracle_similarities(store, teachers), targets, settings.aggregation, settings.ties)
    ranks = ranks.reshape(-1, store.num_videos, store.max_captions)
    real = store.caption_mask > 0
    ranks[:, ~real] = np.nan
    keep = oracle_keep(np.nan_to_num(ranks, nan=np.inf).reshape(len(ranks), -1), settings.max_rank, settings.rule)
    return ranks, keep.reshape(real.shape) & real


MAX_RANK = 4


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("ties", TIES)
def test_denoise_matches_the_oracle(seed, rule, ties):
    """Keep masks, ranks (NaN on the empty slot) and every summary count equal the oracle's; the
    fixture's noisy video loses every caption and leaves training."""
    store = denoising_store(seed)
    settings = DenoisingSettings(max_rank=MAX_RANK, rule=rule, ties=ties)
    ranks, keep = oracle_denoising(store, settings)
    real = store.caption_mask > 0
    assert not keep[0].any(), "fixture: video 0 should lose all its captions"
    assert np.isnan(ranks[:, 1, SLOTS - 1]).all(), "fixture: video 1's last slot is empty"

    result = denoise(TEACHERS, {}, store, settings)
    np.testing.assert_array_equal(result.ranks, ranks.astype(np.float32))
    np.testing.assert_array_equal(result.keep, keep)
    assert result.keep.dtype == bool and result.keep.shape == (NUM_VIDEOS, SLOTS)

    summary = result.summary
    videos_left = int(keep.any(axis=1).sum())
    assert summary["settings"] == {"max_rank": MAX_RANK, "rule": rule, "aggregation": "mean", "ties": ties}
    assert summary["training_videos"] == NUM_VIDEOS
    assert summary["captions"] == int(real.sum())
    assert summary["captions_kept"] == int(keep.sum())
    assert summary["videos_dropped"] == NUM_VIDEOS - videos_left >= 1
    assert summary["fraction_dropped"] == pytest.approx(1 - keep.sum() / real.sum())
    assert summary["median_rank"] == pytest.approx(np.median(ranks[0][real]))
    for index, teacher in enumerate(TEACHERS):
        dropped = np.mean(ranks[1 + index][real] > MAX_RANK)
        assert summary["fraction_dropped_per_teacher"][teacher.name] == pytest.approx(dropped)


def test_the_fixture_exercises_ties_and_distinguishes_the_rules():
    """Preconditions of the end-to-end tests: the tie modes give different ranks, and the three
    rules (and the aggregations) do not all give one mask, so each wiring is really compared."""
    for seed in (0, 1):
        store = denoising_store(seed)
        optimistic, _ = oracle_denoising(store, DenoisingSettings(MAX_RANK, ties="optimistic"))
        average, _ = oracle_denoising(store, DenoisingSettings(MAX_RANK, ties="average"))
        assert np.nanmax(average - optimistic) >= 0.5
        masks = {rule: oracle_denoising(store, DenoisingSettings(MAX_RANK, rule=rule))[1] for rule in RULES}
        assert not np.array_equal(masks["any"], masks["all"])
        ranks = {a: oracle_denoising(store, DenoisingSettings(MAX_RANK, aggregation=a))[0][0] for a in AGGREGATIONS}
        assert not np.array_equal(ranks["min"], ranks["max"], equal_nan=True)


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_denoise_aggregations_match_the_oracle(aggregation):
    """Phi's rank row and the aggregate rule's mask follow the chosen aggregation."""
    store = denoising_store(0)
    settings = DenoisingSettings(max_rank=MAX_RANK, aggregation=aggregation, ties="average")
    ranks, keep = oracle_denoising(store, settings)
    result = denoise(TEACHERS, {}, store, settings)
    np.testing.assert_array_equal(result.ranks, ranks.astype(np.float32))
    np.testing.assert_array_equal(result.keep, keep)


def test_ranks_do_not_depend_on_chunking():
    """chunk_videos 1, 2 and V (on one device, where the chunk is exactly that) and the default
    eight-device mesh (chunks rounded up to 8, the last one padded) give identical ranks."""
    store = denoising_store(0)
    expected, _ = oracle_denoising(store, DenoisingSettings(MAX_RANK, ties="average"))
    one_device = parallel.make_mesh(1)
    for mesh in (one_device, None):
        for chunk in (1, 2, 3, NUM_VIDEOS):
            ranks = teacher_ranks(TEACHERS, {}, store, ties="average", mesh=mesh, chunk_videos=chunk)
            np.testing.assert_array_equal(ranks, expected.astype(np.float32))


def test_denoising_that_drops_every_caption_raises():
    """Every caption points away from its own video (one-hot videos, negated captions): each is
    ranked last, so R = V - 1 leaves nothing to train on under every rule."""
    videos = 4
    eye = np.eye(videos, dtype=np.float32)
    store = FeatureStore(
        video_ids=("a", "b", "c", "d"),
        experts={"scene": np.zeros((videos, 2), np.float32)},
        availability={"scene": np.ones(videos)},
        text={"w2v": TokenTable.from_padded(np.ones((videos, 2, 1, 2)), np.ones((videos, 2)))},
        teacher_embeddings={"w2v": {"video": {"e": eye}, "text": {"e": -np.repeat(eye[:, None], 2, axis=1)}}},
    )
    teachers = (PrecomputedTeacher("only", ("e",), "w2v"),)
    for rule in RULES:
        settings = DenoisingSettings(max_rank=videos - 1, rule=rule)
        _, keep = oracle_denoising(store, settings, teachers)
        assert not keep.any(), "fixture: the oracle should drop every caption"
        with pytest.raises(DenoisingError, match=r"max_rank 3 .* removes every one of the 8 training captions"):
            denoise(teachers, {}, store, settings)
    # The same store keeps everything once R reaches V.
    assert denoise(teachers, {}, store, DenoisingSettings(max_rank=videos)).keep.all()


def test_denoise_without_teachers_or_their_embeddings_raises():
    store = denoising_store(0)
    with pytest.raises(DenoisingError, match="has none"):
        denoise((), {}, store, DenoisingSettings(MAX_RANK))
    with pytest.raises(DenoisingError, match="'openai'"):
        denoise((PrecomputedTeacher("gamma", ("e1",), "openai"),), {}, store, DenoisingSettings(MAX_RANK))


@pytest.mark.parametrize("max_rank", [0, -1, 2.5, True, "3", None])
def test_settings_reject_a_max_rank_that_is_not_a_positive_whole_number(max_rank):
    with pytest.raises(DenoisingError, match="max_rank"):
        DenoisingSettings(max_rank=max_rank)


@pytest.mark.parametrize("field", ["rule", "aggregation", "ties"])
def test_settings_reject_unknown_choices(field):
    with pytest.raises(DenoisingError, match=rf"denoising\.{field} is 'bogus'"):
        DenoisingSettings(max_rank=5, **{field: "bogus"})


def test_settings_accept_every_valid_choice():
    """Every rule and tie mode; the aggregation only with the rule that reads it."""
    for rule in RULES:
        for aggregation in AGGREGATIONS if rule == "aggregate" else ("mean",):
            for ties in TIES:
                settings = DenoisingSettings(1, rule, aggregation, ties)
                assert settings.to_dict() == {"max_rank": 1, "rule": rule, "aggregation": aggregation, "ties": ties}


@pytest.mark.parametrize("rule", ["any", "all"])
def test_an_aggregation_the_rule_does_not_read_is_refused(rule):
    with pytest.raises(DenoisingError, match="leave the aggregation"):
        DenoisingSettings(5, rule, "max")
