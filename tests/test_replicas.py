"""Replicas per peer through Ray: 2 peers x 2 replicas (4 workers, DDP within each peer) train
like 2 peers x 1 replica on the same global batches: MLPs, and BatchNorm CNNs with bdkd and ltkd
edges over a whole digits epoch (batch norm and ltkd's rebalancing take their statistics over the
whole batch; float32 rounding, parted at ReLU and bdkd near-ties, sets the tolerance)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import empty_store

from cohort.run import main

mlflow = pytest.importorskip("mlflow")
pytestmark = pytest.mark.ray

# Batch 100 leaves a last batch of 37 (1,437 digits), split 19 / 18: uneven shards.
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


# BatchNorm in every layer of both peers (cnn_medium teaching cnn_small), a bdkd edge (its per-sample
# switch between forward and reverse KL is a discontinuity) and an ltkd edge with rebalance (group
# masses averaged over the batch), over a whole digits epoch: batch 64, 23 steps, the last of 29
# split 15 / 14. Its own experiment name, so that the runs of the two pairs are told apart.
#
# In float64 (bench/replica_workers.py: the worker's code over gloo) replicas train like one to
# 5e-16. In float32 the sums of one batch and of two shards round differently (~1e-7); the ReLUs'
# and max-pooling's near-ties turn that into discrete changes of a gradient (the student's weights
# jump from 3e-8 to 4e-5 apart at step 3, with no bdkd switch changed), SGD carries them on, and
# from step 14 bdkd's switch differs for 1 or 2 samples of a step (7 of 1,437 in the epoch). After
# the epoch the weights are up to 7e-3 apart, running statistics 1.1e-2 (measured, 2-core VM, no
# GPU; the same under Ray as in bench/replica_workers.py): hence atol 3e-2 on the weights. With
# per-shard batch norm (sync_batchnorm: false, a real difference) they are 1.1e-1 (teacher) and
# 8e-2 (student) apart, and this test fails (seen). The metrics of two such float32 runs differ by a few points of accuracy (the trained
# networks are different ones, near each other): they are not compared here.
BATCH_NORM_PAIR = {
    **PAIR, "name": "replicas-bn",
    "data": {"dataset": "digits", "batch_size": 64},
    "train": {**PAIR["train"], "epochs": 1},
    "peers": {"teacher": {"model": "cnn_medium"}, "student": {"model": "cnn_small"}},
    "edges": [{"from": "teacher", "to": "student", "loss": "bdkd"},
              {"from": "student", "to": "teacher", "loss": "ltkd", "temperature": 2.0, "rebalance": True}],
}


def with_replicas(replicas: int, pair: dict = PAIR) -> dict:
    peers = {name: {**peer, "replicas": replicas} for name, peer in pair["peers"].items()}
    return {**pair, "peers": peers}


def train(folder: Path, topology: dict) -> tuple[str, object]:
    uri = empty_store(folder / "mlflow.db")
    path = folder / "replicas.yaml"
    path.write_text(yaml.safe_dump(topology, sort_keys=False))
    assert main([str(path), "--tracking-uri", uri, "--storage", str(folder / "ray")]) == 0
    return uri, the_run(uri, topology["name"])


def the_run(uri: str, experiment: str = "replicas"):
    client = mlflow.tracking.MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
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


def assert_same_training(expected, run, weights: Path, rtol: float = 1e-4, atol: float = 1e-5,
                         metrics: tuple[str, ...] = COMPARED) -> None:
    _, expected_run, expected_weights = expected
    for peer in ("teacher", "student"):
        trained = torch.load(weights / f"{peer}.pt", weights_only=True)
        reference = torch.load(expected_weights / f"{peer}.pt", weights_only=True)
        assert trained.keys() == reference.keys()  # the peer's own names, not DDP's module.*
        for key, value in reference.items():
            # Batch norm's running statistics included: they are the whole batch's on every replica.
            torch.testing.assert_close(trained[key].double(), value.double(), rtol=rtol, atol=atol,
                                       msg=lambda text, name=f"{peer}.{key}": f"{name}: {text}")
    for key in metrics:
        assert run.data.metrics[key] == pytest.approx(expected_run.data.metrics[key], rel=rtol, abs=atol), key
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


def test_batch_norm_bdkd_and_ltkd_train_with_replicas_like_one(ray_cluster, tmp_path):
    one_folder = tmp_path / "one"
    one_folder.mkdir()
    uri, run = train(one_folder, with_replicas(1, BATCH_NORM_PAIR))
    expected = (uri, run, artifact(uri, run, "weights", one_folder / "artifacts"))
    uri, run = train(tmp_path, with_replicas(2, BATCH_NORM_PAIR))
    weights = artifact(uri, run, "weights", tmp_path / "artifacts")
    for peer in ("teacher", "student"):  # the distance (with -s): 5.3e-3 and 1.1e-2 measured
        trained = torch.load(weights / f"{peer}.pt", weights_only=True)
        reference = torch.load(expected[2] / f"{peer}.pt", weights_only=True)
        print(f"{peer}: largest weight difference "
              f"{max(float((trained[k].double() - v.double()).abs().max()) for k, v in reference.items()):.2e}")
    assert_same_training(expected, run, weights, rtol=0.0, atol=3e-2, metrics=())
