"""MCL and online attention transfer (cohort.losses.mcl, cohort.losses.attention) against hand-computed
values, independent references, and the exactness rule of the representations contract: each peer's
own objective, computed from the others' detached tensors, has the gradients of the one-process total.

The references are plain-Python loops (``math``) or torch functions other than the ones the
implementation uses (``F.kl_div``, block means instead of ``adaptive_avg_pool2d``).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from cohort.losses import LOSSES, get_loss, register_loss
from cohort.losses.attention import attention, attention_map, matched_size, matched_sizes
from cohort.losses.mcl import contrastive, mcl, similarity, soft_relation, vcl

# ---------------------------------------------------------------- independent references


def ref_contrastive(s, labels):
    """C(S) by loops: rows without a positive left out of the mean, 0 when no row has one."""
    size = len(s)
    total, rows = 0.0, 0
    for u in range(size):
        positives = [v for v in range(size) if v != u and labels[v] == labels[u]]
        if not positives:
            continue
        log_denominator = math.log(sum(math.exp(s[u][w]) for w in range(size) if w != u))
        total += sum(s[u][v] - log_denominator for v in positives) / len(positives)
        rows += 1
    return -total / rows if rows else 0.0


def ref_pool(feature, size):
    """Average pooling by block means (the sizes divide): independent of adaptive_avg_pool2d."""
    b, c, height, width = feature.shape
    h, w = size
    return feature.reshape(b, c, h, height // h, w, width // w).mean(dim=(3, 5))


def ref_attention_rows(feature):
    """a(f) as [B, HW]: mean over channels of f², each row divided by its L2 norm."""
    energy = (feature * feature).sum(dim=1) / feature.shape[1]
    rows = energy.reshape(feature.shape[0], -1)
    return rows / rows.pow(2).sum(dim=1, keepdim=True).sqrt()


def ref_at_edge(receiver_features, sender_features, beta):
    """AT_{j→i} of the spec in one process: both raw features given, the larger pooled to the smaller."""
    total = 0.0
    for f_i, f_j in zip(receiver_features, sender_features):
        size = (min(f_i.shape[2], f_j.shape[2]), min(f_i.shape[3], f_j.shape[3]))
        a_i = ref_attention_rows(ref_pool(f_i, size))
        a_j = ref_attention_rows(ref_pool(f_j, size)).detach()
        total = total + ((a_i - a_j) ** 2).mean()
    return beta * total


def random_embeddings(gen, b, d, dtype=torch.float64):
    return F.normalize(torch.randn(b, d, generator=gen, dtype=dtype), dim=1)


# ---------------------------------------------------------------- the contrastive loss C(S)


def test_contrastive_by_hand():
    # Labels 0, 0, 1, 2: rows 0 and 1 are each other's positive; rows 2 and 3 have none (left out).
    # The diagonal (5, 7, ...) enters neither the positives nor the denominators.
    s = torch.tensor([[5.0, 1.0, 0.0, 0.0],
                      [2.0, 7.0, 0.0, 1.0],
                      [3.0, -1.0, 4.0, 2.0],
                      [0.5, 0.5, 0.5, 9.0]], dtype=torch.float64)
    labels = torch.tensor([0, 0, 1, 2])
    e = math.e
    row0 = 1.0 - math.log(e**1 + e**0 + e**0)  # ℓ_01
    row1 = 2.0 - math.log(e**2 + e**0 + e**1)  # ℓ_10
    expected = -(row0 + row1) / 2
    assert contrastive(s, labels).item() == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("labels", [
    [0, 0, 1, 1, 2, 2, 3, 3],  # the authors' batches: m = 2 per class
    [0, 1, 0, 2, 1, 0, 3, 4],  # uneven, with two rows without a positive
    [5, 5, 5, 5, 5, 5, 5, 5],  # one class: every other row is a positive
])
def test_contrastive_against_the_loop_reference(labels):
    gen = torch.Generator().manual_seed(1)
    z = random_embeddings(gen, len(labels), 5)
    s = similarity(z, z, 0.07)
    assert contrastive(s, torch.tensor(labels)).item() == pytest.approx(ref_contrastive(s.tolist(), labels),
                                                                        rel=1e-10)
    # not symmetric in general: a cross-network matrix
    other = random_embeddings(gen, len(labels), 5)
    s = similarity(z, other, 0.07)
    assert contrastive(s, torch.tensor(labels)).item() == pytest.approx(ref_contrastive(s.tolist(), labels),
                                                                        rel=1e-10)


def test_contrastive_leaves_rows_without_a_positive_out_of_the_mean():
    gen = torch.Generator().manual_seed(2)
    s = 3 * torch.randn(6, 6, generator=gen, dtype=torch.float64)
    labels = torch.tensor([0, 0, 1, 1, 7, 8])
    # Rows 4 and 5 have no positive: what they hold changes nothing (their columns still count in
    # the other rows' denominators).
    changed = s.clone()
    changed[4:] = 100 * torch.randn(2, 6, generator=gen, dtype=torch.float64)
    assert contrastive(changed, labels).item() == pytest.approx(contrastive(s, labels).item(), rel=1e-12)
    # And the mean is over the 4 rows with a positive, not over 6.
    assert contrastive(s, labels).item() == pytest.approx(ref_contrastive(s.tolist(), labels.tolist()), rel=1e-12)
    four_rows = -sum(
        s[u, v].item() - math.log(sum(math.exp(s[u, w].item()) for w in range(6) if w != u))
        for u, v in [(0, 1), (1, 0), (2, 3), (3, 2)]) / 4
    assert contrastive(s, labels).item() == pytest.approx(four_rows, rel=1e-12)


def test_contrastive_without_any_positive_is_zero_and_differentiable():
    s = torch.randn(5, 5, dtype=torch.float64, requires_grad=True)
    loss = contrastive(s, torch.arange(5))
    assert loss.dim() == 0 and loss.item() == 0.0
    loss.backward()
    assert torch.equal(s.grad, torch.zeros_like(s))
    one = torch.randn(1, 1, requires_grad=True)  # a batch of one image
    contrastive(one, torch.tensor([3])).backward()
    assert torch.equal(one.grad, torch.zeros_like(one))


def test_contrastive_is_stable_for_large_similarities():
    gen = torch.Generator().manual_seed(3)
    s = 1000 * torch.randn(6, 6, generator=gen)  # exp() of these overflows float32 and float64
    s.requires_grad_(True)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    loss = contrastive(s, labels)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all()
    # ℓ is unchanged by a constant added to a row: the stable result equals the shifted one.
    shifted = s.detach() - s.detach().max(dim=1, keepdim=True).values
    torch.testing.assert_close(loss.detach(), contrastive(shifted, labels))


# ---------------------------------------------------------------- the soft relation K_T


def test_soft_relation_against_kl_div():
    gen = torch.Generator().manual_seed(4)
    student = (5 * torch.randn(7, 7, generator=gen, dtype=torch.float64)).requires_grad_(True)
    teacher = (5 * torch.randn(7, 7, generator=gen, dtype=torch.float64)).requires_grad_(True)
    T = 3.0
    expected = T * T * F.kl_div(F.log_softmax(student / T, dim=1), F.softmax(teacher / T, dim=1),
                                reduction="batchmean")
    got = soft_relation(student, teacher, T)
    assert got.dim() == 0
    torch.testing.assert_close(got, expected)
    got.backward()
    assert teacher.grad is None and student.grad is not None  # the teacher is under a stop-gradient
    with pytest.raises(ValueError, match="temperature must be > 0"):
        soft_relation(student, teacher, 0.0)


def test_vcl_is_the_contrastive_loss_of_a_peers_own_similarities():
    gen = torch.Generator().manual_seed(5)
    z = random_embeddings(gen, 6, 4)
    labels = [0, 0, 1, 1, 2, 2]
    assert vcl(z, torch.tensor(labels), tau=0.5).item() == pytest.approx(
        ref_contrastive((z @ z.T / 0.5).tolist(), labels), rel=1e-10)
    with pytest.raises(ValueError, match="tau must be > 0"):
        vcl(z, torch.tensor(labels), tau=0.0)


def test_mcl_value_and_its_checks():
    gen = torch.Generator().manual_seed(6)
    z_i, z_j = random_embeddings(gen, 6, 4), random_embeddings(gen, 6, 4)
    labels = [0, 0, 1, 1, 2, 2]
    tau, T = 0.1, 2.0
    s = {(a, b): (x @ y.T / tau) for (a, x) in (("i", z_i), ("j", z_j)) for (b, y) in (("i", z_i), ("j", z_j))}

    def k(student, teacher):
        return T * T * F.kl_div(F.log_softmax(student / T, 1), F.softmax(teacher / T, 1), reduction="batchmean")

    expected = (0.5 * k(s["i", "i"], s["j", "j"])
                + 0.25 * (ref_contrastive(s["i", "j"].tolist(), labels) + ref_contrastive(s["j", "i"].tolist(), labels))
                + 2.0 * (k(s["i", "j"], s["j", "i"]) + k(s["j", "i"], s["i", "j"])))
    got = mcl(z_i, z_j, torch.tensor(labels), beta=0.25, gamma=0.5, lam=2.0, tau=tau, temperature=T)
    assert got.dim() == 0 and got.item() == pytest.approx(float(expected), rel=1e-10)
    with pytest.raises(ValueError, match="tau must be > 0"):
        mcl(z_i, z_j, torch.tensor(labels), tau=-1.0)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        mcl(z_i, z_j, torch.tensor(labels), temperature=0.0)
    with pytest.raises(ValueError, match="same"):
        mcl(z_i, z_j[:, :3], torch.tensor(labels))


# ---------------------------------------------------------------- MCL: the exactness rule

ALPHA, GAMMA, BETA, LAM, TAU, T = 0.1, 1.0, 0.1, 1.0, 0.07, 3.0


def C(s, labels):
    return contrastive(s, labels)


def K(student, teacher):
    return soft_relation(student, teacher, T)


def one_process_total(z, labels):
    """The spec's one-process total for N networks (without the cross-entropies, which involve one
    network each), written as the spec writes it."""
    n_nets = len(z)
    S = [[similarity(z[a], z[b], TAU) for b in range(n_nets)] for a in range(n_nets)]
    total = ALPHA * sum(C(S[n][n], labels) for n in range(n_nets))
    total = total + GAMMA * sum(K(S[n][n], S[m][m].detach()) for n in range(n_nets) for m in range(n_nets) if m != n)
    pairs = [(n, m) for n in range(n_nets) for m in range(n_nets) if n < m]
    total = total + BETA * sum(C(S[n][m], labels) + C(S[m][n], labels) for n, m in pairs)
    total = total + LAM * sum(K(S[n][m], S[m][n].detach()) + K(S[m][n], S[n][m].detach()) for n, m in pairs)
    return total


def peer_objective(z, n, labels):
    """Peer n's own objective: α·vcl(z_n) + Σ_{j≠n} mcl(z_n, z_j) (z_j exchanged, detached)."""
    own = ALPHA * vcl(z[n], labels, TAU)
    return own + sum(mcl(z[n], z[j].detach(), labels, beta=BETA, gamma=GAMMA, lam=LAM, tau=TAU, temperature=T)
                     for j in range(len(z)) if j != n)


