"""A study's result tables, one per role: per arm n and mean ± std of each metric over its seeds,
and for every arm but the baseline the paired difference to the baseline (mean, 95% Student-t
interval, paired t-test p). Pure: plain outcomes in, text out (table, markdown, csv, latex).

Accuracies (metrics named ``acc…``) print in %; calibration errors and the rest as logged.
"""
from __future__ import annotations

import csv
import io
import math
from collections.abc import Mapping
from dataclasses import dataclass

from cohort.studies.stats import (
    EMPTY_CELL,
    PairedDifference,
    Summary,
    format_difference,
    format_mean_std,
    paired_difference,
    summarize,
)

FORMATS = ("table", "markdown", "csv", "latex")


@dataclass(frozen=True)
class Outcome:
    """One (arm, seed) run as MLflow holds it: status, final metrics (``peer/metric`` keys)."""

    arm: str
    seed: int
    status: str  # FINISHED, FAILED, RUNNING, KILLED, ...
    metrics: Mapping[str, float]
    run_id: str = ""
    error: str = ""


@dataclass(frozen=True)
class ArmRow:
    arm: str
    peer: str | None  # the arm's peer in this role; None: the arm has no such role (empty cells)
    n: int  # runs that finished
    failed: int
    summaries: dict[str, Summary]
    differences: dict[str, PairedDifference] | None  # None for the baseline


@dataclass(frozen=True)
class RoleTable:
    role: str
    baseline: str
    metrics: list[str]
    rows: list[ArmRow]


def is_accuracy(metric: str) -> bool:
    return metric.startswith("acc")


def scale_of(metric: str) -> float:
    return 100.0 if is_accuracy(metric) else 1.0


def digits_of(metric: str) -> int:
    return 2 if is_accuracy(metric) else 4


def higher_is_better(metric: str) -> bool:
    return is_accuracy(metric)


def column_name(metric: str) -> str:
    return f"{metric} (%)" if is_accuracy(metric) else metric


def role_values(outcomes: list[Outcome], arm: str, peer: str, metric: str) -> dict[int, float]:
    """seed -> the finished runs' final value of ``peer/metric`` (a run that did not report it is missing)."""
    values = {}
    for outcome in outcomes:
        if outcome.arm == arm and outcome.status == "FINISHED":
            value = outcome.metrics.get(f"{peer}/{metric}")
            if value is not None:
                values[outcome.seed] = float(value)
    return values


def build_tables(roles: Mapping[str, Mapping[str, str]], baseline: str, metrics: list[str],
                 outcomes: list[Outcome], confidence: float = 0.95) -> list[RoleTable]:
    """One table per role. ``roles``: arm -> {role: peer}, arms in the study's order."""
    all_roles = list(dict.fromkeys(role for arm_roles in roles.values() for role in arm_roles))
    tables = []
    for role in all_roles:
        base_peer = roles[baseline].get(role)
        base_values = {metric: role_values(outcomes, baseline, base_peer, metric) if base_peer else {}
                       for metric in metrics}
        rows = []
        for arm, arm_roles in roles.items():
            peer = arm_roles.get(role)
            mine = [o for o in outcomes if o.arm == arm]
            finished = sum(o.status == "FINISHED" for o in mine) if peer else 0
            failed = sum(o.status == "FAILED" for o in mine) if peer else 0
            values = {metric: role_values(outcomes, arm, peer, metric) if peer else {} for metric in metrics}
            summaries = {metric: summarize(values[metric].values()) for metric in metrics}
            differences = None if arm == baseline else {
                metric: paired_difference(values[metric], base_values[metric], confidence) for metric in metrics}
            rows.append(ArmRow(arm, peer, finished, failed, summaries, differences))
        tables.append(RoleTable(role, baseline, list(metrics), rows))
    return tables


def best_arms(table: RoleTable) -> dict[str, str | None]:
    """metric -> the arm with the best mean (highest accuracy, lowest error); None when none has one."""
    best = {}
    for metric in table.metrics:
        candidates = [(row.summaries[metric].mean, row.arm) for row in table.rows if row.summaries[metric].n > 0
                      and math.isfinite(row.summaries[metric].mean)]
        if not candidates:
            best[metric] = None
            continue
        chosen = max(candidates) if higher_is_better(metric) else min(candidates)
        best[metric] = chosen[1]
    return best


# --------------------------------------------------------------------------- renderings


def n_cell(row: ArmRow) -> str:
    return f"{row.n} ({row.failed} failed)" if row.failed else str(row.n)


def summary_grid(table: RoleTable, bold=None) -> list[list[str]]:
    header = ["arm", "peer", "n", *(column_name(metric) for metric in table.metrics)]
    best = best_arms(table) if bold else {}
    lines = [header]
    for row in table.rows:
        cells = []
        for metric in table.metrics:
            cell = format_mean_std(row.summaries[metric], scale_of(metric), digits_of(metric))
            cells.append(bold(cell) if bold and best.get(metric) == row.arm and cell != EMPTY_CELL else cell)
        lines.append([row.arm, row.peer or EMPTY_CELL, n_cell(row), *cells])
    return lines


