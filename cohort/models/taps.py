"""Taps: named tensors a peer's network computes on the way to its logits.

- the **penultimate** feature: the input of the classifier (an ``nn.Linear``), taken by a forward
  pre-hook, ``[B, d]``. By default the classifier is the last ``nn.Linear`` in ``named_modules()``
  order (every zoo model's, torchvision's ResNets, ViTs and ConvNeXts'), or a timm model's
  ``get_classifier()``. It is exactly what feeds the classifier, so in training mode it is taken
  after any dropout placed before the classifier.
- the **stages**: outputs of named modules, taken by forward hooks (a CIFAR ResNet's ``layer1``,
  ``layer2``, ``layer3``). A registered model declares its own (``register_model(stages=...)``),
  a timm model lists them in ``feature_info``; a torchvision model's are named per peer.

Nothing is renamed or wrapped: a tapped model's state_dict is the model's own.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn as nn

from cohort.config.errors import CohortError, did_you_mean
from cohort.models.heads import HEADS_ATTRIBUTE
from cohort.models.registry import TIMM_PREFIX, declared_stages

# How many top-level module names an error lists before "...".
LISTED_MODULES = 12
# What pools a whole map into one vector (where a Sequential-built net's last resolution ends).
GLOBAL_HEADS = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.Flatten, nn.Linear)


@dataclasses.dataclass(frozen=True)
class TapSpec:
    """Where a peer's network is tapped: its classifier's module name and input size (None when the
    penultimate feature was not asked for and the model has no linear layer), its stages' names."""

    classifier: str | None
    feature_size: int | None
    stages: tuple[str, ...] = ()


def inner(model: nn.Module) -> nn.Module:
    """The network itself: the module a DistributedDataParallel (or DataParallel) wraps, else ``model``."""
    wrappers = (nn.parallel.DistributedDataParallel, nn.DataParallel)
    return model.module if isinstance(model, wrappers) else model


def resolution_ends(sequential: nn.Sequential, prefix: str = "") -> tuple[str, ...]:
    """The names of the last module at each spatial resolution of a Sequential-built net: the module
    before each child that downsamples (holds a convolution or pooling of stride > 1) and the last
    one before the global pooling (or the end). A resolution with no module of its own (a stem
    that downsamples first) has none."""
    names = []
    last = None
    for index, child in enumerate(sequential):
        if isinstance(child, GLOBAL_HEADS):
            break
        if downsamples(child) and last is not None:
            names.append(last)
        last = f"{prefix}.{index}" if prefix else str(index)
    if last is not None and last not in names:
        names.append(last)
    return tuple(names)


def downsamples(module: nn.Module) -> bool:
    """Whether a module holds a convolution or pooling of stride > 1."""
    for layer in module.modules():
        if isinstance(layer, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)):
            stride = layer.stride
            if any(s > 1 for s in (stride if isinstance(stride, tuple) else (stride,))):
                return True
    return False


def resolve_taps(model: nn.Module, model_name: str, declared: Mapping[str, Any] | Any | None = None,
                 peer: str = "<name>", *, penultimate: bool = True, stages: bool = False) -> TapSpec:
    """Where peer ``peer``'s network ``model`` (built from ``model_name``) is tapped: the model's own
    classifier and declared stages, or those ``declared`` for the peer (``peers.<peer>.taps``: a
    mapping or object with ``penultimate``, the classifier's module name, and ``stages``, module
    names). ``penultimate`` / ``stages``: whether the caller needs them (an error if the model has
    none). Every problem is a one-line CohortError at ``peers.<peer>.taps``."""
    model = inner(model)
    modules = dict(model.named_modules())
    where = f"peers.{peer}.taps"
    own_stages = declared_stages(model_name, model)
    classifier_name = field(declared, "penultimate")
    stage_names = field(declared, "stages")
    stage_names = own_stages if stage_names is None else tuple(stage_names)

    for name in stage_names:
        if name not in modules or not name:
            raise CohortError(f"peer {peer!r} has no module {name!r} to tap{did_you_mean(name, modules)} "
                              f"(stages it declares: {', '.join(own_stages) or 'none'}; "
                              f"top-level modules: {top_level(model)})", where)
    if stages and not stage_names:
        raise CohortError(f"peer {peer!r} (model {model_name!r}) declares no stages to tap: name them in "
                          f"{where}.stages (top-level modules: {top_level(model)})", where)

    default = default_classifier(model, model_name)
    if classifier_name is None:
        classifier_name = default
        if classifier_name is None:
            if penultimate:
                raise CohortError(f"peer {peer!r} (model {model_name!r}) has no nn.Linear classifier to take the "
                                  f"penultimate feature from: name one in {where}.penultimate", where)
            return TapSpec(None, None, stage_names)
    elif classifier_name not in modules or not classifier_name:
        raise CohortError(f"peer {peer!r} has no module {classifier_name!r} to take the penultimate feature from"
                          f"{did_you_mean(classifier_name, modules)} (its classifier: {default or 'none'}; "
                          f"top-level modules: {top_level(model)})", where)
    classifier = modules[classifier_name]
    if not isinstance(classifier, nn.Linear):
        raise CohortError(f"peer {peer!r}: module {classifier_name!r} is a {type(classifier).__name__}, not the "
                          f"nn.Linear classifier whose input is the penultimate feature "
                          f"(its classifier: {default or 'none'}; top-level modules: {top_level(model)})", where)
    return TapSpec(classifier_name, classifier.in_features, stage_names)


