"""The model zoo: a name in a topology's ``peers.<name>.model`` resolves here.

Builders are registered by decorator and called as ``builder(num_classes=..., in_channels=...)``.
Any torchvision classification model is also available as ``torchvision:<name>``.
"""
from __future__ import annotations

import inspect
from typing import Callable

import torch.nn as nn

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
        raise KeyError(f"unknown model {name!r} (known: {', '.join(known_models())})")
    return MODELS[name](num_classes=num_classes, in_channels=in_channels, **options)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# Registration happens on import of each family's module.
from cohort.models import small  # noqa: E402,F401
from cohort.models import resnet_cifar  # noqa: E402,F401
from cohort.models import wrn  # noqa: E402,F401
from cohort.models import vgg_cifar  # noqa: E402,F401
from cohort.models import mobilenetv2_cifar  # noqa: E402,F401
from cohort.models import shufflenetv2_cifar  # noqa: E402,F401
