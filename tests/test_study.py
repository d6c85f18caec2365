"""Studies without Ray: the study file and its bad input, fair initial weights per role, the tables
(numbers against scipy and by hand, every format), the progress arithmetic and the figures."""
from __future__ import annotations

import csv
import io
import math
from pathlib import Path

import pytest
import torch
import yaml
from conftest import empty_store
from scipy import stats

from cohort.console.display import clock, estimate_left
from cohort.datasets import describe_dataset
from cohort.studies.file import check_metrics, load_study, reported_metrics, with_seed
from cohort.studies.tables import Outcome, best_arms, build_tables, render
from cohort.study import main
from cohort.worker.peer import build_peer
from cohort.worker.report import ENSEMBLE, report_keys

ROOT = Path(__file__).resolve().parents[1]
TOPOLOGIES = ROOT / "topologies"

STUDY = {
    "name": "small-study",
    "seeds": [0, 1],
    "baseline": "dml",
    "metrics": ["acc", "ece"],
    "set": {"train.epochs": 1},
    "arms": {
        "dml": {"topology": str(TOPOLOGIES / "dml_pair.yaml"), "roles": {"teacher": "net_a", "student": "net_b"}},
        "bdkd": {"topology": str(TOPOLOGIES / "bdkd_pair.yaml")},
    },
}


