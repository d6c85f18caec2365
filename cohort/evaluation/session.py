"""One evaluation of a finished run (the library of ``python -m cohort.evaluate`` and
``cohort.evaluate_run``): the arguments checked, the run's peers and temperatures read from MLflow, the
data to evaluate on (the run's test split, other data with its classes, or corrupted data), every
setting evaluated, the table shown, and shifted results logged into the run with their figure.

The result is an :class:`EvaluationResult`: the rows, as a ``pandas.DataFrame`` with ``table()``,
where shifted results were logged and the figure's path.
"""
from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cohort.config.errors import CohortError
from cohort.console.display import Display, TaskProgress

if TYPE_CHECKING:
    import pandas

FORMATS = ("table", "csv", "markdown")


@dataclass(frozen=True)
class EvaluationResult:
    """A run evaluated: one row per (data, severity, peer) with its metrics (``table()``), and for
    shifted data where the results were logged in the run and the figure drawn."""

    run_id: str
    tracking_uri: str
    dataset: str  # the data evaluated on (its dataset's name)
    rows: tuple[dict[str, Any], ...]  # data (clean, a corruption, or mean), severity (0: clean), peer, metrics
    logged_under: str | None = None  # shift/ or shift/data/<label>/ in the run; None: nothing logged (no shift)
    figure: Path | None = None  # the severity figure (with shift)

    def table(self) -> pandas.DataFrame:
        """The rows as a DataFrame: ``data``, ``severity``, ``peer``, then ``acc``, ``ece``, ``adaece``,
        ``nll``, ``brier`` and, where the run fitted temperatures, the calibration metrics after them
        (``ece_ts``, ...). Values as computed (accuracy as a fraction, not in %)."""
        import pandas

        return pandas.DataFrame.from_records(list(self.rows))


