"""Batch statistics for losses that look across the batch (``ltkd``'s group masses), and for gates
(``switokd``'s batch means).

A loss that takes a statistic over the batch declares a parameter ``batch`` (default
``WHOLE_BATCH``) and computes the statistic through it, never with ``.mean(dim=0)`` of its own
inputs: with replicas a worker holds one shard of the batch, and the trainer then passes a
``batch`` that reduces over the peer's replicas (``cohort.worker.exchange.ReplicaBatch``), so the loss
equals the one-worker loss. The registry records which losses do (``LossSpec.batch_statistics``),
and a test checks that every other loss is per sample.

The statistics carry no gradient: they are taken of detached values (the sender's).
"""
from __future__ import annotations

import math

from torch import Tensor


class WholeBatch:
    """The batch a loss is given is the whole batch."""

    def mean(self, values: Tensor) -> Tensor:
        """The mean over the batch (dim 0); gates take their batch means so (cohort.gates)."""
        return values.detach().mean(dim=0)

    def logmeanexp(self, log_values: Tensor) -> Tensor:
        """``log(mean over the batch of exp(log_values))``, stably."""
        return log_values.detach().logsumexp(dim=0) - math.log(log_values.shape[0])


WHOLE_BATCH = WholeBatch()
