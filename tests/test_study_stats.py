"""The statistics of a study: summaries, paired differences to a baseline and their table cells,
against scipy / numpy and hand-computed examples. Pure functions, no Ray."""
from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from scipy import stats

from cohort.studies.stats import (
    PairedDifference,
    Summary,
    format_difference,
    format_mean_std,
    format_p_value,
    paired_difference,
    summarize,
)

NAN = float("nan")


def by_seed(values) -> dict[int, float]:
    return dict(enumerate(values))


# --------------------------------------------------------------------------- summaries


def test_summary_by_hand_ignores_missing_values():
    s = summarize([1.0, None, 2.0, NAN, 3.0, 4.0])
    assert s.n == 4  # None and NaN are runs that did not report, not zeros
    assert s.mean == 2.5
    assert s.std == pytest.approx(math.sqrt(5 / 3), rel=1e-15)  # squares 2.25+0.25+0.25+2.25 = 5, over n-1 = 3
    assert s.std == pytest.approx(1.2909944487358056, rel=1e-15)


@pytest.mark.parametrize("n", [2, 3, 5, 10, 50])
def test_summary_matches_numpy(n):
    xs = np.random.default_rng(n).normal(0.9, 0.02, size=n)
    s = summarize(xs.tolist())
    assert s.n == n
    assert s.mean == pytest.approx(float(np.mean(xs)), rel=1e-14)
    assert s.std == pytest.approx(float(np.std(xs, ddof=1)), rel=1e-12)
    assert s.std > float(np.std(xs))  # sample std, not population std


def test_summary_of_none_and_one_value():
    empty = summarize([None, NAN])
    assert empty.n == 0 and math.isnan(empty.mean) and math.isnan(empty.std)
    assert summarize([]).n == 0
    one = summarize([None, 0.75])
    assert one.n == 1 and one.mean == 0.75 and math.isnan(one.std)


# --------------------------------------------------------------------------- paired differences


def test_paired_difference_by_hand_three_seeds():
    # Differences [1, 2, 3]: mean 2, s = 1, s/√n = 1/√3, t = 2√3, df = 2.
    diff = paired_difference({0: 11.0, 1: 12.0, 2: 13.0}, {0: 10.0, 1: 10.0, 2: 10.0})
    assert diff.n_pairs == 3 and diff.mean == 2.0
    # df = 2: t_q = (2q − 1)/√(2q(1 − q)); q = 0.975 → 0.95/√0.04875 = 4.302652729749464.
    assert stats.t.ppf(0.975, 2) == pytest.approx(4.302652729749464, rel=1e-12)
    assert diff.ci_low == pytest.approx(2 - 4.302652729749464 / math.sqrt(3), rel=1e-12)
    assert diff.ci_low == pytest.approx(-0.48413771175033, rel=1e-12)
    assert diff.ci_high == pytest.approx(4.48413771175033, rel=1e-12)
    # df = 2: two-sided p = 1 − t/√(2 + t²) = 1 − √(12/14) = 1 − √(6/7).
    assert diff.p_value == pytest.approx(1 - math.sqrt(6 / 7), rel=1e-12)
    assert diff.p_value == pytest.approx(0.07417990022744854, rel=1e-12)


def test_paired_difference_by_hand_two_seeds():
    # Differences [1, 3]: mean 2, s = √2, s/√n = 1, t = 2, df = 1 (the Cauchy distribution):
    # t_0.975 = tan(0.475π) = 12.706204736174696, p = 1 − (2/π)·atan(2).
    diff = paired_difference({"a": 1.0, "b": 3.0}, {"a": 0.0, "b": 0.0})
    assert diff.n_pairs == 2 and diff.mean == 2.0
    assert diff.ci_low == pytest.approx(2 - 12.706204736174696, rel=1e-12)
    assert diff.ci_high == pytest.approx(2 + 12.706204736174696, rel=1e-12)
    assert diff.p_value == pytest.approx(1 - 2 / math.pi * math.atan(2), rel=1e-12)
    assert diff.p_value == pytest.approx(0.2951672353008665, rel=1e-12)


