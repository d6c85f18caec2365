"""Small shared helpers: tempered log-probabilities and a per-sample KL from log-probabilities."""

from __future__ import annotations

import torch
from torch import Tensor


def check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def log_probs(logits: Tensor, temperature: float) -> Tensor:
    return torch.log_softmax(logits / temperature, dim=-1)


def kl(log_p: Tensor, log_q: Tensor) -> Tensor:
    """Per-sample ``KL(p ‖ q) = Σ_c p_c (log p_c − log q_c)`` over the last dimension.

    Terms with ``p_c = 0`` are zero by convention. The difference is masked before the product
    so that ``log p_c = -inf`` gives neither a NaN value nor a NaN gradient (0 · inf).
    """
    p = log_p.exp()
    diff = torch.where(p > 0, log_p - log_q, torch.zeros_like(log_p))
    return (p * diff).sum(dim=-1)


def entropy(log_p: Tensor) -> Tensor:
    """Per-sample ``H(p) = −Σ_c p_c log p_c``, with ``0 · log 0 = 0``."""
    p = log_p.exp()
    return -torch.where(p > 0, p * log_p, torch.zeros_like(log_p)).sum(dim=-1)
