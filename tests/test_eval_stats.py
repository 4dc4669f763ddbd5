"""Known-answer tests of ``pipelines.eval.stats`` (answers by hand or from the literature).

``hypothesis`` is not installed in this environment, so the property checks below are plain
parametrized tests over seeded random inputs.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from fractions import Fraction

import numpy as np
import pytest
from scipy import stats

from pipelines.eval.stats import (
    McNemar,
    mcnemar_exact,
    mean_interval,
    paired_mean_test,
    pass_at_k,
    proportion_mean_interval,
    welch_test,
    wilson_interval,
)

# --- wilson_interval ---------------------------------------------------------------------------


def test_wilson_8_of_10_known_answer() -> None:
    # z = 1.959964: center = (0.8 + z^2/20) / (1 + z^2/10) = 0.716743,
    # half = z / (1 + z^2/10) * sqrt(0.016 + z^2/400) = 0.226578.
    low, high = wilson_interval(8, 10)
    assert low == pytest.approx(0.490, abs=1e-3)
    assert high == pytest.approx(0.943, abs=1e-3)
    assert (low, high) == pytest.approx((0.716743 - 0.226578, 0.716743 + 0.226578), abs=1e-5)


def test_wilson_zero_successes_is_not_degenerate() -> None:
    # The Wald interval would be (0, 0); Wilson's upper end is (z^2/n) / (1 + z^2/n).
    z2 = stats.norm.ppf(0.975) ** 2
    low, high = wilson_interval(0, 10)
    assert low == 0.0
    assert high == pytest.approx((z2 / 10) / (1 + z2 / 10), rel=1e-9)
    assert high == pytest.approx(0.2775, abs=1e-4)


def test_wilson_empty_is_uninformative() -> None:
    assert wilson_interval(0, 0) == (0.0, 1.0)


@pytest.mark.parametrize("successes, n", [(0, 1), (1, 1), (3, 7), (50, 100), (99, 100), (1, 1000)])
@pytest.mark.parametrize("confidence", [0.8, 0.95, 0.99])
def test_wilson_matches_scipy_and_is_symmetric(successes: int, n: int, confidence: float) -> None:
    low, high = wilson_interval(successes, n, confidence)
    ref = stats.binomtest(successes, n).proportion_ci(confidence_level=confidence, method="wilson")
    assert (low, high) == pytest.approx((ref.low, ref.high), abs=1e-9)
    assert 0.0 <= low <= successes / n <= high <= 1.0
    flip_low, flip_high = wilson_interval(n - successes, n, confidence)
    assert (low, high) == pytest.approx((1.0 - flip_high, 1.0 - flip_low), abs=1e-12)


def test_wilson_widens_with_confidence_and_narrows_with_n() -> None:
    lo90, hi90 = wilson_interval(30, 60, 0.90)
    lo99, hi99 = wilson_interval(30, 60, 0.99)
    assert lo99 < lo90 and hi99 > hi90
    lo_big, hi_big = wilson_interval(300, 600)
    lo_small, hi_small = wilson_interval(30, 60)
    assert hi_big - lo_big < hi_small - lo_small


@pytest.mark.parametrize(
    "successes, n, confidence",
    [(-1, 10, 0.95), (11, 10, 0.95), (0, -1, 0.95), (5, 10, 0.0), (5, 10, 1.0), (5, 10, 95)],
)
def test_wilson_rejects_bad_input(successes: int, n: int, confidence: float) -> None:
    with pytest.raises(ValueError):
        wilson_interval(successes, n, confidence)


# --- mean_interval ------------------------------------------------------------------------------


def test_mean_interval_by_hand() -> None:
    # mean 3, s = sqrt(2.5), sem = sqrt(2.5 / 5) = 0.707107, t(0.975, df=4) = 2.776445.
    low, high = mean_interval([1.0, 2.0, 3.0, 4.0, 5.0])
    half = 2.776445 * math.sqrt(0.5)
    assert (low, high) == pytest.approx((3.0 - half, 3.0 + half), abs=1e-5)
    assert (low, high) == pytest.approx((1.036757, 4.963243), abs=1e-5)


def test_mean_interval_two_points_at_90_percent() -> None:
    # mean 1, s = sqrt(2), sem = 1, t(0.95, df=1) = 6.313752.
    assert mean_interval([0.0, 2.0], 0.90) == pytest.approx((1 - 6.313752, 1 + 6.313752), abs=1e-5)


def test_mean_interval_degenerate_cases() -> None:
    low, high = mean_interval([])
    assert math.isnan(low) and math.isnan(high)
    assert mean_interval([7.5]) == (7.5, 7.5)
    assert mean_interval([2.0, 2.0, 2.0]) == pytest.approx((2.0, 2.0))


@pytest.mark.parametrize("seed", range(5))
def test_mean_interval_matches_scipy(seed: int) -> None:
    x = np.random.default_rng(seed).normal(1.0, 2.0, size=5 + 7 * seed)
    ref = stats.t.interval(0.95, df=x.size - 1, loc=x.mean(), scale=stats.sem(x))
    assert mean_interval(list(x)) == pytest.approx(ref, rel=1e-9)


def test_mean_interval_rejects_bad_confidence() -> None:
    with pytest.raises(ValueError):
        mean_interval([1.0, 2.0], confidence=1.5)


# --- mcnemar_exact ------------------------------------------------------------------------------


def test_mcnemar_ten_discordant_all_one_way() -> None:
    # 10 pairs where only b is right plus 10 where both are right: p = 2 * 0.5**10.
    a = [False] * 10 + [True] * 10
    b = [True] * 20
    result = mcnemar_exact(a, b)
    assert result == McNemar(n=20, a_only=0, b_only=10, delta=0.5, p_value=0.001953125)
    assert result.p_value == pytest.approx(2 * 0.5**10, rel=1e-12)
    flipped = mcnemar_exact(b, a)
    assert (flipped.a_only, flipped.b_only, flipped.delta) == (10, 0, -0.5)
    assert flipped.p_value == pytest.approx(0.001953125, rel=1e-12)


def test_mcnemar_one_against_five_by_hand() -> None:
    # Binomial(6, 1/2): P(X <= 1) + P(X >= 5) = (1 + 6 + 6 + 1) / 64.
    a = [True] + [False] * 5 + [True, False]
    b = [False] + [True] * 5 + [True, False]
    result = mcnemar_exact(a, b)
    assert (result.n, result.a_only, result.b_only) == (8, 1, 5)
    assert result.delta == pytest.approx(4 / 8)
    assert result.p_value == pytest.approx(14 / 64, rel=1e-12)


def test_mcnemar_balanced_or_no_discordance_gives_p_one() -> None:
    balanced = mcnemar_exact([True, False, True, False], [False, True, True, False])
    assert (balanced.a_only, balanced.b_only, balanced.delta, balanced.p_value) == (1, 1, 0.0, 1.0)
    same = mcnemar_exact([True, False, True], [True, False, True])
    assert (same.a_only, same.b_only, same.delta, same.p_value) == (0, 0, 0.0, 1.0)
    empty = mcnemar_exact([], [])
    assert (empty.n, empty.delta, empty.p_value) == (0, 0.0, 1.0)


def test_mcnemar_delta_is_accuracy_difference() -> None:
    rng = np.random.default_rng(0)
    a, b = rng.random(50) < 0.4, rng.random(50) < 0.6
    result = mcnemar_exact(list(a), list(b))
    assert result.delta == pytest.approx(b.mean() - a.mean())
    assert 0.0 <= result.p_value <= 1.0


def test_mcnemar_is_frozen() -> None:
    result = mcnemar_exact([True], [False])
    with pytest.raises(dataclasses.FrozenInstanceError):
        result.p_value = 0.0  # type: ignore[misc]


def test_mcnemar_length_mismatch_names_both_lengths() -> None:
    with pytest.raises(ValueError, match=r"3.*2"):
        mcnemar_exact([True, False, True], [True, False])


# --- pass_at_k ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "n, c, k, expected",
    [
        (10, 0, 1, 0.0),
        (10, 10, 5, 1.0),
        (10, 3, 1, 0.3),
        (5, 2, 2, 0.7),  # 1 - C(3, 2) / C(5, 2) = 1 - 3/10
        (10, 3, 8, 1.0),  # fewer than k wrong samples: every k-subset holds a right one
        (4, 1, 4, 1.0),
        (200, 1, 1, 0.005),
        (10, 3, 0, 0.0),
    ],
)
def test_pass_at_k_known_answers(n: int, c: int, k: int, expected: float) -> None:
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("n", range(1, 8))
def test_pass_at_k_matches_brute_force(n: int) -> None:
    for c in range(n + 1):
        correct = set(range(c))
        for k in range(1, n + 1):
            subsets = list(itertools.combinations(range(n), k))
            hits = sum(1 for s in subsets if correct.intersection(s))
            assert pass_at_k(n, c, k) == pytest.approx(hits / len(subsets), abs=1e-12), (n, c, k)


@pytest.mark.parametrize("n, c, k", [(1000, 500, 100), (2000, 3, 1000), (500, 1, 250)])
def test_pass_at_k_stable_for_large_n(n: int, c: int, k: int) -> None:
    exact = 1 - Fraction(math.comb(n - c, k), math.comb(n, k))
    value = pass_at_k(n, c, k)
    assert 0.0 <= value <= 1.0
    assert value == pytest.approx(float(exact), rel=1e-9)


def test_pass_at_k_is_monotone() -> None:
    n = 20
    for c in range(n + 1):
        values = [pass_at_k(n, c, k) for k in range(1, n + 1)]
        assert values == sorted(values)
    for k in range(1, n + 1):
        values = [pass_at_k(n, c, k) for c in range(n + 1)]
        assert values == sorted(values)


@pytest.mark.parametrize("n, c, k", [(5, 1, 6), (5, 6, 1), (-1, 0, 0), (5, -1, 1), (5, 1, -1)])
def test_pass_at_k_rejects_bad_input(n: int, c: int, k: int) -> None:
    with pytest.raises(ValueError):
        pass_at_k(n, c, k)


# --- paired_mean_test ---------------------------------------------------------------------------


def test_paired_mean_test_by_hand() -> None:
    # d = b - a = [1, 2, 0, 2]: mean 1.25, s = sqrt(2.75 / 3), t = 1.25 / (s / 2) = 2.611165, df 3.
    a = [1.0, 2.0, 3.0, 4.0]
    b = [2.0, 4.0, 3.0, 6.0]
    delta, p = paired_mean_test(a, b)
    t = 1.25 / (math.sqrt(2.75 / 3) / 2)
    assert t == pytest.approx(2.611165, abs=1e-6)
    assert delta == pytest.approx(1.25)
    assert p == pytest.approx(2 * stats.t.sf(t, df=3), rel=1e-9)
    assert 0.05 < p < 0.1


def test_paired_mean_test_sign_follows_b_minus_a() -> None:
    rng = np.random.default_rng(1)
    a = rng.normal(0.0, 1.0, size=40)
    b = a + 0.5 + rng.normal(0.0, 0.1, size=40)
    delta, p = paired_mean_test(list(a), list(b))
    assert delta > 0 and p < 1e-6
    delta_rev, p_rev = paired_mean_test(list(b), list(a))
    assert delta_rev == pytest.approx(-delta) and p_rev == pytest.approx(p)


def test_paired_mean_test_identical_and_degenerate() -> None:
    assert paired_mean_test([1.0, 2.0, 3.0], [1.0, 2.0, 3.0]) == (0.0, 1.0)
    assert paired_mean_test([0.5], [0.5]) == (0.0, 1.0)
    # The same difference on every pair: t is undefined; the exact sign-flip test gives 2 / 2**n
    # (two pairs that agree are no evidence at all), never a certain 0.
    assert paired_mean_test([1.0, 2.0, 3.0], [2.0, 3.0, 4.0]) == (1.0, 0.25)
    assert paired_mean_test([0.0, 0.0], [1.0, 1.0]) == (1.0, 0.5)
    assert paired_mean_test([0.0] * 10, [-1.0] * 10) == (-1.0, pytest.approx(2 / 1024))
    delta, p = paired_mean_test([1.0], [3.0])
    assert delta == 2.0 and math.isnan(p)
    delta, p = paired_mean_test([], [])
    assert math.isnan(delta) and math.isnan(p)


def test_proportion_mean_interval_wilson_for_0_1_rates_and_clipped_t_otherwise() -> None:
    assert proportion_mean_interval([1.0] * 5 + [0.0] * 5) == wilson_interval(5, 10)
    low, high = proportion_mean_interval([0.9, 1.0, 1.0, 0.95])
    assert high == 1.0 and low == pytest.approx(mean_interval([0.9, 1.0, 1.0, 0.95])[0])
    assert all(math.isnan(x) for x in proportion_mean_interval([]))
    low, high = proportion_mean_interval([0.5] * 20)  # every prompt 4 of 8: no spread, yet not certain
    assert low < 0.5 < high and (low, high) == wilson_interval(10.0, 20)
    with pytest.raises(ValueError, match=r"\[0, 1\].*1\.5"):
        proportion_mean_interval([0.5, 1.5])


def test_paired_mean_test_length_mismatch_names_both_lengths() -> None:
    with pytest.raises(ValueError, match=r"2.*3"):
        paired_mean_test([1.0, 2.0], [1.0, 2.0, 3.0])


def test_welch_test_matches_the_formula_by_hand() -> None:
    a, b = [0.50, 0.55, 0.45, 0.50, 0.52], [0.60, 0.70, 0.80, 0.75, 0.80]
    ma, mb = sum(a) / 5, sum(b) / 5
    va = sum((x - ma) ** 2 for x in a) / 4
    vb = sum((x - mb) ** 2 for x in b) / 4
    se2 = va / 5 + vb / 5
    t = (mb - ma) / math.sqrt(se2)
    df = se2**2 / ((va / 5) ** 2 / 4 + (vb / 5) ** 2 / 4)
    delta, p = welch_test(a, b)
    assert delta == pytest.approx(mb - ma)
    assert p == pytest.approx(2 * stats.t.sf(abs(t), df), rel=1e-9)
    assert math.isnan(welch_test([1.0], [2.0, 3.0])[1])
    assert math.isnan(welch_test([1.0, 1.0], [1.0, 1.0])[1])
