"""In-memory datasets through Ray's object store once per node, not once per peer.

Ray reads numpy arrays out of its object store without a copy (read-only views of the node's
shared memory), while a pickled torch tensor comes out as each reader's own copy. A dataset's
tensors therefore travel as numpy arrays (``CohortDataset.__getstate__``) and come back as tensors
over the same memory (``__setstate__``): every peer on a node reads the one copy the store holds.

Such tensors are read-only shared memory. Nothing may write into a dataset's own tensors: a batch
is made by indexing (``x[indices]``), which makes a new tensor; in-place operations on the
dataset's tensors are not allowed.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch


@dataclass(frozen=True)
class SharedArray:
    """A tensor of a pickled dataset, as the numpy array over its memory."""

    array: np.ndarray


def to_shared(attributes: dict[str, Any]) -> dict[str, Any]:
    """A dataset's attributes with every tensor numpy can hold (CPU, no gradient) as a ``SharedArray``."""
    return {name: _shared(value) for name, value in attributes.items()}


def from_shared(attributes: dict[str, Any]) -> dict[str, Any]:
    """``to_shared``'s attributes with every ``SharedArray`` a tensor again, over the same memory."""
    return {name: tensor_over(value.array) if isinstance(value, SharedArray) else value
            for name, value in attributes.items()}


def tensor_over(array: np.ndarray) -> torch.Tensor:
    """A tensor over ``array``'s memory, without a copy. torch cannot mark a tensor read-only and
    warns about a read-only array: the warning is silenced, since nothing writes into a dataset's tensors."""
    if array.flags.writeable:
        return torch.from_numpy(array)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable", category=UserWarning)
        return torch.from_numpy(array)


def held_bytes(attributes: dict[str, Any]) -> int:
    """The bytes of the tensors among a dataset's attributes."""
    return sum(value.nbytes for value in attributes.values() if isinstance(value, torch.Tensor))


def _shared(value: Any) -> Any:
    if not isinstance(value, torch.Tensor) or value.device.type != "cpu" or value.requires_grad:
        return value
    try:
        return SharedArray(value.numpy())
    except TypeError:  # a dtype numpy lacks (bfloat16): pickled as a tensor
        return value
