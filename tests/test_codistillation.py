"""Codistillation without Ray: which snapshot a reader uses and when it waits, the board, disjoint
parts of an epoch, the exchange settings and what is refused, the plan's text, the epoch's summary.
Through Ray: tests/test_cohort_ray.py (the equivalence with lockstep) and tests/test_cluster.py."""
from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import torch
import yaml

from cohort.config.errors import CohortError
from cohort.datasets.base import batch_indices, disjoint_part, epoch_order
from cohort.run import main
from cohort.worker.board import FROZEN, KEPT, SnapshotBoard, usable_version
from cohort.worker.guard import BatchGuard
from cohort.worker.handoff import Reporter, copied_state, copied_weights, epochs_ahead
from cohort.worker.report import EpochStats
from cohort.worker.snapshots import TeacherStats, due, is_fresh

REPO = Path(__file__).resolve().parents[1]

PAIR = {
    "name": "codistilled", "data": {"batch_size": 64}, "train": {"epochs": 1},
    "exchange": {"mode": "snapshot", "every": 10},
    "peers": {"a": {"model": "mlp"}, "b": {"model": "mlp_tiny"}},
    "edges": [{"from": "a", "to": "b", "loss": "kd"}, {"from": "b", "to": "a", "loss": "reverse_kd"}],
}


# --------------------------------------------------------------------------- versions


@pytest.mark.parametrize("versions, step, expected", [
    ([], 5, None),                      # nothing published yet
    ([0], 0, 0), ([0], 7, 0),            # the initial weights until the next publication
    ([0, 10, 20], 19, 10),              # the newest not from the reader's future
    ([0, 10, 20], 20, 20),
    ([30, 40], 12, 30),                 # the teacher ran further ahead than the board keeps: the oldest kept
    ([FROZEN], 1000, FROZEN),           # a frozen teacher's one snapshot
])
def test_a_reader_uses_the_newest_snapshot_not_from_its_future(versions, step, expected):
    assert usable_version(versions, step) == expected


@pytest.mark.parametrize("version, step, staleness, fresh", [
    (None, 0, None, False),             # nothing to use: wait
    (0, 500, None, True),               # no bound: never waits
    (40, 49, 9, True), (40, 50, 9, False),
    (7, 7, 0, True), (6, 7, 0, False),  # staleness 0: the snapshot of the reader's own step
    (FROZEN, 10**6, 0, True),
])
def test_a_reader_waits_only_past_the_staleness_bound(version, step, staleness, fresh):
    assert is_fresh(version, step, staleness) is fresh


def test_publications_are_due_every_k_steps_from_the_initial_weights():
    assert [step for step in range(0, 26) if due(step, 10)] == [0, 10, 20]
    assert all(due(step, 1) for step in range(5))


def test_the_board_keeps_the_newest_snapshots_and_a_new_worker_group_replaces_them():
    board = SnapshotBoard()
    for version in range(0, 100, 10):
        board.publish("a", version, [f"ref{version}"])
    kept = [version for version, _ in board.published["a"]]
    assert kept == list(range(100 - 10 * KEPT, 100, 10))
    assert board.usable("a", 75) == (70, ["ref70"]) and board.usable("b", 75) is None
    board.publish("a", 70, ["again"])  # the same version again: one entry, the new one
    assert [version for version, _ in board.published["a"]].count(70) == 1 and board.usable("a", 79)[1] == ["again"]
    board.publish("a", 40, ["restored"], replace=True)  # a restart from an earlier checkpoint
    assert board.published["a"] == [(40, ["restored"])]


# --------------------------------------------------------------------------- data


