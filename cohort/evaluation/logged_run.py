"""Evaluating a finished run's peers without training (the library of ``python -m cohort.evaluate``):
the run's topology, weights and fitted temperatures from MLflow, the peers' logits on a test split
(the run's own, another dataset's with the same classes, or a corrupted one: ``cohort.evaluation.shift``),
their metrics before and after temperature scaling, and the mean over corruptions per severity.
"""
from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from cohort.config.errors import CohortError
from cohort.metrics.temperature import CALIBRATED, TEMPERATURE_KEY, log_probs_of
from cohort.topology import Topology
from cohort.worker.report import ENSEMBLE, metric_key

METRICS = ("acc", "ece", "adaece", "nll", "brier")
CLEAN = "clean"
MEAN = "mean"


@dataclass
class FinishedRun:
    run_id: str
    topology: Topology
    weights: dict[str, dict[str, torch.Tensor]]  # peer -> state_dict
    temperatures: dict[str, float]  # peer or ensemble -> fitted T (absent: none fitted)
    final: dict[str, float] = field(default_factory=dict)  # the run's last logged metrics


def load_finished_run(client, run_id: str) -> FinishedRun:
    """The run's resolved topology, every peer's final weights and the temperatures it fitted."""
    from mlflow.exceptions import MlflowException

    from cohort.tracking.tracker import logged_topology
    from cohort.worker.peer import read_weights

    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise CohortError(f"{run_id!r}: no such MLflow run (give a run id, and --tracking-uri for another store)") from None
    with tempfile.TemporaryDirectory(prefix="cohort-evaluate-") as scratch:
        topology = logged_topology(client, run_id)
        files = {Path(item.path).name for item in client.list_artifacts(run_id, "weights")}
        missing = [peer for peer in topology.peer_names if f"{peer}.pt" not in files]
        if missing:
            raise CohortError(f"run {run_id} has no weights for {', '.join(missing)} (status {run.info.status}: only a "
                              "finished run logs them)")
        weights = {}
        for peer in topology.peer_names:
            path = client.download_artifacts(run_id, f"weights/{peer}.pt", scratch)
            weights[peer] = read_weights(path, f"run {run_id}", f"weights/{peer}.pt")
    metrics = dict(run.data.metrics)
    temperatures = {owner: metrics[metric_key(owner, TEMPERATURE_KEY)] for owner in [*topology.peer_names, ENSEMBLE]
                    if metric_key(owner, TEMPERATURE_KEY) in metrics}
    return FinishedRun(run_id, topology, weights, temperatures, metrics)


def check_classes(run_info, info, where: str) -> None:
    """Another dataset must have the run's classes (number, and names where both have them)."""
    if info.num_classes != run_info.num_classes:
        raise CohortError(f"{where}: {info.name} has {info.num_classes} classes, the run's peers {run_info.num_classes}")
    if run_info.class_names and info.class_names and tuple(run_info.class_names) != tuple(info.class_names):
        differ = [f"{a}/{b}" for a, b in zip(run_info.class_names, info.class_names) if a != b][:3]
        raise CohortError(f"{where}: its classes differ from the run's ({', '.join(differ)}, ...)")


