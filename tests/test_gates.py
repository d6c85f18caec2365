"""Gates: the registry, and switokd against an independent computation of docs/gates.md's formulas.

The reference is a plain-Python float64 loop (``math``, no torch): it shares nothing with the
implementation but the formulas of the contract (SwitOKD's switching rule).
"""
from __future__ import annotations

import math

import pytest
import torch

from cohort.gates import GATES, get_gate, register_gate, switokd
from cohort.losses.batch import WHOLE_BATCH

# ---------------------------------------------------------------- independent reference


def softmax(z):
    top = max(z)
    e = [math.exp(x - top) for x in z]
    total = sum(e)
    return [x / total for x in e]


def reference_quantities(teacher, student, target):
    """(d_t, d_s, G, δ) of the spec, sample by sample, class by class."""
    n = len(target)
    d_t = d_s = gap = 0.0
    for z_t, z_s, label in zip(teacher, student, target):
        p_t, p_s = softmax(z_t), softmax(z_s)
        y = [1.0 if c == label else 0.0 for c in range(len(z_t))]
        d_t += sum(abs(a - b) for a, b in zip(p_t, y)) / n
        d_s += sum(abs(a - b) for a, b in zip(p_s, y)) / n
        gap += sum(abs(a - b) for a, b in zip(p_s, p_t)) / n
    epsilon = math.exp(-d_t / (d_t + d_s)) if d_t + d_s > 0 else 1.0
    return d_t, d_s, gap, d_s - epsilon * d_t


def reference_expert(teacher, student, target) -> bool:
    d_t, d_s, gap, delta = reference_quantities(teacher, student, target)
    return gap > delta and d_t < d_s


# ---------------------------------------------------------------- switokd


def random_case(seed: int, batch: int = 16, classes: int = 10):
    generator = torch.Generator().manual_seed(seed)
    scale_t, scale_s = torch.rand(2, generator=generator) * 6
    target = torch.randint(0, classes, (batch,), generator=generator)
    teacher = torch.randn(batch, classes, generator=generator) * scale_t
    student = torch.randn(batch, classes, generator=generator) * scale_s
    # Some of the teachers know the labels better: every branch of the rule appears.
    teacher[torch.arange(batch), target] += torch.rand(1, generator=generator).item() * 8
    return teacher, student, target


def test_switokd_matches_the_reference_on_random_logits_and_meets_every_branch():
    branches = {"expert": 0, "gap below threshold": 0, "teacher not ahead, gap above threshold": 0}
    for seed in range(300):
        teacher, student, target = random_case(seed)
        expected = reference_expert(teacher.tolist(), student.tolist(), target.tolist())
        assert switokd(teacher, student, target) is expected, seed
        d_t, d_s, gap, delta = reference_quantities(teacher.tolist(), student.tolist(), target.tolist())
        if expected:
            branches["expert"] += 1
        elif gap <= delta:
            branches["gap below threshold"] += 1
        elif d_t >= d_s:
            branches["teacher not ahead, gap above threshold"] += 1
    # The d_t >= d_s condition decides some cases on its own (G > δ there): dropping it would fail them.
    assert all(count > 0 for count in branches.values()), branches


def test_switokd_quantities_match_the_reference():
    from cohort.gates.switokd import switching_quantities

    teacher, student, target = random_case(7)
    d_t, d_s, gap, _ = reference_quantities(teacher.tolist(), student.tolist(), target.tolist())
    assert switching_quantities(teacher, student, target) == pytest.approx((d_t, d_s, gap), rel=1e-12)


def test_switokd_ties_are_learning_mode():
    generator = torch.Generator().manual_seed(3)
    target = torch.randint(0, 5, (8,), generator=generator)
    student = torch.randn(8, 5, generator=generator)
    # d_t == d_s exactly (the same logits): not d_t < d_s, so learning mode (G = 0 anyway).
    assert switokd(student.clone(), student, target) is False
    # A teacher exactly on the labels (softmax underflows to one-hot in float64): d_t = 0, ε = 1,
    # δ = d_s, and G = ‖p_s − y‖₁ = d_s: G == δ, and the strict G > δ keeps learning mode.
    teacher = torch.full((8, 5), -1000.0)
    teacher[torch.arange(8), target] = 1000.0
    from cohort.gates.switokd import switching_quantities

    d_t, d_s, gap = switching_quantities(teacher, student, target)
    assert d_t == 0.0 and gap == d_s > 0
    assert switokd(teacher, student, target) is False


