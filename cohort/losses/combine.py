"""A peer's objective: its cross-entropy, its own representation term (MCL's VCL), and the
distillation terms of the edges into it."""
from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from .batch import WHOLE_BATCH, WholeBatch
from .mcl import vcl
from .registry import EMBEDDING, LOGITS, LOSSES

if TYPE_CHECKING:
    from cohort.topology.edges import Edge


def edge_weights(edges: Sequence[Edge], epoch: int = 1) -> list[float]:
    """Each edge's effective weight.

    Edges with ``reduce: mean`` share their weights over their count (DML averages over its
    K - 1 peers); ``reduce: sum`` edges keep theirs. ``warmup: W`` ramps a weight linearly to
    full over the first W epochs, counted from 1 (DKD's ``min(epoch / W, 1)``).
    """
    averaged = sum(1 for edge in edges if edge.reduce == "mean")
    weights = []
    for edge in edges:
        weight = edge.weight / averaged if edge.reduce == "mean" else edge.weight
        if edge.warmup:
            weight *= min(epoch / edge.warmup, 1.0)
        weights.append(weight)
    return weights


@dataclass(frozen=True)
class Representations:
    """What a peer's representation edges need besides logits.

    ``embedding`` and ``stages``: the peer's own, live (its MCL embedding, its tapped stage
    features); ``received``: each sender's exchanged parts by name (``cohort.worker.payload``:
    ``"embedding"``, ``"maps-><receiver>"``), detached; ``vcl``: the weight and temperature of the
    peer's own within-network contrastive term (MCL's α·C(S_ii)), or None.

    With replicas, the embeddings are the whole batch's (MCL's similarities span it): the replica's
    own rows live, the other shards' exchanged; ``labels`` are then the whole batch's (None: the
    step's), and ``gradient`` the factor on the gradient (not the value) of the terms over
    embeddings (``cohort.worker.grid.whole_batch_gradient_scale``).
    """

    receiver: str
    embedding: Tensor | None = None
    stages: Sequence[Tensor] = ()
    received: Mapping[str, Mapping[str, Sequence[Tensor]]] = field(default_factory=dict)
    vcl: tuple[float, float] | None = None
    labels: Tensor | None = None
    gradient: float = 1.0


NO_REPRESENTATIONS = Representations(receiver="")


def maps_part(receiver: str) -> str:
    """The name of the part a sender sends for its attention edges into ``receiver``: its maps at
    the sizes matched with the receiver's (cohort.worker.payload)."""
    return f"maps->{receiver}"


def scale_gradient(value: Tensor, factor: float) -> Tensor:
    """``value`` with its gradient multiplied by ``factor`` and its value unchanged."""
    if factor == 1.0:
        return value
    return value * factor - value.detach() * (factor - 1.0)


def sender_logits(edge: Edge, peer_logits: Mapping[str, Tensor]) -> Tensor:
    """The sender's logits, detached; an ensemble sender is the mean of its peers' logits."""
    senders = [peer_logits[name] for name in edge.senders]
    return torch.stack(senders).mean(dim=0).detach()


def peer_objective(
    receiver_logits: Tensor,
    labels: Tensor,
    edges: Sequence[Edge],
    peer_logits: Mapping[str, Tensor],
    ce_weight: float = 1.0,
    epoch: int = 1,
    groups: Tensor | None = None,
    batch: WholeBatch = WHOLE_BATCH,
    off: Collection[int] = (),
    representations: Representations = NO_REPRESENTATIONS,
) -> tuple[Tensor, dict[str, Tensor]]:
    """``ce_weight · CE [+ α · VCL] + Σ_e weight_e · mean_batch(loss_e)``, and each term (unweighted) by name.

    The terms are named ``ce``, ``vcl`` and ``<edge.label>`` so that a non-finite value can be traced
    to its source. Edges whose loss takes embeddings or maps (``LossSpec.payload``) read them from
    ``representations``; their losses return the batch's value already (with replicas, those over
    embeddings the whole batch's, their gradient scaled by ``representations.gradient``). ``batch``:
    how losses with batch statistics reduce over the batch (with replicas, over the peer's replicas).
    ``off``: indices of edges a gate switched off for this step (cohort.gates): they add nothing,
    and the others keep their weights.
    """
    context = {"target": labels, "groups": groups}
    # The embeddings' rows and labels: the whole batch's with replicas, whose gradient is scaled.
    embedding_labels = representations.labels if representations.labels is not None else labels
    terms: dict[str, Tensor] = {"ce": F.cross_entropy(receiver_logits, labels)}
    total = ce_weight * terms["ce"]
    if representations.vcl is not None:
        weight, tau = representations.vcl
        terms["vcl"] = vcl(representations.embedding, embedding_labels, tau)
        total = total + weight * scale_gradient(terms["vcl"], representations.gradient)
    for index, (edge, weight) in enumerate(zip(edges, edge_weights(edges, epoch))):
        if index in off:
            continue
        spec = LOSSES[edge.loss]
        if spec.payload != LOGITS and representations.receiver != edge.to:
            raise ValueError(f"edge {edge.label}: loss {edge.loss!r} exchanges {spec.payload}: the receiver's "
                             "representations are needed")
        needed = {name: context[name] for name in spec.context}
        if spec.payload == EMBEDDING and "target" in needed:
            needed["target"] = embedding_labels
        if spec.batch_statistics:
            needed["batch"] = batch
        if needed.get("groups", 0) is None:
            raise ValueError(f"edge {edge.label} needs class groups, and none were given")
        receiver, sender = edge_inputs(edge, spec.payload, receiver_logits, peer_logits, representations)
        per_sample = spec.fn(receiver, sender, **needed, **edge.params)
        terms[edge.label] = per_sample.mean()
        scale = representations.gradient if spec.payload == EMBEDDING else 1.0
        total = total + weight * scale_gradient(terms[edge.label], scale)
    return total, terms


def edge_inputs(edge: Edge, payload: str, receiver_logits: Tensor, peer_logits: Mapping[str, Tensor],
                representations: Representations) -> tuple[object, object]:
    """The receiver's own (live) and the sender's (exchanged) inputs of an edge's loss."""
    if payload == LOGITS:
        return receiver_logits, sender_logits(edge, peer_logits)
    (sender,) = edge.senders
    received = representations.received[sender]
    if payload == EMBEDDING:
        return representations.embedding, received[EMBEDDING][0]
    return list(representations.stages), list(received[maps_part(edge.to)])
