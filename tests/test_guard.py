"""The batch guard (cohort.worker.guard) without Ray: when it checks, and what it finds."""
from __future__ import annotations

import pytest
import torch

from cohort.config.errors import CohortError
from cohort.worker.guard import BatchGuard, find_mismatch


def record(peer, replica=0, batch=1, shard=1, bounds=(0, 10, 10)):
    return {"peer": peer, "replica": replica, "batch": batch, "shard": shard, "bounds": bounds}


def test_agreeing_workers_pass():
    assert find_mismatch([record("a"), record("b")]) is None
    grid = [record("a", 0, shard=5, bounds=(0, 5, 9)), record("b", 0, shard=5, bounds=(0, 5, 9)),
            record("a", 1, shard=6, bounds=(5, 9, 9)), record("b", 1, shard=6, bounds=(5, 9, 9))]
    assert find_mismatch(grid, replicas=2) is None


def test_the_odd_peer_is_named():
    assert find_mismatch([record("a"), record("b", batch=2), record("c")]) == "b saw other data than a, c"


def test_without_an_odd_one_out_every_side_is_named():
    assert find_mismatch([record("a"), record("b", batch=2)]) == "a / b saw different data"
    assert find_mismatch([record("a"), record("b", batch=2), record("c", batch=2), record("d")]) == \
        "a, d / b, c saw different data"


def test_replicas_are_named_and_shards_compared_within_their_group():
    grid = [record("a", 0, shard=5, bounds=(0, 5, 9)), record("b", 0, shard=7, bounds=(0, 5, 9)),
            record("a", 1, shard=6, bounds=(5, 9, 9)), record("b", 1, shard=6, bounds=(5, 9, 9))]
    assert find_mismatch(grid, replicas=2) == "in shard 0, a (replica 0) / b (replica 0) saw different data"


def test_replicas_must_split_the_batch_into_disjoint_shards():
    grid = [record("a", 0, shard=5, bounds=(0, 5, 9)), record("a", 1, shard=6, bounds=(0, 5, 9))]
    assert "replicas of a do not split the batch" in find_mismatch(grid, replicas=2)
    grid = [record("a", 0, shard=5, bounds=(0, 4, 9)), record("a", 1, shard=6, bounds=(5, 9, 9))]
    assert "replicas of a do not split the batch" in find_mismatch(grid, replicas=2)


def test_steps_are_counted_over_the_run_not_the_epoch():
    """23 steps an epoch (digits) against an interval of 50: the check comes at run step 50, in epoch 3."""
    guard = BatchGuard("a", 0, 1, every=50, gather=lambda r: [r])
    inputs, labels = torch.zeros(4, 2), torch.zeros(4, dtype=torch.long)
    due = [step for step in range(1, 70) if guard.see(inputs, labels, 0, 4)]
    assert due == [50]
    assert guard.step == 69


def test_a_mismatch_stops_with_one_line_naming_the_peers_and_the_step():
    others = record("b", batch=99)
    guard = BatchGuard("a", 0, 1, every=50, gather=lambda own: [own, others])
    guard.see(torch.ones(2, 2), torch.zeros(2, dtype=torch.long), 0, 2)
    with pytest.raises(CohortError) as error:
        guard.check(epoch=1)
    assert str(error.value) == ("the training batches differ at step 1 (epoch 1): a / b saw different data; "
                                "every peer must load the same data")
    assert "\n" not in str(error.value)


def test_interval_zero_turns_the_guard_off():
    guard = BatchGuard("a", 0, 1, every=0, gather=lambda own: [own, record("b", batch=99)])
    assert not guard.see(torch.ones(2, 2), torch.zeros(2, dtype=torch.long), 0, 2)
    guard.check(epoch=1)  # no gather, no error
