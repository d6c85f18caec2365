"""``python -m cohort.compare``: cohort runs side by side, from their MLflow records.

One row per run and peer (and the cohort's ensemble): the peer's method (the losses of the edges
into it), model, final accuracy and calibration, and its gap to the best peer it learns from.
Figures (reliability diagrams across runs, accuracy / ECE / entropy per epoch, per-group accuracy)
go to a folder and into each run's MLflow artifacts under ``compare/``.
"""
from __future__ import annotations

import argparse
import ast
import csv
import io
import json
import math
import os
import re
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from cohort.errors import CohortError, first_line, run_command

BASE_COLUMNS = ("run", "experiment", "peer", "method", "model", "top-1", "ECE", "AdaECE", "NLL", "Brier", "gap")
TEXT_COLUMNS = ("run", "experiment", "peer", "method", "model")
# Table column -> the metric it shows (``<peer>/<metric>``).
METRIC_OF_COLUMN = {"top-1": "acc", "ECE": "ece", "AdaECE": "adaece", "NLL": "nll", "Brier": "brier"}
ENSEMBLE = "ensemble"
NOT_PEERS = {ENSEMBLE, "cohort"}  # metric prefixes that are not peers
ENSEMBLE_MODEL = "(mean of probs)"
GROUP_ORDERS = (("head", "medium", "tail"), ("many", "medium", "few"))
SHORT_ID = 8
PANELS_PER_ROW = 4


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m cohort.compare", description=__doc__.splitlines()[0])
    parser.add_argument("--experiment", dest="experiments", action="append", default=[], metavar="NAME",
                        help="compare every run of this MLflow experiment (repeatable)")
    parser.add_argument("--runs", nargs="+", action="extend", default=[], metavar="ID",
                        help="compare these runs (full ids, or unique prefixes such as the table's short ids)")
    parser.add_argument("--peer", help="only this peer's rows ('ensemble' for the ensemble); also the peer of the "
                                       "reliability figure (default there: each run's last peer in rank order)")
    parser.add_argument("--metric", dest="metrics", action="append", default=[], metavar="KEY",
                        help="add a column for this reported metric, e.g. acc_top5, entropy, cwece (repeatable)")
    parser.add_argument("--sort", metavar="COLUMN", help="sort rows by this column: accuracies high to low, "
                                                         "everything else low to high")
    parser.add_argument("--format", choices=("table", "csv", "markdown"), default="table", help="default: table")
    parser.add_argument("--out", default="compare", metavar="DIR", help="where the figures go (default: ./compare)")
    parser.add_argument("--no-figures", action="store_true",
                        help="print the table only: draw nothing and log nothing to MLflow")
    parser.add_argument("--tracking-uri", metavar="URI", help="MLflow tracking URI (default: sqlite:///mlflow.db)")
    return parser.parse_args(argv)


# --------------------------------------------------------------------------- the store


def connect(uri: str):
    """An MlflowClient for an existing, readable store (reading must never create an empty one)."""
    from cohort.tracking import _quiet_mlflow

    _quiet_mlflow()
    # Downloading a few small reliability files should not draw progress bars between the notes.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    from mlflow.tracking import MlflowClient

    prefix = "sqlite:///"
    if uri.startswith(prefix) and not Path(uri[len(prefix):]).is_file():
        raise CohortError(f"MLflow tracking store {uri!r}: no such database file (train a cohort first, "
                          "or pass --tracking-uri)")
    try:
        client = MlflowClient(tracking_uri=uri)
        client.search_experiments(max_results=1)
    except Exception as error:  # noqa: BLE001 - any failure here means the store is not usable
        raise CohortError(f"MLflow tracking store {uri!r} is not usable: {first_line(error)}") from None
    return client


def experiment_names(client) -> list[str]:
    return sorted(experiment.name for experiment in _all_pages(client.search_experiments))


def find_runs(client, experiments: list[str], run_ids: list[str]) -> list:
    """The MLflow runs asked for: every live run of each experiment (oldest first), then each
    ``--runs`` id, without repeats."""
    found: dict[str, Any] = {}
    for name in dict.fromkeys(experiments):
        experiment = client.get_experiment_by_name(name)
        if experiment is None or experiment.lifecycle_stage != "active":
            raise CohortError(f"--experiment {name!r}: no such experiment "
                              f"(experiments: {', '.join(experiment_names(client)) or 'none'})")
        runs = _all_pages(lambda page_token=None: client.search_runs(
            [experiment.experiment_id], order_by=["attributes.start_time ASC"], page_token=page_token))
        found.update((run.info.run_id, run) for run in runs)
    for run_id in run_ids:
        run = get_run(client, run_id)
        found.setdefault(run.info.run_id, run)
    return list(found.values())


