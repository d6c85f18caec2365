"""The logit exchange: every peer's logits, for every peer, in peer order.

The collectives of the cohort live here: the exchange over a shard's group, the process groups of
the worker grid (``cohort.worker.grid``), object gathers, and batch statistics over a peer's replicas;
batch norm's all-reduce is in ``cohort.worker.syncbn``.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from cohort.losses.batch import WholeBatch
from cohort.worker.grid import exchange_group_ranks, peer_group_ranks, slot_of


class LogitExchange:
    """``all_gather`` of one tensor per peer over a process group (the default group if None).

    ``host_copies``: gather copies on the host (gloo carries no CUDA tensors for ``all_gather``)
    and hand the results back on the device they came from.
    """

    def __init__(self, peer_names: list[str], group: dist.ProcessGroup | None = None, host_copies: bool = False):
        self.peer_names = list(peer_names)
        self.group = group
        self.host_copies = host_copies
        world = dist.get_world_size(group)
        if world != len(self.peer_names):
            raise RuntimeError(f"the exchange group has {world} workers for {len(self.peer_names)} peers")

    def __call__(self, own_logits: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every peer's logits by name; they arrive detached (the collective carries no gradient)."""
        local = own_logits.detach().contiguous()
        if self.host_copies:
            local = local.cpu()
        gathered = [torch.empty_like(local) for _ in self.peer_names]
        dist.all_gather(gathered, local, group=self.group)
        if self.host_copies:
            gathered = [tensor.to(own_logits.device, non_blocking=True) for tensor in gathered]
        return dict(zip(self.peer_names, gathered))

    def gather_objects(self, obj):
        """Every peer's Python object (metrics, fingerprints), in peer order."""
        gathered: list = [None] * len(self.peer_names)
        dist.all_gather_object(gathered, obj, group=self.group)
        return gathered


def grid_groups(peer_names: list[str], replicas: int, rank: int):
    """This worker's (exchange group, peer group) in the grid; ``(None, None)`` without replicas,
    where the default group is the exchange and a peer has no one to average gradients with.

    ``new_group`` is collective: every rank creates every group, in the same order.
    """
    if replicas == 1:
        return None, None
    slot = slot_of(rank, peer_names)
    exchange = [dist.new_group(ranks) for ranks in exchange_group_ranks(len(peer_names), replicas)]
    peers = [dist.new_group(ranks) for ranks in peer_group_ranks(len(peer_names), replicas)]
    return exchange[slot.shard], peers[slot.peer_index]


def gather_rows(buffer: torch.Tensor, group: dist.ProcessGroup | None = None,
                host_copies: bool = False) -> list[torch.Tensor]:
    """Every member's ``buffer`` (one shape on all), in group rank order; the default group is every
    worker (the whole batch's representations, with replicas). They arrive detached."""
    local = buffer.detach().contiguous()
    if host_copies:
        local = local.cpu()
    gathered = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, local, group=group)
    return [tensor.to(buffer.device, non_blocking=True) for tensor in gathered] if host_copies else gathered


def gather_in_group(obj, group: dist.ProcessGroup | None):
    """Every member's object, in group rank order (just ``[obj]`` without a group)."""
    if group is None:
        return [obj]
    gathered: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, obj, group=group)
    return gathered


class ReplicaBatch(WholeBatch):
    """Batch statistics over a peer's replicas (``cohort.losses.batch``): each worker holds one
    shard, the peer's replica group together the whole batch. Every replica of the receiving peer
    computes the same losses in the same order, so their collectives match."""

    def __init__(self, group: dist.ProcessGroup, host_copies: bool = False):
        self.group = group
        self.host_copies = host_copies

    def _all_reduce(self, tensor: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
        local = tensor.detach().contiguous()
        local = local.cpu() if self.host_copies else local.clone()
        dist.all_reduce(local, op=op, group=self.group)
        return local.to(tensor.device)

    def mean(self, values: torch.Tensor) -> torch.Tensor:
        count = torch.full((1,) + values.shape[1:], float(values.shape[0]), dtype=values.dtype, device=values.device)
        sums = self._all_reduce(torch.cat([values.detach().sum(dim=0, keepdim=True), count]))
        return sums[0] / sums[1]

    def logmeanexp(self, log_values: torch.Tensor) -> torch.Tensor:
        log_values = log_values.detach()
        top = self._all_reduce(log_values.max(dim=0).values, dist.ReduceOp.MAX)
        top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
        count = torch.full_like(top, float(log_values.shape[0]))
        sums = self._all_reduce(torch.stack([(log_values - top).exp().sum(dim=0), count]))
        return top + sums[0].log() - sums[1].log()
