"""MobileNetV2 (Sandler et al., 2018) for 32x32 inputs, as in the KD literature's CIFAR code.

This follows the CRD/RepDistiller definition that DKD/mdistiller reuse, whose half-width net
(``mobilenetv2_half``, their ``mobile_half``) is the usual MobileNetV2 student. It differs from
the ImageNet network, and from torchvision's, in three ways that matter for comparing results:
the second stage keeps stride 1 so a 32x32 input is downsampled 16 times, not 32; channel
counts are plain ``int(c * width)`` without rounding to multiples of 8; and the first block has
an expansion convolution even though its expansion factor is 1.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from cohort.models.registry import init_weights, register_model
from cohort.models.taps import resolution_ends

EXPANSION = 6
# (expansion, output channels at width 1, blocks, stride of the first block) for each stage.
STAGES = [
    (1, 16, 1, 1),
    (EXPANSION, 24, 2, 1),
    (EXPANSION, 32, 3, 2),
    (EXPANSION, 64, 4, 2),
    (EXPANSION, 96, 3, 1),
    (EXPANSION, 160, 3, 2),
    (EXPANSION, 320, 1, 1),
]


def _conv_bn(c_in: int, c_out: int, kernel: int, stride: int = 1, groups: int = 1) -> list[nn.Module]:
    conv = nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=kernel // 2, groups=groups, bias=False)
    return [conv, nn.BatchNorm2d(c_out)]


class InvertedResidual(nn.Module):
    """Expand with a 1x1 conv, filter depthwise, project back linearly (no ReLU on the bottleneck)."""

    def __init__(self, c_in: int, c_out: int, stride: int, expansion: int):
        super().__init__()
        hidden = c_in * expansion
        self.residual = stride == 1 and c_in == c_out
        self.conv = nn.Sequential(
            *_conv_bn(c_in, hidden, 1),
            nn.ReLU(inplace=True),
            *_conv_bn(hidden, hidden, 3, stride=stride, groups=hidden),
            nn.ReLU(inplace=True),
            *_conv_bn(hidden, c_out, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        return x + out if self.residual else out


def stage_names(model: nn.Module) -> tuple[str, ...]:
    """The last module at each resolution after the stride-2 stem (16, 8, 4 and 2 pixels on a 32x32
    input: the last block at each of the first three, the final 1x1 convolution's ReLU)."""
    return resolution_ends(model.features, "features")


class CifarMobileNetV2(nn.Module):
    def __init__(self, num_classes: int, in_channels: int = 3, width: float = 1.0):
        super().__init__()
        if width <= 0:
            raise ValueError(f"width must be positive, got {width}")
        c_in = int(32 * width)
        layers: list[nn.Module] = [*_conv_bn(in_channels, c_in, 3, stride=2), nn.ReLU(inplace=True)]
        for expansion, channels, blocks, stride in STAGES:
            c_out = int(channels * width)
            for index in range(blocks):
                layers.append(InvertedResidual(c_in, c_out, stride if index == 0 else 1, expansion))
                c_in = c_out
        # The 1280-wide head is never narrowed, only widened, as in the paper.
        last = int(1280 * width) if width > 1.0 else 1280
        layers += [*_conv_bn(c_in, last, 1), nn.ReLU(inplace=True)]
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(last, num_classes)

        init_weights(self, classifier="normal")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


@register_model("mobilenetv2", stages=stage_names)
def mobilenetv2(num_classes: int, in_channels: int = 3, width: float = 1.0) -> nn.Module:
    """``width`` multiplies every channel count except the 1280-wide head (which only grows)."""
    return CifarMobileNetV2(num_classes, in_channels, width)


@register_model("mobilenetv2_half", stages=stage_names)
def mobilenetv2_half(num_classes: int, in_channels: int = 3) -> nn.Module:
    return CifarMobileNetV2(num_classes, in_channels, width=0.5)