def wrong_peer_objective(z, n, labels):
    """A decomposition that forgets C(S_ji) (S_ji = z_j z_nᵀ/τ depends on z_n): must be caught."""
    total = ALPHA * vcl(z[n], labels, TAU)
    for j in range(len(z)):
        if j == n:
            continue
        zj = z[j].detach()
        s_nn, s_jj = similarity(z[n], z[n], TAU), similarity(zj, zj, TAU)
        s_nj, s_jn = similarity(z[n], zj, TAU), similarity(zj, z[n], TAU)
        total = total + GAMMA * K(s_nn, s_jj) + BETA * C(s_nj, labels) + LAM * (K(s_nj, s_jn) + K(s_jn, s_nj))
    return total


def embedding_heads(n_nets, gen):
    """Each network: its own input size and a head Linear(d_n, 16) → ReLU → Linear(16, 8) → L2-normalize."""
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
    heads, inputs = [], []
    for n in range(n_nets):
        d_in = 5 + 3 * n
        heads.append(torch.nn.Sequential(torch.nn.Linear(d_in, 16), torch.nn.ReLU(), torch.nn.Linear(16, 8)).double())
        inputs.append(torch.randn(10, d_in, generator=gen, dtype=torch.float64))
    return heads, inputs


def embed(heads, inputs):
    return [F.normalize(head(x), dim=1) for head, x in zip(heads, inputs)]


