"""``python -m cohort.compare`` on a store filled by two real cohort runs through Ray (run once for the
module), plus a few runs written straight into MLflow for what a cohort run cannot produce here:
a sweep's parent and child, a run from before the reliability bins were logged, empty experiments."""
from __future__ import annotations

import csv
import io
import re
from pathlib import Path

import pytest
import torch
import yaml

from cohort import compare
from cohort.comparison.figures import reliability_source
from cohort.comparison.queries import load_runs
from cohort.comparison.runs import CohortRun, gap_of, method_of
from cohort.metrics.reliability import ReliabilityBins, reliability_diagram
from cohort.run import main as run_main

mlflow = pytest.importorskip("mlflow")
from conftest import empty_store
from mlflow.entities import Metric, Param  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# Per-group metrics (data.groups) give the group figure something to draw.
BDKD = {
    "name": "cmp-bdkd",
    "seed": 0,
    "data": {"dataset": "digits", "batch_size": 256, "groups": "thirds"},
    "train": {"epochs": 2, "optimizer": {"lr": 0.1}},
    "peers": {"teacher": {"model": "mlp"}, "student": {"model": "mlp_tiny"}},
    "edges": [
        {"from": "teacher", "to": "student", "loss": "bdkd"},
        {"from": "student", "to": "teacher", "loss": "reverse_kd"},
    ],
}
# An ensemble sender (logged as edges.0.from.ensemble) and two edges into one peer.
DML = {
    "name": "cmp-dml",
    "seed": 1,
    "data": {"dataset": "digits", "batch_size": 256},
    "train": {"epochs": 1},
    "peers": {"net_a": {"model": "mlp"}, "net_b": {"model": "mlp_tiny"}},
    "edges": [
        {"from": {"ensemble": ["net_b"]}, "to": "net_a", "loss": "kd", "temperature": 1.0},
        {"from": "net_a", "to": "net_b", "loss": "kd", "temperature": 1.0},
        {"from": "net_a", "to": "net_b", "loss": "reverse_kd"},
    ],
}
# receiver -> (method, the peers whose accuracy the gap takes the best of)
EXPECTED_EDGES = {
    "cmp-bdkd": {"teacher": ("reverse_kd", ["student"]), "student": ("bdkd", ["teacher"]), "ensemble": ("", [])},
    "cmp-dml": {"net_a": ("kd", ["net_b"]), "net_b": ("kd+reverse_kd", ["net_a"]), "ensemble": ("", [])},
}
MODELS = {"teacher": "mlp", "student": "mlp_tiny", "net_a": "mlp", "net_b": "mlp_tiny", "ensemble": "(mean of probs)"}
COLUMN_METRICS = {"top-1": "acc", "ECE": "ece", "AdaECE": "adaece", "NLL": "nll", "Brier": "brier"}


class Store:
    def __init__(self, folder: Path):
        self.folder = folder
        self.uri = empty_store(folder / "mlflow.db")
        self.client = MlflowClient(self.uri)
        self.runs: dict[str, object] = {}

    def run_of(self, experiment: str):
        return self.runs[experiment]


@pytest.fixture(scope="module")
def store(ray_cluster, tmp_path_factory):
    store = Store(tmp_path_factory.mktemp("compare-store"))
    for topology in (BDKD, DML):
        path = store.folder / f"{topology['name']}.yaml"
        path.write_text(yaml.safe_dump(topology, sort_keys=False))
        assert run_main([str(path), "--tracking-uri", store.uri, "--storage", str(store.folder / "ray")]) == 0
        found = store.client.get_experiment_by_name(topology["name"])
        (store.runs[topology["name"]],) = store.client.search_runs([found.experiment_id])
    add_written_runs(store)
    return store


def new_run(store: Store, experiment: str, tags: dict, params: dict, metrics: dict | None = None):
    """A run written directly (not by cohort.run), finished."""
    client = store.client
    found = client.get_experiment_by_name(experiment)
    experiment_id = found.experiment_id if found else client.create_experiment(
        experiment, artifact_location=(store.folder / "mlartifacts" / experiment).as_uri())
    run_id = client.create_run(experiment_id, tags=tags).info.run_id
    client.log_batch(run_id, params=[Param(k, str(v)) for k, v in params.items()],
                     metrics=[Metric(k, v, 0, step) for k, steps in (metrics or {}).items() for step, v in steps.items()])
    client.set_terminated(run_id)
    return run_id