@pytest.mark.parametrize("n", [2, 3, 5, 10, 30])
@pytest.mark.parametrize("confidence", [0.95, 0.9, 0.99])
def test_paired_difference_matches_scipy(n, confidence):
    rng = np.random.default_rng(100 * n + int(confidence * 100))
    baseline = rng.normal(0.90, 0.01, size=n)
    arm = baseline + rng.normal(0.004, 0.006, size=n)
    diff = paired_difference(by_seed(arm), by_seed(baseline), confidence)
    d = arm - baseline
    sem = float(np.std(d, ddof=1)) / math.sqrt(n)
    test = stats.ttest_rel(arm, baseline)
    low, high = stats.t.interval(confidence, n - 1, loc=float(np.mean(d)), scale=sem)
    assert diff.n_pairs == n
    assert diff.mean == pytest.approx(float(np.mean(d)), rel=1e-12)
    assert diff.p_value == pytest.approx(float(test.pvalue), rel=1e-9)
    assert (diff.ci_low, diff.ci_high) == pytest.approx((low, high), rel=1e-10)
    if hasattr(test, "confidence_interval"):  # scipy >= 1.11
        ci = test.confidence_interval(confidence)
        assert (diff.ci_low, diff.ci_high) == pytest.approx((ci.low, ci.high), rel=1e-10)
    assert diff.ci_low < diff.mean < diff.ci_high


def test_a_wider_confidence_gives_a_wider_interval_and_the_same_p():
    arm, baseline = {0: 0.91, 1: 0.93, 2: 0.92, 3: 0.95}, {0: 0.90, 1: 0.90, 2: 0.91, 3: 0.92}
    narrow, wide = paired_difference(arm, baseline, 0.8), paired_difference(arm, baseline, 0.99)
    assert wide.ci_low < narrow.ci_low and narrow.ci_high < wide.ci_high
    assert narrow.p_value == wide.p_value and narrow.mean == wide.mean


def test_the_sign_is_arm_minus_baseline():
    arm, baseline = {0: 1.0, 1: 2.0, 2: 4.0}, {0: 2.0, 1: 4.0, 2: 7.0}  # differences −1, −2, −3
    worse, better = paired_difference(arm, baseline), paired_difference(baseline, arm)
    assert worse.mean == -2.0 and better.mean == 2.0
    assert worse.ci_high == pytest.approx(-better.ci_low, rel=1e-12)
    assert worse.p_value == pytest.approx(better.p_value, rel=1e-12)


def test_pairing_by_seed_drops_unshared_seeds_and_missing_values():
    arm = {1: 0.92, 2: 0.94, 3: NAN, 4: 0.91, 6: 0.93, 7: math.inf, 8: 0.95}
    baseline = {1: None, 2: 0.90, 3: 0.90, 4: 0.89, 5: 0.91, 7: 0.90, 8: 0.92}
    diff = paired_difference(arm, baseline)
    # Pairs: seeds 2, 4, 8 (1: baseline missing, 3: arm NaN, 5/6: one side only, 7: arm not finite).
    expected = paired_difference({2: 0.94, 4: 0.91, 8: 0.95}, {2: 0.90, 4: 0.89, 8: 0.92})
    assert diff.n_pairs == 3
    assert diff == expected
    test = stats.ttest_rel([0.94, 0.91, 0.95], [0.90, 0.89, 0.92])
    assert diff.mean == pytest.approx((0.04 + 0.02 + 0.03) / 3, rel=1e-9)
    assert diff.p_value == pytest.approx(float(test.pvalue), rel=1e-9)
    # Pairing follows the seeds, not the order of the mappings.
    shuffled = paired_difference({8: 0.95, 2: 0.94, 4: 0.91}, {4: 0.89, 2: 0.90, 8: 0.92})
    assert shuffled.mean == pytest.approx(diff.mean, rel=1e-12) and shuffled.p_value == pytest.approx(diff.p_value)


