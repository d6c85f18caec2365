"""Batch statistics over a peer's replicas: what makes ``replicas: M`` train what ``replicas: 1`` trains.

A peer with replicas normalizes every BatchNorm layer over the whole batch, not over its shard:
the batch moments are all-reduced within the peer's own replica group (never across peers), as
``torch.nn.SyncBatchNorm`` does. torch's SyncBatchNorm refuses CPU tensors, and gloo (the backend
of CPU workers and of workers sharing a GPU) carries host tensors only, so on those paths the
moments go through an autograd-aware ``all_reduce`` here; with one GPU per worker (NCCL) torch's
own kernel runs. Both give the whole batch's mean and biased variance in the forward pass, the
gradient of the whole batch's normalization in the backward, and update the running statistics
with the whole batch's unbiased variance.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn


def batch_norm_sync_mode(device_type: str, host_copies: bool) -> str:
    """``"torch"`` (torch's SyncBatchNorm kernel) where it runs, else ``"moments"`` (ours, on gloo)."""
    return "torch" if device_type == "cuda" and not host_copies else "moments"


class PeerSyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """What ``nn.SyncBatchNorm`` computes, over a peer's replica group, on CPU and over host copies
    (``nn.SyncBatchNorm`` itself, and DDP around it, refuse modules that are not on a GPU).

    Same parameters and buffers as the BatchNorm it replaces (the state_dict keys do not change).
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, process_group=None, on_host: bool = False):
        super().__init__(num_features, eps, momentum, affine, track_running_stats)
        self.process_group = process_group
        self.on_host = on_host

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2-D input (got {input.dim()}-D)")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not self.training or self.process_group is None:
            return super().forward(input)
        self._check_input_dim(input)
        # Statistics in fp32 whatever the autocast type of the input (as torch's kernels keep them).
        x = input.float()
        dims = [0, *range(2, x.dim())]
        shape = [1, -1] + [1] * (x.dim() - 2)
        on_host = self.on_host
        count = torch.tensor([x.numel() / x.shape[1]], dtype=x.dtype, device=x.device)
        sums = _group_sum(torch.cat([x.sum(dims), count]), self.process_group, on_host)
        total = sums[-1]
        mean = sums[:-1] / total
        centered = x - mean.reshape(shape)
        var = _group_sum((centered * centered).sum(dims), self.process_group, on_host) / total
        output = centered * torch.rsqrt(var + self.eps).reshape(shape)
        if self.affine:
            output = output * self.weight.reshape(shape) + self.bias.reshape(shape)
        if self.track_running_stats:
            self._update_running_stats(mean.detach(), var.detach(), float(total.detach()))
        return output.to(input.dtype)

    @torch.no_grad()
    def _update_running_stats(self, mean: torch.Tensor, var: torch.Tensor, count: float) -> None:
        self.num_batches_tracked.add_(1)
        momentum = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        unbiased = var * (count / max(count - 1.0, 1.0))
        self.running_mean.mul_(1 - momentum).add_(mean.to(self.running_mean.dtype), alpha=momentum)
        self.running_var.mul_(1 - momentum).add_(unbiased.to(self.running_var.dtype), alpha=momentum)


def _group_sum(tensor: torch.Tensor, group, on_host: bool) -> torch.Tensor:
    """The sum of ``tensor`` over the group, differentiable (the backward sums the gradients)."""
    if on_host:
        return _GroupSum.apply(tensor.cpu(), group).to(tensor.device)
    return _GroupSum.apply(tensor, group)


class _GroupSum(torch.autograd.Function):
    """``all_reduce`` (sum) whose gradient is the sum of every member's gradient: each member's
    input reaches every member's output."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        total = tensor.detach().clone().contiguous()
        dist.all_reduce(total, group=group)
        return total

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        total = grad.detach().clone().contiguous()
        dist.all_reduce(total, group=ctx.group)
        return total, None


BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
SYNCED = (nn.SyncBatchNorm, PeerSyncBatchNorm)


@dataclass(frozen=True)
class SyncReport:
    layers: int  # BatchNorm layers now synchronized
    mode: str  # "torch", "moments" or "host"


def sync_batch_norm(model: nn.Module, group: dist.ProcessGroup, device_type: str = "cpu",
                    host_copies: bool = False) -> SyncReport:
    """Replace every BatchNorm layer of ``model`` in place by one synchronized over ``group`` (torch's
    ``SyncBatchNorm`` with NCCL, else ``PeerSyncBatchNorm``), keeping its parameters, buffers and names."""
    mode = batch_norm_sync_mode(device_type, host_copies)
    mode = "host" if mode == "moments" and device_type != "cpu" else mode
    layers = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, BATCH_NORMS) and not isinstance(child, SYNCED):
                parent.add_module(name, _converted(child, group, mode))
                layers += 1
    return SyncReport(layers, mode)


def _converted(layer: nn.Module, group, mode: str) -> nn.Module:
    kind = nn.SyncBatchNorm if mode == "torch" else PeerSyncBatchNorm
    options = {} if mode == "torch" else {"on_host": mode == "host"}
    synced = kind(layer.num_features, layer.eps, layer.momentum, layer.affine, layer.track_running_stats,
                  process_group=group, **options)
    # The layer's device and floating dtype (a float64 network keeps float64 statistics and affine parameters).
    like = next((t for t in (*layer.parameters(), *layer.buffers()) if t.is_floating_point()), torch.empty(0))
    synced.to(device=like.device, dtype=like.dtype)
    synced.load_state_dict(layer.state_dict())
    synced.train(layer.training)
    for parameter, original in zip(synced.parameters(), layer.parameters()):
        parameter.requires_grad_(original.requires_grad)
    return synced