def add_written_runs(store: Store) -> None:
    topology = {"peers.big.model": "mlp", "peers.big.frozen": False, "peers.small.model": "cnn_small",
                "peers.small.frozen": False, "edges.0.from": "big", "edges.0.to": "small", "edges.0.loss": "kd"}
    parent = new_run(store, "cmp-sweep", {"cohort.sweep": "s", "cohort.peers": "big,small"}, topology)
    # The trial logs only its sampled value; its last step (2) must win over the first.
    metrics = {"big/acc": {1: 0.5, 2: 0.9}, "small/acc": {1: 0.4, 2: 0.8}, "big/ece": {2: 0.05}, "small/ece": {2: 0.07}}
    store.runs["cmp-sweep"] = store.client.get_run(
        new_run(store, "cmp-sweep", {"mlflow.parentRunId": parent}, {"edges.0.loss": "dkd"}, metrics))

    legacy = new_run(store, "cmp-legacy", {"cohort.peers": "solo"}, {"peers.solo.model": "mlp", "peers.solo.frozen": False},
                     {"solo/acc": {1: 0.7}, "solo/ece": {1: 0.1}})
    bins = ReliabilityBins(edges=torch.linspace(0, 1, 16, dtype=torch.float64), counts=torch.ones(15, dtype=torch.float64),
                           accuracy=torch.linspace(0, 1, 15, dtype=torch.float64),
                           confidence=torch.linspace(0, 1, 15, dtype=torch.float64))
    png = reliability_diagram(bins, store.folder / "legacy" / "reliability_solo.png", title="solo")
    store.client.log_artifact(legacy, str(png), "reliability")
    store.runs["cmp-legacy"] = store.client.get_run(legacy)

    new_run(store, "cmp-parent-only", {"cohort.sweep": "t", "cohort.peers": "big,small"}, topology)
    store.client.create_experiment("cmp-empty", artifact_location=(store.folder / "mlartifacts" / "empty").as_uri())


