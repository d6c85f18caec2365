"""The distillation losses against independent computations and the identities of docs/losses.md.

The references below are plain-Python float64 loops over classes (``math``, no torch), so they
share nothing with the implementation except the formulas of docs/losses.md.
"""

from __future__ import annotations

import math

import pytest
import torch

from cohort.losses import (
    LOSSES,
    LossSpec,
    attention,
    bdkd,
    dkd,
    get_loss,
    kd,
    ltkd,
    mcl,
    register_loss,
    reverse_kd,
)
from cohort.losses.batch import WHOLE_BATCH

B, C = 8, 7
GROUPS = [0, 0, 1, 2, 1, 2, 2]  # deliberately not contiguous


# ---------------------------------------------------------------- independent references


def softmax(z, T):
    top = max(z)
    e = [math.exp((x - top) / T) for x in z]
    total = sum(e)
    return [x / total for x in e]


def kl(p, q):
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q) if pi > 0)


def entropy(p):
    return -sum(pi * math.log(pi) for pi in p if pi > 0)


def ref_kd(r, s, T):
    return [T * T * kl(softmax(si, T), softmax(ri, T)) for ri, si in zip(r, s)]


def ref_reverse_kd(r, s, T):
    return [T * T * kl(softmax(ri, T), softmax(si, T)) for ri, si in zip(r, s)]


def ref_bdkd(r, s, T, delta_high, delta_low):
    out = []
    for ri, si in zip(r, s):
        p_r, p_s = softmax(ri, T), softmax(si, T)
        if entropy(p_r) < entropy(p_s):
            w_f, w_r = delta_high, delta_low
        else:
            w_f, w_r = delta_low, delta_high
        out.append(T * T * (w_f * kl(p_s, p_r) + w_r * kl(p_r, p_s)))
    return out


def ref_tckd_nckd(r, s, target, T):
    """Per sample (TCKD, NCKD); the non-target distribution is a softmax over the other classes."""
    out = []
    for ri, si, t in zip(r, s, target):
        p_r, p_s = softmax(ri, T), softmax(si, T)
        b_r = [p_r[t], sum(p for c, p in enumerate(p_r) if c != t)]
        b_s = [p_s[t], sum(p for c, p in enumerate(p_s) if c != t)]
        n_r = softmax([z for c, z in enumerate(ri) if c != t], T)
        n_s = softmax([z for c, z in enumerate(si) if c != t], T)
        out.append((T * T * kl(b_s, b_r), T * T * kl(n_s, n_r)))
    return out


def ref_dkd(r, s, target, T, alpha, beta):
    return [alpha * tc + beta * nc for tc, nc in ref_tckd_nckd(r, s, target, T)]


def group_split(p, groups):
    """(group masses b, within-group distributions p~) of one sample."""
    G = max(groups) + 1
    b = [sum(p[c] for c in range(len(p)) if groups[c] == g) for g in range(G)]
    within = [[p[c] / b[g] for c in range(len(p)) if groups[c] == g] for g in range(G)]
    return b, within


def ref_rebalanced(s, groups, T):
    """Per-sample b^_s: w_G = 1 / (G m_G), m_G the batch mean of the sender's group mass."""
    G = max(groups) + 1
    masses = [group_split(softmax(si, T), groups)[0] for si in s]
    m = [sum(b[g] for b in masses) / len(masses) for g in range(G)]
    w = [1 / (G * m[g]) for g in range(G)]
    out = []
    for b in masses:
        total = sum(w[g] * b[g] for g in range(G))
        out.append([w[g] * b[g] / total for g in range(G)])
    return out


def ref_ltkd(r, s, groups, T, alpha, beta, rebalance, uniform):
    G = max(groups) + 1
    b_hat = ref_rebalanced(s, groups, T)
    out = []
    for i, (ri, si) in enumerate(zip(r, s)):
        b_r, within_r = group_split(softmax(ri, T), groups)
        b_s, within_s = group_split(softmax(si, T), groups)
        inter = kl(b_hat[i] if rebalance else b_s, b_r)
        u = [1 / G] * G if uniform else b_s
        intra = sum(u[g] * kl(within_s[g], within_r[g]) for g in range(G))
        out.append(T * T * (alpha * inter + beta * intra))
    return out


# ---------------------------------------------------------------- fixtures and helpers


