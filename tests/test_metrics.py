"""Retrieval metrics: exact parity with the reference fixtures and a sort-based re-derivation."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from reference_fixtures import METRICS, MODEL, discover
from tt_jax import metrics

METRIC_NAMES = ("R1", "R5", "R10", "R50", "MedR", "MeanR", "geometric_mean_R1-R5-R10")
EXTRA_METRIC_NAMES = ("R100", "SumR")
MODEL_FIXTURES = discover(MODEL)
METRICS_FIXTURES = discover(METRICS)


# ---------------------------------------------------------------------------------------------
# An independent implementation of the reference procedure (model/metric.py): sort each row of
# distances, then average the positions where the ground truth's distance sits. It shares no
# code with tt_jax.metrics.
# ---------------------------------------------------------------------------------------------


def sort_based_text_to_video_ranks(sims, query_masks):
    """[real captions] tie-averaged ranks, in row order."""
    num_rows, num_videos = sims.shape
    captions_per_video = num_rows // num_videos
    distances = -sims
    sorted_distances = np.sort(distances, axis=1)
    relevant = distances[np.arange(num_rows), np.arange(num_rows) // captions_per_video]
    rows, positions = np.where(sorted_distances - relevant[:, None] == 0)
    ranks = np.bincount(rows, weights=positions, minlength=num_rows) / np.bincount(
        rows, minlength=num_rows
    )
    return ranks[query_masks.reshape(-1) != 0]


def sort_based_video_to_text_ranks(sims, query_masks):
    """[V] best rank over each video's captions; masked captions sit at distance 1e8."""
    num_rows, num_videos = sims.shape
    captions_per_video = num_rows // num_videos
    missing_distance = 1e8
    column_distances = -sims.T  # [V, V*K]
    column_distances[:, query_masks.reshape(-1) == 0] = missing_distance
    ranks = []
    for video in range(num_videos):
        column = column_distances[video]
        sorted_column = np.sort(column)
        best = np.inf
        for row in range(video * captions_per_video, (video + 1) * captions_per_video):
            if column[row] == missing_distance:
                continue
            best = min(best, np.where(sorted_column - column[row] == 0)[0].mean())
        ranks.append(best)
    return np.array(ranks, dtype=np.float64)


def sort_based_corrected_video_to_text_ranks(sims, query_masks):
    """The corrected v2t: masked captions are not candidates, no real caption is skipped."""
    num_rows, num_videos = sims.shape
    captions_per_video = num_rows // num_videos
    is_real = query_masks.reshape(-1) != 0
    ranks = []
    for video in range(num_videos):
        own_rows = np.arange(video * captions_per_video, (video + 1) * captions_per_video)
        own_real = own_rows[is_real[own_rows]]
        if own_real.size == 0:
            ranks.append(np.inf)
            continue
        sorted_distances = np.sort(-sims[is_real, video])
        positions = [
            np.where(sorted_distances - (-sims[row, video]) == 0)[0].mean() for row in own_real
        ]
        ranks.append(min(positions))
    return np.array(ranks, dtype=np.float64)


def reference_style_metrics(ranks, num_queries):
    """cols2metrics without the geometric mean (compared separately, see below)."""
    return {
        "R1": 100 * float(np.sum(ranks == 0)) / num_queries,
        "R5": 100 * float(np.sum(ranks < 5)) / num_queries,
        "R10": 100 * float(np.sum(ranks < 10)) / num_queries,
        "R50": 100 * float(np.sum(ranks < 50)) / num_queries,
        "MedR": np.median(ranks) + 1,
        "MeanR": np.mean(ranks) + 1,
    }


