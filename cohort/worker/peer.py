"""One peer of a topology: its seed, its network (from its checkpoint's weights where it has one), its
optimizer and schedule, and the cohort's class groups. The driver builds every peer once to check
the plan (cohort.driver.launch); each worker builds its own (cohort.worker.loop).
"""
from __future__ import annotations

import hashlib
import os

import torch
import torch.nn as nn

from cohort.config.errors import CohortError
from cohort.datasets import DatasetInfo
from cohort.losses import LOSSES
from cohort.losses.registry import EMBEDDING
from cohort.metrics import scores as metrics
from cohort.models import build_model
from cohort.models.heads import EmbeddingHead, attach_heads
from cohort.models.taps import resolve_taps
from cohort.topology import OptimizerConfig, Topology
from cohort.worker.checkpoint import load_tensors


def peer_seed(topology: Topology, peer: str) -> int:
    """The seed of a peer's initial weights, from the topology's seed and the peer's key: its
    ``init_seed`` if it has one, else its name; never its rank. So a peer starts from the same
    weights in every topology that gives it the same name (or key), model and seed, wherever it
    stands among the peers, and peers that share an ``init_seed`` and a model start identical."""
    config = topology.peers[peer]
    key = peer if config.init_seed is None else f"init_seed:{config.init_seed}"
    digest = hashlib.sha256(f"{topology.seed}/{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1  # torch.manual_seed takes up to 2**64 - 1


def build_peer(topology: Topology, peer: str, info: DatasetInfo,
               weights: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """The peer's network (with the heads it owns: MCL's embedding head), initialized from its
    seed, or given its checkpoint's weights if it has one: ``weights``, the state_dict the driver read from the checkpoint (and sent through Ray's
    object store), else read here from the checkpoint's path. Either way checked against the model."""
    torch.manual_seed(peer_seed(topology, peer))
    config = topology.peers[peer]
    try:
        model = build_model(config.model, num_classes=info.num_classes, in_channels=info.in_channels,
                            **config.model_args)
    except (TypeError, ValueError) as error:
        raise CohortError(f"cannot build {config.model!r}: {error}", f"peers.{peer}.model") from None
    if config.embedding is not None:
        # MCL's head belongs to the peer: part of its network, its optimizer, checkpoints and logged model.
        taps = resolve_taps(model, config.model, config.taps, peer=peer)
        attach_heads(model, {EMBEDDING: EmbeddingHead(taps.feature_size, config.embedding.dim)})
    if config.checkpoint:
        where = f"peers.{peer}.checkpoint"
        state = read_weights(config.checkpoint, where) if weights is None else weights
        model.load_state_dict(check_weights(state, model, config.checkpoint, where))
    return model


def read_weights(path: str, where: str, name: str | None = None) -> dict[str, torch.Tensor]:
    """The state_dict in the file ``path`` (tensors only: ``weights_only=True``); ``name``: what to
    call it in messages (the checkpoint as the topology gives it), default the path."""
    name = name or path
    if not os.path.isfile(path):
        raise CohortError(f"checkpoint {name!r} does not exist", where)
    try:
        state = load_tensors(path)
    except CohortError as error:
        raise CohortError(f"cannot load checkpoint {name!r}: {error.message}", where) from None
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CohortError(f"checkpoint {name!r} is not a state_dict of tensors", where)
    return state


def check_weights(state: dict[str, torch.Tensor], model: nn.Module, name: str, where: str) -> dict[str, torch.Tensor]:
    """``state`` (from checkpoint ``name``) if it fits ``model``: the same keys and shapes."""
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CohortError(f"checkpoint {name!r} is not a state_dict of tensors", where)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        detail = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise CohortError(f"checkpoint {name!r} does not fit the model ({detail})", where)
    for key, tensor in state.items():
        if tensor.shape != expected[key].shape:
            raise CohortError(
                f"checkpoint {name!r} does not fit the model: {key} is {tuple(tensor.shape)}, "
                f"the model's is {tuple(expected[key].shape)} (a different model or number of classes?)",
                where,
            )
    return state


def load_weights(path: str, model: nn.Module, where: str) -> dict[str, torch.Tensor]:
    """A state_dict from ``path`` (tensors only: ``weights_only=True``), checked against ``model``."""
    return check_weights(read_weights(path, where), model, path, where)


def build_optimizer(model: nn.Module, config: OptimizerConfig, topology: Topology):
    parameters = [p for p in model.parameters() if p.requires_grad]
    if config.name == "sgd":
        optimizer = torch.optim.SGD(parameters, lr=config.lr, momentum=config.momentum,
                                    weight_decay=config.weight_decay, nesterov=config.nesterov and config.momentum > 0)
    elif config.name == "adam":
        optimizer = torch.optim.Adam(parameters, lr=config.lr, weight_decay=config.weight_decay)
    else:
        optimizer = torch.optim.AdamW(parameters, lr=config.lr, weight_decay=config.weight_decay)
    schedule = topology.train.schedule
    # Schedules step once per epoch, as in the KD literature's recipes.
    if schedule.name == "cosine":
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=topology.train.epochs)
    elif schedule.name == "multistep":
        scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=list(schedule.milestones),
                                                         gamma=schedule.gamma)
    else:
        scheduler = torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)
    return optimizer, scheduler


def apply_optimizer_settings(optimizer, scheduler, config: OptimizerConfig) -> None:
    """Give a restored optimizer the topology's settings, which PBT may have changed since the
    checkpoint: the schedule's progress is kept, rescaled to the new base learning rate."""
    for group in optimizer.param_groups:
        if group.get("initial_lr") != config.lr:
            ratio = group["lr"] / group["initial_lr"] if group.get("initial_lr") else 1.0
            group["initial_lr"], group["lr"] = config.lr, config.lr * ratio
        group["weight_decay"] = config.weight_decay
        if "momentum" in group:
            group["momentum"] = config.momentum
    scheduler.base_lrs = [group["initial_lr"] for group in optimizer.param_groups]


SHOT_GROUPS = ("many", "medium", "few")


def cohort_groups(topology: Topology, info: DatasetInfo) -> tuple[torch.Tensor, list[str]] | None:
    """The class groups of ``data.groups`` (thirds by default for a long-tailed set) from the
    training counts, for ``ltkd`` edges and per-group metrics; None when neither needs them."""
    rule = topology.data.groups or ("thirds" if topology.data.long_tail else None)
    ltkd = [edge for edge in topology.edges if "groups" in LOSSES[edge.loss].context]
    if rule is None and not ltkd:
        return None
    try:
        groups, names = metrics.class_groups(torch.tensor(info.train_class_counts), rule or "thirds")
    except ValueError as error:
        raise CohortError(f"cannot form {rule or 'thirds'} groups: {error}", "data.groups") from None
    if ltkd and rule == "shots" and len(names) < len(SHOT_GROUPS):
        empty = [name for name in SHOT_GROUPS if name not in names]
        raise CohortError(f"shots leaves group(s) {', '.join(map(repr, empty))} empty on this training set "
                          f"(class counts {min(info.train_class_counts)}-{max(info.train_class_counts)}); "
                          f"the ltkd edge {ltkd[0].label} needs every group: use groups: thirds", "data.groups")
    return groups, names