def get_run(client, run_id: str):
    """A run by full id or by a unique prefix of one."""
    from mlflow.exceptions import MlflowException

    if len(run_id) == 32:
        try:
            run = client.get_run(run_id)
        except MlflowException:
            run = None
        if run is not None and run.info.lifecycle_stage == "active":
            return run
        raise CohortError(f"--runs {run_id!r}: no such run")
    # MLflow cannot search by id prefix: look through the live runs of every experiment.
    experiment_ids = [experiment.experiment_id for experiment in _all_pages(client.search_experiments)]
    every = _all_pages(lambda page_token=None: client.search_runs(experiment_ids, page_token=page_token))
    matches = [run for run in every if run.info.run_id.startswith(run_id.lower())] if run_id else []
    if len(matches) != 1:
        raise CohortError(f"--runs {run_id!r}: " + ("no such run" if not matches else
                                                    f"{len(matches)} runs start with it; give more of the id"))
    return matches[0]


def _all_pages(search) -> list:
    """Every item of a paged MLflow search (one page holds at most 1000)."""
    items, token = [], None
    while True:
        page = search(page_token=token)
        items.extend(page)
        token = page.token
        if not token:
            return items


# --------------------------------------------------------------------------- what a run holds


@dataclass
class CohortRun:
    """One cohort run as the comparison needs it: its peers in rank order, the resolved topology's
    params and its final (last-step) metrics."""

    run_id: str
    experiment: str
    peers: tuple[str, ...]
    params: dict[str, str]
    metrics: dict[str, float]
    has_ensemble: bool
    histories: dict[str, list[tuple[int, float]]] = field(default_factory=dict)

    @property
    def short(self) -> str:
        return self.run_id[:SHORT_ID]

    @property
    def label(self) -> str:
        return f"{self.experiment} {self.short}"

    @property
    def members(self) -> tuple[str, ...]:
        """The rows of this run: its peers, then the ensemble."""
        return self.peers + ((ENSEMBLE,) if self.has_ensemble else ())

    def metric(self, member: str, key: str) -> float | None:
        value = self.metrics.get(f"{member}/{key}")
        return value if value is not None and math.isfinite(value) else None


def reported_peers(metrics: dict[str, float]) -> set[str]:
    return {key.split("/", 1)[0] for key in metrics if key.endswith("/acc")} - NOT_PEERS


def load_runs(client, runs: list) -> tuple[list[CohortRun], int]:
    """The cohort runs among ``runs`` and how many were skipped for having no peer metrics
    (a sweep's parent run, a run that failed before its first epoch)."""
    experiments: dict[str, str] = {}
    parents: dict[str, Any] = {}
    loaded = []
    for run in runs:
        metrics = dict(run.data.metrics)
        peers = reported_peers(metrics)
        if not peers:
            continue
        # A sweep trial logs only its sampled values: the rest of its topology is its parent's.
        parent_id = run.data.tags.get("mlflow.parentRunId")
        if parent_id and parent_id not in parents:
            parents[parent_id] = parent_run(client, parent_id)
        parent = parents.get(parent_id) if parent_id else None
        params = overlay(parent.data.params if parent else {}, run.data.params)
        rank_tag = run.data.tags.get("cohort.peers") or (parent.data.tags.get("cohort.peers") if parent else None)
        experiment_id = run.info.experiment_id
        if experiment_id not in experiments:
            experiments[experiment_id] = client.get_experiment(experiment_id).name
        loaded.append(CohortRun(run.info.run_id, experiments[experiment_id], rank_order(peers, rank_tag), params,
                                metrics, f"{ENSEMBLE}/acc" in metrics))
    return loaded, len(runs) - len(loaded)


def rank_order(peers: set[str], rank_tag: str | None) -> tuple[str, ...]:
    """The peers in worker rank order (the ``cohort.peers`` tag); any the tag does not name, after."""
    ranked = [peer for peer in (rank_tag or "").split(",") if peer in peers]
    return tuple(ranked + sorted(peers - set(ranked)))


def parent_run(client, run_id: str):
    """A sweep trial's parent run, or None once it has been removed from the store."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_run(run_id)
    except MlflowException:
        return None


def overlay(base: dict[str, str], override: dict[str, str]) -> dict[str, str]:
    """``base`` with ``override``'s keys replacing whole subtrees: a trial's ``edges.1.from`` replaces
    its parent's ``edges.1.from.ensemble`` and the other way round."""
    merged = {key: value for key, value in base.items()
              if not any(key.startswith(new + ".") or new.startswith(key + ".") for new in override)}
    merged.update(override)
    return merged


