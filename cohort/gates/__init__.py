"""Gates: rules that switch edges off, and pause peers, step by step, from the exchanged logits
(formulas and provenance: docs/gates.md). Every module of this package is imported with it, so a
new gate is one new file."""
import importlib
import pkgutil

from .registry import GATES, GateSpec, get_gate, register_gate
from .switokd import switokd

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["switokd", "GATES", "GateSpec", "get_gate", "register_gate"]