def test_no_pairs_and_one_pair():
    none = paired_difference({1: 0.9, 2: NAN}, {2: 0.8, 3: 0.8})
    assert none.n_pairs == 0
    assert all(math.isnan(v) for v in (none.mean, none.ci_low, none.ci_high, none.p_value))
    assert paired_difference({}, {}).n_pairs == 0
    one = paired_difference({1: 0.9, 2: 0.7}, {1: 0.85, 2: None})
    assert one.n_pairs == 1 and one.mean == pytest.approx(0.05, rel=1e-12)
    assert all(math.isnan(v) for v in (one.ci_low, one.ci_high, one.p_value))


def test_identical_differences_give_a_point_interval():
    arm, baseline = {0: 1.5, 1: 2.5, 2: 3.5}, {0: 1.0, 1: 2.0, 2: 3.0}  # every difference exactly 0.5
    diff = paired_difference(arm, baseline)
    assert diff == PairedDifference(3, 0.5, 0.5, 0.5, 0.0)
    assert paired_difference(baseline, arm) == PairedDifference(3, -0.5, -0.5, -0.5, 0.0)
    # scipy agrees where it is defined: t = inf, p = 0 ...
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        assert float(stats.ttest_rel([1.5, 2.5, 3.5], [1.0, 2.0, 3.0]).pvalue) == 0.0
        # ... but for all-zero differences it gives NaN (0/0), where we say p = 1: no difference at all.
        assert math.isnan(float(stats.ttest_rel([1.0, 2.0], [1.0, 2.0]).pvalue))
    assert paired_difference({0: 1.0, 1: 2.0}, {0: 1.0, 1: 2.0}) == PairedDifference(2, 0.0, 0.0, 0.0, 1.0)


def test_confidence_must_be_a_probability():
    for bad in (0.0, 1.0, 95):
        with pytest.raises(ValueError, match="confidence"):
            paired_difference({0: 1.0, 1: 2.0}, {0: 0.0, 1: 0.0}, bad)


# --------------------------------------------------------------------------- table cells


def test_format_mean_std():
    assert format_mean_std(Summary(5, 0.93412, 0.00268), scale=100) == "93.41 ± 0.27"
    assert format_mean_std(Summary(3, 1.23456, 0.0449), digits=3) == "1.235 ± 0.045"
    assert format_mean_std(Summary(1, 0.9341, NAN), scale=100) == "93.41"  # no ± for one run
    assert format_mean_std(Summary(0, NAN, NAN), scale=100) == "—"
    assert format_mean_std(summarize([0.9, 0.92, None, 0.94]), scale=100) == "92.00 ± 2.00"


def test_format_p_value():
    assert format_p_value(0.0312) == "p=0.031"
    assert format_p_value(0.07417990022744854) == "p=0.074"
    assert format_p_value(0.2) == "p=0.20"  # two significant digits, the trailing zero kept
    assert format_p_value(0.004) == "p=0.0040"
    assert format_p_value(0.001) == "p=0.0010"
    assert format_p_value(0.000999) == "p<0.001"
    assert format_p_value(0.0) == "p<0.001"
    assert format_p_value(1.0) == "p=1.0"


def test_format_difference():
    assert format_difference(PairedDifference(5, 0.0052, 0.0010, 0.0094, 0.0312), scale=100) \
        == "+0.52 [+0.10, +0.94] p=0.031"
    assert format_difference(PairedDifference(4, -0.0125, -0.02, -0.005, 0.00004), scale=100) \
        == "-1.25 [-2.00, -0.50] p<0.001"
    # The hand-computed example end to end: differences [1, 2, 3].
    assert format_difference(paired_difference({0: 11.0, 1: 12.0, 2: 13.0}, {0: 10.0, 1: 10.0, 2: 10.0})) \
        == "+2.00 [-0.48, +4.48] p=0.074"
    assert format_difference(PairedDifference(1, 0.005, NAN, NAN, NAN), scale=100, digits=1) == "+0.5"
    assert format_difference(PairedDifference(0, NAN, NAN, NAN, NAN), scale=100) == "—"
    assert format_difference(PairedDifference(3, 0.5, 0.5, 0.5, 0.0)) == "+0.50 [+0.50, +0.50] p<0.001"
