"""Reliability bins and diagrams: per confidence bin, the count, accuracy and mean confidence of the
max probability, binned as ``cohort.metrics.scores.ece`` bins (equal-width ``(lo, hi]`` bins; the binning
core lives in ``cohort.metrics.scores``), and the PNG diagram of them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

# The binning core under the names the functions below were written with (moved verbatim from
# cohort.metrics.scores, which keeps the binning so that ECE and the diagrams cannot drift apart).
from cohort.metrics.scores import bin_edges as _edges
from cohort.metrics.scores import bin_sums as _bin_sums
from cohort.metrics.scores import check_scores as _check
from cohort.metrics.scores import equal_width_bins as _equal_width_bins
from cohort.metrics.scores import from_logits as _from_logits
from cohort.metrics.scores import from_probs as _from_probs
from cohort.metrics.scores import top1 as _top1

__all__ = ["BINS_PREFIX", "ReliabilityBins", "bins_file_name", "reliability_bins", "reliability_bins_probs",
           "reliability_diagram"]


# --------------------------------------------------------------------------- reliability bins


BIN_FIELDS = ("edges", "counts", "accuracy", "confidence")
# A run's bins of one peer (or the ensemble), and their diagram: reliability/reliability_<peer>.json, .png.
BINS_PREFIX = "reliability_"


def bins_file_name(peer: str, suffix: str = ".json") -> str:
    """The name of ``peer``'s bins file in a run (``suffix=".png"``: of their diagram)."""
    return f"{BINS_PREFIX}{peer}{suffix}"


@dataclass
class ReliabilityBins:
    """Per-bin statistics of the ``ece`` binning (float64 tensors, bins ``(lo, hi]``).

    Small enough to send from a worker instead of its logits; ``merge`` pools several.
    ``accuracy`` and ``confidence`` are NaN for empty bins.
    """

    edges: torch.Tensor  # [n_bins + 1]
    counts: torch.Tensor  # [n_bins]
    accuracy: torch.Tensor  # [n_bins]
    confidence: torch.Tensor  # [n_bins]

    @property
    def n_bins(self) -> int:
        return int(self.counts.shape[0])

    def as_dict(self) -> dict[str, list[float]]:
        """The bins as plain lists: what a run logs as ``reliability/reliability_<peer>.json``."""
        return {field: getattr(self, field).tolist() for field in BIN_FIELDS}

    @classmethod
    def from_dict(cls, data: Mapping[str, Sequence[float]]) -> ReliabilityBins:
        """The bins ``as_dict`` gave (read back from a run's JSON)."""
        return cls(**{field: torch.tensor(data[field], dtype=torch.float64) for field in BIN_FIELDS})

    @property
    def ece(self) -> float:
        occupied = self.counts > 0
        share = self.counts[occupied] / self.counts.sum()
        return float((share * (self.accuracy[occupied] - self.confidence[occupied]).abs()).sum())

    @classmethod
    def merge(cls, parts: Sequence[ReliabilityBins]) -> ReliabilityBins:
        """Pool bins computed on disjoint shards of the data (same edges required)."""
        if not parts:
            raise ValueError("nothing to merge")
        edges = parts[0].edges
        if any(p.edges.shape != edges.shape or not torch.equal(p.edges, edges) for p in parts):
            raise ValueError("cannot merge reliability bins with different edges")
        counts = sum(p.counts for p in parts)
        hits = sum(torch.nan_to_num(p.accuracy) * p.counts for p in parts)
        confs = sum(torch.nan_to_num(p.confidence) * p.counts for p in parts)
        return cls(edges=edges.clone(), counts=counts, accuracy=hits / counts, confidence=confs / counts)


def _reliability(probs: torch.Tensor, labels: torch.Tensor, n_bins: int) -> ReliabilityBins:
    conf, correct = _top1(probs, labels)
    counts, hits, confs = _bin_sums(conf, correct, _equal_width_bins(conf, n_bins), n_bins)
    edges = _edges(n_bins, conf.device)
    return ReliabilityBins(edges=edges, counts=counts, accuracy=hits / counts, confidence=confs / counts)


def reliability_bins(logits: torch.Tensor, labels: torch.Tensor, n_bins: int = 15) -> ReliabilityBins:
    """Per-bin counts, accuracy and mean confidence of the max softmax probability."""
    _check(logits, labels)
    return _reliability(_from_logits(logits)[0], labels, n_bins)


def reliability_bins_probs(probs: torch.Tensor, labels: torch.Tensor, n_bins: int = 15) -> ReliabilityBins:
    """``reliability_bins`` for probabilities (e.g. a cohort ensemble's mean of probabilities)."""
    _check(probs, labels)
    return _reliability(_from_probs(probs)[0], labels, n_bins)


# --------------------------------------------------------------------------- diagram


def reliability_diagram(bins: ReliabilityBins, path: str | Path, title: str = "") -> Path:
    """Write a PNG reliability diagram and return its path.

    Top: per-bin accuracy bars against confidence, the gap to the diagonal shaded, the
    diagonal, ECE in the title. Beneath: the share of samples per confidence bin.
    Uses Figure + FigureCanvasAgg so no global pyplot state or backend is touched.
    """
    # Imported here: matplotlib costs every worker and driver half a second of start-up otherwise.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    edges = bins.edges.cpu().numpy()
    lefts, widths = edges[:-1], np.diff(edges)
    centers = lefts + widths / 2
    occupied = bins.counts.cpu().numpy() > 0
    acc = np.where(occupied, np.nan_to_num(bins.accuracy.cpu().numpy()), 0.0)
    conf = np.where(occupied, np.nan_to_num(bins.confidence.cpu().numpy()), centers)
    share = bins.counts.cpu().numpy() / max(float(bins.counts.sum()), 1.0)

    fig = Figure(figsize=(5.0, 6.0))
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(2, 1, height_ratios=(3, 1), hspace=0.08)
    top = fig.add_subplot(grid[0])
    bottom = fig.add_subplot(grid[1], sharex=top)

    top.bar(lefts, acc, width=widths, align="edge", color="tab:blue", edgecolor="black", label="accuracy")
    # Gap between the bin's accuracy and its mean confidence (the diagonal at that confidence).
    gap_low = np.minimum(acc, conf)
    gap = np.where(occupied, np.abs(conf - acc), 0.0)
    top.bar(lefts, gap, bottom=gap_low, width=widths, align="edge", color="tab:red", alpha=0.3,
            edgecolor="tab:red", hatch="//", label="gap")
    top.plot([0, 1], [0, 1], linestyle="--", color="gray", label="perfect calibration")
    top.set_xlim(0, 1)
    top.set_ylim(0, 1)
    top.set_ylabel("accuracy")
    top.legend(loc="upper left")
    heading = f"ECE = {bins.ece:.4f}"
    top.set_title(f"{title}\n{heading}" if title else heading)
    top.tick_params(labelbottom=False)

    bottom.bar(lefts, share, width=widths, align="edge", color="tab:gray", edgecolor="black")
    bottom.set_xlabel("confidence")
    bottom.set_ylabel("share")
    bottom.set_ylim(0, max(float(share.max()), 1e-12) * 1.1)

    fig.savefig(path, format="png", dpi=100, bbox_inches="tight")
    return path
