"""DKD: decoupled knowledge distillation (target-class + non-target-class KD)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .divergence import check_temperature, kl, log_probs
from .registry import register_loss


def _binary_log_probs(log_p: Tensor, target: Tensor, gt: Tensor) -> Tensor:
    """``log [p_target, 1 − p_target]`` as ``[B, 2]``.

    ``1 − p_target`` is the logsumexp over the non-target classes, which keeps its precision when
    ``p_target`` is close to 1 (where ``log1p(-p_target)`` would round to ``-inf``).
    """
    log_target = log_p.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    log_rest = log_p.masked_fill(gt, float("-inf")).logsumexp(dim=-1)
    return torch.stack([log_target, log_rest], dim=-1)


@register_loss("dkd")
def dkd(
    receiver: Tensor,
    sender: Tensor,
    target: Tensor,
    temperature: float = 4.0,
    alpha: float = 1.0,
    beta: float = 8.0,
) -> Tensor:
    """``alpha · TCKD + beta · NCKD`` per sample, shape ``[B]``.

    ``TCKD = T² · KL(b_s ‖ b_r)`` with ``b = [p_t, 1 − p_t]`` at temperature T;
    ``NCKD = T² · KL(n_s ‖ n_r)`` with ``n = softmax(z / T − 1000 · gt)`` (reference DKD code).
    """
    check_temperature(temperature)
    sender = sender.detach()
    gt = F.one_hot(target, num_classes=receiver.shape[-1]).bool()

    log_p_s = log_probs(sender, temperature)
    log_p_r = log_probs(receiver, temperature)
    tckd = kl(_binary_log_probs(log_p_s, target, gt), _binary_log_probs(log_p_r, target, gt))

    mask = 1000.0 * gt.to(receiver.dtype)
    log_n_s = torch.log_softmax(sender / temperature - mask, dim=-1)
    log_n_r = torch.log_softmax(receiver / temperature - mask, dim=-1)
    nckd = kl(log_n_s, log_n_r)

    return temperature**2 * (alpha * tckd + beta * nckd)