def test_disjoint_parts_share_out_every_batch_once_in_equal_numbers():
    batches = batch_indices(epoch_order(1437, 0, 1), 64)
    parts = [disjoint_part(batches, index, 3) for index in range(3)]
    assert [len(part) for part in parts] == [len(batches) // 3] * 3
    used = torch.cat([index for part in parts for index in part])
    assert len(used) == len(set(used.tolist()))  # no image in two parts
    assert parts[1][0] is batches[1] and parts[1][1] is batches[4]  # every N-th batch from the i-th


# --------------------------------------------------------------------------- settings and bad input


def dry_run(capsys, tmp_path: Path, topology: dict) -> tuple[int, str, str]:
    path = tmp_path / "topology.yaml"
    path.write_text(yaml.safe_dump(topology, sort_keys=False))
    code = main([str(path), "--dry-run", "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db"])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_the_plan_says_who_holds_copies_of_whom(capsys, tmp_path):
    topology = {**PAIR, "exchange": {"mode": "snapshot", "every": 10, "staleness": 20, "burn_in": 5,
                                     "data": "disjoint"}}
    code, out, _ = dry_run(capsys, tmp_path, topology)
    assert code == 0
    assert ("exchange: snapshots: each peer publishes its weights every 10 of its steps and computes its teachers' "
            "logits from copies (eval mode); a peer waits when a teacher's copy is more than 20 steps behind") in out
    assert "data: each peer its own 1/2 of every epoch; distillation from step 6" in out
    assert "a holds copies of b" in out and "b holds copies of a" in out
    assert "gloo" not in out  # no collective per step


def test_the_shipped_codistillation_pair_plans_disjoint_snapshots(capsys):
    assert main([str(REPO / "topologies" / "codistill_pair.yaml"), "--dry-run"]) == 0
    assert "publishes its weights every 10 of its steps" in capsys.readouterr().out


def with_exchange(**exchange) -> dict:
    return {**PAIR, "exchange": exchange}


def with_replicas() -> dict:
    return {**PAIR, "peers": {name: {**peer, "replicas": 2} for name, peer in PAIR["peers"].items()}}


def with_gate() -> dict:
    return {**PAIR, "gates": [{"rule": "switokd", "teacher": "a", "student": "b"}]}


def with_mcl() -> dict:
    return {**PAIR, "peers": {"a": {"model": "mlp", "embedding": {"dim": 16}},
                              "b": {"model": "mlp_tiny", "embedding": {"dim": 16}}},
            "edges": [{"from": "a", "to": "b", "loss": "mcl"}]}


@pytest.mark.parametrize("topology, expected", [
    (with_exchange(every=5), "exchange.every: a setting of mode snapshot (exchange.mode: snapshot)"),
    (with_exchange(mode="snapshot", every=10, staleness=3),
     "exchange.staleness: 3 steps is below every - 1 = 9: a copy published every 10 steps lags up to 9 steps, so a "
     "reader would wait forever"),
    (with_exchange(mode="snapshot", data="halves"), "exchange.data"),
    (with_replicas(), "peers.a.replicas: snapshot exchange runs one worker per peer (replicas: 1)"),
    (with_gate(), "gates: gates decide from every peer's logits of the step: they need exchange.mode lockstep"),
    (with_mcl(), "edges[0].loss: loss 'mcl' exchanges embedding: snapshot exchange computes teachers' logits only"),
])
def test_what_snapshots_cannot_do_is_one_line_before_anything_starts(capsys, tmp_path, topology, expected):
    code, _, err = dry_run(capsys, tmp_path, topology)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert expected in lines[0], lines[0]


# --------------------------------------------------------------------------- the epoch's summary


def test_a_codistilling_peers_epoch_reports_staleness_per_teacher_and_its_times():
    stats = EpochStats(teachers=TeacherStats(behind={"a": [0.0, 1.0, 2.0, 9.0], "frozen": [0.0, 0.0]},
                                             forward_seconds=1.5, wait_seconds=0.25))
    summary = stats.summary()
    assert summary["staleness_a"] == 3.0 and summary["staleness_frozen"] == 0.0
    assert (summary["teacher_seconds"], summary["snapshot_wait_seconds"]) == (1.5, 0.25)
    assert "staleness_a" not in EpochStats().summary()  # lockstep: none of these


# --------------------------------------------------------------------------- reports off the training thread


def test_the_training_thread_hands_epochs_over_without_waiting_and_they_are_reported_in_order():
    """cohort.worker.handoff: a report blocked (as at the epoch's barrier, waiting for a slower
    peer) holds up neither the next epochs' hand-overs nor their order."""
    release, reported = threading.Event(), []

    def report(epoch, latest):
        release.wait(timeout=10)
        reported.append((epoch, latest))

    reporter = Reporter(report)
    started = time.perf_counter()
    for epoch in (1, 2, 3):
        reporter.submit(epoch, epoch)
    assert time.perf_counter() - started < 1.0 and reported == []  # three epochs handed over while the first waits
    release.set()
    reporter.close()
    # Every report saw how far the training had got; epochs_ahead is its distance from the epoch reported.
    assert [epoch for epoch, _ in reported] == [1, 2, 3] and all(latest == 3 for _, latest in reported[1:])
    assert [epochs_ahead(latest, epoch) for epoch, latest in reported][1:] == [1, 0]


def test_a_failed_report_is_raised_on_the_training_thread_and_stops_the_reports():
    error, reported = CohortError("metric: 'peer/acc'"), []

    def report(epoch, latest):
        reported.append(epoch)
        if epoch == 2:
            raise error

    reporter = Reporter(report)
    reporter.submit(1, 1)
    reporter.submit(2, 2)
    reporter._thread.join(timeout=10)  # the reporter stops at its first error
    with pytest.raises(CohortError) as raised:
        reporter.submit(3, 3)  # raised at the next epoch's end: the same one-line error
    assert raised.value is error and reported == [1, 2]
    with pytest.raises(CohortError):
        reporter.close()


def test_a_handoff_copies_the_weights_and_the_optimizers_state_the_training_goes_on_changing():
    """The training thread steps in place (weights, momentum buffers) right after the hand-over:
    the report and checkpoint must read the epoch's end, not what the training did since."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)

    def step():
        model(torch.randn(8, 4)).pow(2).sum().backward()
        optimizer.step()

    step()
    weights = copied_weights(model)
    state = copied_state({"model": model.state_dict(), "optimizer": optimizer.state_dict()})
    expected = {key: value.clone() for key, value in model.state_dict().items()}
    momentum = optimizer.state_dict()["state"][0]["momentum_buffer"].clone()
    step()
    assert not torch.equal(model.state_dict()["0.weight"], expected["0.weight"])  # the training went on
    for copy in (weights, state["model"]):
        assert all(torch.equal(copy[key], value) for key, value in expected.items())
    assert torch.equal(state["optimizer"]["state"][0]["momentum_buffer"], momentum)


def test_the_batch_check_compares_the_record_taken_at_the_epochs_end():
    """With snapshots the reporter compares the fingerprints of an epoch's end while the guard
    counts the next epoch's batches: the record and step handed over, not the guard's current ones."""
    gathered = []
    guard = BatchGuard("a", 0, 1, every=5, gather=lambda record: gathered.append(record) or [record, other])
    inputs, labels = torch.ones(4, 2), torch.arange(4)
    guard.see(inputs, labels, 0, 4)
    record, step = guard.record(), guard.step
    other = {**record, "peer": "b"}
    guard.see(inputs * 2, labels, 0, 4)  # the next epoch's first batch
    guard.check_record(record, step, epoch=1)
    assert gathered == [record]
    other = {**record, "peer": "b", "batch": record["batch"] + 1}
    with pytest.raises(CohortError, match=r"^the training batches differ at step 1 \(epoch 1\)"):
        guard.check_record(record, step, epoch=1)