@dataclass(frozen=True)
class Edge:
    senders: tuple[str, ...]
    receiver: str
    loss: str


def edges_of(params: dict[str, str]) -> list[Edge]:
    """The topology's edges, in file order, from its flattened params."""
    found: dict[int, dict[str, Any]] = {}
    for key, value in params.items():
        match = re.fullmatch(r"edges\.(\d+)\.(from|from\.ensemble|to|loss)", key)
        if match:
            found.setdefault(int(match.group(1)), {})[match.group(2)] = value
    edges = []
    for index in sorted(found):
        parts = found[index]
        if "to" not in parts or "loss" not in parts:
            continue
        senders = _members(parts["from.ensemble"]) if "from.ensemble" in parts else (parts.get("from"),)
        edges.append(Edge(tuple(sender for sender in senders if sender), parts["to"], parts["loss"]))
    return edges


def _members(text: str) -> tuple[str, ...]:
    """An ensemble sender's peers from MLflow's string of a Python list, "['a', 'b']"."""
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return ()
    return tuple(str(peer) for peer in value) if isinstance(value, (list, tuple)) else ()


def method_of(params: dict[str, str], peer: str) -> str:
    if peer == ENSEMBLE:
        return ""
    if params.get(f"peers.{peer}.frozen") == "True":
        return "frozen"
    return "+".join(edge.loss for edge in edges_of(params) if edge.receiver == peer) or "ce"


def model_of(params: dict[str, str], peer: str) -> str:
    return ENSEMBLE_MODEL if peer == ENSEMBLE else params.get(f"peers.{peer}.model", "")


def gap_of(run: CohortRun, peer: str) -> float | None:
    """Top-1 of the best peer sending into ``peer`` (an ensemble sender counts its members) minus the
    peer's own, in percentage points; None without an incoming edge."""
    own = run.metric(peer, "acc")
    senders = {sender for edge in edges_of(run.params) if edge.receiver == peer for sender in edge.senders}
    accuracies = [acc for acc in (run.metric(sender, "acc") for sender in senders) if acc is not None]
    if own is None or not accuracies:
        return None
    return 100 * (max(accuracies) - own)


# --------------------------------------------------------------------------- the table


def is_accuracy(column: str) -> bool:
    """Accuracy-like columns: shown in percent, best first when sorted."""
    return column == "top-1" or column.startswith("acc") or column == "train_acc"


def columns_for(extra_metrics: list[str]) -> list[str]:
    shown = {metric.lower() for metric in METRIC_OF_COLUMN.values()}
    return list(BASE_COLUMNS) + [metric for metric in dict.fromkeys(extra_metrics) if metric.lower() not in shown]


def sort_column(name: str | None, columns: list[str]) -> str | None:
    """The column ``--sort`` names, case-insensitively (``acc`` also means top-1)."""
    if name is None:
        return None
    wanted = "top-1" if name.lower() == "acc" else name.lower()
    for column in columns:
        if column.lower() == wanted:
            return column
    raise CohortError(f"--sort {name!r}: not a column (columns: {', '.join(columns)})")


def check_metrics(runs: list[CohortRun], extra_metrics: list[str]) -> None:
    reported = {key.split("/", 1)[1] for run in runs for key in run.metrics
                if "/" in key and key.split("/", 1)[0] in set(run.members)}
    for metric in extra_metrics:
        if metric not in reported:
            raise CohortError(f"--metric {metric!r}: no run reports it (they report: {', '.join(sorted(reported))})")


def check_peer(runs: list[CohortRun], peer: str | None) -> None:
    known = sorted({member for run in runs for member in run.members})
    if peer is not None and peer not in known:
        raise CohortError(f"--peer {peer!r}: no run has it (peers: {', '.join(known)})")


def build_rows(runs: list[CohortRun], columns: list[str], peer: str | None) -> list[dict[str, Any]]:
    """One row per run and member; numbers stay numbers (accuracies in %) until rendering."""
    rows = []
    for run in runs:
        for member in run.members:
            if peer is not None and member != peer:
                continue
            row: dict[str, Any] = {"run": run.short, "experiment": run.experiment, "peer": member,
                                   "method": method_of(run.params, member), "model": model_of(run.params, member),
                                   "gap": gap_of(run, member)}
            for column in columns:
                if column in row:
                    continue
                value = run.metric(member, METRIC_OF_COLUMN.get(column, column))
                row[column] = 100 * value if value is not None and is_accuracy(column) else value
            rows.append(row)
    return rows


def sort_rows(rows: list[dict[str, Any]], column: str | None) -> list[dict[str, Any]]:
    """Accuracy-like columns high to low, every other column low to high; empty cells last.
    Ties keep the default order (runs as found, peers in rank order)."""
    if column is None:
        return rows
    present = [row for row in rows if row[column] not in (None, "")]
    missing = [row for row in rows if row[column] in (None, "")]
    return sorted(present, key=lambda row: row[column], reverse=is_accuracy(column)) + missing


