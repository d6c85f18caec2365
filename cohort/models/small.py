"""Small networks for low-resolution inputs such as scikit-learn's 8x8 digits.

Sizes span two orders of magnitude so that a cohort can have a real teacher and real students
on a laptop: ``mlp_tiny`` (2.4k parameters for 10 classes) up to ``cnn_medium`` (66k).
"""
from __future__ import annotations

import torch.nn as nn

from cohort.models.registry import register_model
from cohort.models.taps import resolution_ends


def _dropout(p: float) -> list[nn.Module]:
    """Dropout before the classifier (none at 0: the layer names stay those of the plain network)."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout must be in [0, 1), not {p!r}")
    return [nn.Dropout(p)] if p else []


def _mlp(in_features: int, hidden: int, num_classes: int, dropout: float = 0.0) -> nn.Module:
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(in_features, hidden),
        nn.ReLU(inplace=True),
        *_dropout(dropout),
        nn.Linear(hidden, num_classes),
    )


def _conv_block(c_in: int, c_out: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]


def _cnn(in_channels: int, widths: tuple[int, int], num_classes: int, dropout: float = 0.0) -> nn.Module:
    # Global average pooling keeps these nets independent of the input's spatial size.
    first, second = widths
    return nn.Sequential(
        *_conv_block(in_channels, first),
        *_conv_block(first, first),
        nn.MaxPool2d(2),
        *_conv_block(first, second),
        *_conv_block(second, second),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        *_dropout(dropout),
        nn.Linear(second, num_classes),
    )


# The MLPs flatten an 8x8 image; on larger inputs use the CNNs.
@register_model("mlp_tiny")
def mlp_tiny(num_classes: int, in_channels: int = 1, dropout: float = 0.0) -> nn.Module:
    return _mlp(in_channels * 64, 32, num_classes, dropout)


@register_model("mlp")
def mlp(num_classes: int, in_channels: int = 1, dropout: float = 0.0) -> nn.Module:
    return _mlp(in_channels * 64, 128, num_classes, dropout)


# The CNNs' stages: the ReLU ending each resolution (8x8 and 4x4 on digits).
@register_model("cnn_small", stages=resolution_ends)
def cnn_small(num_classes: int, in_channels: int = 1, dropout: float = 0.0) -> nn.Module:
    return _cnn(in_channels, (16, 32), num_classes, dropout)


@register_model("cnn_medium", stages=resolution_ends)
def cnn_medium(num_classes: int, in_channels: int = 1, dropout: float = 0.0) -> nn.Module:
    return _cnn(in_channels, (32, 64), num_classes, dropout)
