"""The comparison's table: its columns, one row per run and member, sorting, and the text of it
(aligned table, csv or markdown)."""
from __future__ import annotations

import csv
import io
from collections.abc import Iterable
from typing import Any

from cohort.comparison.runs import CohortRun, gap_of, method_of, model_of
from cohort.config.errors import CohortError

BASE_COLUMNS = ("run", "experiment", "peer", "method", "model", "top-1", "ECE", "AdaECE", "NLL", "Brier", "gap")
TEXT_COLUMNS = ("run", "experiment", "peer", "method", "model")
# Table column -> the metric it shows (``<peer>/<metric>``).
METRIC_OF_COLUMN = {"top-1": "acc", "ECE": "ece", "AdaECE": "adaece", "NLL": "nll", "Brier": "brier"}
TABLE_NOTE = ("top-1 and acc* columns in %, gap in percentage points (the best sender's top-1 minus the peer's); "
              "final epoch")


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
                                   "method": method_of(run.params, member, run.edges), "model": model_of(run.params, member),
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
