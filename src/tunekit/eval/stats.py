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


# ---------------------------------------------------------------------------------------------
# Training noise: the same config trained with K seeds (`tunekit train --seeds K`)


def spread(values: Sequence[float]) -> dict[str, float | int]:
    """mean, std (sample, n - 1; 0 for one value), min and max of a figure across seeds."""
    v = np.asarray(values, dtype=float)
    return {
        "n": int(v.size),
        "mean": float(v.mean()),
        "std": float(v.std(ddof=1)) if v.size > 1 else 0.0,
        "min": float(v.min()),
        "max": float(v.max()),
    }


def t_sf2(t: float, df: int) -> float:
    """Two-sided p-value P(|T| >= |t|) of Student's t with integer `df` degrees of freedom.

    Exact closed forms (Abramowitz & Stegun 26.7.3, 26.7.4) with theta = atan(|t| / sqrt(df)):
    A = P(|T| < |t|) is sin(theta) (1 + 1/2 cos^2 + 1*3/(2*4) cos^4 + ... up to cos^(df-2)) for
    even df, and 2/pi (theta + sin(theta) cos(theta) (1 + 2/3 cos^2 + ... up to cos^(df-3))) for odd
    df (only 2/pi theta for df 1). The degrees of freedom here are seeds, a handful: the sums are short.
    """
    if df < 1:
        raise ValueError(f"t test needs df >= 1, got {df}")
    theta = math.atan(abs(t) / math.sqrt(df))
    s, c2 = math.sin(theta), math.cos(theta) ** 2
    term, total = 1.0, 1.0
    if df % 2 == 0:
        for j in range(2, df, 2):  # terms cos^j: (j - 1)!! / j!!
            term *= c2 * (j - 1) / j
            total += term
        a = s * total
    else:
        for j in range(3, df, 2):  # terms cos^(j - 1): (j - 1)!! / j!!
            term *= c2 * (j - 1) / j
            total += term
        a = 2 / math.pi * (theta + (s * math.cos(theta) * total if df > 1 else 0.0))
    return min(1.0, max(0.0, 1.0 - a))


def t_critical(df: int, level: float = 0.95) -> float:
    """The t with two-sided p-value 1 - level at `df` (2.776 for df 4 at 95%), by bisection."""
    lo, hi = 0.0, 1e6
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_sf2(mid, df) > 1 - level else (lo, mid)
    return (lo + hi) / 2


def between_seeds(a: Sequence[float], b: Sequence[float], alpha: float = 0.05) -> dict | None:
    """mean(b) - mean(a) of a figure measured once per seed on each side, against the training
    noise: Student's two-sample t test with the pooled between-seed variance (both sides trained
    the same way, so they share one noise level; a side of one run adds no degree of freedom).
    None when neither side has two seeds (no noise measured)."""
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    df = x.size + y.size - 2
    if df < 1:
        return None
    ss = ((x - x.mean()) ** 2).sum() + ((y - y.mean()) ** 2).sum()
    pooled_std = math.sqrt(ss / df)
    se = pooled_std * math.sqrt(1 / x.size + 1 / y.size)
    d = float(y.mean() - x.mean())
    if se == 0:  # no spread at all: any difference is beyond noise, none is within it
        p = 1.0 if d == 0 else 0.0
        half = 0.0
    else:
        p = t_sf2(d / se, df)
        half = t_critical(df, 1 - alpha) * se
    return {
        "difference": d,
        "ci_low": d - half,
        "ci_high": d + half,
        "p_value": p,
        "df": df,
        "pooled_std": pooled_std,
        "test": "pooled_t",
        "significant": bool(p < alpha),
    }
