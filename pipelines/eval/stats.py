"""Small, pure statistics for reporting what a stage's model learned, with its uncertainty.

Every claim in an eval report is a number measured on a finite set of held-out prompts, so each
comes with an interval or a test:

- ``wilson_interval``: a proportion (an accuracy, a pass rate). The Wilson score interval stays
  inside [0, 1] and keeps its coverage near 0 and 1, where the normal (Wald) interval collapses to
  zero width (0/20 would "prove" an accuracy of exactly 0) or spills outside [0, 1].
- ``mean_interval``: a mean score (a reward), with Student's t, which is right for small samples.
- ``proportion_mean_interval``: a mean of per-prompt rates in [0, 1] (pass@k, the share of right
  samples): Wilson when every rate is 0 or 1 (then it is a proportion of prompts), otherwise
  Student's t kept inside [0, 1].
- ``mcnemar_exact``: two models graded on the *same* prompts. The pairs are not independent, so
  comparing two Wilson intervals is wrong (and weak); McNemar's exact test uses only the
  discordant pairs (one right, the other wrong), which is where the difference lives.
- ``pass_at_k``: the unbiased pass@k estimator of Chen et al. 2021 from n samples with c correct.
- ``paired_mean_test``: two models' scores on the same prompts, with a paired t-test (an exact
  sign-flip test when every pair differs by the same amount, where t is undefined).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats


def wilson_interval(successes: float, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion.

    Args:
        successes: The number of successes, ``0 <= successes <= n`` (a fractional count gives
            Wilson's formula at that proportion).
        n: The number of trials; ``n == 0`` gives the uninformative ``(0.0, 1.0)``.
        confidence: The two-sided confidence level, in (0, 1).

    Returns:
        ``(low, high)``, both in [0, 1].
    """
    if n < 0 or not 0 <= successes <= n:
        raise ValueError(f"need 0 <= successes <= n, got successes={successes}, n={n}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if n == 0:
        return 0.0, 1.0
    z = float(stats.norm.ppf(0.5 + confidence / 2.0))
    p = successes / n
    denom = 1.0 + z * z / n
    center = (p + z * z / (2.0 * n)) / denom
    half = z / denom * math.sqrt(p * (1.0 - p) / n + z * z / (4.0 * n * n))
    return max(0.0, center - half), min(1.0, center + half)


def mean_interval(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float]:
    """Student-t confidence interval of a mean.

    Args:
        values: The sample. With no values the result is ``(nan, nan)``; with one value (or with
            all values equal) it is the degenerate ``(mean, mean)``, since there is no spread.
        confidence: The two-sided confidence level, in (0, 1).

    Returns:
        ``(low, high)`` around the sample mean.
    """
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    x = np.asarray(values, dtype=float)
    if x.size == 0:
        return math.nan, math.nan
    mean = float(x.mean())
    if x.size < 2:
        return mean, mean
    sem = float(x.std(ddof=1)) / math.sqrt(x.size)
    half = float(stats.t.ppf(0.5 + confidence / 2.0, df=x.size - 1)) * sem
    return mean - half, mean + half


def proportion_mean_interval(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float]:
    """Confidence interval of the mean of per-item rates, each in [0, 1] (a prompt's pass@k, its
    share of right samples).

    When every rate is 0 or 1 the mean is a proportion of items and gets the Wilson interval: the
    t interval would spill past 1 (19 prompts right and one wrong: [0.845, 1.055]) or collapse to
    zero width when all items agree; rates that all agree at another value get Wilson's formula at
    that rate too. Otherwise it is ``mean_interval`` kept inside [0, 1].

    Returns:
        ``(low, high)`` in [0, 1]; ``(nan, nan)`` with no values.

    Raises:
        ValueError: a rate outside [0, 1].
    """
    x = np.asarray(values, dtype=float)
    if x.size and not np.all((x >= 0.0) & (x <= 1.0)):
        raise ValueError(f"rates must lie in [0, 1], got values from {x.min()} to {x.max()}")
    if x.size and np.all((x == 0.0) | (x == 1.0)):
        return wilson_interval(int(x.sum()), int(x.size), confidence)
    if x.size and np.all(x == x[0]):  # no spread (every prompt 4 of 8): t has zero width; Wilson's
        return wilson_interval(float(x.sum()), int(x.size), confidence)  # formula at p = that rate
    low, high = mean_interval(x, confidence)
    return (low, high) if x.size == 0 else (max(0.0, low), min(1.0, high))


def _check_paired(a: Sequence[object], b: Sequence[object]) -> None:
    if len(a) != len(b):
        raise ValueError(f"paired inputs differ in length: a has {len(a)}, b has {len(b)}")


@dataclass(frozen=True)
class McNemar:
    """McNemar's exact test of two models graded on the same items.

    Attributes:
        n: The number of pairs.
        a_only: Pairs where ``a`` is right and ``b`` is wrong.
        b_only: Pairs where ``b`` is right and ``a`` is wrong.
        delta: ``(b_only - a_only) / n``, the accuracy of ``b`` minus that of ``a`` (0.0 if n == 0).
        p_value: Two-sided exact binomial p-value on the discordant pairs (1.0 if there are none).
    """

    n: int
    a_only: int
    b_only: int
    delta: float
    p_value: float


def mcnemar_exact(a_correct: Sequence[bool], b_correct: Sequence[bool]) -> McNemar:
    """Compare the accuracies of two models on the same items with McNemar's exact test.

    Args:
        a_correct: Whether model ``a`` got each item right.
        b_correct: Whether model ``b`` got the same items right, in the same order.

    Returns:
        The counts, ``delta`` (positive when ``b`` is better) and the p-value.
    """
    _check_paired(a_correct, b_correct)
    a, b = np.asarray(a_correct, dtype=bool), np.asarray(b_correct, dtype=bool)
    n, a_only, b_only = int(a.size), int(np.sum(a & ~b)), int(np.sum(b & ~a))
    discordant = a_only + b_only
    p = float(stats.binomtest(b_only, discordant, 0.5).pvalue) if discordant else 1.0
    delta = (b_only - a_only) / n if n else 0.0
    return McNemar(n=n, a_only=a_only, b_only=b_only, delta=delta, p_value=min(1.0, p))


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k estimator (Chen et al. 2021): ``1 - C(n - c, k) / C(n, k)``.

    Computed as ``1 - prod_{i = n - c + 1}^{n} (1 - k / i)``, which avoids huge binomials.

    Args:
        n: Samples drawn per problem.
        c: How many of them are correct, ``c <= n``.
        k: The k of pass@k, ``k <= n`` (``k == 0`` gives 0.0).

    Returns:
        The probability that at least one of k samples drawn without replacement is correct.
    """
    if n < 0 or c < 0 or k < 0:
        raise ValueError(f"n, c, k must be non-negative, got n={n}, c={c}, k={k}")
    if c > n or k > n:
        raise ValueError(f"need c <= n and k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - float(np.prod(1.0 - k / np.arange(n - c + 1, n + 1, dtype=float)))


def paired_mean_test(a: Sequence[float], b: Sequence[float]) -> tuple[float, float]:
    """Paired t-test of two models' scores on the same items.

    Args:
        a: Scores of model ``a``.
        b: Scores of model ``b`` on the same items, in the same order.

    Returns:
        ``(mean of b - a, two-sided p-value)``. Identical inputs give ``(0.0, 1.0)``; a constant
        nonzero difference over n pairs (no spread: t is undefined) gives the exact sign-flip
        test's ``2 / 2**n``, the chance that n fair coin flips all agree, not a certainty; fewer
        than two pairs give p nan (and no pairs a nan mean).
    """
    _check_paired(a, b)
    d = np.asarray(b, dtype=float) - np.asarray(a, dtype=float)
    if d.size == 0:
        return math.nan, math.nan
    mean = float(d.mean())
    if np.all(d == 0.0):
        return 0.0, 1.0
    if d.size < 2:
        return mean, math.nan
    if np.all(d == d[0]):
        return mean, min(1.0, 2.0 * 0.5**d.size)
    return mean, float(stats.ttest_rel(b, a).pvalue)


def welch_test(a: Sequence[float], b: Sequence[float]) -> tuple[float, float]:
    """Welch's t-test of two independent samples (unequal variances), e.g. a run's first and last
    steps' rewards.

    Returns:
        ``(mean of b - mean of a, two-sided p-value)``; p is nan with fewer than two values on a side
        or no spread at all.
    """
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if x.size == 0 or y.size == 0:
        return math.nan, math.nan
    delta = float(y.mean() - x.mean())
    if x.size < 2 or y.size < 2 or (x.std() == 0.0 and y.std() == 0.0):
        return delta, math.nan
    return delta, float(stats.ttest_ind(y, x, equal_var=False).pvalue)
