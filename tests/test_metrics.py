"""Tests for cohort.metrics.scores against independent plain-Python/numpy computations."""

from __future__ import annotations

import math

import matplotlib.image
import numpy as np
import pytest
import torch
from torchmetrics.functional.classification import multiclass_calibration_error

from cohort.metrics import reliability as R
from cohort.metrics import scores as M

# --------------------------------------------------------------------------- references (numpy loops)


def np_softmax(logits: torch.Tensor) -> np.ndarray:
    z = logits.double().numpy()
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def np_log_softmax(logits: torch.Tensor) -> np.ndarray:
    z = logits.double().numpy()
    m = z.max(axis=1, keepdims=True)
    return z - m - np.log(np.exp(z - m).sum(axis=1, keepdims=True))


def ref_bin(conf: float, n_bins: int) -> int:
    """Right-closed (lo, hi] with 0 in the first bin, by explicit comparisons."""
    for b in range(n_bins):
        lo, hi = b / n_bins, (b + 1) / n_bins
        if (lo < conf <= hi) or (b == 0 and conf == 0.0):
            return b
    raise AssertionError(f"confidence {conf} outside [0, 1]")


def ref_binned_error(confs, corrects, bin_of) -> float:
    n = len(confs)
    members: dict[int, list[int]] = {}
    for i in range(n):
        members.setdefault(bin_of[i], []).append(i)
    total = 0.0
    for idx in members.values():
        acc = sum(corrects[i] for i in idx) / len(idx)
        conf = sum(confs[i] for i in idx) / len(idx)
        total += len(idx) / n * abs(acc - conf)
    return total


def ref_top1(probs: np.ndarray, labels: np.ndarray):
    confs, corrects = [], []
    for row, y in zip(probs, labels):
        pred = int(np.argmax(row))
        confs.append(float(row[pred]))
        corrects.append(1.0 if pred == y else 0.0)
    return confs, corrects


def ref_ece(probs, labels, n_bins=15) -> float:
    confs, corrects = ref_top1(probs, labels)
    return ref_binned_error(confs, corrects, [ref_bin(c, n_bins) for c in confs])


def ref_adaece(probs, labels, n_bins=15) -> float:
    confs, corrects = ref_top1(probs, labels)
    n = len(confs)
    order = sorted(range(n), key=lambda i: confs[i])  # Python's sort is stable
    base, extra = divmod(n, n_bins)
    bin_of = [0] * n
    start = 0
    for b in range(n_bins):
        size = base + (1 if b < extra else 0)
        for i in order[start : start + size]:
            bin_of[i] = b
        start += size
    return ref_binned_error(confs, corrects, bin_of)


def ref_cwece(probs, labels, n_bins=15) -> float:
    per_class = []
    for c in range(probs.shape[1]):
        confs = [float(p) for p in probs[:, c]]
        hits = [1.0 if y == c else 0.0 for y in labels]
        per_class.append(ref_binned_error(confs, hits, [ref_bin(x, n_bins) for x in confs]))
    return sum(per_class) / len(per_class)


def ref_brier(probs, labels) -> float:
    total = 0.0
    for row, y in zip(probs, labels):
        total += sum((p - (1.0 if c == y else 0.0)) ** 2 for c, p in enumerate(row))
    return total / len(labels)


def ref_per_class_accuracy(probs, labels, num_classes) -> list[float]:
    out = []
    for c in range(num_classes):
        idx = [i for i, y in enumerate(labels) if y == c]
        out.append(float("nan") if not idx else sum(int(np.argmax(probs[i])) == c for i in idx) / len(idx))
    return out


def random_case(n=2000, c=10, scale=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, c, generator=g) * scale
    # Labels correlated with the logits so accuracy and calibration are not trivial.
    noisy = logits + torch.randn(n, c, generator=g) * scale
    labels = noisy.argmax(dim=1)
    return logits, labels


# --------------------------------------------------------------------------- accuracy