@pytest.fixture
def batch():
    gen = torch.Generator().manual_seed(0)
    receiver = 3 * torch.randn(B, C, generator=gen, dtype=torch.float64)
    sender = 3 * torch.randn(B, C, generator=gen, dtype=torch.float64)
    target = torch.randint(0, C, (B,), generator=gen)
    return receiver, sender, target, torch.tensor(GROUPS)


def call(name, receiver, sender, target, groups, **params):
    """Call a registered loss the way the trainer does: context by name, then edge parameters."""
    spec = get_loss(name)
    context = {"target": target, "groups": groups}
    return spec.fn(receiver, sender, **{k: context[k] for k in spec.context}, **params)


def assert_matches(actual, expected):
    assert actual.shape == (len(expected),)
    torch.testing.assert_close(
        actual, torch.tensor(expected, dtype=actual.dtype), rtol=1e-5, atol=1e-12
    )


# ---------------------------------------------------------------- registry


def test_registry_contents():
    expected = {
        "kd": ({"temperature": 4.0}, ()),
        "reverse_kd": ({"temperature": 4.0}, ()),
        "bdkd": ({"temperature": 4.0, "delta_high": 1.0, "delta_low": 0.5}, ()),
        "dkd": ({"temperature": 4.0, "alpha": 1.0, "beta": 8.0}, ("target",)),
        "ltkd": (
            {
                "temperature": 4.0,
                "alpha": 1.0,
                "beta": 1.0,
                "rebalance": True,
                "uniform": True,
            },
            ("groups",),
        ),
        "mcl": ({"beta": 0.1, "gamma": 1.0, "lam": 1.0, "tau": 0.07, "temperature": 3.0}, ("target",)),
        "attention": ({"beta": 1000.0}, ()),
    }
    payloads = {"mcl": "embedding", "attention": "maps"}
    assert set(LOSSES) == set(expected)
    functions = {"kd": kd, "reverse_kd": reverse_kd, "bdkd": bdkd, "dkd": dkd, "ltkd": ltkd, "mcl": mcl,
                 "attention": attention}
    for name, (params, context) in expected.items():
        spec = get_loss(name)
        assert isinstance(spec, LossSpec)
        assert (spec.name, spec.fn, spec.params, spec.context, spec.payload) == (
            name,
            functions[name],
            params,
            context,
            payloads.get(name, "logits"),
        )


def test_register_reads_signature(clean_registry):
    def custom(receiver, sender, groups, target, scale=2.0, *, flag=False):
        return receiver.sum(-1)

    assert register_loss("custom")(custom) is custom
    spec = get_loss("custom")
    assert spec.params == {"scale": 2.0, "flag": False}
    assert spec.context == ("groups", "target")


def _no_sender(receiver, temperature=1.0): ...
def _swapped(sender, receiver): ...
def _receiver_default(receiver=None, sender=None): ...
def _keyword_only_sender(receiver, *, sender): ...
def _required_tunable(receiver, sender, scale): ...
def _context_with_default(receiver, sender, target=None): ...
def _var_positional(receiver, sender, *rest): ...
def _var_keyword(receiver, sender, **options): ...


@pytest.mark.parametrize(
    "fn",
    [
        _no_sender,
        _swapped,
        _receiver_default,
        _keyword_only_sender,
        _required_tunable,
        _context_with_default,
        _var_positional,
        _var_keyword,
    ],
)
def test_register_rejects_bad_signature(clean_registry, fn):
    with pytest.raises(ValueError):
        register_loss("bad")(fn)
    assert "bad" not in LOSSES


def test_register_rejects_duplicate_name(clean_registry):
    def another_kd(receiver, sender, temperature=1.0):
        return receiver.sum(-1)

    with pytest.raises(ValueError, match="kd"):
        register_loss("kd")(another_kd)
    assert get_loss("kd").fn is kd


def test_get_loss_unknown_lists_known_names():
    with pytest.raises(KeyError) as info:
        get_loss("nope")
    message = str(info.value)
    assert "nope" in message
    assert all(name in message for name in ("kd", "reverse_kd", "bdkd", "dkd", "ltkd"))


# ---------------------------------------------------------------- values against references