@pytest.mark.parametrize("n_nets", [2, 3])
def test_mcl_peer_objectives_give_the_gradients_of_the_one_process_total(n_nets):
    gen = torch.Generator().manual_seed(10 + n_nets)
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3, 4, 5])  # the last two rows have no positive
    heads, inputs = embedding_heads(n_nets, gen)

    z = embed(heads, inputs)
    total = one_process_total(z, labels)
    total_z = torch.autograd.grad(total, z, retain_graph=True)
    total_params = [torch.autograd.grad(total, list(head.parameters()), retain_graph=True) for head in heads]

    for n in range(n_nets):
        z = embed(heads, inputs)  # a fresh graph, as on peer n's own worker
        own = peer_objective(z, n, labels)
        own_z, = torch.autograd.grad(own, [z[n]], retain_graph=True)
        torch.testing.assert_close(own_z, total_z[n], rtol=0, atol=1e-6)
        own_params = torch.autograd.grad(own, list(heads[n].parameters()))
        for mine, reference in zip(own_params, total_params[n]):
            torch.testing.assert_close(mine, reference, rtol=0, atol=1e-6)
        assert any(g.abs().max() > 1e-3 for g in own_params)  # a real gradient, not two zeros

        wrong_z, = torch.autograd.grad(wrong_peer_objective(z, n, labels), [z[n]])
        assert (wrong_z - total_z[n]).abs().max() > 1e-4