def compare_main(store: Store, capsys, *args: str) -> tuple[int, str, str]:
    code = compare.main(["--tracking-uri", store.uri, *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def parse_table(text: str) -> list[dict[str, str]]:
    """Rows of the aligned table, cut at the columns the dashed line under the header marks."""
    lines = text.splitlines()
    spans = [match.span() for match in re.finditer(r"-+", lines[1])]
    names = [lines[0][a:b].strip() for a, b in spans]
    rows = []
    for line in lines[2:]:
        if not line.strip():
            break
        rows.append({name: line[a:b].strip() for name, (a, b) in zip(names, spans)})
    return rows


def expected_rows(store: Store, experiment: str) -> list[dict[str, str]]:
    """The table rows a run should give, computed here from its logged metrics."""
    run = store.run_of(experiment)
    metrics = run.data.metrics
    rows = []
    for member, (method, senders) in EXPECTED_EDGES[experiment].items():
        row = {"run": run.info.run_id[:8], "experiment": experiment, "peer": member, "method": method,
               "model": MODELS[member], "gap": ""}
        row["top-1"] = f"{100 * metrics[f'{member}/acc']:.2f}"
        for column in ("ECE", "AdaECE", "NLL", "Brier"):
            row[column] = f"{metrics[f'{member}/{COLUMN_METRICS[column]}']:.4f}"
        if senders:
            best = max(metrics[f"{sender}/acc"] for sender in senders)
            row["gap"] = f"{100 * (best - metrics[f'{member}/acc']):+.2f}"
        rows.append(row)
    # The ensemble row comes last, after the peers in rank order.
    return sorted(rows, key=lambda row: row["peer"] == "ensemble")


BOTH = ("--experiment", "cmp-bdkd", "--experiment", "cmp-dml")


# --------------------------------------------------------------------------- the table


@pytest.mark.ray
def test_table_matches_the_logged_metrics(store, capsys):
    code, out, err = compare_main(store, capsys, *BOTH, "--no-figures")
    assert code == 0, err
    assert parse_table(out) == expected_rows(store, "cmp-bdkd") + expected_rows(store, "cmp-dml")
    # Sanity of the fixture itself: the runs learned, so the numbers compared are not all alike.
    assert store.run_of("cmp-bdkd").data.metrics["teacher/acc"] > 0.3


@pytest.mark.ray
def test_csv_and_markdown_parse_back_to_the_same_values(store, capsys):
    _, table, _ = compare_main(store, capsys, *BOTH, "--no-figures")
    _, text, _ = compare_main(store, capsys, *BOTH, "--no-figures", "--format", "csv")
    _, markdown, _ = compare_main(store, capsys, *BOTH, "--no-figures", "--format", "markdown")
    rows = list(csv.DictReader(io.StringIO(text)))
    expected = parse_table(table)
    assert [{k: row[k] for k in ("run", "experiment", "peer", "method", "model")} for row in rows] == \
           [{k: row[k] for k in ("run", "experiment", "peer", "method", "model")} for row in expected]
    for row, shown in zip(rows, expected):
        metrics = store.run_of(row["experiment"]).data.metrics
        # csv keeps full precision: the logged value exactly (top-1 in %).
        assert float(row["top-1"]) == pytest.approx(100 * metrics[f"{row['peer']}/acc"], rel=1e-12)
        assert float(row["NLL"]) == metrics[f"{row['peer']}/nll"]
        assert (row["gap"] == "") == (shown["gap"] == "")
        if row["gap"]:
            assert f"{float(row['gap']):+.2f}" == shown["gap"]

    lines = markdown.splitlines()
    assert lines[1].startswith("| --- |")
    cells = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]
    assert [dict(zip(cells[0], line)) for line in cells[2:]] == expected


@pytest.mark.ray
def test_peer_filter(store, capsys):
    code, out, _ = compare_main(store, capsys, *BOTH, "--no-figures", "--peer", "student")
    assert code == 0
    assert parse_table(out) == [row for row in expected_rows(store, "cmp-bdkd") if row["peer"] == "student"]
    _, out, _ = compare_main(store, capsys, *BOTH, "--no-figures", "--peer", "ensemble")
    assert [(row["experiment"], row["peer"]) for row in parse_table(out)] == [("cmp-bdkd", "ensemble"),
                                                                              ("cmp-dml", "ensemble")]


@pytest.mark.ray
@pytest.mark.parametrize("column, key, descending", [("top-1", "top-1", True), ("acc", "top-1", True),
                                                     ("ece", "ECE", False), ("gap", "gap", False),
                                                     ("model", "model", False)])
def test_sort(store, capsys, column, key, descending):
    code, out, _ = compare_main(store, capsys, *BOTH, "--no-figures", "--sort", column)
    assert code == 0
    rows = parse_table(out)
    every = expected_rows(store, "cmp-bdkd") + expected_rows(store, "cmp-dml")
    assert sorted(sorted(row.items()) for row in rows) == sorted(sorted(row.items()) for row in every)
    filled = [row[key] for row in rows if row[key]]
    values = filled if key == "model" else [float(value) for value in filled]
    assert values == sorted(values, reverse=descending)
    # Empty cells (the ensembles' gap) go last.
    assert [row[key] for row in rows][len(filled):] == [""] * (len(rows) - len(filled))


@pytest.mark.ray
def test_extra_metric_columns(store, capsys):
    code, out, _ = compare_main(store, capsys, *BOTH, "--no-figures", "--metric", "acc_top5", "--metric", "entropy",
                                "--metric", "acc_head")
    assert code == 0
    rows = parse_table(out)
    assert list(rows[0])[-3:] == ["acc_top5", "entropy", "acc_head"]
    for row in rows:
        metrics, peer = store.run_of(row["experiment"]).data.metrics, row["peer"]
        assert row["acc_top5"] == f"{100 * metrics[peer + '/acc_top5']:.2f}"
        assert row["entropy"] == f"{metrics[peer + '/entropy']:.4f}"
        # Only the run with class groups reports acc_head; the other run's cells stay empty.
        head = metrics.get(f"{peer}/acc_head")
        assert row["acc_head"] == ("" if head is None else f"{100 * head:.2f}")
    assert {row["experiment"] for row in rows if row["acc_head"]} == {"cmp-bdkd"}


@pytest.mark.ray
def test_runs_by_id_and_by_short_id(store, capsys):
    run_id = store.run_of("cmp-dml").info.run_id
    _, by_id, _ = compare_main(store, capsys, "--runs", run_id, "--no-figures")
    _, by_prefix, _ = compare_main(store, capsys, "--runs", run_id[:8], "--no-figures")
    assert parse_table(by_id) == parse_table(by_prefix) == expected_rows(store, "cmp-dml")


@pytest.mark.ray
def test_sweep_trial_takes_its_topology_from_the_parent(store, capsys):
    code, out, err = compare_main(store, capsys, "--experiment", "cmp-sweep", "--no-figures")
    assert code == 0
    rows = parse_table(out)
    assert [(row["peer"], row["method"], row["model"], row["top-1"], row["gap"]) for row in rows] == [
        ("big", "ce", "mlp", "90.00", ""), ("small", "dkd", "cnn_small", "80.00", "+10.00")]
    assert "skipped 1 run without peer metrics" in err


def test_method_and_gap_rules():
    params = {"peers.t.model": "wrn", "peers.t.frozen": "True", "peers.a.frozen": "False", "peers.b.frozen": "False",
              "edges.0.from": "t", "edges.0.to": "a", "edges.0.loss": "kd",
              "edges.1.from.ensemble": "['t', 'a']", "edges.1.to": "b", "edges.1.loss": "kd",
              "edges.2.from": "a", "edges.2.to": "b", "edges.2.loss": "reverse_kd"}
    metrics = {"t/acc": 0.7, "a/acc": 0.75, "b/acc": 0.6, "ensemble/acc": 0.8}
    run = CohortRun("0" * 32, "x", ("t", "a", "b"), params, metrics, True)
    assert [method_of(params, peer) for peer in ("t", "a", "b", "ensemble")] == ["frozen", "kd", "kd+reverse_kd", ""]
    # b's best sender is a, a member of the ensemble sender; the ensemble's own accuracy is not a sender's.
    assert gap_of(run, "b") == pytest.approx(15.0)
    assert gap_of(run, "a") == pytest.approx(-5.0)
    assert gap_of(run, "t") is None and gap_of(run, "ensemble") is None


# --------------------------------------------------------------------------- figures


def read_png(path: Path):
    from matplotlib.image import imread

    assert path.read_bytes()[:8] == PNG_SIGNATURE, path
    image = imread(path)
    assert image.shape[0] > 0 and image.shape[1] > 0, path
    return image


def logged(store: Store, experiment: str) -> set[str]:
    return {Path(item.path).name for item in store.client.list_artifacts(store.run_of(experiment).info.run_id, "compare")}


@pytest.mark.ray
def test_figures_are_written_and_logged(store, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, err = compare_main(store, capsys, *BOTH, "--experiment", "cmp-legacy", "--experiment", "cmp-sweep")
    assert code == 0, err
    out_dir = tmp_path / "compare"  # the default --out
    assert str(out_dir) in err
    read_png(out_dir / "reliability.png")
    for experiment in ("cmp-bdkd", "cmp-dml", "cmp-legacy", "cmp-sweep"):
        folder = out_dir / f"{experiment}-{store.run_of(experiment).info.run_id[:8]}"
        names = {"accuracy_ece.png", "entropy.png"} | ({"groups.png"} if experiment == "cmp-bdkd" else set())
        assert {path.name for path in folder.iterdir()} == names
        for name in names:
            read_png(folder / name)
            assert str((folder / name).relative_to(out_dir)) in err
        assert logged(store, experiment) >= names | {"reliability.png"}


@pytest.mark.ray
def test_reliability_figure_of_one_peer(store, capsys, tmp_path):
    code, _, err = compare_main(store, capsys, *BOTH, "--peer", "student", "--out", str(tmp_path))
    assert code == 0, err
    read_png(tmp_path / "reliability_student.png")
    assert "reliability_student.png" in logged(store, "cmp-bdkd")
    assert "reliability_student.png" not in logged(store, "cmp-dml")  # it has no peer 'student'


@pytest.mark.ray
def test_reliability_sources(store, tmp_path):
    runs, _ = load_runs(store.client, [store.run_of(name) for name in ("cmp-bdkd", "cmp-legacy", "cmp-sweep")])
    bdkd, legacy, sweep = runs
    bins = reliability_source(store.client, bdkd, "student", tmp_path)
    assert isinstance(bins, ReliabilityBins)
    # The logged bins are the final epoch's: they give back the logged ECE.
    assert bins.ece == pytest.approx(bdkd.metrics["student/ece"], abs=1e-9)
    assert int(bins.counts.sum()) == 360  # the digits test split
    assert reliability_source(store.client, legacy, "solo", tmp_path).suffix == ".png"
    assert reliability_source(store.client, sweep, "small", tmp_path) is None


# --------------------------------------------------------------------------- bad input


@pytest.mark.ray
def test_no_runs_is_not_an_error(store, capsys):
    code, out, _ = compare_main(store, capsys, "--experiment", "cmp-empty")
    assert code == 0 and out.startswith("no runs with peer metrics in experiment 'cmp-empty'")
    code, out, _ = compare_main(store, capsys, "--experiment", "cmp-parent-only")
    assert code == 0 and "no runs" in out and "skipped 1 run without peer metrics" in out


BAD_INPUT = {
    "unknown experiment": (["--experiment", "cmp-nope"], "--experiment 'cmp-nope': no such experiment (experiments: "),
    "unknown run": (["--runs", "f" * 32], f"--runs '{'f' * 32}': no such run"),
    "unknown run prefix": (["--runs", "zzzz"], "--runs 'zzzz': no such run"),
    "unknown metric": (["--experiment", "cmp-dml", "--metric", "acc_top9"],
                       "--metric 'acc_top9': no run reports it (they report: acc, acc_top5, adaece, brier, cwece, "),
    "unknown sort": (["--experiment", "cmp-dml", "--sort", "speed"],
                     "--sort 'speed': not a column (columns: run, experiment, peer, method, model, top-1, "),
    "unknown peer": (["--experiment", "cmp-dml", "--peer", "ghost"],
                     "--peer 'ghost': no run has it (peers: ensemble, net_a, net_b)"),
    "nothing asked": ([], "nothing to compare: give --experiment NAME or --runs ID (experiments in "),
}


@pytest.mark.ray
@pytest.mark.parametrize("case", sorted(BAD_INPUT))
def test_bad_input(store, capsys, case):
    args, message = BAD_INPUT[case]
    code, out, err = compare_main(store, capsys, *args)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith(message), err
    if case == "unknown experiment":
        assert "cmp-bdkd" in err and "cmp-dml" in err


@pytest.mark.parametrize("case", ["a file", "under a file", "a folder with files"])
def test_an_unusable_out_is_one_line_before_the_store_is_read(capsys, tmp_path, case):
    (tmp_path / "taken").write_text("a file, not a folder")
    (tmp_path / "earlier").mkdir()
    (tmp_path / "earlier" / "reliability.png").write_bytes(b"an earlier comparison's")
    out, expected = {
        "a file": (tmp_path / "taken", f"--out: {str(tmp_path / 'taken')!r} is a file, not a folder"),
        "under a file": (tmp_path / "taken" / "figures", f"--out: {str(tmp_path / 'taken')!r} is a file, not a folder"),
        "a folder with files": (tmp_path / "earlier", f"--out: folder {str(tmp_path / 'earlier')!r} is not empty: give "
                                                      "--overwrite to write over its files, or another --out"),
    }[case]
    uri = f"sqlite:///{tmp_path}/absent.db"
    code = compare.main(["--tracking-uri", uri, "--experiment", "x", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and err == expected + "\n", err
    assert (tmp_path / "earlier" / "reliability.png").read_bytes() == b"an earlier comparison's"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["earlier", "taken"]
    # --no-figures writes nothing: its --out is not looked at.
    assert compare.main(["--tracking-uri", uri, "--experiment", "x", "--out", str(out), "--no-figures"]) == 2
    assert capsys.readouterr().err.startswith(f"MLflow tracking store {uri!r}: no such database file")


@pytest.mark.parametrize("store_kind", ["missing file", "not a database", "no server"])
def test_unusable_tracking_store(tmp_path, capsys, store_kind):
    if store_kind == "missing file":
        uri = f"sqlite:///{tmp_path}/absent/mlflow.db"
    elif store_kind == "not a database":
        (tmp_path / "notes.db").write_text("not sqlite\n" * 100)
        uri = f"sqlite:///{tmp_path}/notes.db"
    else:
        uri = "http://127.0.0.1:9"  # the discard port: nothing listens
    code = compare.main(["--tracking-uri", uri, "--experiment", "x"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith(f"MLflow tracking store {uri!r}"), err
    assert not (tmp_path / "absent").exists()  # reading never creates a store
