"""Faults: a killed worker restarts from the last checkpoint, in lockstep ending where an
uninterrupted run ends, codistilling with fresh snapshots; a kill beyond `max_failures` fails the run
cleanly; an interrupted driver resumes its run."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from conftest import empty_store, has_mapped, ray_processes

from cohort.run import main

mlflow = pytest.importorskip("mlflow")
pytestmark = [pytest.mark.ray,
              pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds Ray's worker processes through /proc")]

TOPOLOGY = {
    "name": "faults",
    "seed": 5,
    "data": {"dataset": "digits", "batch_size": 16},
    "train": {"epochs": 4, "optimizer": {"lr": 0.02}, "max_failures": 2, "check_batches_every": 20},
    # Dropout draws from every worker's RNG each step: a restarted or resumed run ends like the
    # uninterrupted one only if the checkpoint restored the RNG (without it, these tests fail).
    "peers": {"teacher": {"model": "cnn_medium", "model_args": {"dropout": 0.3}},
              "student": {"model": "cnn_small", "model_args": {"dropout": 0.3}}},
    "edges": [{"from": "teacher", "to": "student", "loss": "bdkd"},
              {"from": "student", "to": "teacher", "loss": "reverse_kd"}],
}
COMPARED = ("teacher/acc", "teacher/nll", "student/acc", "student/nll", "student/ece", "ensemble/brier")


@pytest.fixture(scope="module")
def uninterrupted(ray_cluster, tmp_path_factory):
    """The final metrics of the topology trained without faults."""
    folder = tmp_path_factory.mktemp("uninterrupted")
    uri = empty_store(folder / "mlflow.db")
    assert main([str(write(folder, TOPOLOGY)), "--tracking-uri", uri, "--storage", str(folder / "ray")]) == 0
    return uri, the_run(uri).data.metrics


def write(folder: Path, topology: dict) -> Path:
    path = folder / "faults.yaml"
    path.write_text(yaml.safe_dump(topology, sort_keys=False))
    return path


def the_run(uri: str):
    client = mlflow.tracking.MlflowClient(uri)
    experiment = client.get_experiment_by_name("faults")
    runs = client.search_runs([experiment.experiment_id]) if experiment else []
    return runs[0] if runs else None


def logged_epochs(uri: str) -> list[int]:
    if not Path(uri[len("sqlite:///"):]).exists():
        return []
    run = the_run(uri)
    if run is None:
        return []
    history = mlflow.tracking.MlflowClient(uri).get_metric_history(run.info.run_id, "student/acc")
    return [metric.step for metric in history]


def wait_for_epoch(uri: str, epoch: int, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if epoch in logged_epochs(uri):
            return
        time.sleep(0.2)
    raise AssertionError(f"epoch {epoch} was not logged within {timeout}s")


def kill_a_worker() -> None:
    workers = ray_processes()
    assert workers, "no Ray Train worker to kill"
    os.kill(workers[-1], signal.SIGKILL)


def run_in_thread(args: list[str]) -> tuple[threading.Thread, list[int]]:
    codes: list[int] = []
    thread = threading.Thread(target=lambda: codes.append(main(args)), daemon=True)
    thread.start()
    return thread, codes


def test_a_codistilling_cohort_restarts_from_its_checkpoint_then_fails_beyond_max_failures(ray_cluster, tmp_path,
                                                                                           capsys):
    """exchange.mode snapshot: the snapshots a killed worker had published died with it; the restarted
    group publishes every peer's restored weights before anyone reads (docs/codistillation.md) and
    trains on, every epoch logged once. A second kill is beyond max_failures (1): the run fails
    cleanly, with one line, marked FAILED. (One training for both: a fit costs more than its epochs.)"""
    uri = empty_store(tmp_path / "mlflow.db")
    # Eight epochs: without a barrier an epoch here can take about a second, and the restarted group
    # must still be training when it is killed in its turn.
    topology = {**TOPOLOGY, "exchange": {"mode": "snapshot", "every": 10},
                "train": {**TOPOLOGY["train"], "epochs": 8, "max_failures": 1}}
    thread, codes = run_in_thread([str(write(tmp_path, topology)), "--tracking-uri", uri,
                                   "--storage", str(tmp_path / "ray")])
    wait_for_epoch(uri, 1)
    first_group = set(ray_processes())
    kill_a_worker()
    before = logged_epochs(uri)
    # Trained on after the restart: a new group (none of the first's workers left), and an epoch logged
    # since the kill. (Waiting for a given epoch is not enough: the first group may have logged it
    # between the look and the kill.)
    deadline = time.time() + 240
    while not (len(now := set(ray_processes())) == 2 and not now & first_group and len(logged_epochs(uri)) > len(before)):
        assert time.time() < deadline and thread.is_alive(), (codes, logged_epochs(uri))
        time.sleep(0.2)
    run = the_run(uri)
    epochs = logged_epochs(uri)
    assert run.info.status == "RUNNING" and epochs == list(range(1, len(epochs) + 1)) and len(epochs) < 8, epochs
    assert run.data.metrics["student/staleness_teacher"] >= 0 and run.data.metrics["teacher/staleness_student"] >= 0
    kill_a_worker()
    thread.join(timeout=400)
    assert codes == [2]
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("training failed:") and "marked FAILED" in err[0], err
    epochs = logged_epochs(uri)  # no gap, no epoch logged twice, not the last
    assert the_run(uri).info.status == "FAILED" and epochs == list(range(1, len(epochs) + 1)) and len(epochs) < 8


def test_a_killed_worker_restarts_then_the_interrupted_driver_resumes_like_an_uninterrupted_run(uninterrupted,
                                                                                               tmp_path):
    """One training for both faults of a lockstep cohort: a worker killed in epoch 2 (the group
    restarts from the epoch-1 checkpoint), then Ctrl-C to the driver once epoch 2 is logged, then
    ``--resume``: every epoch logged once, and the final metrics those of the uninterrupted run
    (without the checkpoint's RNG state, or with an epoch trained twice, they differ)."""
    _, expected = uninterrupted
    uri = empty_store(tmp_path / "mlflow.db")
    storage = tmp_path / "ray"
    driver = subprocess.Popen([sys.executable, "-m", "cohort.run", str(write(tmp_path, TOPOLOGY)), "--tracking-uri",
                               uri, "--storage", str(storage)], cwd=tmp_path, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        # Watch the driver's own progress lines: reading its SQLite store while it creates it would race.
        killed = False
        for line in driver.stdout:
            if line.startswith("epoch 1/") and not killed:
                workers = ray_processes(ancestor=driver.pid)
                assert workers, "no Ray Train worker to kill"
                os.kill(workers[-1], signal.SIGKILL)
                killed = True
            if line.startswith("epoch 2/"):
                break
        assert killed
        # The command's own Ray has no autoscaler to tell the fit's resources: Ray Data's autoscaling
        # coordinator (a detached actor the first fit of a Ray otherwise starts) is not there.
        assert ray_processes(ancestor=driver.pid) and not ray_processes("AutoscalingCoordinator", driver.pid)
        # Ray Train's controller trains nothing and imports no torch (cohort.driver.process_group).
        controllers = ray_processes("TrainController", driver.pid)
        assert controllers and not any(has_mapped(pid, "libtorch_cpu") for pid in controllers)
        driver.send_signal(signal.SIGINT)
        _, err = driver.communicate(timeout=120)
    finally:
        if driver.poll() is None:
            driver.kill()
    assert driver.returncode == 130, err[-2000:]
    run = the_run(uri)
    assert run.info.status == "KILLED"
    assert f"--resume {run.info.run_id}" in err
    done = logged_epochs(uri)
    assert done in ([1, 2], [1, 2, 3]), done  # after the restart: no gap, no epoch logged twice

    assert main(["--resume", run.info.run_id, "--tracking-uri", uri]) == 0
    run = the_run(uri)
    assert run.info.status == "FINISHED"
    assert logged_epochs(uri) == [1, 2, 3, 4]
    for key in COMPARED:
        assert run.data.metrics[key] == pytest.approx(expected[key], rel=1e-5, abs=1e-6), key


def test_resume_of_a_finished_run_is_refused(uninterrupted, capsys):
    uri, _ = uninterrupted
    run_id = the_run(uri).info.run_id
    assert main(["--resume", run_id, "--tracking-uri", uri]) == 2
    assert capsys.readouterr().err.strip() == f"--resume {run_id}: run {run_id} has already finished"
