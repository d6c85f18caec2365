"""Mixed precision: the forward pass under autocast, everything after it in fp32.

Logits leave the forward as fp32, so the exchange, the losses and the metrics never see a
half-precision tensor; fp16 (GPUs only) scales the loss against gradient underflow.
"""
from __future__ import annotations

import contextlib

import torch

AUTOCAST_TYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(precision: str, device: torch.device):
    """The forward pass's autocast context (none for fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=AUTOCAST_TYPES[precision])


def grad_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler | None:
    """fp16's loss scaler; bf16 has fp32's exponent range and needs none."""
    return torch.amp.GradScaler(device.type) if precision == "fp16" else None
