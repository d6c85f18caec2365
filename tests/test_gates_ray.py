"""SwitOKD through Ray, 2 peers x 2 replicas, equals a one-process loop that applies the spec's
switching rule step by step (docs/gates.md), written out here from the spec's formulas, not with
cohort.gates. It is also the suite's check that replicas train, are evaluated and are reported like
one worker per peer against an independent reference (tests/test_replicas.py compares batch-norm
replicas with one worker)."""
from __future__ import annotations

import json
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


def reference_training(config: dict) -> tuple[dict[str, dict[str, torch.Tensor]], list[float], dict[str, float]]:
    """Both networks trained in one process; the teacher's optimizer does not step at all in expert
    mode. Also each epoch's share of paused steps and the last epoch's training accuracy per peer
    (its logits before each step, as a worker counts them)."""
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
        experts = steps = seen = 0
        correct = dict.fromkeys(models, 0)
        for inputs, labels in data.train_batches(128, 5, epoch):
            z_t, z_s = models["teacher"](inputs), models["student"](inputs)
            for peer, logits in (("teacher", z_t), ("student", z_s)):
                correct[peer] += int((logits.argmax(dim=1) == labels).sum())
            seen += len(labels)
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
    return ({peer: model.state_dict() for peer, model in models.items()}, paused,
            {peer: count / seen for peer, count in correct.items()})


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


def metrics_on_the_test_split(states: dict[str, dict[str, torch.Tensor]]) -> dict[str, float]:
    """Top-1 and NLL of the reference's trained networks, and their ensemble's top-1, on the test split."""
    data = load_dataset(DataConfig())
    topology = topology_from_dict(SWITOKD)
    metrics, probabilities = {}, []
    with torch.no_grad():
        for peer, state in states.items():
            model = build_peer(topology, peer, data.info)
            model.load_state_dict(state)
            logits = model.eval()(data.test_x)
            metrics[f"{peer}/acc"] = (logits.argmax(dim=1) == data.test_y).float().mean().item()
            metrics[f"{peer}/nll"] = F.cross_entropy(logits, data.test_y).item()
            probabilities.append(logits.softmax(dim=1))
    metrics["ensemble/acc"] = (torch.stack(probabilities).mean(dim=0).argmax(dim=1) == data.test_y).float().mean().item()
    return metrics


@pytest.mark.ray
def test_switokd_with_two_replicas_per_peer_equals_the_spec(ray_cluster, tmp_path, capsys):
    """2 peers x 2 replicas (DDP within each peer, shards of 64): the gate decides from the whole
    batch's means on every replica, so the teacher pauses on the reference's steps. Replicas
    deciding from their own shards pause on others (checked: the paused shares then differ). The
    replicas' weights, their test metrics (each replica evaluates a shard) and their training
    accuracy (counted over the shards) are the one process's."""
    peers = {name: {**peer, "replicas": 2} for name, peer in SWITOKD["peers"].items()}
    uri, client, run = run_through_ray(tmp_path, {**SWITOKD, "name": "switokd-replicas", "peers": peers})
    out = capsys.readouterr().out
    assert "4 Ray Train workers" in out and "worker grid: 2 replicas per peer" in out
    expected, paused, train_acc = reference_training(SWITOKD)
    # Both modes occur: some epochs all learning, some with the teacher paused in most steps.
    assert paused[0] == 0.0 and max(paused) > 0.5, paused
    for key in ("teacher/paused", "teacher/expert_student"):  # once per epoch, whatever the number of workers
        history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
        assert history == [(1, pytest.approx(paused[0])), (2, pytest.approx(paused[1])), (3, pytest.approx(paused[2]))]
    assert run.data.metrics["student/paused"] == 0.0
    # Two averaged shards against one batch: float rounding, as in tests/test_replicas.py.
    assert_trained_like(expected, uri, run, tmp_path, rtol=1e-4, atol=1e-4)
    for key, value in metrics_on_the_test_split(expected).items():
        assert run.data.metrics[key] == pytest.approx(value, rel=1e-4, abs=1e-4), key
    for peer, value in train_acc.items():
        assert run.data.metrics[f"{peer}/train_acc"] == pytest.approx(value, abs=1e-9), peer
    assert run.data.metrics["cohort/batches_identical"] == 1.0
    workers = json.loads(Path(mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="workers.json",
                                                                  tracking_uri=uri, dst_path=str(tmp_path))).read_text())
    assert [(w["rank"], w["peer"], w["replica"]) for w in workers] == [
        (0, "teacher", 0), (1, "student", 0), (2, "teacher", 1), (3, "student", 1)]