def test_topk_accuracy_matches_loops():
    logits, labels = random_case(n=500, c=10)
    z, y = logits.numpy(), labels.numpy()
    for k in (1, 2, 5):
        ref = np.mean([y[i] in np.argsort(-z[i])[:k] for i in range(len(y))])
        assert M.accuracy(logits, labels, k=k) == pytest.approx(ref, abs=1e-12)
    assert M.accuracy(logits, labels, k=1) < M.accuracy(logits, labels, k=5) < 1.0


def test_topk_larger_than_class_count_is_clamped():
    logits, labels = random_case(n=50, c=3)
    assert M.accuracy(logits, labels, k=5) == 1.0
    with pytest.raises(ValueError):
        M.accuracy(logits, labels, k=0)


# --------------------------------------------------------------------------- calibration errors


def test_ece_matches_reference():
    logits, labels = random_case()
    ref = ref_ece(np_softmax(logits), labels.numpy())
    assert ref > 0.02  # the case must be miscalibrated for the comparison to mean anything
    assert M.ece(logits, labels) == pytest.approx(ref, abs=1e-6)
    assert M.ece(logits, labels, n_bins=7) == pytest.approx(ref_ece(np_softmax(logits), labels.numpy(), 7), abs=1e-6)


# Divisible, large remainder, small N where one sample moving bins shows, fewer samples than bins.
@pytest.mark.parametrize("n", [2000, 1003, 100, 22, 7])
def test_adaptive_ece_matches_reference(n):
    logits, labels = random_case(n=n, seed=n)
    ref = ref_adaece(np_softmax(logits), labels.numpy())
    assert M.adaptive_ece(logits, labels) == pytest.approx(ref, abs=1e-6)


def test_adaptive_ece_uses_equal_mass_bins():
    # A case where the two binnings disagree: one wrong answer among the low confidences.
    probs = torch.tensor([[0.55, 0.45], [0.56, 0.44], [0.9, 0.1], [0.95, 0.05]])
    labels = torch.tensor([0, 1, 0, 0])
    logits = probs.log()
    # Two equal-mass bins: {0.55, 0.56} acc 0.5, {0.9, 0.95} acc 1.
    expected = 0.5 * abs(0.5 - 0.555) + 0.5 * abs(1.0 - 0.925)
    assert M.adaptive_ece(logits, labels, n_bins=2) == pytest.approx(expected, abs=1e-6)
    # Equal width with 2 bins puts everything in (0.5, 1]: one bin, acc 0.75, conf 0.74.
    assert M.ece(logits, labels, n_bins=2) == pytest.approx(abs(0.75 - 0.74), abs=1e-6)


def test_adaptive_ece_remainder_goes_to_the_low_confidence_chunks():
    # 3 samples, 2 bins: array_split gives sizes 2 / 1, the larger chunk holding the lowest
    # confidences. Correct, wrong, correct at 0.6, 0.7, 0.9.
    probs = torch.tensor([[0.6, 0.4], [0.7, 0.3], [0.9, 0.1]])
    labels = torch.tensor([0, 1, 0])
    expected = 2 / 3 * abs(0.5 - 0.65) + 1 / 3 * abs(1.0 - 0.9)  # 2/1 split; 1/2 would give 1/3
    assert M.evaluate_probs(probs, labels, n_bins=2)["adaece"] == pytest.approx(expected, abs=1e-6)


def test_classwise_ece_matches_reference():
    logits, labels = random_case(n=1500, c=6)
    ref = ref_cwece(np_softmax(logits), labels.numpy())
    assert M.classwise_ece(logits, labels) == pytest.approx(ref, abs=1e-6)


def test_bins_are_right_closed_and_zero_goes_first():
    conf = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0, 0.2500001, 0.1])
    assert M._equal_width_bins(conf, 4).tolist() == [0, 0, 1, 2, 3, 1, 0]
    for c, b in zip(conf.tolist(), M._equal_width_bins(conf, 4).tolist()):
        assert ref_bin(c, 4) == b


