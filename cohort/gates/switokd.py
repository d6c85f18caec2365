"""SwitOKD (Qian et al., ECCV 2022): the teacher pauses while it is too far ahead of the student."""
from __future__ import annotations

import math

import torch
from torch import Tensor

from cohort.losses.batch import WHOLE_BATCH, WholeBatch

from .registry import register_gate


def switching_quantities(teacher_logits: Tensor, student_logits: Tensor, target: Tensor,
                         batch: WholeBatch = WHOLE_BATCH) -> tuple[float, float, float]:
    """``(d_t, d_s, G)``: batch means of ``‖p_t − y‖₁``, ``‖p_s − y‖₁`` and ``‖p_s − p_t‖₁`` at
    temperature 1, in float64, without gradient (over the whole batch: ``batch``)."""
    with torch.no_grad():
        p_t = teacher_logits.detach().double().softmax(dim=-1)
        p_s = student_logits.detach().double().softmax(dim=-1)
        y = torch.nn.functional.one_hot(target.long(), p_t.shape[-1]).double()
        per_sample = torch.stack([(p_t - y).abs().sum(dim=-1), (p_s - y).abs().sum(dim=-1),
                                  (p_s - p_t).abs().sum(dim=-1)], dim=-1)
        d_t, d_s, gap = batch.mean(per_sample).tolist()
    return d_t, d_s, gap


def expert_mode(d_t: float, d_s: float, gap: float) -> bool:
    """The switch: ``G > δ`` and ``d_t < d_s``, with ``δ = d_s − ε·d_t`` and ``ε = exp(−d_t / (d_t + d_s))``."""
    if not d_t < d_s:  # also keeps d_t + d_s > 0 below
        return False
    epsilon = math.exp(-d_t / (d_t + d_s))
    return gap > d_s - epsilon * d_t


@register_gate("switokd", fired="expert")
def switokd(teacher_logits: Tensor, student_logits: Tensor, target: Tensor, batch: WholeBatch = WHOLE_BATCH) -> bool:
    """True in expert mode (the teacher pauses, the student learns from it), False in learning mode
    (both learn from each other). One decision for the whole batch, from batch means."""
    return expert_mode(*switching_quantities(teacher_logits, student_logits, target, batch))