def cell(column: str, value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if column == "gap":
        return f"{value:+.2f}"
    return f"{value:.2f}" if is_accuracy(column) else f"{value:.4f}"


def render(rows: list[dict[str, Any]], columns: list[str], style: str) -> str:
    if style == "csv":
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(columns)
        # Full precision: csv is for other programs.
        writer.writerows([["" if row[c] is None else row[c] if isinstance(row[c], str) else repr(row[c])
                           for c in columns] for row in rows])
        return buffer.getvalue().rstrip("\n")
    cells = [[cell(c, row[c]) for c in columns] for row in rows]
    if style == "markdown":
        align = ["---" if c in TEXT_COLUMNS else "---:" for c in columns]
        lines = [columns, align] + cells
        return "\n".join("| " + " | ".join(text.replace("|", "\\|") for text in line) + " |" for line in lines)
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]

    def line(texts: Iterable[str]) -> str:
        return "  ".join(text.ljust(w) if c in TEXT_COLUMNS else text.rjust(w)
                         for text, w, c in zip(texts, widths, columns)).rstrip()

    return "\n".join([line(columns), line("-" * w for w in widths)] + [line(row) for row in cells])


TABLE_NOTE = ("top-1 and acc* columns in %, gap in percentage points (the best sender's top-1 minus the peer's); "
              "final epoch")


# --------------------------------------------------------------------------- figures


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
    import torch

    from cohort.reliability import ReliabilityBins

    logged = {Path(item.path).name for item in client.list_artifacts(run.run_id, "reliability")}
    for suffix in (".json", ".png"):
        name = f"reliability_{peer}{suffix}"
        if name not in logged:
            continue
        local = Path(client.download_artifacts(run.run_id, f"reliability/{name}", str(scratch / run.run_id)))
        if suffix == ".png":
            return local
        data = json.loads(local.read_text())
        return ReliabilityBins(**{key: torch.tensor(data[key], dtype=torch.float64)
                                  for key in ("edges", "counts", "accuracy", "confidence")})
    return None


def draw_bins(top, bottom, bins) -> None:
    """Accuracy per confidence bin with the gap to the diagonal shaded, as cohort.metrics draws it,
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


# --------------------------------------------------------------------------- main


def note(text: str) -> None:
    # Notes go to stderr so that stdout is only the table (csv and markdown can be redirected as they are).
    print(text, file=sys.stderr, flush=True)


def compare(args: argparse.Namespace) -> int:
    from cohort.tracking import resolve_uri

    uri = resolve_uri(args.tracking_uri)
    columns = columns_for(args.metrics)
    order_by = sort_column(args.sort, columns)
    client = connect(uri)
    if not args.experiments and not args.runs:
        raise CohortError("nothing to compare: give --experiment NAME or --runs ID "
                          f"(experiments in {uri}: {', '.join(experiment_names(client)) or 'none'})")
    runs, skipped = load_runs(client, find_runs(client, args.experiments, args.runs))
    skipped_text = f"skipped {skipped} run{'s' if skipped != 1 else ''} without peer metrics (sweep parent runs, " \
                   "runs that stopped before their first epoch)" if skipped else ""
    if not runs:
        asked = ", ".join([f"experiment {name!r}" for name in args.experiments] + [f"run {r}" for r in args.runs])
        print(f"no runs with peer metrics in {asked}" + (f"; {skipped_text}" if skipped else ""))
        return 0
    check_metrics(runs, args.metrics)
    check_peer(runs, args.peer)

    rows = sort_rows(build_rows(runs, columns, args.peer), order_by)
    print(render(rows, columns, args.format), flush=True)
    if args.format == "table":
        print(f"\n{TABLE_NOTE}")
    if skipped:
        note(skipped_text)
    if args.no_figures:
        return 0

    out = Path(args.out).resolve()
    try:
        belongs = make_figures(client, runs, args.peer, out)
    except OSError as error:
        raise CohortError(f"--out {args.out!r}: cannot write the figures: {error.strerror or error}") from None
    publish(client, belongs)
    files = sorted({path for paths in belongs.values() for path in paths})
    note(f"{len(files)} figures in {out}:" + "".join(f"\n  {path.relative_to(out)}" for path in files))
    note(f"logged under compare/ in the MLflow artifacts of {len(belongs)} run{'s' if len(belongs) != 1 else ''} "
         f"at {uri}")
    return 0



def main(argv: list[str] | None = None) -> int:
    return run_command(compare, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
