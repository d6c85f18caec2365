"""The topology file: which peers train together, and which edges carry knowledge between them.

``load_topology`` reads a YAML file with a safe loader that also refuses duplicate keys, anchors and aliases, applies
dotted ``--set`` overrides, and validates everything into an immutable, typed ``Topology``.
Every problem becomes a ``CohortError`` whose text is one line naming the file and the key.
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import ByteSize, Field, field_validator, model_validator

from cohort.config.errors import did_you_mean, quoted, unknown
from cohort.config.loader import dump_yaml, read_yaml
from cohort.config.overrides import parse_assignment, set_dotted
from cohort.config.schema import Int, Number, SafeName, Seed, Strict, problem, validated
from cohort.datasets.registry import DATASET_SETTINGS, DATASETS, STREAMS, refused_setting
from cohort.gates.config import Gate
from cohort.losses import LOSSES
from cohort.losses.registry import EMBEDDING, LOGITS
from cohort.models import model_exists, model_options, unknown_model
from cohort.topology.edges import EDGE_FIELDS, Edge, EnsembleSource

PEER_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$")
RESERVED_PEER_NAMES = {"ensemble", "cohort"}
DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"


# --------------------------------------------------------------------------- data


class LongTailConfig(Strict):
    imbalance: Number = Field(ge=1, description="n_max / n_min of the training set")
    profile: Literal["exponential", "step"] = "exponential"


class SamplerConfig(Strict):
    """Class-balanced batches (cohort.datasets.sampling): ``batch_size / m_per_class`` classes,
    ``m_per_class`` images of each, in every batch (MCL's batches: every image has a positive)."""

    m_per_class: Int = Field(ge=2, description="images of each class drawn into a batch")


class DataConfig(Strict):
    dataset: str = "digits"
    root: str | None = None
    download: bool = False
    batch_size: Int = Field(64, ge=1)
    eval_batch_size: Int = Field(512, ge=1)
    num_workers: Int = Field(0, ge=0)
    image_size: Int | None = Field(None, ge=8, description="resize (crop) images to this size (datasets that take it)")
    long_tail: LongTailConfig | None = None
    groups: Literal["thirds", "shots"] | None = Field(
        None, description="class groups for ltkd edges and per-group metrics (default: thirds when long-tailed)")
    val_fraction: Number = Field(0.0, ge=0, lt=1, description="share of each class's training images held out as "
                                                              "the validation split (0: none)")
    sampler: SamplerConfig | None = Field(None, description="class-balanced batches (default: a shuffled epoch)")
    pipeline: Literal["auto", "peers", "producer", "stream"] = Field(
        "auto", description="who makes the training batches: every peer's worker its own (peers), one producer "
                            "per node for the workers there (producer), or one producer per node reading the files "
                            "as it goes, the table never decoded whole (stream: parquet tables); auto: a producer "
                            "for image folders with more than one worker, stream above data.memory_bound")
    decoders: Int = Field(0, ge=0, description="Ray actors that make the batch producer's batches, spread over the "
                                               "cluster's nodes, CPU-only ones included (0: the producer's own thread)")
    memory_bound: ByteSize | None = Field(
        None, gt=0, description="the most the stream pipeline holds (e.g. 2GB): its shuffle window follows; "
                                "auto streams a table whose decoded images would exceed it")

    @model_validator(mode="after")
    def _streams_what_it_can(self) -> DataConfig:
        # A dataset streams when it registers a streaming loader (cohort.datasets.registry.STREAMS).
        setting = "pipeline" if self.pipeline == "stream" else "memory_bound" if self.memory_bound is not None else None
        if setting is None:
            return self
        if self.pipeline in ("peers", "producer"):
            raise problem(f"bounds the stream pipeline only, not data.pipeline {self.pipeline} (use stream or auto)",
                          "memory_bound")
        if self.dataset not in STREAMS:
            raise problem(f"only {' and '.join(STREAMS) or 'no'} datasets stream, not {self.dataset}", setting)
        if self.sampler is not None:  # its batches draw from the whole training set, not a window of row groups
            raise problem(f"the stream pipeline (data.{setting}) makes no class-balanced batches", "sampler")
        return self

    @model_validator(mode="after")
    def _decoders_serve_a_producer(self) -> DataConfig:
        if self.decoders and self.pipeline == "peers":
            raise problem("decoders make a batch producer's batches: data.pipeline peers has none (use producer or "
                          "auto)", "decoders")
        if self.decoders and (self.pipeline == "stream" or self.memory_bound is not None):
            raise problem("the stream pipeline reads its row groups through one cache per node: it takes no decoders "
                          "yet", "decoders")
        return self

    @model_validator(mode="after")
    def _settings_fit_the_dataset(self) -> DataConfig:
        # The dataset's loader declares the settings it takes (cohort.datasets.registry).
        refused = refused_setting(self.dataset, {name: getattr(self, name) for name in DATASET_SETTINGS})
        if refused is not None:
            setting, reason = refused
            raise problem(reason, setting)
        return self

    @model_validator(mode="after")
    def _batches_fit_the_sampler(self) -> DataConfig:
        if self.sampler is not None and self.batch_size % self.sampler.m_per_class:
            raise problem(f"batch_size {self.batch_size} is not a multiple of m_per_class {self.sampler.m_per_class}",
                          "sampler.m_per_class")
        return self

    @field_validator("dataset")
    @classmethod
    def _known_dataset(cls, name: str) -> str:
        if name not in DATASETS:
            raise problem(unknown("dataset", name, DATASETS))
        return name


# --------------------------------------------------------------------------- training


class OptimizerConfig(Strict):
    name: Literal["sgd", "adam", "adamw"] = "sgd"
    lr: Number = Field(0.05, gt=0)
    momentum: Number = Field(0.9, ge=0, lt=1)
    weight_decay: Number = Field(5e-4, ge=0)
    nesterov: bool = False


class OptimizerOverride(Strict):
    """A peer's changes to the cohort's optimizer; unset fields keep the cohort's value."""

    name: Literal["sgd", "adam", "adamw"] | None = None
    lr: Number | None = Field(None, gt=0)
    momentum: Number | None = Field(None, ge=0, lt=1)
    weight_decay: Number | None = Field(None, ge=0)
    nesterov: bool | None = None


class ScheduleConfig(Strict):
    name: Literal["cosine", "multistep", "constant"] = "cosine"
    milestones: tuple[Int, ...] = ()
    gamma: Number = Field(0.1, gt=0, le=1)

    @model_validator(mode="before")
    @classmethod
    def _from_name(cls, value: Any) -> Any:
        # `schedule: cosine` is shorthand for `schedule: {name: cosine}`.
        return {"name": value} if isinstance(value, str) else value

    @model_validator(mode="after")
    def _milestones_fit(self) -> ScheduleConfig:
        if self.name == "multistep":
            if not self.milestones:
                raise problem("a multistep schedule needs milestones (epochs at which lr *= gamma)", "milestones")
            if list(self.milestones) != sorted(set(self.milestones)) or self.milestones[0] < 1:
                raise problem("must be increasing epoch numbers >= 1", "milestones")
        elif self.milestones:
            raise problem(f"only a multistep schedule takes milestones, not {self.name}", "milestones")
        return self


class TrainConfig(Strict):
    epochs: Int = Field(10, ge=1)
    optimizer: OptimizerConfig = OptimizerConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    ce_weight: Number = Field(1.0, ge=0)
    checkpoint_every: Int = Field(1, ge=1, description="epochs between checkpoints (the last epoch always has one)")
    keep_checkpoints: Int = Field(2, ge=1, description="how many of the latest checkpoints the storage keeps")
    max_failures: Int = Field(2, ge=0, description="worker-group restarts from the last checkpoint before failing")
    check_batches_every: Int = Field(50, ge=0, description="steps between cross-peer batch fingerprint checks (0: off)")
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32", description="the forward pass's autocast type; logits, losses and the exchange stay fp32")
    calibrate_every: Int = Field(0, ge=0, description="epochs between temperature-scaling fits on the validation "
                                                      "split (0: after the last epoch only)")


# --------------------------------------------------------------------------- peers and edges


class EmbeddingConfig(Strict):
    """MCL's embedding head, which the peer owns: Linear → ReLU → Linear → L2 norm over its
    penultimate feature (built with the peer, trained by its optimizer, saved with it)."""

    dim: Int = Field(128, ge=1, description="the embedding's size D (MCL: 128)")
    vcl: Number = Field(0.1, ge=0, description="α, the weight of the peer's own contrastive term C(S_ii) (MCL: 0.1; "
                                               "0: none)")
    tau: Number = Field(0.07, gt=0, description="the temperature τ of that term's similarities (MCL: 0.07)")


class TapsConfig(Strict):
    """Where a peer's network is tapped (cohort.models.taps), overriding what its model declares."""

    penultimate: str | None = Field(None, min_length=1, description="the classifier (an nn.Linear) whose input is "
                                                                    "the penultimate feature (default: the model's)")
    stages: tuple[str, ...] | None = Field(None, description="modules whose outputs are the stages, in forward "
                                                             "order (default: those the model declares)")

    @field_validator("stages")
    @classmethod
    def _named_stages(cls, stages: tuple[str, ...] | None) -> tuple[str, ...] | None:
        if stages is not None and (not all(stages) or len(set(stages)) != len(stages)):
            raise problem(f"module names, each once, not {quoted(list(stages))}")
        return stages


class PeerConfig(Strict):
    model: str
    model_args: dict[str, bool | int | float | str] = {}
    optimizer: OptimizerOverride = OptimizerOverride()
    frozen: bool = False
    checkpoint: str | None = None
    replicas: Int = Field(1, ge=1, description="data-parallel workers of this peer (DDP within the peer)")
    sync_batchnorm: bool = Field(True, description="with replicas, BatchNorm statistics over the whole batch "
                                                   "(all-reduced within the peer's replicas); false: per shard")
    init_seed: Int | str | None = Field(None, description="the key of the peer's initial weights (default: "
                                                               "its name): same key, model and seed, same weights")
    embedding: EmbeddingConfig | None = Field(None, description="an embedding head on the penultimate feature, for "
                                                                "mcl edges (docs/representations.md)")
    taps: TapsConfig | None = Field(None, description="where the peer's network is tapped for representations "
                                                      "(penultimate classifier, stages): default the model's own")

    @field_validator("model")
    @classmethod
    def _known_model(cls, name: str) -> str:
        if not model_exists(name):
            raise problem(unknown_model(name))
        return name

    @model_validator(mode="after")
    def _model_args_fit(self) -> PeerConfig:
        options = model_options(self.model)
        if options is None:
            return self
        for key in self.model_args:
            if key not in options:
                raise problem(f"not an option of model {quoted(self.model)}{did_you_mean(key, options)}"
                               f" (it takes: {', '.join(options) or 'none'})", f"model_args.{key}")
        return self

    @model_validator(mode="after")
    def _frozen_needs_weights(self) -> PeerConfig:
        if self.frozen and not self.checkpoint:
            raise problem("a frozen peer needs a checkpoint to load its weights from", "checkpoint")
        return self


# --------------------------------------------------------------------------- the rest


class TrackingConfig(Strict):
    experiment: str | None = Field(None, description="default: the topology's name")
    uri: str | None = Field(None, description=f"default: {DEFAULT_TRACKING_URI} in the working directory")


class ResourcesConfig(Strict):
    cpus_per_peer: Number | None = Field(None, gt=0, description="default: the machine's CPUs shared by the workers, at most 1 each")
    use_gpu: bool = False
    gpus_per_peer: Number | None = Field(
        None, gt=0, le=1, description="GPUs per worker with use_gpu (default 1); a fraction shares a GPU between workers")
    accelerator_type: str | None = Field(None, min_length=1, description="Ray accelerator type of the GPUs, e.g. A100")
    node_labels: dict[str, str] = Field({}, description="Ray node labels every worker's node must have")

    @model_validator(mode="after")
    def _gpu_settings_need_gpus(self) -> ResourcesConfig:
        for key in ("gpus_per_peer", "accelerator_type"):
            if getattr(self, key) is not None and not self.use_gpu:
                raise problem("applies to GPUs only: set resources.use_gpu: true", key)
        return self

    @property
    def gpus_per_worker(self) -> float:
        """GPUs each Ray Train worker asks for (0 on CPUs)."""
        if not self.use_gpu:
            return 0.0
        return 1.0 if self.gpus_per_peer is None else self.gpus_per_peer


class ExchangeConfig(Strict):
    """How peers see each other's predictions (docs/codistillation.md): ``lockstep``, every step's
    logits through one collective (the default), or ``snapshot``, codistillation: each peer publishes
    its weights every ``every`` of its steps and computes its teachers' logits from its copies of them."""

    mode: Literal["lockstep", "snapshot"] = "lockstep"
    every: Int = Field(50, ge=1, description="snapshot: a peer's steps between publications of its weights (k)")
    staleness: Int | None = Field(None, ge=0, description="snapshot: the most steps a teacher's copy may lag behind "
                                  "the reader's step before the reader waits (default: it never waits)")
    burn_in: Int = Field(0, ge=0, description="snapshot: steps of each peer before its distillation edges switch on")
    data: Literal["shared", "disjoint"] = Field("shared", description="snapshot: every peer on every batch (shared), "
                                                "or each on its own part of every epoch (disjoint)")
    teachers: Literal["eval", "train"] = Field("eval", description="snapshot: the mode of the teachers' copies "
                                               "(train: batch norm on the batch's statistics)")

    @model_validator(mode="after")
    def _settings_of_snapshot_mode(self) -> ExchangeConfig:
        if self.mode == "lockstep":
            for key, default in (("every", 50), ("staleness", None), ("burn_in", 0), ("data", "shared"),
                                 ("teachers", "eval")):
                if getattr(self, key) != default:
                    raise problem("a setting of mode snapshot (exchange.mode: snapshot)", key)
        elif self.staleness is not None and self.staleness < self.every - 1:
            raise problem(f"{self.staleness} steps is below every - 1 = {self.every - 1}: a copy published every "
                          f"{self.every} steps lags up to {self.every - 1} steps, so a reader would wait forever",
                          "staleness")
        return self

    @property
    def snapshot(self) -> bool:
        return self.mode == "snapshot"


class Topology(Strict):
    name: SafeName = Field(description="names the MLflow experiment (by default), artifact folders and Ray's storage")
    seed: Seed = 0
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    peers: dict[str, PeerConfig]
    edges: tuple[Edge, ...] = ()
    gates: tuple[Gate, ...] = ()
    exchange: ExchangeConfig = ExchangeConfig()
    tracking: TrackingConfig = TrackingConfig()
    resources: ResourcesConfig = ResourcesConfig()

    @field_validator("peers", mode="before")
    @classmethod
    def _peers_mapping(cls, peers: Any) -> Any:
        if isinstance(peers, list):
            raise problem("must be a mapping from peer name to its settings, not a list")
        if isinstance(peers, dict) and not peers:
            raise problem("a cohort needs at least one peer")
        if isinstance(peers, dict):
            for name in peers:
                if not isinstance(name, str) or not PEER_NAME.match(name):
                    raise problem(f"peer name {quoted(name)} must start with a letter and hold only letters, digits, _ and -")
                if name in RESERVED_PEER_NAMES:
                    raise problem(f"peer name {quoted(name)} is reserved")
        return peers

    @model_validator(mode="after")
    def _edges_connect_peers(self) -> Topology:
        for index, edge in enumerate(self.edges):
            if edge.to not in self.peers:
                raise problem(f"unknown peer {quoted(edge.to)} (peers: {', '.join(self.peers)})", f"edges[{index}].to")
            for sender in edge.senders:
                if sender not in self.peers:
                    raise problem(f"unknown peer {quoted(sender)} (peers: {', '.join(self.peers)})", f"edges[{index}].from")
            if edge.senders == (edge.to,):
                raise problem(f"a peer cannot distill from itself ({quoted(edge.to)})", f"edges[{index}]")
            if self.peers[edge.to].frozen:
                raise problem(f"peer {quoted(edge.to)} is frozen and cannot receive an edge", f"edges[{index}].to")
        return self

    @model_validator(mode="after")
    def _representation_edges_fit(self) -> Topology:
        for index, edge in enumerate(self.edges):
            payload = LOSSES[edge.loss].payload
            if payload == LOGITS:
                continue
            if isinstance(edge.source, EnsembleSource):
                raise problem(f"loss {quoted(edge.loss)} exchanges {payload}, which are not averaged: one peer per edge",
                              f"edges[{index}].from")
            if payload == EMBEDDING:
                for peer in (edge.senders[0], edge.to):
                    if self.peers[peer].embedding is None:
                        raise problem(f"loss {quoted(edge.loss)} contrasts embeddings: peer {quoted(peer)} needs an "
                                      f"embedding head (peers.{peer}.embedding: {{dim: 128}})", f"edges[{index}]")
                dims = {peer: self.peers[peer].embedding.dim for peer in (edge.senders[0], edge.to)}
                if len(set(dims.values())) > 1:
                    raise problem("the two peers' embeddings differ in size ("
                                  + ", ".join(f"{peer} {dim}" for peer, dim in dims.items()) + ")", f"edges[{index}]")
        return self

    @model_validator(mode="after")
    def _snapshots_exchange_logits_only(self) -> Topology:
        """Codistillation computes teachers' logits from copies of their networks: what it cannot do,
        refused before anything starts."""
        if not self.exchange.snapshot:
            return self
        for name, peer in self.peers.items():
            if peer.replicas > 1:
                raise problem("snapshot exchange runs one worker per peer (replicas: 1)", f"peers.{name}.replicas")
        if self.gates:
            raise problem("gates decide from every peer's logits of the step: they need exchange.mode lockstep",
                          "gates")
        for index, edge in enumerate(self.edges):
            if LOSSES[edge.loss].payload != LOGITS:
                raise problem(f"loss {quoted(edge.loss)} exchanges {LOSSES[edge.loss].payload}: snapshot exchange "
                              "computes teachers' logits only", f"edges[{index}].loss")
        return self

    @model_validator(mode="after")
    def _gates_connect_peers(self) -> Topology:
        pairs: dict[tuple[str, str], int] = {}
        for index, gate in enumerate(self.gates):
            for role in ("teacher", "student"):
                name = getattr(gate, role)
                if name not in self.peers:
                    raise problem(f"unknown peer {quoted(name)} (peers: {', '.join(self.peers)})", f"gates[{index}].{role}")
                if self.peers[name].frozen:
                    raise problem(f"peer {quoted(name)} is frozen: a gate needs two peers that train",
                                  f"gates[{index}].{role}")
            if gate.teacher == gate.student:
                raise problem(f"a gate needs two different peers ({quoted(gate.teacher)} twice)", f"gates[{index}]")
            pair = (gate.teacher, gate.student)
            if pair in pairs:
                raise problem(f"gates[{pairs[pair]}] already gates teacher {quoted(gate.teacher)} by student "
                              f"{quoted(gate.student)}", f"gates[{index}]")
            pairs[pair] = index
        return self

    @model_validator(mode="after")
    def _replicas_form_a_grid(self) -> Topology:
        # Every data shard needs one worker of every peer (its logits), so the counts must agree.
        first, *others = self.peer_names
        for name in others:
            if self.peers[name].replicas != self.peers[first].replicas:
                raise problem(f"every peer needs the same number of replicas ({quoted(first)} has "
                               f"{self.peers[first].replicas}, {quoted(name)} has {self.peers[name].replicas})",
                               f"peers.{name}.replicas")
        if self.data.batch_size < self.replicas:
            raise problem(f"a batch of {self.data.batch_size} cannot be split into {self.replicas} replicas' shards",
                           "data.batch_size")
        return self

    @model_validator(mode="after")
    def _precision_fits_the_device(self) -> Topology:
        if self.train.precision == "fp16" and not self.resources.use_gpu:
            raise problem("fp16 needs GPUs (resources.use_gpu: true); on CPUs use bf16", "train.precision")
        return self

    # ---------------------------------------------------------------- views the trainer uses

    @property
    def peer_names(self) -> list[str]:
        """Peers in file order; peer k runs on the Ray Train worker of rank k (on ranks
        ``shard * len(peers) + k`` with replicas, see cohort.worker.grid)."""
        return list(self.peers)

    @property
    def replicas(self) -> int:
        """Data-parallel replicas of every peer (equal for all peers): the number of data shards."""
        return self.peers[self.peer_names[0]].replicas

    @property
    def num_workers(self) -> int:
        """Ray Train workers: one per peer and replica."""
        return len(self.peers) * self.replicas

    @property
    def experiment(self) -> str:
        return self.tracking.experiment or self.name

    def incoming_edges(self, peer: str) -> list[Edge]:
        return [edge for edge in self.edges if edge.to == peer]

    def teachers_of(self, peer: str) -> list[str]:
        """The peers whose logits ``peer``'s edges read (an ensemble's members included), in peer order."""
        senders = {sender for edge in self.incoming_edges(peer) for sender in edge.senders}
        return [name for name in self.peer_names if name in senders]

    def gates_on(self, peer: str) -> list[tuple[int, Gate]]:
        """The gates whose teacher is ``peer``, with their indices in ``gates``."""
        return [(index, gate) for index, gate in enumerate(self.gates) if gate.teacher == peer]

    def optimizer_for(self, peer: str) -> OptimizerConfig:
        override = self.peers[peer].optimizer.model_dump(exclude_none=True)
        return self.train.optimizer.model_copy(update=override)

    def with_absolute_paths(self, base: str | Path) -> Topology:
        """The same topology with ``data.root`` and checkpoints absolute: workers and Tune trials
        run in other directories."""
        def absolute(path: str | None) -> str | None:
            if path is None or path.startswith(("mlflow:", "runs:/")):
                return path  # an MLflow reference, fetched by the driver
            return str((Path(base) / Path(path).expanduser()).resolve())

        data = self.data.model_copy(update={"root": absolute(self.data.root)})
        peers = {name: peer.model_copy(update={"checkpoint": absolute(peer.checkpoint)})
                 for name, peer in self.peers.items()}
        return self.model_copy(update={"data": data, "peers": peers})

    def to_dict(self) -> dict[str, Any]:
        """The resolved topology as plain data: what the file would say with every default written out."""
        return self.model_dump(mode="json", by_alias=True)

    def to_yaml(self) -> str:
        """The resolved topology as YAML without anchors, so ``read_yaml`` reads it back."""
        return dump_yaml(self.to_dict())

    def flatten(self) -> dict[str, Any]:
        """Dotted keys to values (``edges.0.temperature``): MLflow's params, and ``--set``'s keys."""
        return dict(_flatten(self.to_dict()))


# --------------------------------------------------------------------------- loading


def load_topology(path: str | Path, overrides: Iterable[str] = ()) -> Topology:
    """Read, override (``key=value`` strings) and validate a topology file."""
    raw = read_yaml(path)
    return topology_from_dict(raw, Path(path).name, overrides)


def topology_from_dict(raw: Any, where: str = "topology", overrides: Iterable[str] | Mapping[str, Any] = ()) -> Topology:
    topology = validated(Topology, raw, where, "name, peers, edges")
    pairs = overrides.items() if isinstance(overrides, Mapping) else [parse_assignment(item) for item in overrides]
    pairs = list(pairs)
    if not pairs:
        return topology
    resolved = topology.to_dict()
    for key, value in pairs:
        set_dotted(resolved, key, value, where)
        _drop_foreign_parameters(resolved, key)
    return validated(Topology, resolved, f"{where} (with --set)", "name, peers, edges")


def _drop_foreign_parameters(resolved: dict[str, Any], key: str) -> None:
    """After ``edges.N.loss`` changes, the old loss's parameters no longer apply: drop them (the
    new loss's defaults fill in)."""
    match = re.fullmatch(r"edges\.(\d+)\.loss", key)
    if not match or resolved["edges"][int(match.group(1))].get("loss") not in LOSSES:
        return
    edge = resolved["edges"][int(match.group(1))]
    accepted = set(EDGE_FIELDS) | set(LOSSES[edge["loss"]].params)
    for name in [name for name in edge if name not in accepted]:
        del edge[name]


def _flatten(tree: Any, prefix: str = "") -> Iterable[tuple[str, Any]]:
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from _flatten(value, f"{prefix}{key}.")
    elif isinstance(tree, list) and tree and all(isinstance(item, dict) for item in tree):
        for index, value in enumerate(tree):
            yield from _flatten(value, f"{prefix}{index}.")
    else:
        yield prefix[:-1], tree