@torch.no_grad()
def peer_logits(models: dict[str, torch.nn.Module], data, batch_size: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Every peer's logits on ``data``'s test split (float64, CPU), and the labels."""
    outputs: dict[str, list[torch.Tensor]] = {peer: [] for peer in models}
    labels = []
    for inputs, batch_labels in data.test_batches(batch_size):
        for peer, model in models.items():
            outputs[peer].append(model(inputs).double())
        labels.append(batch_labels)
    return {peer: torch.cat(parts) for peer, parts in outputs.items()}, torch.cat(labels)


def owner_metrics(logits: torch.Tensor, labels: torch.Tensor, temperature: float | None) -> dict[str, float]:
    """acc, ECE, AdaECE, NLL, Brier; with a temperature, the calibration metrics at it (``_ts``)."""
    from cohort.metrics import scores as metrics

    before = metrics.evaluate(logits, labels)
    out = {name: before[name] for name in METRICS}
    if temperature is not None:
        after = metrics.evaluate(logits / temperature, labels)
        out.update({f"{name}_ts": after[name] for name in CALIBRATED})
    return out


def evaluate_setting(logits: dict[str, torch.Tensor], labels: torch.Tensor,
                     temperatures: dict[str, float]) -> dict[str, dict[str, float]]:
    """owner (each peer, then the ensemble: the mean of all peers' probabilities) -> its metrics."""
    out = {peer: owner_metrics(values, labels, temperatures.get(peer)) for peer, values in logits.items()}
    ensemble = torch.stack([values.softmax(dim=1) for values in logits.values()]).mean(dim=0)
    out[ENSEMBLE] = owner_metrics(log_probs_of(ensemble), labels, temperatures.get(ENSEMBLE))
    return out


def mean_over_corruptions(results: dict[tuple[str, int], dict[str, dict[str, float]]]) -> dict[int, dict[str, dict[str, float]]]:
    """severity -> owner -> each metric's mean over the corruptions evaluated at that severity."""
    by_severity: dict[int, list[dict[str, dict[str, float]]]] = {}
    for (corruption, severity), owners in results.items():
        if corruption not in (CLEAN, MEAN):
            by_severity.setdefault(severity, []).append(owners)
    means = {}
    for severity, settings in sorted(by_severity.items()):
        owners = {}
        for owner in settings[0]:
            names = settings[0][owner]
            owners[owner] = {name: sum(s[owner][name] for s in settings) / len(settings) for name in names}
        means[severity] = owners
    return means


def result_rows(results: dict[tuple[str, int], dict[str, dict[str, float]]], peer: str | None) -> list[dict[str, Any]]:
    """Table rows: clean first, then each corruption and severity, then the means per severity."""
    ordered = sorted(results.items(), key=lambda item: (item[0][0] != CLEAN, item[0][0] == MEAN, item[0][1]))
    rows = []
    for (corruption, severity), owners in ordered:
        for owner, values in owners.items():
            if peer is None or owner == peer:
                rows.append({"data": corruption, "severity": severity, "peer": owner, **values})
    return rows


def render(rows: list[dict[str, Any]], fmt: str) -> str:
    """``table``, ``markdown`` or ``csv``; accuracy in %, the rest as logged."""
    import csv
    import io

    columns = ["data", "severity", "peer", *METRICS, *[f"{name}_ts" for name in CALIBRATED]]
    columns = [c for c in columns if any(c in row for row in rows)]
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.DictWriter(out, columns, lineterminator="\n", extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
        return out.getvalue().rstrip("\n")

    def cell(column: str, value: Any) -> str:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return ""
        if column == "severity":
            return "-" if value == 0 else str(value)
        if isinstance(value, str):
            return value
        return f"{100 * value:.2f}%" if column == "acc" else f"{value:.4f}"

    header = ["top-1" if c == "acc" else c for c in columns]
    body = [[cell(column, row.get(column)) for column in columns] for row in rows]
    if fmt == "markdown":
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
        return "\n".join(lines + ["| " + " | ".join(line) + " |" for line in body])
    widths = [max(len(line[i]) for line in [header] + body) for i in range(len(header))]
    return "\n".join("  ".join(text.ljust(width) for text, width in zip(line, widths)).rstrip()
                     for line in [header] + body)


# Settings of the data section that change how it is loaded, not which test images it holds.
LOADER_SETTINGS = ("batch_size", "eval_batch_size", "num_workers", "download", "val_fraction")


def same_test_data(run_data, data) -> bool:
    """Whether two data sections hold the same test split (they differ in loader settings at most)."""
    return (run_data.model_dump(exclude=set(LOADER_SETTINGS), mode="json")
            == data.model_dump(exclude=set(LOADER_SETTINGS), mode="json"))


def shift_prefix(label: str | None) -> str:
    """The MLflow keys' and artifacts' prefix: ``shift`` (the run's test split), or ``shift/data/<label>``."""
    return "shift" if label is None else f"shift/data/{label}"


@dataclass(frozen=True)
class ShiftSource:
    """The data shifted results come from: the run's own test split (``label`` None) or other data,
    labelled ``<dataset>-<fingerprint prefix>`` (the same test images give the same label)."""

    label: str | None
    dataset: str
    fingerprint: str  # of the clean test images (cohort.evaluation.shift.fingerprint)
    test_images: int
    section: dict[str, Any]  # the data section evaluated
    data_file: str | None = None  # --data FILE, if given

    @property
    def prefix(self) -> str:
        return shift_prefix(self.label)

    @property
    def figure_name(self) -> str:
        return "shift_severity.png" if self.label is None else f"shift_severity_{self.label}.png"

    def description(self) -> dict[str, Any]:
        return {"source": "the run's test split" if self.label is None else "other data", "label": self.label,
                "keys": f"{self.prefix}/<corruption>/<peer>/<metric>", "dataset": self.dataset,
                "test_images": self.test_images, "fingerprint": self.fingerprint, "section": self.section,
                "data_file": self.data_file}


def shift_metric_items(results: dict[tuple[str, int], dict[str, dict[str, float]]],
                       label: str | None = None) -> list[tuple[str, float, int]]:
    """(key, value, step) for MLflow: ``shift/<corruption>/<owner>/<metric>`` at step = severity, and
    ``shift/mean/...`` for the means over corruptions. The clean setting is the run's own metrics.
    Results on other data than the run's (``label``: ``ShiftSource.label``) go under
    ``shift/data/<label>/...``: never the keys of the run's own test split."""
    prefix = shift_prefix(label)
    items = []
    for (corruption, severity), owners in results.items():
        if corruption == CLEAN:
            continue
        for owner, values in owners.items():
            items += [(f"{prefix}/{corruption}/{owner}/{name}", value, severity) for name, value in values.items()
                      if math.isfinite(value)]
    return items


def severity_figure(results: dict[tuple[str, int], dict[str, dict[str, float]]], path: Path) -> Path:
    """ECE and accuracy against severity (0: clean), one line per peer and the ensemble: the mean
    over the corruptions evaluated."""
    from cohort.comparison.figures import new_figure, save

    figure = new_figure(10, 3.8)
    owners = list(results[(CLEAN, 0)]) if (CLEAN, 0) in results else []
    means = {severity: owners_ for (name, severity), owners_ in results.items() if name == MEAN}
    severities = [0, *sorted(means)]
    for index, (metric, label) in enumerate((("acc", "top-1 (%)"), ("ece", "ECE"))):
        axis = figure.add_subplot(1, 2, index + 1)
        for owner in owners:
            values = [results[(CLEAN, 0)][owner][metric]] + [means[s][owner][metric] for s in severities[1:]]
            scale = 100 if metric == "acc" else 1
            axis.plot(severities, [v * scale for v in values], marker="o", label=owner,
                      linestyle="--" if owner == ENSEMBLE else "-")
        axis.set_xlabel("severity (0: clean; mean over corruptions)")
        axis.set_ylabel(label)
        axis.set_xticks(severities)
        axis.grid(alpha=0.3)
    figure.axes[0].legend(fontsize=8)
    figure.suptitle("shifted test data")
    return save(figure, path)


def build_models(topology: Topology, weights: dict[str, dict[str, torch.Tensor]], info) -> dict[str, torch.nn.Module]:
    """The peers' networks with the run's final weights, in evaluation mode on the CPU."""
    from cohort.worker.peer import build_peer, check_weights

    models = {}
    for peer in topology.peer_names:
        # The model as the run built it, without reading its checkpoint: the final weights replace it.
        bare = topology.model_copy(update={"peers": {**topology.peers, peer: topology.peers[peer].model_copy(
            update={"checkpoint": None, "frozen": False})}})
        model = build_peer(bare, peer, info)
        model.load_state_dict(check_weights(weights[peer], model, f"weights/{peer}.pt", "weights"))
        models[peer] = model.eval()
    return models
