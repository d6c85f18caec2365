"""The model registry: builders by name with the stages they declare, torchvision models as
``torchvision:<name>``, timm models as ``timm:<name>`` (an optional extra), the CIFAR models'
shared initialization."""
from __future__ import annotations

import functools
import importlib.util
import inspect
from collections.abc import Callable

import torch.nn as nn

from cohort.config.errors import CohortError, unknown

MODELS: dict[str, Callable[..., nn.Module]] = {}
# The stages a registered model declares (cohort.models.taps): module names, or a function of the
# built model giving them (for nets built as one Sequential, whose indices depend on options).
Stages = tuple[str, ...] | Callable[[nn.Module], tuple[str, ...]]
MODEL_STAGES: dict[str, Stages] = {}
TORCHVISION_PREFIX = "torchvision:"
TIMM_PREFIX = "timm:"
TIMM_INSTALL = "pip install 'cohort[timm]'"


def register_model(name: str, *, stages: Stages = ()):
    """Registers a builder under ``name``; ``stages``: the modules whose outputs are its stages (the
    last module at each spatial resolution, in forward order), which attention transfer taps."""
    def decorator(builder: Callable[..., nn.Module]):
        if name in MODELS:
            raise ValueError(f"model {name!r} is registered twice")
        MODELS[name] = builder
        MODEL_STAGES[name] = stages if callable(stages) else tuple(stages)
        return builder

    return decorator


def _torchvision_names() -> list[str]:
    import torchvision.models

    return sorted(torchvision.models.list_models(module=torchvision.models))


def timm_installed() -> bool:
    """Whether the optional timm is importable (without importing it)."""
    return importlib.util.find_spec("timm") is not None


@functools.lru_cache(maxsize=1)
def _timm_names() -> frozenset[str]:
    import timm

    return frozenset(timm.list_models())


def model_exists(name: str) -> bool:
    if name.startswith(TORCHVISION_PREFIX):
        return name[len(TORCHVISION_PREFIX):] in _torchvision_names()
    if name.startswith(TIMM_PREFIX):
        return timm_installed() and name[len(TIMM_PREFIX):] in _timm_names()
    return name in MODELS


def known_models() -> list[str]:
    return sorted(MODELS) + [f"{TORCHVISION_PREFIX}<name>", f"{TIMM_PREFIX}<name>"]


def unknown_model(name: str) -> str:
    """The one wording of a model name that cannot be built: a timm name without timm says how to
    install it, any other the known names."""
    if name.startswith(TIMM_PREFIX) and not timm_installed():
        return f"model {name!r} needs timm, which is not installed: {TIMM_INSTALL}"
    return unknown("model", name, known_models(), sort=False)


def declared_stages(name: str, model: nn.Module) -> tuple[str, ...]:
    """The stages model ``name`` declares, for the built ``model``: a registered model's own, a
    timm model's ``feature_info`` modules; none for torchvision models (name them per peer)."""
    if name.startswith(TIMM_PREFIX):
        return tuple(info["module"] for info in getattr(model, "feature_info", None) or ())
    stages = MODEL_STAGES.get(name, ())
    return tuple(stages(model) if callable(stages) else stages)


def model_options(name: str) -> dict[str, object] | None:
    """The keyword options a registered model takes (``peers.<name>.model_args``), with their
    defaults; None for torchvision and timm models, whose options those libraries check."""
    if name.startswith((TORCHVISION_PREFIX, TIMM_PREFIX)):
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
    if name.startswith(TIMM_PREFIX):
        if not model_exists(name):
            raise CohortError(unknown_model(name))
        import timm

        # Never pretrained: no download at run time (a peer's weights come from its checkpoint).
        return timm.create_model(name[len(TIMM_PREFIX):], pretrained=False, num_classes=num_classes,
                                 in_chans=in_channels, **options)
    if name not in MODELS:
        raise KeyError(unknown_model(name))
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