def random_evaluation(seed, num_videos, captions_per_video, decimals=1, missing=0.2):
    """Rounded scores (many exact ties, some with the ground truth) and random missing captions."""
    rng = np.random.default_rng(seed)
    num_rows = num_videos * captions_per_video
    sims = rng.standard_normal((num_rows, num_videos))
    sims[np.arange(num_rows), np.arange(num_rows) // captions_per_video] += 1.0
    sims = np.round(sims, decimals).astype(np.float32)
    masks = (rng.random((num_videos, captions_per_video)) > missing).astype(np.float64)
    masks[:, 0] = 1.0  # every video keeps at least one caption
    return sims, masks


def as_input(sims, kind):
    return jnp.asarray(sims) if kind == "device" else sims


# ---------------------------------------------------------------------------------------------
# Reference fixtures.
# ---------------------------------------------------------------------------------------------


def fixture_mismatches(actual_metrics, actual_ranks, expected):
    """Every quantity that differs, as readable strings; `expected(key)` reads a stored array."""
    problems = []
    for direction in ("t2v", "v2t"):
        for name in METRIC_NAMES:
            want = float(expected(f"{direction}/{name}"))
            got = actual_metrics[direction][name]
            if got != want:
                problems.append(f"{direction}/{name}: {got!r} != {want!r}")
    for direction, got in (
        ("t2v_ranks", actual_ranks.text_to_video),
        ("v2t_ranks", actual_ranks.video_to_text),
    ):
        want = expected(direction)
        if got.shape != want.shape or not np.array_equal(got, want):
            problems.append(f"{direction}: {got.tolist()} != {want.tolist()}")
    return problems


@pytest.fixture(scope="module")
def cases():
    """The arrays of every metrics fixture in the folder (case names are unique across files)."""
    assert METRICS_FIXTURES, "no metrics fixture (case/<name>/sims) in the fixture folder"
    merged = {}
    for fixture in METRICS_FIXTURES:
        merged.update(fixture.arrays())
    return merged


def metric_case_names(cases):
    return sorted(
        match.group(1) for key in cases if (match := re.fullmatch(r"case/(.+)/sims", key))
    )


def test_metric_cases_are_discovered_from_the_file():
    """Every case a metrics fixture stores is found, and it stores those its json documents."""
    assert METRICS_FIXTURES, "no metrics fixture (case/<name>/sims) in the fixture folder"
    for fixture in METRICS_FIXTURES:
        names = metric_case_names(fixture.arrays())
        assert names, f"{fixture.name}: no case/<name>/sims"
        documented = fixture.meta().get("cases")
        if documented is not None:
            documented = sorted(documented)
            assert names == documented, f"{fixture.name}: stores {names}, documents {documented}"


def require_case(cases, name):
    """Tests of one named behaviour run on the case that shows it, and are skipped without it."""
    if f"case/{name}/sims" not in cases:
        pytest.skip(f"no metrics fixture in the folder holds the case {name!r}")


@pytest.mark.parametrize("kind", ["host", "device"])
@pytest.mark.parametrize("chunk_size", [None, 3])
def test_every_metric_case_matches_the_reference_exactly(cases, kind, chunk_size):
    problems = []
    for name in metric_case_names(cases):
        prefix = f"case/{name}/"
        got_metrics, got_ranks = metrics.retrieval_metrics_and_ranks(
            as_input(cases[prefix + "sims"], kind),
            cases[prefix + "query_masks"],
            chunk_size=chunk_size,
        )
        problems += [
            f"{name}: {problem}"
            for problem in fixture_mismatches(got_metrics, got_ranks, lambda key: cases[prefix + key])
        ]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("kind", ["host", "device"])
@pytest.mark.parametrize("model_fixture", MODEL_FIXTURES, ids=lambda f: f.name)
def test_model_fixture_eval_metrics_match_the_reference_exactly(model_fixture, kind):
    fixture = model_fixture.arrays()
    got_metrics, got_ranks = metrics.retrieval_metrics_and_ranks(
        as_input(fixture["eval/out/sims"], kind), fixture["eval/in/query_masks"]
    )
    problems = fixture_mismatches(got_metrics, got_ranks, lambda key: fixture[f"eval/out/{key}"])
    assert not problems, "\n".join(problems)


def test_retrieval_metrics_returns_the_two_metric_dicts(cases):
    name = metric_case_names(cases)[0]
    prefix = f"case/{name}/"
    result = metrics.retrieval_metrics(cases[prefix + "sims"], cases[prefix + "query_masks"])
    assert set(result) == {"t2v", "v2t"}
    for direction in ("t2v", "v2t"):
        assert tuple(result[direction]) == METRIC_NAMES + EXTRA_METRIC_NAMES
        assert result[direction]["R1"] == cases[f"{prefix}{direction}/R1"]


# ---------------------------------------------------------------------------------------------
# The sentinel quirk and its corrected variant.
# ---------------------------------------------------------------------------------------------


def test_corrected_sentinel_option_matches_an_independent_computation(cases):
    require_case(cases, "sentinel_quirk")
    sims = cases["case/sentinel_quirk/sims"]
    masks = cases["case/sentinel_quirk/query_masks"]
    faithful_v2t = cases["case/sentinel_quirk/v2t_ranks"]
    faithful_t2v = cases["case/sentinel_quirk/t2v_ranks"]
    got_metrics, got_ranks = metrics.retrieval_metrics_and_ranks(
        sims, masks, missing_caption_sentinel=False
    )
    expected_v2t = sort_based_corrected_video_to_text_ranks(sims, masks)
    np.testing.assert_array_equal(got_ranks.video_to_text, expected_v2t)
    assert not np.array_equal(expected_v2t, faithful_v2t)  # the case does exercise the quirk
    np.testing.assert_array_equal(got_ranks.text_to_video, faithful_t2v)  # t2v is unaffected
    assert got_metrics["v2t"]["MeanR"] == np.mean(expected_v2t) + 1


def test_sentinel_options_agree_when_no_similarity_reaches_minus_1e8():
    sims, masks = random_evaluation(seed=3, num_videos=9, captions_per_video=4)
    _, faithful = metrics.retrieval_ranks(sims, masks)
    _, corrected = metrics.retrieval_ranks(sims, masks, missing_caption_sentinel=False)
    np.testing.assert_array_equal(faithful, corrected)
    np.testing.assert_array_equal(corrected, sort_based_corrected_video_to_text_ranks(sims, masks))


def test_video_without_rankable_caption_has_infinite_rank():
    sims, masks = random_evaluation(seed=4, num_videos=5, captions_per_video=2)
    masks[2] = 0.0
    for sentinel in (True, False):
        _, v2t_ranks = metrics.retrieval_ranks(sims, masks, missing_caption_sentinel=sentinel)
        assert np.isinf(v2t_ranks[2])
    got = metrics.retrieval_metrics(sims, masks)
    assert got["v2t"]["MeanR"] == np.inf


# ---------------------------------------------------------------------------------------------
# Agreement with the sort-based re-derivation on random matrices with ties and masks.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "seed, num_videos, captions_per_video, decimals",
    [(0, 13, 1, 1), (1, 11, 5, 1), (2, 40, 3, 2), (3, 7, 20, 0), (4, 64, 2, 1)],
)
@pytest.mark.parametrize("kind", ["host", "device"])
def test_matches_sort_based_reference_procedure(
    seed, num_videos, captions_per_video, decimals, kind
):
    sims, masks = random_evaluation(seed, num_videos, captions_per_video, decimals)
    got_metrics, got_ranks = metrics.retrieval_metrics_and_ranks(as_input(sims, kind), masks)
    expected = {
        "t2v": (sort_based_text_to_video_ranks(sims, masks), masks.sum()),
        "v2t": (sort_based_video_to_text_ranks(sims, masks), num_videos),
    }
    np.testing.assert_array_equal(got_ranks.text_to_video, expected["t2v"][0])
    np.testing.assert_array_equal(got_ranks.video_to_text, expected["v2t"][0])
    for direction, (ranks, num_queries) in expected.items():
        want = reference_style_metrics(ranks, num_queries)
        assert {name: got_metrics[direction][name] for name in want} == want
        # scipy here uses libm's log/exp, so only the reference machine's digits differ.
        assert got_metrics[direction]["geometric_mean_R1-R5-R10"] == pytest.approx(
            scipy.stats.mstats.gmean([want["R1"], want["R5"], want["R10"]]), rel=1e-14, abs=0
        )


