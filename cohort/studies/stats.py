"""The statistics of a study (arms × seeds): per-arm summaries and paired differences to a baseline.

Pure functions of plain numbers, no Ray, no MLflow. A value that is ``None`` or NaN is a run that
did not report the metric: it is *missing*, never zero, so it is left out of every count.

* ``summarize``: n, mean and the sample standard deviation (``ddof=1``, NaN below two values).
* ``paired_difference``: arm − baseline paired by seed, over the seeds where both have a finite
  value; the mean difference, its Student-t confidence interval ``mean ± t_{(1+c)/2, n-1} · s/√n``
  and the two-sided p-value of the paired t-test (the same numbers as ``scipy.stats.ttest_rel``).
* ``format_mean_std`` / ``format_difference``: the table cells, e.g. ``93.41 ± 0.27`` and
  ``+0.52 [+0.10, +0.94] p=0.031``.

Degenerate cases, chosen deliberately:

* No pairs: every field NaN except ``n_pairs = 0``. One pair: the mean only (no spread to test).
* All differences identical (s = 0, e.g. a deterministic metric): the interval is the point
  ``[mean, mean]``. scipy's ``ttest_rel`` gives t = ±inf, p = 0 when the mean is not 0, which we
  keep; when every difference is 0 it gives t = p = NaN (0/0, with a RuntimeWarning), where we
  return p = 1 instead: the arms agree on every seed, no evidence of a difference. "Identical"
  is tested exactly (``d_i == d_1``), not by a floating-point std (which may come out ~1e-17).
"""
from __future__ import annotations

import math
from collections.abc import Hashable, Iterable, Mapping
from dataclasses import dataclass

import numpy as np
from scipy import stats

__all__ = [
    "PairedDifference",
    "Summary",
    "format_difference",
    "format_mean_std",
    "format_p_value",
    "mean_half_width",
    "paired_difference",
    "present",
    "summarize",
]

NAN = float("nan")
EMPTY_CELL = "—"
P_FLOOR = 0.001  # p-values below this print as "p<0.001"


@dataclass(frozen=True)
class Summary:
    n: int  # values present (runs that reported)
    mean: float  # NaN when n == 0
    std: float  # sample standard deviation (ddof=1); NaN when n < 2


@dataclass(frozen=True)
class PairedDifference:
    n_pairs: int  # seeds where both the arm and the baseline have a finite value
    mean: float  # mean of arm − baseline; NaN when n_pairs == 0
    ci_low: float  # Student-t interval; NaN when n_pairs < 2
    ci_high: float
    p_value: float  # two-sided paired t-test; NaN when n_pairs < 2


def present(values: Iterable[float | None]) -> list[float]:
    """The values that were reported: ``None`` and NaN dropped (infinities are kept)."""
    return [float(v) for v in values if v is not None and not math.isnan(v)]


def summarize(values: Iterable[float | None]) -> Summary:
    """n, mean and sample std of the values present (missing values are not zeros)."""
    xs = np.asarray(present(values), dtype=np.float64)
    n = len(xs)
    mean = float(xs.mean()) if n else NAN
    std = float(xs.std(ddof=1)) if n >= 2 else NAN
    return Summary(n, mean, std)


def paired_difference(arm: Mapping[Hashable, float | None], baseline: Mapping[Hashable, float | None],
                      confidence: float = 0.95) -> PairedDifference:
    """arm − baseline paired by seed over the seeds both have with finite values: the mean
    difference, its ``confidence`` Student-t interval and the two-sided paired t-test p-value."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie strictly between 0 and 1, got {confidence}")
    diffs = np.asarray([float(arm[s]) - float(baseline[s]) for s in arm
                        if s in baseline and _finite(arm[s]) and _finite(baseline[s])], dtype=np.float64)
    n = len(diffs)
    if n == 0:
        return PairedDifference(0, NAN, NAN, NAN, NAN)
    mean = float(diffs.mean())
    if n == 1:
        return PairedDifference(1, mean, NAN, NAN, NAN)
    if np.all(diffs == diffs[0]):  # no spread: the interval is the point (see the module docstring)
        mean = float(diffs[0])
        return PairedDifference(n, mean, mean, mean, 1.0 if mean == 0 else 0.0)
    sem = float(diffs.std(ddof=1)) / math.sqrt(n)
    half = float(stats.t.ppf((1 + confidence) / 2, n - 1)) * sem
    p_value = float(2 * stats.t.sf(abs(mean / sem), n - 1))
    return PairedDifference(n, mean, mean - half, mean + half, p_value)


def _finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


# --------------------------------------------------------------------------- table cells


def format_mean_std(summary: Summary, scale: float = 1.0, digits: int = 2) -> str:
    """``"93.41 ± 0.27"`` (values times ``scale``); the mean alone for n == 1, "—" for n == 0."""
    if summary.n == 0:
        return EMPTY_CELL
    mean = f"{summary.mean * scale:.{digits}f}"
    if summary.n == 1:
        return mean
    return f"{mean} ± {summary.std * scale:.{digits}f}"


def format_p_value(p_value: float) -> str:
    """``"p=0.031"``: two significant digits; ``"p<0.001"`` below 0.001."""
    if p_value < P_FLOOR:
        return f"p<{P_FLOOR:g}"
    return f"p={p_value:#.2g}"


def format_difference(diff: PairedDifference, scale: float = 1.0, digits: int = 2) -> str:
    """``"+0.52 [+0.10, +0.94] p=0.031"`` (differences times ``scale``, signed); the signed mean
    alone for a single pair, "—" without pairs."""
    if diff.n_pairs == 0:
        return EMPTY_CELL
    mean = f"{diff.mean * scale:+.{digits}f}"
    if diff.n_pairs == 1:
        return mean
    return (f"{mean} [{diff.ci_low * scale:+.{digits}f}, {diff.ci_high * scale:+.{digits}f}] "
            f"{format_p_value(diff.p_value)}")


def mean_half_width(summary: Summary, confidence: float = 0.95) -> float:
    """Half the width of the Student-t confidence interval of the mean, ``t_{(1+c)/2, n-1} · s/√n``
    (NaN below two values): the error bar of a study's figures."""
    if summary.n < 2:
        return NAN
    return float(stats.t.ppf((1 + confidence) / 2, summary.n - 1)) * summary.std / math.sqrt(summary.n)
