"""A small study end to end: two arms x two seeds through Ray Tune, interrupted with Ctrl-C after
its first run and resumed (that run is not run again), then re-reported from MLflow."""
from __future__ import annotations

import math
import re
import signal
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import empty_store

TOPOLOGIES = Path(__file__).resolve().parents[1] / "topologies"

STUDY = {
    "name": "tiny-study",
    "seeds": [0, 1],
    "baseline": "dml",
    "metrics": ["acc", "ece"],
    "max_concurrent": 1,
    "set": {"train.epochs": 1},  # what a study does with its runs needs no second epoch
    "arms": {
        "dml": {"topology": str(TOPOLOGIES / "dml_pair.yaml"), "roles": {"teacher": "net_a", "student": "net_b"}},
        "bdkd": {"topology": str(TOPOLOGIES / "bdkd_pair.yaml")},
    },
}


@pytest.mark.ray
def test_study_interrupted_resumed_and_reported(tmp_path, capsys):
    import mlflow

    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(STUDY, sort_keys=False))
    uri = empty_store(tmp_path / "mlflow.db")
    command = [sys.executable, "-m", "cohort.study", str(path), "--tracking-uri", uri,
               "--storage", str(tmp_path / "tune"), "--out", str(tmp_path / "figures")]
    # Its own Ray in each command; one run at a time, so Ctrl-C lands in the second.
    driver = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen = []
    for line in driver.stdout:
        seen.append(line)
        if line.startswith("[1/4 runs"):
            driver.send_signal(signal.SIGINT)
            break
    out, err = driver.communicate(timeout=180)
    seen = "".join(seen) + out
    assert driver.returncode == 2, seen + err
    assert "--resume" in err, err
    first = re.search(r"\] (\w+/seed-\d) done: teacher [\d.]+%, student [\d.]+%", seen).group(1)
    assert first == "dml/seed-0", seen  # seed by seed, arms in the file's order
    # Interrupted: the parent KILLED, a run that had started training (if Ctrl-C found one) KILLED
    # as well: none left RUNNING.
    client = mlflow.tracking.MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("tiny-study").experiment_id])
    statuses = dict((run.data.tags.get("cohort.study.arm", "parent") + run.data.tags.get("cohort.study.seed", ""),
                     run.info.status) for run in runs)
    assert statuses.pop("parent") == "KILLED" and statuses.pop("dml0") == "FINISHED", statuses
    assert set(statuses.values()) <= {"KILLED"}, statuses

    resumed = subprocess.run(command + ["--resume"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"{first} done" not in resumed.stdout  # finished: not run again
    assert "[4/4 runs" in resumed.stdout and "1 done before" in resumed.stdout, resumed.stdout
    assert "role student: mean ± std over seeds (2 per arm)" in resumed.stdout
    assert "difference to dml [95% CI] (paired t-test)" in resumed.stdout

    runs = client.search_runs([client.get_experiment_by_name("tiny-study").experiment_id])
    parents = [run for run in runs if "mlflow.parentRunId" not in run.data.tags]
    children = [run for run in runs if "mlflow.parentRunId" in run.data.tags]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert sorted((run.data.tags["cohort.study.arm"], run.data.tags["cohort.study.seed"]) for run in children) == [
        ("bdkd", "0"), ("bdkd", "1"), ("dml", "0"), ("dml", "1")]
    assert all(run.info.status == "FINISHED" for run in children)
    for run in children:  # each a complete cohort run: every epoch once, weights, reliability bins, topology
        assert [m.step for m in client.get_metric_history(run.info.run_id, "objective")] == [1]
        logged = {item.path for folder in ("", "weights", "reliability")
                  for item in client.list_artifacts(run.info.run_id, folder or None)}
        assert {"topology.yaml", "final_metrics.json"} <= logged
        assert any(p.startswith("weights/") and p.endswith(".pt") for p in logged)
        assert any(p.endswith(".json") and p.startswith("reliability/") for p in logged)
    parent_files = {item.path for folder in ("", "tables", "figures")
                    for item in client.list_artifacts(parents[0].info.run_id, folder or None)}
    assert {"study.yaml", "tables/tables.csv", "tables/tables.tex", "figures/metric_acc.png",
            "figures/reliability_student.png"} <= parent_files

    # --report reads MLflow only (no Ray): in this process.
    from cohort.study import main as study_main

    capsys.readouterr()
    code = study_main([str(path), "--tracking-uri", uri, "--report", "--format", "markdown",
                       "--out", str(tmp_path / "again"), "--register", "student=tiny-best"])
    report = capsys.readouterr()
    assert code == 0, report.err
    assert "4 of 4 runs done" in report.out and "| dml | net_b | 2 |" in report.out
    assert (tmp_path / "again" / "reliability_teacher.png").is_file()
    # The best arm (the student's mean top-1) and its best seed give the registered student.
    def student_acc(run):
        return run.data.metrics[("net_b" if run.data.tags["cohort.study.arm"] == "dml" else "student") + "/acc"]

    by_arm = {}
    for run in children:
        by_arm.setdefault(run.data.tags["cohort.study.arm"], []).append(run)
    means = {name: sum(map(student_acc, runs)) / len(runs) for name, runs in by_arm.items()}
    top = max(means.values())
    best = {run.info.run_id for name, runs in by_arm.items() if means[name] == top
            for run in runs if student_acc(run) == max(map(student_acc, runs))}  # ties: any of them
    assert "'tiny-best' version 1" in report.out, report.out
    version = mlflow.tracking.MlflowClient(uri, registry_uri=uri).get_model_version("tiny-best", "1")
    assert version.run_id in best

    # The Python API reads the same study back (cohort.read_study: no training): its tables are the
    # printed ones, from the runs' values in MLflow.
    import cohort

    api = cohort.read_study(path, tracking_uri=uri, out=tmp_path / "api")
    assert (api.name, api.experiment, api.parent_run_id, api.status, api.tracking_uri) == (
        "tiny-study", "tiny-study", parents[0].info.run_id, "FINISHED", uri)
    assert sorted((o.arm, o.seed, o.status) for o in api.outcomes) == [
        ("bdkd", 0, "FINISHED"), ("bdkd", 1, "FINISHED"), ("dml", 0, "FINISHED"), ("dml", 1, "FINISHED")]
    assert {"metric_acc.png", "reliability_student.png"} <= {figure.name for figure in api.figures}
    assert all(figure.is_file() for figure in api.figures) and api.roles == ("teacher", "student")
    student = api.table("student")
    assert list(student.index) == ["dml", "bdkd"] and list(student["peer"]) == ["net_b", "student"]
    assert list(student["n"]) == [2, 2] and list(student["failed"]) == [0, 0]
    acc = {name: {int(run.data.tags["cohort.study.seed"]): student_acc(run) for run in runs}
           for name, runs in by_arm.items()}
    for arm in ("dml", "bdkd"):
        mean, std = statistics.mean(acc[arm].values()), statistics.stdev(acc[arm].values())
        assert (student.loc[arm, "acc_mean"], student.loc[arm, "acc_std"]) == (pytest.approx(mean), pytest.approx(std))
        assert f"| {arm} | {student.loc[arm, 'peer']} | 2 | {100 * mean:.2f} ± {100 * std:.2f} |" in report.out
    one = api.table("student", "acc")
    assert one.loc["bdkd", "pairs"] == 2
    assert one.loc["bdkd", "difference"] == pytest.approx(statistics.mean(acc["bdkd"][seed] - acc["dml"][seed]
                                                                          for seed in (0, 1)))
    assert one.loc["bdkd", "ci_low"] <= one.loc["bdkd", "difference"] <= one.loc["bdkd", "ci_high"]
    assert 0 <= one.loc["bdkd", "p_value"] <= 1 and math.isnan(one.loc["dml", "difference"])
    assert student.loc["bdkd", "acc_difference"] == one.loc["bdkd", "difference"]
    with pytest.raises(cohort.CohortError, match="role 'nobody': the study's roles are teacher, student"):
        api.table("nobody")