def test_mcl_peer_objectives_train_like_the_one_process_total():
    """Several SGD steps: peers that each step on their own objective end with the weights of one
    process stepping on the total."""
    gen = torch.Generator().manual_seed(20)
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3, 4, 4])
    heads, inputs = embedding_heads(3, gen)
    peers = [copy.deepcopy(head) for head in heads]
    start = [p.detach().clone() for p in heads[0].parameters()]
    together = torch.optim.SGD([p for head in heads for p in head.parameters()], lr=0.5)
    apart = [torch.optim.SGD(peer.parameters(), lr=0.5) for peer in peers]
    for _ in range(4):
        together.zero_grad()
        one_process_total(embed(heads, inputs), labels).backward()
        together.step()
        z = [e.detach() for e in embed(peers, inputs)]  # what each peer sends
        for n, (peer, optimizer) in enumerate(zip(peers, apart)):
            optimizer.zero_grad()
            mine = F.normalize(peer(inputs[n]), dim=1)
            peer_objective([mine if j == n else z[j] for j in range(3)], n, labels).backward()
            optimizer.step()
    for head, peer in zip(heads, peers):
        for a, b in zip(head.parameters(), peer.parameters()):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-8)
    assert any((a - b).abs().max() > 1e-3 for a, b in zip(heads[0].parameters(), start))  # they did train


