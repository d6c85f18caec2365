"""``python -m cohort.compare``: cohort runs side by side, from their MLflow records.

One row per run and peer (and the cohort's ensemble): the peer's method (the losses of the edges
into it), model, final accuracy and calibration, and its gap to the best peer it learns from.
Figures (reliability diagrams across runs, accuracy / ECE / entropy per epoch, per-group accuracy)
go to a folder and into each run's MLflow artifacts under ``compare/``.

This module is the command line only; the comparison itself is the ``cohort.comparison`` package.
"""
from __future__ import annotations

import argparse

from cohort.comparison.figures import make_figures, publish
from cohort.comparison.queries import connect, experiment_names, find_runs, load_runs
from cohort.comparison.side_by_side import (
    TABLE_NOTE,
    build_rows,
    check_metrics,
    check_peer,
    columns_for,
    render,
    sort_column,
    sort_rows,
)
from cohort.config.errors import CohortError
from cohort.console.command import exit_process, run_command
from cohort.console.display import Display, add_display_options, mode_of
from cohort.console.outputs import check_output_folder


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
    parser.add_argument("--out", default="compare", metavar="DIR",
                        help="where the figures go (default: ./compare); a folder that holds files (an earlier "
                             "comparison's) only with --overwrite")
    parser.add_argument("--overwrite", action="store_true", help="write the figures into a folder that holds files")
    parser.add_argument("--no-figures", action="store_true",
                        help="print the table only: draw nothing and log nothing to MLflow")
    parser.add_argument("--tracking-uri", metavar="URI", help="MLflow tracking URI (default: sqlite:///mlflow.db)")
    add_display_options(parser)
    return parser.parse_args(argv)


def note(display: Display, text: str) -> None:
    # Notes go to stderr so that stdout is only the table (csv and markdown can be redirected as they are).
    display.info(text, stderr=True)


def compare(args: argparse.Namespace) -> int:
    from cohort.tracking.tracker import resolve_uri

    display = Display(mode_of(args))
    out = None if args.no_figures else check_output_folder(args.out, "--out", args.overwrite)
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
        display.summary(f"no runs with peer metrics in {asked}" + (f"; {skipped_text}" if skipped else ""))
        return 0
    check_metrics(runs, args.metrics)
    check_peer(runs, args.peer)
    # Runs with temperature scaling (data.val_fraction) show the ECE after it beside the ECE before.
    if "ece_ts" not in columns and any(key.endswith("/ece_ts") for run in runs for key in run.metrics):
        columns.insert(columns.index("ECE") + 1, "ece_ts")

    rows = sort_rows(build_rows(runs, columns, args.peer), order_by)
    if display.mode == "json":  # one object per row, its numbers unrounded
        for row in rows:
            display.json("row", **{column: row.get(column) for column in ["run", "experiment", "peer", "method",
                                                                          "model", "gap", *columns] if column in row})
    else:
        display.summary(render(rows, columns, args.format))
        if args.format == "table" and display.mode != "quiet":
            print(f"\n{TABLE_NOTE}")
    if skipped:
        note(display, skipped_text)
    if args.no_figures:
        return 0

    try:
        belongs = make_figures(client, runs, args.peer, out)
    except OSError as error:  # checked before: the disk filled up, or the folder changed meanwhile
        raise CohortError(f"--out {args.out!r}: cannot write the figures: {error.strerror or error}") from None
    publish(client, belongs)
    files = sorted({path for paths in belongs.values() for path in paths})
    note(display, f"{len(files)} figures in {out}:" + "".join(f"\n  {path.relative_to(out)}" for path in files))
    note(display, f"logged under compare/ in the MLflow artifacts of {len(belongs)} run{'s' if len(belongs) != 1 else ''} "
         f"at {uri}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_command(compare, parse_args(argv))


if __name__ == "__main__":
    exit_process(main())