def test_kd_and_reverse_kd_hand_computed():
    # p_s = [1/4, 3/4], p_r = [1/2, 1/2] at T = 1; the sender's logits scale with T at T = 2.
    for T in (1.0, 2.0):
        sender = torch.tensor([[0.0, T * math.log(3.0)]], dtype=torch.float64)
        receiver = torch.zeros(1, 2, dtype=torch.float64)
        forward = 0.25 * math.log(0.5) + 0.75 * math.log(1.5)
        reverse = 0.5 * math.log(2.0) + 0.5 * math.log(2.0 / 3.0)
        assert kd(receiver, sender, temperature=T).item() == pytest.approx(T * T * forward)
        assert reverse_kd(receiver, sender, temperature=T).item() == pytest.approx(T * T * reverse)


@pytest.mark.parametrize("T", [1.0, 4.0])
@pytest.mark.parametrize(
    "name, params, reference",
    [
        ("kd", {}, lambda r, s, t, g, T: ref_kd(r, s, T)),
        ("reverse_kd", {}, lambda r, s, t, g, T: ref_reverse_kd(r, s, T)),
        ("bdkd", {}, lambda r, s, t, g, T: ref_bdkd(r, s, T, 1.0, 0.5)),
        (
            "bdkd",
            {"delta_high": 2.0, "delta_low": 0.1},
            lambda r, s, t, g, T: ref_bdkd(r, s, T, 2.0, 0.1),
        ),
        ("dkd", {}, lambda r, s, t, g, T: ref_dkd(r, s, t, T, 1.0, 8.0)),
        (
            "dkd",
            {"alpha": 0.5, "beta": 2.0},
            lambda r, s, t, g, T: ref_dkd(r, s, t, T, 0.5, 2.0),
        ),
        ("ltkd", {}, lambda r, s, t, g, T: ref_ltkd(r, s, g, T, 1.0, 1.0, True, True)),
        (
            "ltkd",
            {"alpha": 2.0, "beta": 0.5, "rebalance": False, "uniform": True},
            lambda r, s, t, g, T: ref_ltkd(r, s, g, T, 2.0, 0.5, False, True),
        ),
        (
            "ltkd",
            {"alpha": 0.5, "beta": 3.0, "rebalance": True, "uniform": False},
            lambda r, s, t, g, T: ref_ltkd(r, s, g, T, 0.5, 3.0, True, False),
        ),
    ],
)
def test_matches_reference(batch, name, params, reference, T):
    receiver, sender, target, groups = batch
    out = call(name, receiver, sender, target, groups, temperature=T, **params)
    expected = reference(receiver.tolist(), sender.tolist(), target.tolist(), GROUPS, T)
    assert_matches(out, expected)


@pytest.mark.parametrize("T", [1.0, 4.0])
def test_dkd_tckd_and_nckd_separately(batch, T):
    receiver, sender, target, _ = batch
    terms = ref_tckd_nckd(receiver.tolist(), sender.tolist(), target.tolist(), T)
    assert_matches(dkd(receiver, sender, target, T, alpha=1.0, beta=0.0), [t for t, _ in terms])
    assert_matches(dkd(receiver, sender, target, T, alpha=0.0, beta=1.0), [n for _, n in terms])


@pytest.mark.parametrize("T", [1.0, 4.0])
def test_ltkd_rebalanced_inter_term(batch, T):
    receiver, sender, _, groups = batch
    b_hat = ref_rebalanced(sender.tolist(), GROUPS, T)
    expected = [
        T * T * kl(b_hat[i], group_split(softmax(ri, T), GROUPS)[0])
        for i, ri in enumerate(receiver.tolist())
    ]
    assert_matches(ltkd(receiver, sender, groups, T, alpha=1.0, beta=0.0), expected)


def test_ltkd_rebalancing_of_a_single_sample_is_uniform(batch):
    # With B = 1, m_G = b_{s,G}, so b^_s is uniform over the groups.
    receiver, sender, _, groups = batch
    T = 2.0
    b_r = group_split(softmax(receiver[0].tolist(), T), GROUPS)[0]
    expected = T * T * kl([1 / 3] * 3, b_r)
    out = ltkd(receiver[:1], sender[:1], groups, T, alpha=1.0, beta=0.0)
    assert out.item() == pytest.approx(expected, rel=1e-9)


# ---------------------------------------------------------------- identities (docs/losses.md)


