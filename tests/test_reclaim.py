"""Giving back the CPUs of trials stopped in their fit (cohort.driver.reclaim): which placement
groups a sweep's driver removes, how often, and how long it waits at the end. Pure, no Ray; the
sweeps of tests/test_tune.py run it on a Ray without a dashboard."""
from __future__ import annotations

from cohort.driver.reclaim import CREATED, PENDING, REMOVED, GroupRecord, Reclaimer, actor_hex, orphaned

JOB, OTHER_JOB = "01000000", "02000000"


def group(group_id: str, *, state: int = CREATED, job: str = JOB, creator: str = "a1", dead: bool = True,
          detached: bool = False) -> GroupRecord:
    return GroupRecord(group_id=group_id, state=state, job_id=job, creator_actor_id=creator,
                       creator_actor_dead=dead, detached=detached)


def test_only_this_jobs_new_groups_whose_creating_actor_died_are_orphans():
    records = [
        group("orphan"),
        group("pending-orphan", state=PENDING),
        group("creator-alive", dead=False),
        group("removed", state=REMOVED),
        group("other-job", job=OTHER_JOB),
        group("detached", detached=True),
        group("by-a-driver", creator=""),
        group("there-before"),
    ]
    assert orphaned(records, JOB, known={"there-before"}) == ["orphan", "pending-orphan"]


def test_a_nil_actor_id_is_no_creator():
    assert actor_hex(b"") == "" and actor_hex(b"\xff" * 16) == ""
    assert actor_hex(bytes.fromhex("8af55359ab")) == "8af55359ab"


class FakeRay:
    """A GCS table that changes as a test says, a clock, and the removals asked for."""

    def __init__(self, records: list[GroupRecord]):
        self.table = {record.group_id: record for record in records}
        self.now = 0.0
        self.asked: list[str] = []

    def records(self) -> list[GroupRecord]:
        return list(self.table.values())

    def remove(self, group_id: str) -> None:
        self.asked.append(group_id)
        self.table[group_id] = group(group_id, state=REMOVED)

    def reclaimer(self) -> Reclaimer:
        return Reclaimer(records=self.records, remove=self.remove, job_id=JOB, clock=lambda: self.now)


def test_groups_there_before_the_sweep_are_left_and_new_orphans_removed_once():
    ray = FakeRay([group("a-notebooks-own"), group("removed-before", state=REMOVED)])
    reclaimer = ray.reclaimer()
    ray.table["trial-1"] = group("trial-1", dead=False)
    assert reclaimer.reclaim() == [] and ray.asked == []
    ray.table["trial-1"] = group("trial-1")  # Tune stopped the trial: its controller died with it
    assert reclaimer.reclaim() == ["trial-1"]
    assert reclaimer.reclaim() == [] and ray.asked == ["trial-1"]
    assert ray.table["a-notebooks-own"].state == CREATED


def test_reclaiming_reads_the_table_at_most_once_per_period():
    ray = FakeRay([])
    reclaimer = ray.reclaimer()
    assert reclaimer.reclaim(every=1.0) == []
    ray.table["trial-1"] = group("trial-1")
    ray.now = 0.5
    assert reclaimer.reclaim(every=1.0) == []  # read half a second ago
    ray.now = 1.0
    assert reclaimer.reclaim(every=1.0) == ["trial-1"]


def test_settle_waits_for_a_stopped_trials_controller_to_die_then_removes_its_group():
    ray = FakeRay([])
    reclaimer = ray.reclaimer()
    ray.table["finished"] = group("finished", state=REMOVED)
    ray.table["stopped"] = group("stopped", dead=False)
    pauses = []

    def sleep(seconds: float) -> None:
        pauses.append(seconds)
        ray.now += seconds
        if len(pauses) == 3:
            ray.table["stopped"] = group("stopped")

    assert reclaimer.settle(timeout=10.0, pause=0.2, sleep=sleep) == ["stopped"]
    assert len(pauses) == 3 and ray.asked == ["stopped"]


def test_settle_gives_up_at_its_timeout_and_returns_at_once_when_nothing_is_left():
    ray = FakeRay([])
    reclaimer = ray.reclaimer()
    ray.table["alive"] = group("alive", dead=False)  # a group whose creator never dies

    def sleep(seconds: float) -> None:
        ray.now += seconds

    assert reclaimer.settle(timeout=2.0, pause=0.5, sleep=sleep) == []
    assert ray.now == 2.0
    del ray.table["alive"]
    assert reclaimer.settle(timeout=2.0, pause=0.5, sleep=lambda s: (_ for _ in ()).throw(AssertionError)) == []


def test_a_ray_whose_table_cannot_be_read_is_left_to_ray_trains_cleaner():
    reclaimer = Reclaimer(records=lambda: None, remove=lambda group_id: None, job_id=JOB)
    assert reclaimer.reclaim() == [] and reclaimer.settle(timeout=1.0) == []


def test_a_reclaimer_made_without_a_ray_connected_starts_none_and_does_nothing():
    import ray

    assert not ray.is_initialized()
    reclaimer = Reclaimer()
    assert reclaimer.reclaim() == [] and reclaimer.settle(timeout=1.0) == []
    assert not ray.is_initialized()
