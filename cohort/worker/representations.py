"""A peer's representations in a training step: what its taps recorded (the penultimate feature,
the stage outputs), its embedding through the head it owns, what it sends the others
(``cohort.worker.payload``) and what its own loss reads (``cohort.losses.combine.Representations``).

Set up once per worker: the taps' hooks on the peer's network, and the exchange's layout, which
every worker computes alike from the topology and every peer's tap shapes (gathered once).
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn

from cohort.config.errors import CohortError
from cohort.losses import LOSSES
from cohort.losses.attention import attention_map
from cohort.losses.combine import Representations
from cohort.losses.registry import EMBEDDING, LOGITS, MAPS
from cohort.models.heads import heads_of
from cohort.models.taps import TapRecorder, resolve_taps, tap_shapes
from cohort.topology import Topology
from cohort.worker.grid import shard_bounds, whole_batch_gradient_scale, whole_batch_rows
from cohort.worker.payload import PayloadLayout, TapShapes, payload_layout, reads_embedding, whole_batch_exchange


def uses_stages(topology: Topology, peer: str) -> bool:
    """Whether ``peer`` sends or receives attention maps (an edge whose loss takes maps touches it)."""
    return any(LOSSES[edge.loss].payload == MAPS and peer in (edge.to, *edge.senders) for edge in topology.edges)


def has_representations(topology: Topology) -> bool:
    """Whether any edge of the topology, or any peer's own term, exchanges more than logits."""
    return (any(LOSSES[edge.loss].payload != LOGITS for edge in topology.edges)
            or any(peer.embedding is not None for peer in topology.peers.values()))


def own_shapes(topology: Topology, peer: str, net: nn.Module, input_size: Sequence[int]) -> TapShapes:
    """``peer``'s representation shapes per image, from one small forward of its network."""
    config = topology.peers[peer]
    stages = ()
    if uses_stages(topology, peer):
        spec = resolve_taps(net, config.model, config.taps, peer=peer)
        found = tap_shapes(net, spec, tuple(input_size))["stages"]
        for name, shape in found.items():
            if len(shape) != 3:
                raise CohortError(f"peer {peer!r}: stage {name!r} gives {tuple(shape)} per image, not a C x H x W map "
                                  "(attention maps need feature maps: name other stages)", f"peers.{peer}.taps.stages")
        stages = tuple(tuple(shape) for shape in found.values())
    return TapShapes(embedding=config.embedding.dim if config.embedding is not None else None, stages=stages)


@dataclass(frozen=True)
class BatchShards:
    """A replica's shard of the step's whole batch, for the whole batch's embeddings: the whole
    batch's ``labels``, split into ``shards`` (``cohort.worker.grid.shard_bounds``), this one ``shard``."""

    labels: torch.Tensor
    shards: int
    shard: int

    @property
    def bounds(self) -> list[tuple[int, int]]:
        return [shard_bounds(len(self.labels), self.shards, shard) for shard in range(self.shards)]

    @property
    def largest(self) -> int:
        """The rows of every worker's buffer in the gather: the largest shard's (the first's)."""
        start, stop = self.bounds[0]
        return stop - start

    def whole(self, gathered: Sequence[torch.Tensor], peers: Sequence[str]) -> dict[str, torch.Tensor]:
        """Each peer's whole-batch buffer, from every worker's padded buffer in rank order."""
        return dict(zip(peers, whole_batch_rows(gathered, len(peers), self.bounds)))


def live_rows(whole: torch.Tensor, live: torch.Tensor, start: int) -> torch.Tensor:
    """The whole batch's ``whole`` (detached) with rows ``[start, start + len(live))`` the live tensor."""
    return torch.cat([whole[:start].detach(), live, whole[start + len(live):].detach()])


def shard_parts(parts: Mapping[str, Sequence[torch.Tensor]], start: int, stop: int) -> dict[str, list[torch.Tensor]]:
    """A peer's parts of the whole batch cut to a shard's rows, except its embedding (kept whole)."""
    return {name: list(tensors) if name == EMBEDDING else [tensor[start:stop] for tensor in tensors]
            for name, tensors in parts.items()}