# ---------------------------------------------------------------- attention transfer


def test_attention_map_by_hand():
    # one image, two channels of 1×2: mean_c f² = [(1 + 9)/2, (4 + 0)/2] = [5, 2], over √29
    feature = torch.tensor([[[[1.0, 2.0]], [[3.0, 0.0]]]], dtype=torch.float64)
    expected = torch.tensor([[[5.0, 2.0]]], dtype=torch.float64) / math.sqrt(29)
    torch.testing.assert_close(attention_map(feature), expected)


def test_attention_map_pools_the_feature_before_squaring():
    gen = torch.Generator().manual_seed(30)
    feature = torch.randn(3, 4, 8, 8, generator=gen, dtype=torch.float64)
    a = attention_map(feature, (4, 4))
    assert a.shape == (3, 4, 4)
    torch.testing.assert_close(a.flatten(1), ref_attention_rows(ref_pool(feature, (4, 4))))
    torch.testing.assert_close(a.flatten(1).norm(dim=1), torch.ones(3, dtype=torch.float64))
    # Pooling the map instead of the feature is a different thing (the reference can tell them apart).
    pooled_after = F.normalize(ref_pool(feature.pow(2).mean(1, keepdim=True), (4, 4)).flatten(1), dim=1)
    assert (pooled_after - a.flatten(1)).abs().max() > 1e-3
    torch.testing.assert_close(attention_map(feature, (8, 8)), attention_map(feature))
    with pytest.raises(ValueError, match="cannot pool a 8x8 feature up to 16x8"):
        attention_map(feature, (16, 8))


def test_matched_sizes():
    assert matched_size((8, 8), (4, 4)) == (4, 4)
    assert matched_size((8, 2), (4, 4)) == (4, 2)
    assert matched_sizes([(32, 32), (16, 16)], [(16, 16), (16, 16)]) == [(16, 16), (16, 16)]
    with pytest.raises(ValueError, match="3 stages against 2"):
        matched_sizes([(8, 8)] * 3, [(8, 8)] * 2)


def at_pair(gen):
    """Two peers' stage features: different channels, and each stage larger on a different peer."""
    f_a = [torch.randn(4, 3, 8, 8, generator=gen, dtype=torch.float64, requires_grad=True),
           torch.randn(4, 6, 4, 4, generator=gen, dtype=torch.float64, requires_grad=True)]
    f_b = [torch.randn(4, 5, 4, 4, generator=gen, dtype=torch.float64, requires_grad=True),
           torch.randn(4, 2, 8, 8, generator=gen, dtype=torch.float64, requires_grad=True)]
    return f_a, f_b


def sent_maps(receiver_features, sender_features):
    """What the sender computes and sends: its maps at the matched sizes, detached."""
    sizes = matched_sizes([f.shape[-2:] for f in receiver_features], [f.shape[-2:] for f in sender_features])
    return [attention_map(f.detach(), size) for f, size in zip(sender_features, sizes)]


def test_attention_against_the_reference_with_different_sizes():
    f_a, f_b = at_pair(torch.Generator().manual_seed(31))
    got = attention(f_a, sent_maps(f_a, f_b), beta=1000.0)
    assert got.dim() == 0
    torch.testing.assert_close(got, ref_at_edge(f_a, f_b, 1000.0))
    torch.testing.assert_close(attention(f_b, sent_maps(f_b, f_a), beta=3.0), ref_at_edge(f_b, f_a, 3.0))


