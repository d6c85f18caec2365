"""CIFAR ResNets as defined in the knowledge-distillation literature's standard code.

These are He et al.'s 32x32 ResNets (three stages at 32, 16 and 8 pixels, ``(depth - 2) / 6``
basic blocks per stage) in the form that CRD/RepDistiller introduced and DKD/mdistiller reuse,
so that accuracies and parameter counts compare with the published KD tables. Two details
differ from the original paper and are kept on purpose: shortcuts that change shape are 1x1
convolutions with batch norm (the paper's CIFAR nets used parameter-free zero padding), and the
``x4`` variants widen the stem and stages to 32/64/128/256.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from cohort.models.registry import init_weights, register_model

# Stem width followed by the three stage widths.
NARROW = (16, 16, 32, 64)
WIDE_X4 = (32, 64, 128, 256)
# The three stages (32, 16 and 8 pixels on a 32x32 input), tapped by attention transfer.
STAGE_NAMES = ("layer1", "layer2", "layer3")


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    def __init__(self, depth: int, widths: tuple[int, int, int, int], num_classes: int, in_channels: int = 3):
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"a CIFAR ResNet of basic blocks needs depth 6n + 2 with n >= 1, got {depth}")
        blocks = (depth - 2) // 6
        stem, *stage_widths = widths
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, stem, 3, padding=1, bias=False), nn.BatchNorm2d(stem), nn.ReLU(inplace=True)
        )
        c_in = stem
        stages = []
        for index, c_out in enumerate(stage_widths):
            # The first stage keeps the input resolution; the others halve it in their first block.
            strides = [1 if index == 0 else 2] + [1] * (blocks - 1)
            stage = []
            for stride in strides:
                stage.append(BasicBlock(c_in, c_out, stride))
                c_in = c_out
            stages.append(nn.Sequential(*stage))
        self.layer1, self.layer2, self.layer3 = stages
        # The originals pool with a fixed 8x8 window; adaptive pooling is identical on 32x32 inputs
        # and lets other sizes through.
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c_in, num_classes)

        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


@register_model("resnet8", stages=STAGE_NAMES)
def resnet8(num_classes: int, in_channels: int = 3) -> nn.Module:
    return CifarResNet(8, NARROW, num_classes, in_channels)


@register_model("resnet14", stages=STAGE_NAMES)
def resnet14(num_classes: int, in_channels: int = 3) -> nn.Module:
    return CifarResNet(14, NARROW, num_classes, in_channels)


@register_model("resnet20", stages=STAGE_NAMES)
def resnet20(num_classes: int, in_channels: int = 3) -> nn.Module:
    return CifarResNet(20, NARROW, num_classes, in_channels)


@register_model("resnet32", stages=STAGE_NAMES)
def resnet32(num_classes: int, in_channels: int = 3) -> nn.Module:
    return CifarResNet(32, NARROW, num_classes, in_channels)


@register_model("resnet44", stages=STAGE_NAMES)
def resnet44(num_classes: int, in_channels: int = 3) -> nn.Module:
    return CifarResNet(44, NARROW, num_classes, in_channels)


@register_model("resnet56", stages=STAGE_NAMES)
def resnet56(num_classes: int, in_channels: int = 3) -> nn.Module:
    return CifarResNet(56, NARROW, num_classes, in_channels)


@register_model("resnet110", stages=STAGE_NAMES)
def resnet110(num_classes: int, in_channels: int = 3) -> nn.Module:
    return CifarResNet(110, NARROW, num_classes, in_channels)


@register_model("resnet8x4", stages=STAGE_NAMES)
def resnet8x4(num_classes: int, in_channels: int = 3) -> nn.Module:
    return CifarResNet(8, WIDE_X4, num_classes, in_channels)


@register_model("resnet32x4", stages=STAGE_NAMES)
def resnet32x4(num_classes: int, in_channels: int = 3) -> nn.Module:
    return CifarResNet(32, WIDE_X4, num_classes, in_channels)
