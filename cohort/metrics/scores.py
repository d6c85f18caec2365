"""Accuracy and calibration metrics (their definitions: docs/metrics.md).

Every function is a pure function of torch tensors: ``logits`` ``[N, C]`` (float),
``probs`` ``[N, C]`` (rows summing to one) and ``labels`` ``[N]`` (long). Scalars come back
as Python floats, per-class/per-group results as small float64 tensors.

Binning conventions, shared by every calibration metric and by ``reliability_bins``:

* Equal-width bins use the edges ``k / n_bins`` computed in float64 (the closest double to
  each edge, as Python's ``k / n_bins``), compare the confidences in float64, and are
  right-closed, ``(lo, hi]``; a confidence of exactly 0 goes to the first bin. A float32
  confidence is thus binned by its exact value (float32 edges would put e.g. float32(3/15),
  which is above 3/15, into the bin below, but float32(9/15) into the bin above). (torchmetrics uses left-closed ``[lo, hi)`` bins instead, so the two only agree
  when no confidence lies exactly on an edge.)
* Equal-mass bins (AdaECE) sort the confidences ascending (stable sort, so ties keep sample
  order) and cut the sorted order into ``n_bins`` chunks by rank, as ``torch.tensor_split`` /
  ``np.array_split`` do: the first ``N % n_bins`` chunks hold one sample more than the rest.
  Equal confidences may therefore fall on both sides of a cut. With ``N < n_bins`` the last
  chunks are empty and count zero.
* A bin contributes ``(n_b / N) * |accuracy_b - mean confidence_b|``; empty bins contribute 0.

The calibration maths is written once, on (confidence, correct) pairs, so the logits path
(``evaluate``) and the probabilities path (``evaluate_probs``, for a cohort ensemble that
averages probabilities) share it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

__all__ = [
    "accuracy",
    "adaptive_ece",
    "brier",
    "class_groups",
    "classwise_ece",
    "ece",
    "evaluate",
    "evaluate_probs",
    "mean_entropy",
    "nll",
    "per_class_accuracy",
    "per_group_accuracy",
    "bin_edges",
    "bin_sums",
    "check_scores",
    "equal_width_bins",
    "from_logits",
    "from_probs",
    "top1",
]

GROUP_NAMES = {"thirds": ("head", "medium", "tail"), "shots": ("many", "medium", "few")}
SHOT_MANY_ABOVE = 100  # "many": strictly more than 100 training images
SHOT_FEW_BELOW = 20  # "few": strictly fewer than 20; 20..100 inclusive is "medium"


# --------------------------------------------------------------------------- inputs


def _as_float(x: torch.Tensor) -> torch.Tensor:
    """Detached floating tensor of at least single precision (half precision would bias the bins)."""
    x = x.detach()
    if not x.is_floating_point() or torch.finfo(x.dtype).bits < 32:
        x = x.float()
    return x


def _check(scores: torch.Tensor, labels: torch.Tensor) -> None:
    if scores.dim() != 2:
        raise ValueError(f"expected scores of shape [N, C], got {tuple(scores.shape)}")
    if labels.dim() != 1 or labels.shape[0] != scores.shape[0]:
        raise ValueError(f"expected labels of shape [{scores.shape[0]}], got {tuple(labels.shape)}")
    if scores.shape[0] == 0:
        raise ValueError("metrics need at least one sample")
    if labels.dtype in (torch.bool,) or labels.is_floating_point():
        raise ValueError(f"labels must be an integer tensor, got {labels.dtype}")


def _from_logits(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(probs, log_probs); log-probs from log_softmax so extreme logits stay finite."""
    logits = _as_float(logits)
    log_probs = torch.log_softmax(logits, dim=1)
    return log_probs.exp(), log_probs