def test_subnormal_and_signed_zero_similarities_rank_like_numpy():
    # XLA on CPU flushes subnormals to zero; the integer keys must not.
    tiny = np.float32(1e-45)
    sims = np.array(
        [[tiny, 2 * tiny, 0.0], [-0.0, 0.0, tiny], [3 * tiny, -tiny, 3 * tiny]], np.float32
    )
    masks = np.ones((3, 1))
    t2v_ranks, v2t_ranks = metrics.retrieval_ranks(sims, masks)
    np.testing.assert_array_equal(t2v_ranks, sort_based_text_to_video_ranks(sims, masks))
    np.testing.assert_array_equal(v2t_ranks, sort_based_video_to_text_ranks(sims, masks))


# ---------------------------------------------------------------------------------------------
# Chunking, devices, dtypes, jit.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["host", "device"])
@pytest.mark.parametrize("chunk_size", [1, 7, 29, 1000])
def test_chunk_size_does_not_change_ranks(kind, chunk_size):
    sims, masks = random_evaluation(seed=5, num_videos=30, captions_per_video=3)  # 90 rows
    one_block = metrics.retrieval_ranks(sims, masks, chunk_size=sims.shape[0])
    chunked = metrics.retrieval_ranks(as_input(sims, kind), masks, chunk_size=chunk_size)
    for whole, pieces in zip(one_block, chunked):
        np.testing.assert_array_equal(np.asarray(pieces), np.asarray(whole))


def test_ranks_cover_every_row_including_masked_ones():
    sims, masks = random_evaluation(seed=6, num_videos=6, captions_per_video=3)
    t2v_ranks, v2t_ranks = metrics.retrieval_ranks(sims, masks)
    assert t2v_ranks.shape == (18,) and v2t_ranks.shape == (6,)
    assert t2v_ranks.dtype == jnp.float32
    np.testing.assert_array_equal(
        t2v_ranks, sort_based_text_to_video_ranks(sims, np.ones_like(masks))
    )


def test_unchecked_core_is_jittable():
    sims, masks = random_evaluation(seed=7, num_videos=10, captions_per_video=2)

    @jax.jit
    def ranks_of_scaled(similarities, query_masks):
        return metrics.unchecked_retrieval_ranks(2.0 * similarities, query_masks, chunk_size=6)

    for got, want in zip(ranks_of_scaled(sims, masks), metrics.retrieval_ranks(sims, masks)):
        np.testing.assert_array_equal(got, want)


