"""MCL: mutual contrastive learning between peers' embeddings (Yang et al., "Mutual Contrastive
Learning for Visual Representation Learning", AAAI 2022; the supervised CIFAR form of the authors'
``SupMCL``), for peers that exchange embeddings.

Each peer ``n`` owns an embedding ``z_n`` (``B × D``, rows of unit norm). With ``S_ab = z_a z_bᵀ / τ``:

- ``C(S)`` (``contrastive``): the supervised contrastive loss of a similarity matrix, positives
  ``Q = P − I`` (same label, not the same image), denominator over ``M = 1 − I``;
- ``K_T(s ‖ t)`` (``soft_relation``): ``T² · mean_u KL(softmax(t_u/T) ‖ softmax(s_u/T))`` over
  whole rows, ``t`` under a stop-gradient.

Peer ``i``'s objective is ``CE_i + α C(S_ii) + Σ_{j≠i} mcl(z_i, z_j)``: ``vcl`` is the first term
(weighted by α by the caller), ``mcl`` the edge from ``j`` to ``i``. Their gradients are exactly
those of the authors' one-process total over all peers (the spec's exactness rule).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .divergence import check_temperature, kl, log_probs
from .registry import register_loss


def check_tau(tau: float) -> None:
    if not tau > 0:
        raise ValueError(f"tau must be > 0, got {tau}")


def similarity(a: Tensor, b: Tensor, tau: float) -> Tensor:
    """``S = a bᵀ / τ``: ``[B, B]`` similarities of two embeddings ``[B, D]`` (cosines for unit rows)."""
    return a @ b.T / tau


def contrastive(s: Tensor, labels: Tensor) -> Tensor:
    """``C(S) = −mean_{u with a positive} [ Σ_v Q_uv ℓ_uv / Σ_v Q_uv ]``, a scalar.

    ``ℓ_uv = S_uv − log Σ_{w≠u} exp(S_uw)`` (the diagonal is masked by ``-inf`` inside a logsumexp:
    stable for any scale of ``S``); positives ``Q_uv = 1[y_u = y_v, u ≠ v]``. A row whose label
    appears once in the batch has no positive and is left out of the mean (the authors' code divides
    by zero there; with ``data.sampler: {m_per_class: 2}`` every row has one). With no positive at
    all the loss is 0, still connected to ``s`` (its gradient is zero, not missing).
    """
    size = s.shape[0]
    if s.shape != (size, size) or labels.shape != (size,):
        raise ValueError(f"contrastive: need a square [B, B] matrix and [B] labels, got {tuple(s.shape)} "
                         f"and {tuple(labels.shape)}")
    eye = torch.eye(size, dtype=torch.bool, device=s.device)
    positives = (labels[:, None] == labels[None, :]) & ~eye
    counts = positives.sum(dim=1)
    rows = counts > 0
    if not bool(rows.any()):
        return s.sum() * 0
    log_denominator = torch.logsumexp(s.masked_fill(eye, float("-inf")), dim=1, keepdim=True)
    log_prob = s - log_denominator
    per_row = (log_prob * positives).sum(dim=1)[rows] / counts[rows]
    return -per_row.mean()


def soft_relation(student: Tensor, teacher: Tensor, temperature: float) -> Tensor:
    """``K_T(s ‖ t) = T² · mean_u KL(softmax(t_u/T) ‖ softmax(s_u/T))``, a scalar; whole rows
    (diagonal included), ``teacher`` detached."""
    check_temperature(temperature)
    return temperature**2 * kl(log_probs(teacher.detach(), temperature), log_probs(student, temperature)).mean()


def vcl(embedding: Tensor, target: Tensor, tau: float = 0.07) -> Tensor:
    """A peer's own contrastive term ``C(S_ii)`` (vanilla contrastive learning within one network):
    not an edge loss; the caller weights it by α (the authors' 0.1 on CIFAR-100)."""
    check_tau(tau)
    return contrastive(similarity(embedding, embedding, tau), target)


@register_loss("mcl", payload="embedding")
def mcl(
    receiver: Tensor,
    sender: Tensor,
    target: Tensor,
    beta: float = 0.1,
    gamma: float = 1.0,
    lam: float = 1.0,
    tau: float = 0.07,
    temperature: float = 3.0,
) -> Tensor:
    """The MCL terms of peer ``i`` (``receiver``: its live embedding ``z_i``) from peer ``j``
    (``sender``: ``z_j``, detached here), a scalar:

    ``γ·K_T(S_ii ‖ sg S_jj) + β·[C(S_ij) + C(S_ji)] + λ·[K_T(S_ij ‖ sg S_ji) + K_T(S_ji ‖ sg S_ij)]``.

    ``S_ji = z_j z_iᵀ / τ`` depends on ``z_i`` too: both orientations are computed, so that summing
    over the senders gives peer ``i`` exactly the gradient of the one-process total (``lam`` is the
    spec's λ; the authors' CIFAR-100 setting is the default: β = 0.1, γ = 1, λ = 1, τ = 0.07, T = 3).
    """
    check_tau(tau)
    check_temperature(temperature)
    if receiver.dim() != 2 or receiver.shape != sender.shape:
        raise ValueError(f"mcl: receiver and sender must be embeddings of the same [B, D] shape, got "
                         f"{tuple(receiver.shape)} and {tuple(sender.shape)}")
    z_i, z_j = receiver, sender.detach()
    s_ii, s_jj = similarity(z_i, z_i, tau), similarity(z_j, z_j, tau)
    s_ij, s_ji = similarity(z_i, z_j, tau), similarity(z_j, z_i, tau)
    soft_vcl = soft_relation(s_ii, s_jj, temperature)
    icl = contrastive(s_ij, target) + contrastive(s_ji, target)
    soft_icl = soft_relation(s_ij, s_ji, temperature) + soft_relation(s_ji, s_ij, temperature)
    return gamma * soft_vcl + beta * icl + lam * soft_icl