def write_study(tmp_path: Path, study: dict, name: str = "study.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(study, sort_keys=False))
    return path


def changed(**changes) -> dict:
    study = {**STUDY, **changes}
    return {key: value for key, value in study.items() if value is not None}


# --------------------------------------------------------------------------- the study file


SHIPPED_STUDIES = sorted((ROOT / "studies").glob("*.yaml"))


@pytest.mark.parametrize("path", SHIPPED_STUDIES, ids=[path.name for path in SHIPPED_STUDIES])
def test_shipped_studies_load(path):
    """Every arm of every shipped study: its topology valid with each of the study's seeds, its roles
    peers of it (each starting from its role's weights) or the ensemble, and every metric of the study
    reported by some arm (what the dry run checks, without fetching the arms' checkpoints)."""
    study = load_study(path)
    assert study.baseline in study.arms and len(study.arms) >= 2 and len(study.seeds) >= 2
    reported = {}
    for name, arm in study.arms.items():
        for seed in study.seeds:
            assert with_seed(arm.topology, seed).seed == seed, (name, seed)
        assert arm.roles and len(set(arm.roles.values())) == len(arm.roles), name
        for role, peer in arm.roles.items():
            assert peer == ENSEMBLE or arm.topology.peers[peer].init_seed is not None, (name, role)
        reported[name] = reported_metrics(arm, report_keys(arm.topology, describe_dataset(arm.topology.data)))
        assert {"acc", "nll"} <= reported[name], name
    check_metrics(study, reported)


def test_a_study_crosses_arms_and_seeds_seed_by_seed(tmp_path):
    study = load_study(write_study(tmp_path, changed(seeds=None, repeats=3)))
    assert study.seeds == [0, 1, 2]
    assert study.runs() == [("dml", 0), ("bdkd", 0), ("dml", 1), ("bdkd", 1), ("dml", 2), ("bdkd", 2)]
    assert study.roles == ["teacher", "student"]
    assert study.arms["bdkd"].roles == {"teacher": "teacher", "student": "student"}  # peers by their own names
    assert all(arm.topology.train.epochs == 1 for arm in study.arms.values())
    assert study.experiment == "small-study"


def test_relative_topologies_start_at_the_study_file(tmp_path):
    (tmp_path / "studies").mkdir()
    (tmp_path / "topologies").mkdir()
    (tmp_path / "topologies" / "pair.yaml").write_text((TOPOLOGIES / "dml_pair.yaml").read_text())
    study = changed(arms={"dml": {"topology": "../topologies/pair.yaml"}})
    loaded = load_study(write_study(tmp_path / "studies", study))
    assert loaded.arms["dml"].path == (tmp_path / "topologies" / "pair.yaml").resolve()


def test_overrides_apply_study_then_arm_then_command_line(tmp_path):
    study = changed(arms={"dml": {"topology": str(TOPOLOGIES / "dml_pair.yaml"), "set": {"train.epochs": 2}}})
    loaded = load_study(write_study(tmp_path, study), ["data.batch_size=32"])
    topology = loaded.arms["dml"].topology
    assert (topology.train.epochs, topology.data.batch_size) == (2, 32)
    assert with_seed(topology, 3).seed == 3  # each run's seed is the study's
    assert load_study(write_study(tmp_path, study), ["train.epochs=4"]).arms["dml"].topology.train.epochs == 4


def test_the_same_role_starts_from_the_same_weights_in_every_arm(tmp_path):
    """dml's net_b and bdkd's student (both cnn_small, role student) start identical for a seed;
    the teachers too; roles differ from each other, and seeds from seeds."""
    study = load_study(write_study(tmp_path, STUDY))
    info = describe_dataset(study.arms["dml"].topology.data)

    def weights(arm: str, peer: str, seed: int) -> dict[str, torch.Tensor]:
        return build_peer(with_seed(study.arms[arm].topology, seed), peer, info).state_dict()

    def same(a, b):
        return all(torch.equal(a[key], b[key]) for key in a)

    for seed in (0, 1):
        assert same(weights("dml", "net_b", seed), weights("bdkd", "student", seed))
        assert same(weights("dml", "net_a", seed), weights("bdkd", "teacher", seed))
    assert not same(weights("dml", "net_b", 0), weights("dml", "net_b", 1))
    assert study.arms["dml"].topology.peers["net_b"].init_seed == "student"


def test_an_init_seed_the_topology_chose_is_kept(tmp_path):
    study = changed(arms={"dml": {"topology": str(TOPOLOGIES / "dml_pair.yaml"),
                                  "set": {"peers.net_b.init_seed": 7}}})
    assert load_study(write_study(tmp_path, study)).arms["dml"].topology.peers["net_b"].init_seed == 7


BAD = {
    "unknown baseline": (changed(baseline="kd"), "baseline: 'kd' is not an arm"),
    "arm without topology": (changed(arms={"dml": {"roles": {"student": "net_b"}}}), "arms.dml.topology: missing"),
    "topology file missing": (changed(arms={"dml": {"topology": "nope.yaml"}}), "arms.dml.topology: no such file"),
    "role names a missing peer": (
        changed(arms={"dml": {"topology": str(TOPOLOGIES / "dml_pair.yaml"), "roles": {"student": "net_c"}}}),
        "arms.dml.roles.student: 'net_c' is not a peer of dml_pair.yaml (did you mean 'net_b'?)"),
    "one seed": (changed(seeds=[3]), "seeds: 1 seed gives no standard deviation"),
    "duplicate seeds": (changed(seeds=[0, 1, 0]), "seeds: 0 is listed twice"),
    "seeds and repeats": (changed(repeats=3), "seeds: give either seeds"),
    "arm set breaks its topology": (
        changed(arms={"dml": {"topology": str(TOPOLOGIES / "dml_pair.yaml"), "set": {"edges.0.temperature": -1}}}),
        "arms.dml: edges[0].temperature"),
    "unknown key": (changed(seed=[1]), "seed: unknown key (did you mean 'seeds'?)"),
    "boolean seeds": (changed(seeds=[True, False]), "seeds[0]: must be a number, not true"),
    "negative seed": (changed(seeds=[0, -1]), "seeds[1]: must be a whole number from 0 to 4294967295"),
    "seed numpy cannot take": (changed(seeds=[0, 2**32]), "seeds[1]: must be a whole number from 0 to 4294967295"),
    "too many runs": (changed(seeds=None, repeats=10**8),
                      "repeats: 2 arm(s) x 100000000 seeds = 200000000 runs; a study runs at most 1000"),
    "too many seeds": (changed(seeds=list(range(501))), "seeds: 2 arm(s) x 501 seeds = 1002 runs; a study runs at most"),
    "a seed set for every arm": (changed(set={"seed": 3}), "set.seed: the study sets every run's seed from seeds:"),
    "a seed set for an arm": (changed(arms={"dml": {"topology": str(TOPOLOGIES / "dml_pair.yaml"), "set": {"seed": 3}}}),
                              "arms.dml.set.seed: the study sets every run's seed from seeds:"),
    "two roles on one peer": (
        changed(arms={"dml": {"topology": str(TOPOLOGIES / "dml_pair.yaml"), "roles": {"teacher": "net_a",
                                                                                        "student": "net_a"}}}),
        "arms.dml.roles.student: 'net_a' already plays the role 'teacher' (each role needs its own peer)"),
    "a name that is a path": (changed(name="../elsewhere"), "name: '../elsewhere' must be letters, digits"),
    "an arm's topology name that is a path": (
        changed(arms={"dml": {"topology": str(TOPOLOGIES / "dml_pair.yaml"), "set": {"name": "a/b"}}}),
        "arms.dml: name: 'a/b' must be letters"),
    "metric no arm reports": (changed(metrics=["acc", "eec"]),
                              "metrics: no arm reports 'eec' (did you mean 'ece'?) (they report: acc, acc_top5,"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_study_is_one_line_exit_2_before_anything_starts(tmp_path, capsys, case):
    import ray

    study, expected = BAD[case]
    code = main([str(write_study(tmp_path, study)), "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db",
                 "--storage", str(tmp_path / "tune")])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("study.yaml: ") and expected in err, err
    assert len(err.strip().splitlines()) == 1
    assert not ray.is_initialized() and not (tmp_path / "tune").exists() and not (tmp_path / "mlflow.db").exists()


def test_a_seed_on_the_command_line_is_refused(tmp_path, capsys):
    assert main([str(write_study(tmp_path, STUDY)), "--dry-run", "--set", "seed=3"]) == 2
    assert capsys.readouterr().err.strip() == ("study.yaml: --set seed: the study sets every run's seed from seeds: "
                                               "(or repeats:), not --set")


def test_single_seed_runs_only_when_allowed(tmp_path, capsys):
    path = write_study(tmp_path, changed(seeds=[3]))
    assert main([str(path), "--dry-run", "--allow-single-seed"]) == 0
    assert "2 arms x 1 seeds (3) = 2 runs" in capsys.readouterr().out


def test_a_study_that_exists_needs_resume(tmp_path, capsys):
    """A parent run of that name in MLflow: refused without --resume, before Ray starts."""
    import ray

    from cohort.tracking.tracker import Tracker

    uri = empty_store(tmp_path / "mlflow.db")
    tracker = Tracker(uri, "small-study")
    tracker.client.create_run(tracker.experiment_id, tags={"cohort.study": "small-study", "cohort.study.parent": "true"})
    code = main([str(write_study(tmp_path, STUDY)), "--tracking-uri", uri, "--storage", str(tmp_path / "tune")])
    err = capsys.readouterr().err
    assert code == 2 and "a study named 'small-study' exists" in err and "--resume" in err, err
    assert not ray.is_initialized()
    code = main([str(write_study(tmp_path, changed(name="other"))), "--tracking-uri", uri, "--resume",
                 "--storage", str(tmp_path / "tune")])
    assert code == 2 and "--resume: no interrupted study named 'other'" in capsys.readouterr().err


def test_a_refused_resume_creates_no_store_and_no_experiment(tmp_path, capsys):
    from cohort.tracking.tracker import Tracker

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    argv = [str(write_study(tmp_path, STUDY)), "--tracking-uri", uri, "--resume", "--storage", str(tmp_path / "tune")]
    assert main(argv) == 2
    assert "--resume: no interrupted study named 'small-study'" in capsys.readouterr().err
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "tune").exists()
    assert empty_store(tmp_path / "mlflow.db") == uri
    tracker = Tracker(uri, "another-experiment")  # a store without the study's experiment
    assert main(argv) == 2 and "--resume: no interrupted study" in capsys.readouterr().err
    assert tracker.client.get_experiment_by_name("small-study") is None


@pytest.mark.parametrize("case", ["a file", "under a file", "a folder with files", "a folder with files, --report"])
def test_an_unusable_out_is_one_line_before_anything_starts(tmp_path, capsys, monkeypatch, case):
    import cohort.driver.cluster

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray started")

    monkeypatch.setattr(cohort.driver.cluster, "start_ray", no_ray)
    (tmp_path / "taken").write_text("a file")
    (tmp_path / "earlier").mkdir()
    (tmp_path / "earlier" / "metric_acc.png").write_bytes(b"an earlier report's")
    out, expected = {
        "a file": (tmp_path / "taken", f"--out: {str(tmp_path / 'taken')!r} is a file, not a folder"),
        "under a file": (tmp_path / "taken" / "figures", f"--out: {str(tmp_path / 'taken')!r} is a file, not a folder"),
        "a folder with files": (tmp_path / "earlier", f"--out: folder {str(tmp_path / 'earlier')!r} is not empty: give "
                                                      "--overwrite to write over its files, or another --out"),
    }[case.partition(",")[0]]
    report = ["--report"] if case.endswith("--report") else []
    code = main([str(write_study(tmp_path, STUDY)), "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db",
                 "--storage", str(tmp_path / "tune"), "--out", str(out), *report])
    assert code == 2 and capsys.readouterr().err == expected + "\n"
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "tune").exists()
    assert (tmp_path / "earlier" / "metric_acc.png").read_bytes() == b"an earlier report's"


@pytest.mark.parametrize("before, failure, after", [
    ("FINISHED", RuntimeError("Tune failed"), "FINISHED"),  # a finished study resumed: as it was
    ("KILLED", RuntimeError("Tune failed"), "FAILED"),
    ("KILLED", KeyboardInterrupt(), "KILLED"),
])
def test_a_study_that_stops_leaves_no_run_running(tmp_path, capsys, monkeypatch, before, failure,
                                                  after):
    """Whatever stops a study once its parent run is RUNNING again (here Tune's restore, with Ray
    and Tune stubbed out), the parent ends FAILED, KILLED or as it was, and its children that were
    RUNNING end KILLED."""
    import json

    import ray
    import ray.tune

    import cohort.driver.cluster
    from cohort.tracking.tracker import Tracker

    uri = empty_store(tmp_path / "mlflow.db")
    tracker = Tracker(uri, "small-study")
    parent = tracker.client.create_run(tracker.experiment_id, tags={"cohort.study": "small-study",
                                                                     "cohort.study.parent": "true"}).info.run_id
    tracker.client.set_terminated(parent, status=before)
    child = tracker.client.create_run(tracker.experiment_id, tags={"mlflow.parentRunId": parent}).info.run_id
    done = tracker.client.create_run(tracker.experiment_id, tags={"mlflow.parentRunId": parent}).info.run_id
    tracker.client.set_terminated(done, status="FINISHED")
    storage = tmp_path / "tune"
    (storage / "small-study").mkdir(parents=True)
    (storage / "small-study.cohort.json").write_text(json.dumps({"parent_run_id": parent}))
    (storage / "small-study.children.json").write_text(json.dumps({"dml/seed-0": done, "dml/seed-1": child}))

    def stop(*args, **kwargs):
        assert tracker.client.get_run(parent).info.status == "RUNNING"
        raise failure

    monkeypatch.setattr(cohort.driver.cluster, "start_ray", lambda *args, **kwargs: {"CPU": 2.0})
    monkeypatch.setattr(ray, "put", lambda value: "the runs' data in the object store")
    monkeypatch.setattr(ray.tune, "with_parameters", lambda trainable, **kwargs: trainable)
    monkeypatch.setattr(ray.tune, "with_resources", lambda trainable, resources: trainable)
    monkeypatch.setattr(ray.tune.Tuner, "can_restore", staticmethod(lambda path, **kwargs: True))
    monkeypatch.setattr(ray.tune.Tuner, "restore", staticmethod(stop))
    argv = [str(write_study(tmp_path, STUDY)), "--tracking-uri", uri, "--storage", str(storage), "--resume",
            "--out", str(tmp_path / "figures")]
    if isinstance(failure, KeyboardInterrupt):
        assert main(argv) == 130
    else:
        with pytest.raises(RuntimeError, match="Tune failed"):
            main(argv)
    status = {run_id: tracker.client.get_run(run_id).info.status for run_id in (parent, child, done)}
    assert status == {parent: after, child: "KILLED", done: "FINISHED"}


def test_dry_run_prints_the_plan(tmp_path, capsys):
    assert main([str(write_study(tmp_path, STUDY)), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "study small-study: 2 arms x 2 seeds (0, 1) = 4 runs; baseline dml" in out
    assert "arm dml: dml_pair.yaml, 1 epoch; peers net_a cnn_medium, net_b cnn_small; roles teacher=net_a, " \
           "student=net_b" in out
    assert "peers.net_b.init_seed: student" in out
    assert "resources: each run takes up to 2 workers" in out and "run(s) at a time" in out


# --------------------------------------------------------------------------- tables


ROLES = {"dml": {"student": "net_b"}, "kd": {"student": "student"}, "bdkd": {"student": "student", "teacher": "t"}}
ACC = {"dml": [0.90, 0.92, 0.91], "kd": [0.91, 0.94, 0.92], "bdkd": [0.93, 0.93, 0.95]}
ECE = {"dml": [0.05, 0.04, 0.06], "kd": [0.03, 0.04, 0.02], "bdkd": [0.02, 0.03, 0.01]}


def outcomes() -> list[Outcome]:
    found = []
    for arm, peers in ROLES.items():
        for seed in range(3):
            metrics = {f"{peers['student']}/acc": ACC[arm][seed], f"{peers['student']}/ece": ECE[arm][seed]}
            if "teacher" in peers:
                metrics["t/acc"] = 0.97
            found.append(Outcome(arm, seed, "FINISHED", metrics, f"run-{arm}-{seed}"))
    found.append(Outcome("kd", 3, "FAILED", {}, "run-kd-3", "training failed: loss is NaN"))
    return found


def test_tables_per_role_against_scipy_and_by_hand():
    tables = build_tables(ROLES, "dml", ["acc", "ece"], outcomes())
    assert [table.role for table in tables] == ["student", "teacher"]
    student = {row.arm: row for row in tables[0].rows}
    assert student["dml"].n == 3 and student["kd"].n == 3 and student["kd"].failed == 1
    assert student["dml"].summaries["acc"].mean == pytest.approx(0.91)
    assert student["dml"].summaries["acc"].std == pytest.approx(0.01)  # (−.01, .01, 0): sqrt(0.0002 / 2)
    assert student["dml"].differences is None  # the baseline
    diff = student["bdkd"].differences["acc"]
    reference = stats.ttest_rel(ACC["bdkd"], ACC["dml"])
    assert diff.n_pairs == 3
    assert diff.mean == pytest.approx(sum(b - d for b, d in zip(ACC["bdkd"], ACC["dml"])) / 3)
    assert diff.p_value == pytest.approx(reference.pvalue, rel=1e-9)
    low, high = reference.confidence_interval(0.95)
    assert (diff.ci_low, diff.ci_high) == (pytest.approx(low), pytest.approx(high))
    # A role missing from an arm is an empty row, not an error.
    teacher = {row.arm: row for row in tables[1].rows}
    assert teacher["dml"].peer is None and teacher["dml"].n == 0
    assert teacher["bdkd"].summaries["acc"].mean == pytest.approx(0.97)
    assert best_arms(tables[0]) == {"acc": "bdkd", "ece": "bdkd"}


def test_table_rendering_in_every_format():
    tables = build_tables(ROLES, "dml", ["acc", "ece"], outcomes())
    text = render(tables, "table", 3)
    assert "role student: mean ± std over seeds (3 per arm)" in text
    assert "91.00 ± 1.00" in text and "3 (1 failed)" in text
    assert "bdkd  acc (%)  3      +2.67 [" in text  # (3 + 1 + 4) / 3 points of accuracy
    lines = text.splitlines()
    assert all(line == line.rstrip() for line in lines)

    markdown = render(tables, "markdown", 3)
    assert "| arm | peer | n | acc (%) | ece |" in markdown and "| dml | net_b | 3 | 91.00 ± 1.00 |" in markdown

    rows = list(csv.DictReader(io.StringIO(render(tables, "csv", 3))))
    bdkd_acc = next(row for row in rows if row["role"] == "student" and row["arm"] == "bdkd" and row["metric"] == "acc")
    assert float(bdkd_acc["mean"]) == pytest.approx(sum(ACC["bdkd"]) / 3)
    assert float(bdkd_acc["p_value"]) == pytest.approx(stats.ttest_rel(ACC["bdkd"], ACC["dml"]).pvalue)
    assert next(row for row in rows if row["arm"] == "dml" and row["role"] == "student")["difference"] == ""

    latex = render(tables, "latex", 3)
    assert r"\toprule" in latex and r"\bottomrule" in latex and r"acc (\%)" in latex
    assert r"\textbf{93.67 $\pm$ 1.15}" in latex  # bdkd: the best accuracy, in bold
    assert r"\textbf{0.0200 $\pm$ 0.0100}" in latex  # and the lowest ECE
    assert "net\\_b" in latex


def test_missing_metrics_and_failed_runs_are_not_zeros():
    found = [Outcome("dml", 0, "FINISHED", {"net_b/acc": 0.9}), Outcome("dml", 1, "FINISHED", {}),
             Outcome("dml", 2, "FAILED", {"net_b/acc": 0.1})]
    table = build_tables({"dml": {"student": "net_b"}}, "dml", ["acc"], found)[0]
    row = table.rows[0]
    assert row.n == 2 and row.failed == 1
    assert row.summaries["acc"].n == 1 and row.summaries["acc"].mean == 0.9


# --------------------------------------------------------------------------- progress and figures


def test_time_left_and_clock():
    assert math.isnan(estimate_left(30.0, 0, 10))
    assert estimate_left(60.0, 3, 15) == pytest.approx(240.0)  # 20 s a run, 12 to go
    assert estimate_left(60.0, 5, 5) == 0.0
    assert [clock(s) for s in (42, 185, 3720, math.nan)] == ["42s", "3m05s", "1h02m", "?"]


def test_figures_are_drawn(tmp_path):
    from cohort.metrics.reliability import reliability_bins
    from cohort.studies.figures import draw_all

    tables = build_tables(ROLES, "dml", ["acc", "ece"], outcomes())
    logits, labels = torch.randn(200, 10, generator=torch.Generator().manual_seed(0)), torch.arange(200) % 10
    written = draw_all(tables, outcomes(), ["acc", "ece"], lambda arm, peer: reliability_bins(logits, labels),
                       tmp_path)
    assert sorted(path.name for path in written) == ["metric_acc.png", "metric_ece.png", "reliability_student.png",
                                                     "reliability_teacher.png"]
    assert all(path.stat().st_size > 5000 for path in written)


def test_no_differences_for_a_role_the_baseline_lacks():
    tables = build_tables(ROLES, "dml", ["acc"], outcomes())
    teacher = render(tables[1:], "table", 3)
    assert "bdkd  t     3  97.00 ± 0.00" in teacher and "difference to" not in teacher


def test_the_runs_data_is_loaded_once_per_distinct_dataset(monkeypatch):
    """The study's driver loads the data of its runs (an arm with a seed) for their workers: once for
    arms on the same data whatever their seeds, once per seed where the seed draws a validation split."""
    import ray

    import cohort.datasets
    from cohort.studies.experiment import run_datasets
    from cohort.tuning.sweep import trial_dataset, trial_topology

    loaded = []
    monkeypatch.setattr(cohort.datasets, "load_dataset", lambda data, seed: loaded.append((data.val_fraction, seed)) or
                        f"data {len(loaded)}")
    monkeypatch.setattr(ray, "put", lambda value: f"ref to {value}")
    pair = {"data": {"batch_size": 64}, "peers": {"a": {"model": "mlp"}, "b": {"model": "mlp_tiny"}},
            "edges": [{"from": "a", "to": "b", "loss": "kd"}]}
    arms = {"kd": {"name": "kd", **pair}, "dml": {"name": "dml", **pair, "edges": [*pair["edges"],
                                                                                 {"from": "b", "to": "a", "loss": "kd"}]},
            "held-out": {"name": "held-out", **pair, "data": {"batch_size": 64, "val_fraction": 0.2}}}
    runs = [(arm, seed) for seed in (0, 1) for arm in arms]
    shared = run_datasets(arms, runs)
    assert loaded == [(0.0, 0), (0.2, 0), (0.2, 1)] and len(shared) == 3
    refs = {(arm, seed): trial_dataset(shared, trial_topology(arms[arm], {"seed": seed})) for arm, seed in runs}
    assert refs[("kd", 0)] == refs[("kd", 1)] == refs[("dml", 1)] == "ref to data 1"
    assert (refs[("held-out", 0)], refs[("held-out", 1)]) == ("ref to data 2", "ref to data 3")
