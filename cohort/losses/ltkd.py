"""LTKD: long-tailed KD, KL split into a rebalanced inter-group and a uniform intra-group term."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .batch import WHOLE_BATCH, WholeBatch
from .divergence import check_temperature, kl, log_probs
from .registry import register_loss


def _check_groups(groups: Tensor, num_classes: int) -> int:
    """Validate the class → group map and return the number of groups G."""
    if not isinstance(groups, Tensor) or groups.dtype != torch.long or groups.dim() != 1:
        raise ValueError("groups must be a 1-D LongTensor mapping each class to a group index")
    if groups.numel() != num_classes:
        raise ValueError(f"groups has {groups.numel()} entries for {num_classes} classes")
    if groups.numel() == 0 or int(groups.min()) < 0:
        raise ValueError("group indices must be 0..G-1")
    num_groups = int(groups.max()) + 1
    counts = torch.bincount(groups, minlength=num_groups)
    if bool((counts == 0).any()):
        empty = torch.nonzero(counts == 0).flatten().tolist()
        raise ValueError(f"groups must cover 0..{num_groups - 1}; empty groups: {empty}")
    return num_groups


@register_loss("ltkd")
def ltkd(
    receiver: Tensor,
    sender: Tensor,
    groups: Tensor,
    temperature: float = 4.0,
    alpha: float = 1.0,
    beta: float = 1.0,
    rebalance: bool = True,
    uniform: bool = True,
    batch: WholeBatch = WHOLE_BATCH,
) -> Tensor:
    """``T² · (alpha · L_inter + beta · L_intra)`` per sample, shape ``[B]``.

    With group masses ``b_G = Σ_{c∈G} p_c`` and within-group distributions ``p̃_G = p / b_G``:

    - ``L_inter = KL(b̂_s ‖ b_r)`` with ``b̂_{s,G} ∝ w_G · b_{s,G}`` and
      ``w_G = 1 / (G · m_G)``, ``m_G`` the batch mean of ``b_{s,G}`` (``b̂_s = b_s`` without
      ``rebalance``), over the whole batch (``batch``: over a peer's replicas when it has them);
    - ``L_intra = Σ_G u_G · KL(p̃_{s,G} ‖ p̃_{r,G})`` with ``u_G = 1 / G`` (``u_G = b_{s,G}``
      without ``uniform``).
    """
    check_temperature(temperature)
    num_groups = _check_groups(groups, receiver.shape[-1])
    groups = groups.to(receiver.device)
    log_p_s = log_probs(sender.detach(), temperature)
    log_p_r = log_probs(receiver, temperature)

    members = [groups == g for g in range(num_groups)]
    log_b_s = torch.stack([log_p_s[:, m].logsumexp(dim=-1) for m in members], dim=-1)
    log_b_r = torch.stack([log_p_r[:, m].logsumexp(dim=-1) for m in members], dim=-1)

    if rebalance:
        # All in log space: a group with almost no mass in the batch must not make w_G overflow.
        log_m = batch.logmeanexp(log_b_s)
        log_w = -math.log(num_groups) - log_m
        log_target_b = torch.log_softmax(log_w + log_b_s, dim=-1)
    else:
        log_target_b = log_b_s
    inter = kl(log_target_b, log_b_r)

    intra = torch.zeros_like(inter)
    for g, m in enumerate(members):
        within_s = log_p_s[:, m] - log_b_s[:, g : g + 1]
        within_r = log_p_r[:, m] - log_b_r[:, g : g + 1]
        u = 1.0 / num_groups if uniform else log_b_s[:, g].exp()
        intra = intra + u * kl(within_s, within_r)

    return temperature**2 * (alpha * inter + beta * intra)