def test_float64_is_compared_in_float32_unless_x64_is_enabled():
    sims = np.array([[1.0, 1.0 + 1e-12], [0.5, 0.2]])  # distinct only in float64
    masks = np.ones((2, 1))
    t2v_ranks, _ = metrics.retrieval_ranks(sims, masks)
    np.testing.assert_array_equal(t2v_ranks, [0.5, 1.0])  # a float32 tie
    with jax.enable_x64(True):
        for sims_input in (sims, jnp.asarray(sims)):
            t2v_ranks, _ = metrics.retrieval_ranks(sims_input, masks)
            np.testing.assert_array_equal(t2v_ranks, sort_based_text_to_video_ranks(sims, masks))


def test_half_precision_is_widened_exactly():
    sims, masks = random_evaluation(seed=8, num_videos=8, captions_per_video=2)
    half = sims.astype(np.float16)
    got = metrics.retrieval_ranks(jnp.asarray(half, jnp.bfloat16), masks)
    want = metrics.retrieval_ranks(np.asarray(jnp.asarray(half, jnp.bfloat16), np.float32), masks)
    for got_ranks, want_ranks in zip(got, want):
        np.testing.assert_array_equal(got_ranks, want_ranks)


# ---------------------------------------------------------------------------------------------
# Bad input.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "sims, masks, message",
    [
        (np.zeros(6, np.float32), None, "2-D"),
        (np.zeros((2, 3, 3), np.float32), None, "2-D"),
        (np.zeros((0, 0), np.float32), None, "empty"),
        (np.zeros((0, 4), np.float32), None, "empty"),
        (np.zeros((10, 3), np.float32), None, "not a multiple of its 3 columns"),
        (np.zeros((6, 3), np.float32), np.ones((3, 3)), r"query_masks has shape \(3, 3\)"),
        (np.zeros((6, 3), np.float32), np.full((3, 2), 0.5), "only 0 and 1"),
        (np.zeros((6, 3), np.float32), np.full((3, 2), np.nan), "only 0 and 1"),
        (np.zeros((6, 3), np.int32), np.ones((3, 2)), "floating point"),
    ],
)
def test_bad_layout_raises_a_clear_error(sims, masks, message):
    with pytest.raises(ValueError, match=message):
        metrics.retrieval_metrics(sims, masks)


@pytest.mark.parametrize("kind", ["host", "device"])
def test_non_finite_similarities_are_counted_once_and_located(kind):
    sims, masks = random_evaluation(seed=9, num_videos=5, captions_per_video=2)  # 10 rows
    sims[7, 1] = np.nan  # row 7 is in a middle block and in the shifted last block (rows 6-9)
    sims[9, 4] = np.inf
    with pytest.raises(ValueError, match=r"2 non-finite .* nan at row 7, column 1"):
        metrics.retrieval_metrics(as_input(sims, kind), masks, chunk_size=4)


def test_bad_chunk_size_raises():
    sims, masks = random_evaluation(seed=10, num_videos=4, captions_per_video=1)
    with pytest.raises(ValueError, match="chunk_size"):
        metrics.retrieval_ranks(sims, masks, chunk_size=0)


# ---------------------------------------------------------------------------------------------
# Metrics from ranks and the geometric mean.
# ---------------------------------------------------------------------------------------------


def test_tie_at_the_top_is_not_an_r1_hit():
    got = metrics.metrics_from_ranks(np.array([0.0, 0.5, 1.0, 60.0]), 4)
    assert got["R1"] == 25.0 and got["R5"] == 75.0 and got["R50"] == 75.0
    assert got["MedR"] == 1.75 and got["MeanR"] == 16.375


def test_r100_counts_ranks_below_100_and_sumr_adds_r1_r5_r10_r100():
    ranks = np.array([0.0, 3.0, 7.0, 99.0, 99.5, 100.0, 2e6])  # 99.5 (a tie) is below 100, 100 is not
    got = metrics.metrics_from_ranks(ranks, 8)  # one more query than ranks: the denominator is given
    assert got["R100"] == 100 * 5 / 8
    assert got["SumR"] == 100 * (1 + 2 + 3 + 5) / 8


def test_geometric_mean_is_exp_mean_log_not_exact():
    # 20 queries: 1 at rank 0, 1 more below 5, 2 more below 10 -> R1, R5, R10 = 5, 10, 20.
    ranks = np.array([0, 1, 5, 6] + [30] * 16, dtype=np.float64)
    got = metrics.metrics_from_ranks(ranks, 20)
    assert (got["R1"], got["R5"], got["R10"]) == (5.0, 10.0, 20.0)
    assert got["geometric_mean_R1-R5-R10"] == 9.999999999999998
