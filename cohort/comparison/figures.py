"""The comparison's figures: reliability diagrams across runs, accuracy / ECE and entropy per epoch,
accuracy per class group; and logging them into each run's MLflow artifacts under ``compare/``."""
from __future__ import annotations

import json
import math
import re
import tempfile
from pathlib import Path

from cohort.comparison.runs import ENSEMBLE, CohortRun, model_of
from cohort.config.errors import CohortError, first_line

GROUP_ORDERS = (("head", "medium", "tail"), ("many", "medium", "few"))
PANELS_PER_ROW = 4


def new_figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height))
    FigureCanvasAgg(figure)
    return figure


def save(figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png", dpi=100, bbox_inches="tight")
    return path


def reliability_source(client, run: CohortRun, peer: str, scratch: Path):
    """The run's final reliability bins of ``peer`` (a ``ReliabilityBins``), else the path of its
    PNG diagram (runs from before the bins were logged), else None (a sweep trial logs neither)."""

    from cohort.metrics.reliability import ReliabilityBins, bins_file_name

    logged = {Path(item.path).name for item in client.list_artifacts(run.run_id, "reliability")}
    for suffix in (".json", ".png"):
        name = bins_file_name(peer, suffix)
        if name not in logged:
            continue
        local = Path(client.download_artifacts(run.run_id, f"reliability/{name}", str(scratch / run.run_id)))
        if suffix == ".png":
            return local
        return ReliabilityBins.from_dict(json.loads(local.read_text()))
    return None


def draw_bins(top, bottom, bins) -> None:
    """Accuracy per confidence bin with the gap to the diagonal shaded, as cohort.metrics.reliability draws it,
    and beneath it the share of samples per bin (on digits nearly all sit in the last bin, and a
    bin of two samples should not look as weighty as one of three hundred)."""
    import numpy as np

    edges = bins.edges.numpy()
    lefts, widths = edges[:-1], np.diff(edges)
    occupied = bins.counts.numpy() > 0
    accuracy = np.where(occupied, np.nan_to_num(bins.accuracy.numpy()), 0.0)
    confidence = np.where(occupied, np.nan_to_num(bins.confidence.numpy()), lefts + widths / 2)
    top.bar(lefts, accuracy, width=widths, align="edge", color="tab:blue", edgecolor="black", label="accuracy")
    top.bar(lefts, np.where(occupied, np.abs(confidence - accuracy), 0.0), bottom=np.minimum(accuracy, confidence),
            width=widths, align="edge", color="tab:red", alpha=0.3, edgecolor="tab:red", hatch="//", label="gap")
    top.plot([0, 1], [0, 1], linestyle="--", color="gray", label="perfect calibration")
    top.set_xlim(0, 1)
    top.set_ylim(0, 1)
    top.set_ylabel("accuracy")
    top.tick_params(labelbottom=False)
    share = bins.counts.numpy() / max(float(bins.counts.sum()), 1.0)
    bottom.bar(lefts, share, width=widths, align="edge", color="tab:gray", edgecolor="black")
    bottom.set_ylim(0, 1)
    bottom.set_xlabel("confidence")
    bottom.set_ylabel("share")


def reliability_figure(client, runs: list[CohortRun], peer: str | None, path: Path, scratch: Path) -> list[CohortRun]:
    """Side-by-side reliability diagrams of one peer per run; returns the runs drawn."""
    from matplotlib.image import imread

    drawn = [run for run in runs if (peer or run.peers[-1]) in run.members]
    columns = min(len(drawn), PANELS_PER_ROW)
    rows = math.ceil(len(drawn) / columns)
    figure = new_figure(4.2 * columns, 5.2 * rows)
    grid = figure.add_gridspec(2 * rows, columns, height_ratios=(3, 1) * rows, hspace=0.12)
    for index, run in enumerate(drawn):
        member = peer or run.peers[-1]
        row, column = divmod(index, columns)
        top = figure.add_subplot(grid[2 * row, column])
        source = reliability_source(client, run, member, scratch)
        if isinstance(source, Path):
            # An older run's own diagram already has its share histogram: give it both cells.
            top.remove()
            top = figure.add_subplot(grid[2 * row:2 * row + 2, column])
            top.imshow(imread(source))
            top.axis("off")
            ece = run.metric(member, "ece")
        elif source is None:
            top.text(0.5, 0.5, "no reliability diagram logged\n(sweep trials log none)", ha="center", va="center")
            top.set_xticks([])
            top.set_yticks([])
            ece = run.metric(member, "ece")
        else:
            draw_bins(top, figure.add_subplot(grid[2 * row + 1, column], sharex=top), source)
            ece = source.ece
            if index == 0:
                top.legend(loc="upper left", fontsize=8)
        heading = f"ECE {ece:.4f}" if ece is not None else "ECE n/a"
        top.set_title(f"{run.label}\n{member} ({model_of(run.params, member)}): {heading}", fontsize=9)
    save(figure, path)
    return drawn


def history(client, run: CohortRun, key: str) -> list[tuple[int, float]]:
    if key not in run.histories:
        points = sorted((m.step, m.value) for m in client.get_metric_history(run.run_id, key))
        run.histories[key] = [(step, value) for step, value in points if math.isfinite(value)]
    return run.histories[key]


def plot_members(axes, client, run: CohortRun, metric: str, scale: float = 1.0) -> None:
    """One line per member that logged ``metric`` (a sweep trial may lack some), with a legend."""
    for member in run.members:
        points = history(client, run, f"{member}/{metric}")
        if points:
            style = {"color": "black", "linestyle": "--"} if member == ENSEMBLE else {}
            axes.plot([step for step, _ in points], [scale * value for _, value in points], marker="o",
                      markersize=3, label=member, **style)
    axes.set_xlabel("epoch")
    axes.grid(alpha=0.3)
    if axes.lines:
        axes.legend(fontsize=8)


def curves_figure(client, run: CohortRun, path: Path) -> Path:
    figure = new_figure(10, 4)
    accuracy, ece = figure.subplots(1, 2)
    plot_members(accuracy, client, run, "acc", scale=100)
    accuracy.set_ylabel("top-1 accuracy (%)")
    plot_members(ece, client, run, "ece")
    ece.set_ylabel("ECE")
    figure.suptitle(f"{run.label}: accuracy and calibration per epoch")
    return save(figure, path)


def entropy_figure(client, run: CohortRun, path: Path) -> Path:
    figure = new_figure(6, 4)
    axes = figure.subplots()
    plot_members(axes, client, run, "entropy")
    axes.set_ylabel("mean predictive entropy (nats)")
    axes.set_title(f"{run.label}: predictive entropy per epoch")
    return save(figure, path)


def groups_of(run: CohortRun) -> list[str]:
    """The class groups the run reports ``acc_<group>`` for, head to tail when the names say so."""
    found = {key.split("/", 1)[1][len("acc_"):] for key in run.metrics
             if "/acc_" in key and key.split("/", 1)[0] in set(run.members)} - {"top5"}
    for order in GROUP_ORDERS:
        if found <= set(order):
            return [group for group in order if group in found]
    return sorted(found)


def groups_figure(run: CohortRun, groups: list[str], path: Path) -> Path:
    import numpy as np

    figure = new_figure(max(6.0, 1.6 * len(groups) * len(run.members) / 2), 4)
    axes = figure.subplots()
    width = 0.8 / len(run.members)
    positions = np.arange(len(groups))
    for index, member in enumerate(run.members):
        values = [run.metric(member, f"acc_{group}") for group in groups]
        axes.bar(positions + (index - (len(run.members) - 1) / 2) * width,
                 [100 * v if v is not None else 0.0 for v in values], width=width, label=member)
    axes.set_xticks(positions, groups)
    axes.set_ylabel("top-1 accuracy (%)")
    axes.set_ylim(0, 100)
    axes.legend(fontsize=8)
    axes.set_title(f"{run.label}: accuracy per class group (final epoch)")
    return save(figure, path)


def safe_name(text: str) -> str:
    """``text`` usable as a file name (experiment and peer names may hold anything)."""
    return re.sub(r"[^\w.-]+", "_", text)


def run_folder(run: CohortRun) -> str:
    return safe_name(f"{run.experiment}-{run.short}")


def make_figures(client, runs: list[CohortRun], peer: str | None, out: Path) -> dict[str, list[Path]]:
    """Write every figure; return, per run id, the files that belong in that run's artifacts."""
    belongs: dict[str, list[Path]] = {run.run_id: [] for run in runs}
    with tempfile.TemporaryDirectory(prefix="cohort-compare-") as scratch:
        path = out / (f"reliability_{safe_name(peer)}.png" if peer else "reliability.png")
        for run in reliability_figure(client, runs, peer, path, Path(scratch)):
            belongs[run.run_id].append(path)
    for run in runs:
        folder = out / run_folder(run)
        belongs[run.run_id].append(curves_figure(client, run, folder / "accuracy_ece.png"))
        belongs[run.run_id].append(entropy_figure(client, run, folder / "entropy.png"))
        groups = groups_of(run)
        if groups:
            belongs[run.run_id].append(groups_figure(run, groups, folder / "groups.png"))
    return belongs


def publish(client, belongs: dict[str, list[Path]]) -> None:
    for run_id, paths in belongs.items():
        try:
            for path in paths:
                client.log_artifact(run_id, str(path), "compare")
        except Exception as error:  # noqa: BLE001 - artifact stores fail in many ways (permissions, network)
            raise CohortError(f"cannot log the figures into MLflow run {run_id}: {first_line(error)} "
                              "(the figures are written)") from None