def test_edge_confidence_lands_in_lower_bin_in_ece():
    # Sample A: confidence exactly 0.5, correct. Sample B: confidence 0.6, wrong.
    probs = torch.tensor([[0.5, 0.25, 0.25], [0.6, 0.4, 0.0]])
    labels = torch.tensor([0, 1])
    # (lo, hi] with 4 bins: A in (0.25, 0.5], B in (0.5, 0.75] -> separate bins.
    expected = 0.5 * abs(1.0 - 0.5) + 0.5 * abs(0.0 - 0.6)
    assert M.evaluate_probs(probs, labels, n_bins=4)["ece"] == pytest.approx(expected, abs=1e-7)
    bins = R.reliability_bins_probs(probs, labels, n_bins=4)
    assert bins.counts.tolist() == [0.0, 1.0, 1.0, 0.0]
    # torchmetrics bins [lo, hi): both samples share (0.5, 0.75) there -> a different number.
    tm = float(multiclass_calibration_error(probs, labels, num_classes=3, n_bins=4, norm="l1"))
    assert tm == pytest.approx(abs(0.5 - 0.55), abs=1e-6)


def test_exact_zero_class_probability_goes_to_first_bin_in_classwise_ece():
    # Class 2 has p = 0 exactly for both samples; with a (lo, hi] rule and no special case
    # those samples would belong to no bin and drop out of the weights.
    probs = torch.tensor([[0.75, 0.25, 0.0], [0.25, 0.75, 0.0]])
    labels = torch.tensor([0, 0])
    got = M.evaluate_probs(probs, labels, n_bins=4)["cwece"]
    per_class = [
        0.5 * abs(1 - 0.75) + 0.5 * abs(1 - 0.25),  # class 0: bins (0.5,0.75] and (0,0.25]
        0.5 * abs(0 - 0.25) + 0.5 * abs(0 - 0.75),  # class 1
        0.0,  # class 2: one bin holding both samples, accuracy 0, confidence 0
    ]
    assert got == pytest.approx(sum(per_class) / 3, abs=1e-7)
    assert got == pytest.approx(ref_cwece(probs.double().numpy(), labels.numpy(), 4), abs=1e-7)


def test_ece_agrees_with_torchmetrics_off_the_edges():
    # torchmetrics (read from the installed source) bins with
    #   bucketize(conf, linspace(0, 1, n_bins + 1), right=True) - 1,
    # i.e. left-closed [lo, hi) bins plus a separate bin for conf == 1.0, while cohort's ECE
    # (docs/metrics.md) is right-closed (lo, hi]. The two only coincide when no confidence equals
    # an edge, so the data are checked for that before comparing
    # (see test_edge_confidence_lands_in_lower_bin_in_ece for a case where they differ).
    logits, labels = random_case(n=5000, c=10, scale=2.0, seed=3)
    probs = torch.softmax(logits, dim=1)
    conf = probs.max(dim=1).values
    edges = torch.linspace(0, 1, 16, dtype=conf.dtype)
    assert not torch.isin(conf, edges).any()
    # Probabilities, not logits: torchmetrics only applies softmax when values leave [0, 1].
    tm = float(multiclass_calibration_error(probs, labels, num_classes=10, n_bins=15, norm="l1"))
    assert tm > 0.02
    assert M.ece(logits, labels) == pytest.approx(tm, abs=1e-6)


def _synthetic_calibration(n, accuracy_of, seed=0, c=10):
    """Max probability c_i ~ U(0.2, 0.99) on a random class, the rest spread evenly; the
    prediction is right with probability accuracy_of(c_i)."""
    rng = np.random.default_rng(seed)
    conf = rng.uniform(0.2, 0.99, size=n)
    pred = rng.integers(0, c, size=n)
    probs = np.repeat(((1 - conf) / (c - 1))[:, None], c, axis=1)
    probs[np.arange(n), pred] = conf
    right = rng.uniform(size=n) < accuracy_of(conf)
    other = (pred + rng.integers(1, c, size=n)) % c
    labels = np.where(right, pred, other)
    return torch.from_numpy(np.log(probs)), torch.from_numpy(labels)


