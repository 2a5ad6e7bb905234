"""Uncertainty for evaluation figures: bootstrap confidence intervals and paired significance tests.

A test split of 80 examples measures exact match to within about +-0.1, so every figure in a
report carries its 95% interval, and every difference between two contenders carries a p-value
from a test that pairs the examples (both contenders answered the same questions).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

N_BOOT = 1000


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def bootstrap_ci(
    statistic: Callable[[np.ndarray], float],
    n: int,
    n_boot: int = N_BOOT,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float]:
    """Percentile interval of `statistic(indices)` over `n_boot` resamples of the n examples."""
    if n == 0:
        return (float("nan"), float("nan"))
    idx = _rng(seed).integers(0, n, size=(n_boot, n))
    values = np.array([statistic(row) for row in idx], dtype=float)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return (float("nan"), float("nan"))
    tail = (1 - level) / 2 * 100
    lo, hi = np.percentile(values, [tail, 100 - tail])
    return float(lo), float(hi)


def mean_ci(scores: Sequence[float], n_boot: int = N_BOOT, seed: int = 0) -> tuple[float, float, float]:
    """(mean, ci_low, ci_high) of per-example scores."""
    s = np.asarray(scores, dtype=float)
    if s.size == 0:
        return (0.0, float("nan"), float("nan"))
    # Vectorised: the mean of each resample is a row mean of gathered scores.
    idx = _rng(seed).integers(0, s.size, size=(n_boot, s.size))
    means = s[idx].mean(axis=1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return float(s.mean()), float(lo), float(hi)


def ratio_ci(
    num: Sequence[float], den: Sequence[float], n_boot: int = N_BOOT, seed: int = 0
) -> tuple[float, float, float]:
    """(sum(num)/sum(den), ci_low, ci_high), resampling examples: e.g. loss per token over examples."""
    a, b = np.asarray(num, dtype=float), np.asarray(den, dtype=float)
    if a.size == 0 or b.sum() == 0:
        return (float("nan"), float("nan"), float("nan"))
    idx = _rng(seed).integers(0, a.size, size=(n_boot, a.size))
    ratios = a[idx].sum(axis=1) / np.maximum(b[idx].sum(axis=1), 1e-12)
    lo, hi = np.percentile(ratios, [2.5, 97.5])
    return float(a.sum() / b.sum()), float(lo), float(hi)


def mcnemar_exact(a: Sequence[float], b: Sequence[float]) -> float:
    """Two-sided exact McNemar p-value for paired right/wrong outcomes (1/0).

    Only the discordant pairs carry information: under "no difference" each is equally likely to
    favour either contender, so their split is Binomial(n, 1/2).
    """
    only_a = sum(1 for x, y in zip(a, b, strict=True) if x and not y)
    only_b = sum(1 for x, y in zip(a, b, strict=True) if y and not x)
    n = only_a + only_b
    if n == 0:
        return 1.0
    k = min(only_a, only_b)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2 * tail)


def sign_flip_p(diffs: Sequence[float], n_perm: int = 10000, seed: int = 0) -> float:
    """Two-sided paired permutation test: randomly flip the sign of each example's difference."""
    d = np.asarray(diffs, dtype=float)
    if d.size == 0 or not np.any(d):
        return 1.0
    observed = abs(d.mean())
    signs = _rng(seed).choice([-1.0, 1.0], size=(n_perm, d.size))
    null = np.abs((signs * d).mean(axis=1))
    # +1 on both sides: the observed labelling is one of the permutations (never report p = 0).
    return float((np.sum(null >= observed - 1e-12) + 1) / (n_perm + 1))


def paired_difference(
    a: Sequence[float], b: Sequence[float], n_boot: int = N_BOOT, seed: int = 0
) -> dict[str, float | str | bool]:
    """b - a on the same examples: the mean difference, its 95% CI and a two-sided p-value.

    Binary scores use the exact McNemar test; other scores the sign-flip permutation test.
    """
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if x.shape != y.shape:
        raise ValueError(f"paired scores need equal lengths, got {x.size} and {y.size}")
    diff, lo, hi = mean_ci(y - x, n_boot=n_boot, seed=seed)
    binary = bool(np.isin(x, (0.0, 1.0)).all() and np.isin(y, (0.0, 1.0)).all())
    p = mcnemar_exact(x, y) if binary else sign_flip_p(y - x, seed=seed)
    return {
        "difference": diff,
        "ci_low": lo,
        "ci_high": hi,
        "p_value": p,
        "test": "mcnemar_exact" if binary else "paired_permutation",
        "significant": bool(p < 0.05),
    }
