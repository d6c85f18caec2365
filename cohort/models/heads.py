"""Heads a method attaches to a peer's network: modules the peer owns and trains with its network
(its optimizer's parameters, its state_dict, its checkpoints and its logged model), that map a
tapped tensor to what the method exchanges. The network's forward is untouched: it still returns
logits, and the method calls a head on the tapped tensor itself.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

# The attribute of a peer's network that holds its heads (its state_dict keys begin with it).
HEADS_ATTRIBUTE = "cohort_heads"


class EmbeddingHead(nn.Module):
    """MCL's embedding head g (Yang et al., AAAI 2022; docs: representations.md): Linear(d, D), ReLU,
    Linear(D, D), then each row scaled to unit L2 norm: ``[B, d]`` penultimate features to ``[B, D]``
    embeddings on the unit sphere."""

    def __init__(self, in_features: int, dim: int = 128):
        super().__init__()
        if in_features < 1 or dim < 1:
            raise ValueError(f"an embedding head needs positive sizes, not {in_features} -> {dim}")
        self.project = nn.Sequential(nn.Linear(in_features, dim), nn.ReLU(inplace=True), nn.Linear(dim, dim))

    def forward(self, feature: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.project(feature), dim=1)


class HeadedSequential(nn.Sequential):
    """A network built as a plain ``nn.Sequential`` (the digits nets) that carries heads: its forward
    runs its layers in order and skips the heads, which a Sequential would otherwise run as its
    last layer. Its state_dict keys are the Sequential's (``0.weight``, ..., ``cohort_heads.…``)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        for name, module in self._modules.items():
            if name != HEADS_ATTRIBUTE:
                input = module(input)
        return input


def attach_heads(model: nn.Module, heads: dict[str, nn.Module]) -> nn.Module:
    """``model`` with ``heads`` as its ``cohort_heads`` ModuleDict (replacing any it had), so that
    they are among its parameters and in its state_dict (``cohort_heads.<name>.…``); returns it.
    A plain ``nn.Sequential`` becomes a ``HeadedSequential`` (the same layers and keys), whose
    forward does not run the heads."""
    if isinstance(model, nn.Sequential) and not isinstance(model, HeadedSequential):
        if type(model) is not nn.Sequential:
            raise TypeError(f"cannot attach heads to a {type(model).__name__}: a Sequential subclass runs every "
                            "module it holds")
        model.__class__ = HeadedSequential
    setattr(model, HEADS_ATTRIBUTE, nn.ModuleDict(heads))
    return model


def heads_of(model: nn.Module) -> nn.ModuleDict | None:
    """The heads attached to ``model`` (or to the network a DistributedDataParallel wraps), or None."""
    model = model.module if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)) else model
    heads = getattr(model, HEADS_ATTRIBUTE, None)
    return heads if isinstance(heads, nn.ModuleDict) else None
