"""How a cohort's CPUs are shared among its peers: torch threads in proportion to each peer's compute.

Every step ends at the exchange, so the cohort steps at the pace of its slowest peer. With equal
threads a big teacher sets that pace while a small student finishes early and waits. Ray Train
reserves the same resources for every worker, so the reservation stays even; what follows each
peer's compute is its number of torch threads.
"""
from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn as nn

# Backward costs about twice the forward: a training step is about three forward passes.
TRAINING_STEP_FORWARDS = 3


def step_flops(model: nn.Module, input_size: tuple[int, ...], frozen: bool = False) -> float:
    """FLOPs of one training step per sample (forward only for a frozen peer), counted by torch on
    one forward pass of a dummy sample."""
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    model.eval()  # batch norm in training mode refuses a batch of one sample
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(torch.zeros(1, *input_size))
    finally:
        model.train(was_training)
    forward = float(counter.get_total_flops())
    return forward if frozen else TRAINING_STEP_FORWARDS * forward


def peer_threads(compute: Mapping[str, float], cpus_per_peer: float) -> dict[str, int]:
    """Torch threads per peer, from its share of the cohort's CPUs (``cpus_per_peer`` × peers).

    A peer's share is proportional to its compute, rounded down, at least one thread: equal peers
    get ``int(cpus_per_peer)`` each. Shares are never rounded up: a peer with more threads than
    its cores spins them (torch's OpenMP threads busy-wait between operations) and took the CPU
    its neighbours needed (measured: a ResNet-20 teacher on 2 threads beside a ResNet-8 student on
    1, on 2 cores, used 70% more CPU per step and stepped slower than with 1 thread each).
    """
    total = sum(compute.values())
    cpus = cpus_per_peer * len(compute)
    threads = {}
    for peer, flops in compute.items():
        share = cpus * flops / total if total > 0 else cpus_per_peer
        # The tolerance keeps a share computed as 0.9999999 of a whole CPU at that CPU.
        threads[peer] = max(1, math.floor(share + 1e-6))
    return threads