def test_perfectly_calibrated_predictions_have_near_zero_ece():
    logits, labels = _synthetic_calibration(200_000, lambda c: c)
    assert M.ece(logits, labels) < 0.01
    assert M.adaptive_ece(logits, labels) < 0.01


def test_overconfident_predictions_have_large_ece():
    # Accuracy is always 0.2 below confidence, so every bin's gap (and the ECE) is ~0.2.
    logits, labels = _synthetic_calibration(200_000, lambda c: c - 0.2)
    assert M.ece(logits, labels) == pytest.approx(0.2, abs=0.01)
    assert M.adaptive_ece(logits, labels) == pytest.approx(0.2, abs=0.01)


# --------------------------------------------------------------------------- NLL, Brier, entropy


def test_nll_brier_entropy_match_reference():
    logits, labels = random_case(n=800, c=7)
    logp = np_log_softmax(logits)
    y = labels.numpy()
    ref_nll = -np.mean([logp[i, y[i]] for i in range(len(y))])
    probs = np_softmax(logits)
    ref_entropy = np.mean([-sum(p * math.log(p) for p in row if p > 0) for row in probs])
    assert M.nll(logits, labels) == pytest.approx(ref_nll, rel=1e-6)
    assert M.nll(logits, labels) == pytest.approx(float(torch.nn.functional.cross_entropy(logits, labels)), rel=1e-6)
    assert M.brier(logits, labels) == pytest.approx(ref_brier(probs, y), abs=1e-6)
    assert M.mean_entropy(logits) == pytest.approx(ref_entropy, rel=1e-6)


def test_brier_range_extremes():
    labels = torch.tensor([0, 2, 1])
    perfect = torch.nn.functional.one_hot(labels, 4).double()
    wrong = torch.nn.functional.one_hot((labels + 1) % 4, 4).double()
    assert M.evaluate_probs(perfect, labels)["brier"] == 0.0
    assert M.evaluate_probs(wrong, labels)["brier"] == 2.0
    assert M.brier(perfect * 100.0, labels) == pytest.approx(0.0, abs=1e-12)
    assert M.brier(wrong * 100.0, labels) == pytest.approx(2.0, abs=1e-12)


def test_extreme_logits_stay_finite():
    logits = torch.tensor([[1000.0, -1000.0, 0.0], [0.0, 0.0, 0.0], [float("-inf"), 5.0, 5.0]])
    labels = torch.tensor([1, 0, 2])
    entropy = M.mean_entropy(logits)
    assert entropy == pytest.approx((0.0 + math.log(3) + math.log(2)) / 3, abs=1e-6)
    # log_softmax keeps the confidently wrong sample's loss at its true value, not inf.
    assert M.nll(logits, labels) == pytest.approx((2000.0 + math.log(3) + math.log(2)) / 3, rel=1e-6)


# --------------------------------------------------------------------------- per class / per group


def test_per_class_accuracy_with_missing_class():
    logits, labels = random_case(n=300, c=5)
    labels = torch.where(labels == 3, torch.zeros_like(labels), labels)  # class 3 has no sample
    got = M.per_class_accuracy(logits, labels, 5)
    ref = ref_per_class_accuracy(np_softmax(logits), labels.numpy(), 5)
    assert got.shape == (5,)
    assert math.isnan(got[3]) and math.isnan(ref[3])
    for c in (0, 1, 2, 4):
        assert float(got[c]) == pytest.approx(ref[c], abs=1e-12)


def test_per_group_accuracy_is_mean_of_class_accuracies():
    logits, labels = random_case(n=600, c=6)
    groups = torch.tensor([0, 0, 1, 1, 2, 2])
    ref = ref_per_class_accuracy(np_softmax(logits), labels.numpy(), 6)
    got = M.per_group_accuracy(logits, labels, groups)
    assert got.shape == (3,)
    for g in range(3):
        assert float(got[g]) == pytest.approx(np.mean([ref[c] for c in range(6) if groups[c] == g]), abs=1e-12)


