"""Online attention transfer between peers' feature maps (Zagoruyko & Komodakis, "Paying More
Attention to Attention", ICLR 2017; in the form of RepDistiller's ``Attention`` with p = 2).

A stage's feature ``f`` (``B × C × H × W``) gives the attention map
``a(f) = normalize_rows(vec(mean_c f²))`` (``B × HW``, rows of unit L2 norm). Where two peers' maps
differ in size, the larger feature is average-pooled to the smaller size (per dimension) before
``a(·)``. The edge from ``j`` to ``i`` is ``β · Σ_l mean_{u,k} (a(f_i^l) − sg a(f_j^l))²_uk``.

What travels is the sender's maps, already pooled to the matched sizes (``h·w`` floats per image
per stage): ``attention_map(f_j, matched_size(...))`` on the sender, ``attention`` on the receiver.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor

from .registry import register_loss

Size = tuple[int, int]


def attention_map(feature: Tensor, size: Size | None = None) -> Tensor:
    """``a(f)`` of a feature ``[B, C, H, W]`` as ``[B, h, w]``: the mean over channels of the squared
    activations, each image's flattened map normalized to unit L2 norm.

    ``size`` (h, w): the feature is first average-pooled (``adaptive_avg_pool2d``) to it where it is
    smaller than ``(H, W)``; it cannot be larger in either dimension (``ValueError``).
    """
    if feature.dim() != 4:
        raise ValueError(f"attention_map: a feature must be [B, C, H, W], got shape {tuple(feature.shape)}")
    height, width = feature.shape[-2:]
    if size is not None:
        size = (int(size[0]), int(size[1]))
        if size[0] > height or size[1] > width:
            raise ValueError(f"attention_map: cannot pool a {height}x{width} feature up to {size[0]}x{size[1]}")
        if size != (height, width):
            feature = F.adaptive_avg_pool2d(feature, size)
    energy = feature.pow(2).mean(dim=1)
    rows = F.normalize(energy.flatten(1), dim=1)
    return rows.view_as(energy)


def matched_size(a_hw: Sequence[int], b_hw: Sequence[int]) -> Size:
    """The size two stages' maps are compared at: the smaller of the two, per dimension."""
    return min(int(a_hw[0]), int(b_hw[0])), min(int(a_hw[1]), int(b_hw[1]))


def matched_sizes(a_sizes: Sequence[Sequence[int]], b_sizes: Sequence[Sequence[int]]) -> list[Size]:
    """Each stage's ``matched_size`` for two peers' stage sizes, matched in order; ``ValueError``
    when the peers do not tap the same number of stages."""
    if len(a_sizes) != len(b_sizes):
        raise ValueError(f"attention maps cannot be matched: {len(a_sizes)} stages against {len(b_sizes)} "
                         "(the peers must tap the same number of stages)")
    return [matched_size(a, b) for a, b in zip(a_sizes, b_sizes)]


@register_loss("attention", payload="maps")
def attention(receiver: Sequence[Tensor], sender: Sequence[Tensor], beta: float = 1000.0) -> Tensor:
    """``β · Σ_l mean_{u,k} (a(f_i^l) − sg a_j^l)²``, a scalar (RepDistiller's β = 1000).

    ``receiver``: the receiver's raw stage features ``[B, C, H, W]`` (live); ``sender``: the
    sender's attention maps ``[B, h, w]`` (``attention_map`` at the matched size), detached here.
    Each feature is pooled to its sender map's size where larger; the stages are matched in order.
    """
    matched_sizes([f.shape[-2:] for f in receiver], [a.shape[-2:] for a in sender])
    total = None
    for stage, (feature, target) in enumerate(zip(receiver, sender)):
        if target.dim() != 3 or feature.dim() != 4 or target.shape[0] != feature.shape[0]:
            raise ValueError(f"attention, stage {stage}: need a [B, C, H, W] feature and a [B, h, w] map, got "
                             f"{tuple(feature.shape)} and {tuple(target.shape)}")
        height, width = target.shape[-2:]
        if height > feature.shape[-2] or width > feature.shape[-1]:
            raise ValueError(f"attention, stage {stage}: the sender's {height}x{width} map is larger than the "
                             f"receiver's {feature.shape[-2]}x{feature.shape[-1]} feature (the sender pools its map "
                             "to the matched size)")
        term = (attention_map(feature, (height, width)) - target.detach()).pow(2).mean()
        total = term if total is None else total + term
    if total is None:
        raise ValueError("attention: no stages to compare")
    return beta * total
