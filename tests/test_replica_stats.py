"""Batch statistics over a peer's replicas, in two gloo processes without Ray (this one and a spawned
one): with cohort.worker.syncbn the replicas' shards normalize, back-propagate and update running
statistics like one whole batch, and with cohort.worker.exchange.ReplicaBatch ltkd's rebalancing sees
the whole batch."""
from __future__ import annotations

import os
import pickle
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

from cohort.gates.switokd import switching_quantities
from cohort.losses import ltkd
from cohort.worker.exchange import ReplicaBatch
from cohort.worker.syncbn import (
    PeerSyncBatchNorm,
    batch_norm_sync_mode,
    sync_batch_norm,
)


def net() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                          nn.Linear(4 * 5 * 5, 6), nn.BatchNorm1d(6, momentum=None))
    with torch.no_grad():  # non-trivial affine parameters
        model[1].weight.uniform_(0.5, 1.5), model[1].bias.uniform_(-0.5, 0.5)
    return model


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return torch.randn(9, 2, 5, 5, generator=generator) * 3 + 1, torch.randn(9, 6, generator=generator)


def whole_batch(steps: int) -> tuple[dict, list[torch.Tensor]]:
    model = net()
    inputs, target = batch()
    outputs = []
    for _ in range(steps):
        model.zero_grad()
        output = model(inputs)
        ((output - target) ** 2).sum().backward()
        outputs.append(output.detach())
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    return {**model.state_dict(), **{f"grad.{k}": v for k, v in grads.items()}}, outputs


def replica(rank: int, store: str, steps: int) -> tuple:
    """One replica's shard trained ``steps`` times, and its ltkd losses and switokd quantities."""
    dist.init_process_group("gloo", store=dist.FileStore(store, 2), rank=rank, world_size=2,
                            timeout=timedelta(seconds=120))
    try:
        model = net()
        group = dist.new_group([0, 1])
        report = sync_batch_norm(model, group)
        # As a peer's replicas train: DDP (which refuses torch's SyncBatchNorm on CPU) averages the gradients.
        ddp = nn.parallel.DistributedDataParallel(model, process_group=group)
        inputs, target = batch()
        shard = slice(0, 5) if rank == 0 else slice(5, 9)  # uneven shards: 5 and 4 samples
        outputs = []
        for _ in range(steps):
            model.zero_grad()
            output = ddp(inputs[shard])
            ((output - target[shard]) ** 2).sum().backward()
            outputs.append(output.detach())
        # The whole batch's gradient of the summed loss: twice DDP's average over the 2 replicas.
        grads = {name: 2 * p.grad for name, p in model.named_parameters()}
        receiver, sender, groups = ltkd_batch()
        replicas = ReplicaBatch(dist.new_group([0, 1]))
        losses = ltkd(receiver[shard], sender[shard], groups, 2.0, batch=replicas)
        teacher, student, labels = gate_batch()
        gate = switching_quantities(teacher[shard], student[shard], labels[shard], replicas)
        return (rank, report.layers, report.mode, {**model.state_dict(), **{f"grad.{k}": v for k, v in grads.items()}},
                outputs, losses, gate)
    finally:
        dist.destroy_process_group()


def second_replica(store: str, steps: int, queue) -> None:
    """Rank 1, in a spawned process (rank 0 is the test's own: one fresh interpreter, not two)."""
    torch.set_num_threads(1)
    # Pickled here: a queue's tensors would travel as file descriptors, which vanish with this
    # process if it exits before the test reads them.
    queue.put(pickle.dumps(replica(1, store, steps)))
    queue.close()
    queue.join_thread()
    # Everything is sent: skip the interpreter's shutdown, which after torch takes half a CPU-second
    # (seconds on a busy machine) that the test would wait for in join().
    os._exit(0)


def ltkd_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(2)
    receiver, sender = torch.randn(2, 9, 7, generator=generator) * 3
    sender[5:, :3] += 6  # the shards' group masses differ: per-shard rebalancing would show
    return receiver, sender, torch.tensor([0, 0, 0, 1, 1, 2, 2])