def test_per_group_accuracy_balanced_pooled_and_empty_group():
    # Class-balanced labels: the class mean equals the pooled accuracy over the group's samples.
    logits = torch.randn(60, 4, generator=torch.Generator().manual_seed(1))
    labels = torch.arange(4).repeat(15)
    groups = torch.tensor([0, 0, 1, 2])
    pred = logits.argmax(dim=1)
    got = M.per_group_accuracy(logits, labels, groups)
    in_g0 = groups[labels] == 0
    assert float(got[0]) == pytest.approx(float((pred[in_g0] == labels[in_g0]).double().mean()), abs=1e-12)
    # A group whose classes have no test sample is NaN, not 0.
    got = M.per_group_accuracy(logits, labels.clamp(max=2), groups)
    assert math.isnan(got[2]) and not math.isnan(got[1])


# --------------------------------------------------------------------------- class groups


def test_thirds_ties_straddling_a_cut_go_by_class_index():
    counts = [50, 10, 30, 30, 30, 5]
    groups, names = M.class_groups(counts, "thirds")
    # Ranked: 0 (50), 2, 3, 4 (30 each, index order), 1 (10), 5 (5); cut 2 / 2 / 2.
    assert groups.tolist() == [0, 2, 0, 1, 1, 2]
    assert names == ["head", "medium", "tail"]
    assert groups.dtype == torch.long


@pytest.mark.parametrize("c, sizes", [(7, [3, 2, 2]), (8, [3, 3, 2]), (9, [3, 3, 3]), (100, [34, 33, 33])])
def test_thirds_remainder_goes_to_the_head_side(c, sizes):
    counts = list(range(c, 0, -1))  # strictly decreasing: rank == class index
    groups, _ = M.class_groups(torch.tensor(counts), "thirds")
    assert torch.bincount(groups).tolist() == sizes
    assert groups.tolist() == sorted(groups.tolist())


def test_thirds_sorts_by_count_not_index():
    groups, _ = M.class_groups(np.array([1, 2, 3, 4, 5, 6]), "thirds")
    assert groups.tolist() == [2, 2, 1, 1, 0, 0]


def test_thirds_needs_three_classes():
    with pytest.raises(ValueError):
        M.class_groups([5, 3], "thirds")


def test_shots_thresholds_are_inclusive_for_medium():
    counts = [101, 100, 20, 19, 500, 0, 21, 99]
    groups, names = M.class_groups(counts, "shots")
    assert groups.tolist() == [0, 1, 1, 2, 0, 2, 1, 1]
    assert names == ["many", "medium", "few"]


def test_shots_drops_empty_groups_and_renumbers():
    groups, names = M.class_groups([150, 200, 5], "shots")
    assert groups.tolist() == [0, 0, 1] and names == ["many", "few"]
    groups, names = M.class_groups([20, 100, 50], "shots")
    assert groups.tolist() == [0, 0, 0] and names == ["medium"]
    groups, names = M.class_groups([3, 101], "shots")
    assert groups.tolist() == [1, 0] and names == ["many", "few"]


def test_unknown_rule_rejected():
    with pytest.raises(ValueError):
        M.class_groups([1, 2, 3], "quartiles")


# --------------------------------------------------------------------------- reliability bins and diagram


def test_reliability_bins_match_reference_and_ece():
    logits, labels = random_case(n=1000, c=8, seed=5)
    bins = R.reliability_bins(logits, labels)
    confs, corrects = ref_top1(np_softmax(logits), labels.numpy())
    bin_of = [ref_bin(c, 15) for c in confs]
    assert bins.edges.shape == (16,) and bins.n_bins == 15
    for b in range(15):
        idx = [i for i in range(len(confs)) if bin_of[i] == b]
        assert float(bins.counts[b]) == len(idx)
        if idx:
            assert float(bins.accuracy[b]) == pytest.approx(np.mean([corrects[i] for i in idx]), abs=1e-12)
            assert float(bins.confidence[b]) == pytest.approx(np.mean([confs[i] for i in idx]), abs=1e-6)
        else:
            assert math.isnan(bins.accuracy[b]) and math.isnan(bins.confidence[b])
    assert bins.ece == pytest.approx(M.ece(logits, labels), abs=1e-12)