@pytest.mark.parametrize("T", [0.5, 1.0, 4.0, 20.0])
def test_ltkd_without_rebalancing_and_uniform_is_kd(batch, T):
    receiver, sender, _, groups = batch
    out = ltkd(receiver, sender, groups, T, alpha=1.0, beta=1.0, rebalance=False, uniform=False)
    torch.testing.assert_close(out, kd(receiver, sender, T), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("T", [1.0, 4.0])
def test_ltkd_exact_decomposition(batch, T):
    """KL(p_s ‖ p_r) = KL(b_s ‖ b_r) + Σ_G b_{s,G} · KL(p~_{s,G} ‖ p~_{r,G})."""
    receiver, sender, _, groups = batch
    total = kd(receiver, sender, T) / T**2
    # Independently, term by term...
    for i, (ri, si) in enumerate(zip(receiver.tolist(), sender.tolist())):
        b_r, within_r = group_split(softmax(ri, T), GROUPS)
        b_s, within_s = group_split(softmax(si, T), GROUPS)
        inter = kl(b_s, b_r)
        intra = sum(b_s[g] * kl(within_s[g], within_r[g]) for g in range(3))
        assert total[i].item() == pytest.approx(inter + intra, rel=1e-10)
        assert 0 < inter < total[i].item()  # both parts are really there
    # ...and with ltkd's own two terms.
    inter = ltkd(receiver, sender, groups, T, alpha=1.0, beta=0.0, rebalance=False)
    intra = ltkd(receiver, sender, groups, T, alpha=0.0, beta=1.0, uniform=False)
    torch.testing.assert_close(inter + intra, total * T**2, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("T", [1.0, 4.0])
def test_bdkd_unweighted_is_kd_plus_reverse_kd(batch, T):
    receiver, sender, _, _ = batch
    out = bdkd(receiver, sender, T, delta_high=1.0, delta_low=1.0)
    expected = kd(receiver, sender, T) + reverse_kd(receiver, sender, T)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-12)


def test_bdkd_picks_delta_high_for_forward_kl_where_receiver_is_more_confident():
    T, high, low = 2.0, 3.0, 0.25
    receiver = torch.tensor([[6.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 5.0, 0.0], [0.0, 0.0, 0.5]])
    sender = torch.tensor([[1.0, 0.0, 0.0], [6.0, 0.0, 0.0], [0.5, 0.0, 0.0], [0.0, 0.0, 4.0]])
    receiver, sender = receiver.double(), sender.double()
    more_confident = [True, False, True, False]  # H_r < H_s

    out = bdkd(receiver, sender, T, delta_high=high, delta_low=low)
    forward = ref_kd(receiver.tolist(), sender.tolist(), T)
    reverse = ref_reverse_kd(receiver.tolist(), sender.tolist(), T)
    for i, confident in enumerate(more_confident):
        h_r = entropy(softmax(receiver[i].tolist(), T))
        h_s = entropy(softmax(sender[i].tolist(), T))
        assert (h_r < h_s) == confident  # the batch really holds both kinds of samples
        w_f, w_r = (high, low) if confident else (low, high)
        expected = w_f * forward[i] + w_r * reverse[i]
        swapped = w_r * forward[i] + w_f * reverse[i]
        assert expected != pytest.approx(swapped, rel=1e-3)  # the choice is visible
        assert out[i].item() == pytest.approx(expected, rel=1e-10)


# ---------------------------------------------------------------- gradients


NAMES = ["kd", "reverse_kd", "bdkd", "dkd", "ltkd"]


@pytest.mark.parametrize("name", NAMES)
def test_gradients_reach_receiver_and_never_sender(batch, name):
    receiver, sender, target, groups = batch
    receiver.requires_grad_(True)
    sender.requires_grad_(True)
    call(name, receiver, sender, target, groups).sum().backward()
    assert sender.grad is None
    assert receiver.grad is not None
    assert torch.isfinite(receiver.grad).all()
    assert receiver.grad.abs().sum() > 0


@pytest.mark.parametrize("name", NAMES)
def test_receiver_gradient_matches_finite_differences(batch, name):
    receiver, sender, target, groups = batch
    receiver.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda r: call(name, r, sender, target, groups, temperature=2.0), (receiver,)
    )


# ---------------------------------------------------------------- numerical stability