def field(declared: Mapping[str, Any] | Any | None, key: str) -> Any:
    """``declared[key]`` or ``declared.key`` (a topology's TapsConfig or a plain mapping), None if absent."""
    if declared is None:
        return None
    if isinstance(declared, Mapping):
        return declared.get(key)
    return getattr(declared, key, None)


def default_classifier(model: nn.Module, model_name: str) -> str | None:
    """The name of the model's classifier: a timm model's ``get_classifier()`` (found by identity),
    else the last ``nn.Linear`` in ``named_modules()`` order; None if there is none."""
    if model_name.startswith(TIMM_PREFIX) and hasattr(model, "get_classifier"):
        head = model.get_classifier()
        for name, module in model.named_modules():
            if module is head and isinstance(module, nn.Linear):
                return name
    linear = [name for name, module in model.named_modules()
              if isinstance(module, nn.Linear) and name.split(".")[0] != HEADS_ATTRIBUTE]  # not a head's own
    return linear[-1] if linear else None


def top_level(model: nn.Module) -> str:
    """The model's top-level module names for an error, the first few then ``...``."""
    names = [name for name, _ in model.named_children()]
    shown = ", ".join(names[:LISTED_MODULES])
    return (shown + (", ..." if len(names) > LISTED_MODULES else "")) or "none"


class TapRecorder:
    """Hooks on a model that keep its taps of the latest forward: after ``model(x)``, ``penultimate``
    (``[B, d]``) and ``stages`` (in declared order) are THAT forward's tensors, live with their graph
    (or without one under ``torch.no_grad``). The hooks are on the network itself, so a call through
    a DistributedDataParallel or any module that contains it records as well. ``remove()`` takes
    the hooks off; ``clear()`` drops the tensors."""

    def __init__(self, model: nn.Module, spec: TapSpec, want_penultimate: bool = True, want_stages: bool = True):
        network = inner(model)
        modules = dict(network.named_modules())
        if want_penultimate and spec.classifier is None:
            raise ValueError("the penultimate feature is wanted but the tap spec has no classifier")
        self.spec = spec
        self.stage_names = spec.stages if want_stages else ()
        self.want_penultimate = want_penultimate
        self._penultimate: torch.Tensor | None = None
        self._stages: dict[str, tuple[torch.Tensor, int]] = {}
        self._handles = [network.register_forward_pre_hook(self._start)]
        if want_penultimate:
            self._handles.append(modules[spec.classifier].register_forward_pre_hook(self._take_penultimate))
        for name in self.stage_names:
            self._handles.append(modules[name].register_forward_hook(self._stage_taker(name)))

    def _start(self, module: nn.Module, args: Any) -> None:
        self.clear()

    def _take_penultimate(self, module: nn.Module, args: tuple) -> None:
        feature = args[0]
        self._penultimate = feature.flatten(1) if feature.dim() > 2 else feature

    def _stage_taker(self, name: str):
        def take(module: nn.Module, args: Any, output: Any) -> None:
            if not isinstance(output, torch.Tensor):
                raise TypeError(f"module {name!r} returns a {type(output).__name__}, not a tensor: tap another one")
            # Its version counter, to notice a later in-place change (an inplace ReLU after it).
            self._stages[name] = (output, output._version)
        return take

    @property
    def penultimate(self) -> torch.Tensor:
        if not self.want_penultimate:
            raise RuntimeError("this recorder does not take the penultimate feature")
        if self._penultimate is None:
            raise RuntimeError(f"no penultimate feature recorded: the classifier {self.spec.classifier!r} "
                               "did not run since the last forward began (or clear())")
        return self._penultimate

    @property
    def stages(self) -> list[torch.Tensor]:
        tensors = []
        for name in self.stage_names:
            if name not in self._stages:
                raise RuntimeError(f"stage {name!r} was not recorded: the module did not run in the last forward")
            tensor, version = self._stages[name]
            if tensor._version != version:
                raise RuntimeError(f"stage {name!r} was changed in place after its module ran (an inplace "
                                   "operation later in the network): tap another module")
            tensors.append(tensor)
        return tensors

    def clear(self) -> None:
        self._penultimate = None
        self._stages = {}

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.clear()


def tap_shapes(model: nn.Module, spec: TapSpec, input_size: tuple[int, ...]) -> dict[str, Any]:
    """The size of the penultimate feature and each stage's shape (``(C, H, W)`` for a map) as one
    forward of two zero images of ``input_size`` (``(C, H, W)``) gives them, in eval mode under
    no_grad (the model's training mode is restored): ``{"penultimate": d | None, "stages": {name: shape}}``."""
    network = inner(model)
    parameter = next(network.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    recorder = TapRecorder(network, spec, want_penultimate=spec.classifier is not None, want_stages=True)
    was_training = network.training
    try:
        network.eval()
        with torch.no_grad():
            network(torch.zeros(2, *input_size, device=device))
        penultimate = recorder.penultimate.shape[1] if spec.classifier is not None else None
        stages = {name: tuple(tensor.shape[1:]) for name, tensor in zip(spec.stages, recorder.stages)}
    finally:
        recorder.remove()
        network.train(was_training)
    return {"penultimate": penultimate, "stages": stages}
