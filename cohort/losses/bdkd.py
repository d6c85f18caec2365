"""BD-KD: forward and reverse KL, weighted per sample by the entropy gap."""

from __future__ import annotations

import torch
from torch import Tensor

from .divergence import check_temperature, entropy, kl, log_probs
from .registry import register_loss


@register_loss("bdkd")
def bdkd(
    receiver: Tensor,
    sender: Tensor,
    temperature: float = 4.0,
    delta_high: float = 1.0,
    delta_low: float = 0.5,
) -> Tensor:
    """``w_f · T² KL(p_s ‖ p_r) + w_r · T² KL(p_r ‖ p_s)`` per sample, shape ``[B]``.

    ``(w_f, w_r) = (delta_high, delta_low)`` where ``H(p_r) < H(p_s)`` (over-confident receiver:
    forward KL dominates), else ``(delta_low, delta_high)`` (reverse KL dominates).
    """
    check_temperature(temperature)
    log_p_s = log_probs(sender.detach(), temperature)
    log_p_r = log_probs(receiver, temperature)

    # The weights are constants for back-propagation.
    receiver_more_confident = entropy(log_p_r.detach()) < entropy(log_p_s)
    high = torch.full_like(receiver_more_confident, delta_high, dtype=log_p_r.dtype)
    low = torch.full_like(high, delta_low)
    w_forward = torch.where(receiver_more_confident, high, low)
    w_reverse = torch.where(receiver_more_confident, low, high)

    forward = kl(log_p_s, log_p_r)
    reverse = kl(log_p_r, log_p_s)
    return temperature**2 * (w_forward * forward + w_reverse * reverse)
