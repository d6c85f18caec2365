"""The worker grid: which Ray Train rank trains which peer on which data shard, and how they talk.

With ``replicas: M`` every peer trains on M workers. Each global batch is split into M shards;
for each shard there is one worker of every peer. Ranks run shard by shard,
``rank = shard * num_peers + peer_index``, so ranks 0..N-1 are shard 0 and M = 1 keeps the ranks
of a cohort without replicas. Logits are exchanged within a shard (its *exchange group*);
gradients are averaged within a peer (its *peer group*, M workers). MCL's embeddings span the
whole batch: a cohort with them gathers each step over every worker (``whole_batch_rows``).

Pure functions only: the process groups themselves are created in ``cohort.worker.exchange``.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class WorkerSlot:
    rank: int
    peer: str
    peer_index: int
    shard: int  # also the peer's replica number


def worker_grid(peer_names: list[str], replicas: int) -> list[WorkerSlot]:
    """Every worker's slot, in rank order."""
    return [WorkerSlot(shard * len(peer_names) + index, peer, index, shard)
            for shard in range(replicas) for index, peer in enumerate(peer_names)]


def slot_of(rank: int, peer_names: list[str]) -> WorkerSlot:
    shard, index = divmod(rank, len(peer_names))
    return WorkerSlot(rank, peer_names[index], index, shard)


def exchange_group_ranks(num_peers: int, replicas: int) -> list[list[int]]:
    """The ranks of each shard's exchange group (one worker of every peer, in peer order)."""
    return [[shard * num_peers + index for index in range(num_peers)] for shard in range(replicas)]


def peer_group_ranks(num_peers: int, replicas: int) -> list[list[int]]:
    """The ranks of each peer's data-parallel group (its replicas, in shard order)."""
    return [[shard * num_peers + index for shard in range(replicas)] for index in range(num_peers)]


def shard_bounds(batch_size: int, shards: int, shard: int) -> tuple[int, int]:
    """``[start, stop)`` of one shard of a batch: sizes differ by at most one, larger shards first
    (``torch.tensor_split``'s rule)."""
    base, extra = divmod(batch_size, shards)
    start = shard * base + min(shard, extra)
    return start, start + base + (1 if shard < extra else 0)


def shard_loss_scale(shard_size: int, batch_size: int, shards: int) -> float:
    """What a shard's mean loss is multiplied by so that DDP's gradient *average* over the shards
    equals the gradient of the whole batch's mean loss, even when the shards are uneven:
    ``(1/M) Σ_s ∇(mean_s · n_s · M / B) = ∇ Σ_i loss_i / B``."""
    return shard_size * shards / batch_size


def whole_batch_gradient_scale(shard_size: int, batch_size: int) -> float:
    """What the gradient of a term computed over the whole batch (MCL's, with the replica's rows
    live and the other shards' constant) is multiplied by, besides ``shard_loss_scale``.

    The term ``L`` is the one-process function of all rows, so its derivative for a replica's own
    rows is exactly ``∂L/∂e_i``; the replicas' sum is the whole gradient and DDP's average divides it
    by M: the term needs M in all, ``B / n_s`` times the shard's ``n_s · M / B``.
    """
    return batch_size / shard_size


def whole_batch_rows(gathered: Sequence[torch.Tensor], num_peers: int,
                     bounds: Sequence[tuple[int, int]]) -> list[torch.Tensor]:
    """Each peer's rows of the whole batch, in peer order, from every worker's rows in rank order
    (``rank = shard * num_peers + peer``, each padded to the largest shard: ``bounds`` trims them)."""
    return [torch.cat([gathered[shard * num_peers + index][:stop - start] for shard, (start, stop) in enumerate(bounds)])
            for index in range(num_peers)]


# --------------------------------------------------------------------------- devices and the backend


@dataclass(frozen=True)
class ExchangeBackend:
    name: str  # the torch.distributed backend of the worker group: "nccl" or "gloo"
    host_copies: bool  # whether CUDA tensors are copied to the host for the collective
    reason: str


def exchange_backend(use_gpu: bool, gpus_per_worker: float = 1.0) -> ExchangeBackend:
    """NCCL when every worker has a GPU of its own; gloo otherwise.

    NCCL refuses two ranks on one device, so workers sharing a GPU (a fraction each) exchange
    through gloo, which gathers host tensors only: their logits are copied to the host and back.
    """
    if not use_gpu:
        return ExchangeBackend("gloo", False, "CPU workers")
    if gpus_per_worker >= 1:
        return ExchangeBackend("nccl", False, "every worker has a GPU of its own")
    return ExchangeBackend("gloo", True, f"workers share GPUs ({gpus_per_worker:g} GPU each), which NCCL refuses: "
                                         "logits go through host copies")


def gpus_needed(num_workers: int, gpus_per_worker: float) -> float:
    return num_workers * gpus_per_worker
