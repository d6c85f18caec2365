"""Hinton KD / DML: forward KL from the sender to the receiver."""

from __future__ import annotations

from torch import Tensor

from ._divergence import _check_temperature, _kl, _log_probs
from .registry import register_loss


@register_loss("kd")
def kd(receiver: Tensor, sender: Tensor, temperature: float = 4.0) -> Tensor:
    """``T² · KL(p_sender^T ‖ p_receiver^T)`` per sample, shape ``[B]``."""
    _check_temperature(temperature)
    log_p_s = _log_probs(sender.detach(), temperature)
    log_p_r = _log_probs(receiver, temperature)
    return temperature**2 * _kl(log_p_s, log_p_r)
