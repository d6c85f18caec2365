"""The logit exchange: every peer's logits, for every peer, in peer order.

This is the only place that talks to the collective, so a different layout (NCCL, several
data-parallel replicas per peer) changes this module alone.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


class LogitExchange:
    """``all_gather`` of one tensor per peer over a process group (the default group if None)."""

    def __init__(self, peer_names: list[str], group: dist.ProcessGroup | None = None):
        self.peer_names = list(peer_names)
        self.group = group
        world = dist.get_world_size(group)
        if world != len(self.peer_names):
            raise RuntimeError(f"the exchange group has {world} workers for {len(self.peer_names)} peers")

    def __call__(self, own_logits: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every peer's logits by name; they arrive detached (the collective carries no gradient)."""
        local = own_logits.detach().contiguous()
        gathered = [torch.empty_like(local) for _ in self.peer_names]
        dist.all_gather(gathered, local, group=self.group)
        return dict(zip(self.peer_names, gathered))

    def gather_objects(self, obj):
        """Every peer's Python object (metrics, fingerprints), in peer order."""
        gathered: list = [None] * len(self.peer_names)
        dist.all_gather_object(gathered, obj, group=self.group)
        return gathered
