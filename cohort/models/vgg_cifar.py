"""VGG with batch norm for 32x32 inputs, as in the knowledge-distillation literature's CIFAR code.

CRD/RepDistiller (reused by DKD/mdistiller) cut VGG into five stages of 3x3 convolutions and
replace the three large fully connected layers by one linear classifier on 512 pooled
features. ``vgg8`` is that code's shallowest variant, one convolution per stage.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from cohort.models.registry import init_weights, register_model
from cohort.models.taps import resolution_ends

# Output channels of the convolutions in each of the five stages.
STAGES = {
    "vgg8": [[64], [128], [256], [512], [512]],
    "vgg11": [[64], [128], [256, 256], [512, 512], [512, 512]],
    "vgg13": [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
}


def stage_names(model: nn.Module) -> tuple[str, ...]:
    """The ReLU ending each resolution (32, 16, 8 and 4 pixels on a 32x32 input: the last two
    stages share the 4x4 one)."""
    return resolution_ends(model.features, "features")


class CifarVGG(nn.Module):
    def __init__(self, stages: list[list[int]], num_classes: int, in_channels: int = 3):
        super().__init__()
        layers: list[nn.Module] = []
        c_in = in_channels
        for index, widths in enumerate(stages):
            for c_out in widths:
                # Convolutions keep their bias although BN follows: the reference code does, and
                # the published parameter counts include it.
                layers += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
                c_in = c_out
            # Only the first three stages downsample, so the last two run at 4x4 on a 32x32 input
            # (the reference adds a fourth pool only for 64x64 inputs).
            if index < 3:
                layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(c_in, num_classes)

        # Small logits at the start, as in the reference initialisation.
        init_weights(self, classifier="normal")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


@register_model("vgg8", stages=stage_names)
def vgg8(num_classes: int, in_channels: int = 3) -> nn.Module:
    return CifarVGG(STAGES["vgg8"], num_classes, in_channels)


@register_model("vgg11", stages=stage_names)
def vgg11(num_classes: int, in_channels: int = 3) -> nn.Module:
    return CifarVGG(STAGES["vgg11"], num_classes, in_channels)


@register_model("vgg13", stages=stage_names)
def vgg13(num_classes: int, in_channels: int = 3) -> nn.Module:
    return CifarVGG(STAGES["vgg13"], num_classes, in_channels)