def as_text(value: str | int | Iterable[Any] | None) -> str | None:
    """``shift`` or ``severity`` as the command's text: ``"fog,snow"``, ``3`` → ``"3"``, ``[1, 3]`` → ``"1,3"``."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, int):
        return str(value)
    return ",".join(str(item) for item in value)


def evaluation_data(finished, data: str | Path | None = None, overrides: Iterable[str] = ()):
    """The data section to evaluate on: the run's, or ``--data`` / ``--set``'s (checked to have its classes)."""
    from cohort.config.loader import read_yaml
    from cohort.datasets import describe_dataset, load_dataset
    from cohort.evaluation.logged_run import check_classes
    from cohort.topology import topology_from_dict

    overrides = list(overrides)
    topology = finished.topology
    if data or overrides:
        raw = topology.to_dict()
        where = "--set"
        if data:
            other = read_yaml(data)
            if not isinstance(other, dict) or not isinstance(other.get("data"), dict):
                raise CohortError("--data: expected a topology file with a data section", str(data))
            raw["data"] = other["data"]
            where = Path(data).name
        for item in overrides:
            if not item.partition("=")[0].strip().startswith("data."):
                raise CohortError(f"--set {item.partition('=')[0]!r}: only data.* values can change for an evaluation")
        topology = topology_from_dict(raw, where, overrides)
        topology = topology.with_absolute_paths(os.getcwd())
        check_classes(describe_dataset(finished.topology.data), describe_dataset(topology.data), where)
    # The run's own test split: without its validation split (that only moved training images).
    data_config = topology.data.model_copy(update={"val_fraction": 0.0})
    return topology, load_dataset(data_config, topology.seed)


def evaluate_run(run_id: str, *, tracking_uri: str | None = None, data: str | Path | None = None,
                 overrides: Iterable[str] = (), shift: str | None = None, severity: str | None = None,
                 peer: str | None = None, out: str | Path | None = None, overwrite: bool = False,
                 fmt: str = "table", display: Display | None = None) -> EvaluationResult:
    """Evaluate the run's peers and ensemble on each setting (clean, then every corruption and
    severity with ``shift``), show the table in ``fmt``, log shifted results into the run."""
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
    display = display or Display("log")
    if severity is not None and not shift:
        raise CohortError("--severity applies to corrupted test data: give it with --shift")
    corruptions = parse_corruptions(shift) if shift else []
    severities = parse_severities(severity or "1-5") if shift else []
    if corruptions and out is not None:
        check_creatable(Path(out).expanduser().absolute(), "--out", make_folders=True)
    uri = resolve_uri(tracking_uri)
    client = connect(uri)
    finished = load_finished_run(client, run_id)
    topology, dataset = evaluation_data(finished, data, overrides)
    owners = [*topology.peer_names, "ensemble"]
    if peer is not None and peer not in owners:
        raise CohortError(f"--peer {peer!r}: the run has {', '.join(owners)}")
    source = figure = None
    if corruptions:
        refusal = shift_refusal(dataset.info)
        if refusal:
            raise CohortError(f"--shift: {refusal}")
        here = os.getcwd()  # both data sections' roots as evaluation_data resolves them
        source = shift_source(finished.topology.with_absolute_paths(here).data,
                              topology.with_absolute_paths(here).data, dataset, None if data is None else str(data))
        folder = Path(out or f"evaluate-{finished.run_id[:8]}")
        figure = check_output_file(folder / source.figure_name, "--out", overwrite, make_folders=True)
    models = build_models(finished.topology, finished.weights, dataset.info)
    batch = topology.data.eval_batch_size
    settings = [(CLEAN, 0)] + [(name, level) for name in corruptions for level in severities]
    display.info(f"evaluating run {finished.run_id} ({finished.topology.name}: {', '.join(topology.peer_names)}) on "
                 f"{dataset.info.name}, {dataset.info.test_size} test images: {len(settings)} setting(s)"
                 + ("" if finished.temperatures else "; no temperatures fitted (the run had no validation split)"),
                 stderr=True)
    results = {}
    progress = TaskProgress(display, len(settings), "test sets")
    try:
        for name, level in settings:
            shown = dataset if name == CLEAN else shifted_dataset(dataset, name, level, topology.seed)
            logits, labels = peer_logits(models, shown, batch)
            results[(name, level)] = evaluate_setting(logits, labels, finished.temperatures)
            progress.done(f"{name}: done" if name == CLEAN else f"{name} severity {level}: done")
    finally:
        progress.close()
    for level, owners_ in mean_over_corruptions(results).items():
        results[(MEAN, level)] = owners_
    rows = result_rows(results, peer)
    if display.mode == "json":
        for row in rows:
            display.json("row", **row)
    else:
        display.summary(render(rows, fmt))
    if corruptions:
        figure = log_shift(client, finished.run_id, results, figure, source, display)
    return EvaluationResult(finished.run_id, uri, dataset.info.name, tuple(rows),
                            f"{source.prefix}/" if source is not None else None, figure)


def shift_source(run_data, data_config, data, data_file: str | None = None):
    """Which data the shifted results come from (``cohort.evaluation.logged_run.ShiftSource``): the run's own
    test split, or other data named by its dataset and its clean test images' fingerprint."""
    from cohort.evaluation.logged_run import ShiftSource, same_test_data
    from cohort.evaluation.shift import clean_test_split, fingerprint, plain_name

    digest = fingerprint(clean_test_split(data)[0])
    own = same_test_data(run_data, data_config)
    return ShiftSource(None if own else f"{plain_name(data.info.name)}-{digest[:8]}", data.info.name, digest,
                       data.info.test_size, data_config.model_dump(mode="json"), data_file)


def log_shift(client, run_id: str, results, figure: Path, source, display: Display | None = None) -> Path:
    """The shifted results into the run (the same key, step and timestamp for a setting evaluated
    again: MLflow keeps one value, never a duplicate), with the table and the figure. Both files
    are written before anything is logged: a failure leaves the run as it was. The figure's path."""
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
    return figure
