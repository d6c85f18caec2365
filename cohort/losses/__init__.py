"""Distillation losses: pure per-sample functions, registered by name (formulas and provenance: docs/losses.md)."""

from .registry import LOSSES, LossSpec, get_loss, register_loss
from .kd import kd
from .reverse_kd import reverse_kd
from .bdkd import bdkd
from .dkd import dkd
from .ltkd import ltkd

__all__ = [
    "kd",
    "reverse_kd",
    "bdkd",
    "dkd",
    "ltkd",
    "LOSSES",
    "register_loss",
    "LossSpec",
    "get_loss",
]
