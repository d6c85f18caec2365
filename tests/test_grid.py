"""The worker grid, the shard arithmetic, the exchange backend choice, the cluster checks for GPUs
and placement, and mixed precision: pure functions, no Ray."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cohort.config.errors import CohortError
from cohort.datasets import batch_indices, load_dataset
from cohort.driver.launch import fit_cluster, make_plan
from cohort.losses.combine import peer_objective
from cohort.run import main
from cohort.topology import DataConfig, load_topology, topology_from_dict
from cohort.worker.grid import (
    exchange_backend,
    exchange_group_ranks,
    peer_group_ranks,
    shard_bounds,
    shard_loss_scale,
    slot_of,
    whole_batch_gradient_scale,
    whole_batch_rows,
    worker_grid,
)

ROOT = Path(__file__).resolve().parents[1]


def test_grid_ranks_run_shard_by_shard():
    grid = worker_grid(["a", "b", "c"], 2)
    assert [(s.rank, s.peer, s.shard) for s in grid] == [
        (0, "a", 0), (1, "b", 0), (2, "c", 0), (3, "a", 1), (4, "b", 1), (5, "c", 1)]
    assert all(slot_of(s.rank, ["a", "b", "c"]) == s for s in grid)
    assert exchange_group_ranks(3, 2) == [[0, 1, 2], [3, 4, 5]]  # one worker of every peer
    assert peer_group_ranks(3, 2) == [[0, 3], [1, 4], [2, 5]]  # a peer's replicas
    # One replica: the ranks, and the one exchange group, of a cohort without replicas.
    assert [(s.rank, s.peer) for s in worker_grid(["a", "b"], 1)] == [(0, "a"), (1, "b")]
    assert exchange_group_ranks(2, 1) == [[0, 1]]


@pytest.mark.parametrize("size,shards", [(13, 2), (16, 2), (10, 3), (7, 4), (5, 5), (64, 1)])
def test_shards_cover_a_batch_like_tensor_split(size, shards):
    parts = [shard_bounds(size, shards, s) for s in range(shards)]
    expected = torch.arange(size).tensor_split(shards)
    assert [torch.arange(size)[a:b].tolist() for a, b in parts] == [t.tolist() for t in expected]


def test_final_batch_smaller_than_the_shard_count_is_folded():
    order = torch.arange(21)
    assert [len(b) for b in batch_indices(order, 10)] == [10, 11]
    assert [len(b) for b in batch_indices(torch.arange(22), 10)] == [10, 10, 2]
    assert [len(b) for b in batch_indices(torch.arange(22), 10, shards=3)] == [10, 12]
    assert [len(b) for b in batch_indices(torch.arange(23), 10, shards=3)] == [10, 10, 3]


def test_averaged_shard_gradients_equal_the_whole_batch_gradient():
    """What DDP does with the scaled shard losses (an average over replicas) is the gradient of
    the whole batch's loss, with uneven shards and distillation edges."""
    torch.manual_seed(0)
    topology = topology_from_dict({"name": "g", "peers": {"a": {"model": "mlp"}, "b": {"model": "mlp_tiny"}},
                                   "edges": [{"from": "b", "to": "a", "loss": "bdkd"},
                                             {"from": "b", "to": "a", "loss": "dkd", "reduce": "sum"}]})
    edges = topology.incoming_edges("a")
    # float64, so that the comparison shows the arithmetic, not float32's rounding.
    net = torch.nn.Linear(64, 10).double()
    inputs, labels = torch.randn(13, 64, dtype=torch.float64), torch.randint(0, 10, (13,))
    sender = torch.randn(13, 10, dtype=torch.float64)

    def gradient(rows: slice, scale: float) -> list[torch.Tensor]:
        net.zero_grad()
        loss, _ = peer_objective(net(inputs[rows]), labels[rows], edges, {"b": sender[rows]}, 0.7, 1, None)
        (loss * scale).backward()
        return [p.grad.clone() for p in net.parameters()]

    whole = gradient(slice(0, 13), 1.0)
    shards = 3
    per_shard = []
    for shard in range(shards):
        start, stop = shard_bounds(13, shards, shard)
        per_shard.append(gradient(slice(start, stop), shard_loss_scale(stop - start, 13, shards)))
    for index, expected in enumerate(whole):
        averaged = torch.stack([grads[index] for grads in per_shard]).mean(dim=0)
        torch.testing.assert_close(averaged, expected, rtol=1e-10, atol=1e-12)
    # Without the scale (each shard's plain mean), uneven shards would weigh samples unequally.
    plain = [gradient(slice(*shard_bounds(13, shards, s)), 1.0) for s in range(shards)]
    assert not torch.allclose(torch.stack([g[0] for g in plain]).mean(dim=0), whole[0], rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------------- the exchange backend


def test_backend_for_workers_with_their_own_gpus():
    backend = exchange_backend(use_gpu=True, gpus_per_worker=1.0)
    assert (backend.name, backend.host_copies) == ("nccl", False)


@pytest.mark.parametrize("fraction", [0.33, 0.5, 0.999])
def test_backend_for_workers_sharing_a_gpu(fraction):
    backend = exchange_backend(use_gpu=True, gpus_per_worker=fraction)
    assert (backend.name, backend.host_copies) == ("gloo", True)
    assert "NCCL refuses" in backend.reason


def test_backend_on_cpus():
    backend = exchange_backend(use_gpu=False, gpus_per_worker=0.0)
    assert (backend.name, backend.host_copies) == ("gloo", False)


# --------------------------------------------------------------------------- cluster checks


def plan_of(resources: dict, replicas: int = 1):
    topology = topology_from_dict({"name": "c", "resources": resources,
                                   "peers": {name: {"model": "mlp", "replicas": replicas} for name in "abc"}})
    return make_plan(topology, "sqlite:///unused.db", 2, download=False)


def test_fractional_gpus_fit_where_whole_ones_would_not():
    plan = fit_cluster(plan_of({"use_gpu": True, "gpus_per_peer": 0.33}), {"CPU": 8, "GPU": 1})
    assert plan.cpus_per_peer == 1
    with pytest.raises(CohortError, match=r"resources.use_gpu: the cohort needs 3 GPUs \(3 peers, one each\), "
                                          r"the Ray cluster has 1"):
        fit_cluster(plan_of({"use_gpu": True}), {"CPU": 8, "GPU": 1})


def test_replicas_multiply_the_workers_a_cluster_must_hold():
    plan = plan_of({"use_gpu": True, "gpus_per_peer": 0.5}, replicas=2)
    with pytest.raises(CohortError, match=r"resources.gpus_per_peer: the cohort needs 3 GPUs \(3 peers x 2 replicas, "
                                          r"0.5 each\), the Ray cluster has 2"):
        fit_cluster(plan, {"CPU": 8, "GPU": 2})
    with pytest.raises(CohortError, match=r"the cohort needs 6 CPUs \(3 peers x 2 replicas x 1\), the Ray cluster has 4"):
        fit_cluster(plan_of({"cpus_per_peer": 1}, replicas=2), {"CPU": 4})
    assert fit_cluster(plan_of({}, replicas=2), {"CPU": 2}).cpus_per_peer == 0.33  # 6 workers share 2 CPUs


def test_accelerator_type_and_node_labels_must_exist_in_the_cluster():
    plan = plan_of({"use_gpu": True, "accelerator_type": "A100", "node_labels": {"zone": "a"}})
    cluster = {"CPU": 8, "GPU": 4, "accelerator_type:T4": 1}
    with pytest.raises(CohortError, match=r"resources.accelerator_type: no 'A100' GPUs in the Ray cluster \(it has: T4\)"):
        fit_cluster(plan, cluster)
    cluster["accelerator_type:A100"] = 1
    with pytest.raises(CohortError, match=r"resources.node_labels: no node of the Ray cluster has the labels"):
        fit_cluster(plan, cluster, [{"zone": "b"}, {}])
    assert fit_cluster(plan, cluster, [{"zone": "b"}, {"zone": "a", "ray.io/node-id": "x"}]).cpus_per_peer == 1


def test_scaling_config_carries_the_grid_the_gpus_and_the_placement(tmp_path):
    from cohort.driver.launch import make_trainer

    topology = topology_from_dict({"name": "s", "peers": {n: {"model": "mlp", "replicas": 2} for n in "ab"},
                                   "resources": {"use_gpu": True, "gpus_per_peer": 0.25, "accelerator_type": "L4",
                                                 "node_labels": {"pool": "gpu"}}})
    trainer = make_trainer(topology, 0.5, 1, str(tmp_path), "s")
    scaling = trainer.scaling_config
    assert scaling.num_workers == 4
    assert scaling.resources_per_worker == {"CPU": 0.5, "GPU": 0.25}
    assert scaling.accelerator_type == "L4" and scaling.label_selector == {"pool": "gpu"}
    assert trainer.backend_config.backend == "gloo"  # workers share GPUs
    own = topology_from_dict({**topology.to_dict(), "resources": {"use_gpu": True}})
    assert make_trainer(own, 0.5, 1, str(tmp_path), "s").backend_config.backend == "nccl"


# --------------------------------------------------------------------------- dry run


def test_dry_run_shows_the_grid_and_the_backend(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    assert main(["topologies/replicas_gpu_example.yaml", "--dry-run"]) == 0
    out = capsys.readouterr().out
    topology = load_topology(ROOT / "topologies/replicas_gpu_example.yaml")
    assert topology.replicas == 2 and topology.resources.use_gpu
    assert "exchange: gloo on host copies (workers share GPUs" in out
    assert "worker grid: 2 replicas per peer" in out
    for slot in worker_grid(topology.peer_names, 2):
        assert f"    {slot.rank:<6}{slot.peer:<14}{slot.shard:<15}" in out
    assert "  batch norm: teacher: synchronized over its 2 replicas; student: synchronized over its 2 replicas" in out
    assert main(["topologies/replicas_gpu_example.yaml", "--dry-run", "--set", "peers.student.sync_batchnorm=false"]) == 0
    assert "student: per-shard statistics (sync_batchnorm: false)" in capsys.readouterr().out
    assert main(["topologies/replicas_gpu_example.yaml", "--dry-run", "--set", "resources.gpus_per_peer=1"]) == 0
    assert "exchange: nccl (every worker has a GPU of its own)" in capsys.readouterr().out


# --------------------------------------------------------------------------- precision


class OnePeerExchange:
    """The exchange of a cohort of one, recording what went through it."""

    def __init__(self):
        self.dtypes = []

    def __call__(self, logits):
        self.dtypes.append(logits.dtype)
        return {"solo": logits}


def test_bf16_trains_on_the_cpu_with_fp32_logits():
    from cohort.worker.guard import BatchGuard
    from cohort.worker.loop import PeerStep, train_epoch
    from cohort.worker.peer import build_optimizer, build_peer

    topology = topology_from_dict({"name": "p", "data": {"batch_size": 128}, "train": {"epochs": 1, "precision": "bf16"},
                                   "peers": {"solo": {"model": "cnn_small"}}})
    data = load_dataset(DataConfig())
    model = build_peer(topology, "solo", data.info)
    before = [p.detach().clone() for p in model.parameters()]
    optimizer, _ = build_optimizer(model, topology.optimizer_for("solo"), topology)
    exchange = OnePeerExchange()
    guard = BatchGuard("solo", 0, 1, every=10, gather=lambda record: [record])
    stats = train_epoch(PeerStep(topology=topology, peer="solo", model=model, optimizer=optimizer, exchange=exchange,
                                  guard=guard), data, 1)
    assert guard.step == stats.steps == 12  # 1,437 digits in batches of 128
    assert set(exchange.dtypes) == {torch.float32}
    assert torch.isfinite(torch.tensor(stats.summary()["train_loss"]))
    assert stats.summary()["train_acc"] > 0.3  # it learns: chance is 0.1
    assert all(p.dtype == torch.float32 for p in model.parameters())  # weights stay fp32
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    # The forward really ran in bf16: its logits differ from fp32's in the low bits.
    from cohort.worker.precision import autocast

    inputs = data.test_x[:32]
    with torch.no_grad(), autocast("bf16", torch.device("cpu")):
        low = model.eval()(inputs)
    assert low.dtype == torch.bfloat16
    assert not torch.equal(low.float(), model(inputs))
    torch.testing.assert_close(low.float(), model(inputs), rtol=0.05, atol=0.1)


@pytest.mark.parametrize("size,shards", [(13, 2), (14, 3), (60, 2), (7, 4)])
def test_whole_batch_terms_get_the_replica_count_in_all(size, shards):
    """A term over the whole batch (MCL's) is the one-process term on every replica: with the shard's
    scale and its own, DDP's average of the replicas' gradients is its gradient (M/M)."""
    for shard in range(shards):
        start, stop = shard_bounds(size, shards, shard)
        n = stop - start
        assert shard_loss_scale(n, size, shards) * whole_batch_gradient_scale(n, size) == pytest.approx(shards)


def test_the_whole_batch_rows_of_each_peer_come_from_every_shard_trimmed():
    bounds = [shard_bounds(5, 2, shard) for shard in range(2)]  # 3 and 2 rows, padded to 3
    gathered = [torch.full((3, 1), float(10 * rank)) + torch.arange(3.0)[:, None] for rank in range(4)]
    a, b = whole_batch_rows(gathered, 2, bounds)  # ranks: (shard 0: a, b), (shard 1: a, b)
    assert a.flatten().tolist() == [0, 1, 2, 20, 21] and b.flatten().tolist() == [10, 11, 12, 30, 31]
