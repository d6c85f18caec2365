"""``python -m cohort.evaluate RUN_ID``: evaluate a finished run's peers without training.

On the run's own test split by default (it reproduces the run's final metrics), on another dataset
with the same classes (``--data FILE`` or ``--set data.root=...``), or on corrupted test data
(``--shift``, CIFAR-10-C style: ``cohort.evaluation.shift``). Every peer and the ensemble, before and after
the temperatures the run fitted (``data.val_fraction``). Shifted results are logged into the same
MLflow run under ``shift/...``, those on other data under ``shift/data/<its name>/...`` (evaluating
a setting again replaces its values).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

from cohort.config.errors import CohortError
from cohort.console.command import run_command
from cohort.console.display import Display, TaskProgress, add_display_options, mode_of
from cohort.console.outputs import OVERWRITE_HELP


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m cohort.evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("run_id", help="the MLflow run to evaluate (a finished cohort run)")
    parser.add_argument("--shift", help="corruptions to evaluate on: all, or names separated by commas "
                                        "(gaussian_noise,defocus_blur,...)")
    parser.add_argument("--severity", help="with --shift: corruption severities: 3, 1-5 or 1,3,5 (default 1-5)")
    parser.add_argument("--data", metavar="FILE", help="a topology file whose data section replaces the run's")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override the run's data section, e.g. data.root=other/ (repeatable)")
    parser.add_argument("--peer", help="show only this peer (or ensemble)")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default: sqlite:///mlflow.db)")
    parser.add_argument("--format", choices=("table", "csv", "markdown"), default="table")
    parser.add_argument("--out", help="folder for the --shift figure (default: evaluate-<run id prefix>); a figure "
                                      "there from an earlier evaluation is replaced only with --overwrite")
    parser.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    add_display_options(parser)
    return parser.parse_args(argv)


def evaluation_data(args: argparse.Namespace, finished):
    """The data section to evaluate on: the run's, or ``--data`` / ``--set``'s (checked to have its classes)."""
    from cohort.config.loader import read_yaml
    from cohort.datasets import describe_dataset, load_dataset
    from cohort.evaluation.logged_run import check_classes
    from cohort.topology import topology_from_dict

    topology = finished.topology
    if args.data or args.overrides:
        raw = topology.to_dict()
        where = "--set"
        if args.data:
            other = read_yaml(args.data)
            if not isinstance(other, dict) or not isinstance(other.get("data"), dict):
                raise CohortError("--data: expected a topology file with a data section", args.data)
            raw["data"] = other["data"]
            where = Path(args.data).name
        for item in args.overrides:
            if not item.partition("=")[0].strip().startswith("data."):
                raise CohortError(f"--set {item.partition('=')[0]!r}: only data.* values can change for an evaluation")
        topology = topology_from_dict(raw, where, args.overrides)
        topology = topology.with_absolute_paths(os.getcwd())
        check_classes(describe_dataset(finished.topology.data), describe_dataset(topology.data), where)
    # The run's own test split: without its validation split (that only moved training images).
    data_config = topology.data.model_copy(update={"val_fraction": 0.0})
    return topology, load_dataset(data_config, topology.seed)


def run(args: argparse.Namespace) -> int:
    from cohort.comparison.queries import connect
    from cohort.console.outputs import check_creatable, check_output_file
    from cohort.evaluation.logged_run import (
        CLEAN,
        MEAN,
        build_models,
        evaluate_setting,
        load_finished_run,
        mean_over_corruptions,
        peer_logits,
        render,
        result_rows,
    )
    from cohort.evaluation.shift import (
        parse_corruptions,
        parse_severities,
        shift_refusal,
        shifted_dataset,
    )
    from cohort.tracking.tracker import resolve_uri

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    display = Display(mode_of(args))
    if args.severity is not None and not args.shift:
        raise CohortError("--severity applies to corrupted test data: give it with --shift")
    corruptions = parse_corruptions(args.shift) if args.shift else []
    severities = parse_severities(args.severity or "1-5") if args.shift else []
    if corruptions and args.out is not None:
        check_creatable(Path(args.out).expanduser().absolute(), "--out", make_folders=True)
    uri = resolve_uri(args.tracking_uri)
    client = connect(uri)
    finished = load_finished_run(client, args.run_id)
    topology, data = evaluation_data(args, finished)
    owners = [*topology.peer_names, "ensemble"]
    if args.peer is not None and args.peer not in owners:
        raise CohortError(f"--peer {args.peer!r}: the run has {', '.join(owners)}")
    source = figure = None
    if corruptions:
        refusal = shift_refusal(data.info)
        if refusal:
            raise CohortError(f"--shift: {refusal}")
        here = os.getcwd()  # both data sections' roots as evaluation_data resolves them
        source = shift_source(finished.topology.with_absolute_paths(here).data,
                              topology.with_absolute_paths(here).data, data, args.data)
        out = Path(args.out or f"evaluate-{finished.run_id[:8]}")
        figure = check_output_file(out / source.figure_name, "--out", args.overwrite, make_folders=True)
    models = build_models(finished.topology, finished.weights, data.info)
    batch = topology.data.eval_batch_size
    settings = [(CLEAN, 0)] + [(name, severity) for name in corruptions for severity in severities]
    display.info(f"evaluating run {finished.run_id} ({finished.topology.name}: {', '.join(topology.peer_names)}) on "
          f"{data.info.name}, {data.info.test_size} test images: {len(settings)} setting(s)"
          + ("" if finished.temperatures else "; no temperatures fitted (the run had no validation split)"),
          stderr=True)
    results = {}
    progress = TaskProgress(display, len(settings), "test sets")
    try:
        for name, severity in settings:
            shown = data if name == CLEAN else shifted_dataset(data, name, severity, topology.seed)
            logits, labels = peer_logits(models, shown, batch)
            results[(name, severity)] = evaluate_setting(logits, labels, finished.temperatures)
            progress.done(f"{name}: done" if name == CLEAN else f"{name} severity {severity}: done")
    finally:
        progress.close()
    for severity, owners_ in mean_over_corruptions(results).items():
        results[(MEAN, severity)] = owners_
    rows = result_rows(results, args.peer)
    if display.mode == "json":
        for row in rows:
            display.json("row", **row)
    else:
        display.summary(render(rows, args.format))
    if corruptions:
        log_shift(client, finished.run_id, results, figure, source, display)
    return 0


def shift_source(run_data, data_config, data, data_file: str | None = None):
    """Which data the shifted results come from (``cohort.evaluation.logged_run.ShiftSource``): the run's own
    test split, or other data named by its dataset and its clean test images' fingerprint."""
    from cohort.evaluation.logged_run import ShiftSource, same_test_data
    from cohort.evaluation.shift import clean_test_split, fingerprint, plain_name

    digest = fingerprint(clean_test_split(data)[0])
    own = same_test_data(run_data, data_config)
    return ShiftSource(None if own else f"{plain_name(data.info.name)}-{digest[:8]}", data.info.name, digest,
                       data.info.test_size, data_config.model_dump(mode="json"), data_file)


def log_shift(client, run_id: str, results, figure: Path, source, display: Display | None = None) -> None:
    """The shifted results into the run (the same key, step and timestamp for a setting evaluated
    again: MLflow keeps one value, never a duplicate), with the table and the figure. Both files
    are written before anything is logged: a failure leaves the run as it was."""
    import json

    from mlflow.entities import Metric

    from cohort.evaluation.logged_run import severity_figure, shift_metric_items

    figure = severity_figure(results, figure)
    items = [Metric(key, value, severity, severity) for key, value, severity in shift_metric_items(results, source.label)]
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "shift_results.json"
        path.write_text(json.dumps({"data": source.description(), "results": {
            f"{name}/{severity}": owners for (name, severity), owners in results.items()}}, indent=2, sort_keys=True))
        for start in range(0, len(items), 1000):
            client.log_batch(run_id, metrics=items[start:start + 1000])
        client.log_artifact(run_id, str(figure), source.prefix)
        client.log_artifact(run_id, str(path), source.prefix)
    (display or Display("log")).info(f"\nlogged under {source.prefix}/ in MLflow run {run_id}; figure: {figure}",
                                     stderr=True)


def main(argv: list[str] | None = None) -> int:
    return run_command(run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