def test_attention_peer_losses_give_the_gradients_of_the_pair_total():
    f_a, f_b = at_pair(torch.Generator().manual_seed(32))
    total = ref_at_edge(f_a, f_b, 1000.0) + ref_at_edge(f_b, f_a, 1000.0)
    total_a = torch.autograd.grad(total, f_a, retain_graph=True)
    total_b = torch.autograd.grad(total, f_b)
    own_a = torch.autograd.grad(attention(f_a, sent_maps(f_a, f_b)), f_a)
    own_b = torch.autograd.grad(attention(f_b, sent_maps(f_b, f_a)), f_b)
    for mine, reference in zip(own_a + own_b, total_a + total_b):
        torch.testing.assert_close(mine, reference, rtol=0, atol=1e-6)
        assert mine.abs().max() > 1e-6
    # Without the stop-gradient on the sender in the total, peer a's gradient would differ.
    no_stop = sum(((ref_attention_rows(ref_pool(i, (4, 4))) - ref_attention_rows(ref_pool(j, (4, 4)))) ** 2).mean()
                  for i, j in zip(f_a, f_b)) * 2000.0
    no_stop_a = torch.autograd.grad(no_stop, f_a)
    assert max((x - y).abs().max() for x, y in zip(no_stop_a, own_a)) > 1e-6


def test_attention_refuses_what_cannot_be_matched():
    f_a, f_b = at_pair(torch.Generator().manual_seed(33))
    maps = sent_maps(f_a, f_b)
    with pytest.raises(ValueError, match="2 stages against 1"):
        attention(f_a, maps[:1])
    with pytest.raises(ValueError, match="larger than the receiver's 4x4 feature"):
        attention(f_a, [maps[0], attention_map(f_b[1].detach())])  # an 8×8 map the sender did not pool


# ---------------------------------------------------------------- the registry's payloads


def test_payload_is_recorded_and_unknown_payloads_are_refused(clean_registry):
    assert get_loss("mcl").payload == "embedding" and get_loss("attention").payload == "maps"
    assert get_loss("kd").payload == "logits"

    @register_loss("my_embedding_loss", payload="embedding")
    def mine(receiver, sender, scale=1.0):
        return (receiver - sender).pow(2).mean()

    assert get_loss("my_embedding_loss").payload == "embedding"
    with pytest.raises(ValueError, match="payload must be one of logits, embedding, maps, not 'features'"):
        register_loss("bad", payload="features")
    assert "bad" not in LOSSES


def test_the_peer_objective_adds_vcl_and_representation_edges_and_refuses_them_without_representations():
    from cohort.losses.combine import Representations, maps_part, peer_objective
    from cohort.topology.edges import Edge

    torch.manual_seed(0)
    labels = torch.tensor([0, 0, 1, 1])
    logits = {"a": torch.randn(4, 3), "b": torch.randn(4, 3, requires_grad=True)}
    z = {name: torch.nn.functional.normalize(torch.randn(4, 8), dim=1) for name in "ab"}
    stages = [torch.randn(4, 2, 4, 4, requires_grad=True)]
    sent_maps = [attention_map(torch.randn(4, 3, 2, 2))]
    edges = [Edge.model_validate({"from": "a", "to": "b", "loss": "mcl", "weight": 0.5, "reduce": "sum", "tau": 0.1}),
             Edge.model_validate({"from": "a", "to": "b", "loss": "attention", "reduce": "sum", "beta": 10.0})]
    representations = Representations(receiver="b", embedding=z["b"], stages=stages,
                                      received={"a": {"embedding": [z["a"]], maps_part("b"): sent_maps}},
                                      vcl=(0.3, 0.2))
    total, terms = peer_objective(logits["b"], labels, edges, logits, 0.7, representations=representations)
    expected = (0.7 * torch.nn.functional.cross_entropy(logits["b"], labels) + 0.3 * vcl(z["b"], labels, 0.2)
                + 0.5 * mcl(z["b"], z["a"], labels, tau=0.1) + attention(stages, sent_maps, beta=10.0))
    torch.testing.assert_close(total, expected)
    assert set(terms) == {"ce", "vcl", "a->b:mcl", "a->b:attention"}
    with pytest.raises(ValueError, match="loss 'mcl' exchanges embedding: the receiver's representations are needed"):
        peer_objective(logits["b"], labels, edges[:1], logits)
