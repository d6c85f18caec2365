"""What a worker sends each step: its logits and the representations some edge needs, packed into
one row of floats per image so that one ``all_gather`` carries the whole step.

A peer sends its logits always; its embedding when it is the sender of an edge whose loss takes
embeddings (``mcl``); and, for each edge from it whose loss takes maps (``attention``), its
attention maps at the sizes matched with that edge's receiver (``maps->receiver``: the sender pools
its own features, so only ``h·w`` floats per stage and image travel). Every peer's row is padded to
the widest peer's, because ``all_gather`` needs one shape on every rank; the layout is a function of
the topology and the peers' tap shapes, so every worker computes the same one.

With replicas, MCL's terms span the whole batch: a peer whose own loss reads its embedding sends it
too (its replicas need each other's shards), and the step's one gather runs over every worker
(``whole_batch_exchange``), each shard's rows padded to the largest shard's.

Pure: packing and unpacking are tested without Ray.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from cohort.config.errors import CohortError
from cohort.losses import LOSSES
from cohort.losses.attention import matched_sizes
from cohort.losses.combine import maps_part
from cohort.losses.registry import EMBEDDING, LOGITS, MAPS
from cohort.topology import Topology

FLOAT_BYTES = 4  # the exchange is float32 whatever the forward's precision


@dataclass(frozen=True)
class TapShapes:
    """One peer's representations, per image: its embedding's size (None without a head) and
    its stages' feature shapes ``(C, H, W)`` in declared order."""

    embedding: int | None = None
    stages: tuple[tuple[int, int, int], ...] = ()


@dataclass(frozen=True)
class Part:
    name: str
    shapes: tuple[tuple[int, ...], ...]  # per image, one shape per tensor of the part

    @property
    def width(self) -> int:
        return sum(math.prod(shape) for shape in self.shapes)


@dataclass(frozen=True)
class PayloadLayout:
    parts: Mapping[str, tuple[Part, ...]]  # peer -> what it sends, in order
    row: int = field(init=False)  # the floats per image of every worker's buffer: the widest peer's

    def __post_init__(self) -> None:
        object.__setattr__(self, "row", max(self.width(peer) for peer in self.parts))

    def width(self, peer: str) -> int:
        return sum(part.width for part in self.parts[peer])

    def bytes_per_image(self, peer: str) -> int:
        """What ``peer`` puts into the step's gather per image (padding included: it travels too)."""
        return self.row * FLOAT_BYTES

    @property
    def logits_only(self) -> bool:
        return all(len(parts) == 1 for parts in self.parts.values())

    def pack(self, peer: str, values: Mapping[str, Sequence[torch.Tensor]]) -> torch.Tensor:
        """``peer``'s buffer ``[B, row]``: its parts' tensors flattened per image, in layout order, zero-padded."""
        pieces = []
        for part in self.parts[peer]:
            tensors = values[part.name]
            if len(tensors) != len(part.shapes):
                raise ValueError(f"part {part.name!r} of {peer!r} has {len(tensors)} tensors, the layout "
                                 f"{len(part.shapes)}")
            for tensor, shape in zip(tensors, part.shapes):
                if tuple(tensor.shape[1:]) != shape:
                    raise ValueError(f"part {part.name!r} of {peer!r}: a tensor of shape {tuple(tensor.shape[1:])} "
                                     f"per image, the layout says {shape}")
                pieces.append(tensor.detach().reshape(len(tensor), -1).float())
        flat = torch.cat(pieces, dim=1)
        if flat.shape[1] < self.row:
            flat = torch.nn.functional.pad(flat, (0, self.row - flat.shape[1]))
        return flat.contiguous()

    def unpack(self, peer: str, rows: torch.Tensor) -> dict[str, list[torch.Tensor]]:
        """``peer``'s parts out of its gathered buffer (views, no copy)."""
        out, start = {}, 0
        for part in self.parts[peer]:
            tensors = []
            for shape in part.shapes:
                width = math.prod(shape)
                tensors.append(rows[:, start:start + width].reshape(len(rows), *shape))
                start += width
            out[part.name] = tensors
        return out


def payload_layout(topology: Topology, num_classes: int, shapes: Mapping[str, TapShapes]) -> PayloadLayout:
    """What every peer sends each step, from the topology's edges and the peers' tap shapes."""
    parts: dict[str, list[Part]] = {peer: [Part(LOGITS, ((num_classes,),))] for peer in topology.peer_names}
    for index, edge in enumerate(topology.edges):
        payload = LOSSES[edge.loss].payload
        if payload == LOGITS:
            continue
        (sender,) = edge.senders  # the topology refuses ensembles of representations
        names = [part.name for part in parts[sender]]
        if payload == EMBEDDING and EMBEDDING not in names:
            parts[sender].append(Part(EMBEDDING, ((shapes[sender].embedding,),)))
        elif payload == MAPS and maps_part(edge.to) not in names:
            try:
                sizes = stage_sizes(shapes[sender].stages, shapes[edge.to].stages)
            except ValueError as error:
                raise CohortError(f"{sender} -> {edge.to}: {error}", f"edges[{index}]") from None
            parts[sender].append(Part(maps_part(edge.to), tuple(sizes)))
    for peer in topology.peer_names:
        if topology.replicas > 1 and reads_embedding(topology, peer) and EMBEDDING not in [p.name for p in parts[peer]]:
            parts[peer].append(Part(EMBEDDING, ((shapes[peer].embedding,),)))
    return PayloadLayout({peer: tuple(found) for peer, found in parts.items()})


def reads_embedding(topology: Topology, peer: str) -> bool:
    """Whether ``peer``'s own loss reads its embedding: its VCL term, or an edge into it whose loss
    takes embeddings (a frozen peer has no loss)."""
    config = topology.peers[peer]
    if config.embedding is None or config.frozen:
        return False
    return bool(config.embedding.vcl) or any(LOSSES[edge.loss].payload == EMBEDDING and edge.to == peer
                                             for edge in topology.edges)


def whole_batch_exchange(topology: Topology) -> bool:
    """Whether each step's gather runs over every worker, for the whole batch's embeddings: with
    replicas, when some peer's loss reads embeddings (MCL's similarities span the whole batch)."""
    return topology.replicas > 1 and any(reads_embedding(topology, peer) for peer in topology.peer_names)


def pad_rows(buffer: torch.Tensor, rows: int) -> torch.Tensor:
    """``buffer`` with zero rows appended up to ``rows`` (the largest shard's: ``all_gather`` needs one
    shape on every rank)."""
    return torch.nn.functional.pad(buffer, (0, 0, 0, rows - len(buffer))) if len(buffer) < rows else buffer


def stage_sizes(sender: Sequence[tuple[int, int, int]], receiver: Sequence[tuple[int, int, int]]) -> list[tuple[int, int]]:
    """Each matched stage's map size, from the two peers' stage shapes ``(C, H, W)``."""
    if not sender or not receiver:
        raise ValueError("attention maps cannot be matched: a peer without stages has none (declare them: "
                         "peers.<name>.taps.stages)")
    return matched_sizes([shape[1:] for shape in sender], [shape[1:] for shape in receiver])