def difference_grid(table: RoleTable) -> list[list[str]]:
    lines = [["arm", "metric", "pairs", f"difference to {table.baseline} [95% CI] (paired t-test)"]]
    if not any(row.arm == table.baseline and row.peer is not None for row in table.rows):
        return lines  # the baseline has no such role: nothing to pair with
    for row in table.rows:
        if row.differences is None or row.peer is None:
            continue
        for metric in table.metrics:
            diff = row.differences[metric]
            lines.append([row.arm, column_name(metric), str(diff.n_pairs),
                          format_difference(diff, scale_of(metric), digits_of(metric))])
    return lines


def aligned(lines: list[list[str]]) -> str:
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in lines)


def markdown(lines: list[list[str]]) -> str:
    head, *body = lines
    rows = ["| " + " | ".join(head) + " |", "|" + "|".join(" --- " for _ in head) + "|"]
    return "\n".join(rows + ["| " + " | ".join(cell.replace("|", "\\|") for cell in line) + " |" for line in body])


def title(table: RoleTable, seeds: int) -> str:
    return f"role {table.role}: mean ± std over seeds ({seeds} per arm)"


def render(tables: list[RoleTable], fmt: str, seeds: int) -> str:
    """The tables in one of FORMATS."""
    if fmt == "csv":
        return render_csv(tables)
    if fmt == "latex":
        return "\n\n".join(render_latex(table) for table in tables)
    blocks = []
    for table in tables:
        differences = difference_grid(table)
        if fmt == "markdown":
            block = [f"**{title(table, seeds)}**", "", markdown(summary_grid(table))]
            if len(differences) > 1:
                block += ["", markdown(differences)]
        else:
            block = [title(table, seeds), aligned(summary_grid(table))]
            if len(differences) > 1:
                block += ["", aligned(differences)]
        blocks.append("\n".join(block))
    return "\n\n".join(blocks)


def render_csv(tables: list[RoleTable]) -> str:
    """Long format, full precision: one line per (role, arm, metric)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["role", "arm", "peer", "metric", "n", "failed", "mean", "std", "pairs", "difference",
                     "ci_low", "ci_high", "p_value"])
    for table in tables:
        for row in table.rows:
            for metric in table.metrics:
                summary = row.summaries[metric]
                diff = row.differences[metric] if row.differences else None
                writer.writerow([table.role, row.arm, row.peer or "", metric, row.n, row.failed, number(summary.mean),
                                 number(summary.std), diff.n_pairs if diff else "",
                                 *(number(getattr(diff, key)) if diff else "" for key in
                                   ("mean", "ci_low", "ci_high", "p_value"))])
    return out.getvalue().rstrip("\n")


def number(value: float) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else repr(float(value))


LATEX_SPECIAL = {"&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{", "}": r"\}",
                 "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "\\": r"\textbackslash{}"}


def latex_text(text: str) -> str:
    return "".join(LATEX_SPECIAL.get(char, char) for char in text)


def render_latex(table: RoleTable) -> str:
    """booktabs: arm, n and mean ± std per metric in one cell, the best arm per column in bold; then
    the paired differences to the baseline."""
    def cell(text: str) -> str:
        return latex_text(text).replace(" ± ", r" $\pm$ ").replace("—", "--").replace("p<", "p$<$")

    grid = summary_grid(table, bold=lambda text: "\0" + text)
    head, *body = grid
    columns = "l" + "r" * (len(head) - 1)
    lines = [f"% role {latex_text(table.role)}: mean $\\pm$ std over seeds; best mean per column in bold",
             r"\begin{tabular}{" + columns + "}", r"\toprule",
             " & ".join(latex_text(name) for name in head) + r" \\", r"\midrule"]
    for line in body:
        cells = [r"\textbf{" + cell(text[1:]) + "}" if text.startswith("\0") else cell(text) for text in line]
        lines.append(" & ".join(cells) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    differences = difference_grid(table)
    if len(differences) > 1:
        lines += ["", f"% paired differences to {latex_text(table.baseline)} over shared seeds: mean [95\\% CI], "
                      "paired t-test", r"\begin{tabular}{llrl}", r"\toprule",
                  " & ".join(latex_text(name) for name in differences[0]) + r" \\", r"\midrule"]
        lines += [" & ".join(cell(text) for text in line) + r" \\" for line in differences[1:]]
        lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines)


def failures(outcomes: list[Outcome]) -> list[str]:
    """One line per failed run, with its reason."""
    return [f"{o.arm}/seed-{o.seed} failed: {o.error or 'no reason logged'}" for o in outcomes if o.status == "FAILED"]