def gate_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    teacher, student = torch.randn(2, 9, 7, generator=generator) * 3
    labels = torch.randint(0, 7, (9,), generator=generator)
    teacher[torch.arange(5), labels[:5]] += 8  # the teacher far ahead on the first shard only
    return teacher, student, labels


def test_two_replicas_normalize_and_rebalance_like_the_whole_batch(tmp_path):
    steps = 3
    context = mp.get_context("spawn")  # never fork: this process's torch has started OpenMP threads
    queue = context.Queue()
    store = str(tmp_path / "store")
    other = context.Process(target=second_replica, args=(store, steps, queue))
    other.start()
    try:
        results = [replica(0, store, steps), pickle.loads(queue.get(timeout=120))]
    finally:
        other.join(timeout=60)
        if other.is_alive():
            other.kill()
    assert other.exitcode == 0
    expected, expected_outputs = whole_batch(steps)
    receiver, sender, groups = ltkd_batch()
    whole_ltkd = ltkd(receiver, sender, groups, 2.0)
    whole_gate = switching_quantities(*gate_batch())
    for rank, layers, mode, state, outputs, losses, gate in results:
        # switokd's batch means: the whole batch's, on both replicas (so both decide alike).
        assert gate == pytest.approx(whole_gate, rel=1e-12)
        assert (layers, mode) == (2, "moments")
        assert state.keys() == expected.keys()  # a BatchNorm's names and buffers, unchanged
        for key, value in expected.items():
            torch.testing.assert_close(state[key].float(), value.float(), rtol=1e-5, atol=1e-5, msg=key)
        shard = slice(0, 5) if rank == 0 else slice(5, 9)
        for output, whole in zip(outputs, expected_outputs):
            torch.testing.assert_close(output, whole[shard], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(losses, whole_ltkd[shard], rtol=1e-5, atol=1e-6)
    # Without the replicas' reduction the first shard's rebalancing differs:
    assert not torch.allclose(ltkd(receiver[:5], sender[:5], groups, 2.0), whole_ltkd[:5], atol=1e-3)
    assert switching_quantities(*(part[:5] for part in gate_batch())) != pytest.approx(whole_gate, rel=1e-3)


def test_per_shard_statistics_differ_from_the_whole_batch():
    """What the synchronization fixes: a shard's own statistics are not the batch's."""
    model, (inputs, _) = net().train(), batch()
    torch.testing.assert_close(model(inputs)[:5], net().train()(inputs)[:5])
    assert not torch.allclose(model(inputs)[:5], net().train()(inputs[:5]), atol=1e-3)


def test_sync_mode_by_device():
    assert batch_norm_sync_mode("cuda", host_copies=False) == "torch"
    assert batch_norm_sync_mode("cuda", host_copies=True) == "moments"
    assert batch_norm_sync_mode("cpu", host_copies=False) == "moments"


def test_a_layer_without_a_group_or_in_eval_is_plain_batch_norm():
    layer = PeerSyncBatchNorm(3)
    reference = nn.BatchNorm1d(3)
    inputs = torch.randn(8, 3)
    torch.testing.assert_close(layer.eval()(inputs), reference.eval()(inputs))


def test_conversion_keeps_weights_and_requires_grad():
    model = net()
    model[1].weight.requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = sync_batch_norm(model, group=object())
    assert report.layers == 2 and isinstance(model[1], PeerSyncBatchNorm) and isinstance(model[5], PeerSyncBatchNorm)
    assert not model[1].weight.requires_grad and model[5].weight.requires_grad
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, before[key])
    assert sync_batch_norm(model, group=object()).layers == 0  # already synchronized


def test_conversion_keeps_the_dtype():
    # A float64 network stays float64: its batch norm's parameters and statistics too (they were
    # made float32, which rounded every update of a float64 run with replicas to float32).
    model = net().double()
    sync_batch_norm(model, group=object())
    assert {value.dtype for key, value in model.state_dict().items() if "num_batches" not in key} == {torch.float64}
    assert model[1].num_batches_tracked.dtype == torch.long