def extreme_logits(dtype):
    gen = torch.Generator().manual_seed(1)
    receiver = 1e4 * torch.randint(-1, 2, (B, C), generator=gen).to(dtype)
    sender = 1e4 * torch.randint(-1, 2, (B, C), generator=gen).to(dtype)
    # Opposite one-hot confidences, and a row where every logit is equal.
    receiver[0], sender[0] = -1e4, -1e4
    receiver[0, 1], sender[0, 0] = 1e4, 1e4
    receiver[1], sender[1] = 1e4, 1e4
    # DKD's target on a class the receiver rules out.
    target = torch.randint(0, C, (B,), generator=gen)
    target[0] = 0
    return receiver, sender, target


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("T", [0.5, 1.0, 4.0, 20.0])
@pytest.mark.parametrize("name", NAMES)
def test_extreme_logits_give_finite_values_and_gradients(name, T, dtype):
    receiver, sender, target = extreme_logits(dtype)
    receiver.requires_grad_(True)
    out = call(name, receiver, sender, target, torch.tensor(GROUPS), temperature=T)
    assert out.shape == (B,)
    assert out.dtype == dtype
    assert torch.isfinite(out).all()
    assert (out > -1e-3).all()  # KL is non-negative, up to rounding
    out.sum().backward()
    assert torch.isfinite(receiver.grad).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("T", [0.5, 1.0, 4.0, 20.0])
def test_extreme_logits_hand_value(T, dtype):
    # p_s = [1, e^(-2e4/T)], p_r reversed: KL = 2e4 / T exactly up to e^(-2e4/T), times T².
    sender = torch.tensor([[1e4, -1e4]], dtype=dtype)
    receiver = torch.tensor([[-1e4, 1e4]], dtype=dtype)
    assert kd(receiver, sender, T).item() == pytest.approx(2e4 * T, rel=1e-6)
    assert reverse_kd(receiver, sender, T).item() == pytest.approx(2e4 * T, rel=1e-6)


DEFAULT_REFERENCES = {
    "kd": lambda r, s, t, g, T: ref_kd(r, s, T),
    "reverse_kd": lambda r, s, t, g, T: ref_reverse_kd(r, s, T),
    "bdkd": lambda r, s, t, g, T: ref_bdkd(r, s, T, 1.0, 0.5),
    "dkd": lambda r, s, t, g, T: ref_dkd(r, s, t, T, 1.0, 8.0),
    "ltkd": lambda r, s, t, g, T: ref_ltkd(r, s, g, T, 1.0, 1.0, True, True),
}


@pytest.mark.parametrize("name", NAMES)
def test_class_ruled_out_by_both_gives_zero_terms_not_nan(batch, name):
    # A -inf logit makes log p = -inf exactly; 0 · log 0 must count as 0, in values and gradients.
    receiver, sender, target, groups = batch
    receiver, sender = receiver.clone(), sender.clone()
    receiver[:, 3] = sender[:, 3] = float("-inf")
    target[0] = 3
    receiver.requires_grad_(True)
    out = call(name, receiver, sender, target, groups, temperature=2.0)
    expected = DEFAULT_REFERENCES[name](
        receiver.tolist(), sender.tolist(), target.tolist(), GROUPS, 2.0
    )
    assert_matches(out.detach(), expected)
    out.sum().backward()
    assert torch.isfinite(receiver.grad).all()


# ---------------------------------------------------------------- argument validation


@pytest.mark.parametrize("T", [0.0, -1.0])
@pytest.mark.parametrize("name", NAMES)
def test_rejects_non_positive_temperature(batch, name, T):
    receiver, sender, target, groups = batch
    with pytest.raises(ValueError, match="temperature"):
        call(name, receiver, sender, target, groups, temperature=T)


@pytest.mark.parametrize(
    "groups",
    [
        torch.tensor([0, 1, 2]),  # wrong length
        torch.tensor([0.0, 0.0, 1.0, 2.0, 1.0, 2.0, 2.0]),  # not integer
        torch.tensor([0, 0, 1, 2, 1, 2, 2], dtype=torch.int32),  # not a LongTensor
        torch.tensor([GROUPS]),  # 2-D
        torch.tensor([0, 0, 2, 2, 0, 2, 2]),  # group 1 is empty
        torch.tensor([-1, 0, 1, 2, 1, 2, 2]),  # negative index
        GROUPS,  # a list, not a tensor
    ],
)
def test_ltkd_rejects_bad_groups(batch, groups):
    receiver, sender, _, _ = batch
    with pytest.raises(ValueError):
        ltkd(receiver, sender, groups)