def test_reliability_bins_merge_equals_whole():
    logits, labels = random_case(n=1000, c=8, seed=6)
    whole = R.reliability_bins(logits, labels)
    merged = R.ReliabilityBins.merge(
        [R.reliability_bins(logits[:400], labels[:400]), R.reliability_bins(logits[400:], labels[400:])]
    )
    assert torch.equal(merged.counts, whole.counts)
    occupied = whole.counts > 0
    assert torch.allclose(merged.accuracy[occupied], whole.accuracy[occupied], atol=1e-12)
    assert torch.allclose(merged.confidence[occupied], whole.confidence[occupied], atol=1e-12)
    assert merged.ece == pytest.approx(whole.ece, abs=1e-12)
    with pytest.raises(ValueError):
        R.ReliabilityBins.merge([whole, R.reliability_bins(logits, labels, n_bins=10)])


def test_reliability_diagram_writes_png(tmp_path):
    logits, labels = random_case(n=500, c=10, seed=2)
    out = R.reliability_diagram(R.reliability_bins(logits, labels), tmp_path / "sub" / "rel.png", "peer 0")
    assert out == tmp_path / "sub" / "rel.png"
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = matplotlib.image.imread(out)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100


def test_reliability_diagram_does_not_touch_pyplot(fresh_interpreter):
    # In a fresh interpreter: drawing must not import pyplot (which would select a global backend).
    loaded = fresh_interpreter("reliability diagram").modules
    assert "matplotlib.figure" in loaded and "matplotlib.pyplot" not in loaded


# --------------------------------------------------------------------------- evaluate


EXPECTED_KEYS = {"acc", "acc_top5", "ece", "adaece", "cwece", "nll", "brier", "entropy"}


def test_evaluate_matches_single_metrics():
    logits, labels = random_case(n=900, c=12, seed=7)
    out = M.evaluate(logits, labels)
    assert set(out) == EXPECTED_KEYS
    assert all(isinstance(v, float) for v in out.values())
    assert out["acc"] == M.accuracy(logits, labels)
    assert out["acc_top5"] == M.accuracy(logits, labels, k=5)
    assert out["ece"] == M.ece(logits, labels)
    assert out["adaece"] == M.adaptive_ece(logits, labels)
    assert out["cwece"] == M.classwise_ece(logits, labels)
    assert out["nll"] == M.nll(logits, labels)
    assert out["brier"] == M.brier(logits, labels)
    assert out["entropy"] == M.mean_entropy(logits)


def test_evaluate_and_evaluate_probs_agree():
    logits, labels = random_case(n=900, c=12, seed=8)
    counts = torch.randint(1, 300, (12,), generator=torch.Generator().manual_seed(0))
    groups, names = M.class_groups(counts, "thirds")
    from_logits = M.evaluate(logits, labels, groups, names)
    from_probs = M.evaluate_probs(torch.softmax(logits, dim=1), labels, groups, names)
    assert set(from_logits) == EXPECTED_KEYS | {f"{metric}_{group}" for metric in ("acc", "ece")
                                                for group in ("head", "medium", "tail")}
    assert set(from_probs) == set(from_logits)
    for key, value in from_logits.items():
        assert from_probs[key] == pytest.approx(value, abs=1e-5), key
    per_group = M.per_group_accuracy(logits, labels, groups)
    assert from_logits["acc_tail"] == pytest.approx(float(per_group[2]), abs=1e-12)
    # A group's ECE is the ECE of the test samples whose class is in the group.
    in_tail = groups[labels] == 2
    assert from_logits["ece_tail"] == pytest.approx(M.ece(logits[in_tail], labels[in_tail]), abs=1e-12)


