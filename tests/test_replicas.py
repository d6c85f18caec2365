"""Replicas per peer through Ray: 2 peers x 2 replicas (4 workers, DDP within each peer) of
BatchNorm CNNs with bdkd and ltkd edges train like 2 peers x 1 replica on the same global batches
over a whole digits epoch (batch norm and ltkd's rebalancing take their statistics over the whole
batch; float32 rounding, parted at ReLU and bdkd near-ties, sets the tolerance). Replicas against an
independent one-process reference, to 1e-4, with their metrics: tests/test_gates_ray.py."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from conftest import empty_store

from cohort.run import main

mlflow = pytest.importorskip("mlflow")
pytestmark = pytest.mark.ray

# BatchNorm in every layer of both peers (cnn_medium teaching cnn_small), a bdkd edge (its per-sample
# switch between forward and reverse KL is a discontinuity) and an ltkd edge with rebalance (group
# masses averaged over the batch), over a whole digits epoch: batch 64, 23 steps, the last of 29
# split 15 / 14.
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
    "name": "replicas-bn",
    "seed": 4,
    "data": {"dataset": "digits", "batch_size": 64},
    "train": {"epochs": 1, "optimizer": {"lr": 0.05, "momentum": 0.9, "weight_decay": 0.0005},
              "check_batches_every": 4},
    "peers": {"teacher": {"model": "cnn_medium"}, "student": {"model": "cnn_small"}},
    "edges": [{"from": "teacher", "to": "student", "loss": "bdkd"},
              {"from": "student", "to": "teacher", "loss": "ltkd", "temperature": 2.0, "rebalance": True}],
}


def with_replicas(replicas: int, pair: dict = BATCH_NORM_PAIR) -> dict:
    peers = {name: {**peer, "replicas": replicas} for name, peer in pair["peers"].items()}
    return {**pair, "peers": peers}


def train(folder: Path, topology: dict) -> tuple[str, object]:
    uri = empty_store(folder / "mlflow.db")
    path = folder / "replicas.yaml"
    path.write_text(yaml.safe_dump(topology, sort_keys=False))
    assert main([str(path), "--tracking-uri", uri, "--storage", str(folder / "ray")]) == 0
    return uri, the_run(uri, topology["name"])


def the_run(uri: str, experiment: str):
    client = mlflow.tracking.MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert len(runs) == 1
    return runs[0]


def artifact(uri: str, run, path: str, folder: Path) -> Path:
    return Path(mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path=path, tracking_uri=uri,
                                                    dst_path=str(folder)))


def assert_same_weights(expected_weights: Path, weights: Path, atol: float) -> None:
    for peer in ("teacher", "student"):
        trained = torch.load(weights / f"{peer}.pt", weights_only=True)
        reference = torch.load(expected_weights / f"{peer}.pt", weights_only=True)
        assert trained.keys() == reference.keys()  # the peer's own names, not DDP's module.*
        for key, value in reference.items():
            # Batch norm's running statistics included: they are the whole batch's on every replica.
            torch.testing.assert_close(trained[key].double(), value.double(), rtol=0.0, atol=atol,
                                       msg=lambda text, name=f"{peer}.{key}": f"{name}: {text}")


def test_batch_norm_bdkd_and_ltkd_train_with_replicas_like_one(ray_cluster, tmp_path):
    one_folder = tmp_path / "one"
    one_folder.mkdir()
    uri, run = train(one_folder, with_replicas(1))
    expected = artifact(uri, run, "weights", one_folder / "artifacts")
    uri, run = train(tmp_path, with_replicas(2))
    assert run.data.metrics["cohort/batches_identical"] == 1.0
    weights = artifact(uri, run, "weights", tmp_path / "artifacts")
    for peer in ("teacher", "student"):  # the distance (with -s): 5.3e-3 and 1.1e-2 measured
        trained = torch.load(weights / f"{peer}.pt", weights_only=True)
        reference = torch.load(expected / f"{peer}.pt", weights_only=True)
        print(f"{peer}: largest weight difference "
              f"{max(float((trained[k].double() - v.double()).abs().max()) for k, v in reference.items()):.2e}")
    assert_same_weights(expected, weights, atol=3e-2)
