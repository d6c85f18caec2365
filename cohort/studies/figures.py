"""A study's figures (PNG, matplotlib without pyplot, as ``cohort.compare`` draws):

* ``metric_<metric>.png``: the metric per arm, mean with its 95% Student-t interval and every
  seed's value as a dot, one panel per role;
* ``reliability_<role>.png``: the reliability diagram of each arm for that role, its bins pooled
  over the arm's seeds (counts summed, accuracy and confidence count-weighted).
"""
from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

from cohort.comparison.figures import draw_bins, new_figure, save
from cohort.studies.stats import mean_half_width
from cohort.studies.tables import Outcome, RoleTable, column_name, role_values, scale_of

PANEL_WIDTH, PANEL_HEIGHT = 3.6, 3.2


def safe_name(text: str) -> str:
    return "".join(char if char.isalnum() or char in "-_." else "_" for char in text)


def metric_figure(tables: list[RoleTable], outcomes: list[Outcome], metric: str, path: Path) -> Path:
    figure = new_figure(PANEL_WIDTH * len(tables), PANEL_HEIGHT)
    scale = scale_of(metric)
    for index, table in enumerate(tables):
        axis = figure.add_subplot(1, len(tables), index + 1)
        for position, row in enumerate(table.rows):
            summary = row.summaries[metric]
            if row.peer is None or summary.n == 0:
                continue
            seeds = role_values(outcomes, row.arm, row.peer, metric)
            axis.scatter([position] * len(seeds), [value * scale for value in seeds.values()], s=12, color="tab:gray",
                         alpha=0.7, zorder=2)
            half = mean_half_width(summary)
            axis.errorbar([position], [summary.mean * scale], yerr=[[half * scale]] if math.isfinite(half) else None,
                          fmt="o", color="tab:blue", capsize=5, zorder=3)
        axis.set_xticks(range(len(table.rows)), [row.arm for row in table.rows], rotation=30)
        axis.set_xlim(-0.5, len(table.rows) - 0.5)
        axis.set_title(table.role)
        axis.set_ylabel(column_name(metric) if index == 0 else "")
        axis.grid(axis="y", alpha=0.3)
    figure.suptitle(f"{column_name(metric)}: mean and 95% CI over seeds (dots: one seed each)", y=1.03)
    return save(figure, path)


def reliability_figure(table: RoleTable, pooled: Callable[[str, str], object], path: Path) -> Path | None:
    """One panel per arm that has the role, with its bins pooled over seeds (``pooled(arm, peer)``)."""
    panels = [(row, pooled(row.arm, row.peer)) for row in table.rows if row.peer is not None]
    panels = [(row, bins) for row, bins in panels if bins is not None]
    if not panels:
        return None
    figure = new_figure(PANEL_WIDTH * len(panels), PANEL_HEIGHT + 1.2)
    grid = figure.add_gridspec(2, len(panels), height_ratios=[3, 1], hspace=0.08)
    for index, (row, bins) in enumerate(panels):
        top, bottom = figure.add_subplot(grid[0, index]), figure.add_subplot(grid[1, index])
        draw_bins(top, bottom, bins)
        top.set_title(f"{row.arm} (n={row.n}): ECE {bins.ece:.4f}")
        if index:
            top.set_ylabel("")
            bottom.set_ylabel("")
    figure.suptitle(f"role {table.role}: reliability pooled over seeds", y=1.0)
    return save(figure, path)


def draw_all(tables: list[RoleTable], outcomes: list[Outcome], metrics: list[str],
             pooled: Callable[[str, str], object], out: Path) -> list[Path]:
    """Every figure of the study into ``out``; the paths written."""
    written = [metric_figure(tables, outcomes, metric, out / f"metric_{safe_name(metric)}.png") for metric in metrics]
    for table in tables:
        path = reliability_figure(table, pooled, out / f"reliability_{safe_name(table.role)}.png")
        if path is not None:
            written.append(path)
    return written
