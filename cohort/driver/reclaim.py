"""Giving back the CPUs of a Ray Train run whose controller was killed while its driver lives on.

A run's Ray Train controller is an actor, and it creates the placement group that reserves its
workers' CPUs. A Tune trial's controller is an actor of the trial's process: when Tune stops the
trial in its fit (ASHA's early stop, PBT's exploit, Ctrl-C), Ray kills the controller with it. A
single run's controller can be killed from outside (the out-of-memory killer). Either way Ray keeps
the placement group: it removes a placement group whose creating actor has died only when the
creating driver's job ends too. Until then its CPUs stay reserved, and the next trial or run waits
for them (Ray Train gives up after ``RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S``, 600 s in a sweep).

Ray Train's own answer is a detached cleaner actor per run, which asks the dashboard's state API
every second whether the controller still lives. It does nothing where the cluster has no dashboard
(``--include-dashboard=false``, a plain ``pip install ray``): the state API is unavailable and the
cleaner keeps asking. It most likely also missed once on a loaded 2-core VM (CI, 2026-12-05: both
trials of a PBT sweep, right after an ASHA sweep on the same Ray, waited their 600 s). cohort starts
no such cleaner (``cohort.driver.trainer``).

The GCS itself knows which placement groups have lost their creator (``creator_actor_dead``). A
driver (``Reclaimer``) removes those of its own job that appeared since it began: a sweep's or a
study's as soon as it sees them, a run's when its fit fails. Placement groups that were there
before, detached ones, and ones a driver created itself are left alone. A driver that reads no GCS
table (a Ray Client, ``ray://``, not tried) reclaims nothing.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

# ``PlacementGroupTableData.state`` in Ray's GCS protocol.
PENDING, PREPARED, CREATED, REMOVED, RESCHEDULING = range(5)


@dataclass(frozen=True, kw_only=True)
class GroupRecord:
    """What the GCS holds about one placement group (ids in hex)."""

    group_id: str
    state: int
    job_id: str
    creator_actor_id: str  # empty when a driver created it
    creator_actor_dead: bool
    detached: bool


def fresh(records: Iterable[GroupRecord], job_id: str, known: set[str]) -> list[GroupRecord]:
    """The placement groups of job ``job_id`` not in ``known``, not detached and not yet removed."""
    return [record for record in records
            if record.job_id == job_id and record.group_id not in known and not record.detached
            and record.state != REMOVED]


def orphaned(records: Iterable[GroupRecord], job_id: str, known: set[str]) -> list[str]:
    """The placement groups to remove: the ``fresh`` ones whose creating actor has died."""
    return [record.group_id for record in fresh(records, job_id, known)
            if record.creator_actor_id and record.creator_actor_dead]


def group_records() -> list[GroupRecord] | None:
    """Every placement group of the connected Ray, as its GCS holds it; None where this Ray cannot
    be read that way (its private table reader changed)."""
    try:
        import ray
        from ray.core.generated import gcs_pb2

        table = ray._private.state.state._connect_and_get_accessor().get_placement_group_table()
        records = []
        for raw in table:
            data = gcs_pb2.PlacementGroupTableData.FromString(raw)
            records.append(GroupRecord(
                group_id=data.placement_group_id.hex(), state=int(data.state), job_id=data.creator_job_id.hex(),
                creator_actor_id=actor_hex(data.creator_actor_id),
                creator_actor_dead=bool(data.creator_actor_dead), detached=bool(data.is_detached)))
        return records
    except Exception:  # noqa: BLE001 - another Ray: Ray Train's cleaner is then the only one
        return None


def readable() -> bool:
    """Whether this process reads its Ray's placement groups (``group_records``); where it cannot,
    Ray Train's own cleaner stays with every fit (``cohort.driver.trainer``)."""
    return group_records() is not None


def actor_hex(actor_id: bytes) -> str:
    """An actor id in hex; empty for none (no bytes, or Ray's nil id, all ones)."""
    return "" if not actor_id or actor_id == b"\xff" * len(actor_id) else actor_id.hex()


def remove_group(group_id: str) -> None:
    """Remove one placement group by its hex id (gone already: nothing to do)."""
    import ray
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    try:
        remove_placement_group(PlacementGroup(ray.PlacementGroupID(bytes.fromhex(group_id))))
    except Exception:  # noqa: BLE001 - removed meanwhile (by Ray Train's cleaner)
        pass


class Reclaimer:
    """Removes the placement groups of this driver's job that lost their creator after it was made.

    ``records``, ``remove``, ``job_id``, ``clock``: the GCS's table, removal, this job's id and the
    time (Ray's by default; tests pass their own). Made where this process is connected to no Ray,
    or where this Ray cannot say its job, it does nothing."""

    def __init__(self, records: Callable[[], list[GroupRecord] | None] = group_records,
                 remove: Callable[[str], None] = remove_group, job_id: str | None = None,
                 clock: Callable[[], float] = time.monotonic):
        if job_id is None:
            import ray

            try:
                job_id = ray.get_runtime_context().get_job_id() if ray.is_initialized() else None
            except Exception:  # noqa: BLE001 - a Ray that cannot say: nothing to reclaim by
                job_id = None
            if job_id is None:
                records = lambda: None  # noqa: E731 - nothing to read without a Ray
        self.records, self.remove, self.job_id, self.clock = records, remove, job_id, clock
        now = records() or []
        self.known = {record.group_id for record in now if record.state != REMOVED}
        self.removed: set[str] = set()  # asked to go (the table may list them a moment longer)
        self.last = float("-inf")

    def reclaim(self, every: float = 0.0) -> list[str]:
        """Remove the orphaned placement groups (at most once per ``every`` seconds); their ids."""
        if self.clock() - self.last < every:
            return []
        self.last = self.clock()
        records = self.records()
        return [] if records is None else self.remove_orphans(records)

    def remove_orphans(self, records: list[GroupRecord]) -> list[str]:
        """Remove the orphans among ``records`` not removed yet; their ids."""
        found = orphaned(records, self.job_id, self.known | self.removed)
        for group_id in found:
            self.remove(group_id)
        self.removed.update(found)
        return found

    def settle(self, timeout: float = 10.0, pause: float = 0.2,
               sleep: Callable[[float], None] = time.sleep) -> list[str]:
        """At the end of a sweep: wait until every placement group made since this reclaimer was has
        been removed or orphaned, removing the orphans, for at most ``timeout`` seconds (Tune has
        stopped its trials; their controllers die a moment later). The ids removed."""
        removed: list[str] = []
        deadline = self.clock() + timeout
        while True:
            records = self.records()
            if records is None:
                return removed
            removed += self.remove_orphans(records)
            if not fresh(records, self.job_id, self.known | self.removed) or self.clock() >= deadline:
                return removed
            sleep(pause)