# ---------------------------------------------------------------- batch statistics and replicas


@pytest.mark.parametrize("name", sorted(name for name, spec in LOSSES.items() if spec.payload == "logits"))
def test_every_loss_is_per_sample_unless_it_declares_batch_statistics(batch, name):
    """A logit loss computed on two halves of a batch equals the whole batch's, or the loss takes its
    statistics through ``batch`` (then replicas get the whole batch's): nothing breaks silently
    under replicas. (Losses of other payloads return a scalar: tests/test_representation_losses.py.)"""
    receiver, sender, target, groups = batch
    spec = get_loss(name)
    whole = call(name, receiver, sender, target, groups)
    halves = torch.cat([call(name, receiver[part], sender[part], target[part], groups)
                        for part in (slice(0, 3), slice(3, None))])
    if spec.batch_statistics:
        assert not torch.allclose(halves, whole)  # the test batch does tell the two apart
    else:
        torch.testing.assert_close(halves, whole)


def test_ltkd_declares_batch_statistics_and_takes_the_whole_batch_from_batch(batch):
    receiver, sender, _, groups = batch
    assert get_loss("ltkd").batch_statistics and not get_loss("kd").batch_statistics
    whole = ltkd(receiver, sender, groups)
    seen = []

    class Recorder(WHOLE_BATCH.__class__):
        def logmeanexp(self, log_values):
            seen.append(log_values.shape[0])
            return super().logmeanexp(full_log_masses)

    log_p = torch.log_softmax(sender / 4.0, dim=-1)
    full_log_masses = torch.stack([log_p[:, groups == g].logsumexp(dim=-1) for g in range(3)], dim=-1)
    first = ltkd(receiver[:3], sender[:3], groups, batch=Recorder())
    assert seen == [3]
    torch.testing.assert_close(first, whole[:3])


def test_a_batch_parameter_must_default_to_the_whole_batch(clean_registry):
    with pytest.raises(ValueError, match="'batch' must default to WHOLE_BATCH"):
        @register_loss("bad_batch")
        def bad_batch(receiver, sender, batch=None):
            return receiver.sum(dim=-1)


@pytest.mark.parametrize("name", ["weight", "to", "loss", "reduce", "warmup", "source"])
def test_register_rejects_a_parameter_named_like_an_edge_field(clean_registry, name):
    import inspect

    def fn(receiver, sender, **params):
        return receiver.sum(-1)

    positional = inspect.Parameter.POSITIONAL_OR_KEYWORD
    fn.__signature__ = inspect.Signature([inspect.Parameter("receiver", positional),
                                          inspect.Parameter("sender", positional),
                                          inspect.Parameter(name, positional, default=1.0)])
    before = dict(LOSSES)
    with pytest.raises(ValueError, match=f"parameter '{name}' is named like an edge field"):
        register_loss("shadowed")(fn)
    assert LOSSES == before


def test_reserved_names_cover_every_edge_field():
    from cohort.losses.registry import EDGE_FIELD_NAMES
    from cohort.topology.edges import EDGE_FIELDS, Edge

    names = set(Edge.model_fields) | {field.alias for field in Edge.model_fields.values() if field.alias}
    assert names | set(EDGE_FIELDS) <= set(EDGE_FIELD_NAMES)
    for spec in LOSSES.values():
        assert not set(spec.params) & set(EDGE_FIELD_NAMES)


def test_every_file_of_the_package_is_imported_so_a_new_loss_is_one_file(fresh_interpreter):
    import pkgutil
    import sys

    import cohort.losses as package

    names = [module.name for module in pkgutil.iter_modules(package.__path__)]
    assert {"kd", "bdkd", "ltkd", "registry", "divergence"} <= set(names)
    assert all(f"cohort.losses.{name}" in sys.modules for name in names)
    # A new file is picked up in a fresh interpreter, registered under its name (conftest.FRESH_STEPS).
    assert fresh_interpreter("a new loss file and a new gate file").result["my_loss"] == {"scale": 2.0}
