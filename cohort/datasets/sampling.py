"""Class-balanced batches (``data.sampler: {m_per_class: m}``), the batches of the MCL authors' code
(Yang et al., AAAI 2022): every batch holds ``batch_size / m`` distinct classes, ``m`` images of each,
so that every image has a positive (another image of its class) in its batch.

Like ``epoch_order``, an epoch's batches are a function of ``(seed, epoch)`` alone: every peer
draws the same batches without coordination.
"""
from __future__ import annotations

from typing import Any, Protocol

import torch

from cohort.config.errors import CohortError


class TrainingClasses(Protocol):
    """What the check reads of a dataset (``cohort.datasets.base.DatasetInfo`` has it)."""

    name: str
    train_class_counts: tuple[int, ...]

SAMPLER_SEED = 0xBA1A  # mixed with the topology's seed: the draws differ from epoch_order's


def balance_problem(class_counts: list[int] | tuple[int, ...], batch_size: int, m: int) -> tuple[str, str] | None:
    """Why batches of ``batch_size`` with ``m`` images per class cannot be drawn from a training
    set with ``class_counts`` images per class: ``(field, message)``, the field being
    ``m_per_class`` or ``batch_size``; None when they can."""
    if m < 2:
        return "m_per_class", f"must be at least 2 (an image needs another of its class), not {m}"
    if batch_size % m:
        return "batch_size", f"{batch_size} is not a multiple of sampler.m_per_class ({m})"
    wanted = batch_size // m
    eligible = sum(1 for count in class_counts if count >= m)
    if wanted > eligible:
        return "batch_size", (f"{batch_size} images at {m} per class need {wanted} classes with at least {m} "
                              f"training images; the training set has {eligible} (a batch of at most {eligible * m})")
    return None


def class_balanced_batches(targets: torch.Tensor, batch_size: int, m: int, seed: int, epoch: int) -> list[torch.Tensor]:
    """One epoch's batches of training indices: ``len(targets) // batch_size`` batches of exactly
    ``batch_size``, each of ``batch_size // m`` distinct classes drawn at random among the classes
    with at least ``m`` images, ``m`` images of each (the class's blocks in the order drawn).

    Each class serves its images in the order of its own seeded permutation, the next ``m`` unused
    ones each time it is drawn; when fewer than ``m`` are left, it is reshuffled. ``ValueError``
    (``balance_problem``) when such batches cannot be drawn.
    """
    counts = torch.bincount(targets).tolist() if len(targets) else []
    problem = balance_problem(counts, batch_size, m)
    if problem is not None:
        field, message = problem
        raise ValueError(f"{field}: {message}")
    generator = torch.Generator().manual_seed((seed * 1_000_003 + epoch) ^ SAMPLER_SEED)
    eligible = [cls for cls, count in enumerate(counts) if count >= m]
    members = [torch.nonzero(targets == cls).flatten() for cls in eligible]
    queues = [row[torch.randperm(len(row), generator=generator)] for row in members]
    cursors = [0] * len(eligible)
    per_batch = batch_size // m
    batches = []
    for _ in range(len(targets) // batch_size):
        blocks = []
        for slot in torch.randperm(len(eligible), generator=generator)[:per_batch].tolist():
            if cursors[slot] + m > len(queues[slot]):
                row = members[slot]
                queues[slot], cursors[slot] = row[torch.randperm(len(row), generator=generator)], 0
            blocks.append(queues[slot][cursors[slot]:cursors[slot] + m])
            cursors[slot] += m
        batches.append(torch.cat(blocks))
    return batches


def check_sampler(info: TrainingClasses, batch_size: int, sampler: Any) -> None:
    """``CohortError`` naming ``data.sampler.m_per_class`` or ``data.batch_size`` when the dataset's
    training classes (``info.train_class_counts``, after a long tail or a validation split) cannot
    fill class-balanced batches; ``sampler``: the topology's ``data.sampler`` (None: nothing to check)."""
    if sampler is None:
        return
    problem = balance_problem(info.train_class_counts, batch_size, sampler.m_per_class)
    if problem is not None:
        field, message = problem
        where = "data.sampler.m_per_class" if field == "m_per_class" else "data.batch_size"
        raise CohortError(f"{message} ({info.name}, class-balanced batches)", where)
