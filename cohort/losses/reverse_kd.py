"""Reverse (mode-seeking) KL from the sender to the receiver."""

from __future__ import annotations

from torch import Tensor

from .divergence import check_temperature, kl, log_probs
from .registry import register_loss


@register_loss("reverse_kd")
def reverse_kd(receiver: Tensor, sender: Tensor, temperature: float = 4.0) -> Tensor:
    """``T² · KL(p_receiver^T ‖ p_sender^T)`` per sample, shape ``[B]``."""
    check_temperature(temperature)
    log_p_s = log_probs(sender.detach(), temperature)
    log_p_r = log_probs(receiver, temperature)
    return temperature**2 * kl(log_p_r, log_p_s)
