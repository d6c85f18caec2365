"""SwitOKD through Ray equals a one-process loop that applies the spec's switching rule step by
step (docs/gates.md), written out here from the spec's formulas, not with cohort.gates."""
from __future__ import annotations

import functools
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from conftest import empty_store

from cohort.datasets import load_dataset
from cohort.run import main
from cohort.topology import DataConfig, topology_from_dict
from cohort.worker.peer import build_peer

mlflow = pytest.importorskip("mlflow")

SWITOKD = {
    "name": "switokd-equivalence",
    "seed": 5,
    "data": {"dataset": "digits", "batch_size": 128},
    "train": {"epochs": 3, "optimizer": {"name": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 0.0005},
              "schedule": {"name": "multistep", "milestones": [2], "gamma": 0.1}},
    "peers": {"teacher": {"model": "cnn_small"}, "student": {"model": "mlp_tiny", "optimizer": {"lr": 0.05}}},
    "edges": [{"from": "teacher", "to": "student", "loss": "kd", "temperature": 1.0},
              {"from": "student", "to": "teacher", "loss": "kd", "temperature": 1.0}],
    "gates": [{"rule": "switokd", "teacher": "teacher", "student": "student"}],
}


def kl(sender: torch.Tensor, receiver: torch.Tensor) -> torch.Tensor:
    """KL(p_sender ‖ p_receiver) at temperature 1, batch mean."""
    return F.kl_div(receiver.log_softmax(dim=1), sender.detach().log_softmax(dim=1), log_target=True,
                    reduction="batchmean")


def expert_mode(z_t: torch.Tensor, z_s: torch.Tensor, y: torch.Tensor) -> bool:
    """The spec's rule: G > δ and d_t < d_s, from batch means of L1 distances."""
    p_t, p_s = z_t.detach().double().softmax(dim=1), z_s.detach().double().softmax(dim=1)
    onehot = F.one_hot(y, p_t.shape[1]).double()
    d_t = float((p_t - onehot).abs().sum(dim=1).mean())
    d_s = float((p_s - onehot).abs().sum(dim=1).mean())
    gap = float((p_s - p_t).abs().sum(dim=1).mean())
    if d_t + d_s == 0:
        return False
    epsilon = math.exp(-d_t / (d_t + d_s))
    return gap > d_s - epsilon * d_t and d_t < d_s


def reference_training(config: dict) -> tuple[dict[str, dict[str, torch.Tensor]], list[float]]:
    """Both networks trained in one process; the teacher's optimizer does not step at all in expert mode."""
    torch.set_num_threads(1)
    topology = topology_from_dict(config)
    data = load_dataset(DataConfig())
    models = {peer: build_peer(topology, peer, data.info) for peer in ("teacher", "student")}
    optimizers = {peer: torch.optim.SGD(models[peer].parameters(), lr={"teacher": 0.1, "student": 0.05}[peer],
                                        momentum=0.9, weight_decay=0.0005) for peer in models}
    schedulers = {peer: torch.optim.lr_scheduler.MultiStepLR(optimizers[peer], [2], 0.1) for peer in models}
    paused = []
    for epoch in (1, 2, 3):
        for model in models.values():
            model.train()
        experts = steps = 0
        for inputs, labels in data.train_batches(128, 5, epoch):
            z_t, z_s = models["teacher"](inputs), models["student"](inputs)
            expert = expert_mode(z_t, z_s, labels)
            objective = {"student": F.cross_entropy(z_s, labels) + kl(z_t, z_s)}
            if not expert:
                objective["teacher"] = F.cross_entropy(z_t, labels) + kl(z_s, z_t)
            for peer, loss in objective.items():
                optimizers[peer].zero_grad()
                loss.backward()
                optimizers[peer].step()
            experts, steps = experts + expert, steps + 1
        paused.append(experts / steps)
        for scheduler in schedulers.values():
            scheduler.step()
    return {peer: model.state_dict() for peer, model in models.items()}, paused


@functools.lru_cache(maxsize=1)
def reference() -> tuple[dict[str, dict[str, torch.Tensor]], list[float]]:
    return reference_training(SWITOKD)


def run_through_ray(tmp_path: Path, config: dict):
    uri = empty_store(tmp_path / "mlflow.db")
    path = tmp_path / "switokd.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    assert main([str(path), "--tracking-uri", uri, "--storage", str(tmp_path / "ray")]) == 0
    client = mlflow.tracking.MlflowClient(uri)
    return uri, client, client.search_runs([client.get_experiment_by_name(config["name"]).experiment_id])[0]


def assert_trained_like(expected: dict[str, dict[str, torch.Tensor]], uri: str, run, folder: Path, rtol: float,
                        atol: float) -> None:
    weights = Path(mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="weights",
                                                       tracking_uri=uri, dst_path=str(folder / "w")))
    for peer, state in expected.items():
        trained = torch.load(weights / f"{peer}.pt", weights_only=True)
        for key, value in state.items():
            torch.testing.assert_close(trained[key], value, rtol=rtol, atol=atol, msg=f"{peer}.{key}")


@pytest.mark.ray
def test_switokd_through_ray_equals_the_spec_applied_step_by_step(ray_cluster, tmp_path):
    uri, client, run = run_through_ray(tmp_path, SWITOKD)
    expected, paused = reference()
    # Both modes occur: some epochs all learning, some with the teacher paused in most steps.
    assert paused[0] == 0.0 and max(paused) > 0.5, paused
    history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "teacher/paused")}
    assert [history[epoch] for epoch in (1, 2, 3)] == pytest.approx(paused)
    experts = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "teacher/expert_student")}
    assert [experts[epoch] for epoch in (1, 2, 3)] == pytest.approx(paused)
    assert run.data.metrics["student/paused"] == 0.0
    assert_trained_like(expected, uri, run, tmp_path, rtol=1e-5, atol=1e-6)


@pytest.mark.ray
def test_switokd_with_two_replicas_per_peer_equals_the_spec(ray_cluster, tmp_path):
    """2 peers x 2 replicas (DDP within each peer, shards of 64): the gate decides from the whole
    batch's means on every replica, so the teacher pauses on the reference's steps. Replicas
    deciding from their own shards pause on others (checked: the paused shares then differ)."""
    peers = {name: {**peer, "replicas": 2} for name, peer in SWITOKD["peers"].items()}
    uri, client, run = run_through_ray(tmp_path, {**SWITOKD, "name": "switokd-replicas", "peers": peers})
    expected, paused = reference()
    history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "teacher/paused")}
    assert [history[epoch] for epoch in (1, 2, 3)] == pytest.approx(paused)
    # Two averaged shards against one batch: float rounding, as in tests/test_replicas.py.
    assert_trained_like(expected, uri, run, tmp_path, rtol=1e-4, atol=1e-4)
