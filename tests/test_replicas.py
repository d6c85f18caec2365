"""Replicas per peer through Ray: 2 peers x 2 replicas (4 workers, DDP within each peer) train
like 2 peers x 1 replica on the same global batches."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from cohort.run import main

mlflow = pytest.importorskip("mlflow")

# MLPs only: they have no BatchNorm, whose batch statistics would differ between a shard and the
# whole batch. Batch 100 leaves a last batch of 37 (1,437 digits), split 19 / 18: uneven shards.
# Few steps (30): float rounding differs between one batch and two averaged shards, and many
# SGD steps would amplify it beyond a float tolerance.
PAIR = {
    "name": "replicas",
    "seed": 4,
    "data": {"dataset": "digits", "batch_size": 100},
    "train": {"epochs": 2, "optimizer": {"lr": 0.05, "momentum": 0.9, "weight_decay": 0.0005},
              "check_batches_every": 4},
    "peers": {"teacher": {"model": "mlp"}, "student": {"model": "mlp_tiny", "optimizer": {"name": "adam", "lr": 0.003}}},
    "edges": [{"from": "teacher", "to": "student", "loss": "bdkd"},
              {"from": "student", "to": "teacher", "loss": "kd", "temperature": 2.0}],
}
COMPARED = ("teacher/acc", "teacher/nll", "teacher/train_loss", "student/acc", "student/ece", "student/train_acc",
            "ensemble/brier")


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    yield ray
    ray.shutdown()


def with_replicas(replicas: int) -> dict:
    peers = {name: {**peer, "replicas": replicas} for name, peer in PAIR["peers"].items()}
    return {**PAIR, "peers": peers}


def train(folder: Path, topology: dict) -> tuple[str, object]:
    uri = f"sqlite:///{folder}/mlflow.db"
    path = folder / "replicas.yaml"
    path.write_text(yaml.safe_dump(topology, sort_keys=False))
    assert main([str(path), "--tracking-uri", uri, "--storage", str(folder / "ray")]) == 0
    return uri, the_run(uri)


def the_run(uri: str):
    client = mlflow.tracking.MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("replicas").experiment_id])
    assert len(runs) == 1
    return runs[0]


def artifact(uri: str, run, path: str, folder: Path) -> Path:
    return Path(mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path=path, tracking_uri=uri,
                                                    dst_path=str(folder)))


@pytest.fixture(scope="module")
def one_replica(ray_cluster, tmp_path_factory):
    folder = tmp_path_factory.mktemp("one")
    uri, run = train(folder, with_replicas(1))
    return uri, run, artifact(uri, run, "weights", folder / "artifacts")


def assert_same_training(expected, run, weights: Path) -> None:
    _, expected_run, expected_weights = expected
    for peer in ("teacher", "student"):
        trained = torch.load(weights / f"{peer}.pt", weights_only=True)
        reference = torch.load(expected_weights / f"{peer}.pt", weights_only=True)
        assert trained.keys() == reference.keys()  # the peer's own names, not DDP's module.*
        for key, value in reference.items():
            torch.testing.assert_close(trained[key], value, rtol=1e-4, atol=1e-5, msg=f"{peer}.{key}")
    for key in COMPARED:
        assert run.data.metrics[key] == pytest.approx(expected_run.data.metrics[key], rel=1e-4, abs=1e-5), key
    assert run.data.metrics["cohort/batches_identical"] == 1.0


def test_two_replicas_per_peer_train_like_one(one_replica, tmp_path, capsys):
    uri, run = train(tmp_path, with_replicas(2))
    out = capsys.readouterr().out
    assert "4 Ray Train workers" in out and "worker grid: 2 replicas per peer" in out
    assert_same_training(one_replica, run, artifact(uri, run, "weights", tmp_path / "artifacts"))
    # Every peer's metrics once per epoch, whatever the number of its workers.
    history = mlflow.tracking.MlflowClient(uri).get_metric_history(run.info.run_id, "student/acc")
    assert [metric.step for metric in history] == [1, 2]
    workers = json.loads(artifact(uri, run, "workers.json", tmp_path / "w").read_text())
    assert [(w["rank"], w["peer"], w["replica"]) for w in workers] == [
        (0, "teacher", 0), (1, "student", 0), (2, "teacher", 1), (3, "student", 1)]