def test_switokd_decides_from_batch_means_not_per_sample():
    # Sample 0: the teacher ahead but close (learning); sample 1: the teacher behind (learning).
    # Their batch means put the teacher ahead and the gap above the threshold: expert mode.
    target = torch.tensor([0, 1])
    teacher = torch.tensor([[3.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    student = torch.tensor([[0.0, 0.0, 2.0], [0.0, 2.0, 0.0]])
    per_sample = [switokd(teacher[i:i + 1], student[i:i + 1], target[i:i + 1]) for i in range(2)]
    assert per_sample == [False, False]
    assert switokd(teacher, student, target) is True
    assert reference_expert(teacher.tolist(), student.tolist(), target.tolist()) is True


def test_switokd_takes_its_means_through_batch():
    class Halved(type(WHOLE_BATCH)):
        def mean(self, values):
            return super().mean(values) / 2  # any other reduction shows in the decision's inputs

    from cohort.gates.switokd import switching_quantities

    teacher, student, target = random_case(1)
    whole = switching_quantities(teacher, student, target)
    halved = switching_quantities(teacher, student, target, Halved())
    assert halved == pytest.approx(tuple(value / 2 for value in whole))
    assert get_gate("switokd").batch_statistics and not get_gate("switokd").stateful


def test_switokd_carries_no_gradient():
    teacher, student, target = random_case(2)
    teacher.requires_grad_(True), student.requires_grad_(True)
    assert isinstance(switokd(teacher, student, target), bool)
    assert teacher.grad is None and student.grad is None


# ---------------------------------------------------------------- the registry


@pytest.fixture
def clean_registry():
    before = dict(GATES)
    yield
    GATES.clear()
    GATES.update(before)


def test_register_reads_signature(clean_registry):
    def patience(teacher_logits, student_logits, target, margin: float = 0.5, state=None, batch=WHOLE_BATCH):
        return False

    assert register_gate("patience")(patience) is patience
    spec = get_gate("patience")
    assert spec.params == {"margin": 0.5} and spec.context == ("target",)
    assert spec.stateful and spec.batch_statistics
    assert get_gate("switokd").params == {} and get_gate("switokd").context == ("target",)


def _bad_order(student_logits, teacher_logits): ...
def _no_default(teacher_logits, student_logits, margin): ...
def _kwargs(teacher_logits, student_logits, **options): ...
def _state_default(teacher_logits, student_logits, state={}): ...  # noqa: B006
def _batch_default(teacher_logits, student_logits, batch=None): ...
def _field_name(teacher_logits, student_logits, rule="x"): ...
def _context_default(teacher_logits, student_logits, target=None): ...


@pytest.mark.parametrize("fn", [_bad_order, _no_default, _kwargs, _state_default, _batch_default, _field_name,
                                _context_default])
def test_register_rejects_bad_signature(clean_registry, fn):
    with pytest.raises(ValueError):
        register_gate("bad")(fn)


def test_register_rejects_duplicate_name(clean_registry):
    with pytest.raises(ValueError, match="already registered"):
        register_gate("switokd")(lambda teacher_logits, student_logits: False)


def test_unknown_gate_names_the_known_ones():
    with pytest.raises(KeyError, match="switokd"):
        get_gate("nope")


def test_a_new_gate_file_is_registered_on_import(fresh_interpreter):
    # A copy of the package with gates/always.py added, imported in a fresh interpreter (conftest.FRESH_STEPS).
    assert fresh_interpreter("a new loss file and a new gate file").result["gates"] == ["always", "switokd"]


# ---------------------------------------------------------------- a step's decision


def one_teacher_two_students():
    from cohort.topology import topology_from_dict

    return topology_from_dict({
        "name": "1t2s", "peers": {"t": {"model": "mlp"}, "a": {"model": "mlp_tiny"}, "b": {"model": "mlp_tiny"}},
        "edges": [{"from": "t", "to": "a", "loss": "kd"}, {"from": "t", "to": "b", "loss": "kd"},
                  {"from": "b", "to": "a", "loss": "kd"},
                  {"from": "a", "to": "t", "loss": "kd"}, {"from": "b", "to": "t", "loss": "kd"},
                  {"from": {"ensemble": ["a", "b"]}, "to": "t", "loss": "kd"}],
        "gates": [{"rule": "switokd", "teacher": "t", "student": "a"},
                  {"rule": "switokd", "teacher": "t", "student": "b"}]})


@pytest.fixture
def scripted_gate(clean_registry):
    """A gate whose answers the test sets: fires for the students in ``fires``."""
    fires: set[str] = set()

    @register_gate("scripted")
    def scripted(teacher_logits, student_logits, target):
        return bool(student_logits[0, 0].item() in fires_codes())

    codes = {"a": 1.0, "b": 2.0}

    def fires_codes():
        return {codes[name] for name in fires}

    return fires, codes


@pytest.mark.parametrize("firing, paused, off", [
    (set(), set(), set()),
    ({"a"}, set(), {3}),  # learns from b only (its CE and the ensemble edge stay on)
    ({"b"}, set(), {4}),
    ({"a", "b"}, {"t"}, {3, 4}),  # every student in expert mode: the teacher pauses
])
def test_one_teacher_two_students_follow_the_authors_variant(scripted_gate, firing, paused, off):
    from cohort.gates.decision import decide

    fires, codes = scripted_gate
    fires.update(firing)
    topology = one_teacher_two_students()
    gates = [gate.model_copy(update={"rule": "scripted"}) for gate in topology.gates]
    logits = {name: torch.full((4, 10), codes.get(name, 0.0)) for name in topology.peer_names}
    decision = decide(gates, logits, torch.zeros(4, dtype=torch.long))
    assert decision.fired == tuple(name in firing for name in ("a", "b"))
    assert decision.paused == paused
    edges = topology.incoming_edges("t")
    assert decision.edges_off("t", edges) == {index - 3 for index in off}
    assert decision.edges_off("a", topology.incoming_edges("a")) == set()  # students always learn from all


def test_switched_off_edges_add_nothing_and_the_others_keep_their_weights():
    from cohort.losses import kd
    from cohort.losses.combine import peer_objective

    topology = one_teacher_two_students()
    generator = torch.Generator().manual_seed(0)
    logits = {name: torch.randn(6, 10, generator=generator) for name in topology.peer_names}
    labels = torch.randint(0, 10, (6,), generator=generator)
    edges = topology.incoming_edges("t")
    total, terms = peer_objective(logits["t"], labels, edges, logits, off={0})
    ensemble = (logits["a"] + logits["b"]) / 2
    expected = (torch.nn.functional.cross_entropy(logits["t"], labels) + kd(logits["t"], logits["b"]).mean() / 3
                + kd(logits["t"], ensemble).mean() / 3)  # three mean-reduced edges: 1/3 each, one off
    torch.testing.assert_close(total, expected)
    assert "a->t:kd" not in terms and "b->t:kd" in terms


def test_the_epoch_counts_pauses_and_each_gates_share():
    from cohort.gates.decision import StepDecision
    from cohort.worker.report import EpochStats

    topology = one_teacher_two_students()
    stats = EpochStats.for_peer(topology, "t")
    steps = [((True, True), {"t"}), ((True, False), set()), ((False, False), set()), ((True, True), {"t"})]
    for fired, paused in steps:
        stats.add(0.0, torch.zeros(2, 10), torch.zeros(2, dtype=torch.long))
        stats.count_gates("t", StepDecision(fired, frozenset(paused), frozenset()), topology.gates)
    summary = stats.summary()
    assert (summary["paused"], summary["expert_a"], summary["expert_b"]) == (0.5, 0.75, 0.5)
    assert EpochStats.for_peer(topology, "a").summary()["paused"] == 0.0
    assert "paused" not in EpochStats().summary()  # no gates, no paused metric
    assert EpochStats.merged([stats, EpochStats.for_peer(topology, "t")]).summary()["paused"] == 0.5


def test_a_stateful_gate_keeps_its_state_across_a_checkpoint(clean_registry, tmp_path):
    from cohort.gates.decision import Gating
    from cohort.worker.checkpoint import load_peer_state, save_peer_state

    @register_gate("every_other")
    def every_other(teacher_logits, student_logits, state=None):
        state["steps"] = state.get("steps", 0) + 1
        return state["steps"] % 2 == 0

    topology = one_teacher_two_students()
    gates = [topology.gates[0].model_copy(update={"rule": "every_other"})]
    logits = {name: torch.zeros(2, 10) for name in topology.peer_names}
    target = torch.zeros(2, dtype=torch.long)
    gating = Gating(gates)
    assert [gating(logits, target).fired for _ in range(3)] == [(False,), (True,), (False,)]
    save_peer_state(tmp_path, "t", {"gates": gating.state_dict()})
    resumed = Gating(gates)
    resumed.load_state_dict(load_peer_state(tmp_path, "t")["gates"])
    assert resumed(logits, target).fired == (True,)  # the fourth step, not the first
