"""The model registry: builders by name, torchvision models as ``torchvision:<name>``, the CIFAR
models' shared initialization."""
from __future__ import annotations

import inspect
from collections.abc import Callable

import torch.nn as nn

from cohort.config.errors import unknown

MODELS: dict[str, Callable[..., nn.Module]] = {}
TORCHVISION_PREFIX = "torchvision:"


def register_model(name: str):
    def decorator(builder: Callable[..., nn.Module]):
        if name in MODELS:
            raise ValueError(f"model {name!r} is registered twice")
        MODELS[name] = builder
        return builder

    return decorator


def _torchvision_names() -> list[str]:
    import torchvision.models

    return sorted(torchvision.models.list_models(module=torchvision.models))


def model_exists(name: str) -> bool:
    if name.startswith(TORCHVISION_PREFIX):
        return name[len(TORCHVISION_PREFIX):] in _torchvision_names()
    return name in MODELS


def known_models() -> list[str]:
    return sorted(MODELS) + [f"{TORCHVISION_PREFIX}<name>"]


def model_options(name: str) -> dict[str, object] | None:
    """The keyword options a registered model takes (``peers.<name>.model_args``), with their
    defaults; None for torchvision models, whose options torchvision checks."""
    if name.startswith(TORCHVISION_PREFIX):
        return None
    parameters = inspect.signature(MODELS[name]).parameters.values()
    return {p.name: p.default for p in parameters
            if p.name not in ("num_classes", "in_channels") and p.default is not inspect.Parameter.empty}


def build_model(name: str, num_classes: int, in_channels: int = 3, **options) -> nn.Module:
    if name.startswith(TORCHVISION_PREFIX):
        import torchvision.models

        if in_channels != 3:
            raise ValueError(f"{name} expects 3-channel images, the dataset has {in_channels}")
        return torchvision.models.get_model(name[len(TORCHVISION_PREFIX):], num_classes=num_classes, **options)
    if name not in MODELS:
        raise KeyError(unknown("model", name, known_models(), sort=False))
    return MODELS[name](num_classes=num_classes, in_channels=in_channels, **options)


def init_weights(model: nn.Module, classifier: str = "default") -> None:
    """The CIFAR KD models' shared initialization: Kaiming-normal (fan_out) convolutions with zero
    bias, batch norm at 1 / 0. ``classifier``: ``"default"`` leaves linear layers as PyTorch makes
    them, ``"zero_bias"`` zeroes their bias, ``"normal"`` draws weights from N(0, 0.01) and zeroes
    the bias (small logits at the start)."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear) and classifier != "default":
            if classifier == "normal":
                nn.init.normal_(module.weight, 0.0, 0.01)
            nn.init.zeros_(module.bias)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