@dataclass
class PeerTaps:
    """One worker's taps on its peer's network, its embedding head, and what it sends."""

    peer: str
    layout: PayloadLayout
    recorder: TapRecorder
    head: nn.Module | None  # the embedding head (part of the peer's network: cohort.models.heads)
    vcl: tuple[float, float] | None  # the peer's own term (α, τ), or None
    live_embedding: bool = True  # whether the peer's own loss reads its embedding (else it is only sent)
    whole_batch: bool = False  # whether each step gathers the whole batch's rows (replicas with MCL)

    def own(self) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
        """This forward's embedding (through the head; live when the peer's loss reads it) and stage
        features, live. An embedding only sent is computed without a graph: with replicas, DDP then
        finds the head unused (``find_unused_parameters``), as it is."""
        embedding = None
        if self.head is not None:
            with torch.set_grad_enabled(torch.is_grad_enabled() and self.live_embedding):
                embedding = self.head(self.recorder.penultimate)
        return embedding, list(self.recorder.stages or ())

    def outgoing(self, logits: torch.Tensor, embedding: torch.Tensor | None,
                 stages: Sequence[torch.Tensor]) -> dict[str, list[torch.Tensor]]:
        """The parts this peer sends, by name, detached (the sender pools its own maps)."""
        sent: dict[str, list[torch.Tensor]] = {}
        with torch.no_grad():
            for part in self.layout.parts[self.peer]:
                if part.name == LOGITS:
                    sent[part.name] = [logits.detach()]
                elif part.name == EMBEDDING:
                    sent[part.name] = [embedding.detach()]
                else:
                    sent[part.name] = [attention_map(stage.detach().float(), size)
                                       for stage, size in zip(stages, part.shapes)]
        return sent

    def received(self, rows: Mapping[str, torch.Tensor], embedding: torch.Tensor | None,
                 stages: Sequence[torch.Tensor], shards: BatchShards | None = None,
                 ) -> tuple[dict[str, torch.Tensor], Representations]:
        """Every peer's logits and this peer's loss inputs, from the step's gathered rows.

        ``shards``: the rows are every peer's whole batch (``BatchShards.whole``); the logits and maps
        are then cut to this replica's shard, the embeddings kept whole, this peer's own with its
        shard's rows live, and the labels are the whole batch's.
        """
        parts = {peer: self.layout.unpack(peer, buffer) for peer, buffer in rows.items()}
        if shards is None:
            logits = {peer: found[LOGITS][0] for peer, found in parts.items()}
            return logits, Representations(receiver=self.peer, embedding=embedding, stages=tuple(stages),
                                           received=parts, vcl=self.vcl)
        start, stop = shards.bounds[shards.shard]
        own_embedding = embedding
        if embedding is not None and EMBEDDING in parts[self.peer]:
            own_embedding = live_rows(parts[self.peer][EMBEDDING][0], embedding, start)
        parts = {peer: shard_parts(found, start, stop) for peer, found in parts.items()}
        logits = {peer: found[LOGITS][0] for peer, found in parts.items()}
        return logits, Representations(receiver=self.peer, embedding=own_embedding, stages=tuple(stages),
                                       received=parts, vcl=self.vcl, labels=shards.labels,
                                       gradient=whole_batch_gradient_scale(stop - start, len(shards.labels)))


def peer_taps(topology: Topology, peer: str, net: nn.Module, input_size: Sequence[int], num_classes: int,
              gather: Callable[[object], list]) -> PeerTaps | None:
    """This worker's taps and the exchange's layout (``gather``: every peer's object, in peer order,
    over the exchange group), or None when the cohort exchanges logits only."""
    if not has_representations(topology):
        return None
    shapes = dict(zip(topology.peer_names, gather(own_shapes(topology, peer, net, input_size))))
    layout = payload_layout(topology, num_classes, shapes)
    config = topology.peers[peer]
    heads = heads_of(net)
    head = heads[EMBEDDING] if heads is not None and EMBEDDING in heads else None
    spec = resolve_taps(net, config.model, config.taps, peer=peer)
    recorder = TapRecorder(net, spec, want_penultimate=head is not None, want_stages=uses_stages(topology, peer))
    vcl = (config.embedding.vcl, config.embedding.tau) if config.embedding is not None and config.embedding.vcl else None
    return PeerTaps(peer=peer, layout=layout, recorder=recorder, head=head, vcl=vcl,
                    live_embedding=reads_embedding(topology, peer), whole_batch=whole_batch_exchange(topology))



def check_representations(topology: Topology, models: Mapping[str, nn.Module], input_size: Sequence[int],
                          num_classes: int) -> PayloadLayout | None:
    """The exchange's layout from the driver's copies of the peers (``cohort.driver.launch.make_plan``):
    an unknown tap or maps that cannot be matched is a one-line error before any worker starts."""
    if not has_representations(topology) or not input_size:
        return None
    shapes = {peer: own_shapes(topology, peer, model, input_size) for peer, model in models.items()}
    return payload_layout(topology, num_classes, shapes)