def test_evaluate_probs_nll_clamps_zero_probability():
    probs = torch.tensor([[1.0, 0.0], [0.5, 0.5]])
    labels = torch.tensor([1, 0])
    out = M.evaluate_probs(probs, labels)
    tiny = torch.finfo(torch.float32).tiny
    assert math.isfinite(out["nll"])
    assert out["nll"] == pytest.approx((-math.log(tiny) + math.log(2)) / 2, rel=1e-6)
    assert out["entropy"] == pytest.approx(math.log(2) / 2, rel=1e-6)


def test_evaluate_group_names_default_and_mismatch():
    logits, labels = random_case(n=100, c=4, seed=9)
    groups = torch.tensor([0, 0, 1, 1])
    assert {"acc_group0", "acc_group1"} <= set(M.evaluate(logits, labels, groups))
    with pytest.raises(ValueError):
        M.evaluate(logits, labels, groups, ["head"])


def test_half_precision_logits_are_upcast():
    logits, labels = random_case(n=400, c=10, seed=10)
    half = logits.half()
    assert M.evaluate(half, labels) == M.evaluate(half.float(), labels)


def test_shape_errors():
    with pytest.raises(ValueError):
        M.ece(torch.randn(5), torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError):
        M.ece(torch.randn(5, 3), torch.zeros(4, dtype=torch.long))


# --------------------------------------------------------------------------- confidences on the bin edges


def edge_confidences(dtype: torch.dtype) -> list[float]:
    """For each interior edge k/15: the closest value of ``dtype`` to k/15 and its two neighbours."""
    np_dtype = np.float32 if dtype == torch.float32 else np.float64
    values = []
    for k in range(1, 15):
        on = np_dtype(k / 15)
        values += [float(np.nextafter(on, np_dtype(0))), float(on), float(np.nextafter(on, np_dtype(1)))]
    return values


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_confidences_on_bin_edges_are_binned_by_their_value(dtype):
    # cohort's ECE bins (docs/metrics.md) are (k/15, (k+1)/15]. The reference compares each
    # confidence, as the exact double it is, with the double k/15 (ref_bin); for a float32
    # confidence that is also the exact comparison with the rational k/15 (checked with Fraction),
    # e.g. float32(3/15) > 3/15 goes above the edge, and a float64 confidence equal to the double
    # 9/15 is on the edge, below it.
    from fractions import Fraction

    confs = edge_confidences(dtype)
    c = 16
    probs = torch.tensor([[conf] + [(1 - conf) / (c - 1)] * (c - 1) for conf in confs], dtype=dtype)
    labels = torch.tensor([i % 2 for i in range(len(confs))])  # correct (class 0) for every other sample
    expected = [ref_bin(conf, 15) for conf in confs]
    if dtype == torch.float32:
        assert expected == [sum(Fraction(conf) > Fraction(j, 15) for j in range(1, 15)) for conf in confs]
    assert float(probs.max(dim=1).values.double().sub(torch.tensor(confs, dtype=torch.float64)).abs().max()) == 0

    bins = R.reliability_bins_probs(probs, labels)
    assert bins.counts.tolist() == [float(expected.count(b)) for b in range(15)]
    assert M._equal_width_bins(probs.max(dim=1).values, 15).tolist() == expected
    corrects = [i % 2 == 0 for i in range(len(confs))]
    assert M.evaluate_probs(probs, labels)["ece"] == pytest.approx(ref_binned_error(confs, corrects, expected),
                                                                   abs=1e-12)
    assert bins.edges.tolist() == [k / 15 for k in range(16)]


def test_classwise_ece_bins_edge_confidences_by_their_value():
    confs = edge_confidences(torch.float32)
    probs = torch.tensor([[conf, 1 - conf] for conf in confs], dtype=torch.float32)
    labels = torch.tensor([i % 3 == 0 for i in range(len(confs))], dtype=torch.long)
    per_class = []
    for cls in range(2):
        p = [float(v) for v in probs[:, cls]]
        hits = [int(label) == cls for label in labels]
        per_class.append(ref_binned_error(p, hits, [ref_bin(v, 15) for v in p]))
    assert M.evaluate_probs(probs, labels)["cwece"] == pytest.approx(sum(per_class) / 2, abs=1e-12)
