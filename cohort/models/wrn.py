"""Wide ResNets (Zagoruyko & Komodakis, 2016) for 32x32 inputs, named ``wrn_<depth>_<width>``.

The layout is the one the KD literature trains (CRD/RepDistiller, reused by DKD/mdistiller):
a 16-channel stem, three stages of pre-activation basic blocks at 16k, 32k and 64k channels
(k the widening factor) and ``(depth - 4) / 6`` blocks per stage, then BN-ReLU, global average
pooling and a linear classifier. Dropout defaults to 0 as in those KD experiments.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from cohort.models.registry import init_weights, register_model

# The three groups' outputs (32, 16 and 8 pixels on a 32x32 input; before the final BN-ReLU, as
# Zagoruyko & Komodakis's attention transfer taps them).
STAGE_NAMES = ("block1", "block2", "block3")


class WideBlock(nn.Module):
    """Pre-activation block: (BN-ReLU-conv) twice, with a 1x1 projection when the shape changes."""

    def __init__(self, c_in: int, c_out: int, stride: int, dropout: float):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.dropout = dropout
        self.projection = None
        if stride != 1 or c_in != c_out:
            self.projection = nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        activated = F.relu(self.bn1(x))
        out = F.relu(self.bn2(self.conv1(activated)))
        out = F.dropout(out, p=self.dropout, training=self.training)
        out = self.conv2(out)
        # As in the reference code, a projecting shortcut starts from the pre-activated input,
        # while an identity shortcut carries the raw one.
        shortcut = x if self.projection is None else self.projection(activated)
        return out + shortcut


class WideResNet(nn.Module):
    def __init__(self, depth: int, width: int, num_classes: int, in_channels: int = 3, dropout: float = 0.0):
        super().__init__()
        if depth < 10 or (depth - 4) % 6:
            raise ValueError(f"a Wide ResNet needs depth 6n + 4 with n >= 1, got {depth}")
        blocks = (depth - 4) // 6
        self.conv1 = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
        c_in = 16
        stages = []
        for index, c_out in enumerate((16 * width, 32 * width, 64 * width)):
            strides = [1 if index == 0 else 2] + [1] * (blocks - 1)
            stage = []
            for stride in strides:
                stage.append(WideBlock(c_in, c_out, stride, dropout))
                c_in = c_out
            stages.append(nn.Sequential(*stage))
        self.block1, self.block2, self.block3 = stages
        # The last block leaves its sum un-normalised (pre-activation), hence this final BN-ReLU.
        self.bn = nn.BatchNorm2d(c_in)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c_in, num_classes)

        init_weights(self, classifier="zero_bias")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block3(self.block2(self.block1(self.conv1(x))))
        x = F.relu(self.bn(x))
        return self.fc(torch.flatten(self.pool(x), 1))


@register_model("wrn_16_1", stages=STAGE_NAMES)
def wrn_16_1(num_classes: int, in_channels: int = 3, dropout: float = 0.0) -> nn.Module:
    return WideResNet(16, 1, num_classes, in_channels, dropout)


@register_model("wrn_16_2", stages=STAGE_NAMES)
def wrn_16_2(num_classes: int, in_channels: int = 3, dropout: float = 0.0) -> nn.Module:
    return WideResNet(16, 2, num_classes, in_channels, dropout)


@register_model("wrn_16_4", stages=STAGE_NAMES)
def wrn_16_4(num_classes: int, in_channels: int = 3, dropout: float = 0.0) -> nn.Module:
    return WideResNet(16, 4, num_classes, in_channels, dropout)


@register_model("wrn_16_8", stages=STAGE_NAMES)
def wrn_16_8(num_classes: int, in_channels: int = 3, dropout: float = 0.0) -> nn.Module:
    return WideResNet(16, 8, num_classes, in_channels, dropout)


@register_model("wrn_40_1", stages=STAGE_NAMES)
def wrn_40_1(num_classes: int, in_channels: int = 3, dropout: float = 0.0) -> nn.Module:
    return WideResNet(40, 1, num_classes, in_channels, dropout)


@register_model("wrn_40_2", stages=STAGE_NAMES)
def wrn_40_2(num_classes: int, in_channels: int = 3, dropout: float = 0.0) -> nn.Module:
    return WideResNet(40, 2, num_classes, in_channels, dropout)
