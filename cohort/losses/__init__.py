"""Distillation losses: pure per-sample functions, registered by name (formulas and provenance:
docs/losses.md). Every module of this package is imported with it, so a new loss is one new file."""
import importlib
import pkgutil

from .attention import attention
from .bdkd import bdkd
from .dkd import dkd
from .kd import kd
from .ltkd import ltkd
from .mcl import mcl
from .registry import LOSSES, PAYLOADS, LossSpec, get_loss, register_loss
from .reverse_kd import reverse_kd

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = [
    "kd",
    "reverse_kd",
    "bdkd",
    "dkd",
    "ltkd",
    "mcl",
    "attention",
    "LOSSES",
    "PAYLOADS",
    "register_loss",
    "LossSpec",
    "get_loss",
]