def _from_probs(probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(probs, log_probs); probabilities are clamped before the log so a zero gives a large, finite NLL."""
    probs = _as_float(probs)
    tiny = torch.finfo(probs.dtype).tiny
    return probs, probs.clamp_min(tiny).log()


# --------------------------------------------------------------------------- binning core


def _edges(n_bins: int, device: torch.device) -> torch.Tensor:
    """The float64 edges ``k / n_bins``, each correctly rounded (``linspace`` may be one ulp off)."""
    if n_bins < 1:
        raise ValueError(f"n_bins must be at least 1, got {n_bins}")
    return torch.arange(n_bins + 1, dtype=torch.float64, device=device) / n_bins


def _equal_width_bins(conf: torch.Tensor, n_bins: int) -> torch.Tensor:
    """Bin index per confidence for right-closed bins ``(lo, hi]``; 0 lands in bin 0.

    bucketize against the interior edges returns i with edges[i] < conf <= edges[i+1], which
    is exactly the (lo, hi] convention and, unlike ceil(conf * n_bins) - 1, has no float error
    for confidences sitting on an edge.
    """
    interior = _edges(n_bins, conf.device)[1:-1]
    return torch.bucketize(conf.to(torch.float64), interior, right=False)


def _equal_mass_bins(conf: torch.Tensor, n_bins: int) -> torch.Tensor:
    """Bin index per confidence for ``n_bins`` rank-based chunks of the ascending sort."""
    if n_bins < 1:
        raise ValueError(f"n_bins must be at least 1, got {n_bins}")
    order = torch.sort(conf, stable=True).indices
    chunks = torch.tensor_split(order, n_bins)
    index = torch.empty_like(order)
    for b, members in enumerate(chunks):
        index[members] = b
    return index


def _bin_sums(
    conf: torch.Tensor, correct: torch.Tensor, index: torch.Tensor, n_bins: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-bin (count, sum of correct, sum of confidence) in float64 so large N does not drift."""
    conf = conf.to(torch.float64)
    correct = correct.to(torch.float64)
    counts = torch.bincount(index, minlength=n_bins).to(torch.float64)
    hits = torch.zeros(n_bins, dtype=torch.float64, device=conf.device).index_add_(0, index, correct)
    confs = torch.zeros(n_bins, dtype=torch.float64, device=conf.device).index_add_(0, index, conf)
    return counts, hits, confs


def _calibration_error(conf: torch.Tensor, correct: torch.Tensor, index: torch.Tensor, n_bins: int) -> float:
    counts, hits, confs = _bin_sums(conf, correct, index, n_bins)
    occupied = counts > 0
    gap = (hits[occupied] / counts[occupied] - confs[occupied] / counts[occupied]).abs()
    share = counts[occupied] / counts.sum()
    return float((share * gap).sum())


def _top1(probs: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(max probability, whether its class is the label) per sample."""
    conf, pred = probs.max(dim=1)
    return conf, pred == labels


def _ece(probs: torch.Tensor, labels: torch.Tensor, n_bins: int) -> float:
    conf, correct = _top1(probs, labels)
    return _calibration_error(conf, correct, _equal_width_bins(conf, n_bins), n_bins)


def _adaptive_ece(probs: torch.Tensor, labels: torch.Tensor, n_bins: int) -> float:
    conf, correct = _top1(probs, labels)
    return _calibration_error(conf, correct, _equal_mass_bins(conf, n_bins), n_bins)


def _classwise_ece(probs: torch.Tensor, labels: torch.Tensor, n_bins: int) -> float:
    per_class = []
    for c in range(probs.shape[1]):
        conf = probs[:, c].contiguous()  # bucketize copies (and warns) on a strided column
        per_class.append(_calibration_error(conf, labels == c, _equal_width_bins(conf, n_bins), n_bins))
    return float(np.mean(per_class))


# --------------------------------------------------------------------------- other metrics on probs


def _topk_accuracy(scores: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    k = min(k, scores.shape[1])
    topk = scores.topk(k, dim=1).indices
    return float((topk == labels[:, None]).any(dim=1).double().mean())


def _nll(log_probs: torch.Tensor, labels: torch.Tensor) -> float:
    picked = log_probs.gather(1, labels[:, None]).squeeze(1)
    return float(-picked.double().mean())


def _brier(probs: torch.Tensor, labels: torch.Tensor) -> float:
    onehot = torch.nn.functional.one_hot(labels, probs.shape[1]).to(probs.dtype)
    return float((probs - onehot).double().pow(2).sum(dim=1).mean())


def _entropy(probs: torch.Tensor, log_probs: torch.Tensor) -> float:
    # p log p -> 0 as p -> 0; masking avoids 0 * (-inf) = nan for logits of -inf.
    plogp = torch.where(probs > 0, probs * log_probs, torch.zeros_like(probs))
    return float(-plogp.double().sum(dim=1).mean())


# --------------------------------------------------------------------------- public: single metrics


def accuracy(logits: torch.Tensor, labels: torch.Tensor, k: int = 1) -> float:
    """Top-k accuracy as a fraction in [0, 1]; ``k`` larger than the class count is clamped to it."""
    _check(logits, labels)
    return _topk_accuracy(_as_float(logits), labels, k)


def ece(logits: torch.Tensor, labels: torch.Tensor, n_bins: int = 15) -> float:
    """Expected calibration error: equal-width ``(lo, hi]`` bins on the max softmax probability."""
    _check(logits, labels)
    return _ece(_from_logits(logits)[0], labels, n_bins)


def adaptive_ece(logits: torch.Tensor, labels: torch.Tensor, n_bins: int = 15) -> float:
    """AdaECE: as ``ece`` but with equal-mass bins.

    Confidences are sorted ascending (stable) and the sorted order is cut by rank into
    ``n_bins`` chunks like ``np.array_split``: the first ``N % n_bins`` chunks get one extra
    sample, ties may straddle a cut, and with ``N < n_bins`` the trailing chunks are empty.
    """
    _check(logits, labels)
    return _adaptive_ece(_from_logits(logits)[0], labels, n_bins)


def classwise_ece(logits: torch.Tensor, labels: torch.Tensor, n_bins: int = 15) -> float:
    """Classwise ECE: for each class c, the ``ece`` binning on ``p_c`` against ``1[y = c]``,
    averaged over all C classes (a class absent from ``labels`` still contributes its ECE
    of ``p_c`` against 0)."""
    _check(logits, labels)
    return _classwise_ece(_from_logits(logits)[0], labels, n_bins)


def nll(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean cross-entropy in nats, from log_softmax."""
    _check(logits, labels)
    return _nll(_from_logits(logits)[1], labels)


def brier(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Multiclass Brier score ``(1/N) sum_i sum_c (p_ic - 1[y_i = c])^2``, in [0, 2]."""
    _check(logits, labels)
    return _brier(_from_logits(logits)[0], labels)


def mean_entropy(logits: torch.Tensor) -> float:
    """Mean predictive entropy of the softmax in nats (finite for extreme or -inf logits)."""
    if logits.dim() != 2 or logits.shape[0] == 0:
        raise ValueError(f"expected non-empty logits of shape [N, C], got {tuple(logits.shape)}")
    return _entropy(*_from_logits(logits))


def per_class_accuracy(logits: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Top-1 accuracy per class as a float64 tensor ``[num_classes]``; NaN for a class with no sample."""
    _check(logits, labels)
    correct = (_as_float(logits).argmax(dim=1) == labels).to(torch.float64)
    counts = torch.bincount(labels, minlength=num_classes).to(torch.float64)
    hits = torch.zeros(num_classes, dtype=torch.float64, device=labels.device).index_add_(0, labels, correct)
    return hits / counts  # 0 / 0 gives NaN, which is the documented "no sample" marker


def per_group_accuracy(logits: torch.Tensor, labels: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """Accuracy per class group, float64 ``[G]`` with ``groups`` mapping class -> group 0..G-1.

    A group's accuracy is the mean of the per-class accuracies of its classes that have test
    samples (the usual long-tail many/medium/few-shot evaluation); on a class-balanced test set
    this equals the pooled accuracy over the group's samples. NaN for a group with no sample.
    """
    groups = torch.as_tensor(groups, dtype=torch.long, device=labels.device)
    if groups.dim() != 1 or groups.shape[0] != logits.shape[1]:
        raise ValueError(f"groups must have shape [{logits.shape[1]}], got {tuple(groups.shape)}")
    per_class = per_class_accuracy(logits, labels, logits.shape[1])
    n_groups = int(groups.max()) + 1
    return torch.stack([per_class[groups == g].nanmean() for g in range(n_groups)])


def _per_group_ece(probs: torch.Tensor, labels: torch.Tensor, groups: torch.Tensor, n_bins: int) -> list[float]:
    """ECE of the test samples whose class is in each group (NaN for a group with none)."""
    sample_group = torch.as_tensor(groups, dtype=torch.long, device=labels.device)[labels]
    values = []
    for g in range(int(groups.max()) + 1):
        members = sample_group == g
        values.append(_ece(probs[members], labels[members], n_bins) if members.any() else math.nan)
    return values


# --------------------------------------------------------------------------- class groups


def class_groups(train_counts: Sequence[int] | torch.Tensor | np.ndarray, rule: str) -> tuple[torch.Tensor, list[str]]:
    """Class -> group map from the *training set's* per-class image counts.

    ``rule="thirds"``: classes ranked by count descending, ties by class index ascending,
    then the ranking is cut into head/medium/tail like ``np.array_split`` (so with C % 3 == 1
    head gets the extra class, with C % 3 == 2 head and medium get one each). Needs C >= 3.

    ``rule="shots"``: many (> 100 images), medium (20..100 inclusive), few (< 20). Empty groups
    are dropped and the rest renumbered 0..G-1 in head -> tail order.

    Returns ``(groups LongTensor [C], names)``.
    """
    counts = np.asarray(torch.as_tensor(train_counts).cpu().numpy()).reshape(-1)
    if counts.size == 0 or np.any(counts < 0):
        raise ValueError("train_counts must be a non-empty sequence of non-negative counts")
    if rule == "thirds":
        return _thirds(counts)
    if rule == "shots":
        return _shots(counts)
    raise ValueError(f"unknown grouping rule {rule!r}; expected 'thirds' or 'shots'")


def _thirds(counts: np.ndarray) -> tuple[torch.Tensor, list[str]]:
    if counts.size < 3:
        raise ValueError(f"the thirds split needs at least 3 classes, got {counts.size}")
    ranked = np.argsort(-counts, kind="stable")  # stable: equal counts keep class-index order
    groups = np.empty(counts.size, dtype=np.int64)
    for g, members in enumerate(np.array_split(ranked, 3)):
        groups[members] = g
    return torch.from_numpy(groups), list(GROUP_NAMES["thirds"])


def _shots(counts: np.ndarray) -> tuple[torch.Tensor, list[str]]:
    raw = np.where(counts > SHOT_MANY_ABOVE, 0, np.where(counts >= SHOT_FEW_BELOW, 1, 2))
    present = [g for g in range(3) if np.any(raw == g)]
    renumber = {old: new for new, old in enumerate(present)}
    groups = np.array([renumber[g] for g in raw], dtype=np.int64)
    return torch.from_numpy(groups), [GROUP_NAMES["shots"][g] for g in present]


# --------------------------------------------------------------------------- summary


def _summary(
    probs: torch.Tensor,
    log_probs: torch.Tensor,
    labels: torch.Tensor,
    groups: torch.Tensor | None,
    group_names: Sequence[str] | None,
    n_bins: int,
) -> dict[str, float]:
    out = {
        "acc": _topk_accuracy(probs, labels, 1),
        "acc_top5": _topk_accuracy(probs, labels, 5),
        "ece": _ece(probs, labels, n_bins),
        "adaece": _adaptive_ece(probs, labels, n_bins),
        "cwece": _classwise_ece(probs, labels, n_bins),
        "nll": _nll(log_probs, labels),
        "brier": _brier(probs, labels),
        "entropy": _entropy(probs, log_probs),
    }
    if groups is not None:
        # per_group_accuracy takes argmax of its scores; probabilities rank classes like logits do.
        per_group = per_group_accuracy(probs, labels, groups)
        names = list(group_names) if group_names is not None else [f"group{g}" for g in range(len(per_group))]
        if len(names) != len(per_group):
            raise ValueError(f"{len(per_group)} groups but {len(names)} group names")
        out.update({f"acc_{name}": float(value) for name, value in zip(names, per_group)})
        out.update({f"ece_{name}": value for name, value in zip(names, _per_group_ece(probs, labels, groups, n_bins))})
    return out


def evaluate(
    logits: torch.Tensor,
    labels: torch.Tensor,
    groups: torch.Tensor | None = None,
    group_names: Sequence[str] | None = None,
    n_bins: int = 15,
) -> dict[str, float]:
    """All metrics from logits: ``acc``, ``acc_top5``, ``ece``, ``adaece``, ``cwece``, ``nll``,
    ``brier``, ``entropy`` and, with ``groups``, ``acc_<name>`` per group (``group<g>`` when no
    names are given). Accuracies are fractions in [0, 1]; a group without test samples is NaN."""
    _check(logits, labels)
    probs, log_probs = _from_logits(logits)
    return _summary(probs, log_probs, labels, groups, group_names, n_bins)


def evaluate_probs(
    probs: torch.Tensor,
    labels: torch.Tensor,
    groups: torch.Tensor | None = None,
    group_names: Sequence[str] | None = None,
    n_bins: int = 15,
) -> dict[str, float]:
    """``evaluate`` for probabilities, e.g. a cohort ensemble's mean of member probabilities.

    NLL and entropy use the log of the probabilities clamped to the smallest positive float.
    """
    _check(probs, labels)
    probs, log_probs = _from_probs(probs)
    return _summary(probs, log_probs, labels, groups, group_names, n_bins)


# --------------------------------------------------------------------------- for cohort.metrics.reliability

# The checks and the ``ece`` binning, public: reliability bins are binned by these very functions.
check_scores = _check
from_logits = _from_logits
from_probs = _from_probs
bin_edges = _edges
equal_width_bins = _equal_width_bins
bin_sums = _bin_sums
top1 = _top1
