"""Study files (``studies/*.yaml``): arms (methods) crossed with seeds, every arm a topology.

::

    name: bdkd-vs-dml-digits
    seeds: [0, 1, 2, 3, 4]        # or repeats: 5 (seeds 0..4)
    baseline: dml                 # every other arm is compared with it, paired by seed
    metrics: [acc, ece, nll, brier]
    set: {train.epochs: 10}       # applied to every arm, before the arm's own set
    arms:
      dml:  {topology: ../topologies/dml_pair.yaml, roles: {teacher: net_a, student: net_b}}
      bdkd: {topology: ../topologies/bdkd_pair.yaml}

Relative topology paths resolve against the study file. Each arm's topology is validated with
its overrides (the study's ``set``, the arm's ``set``, then the command line's ``--set``) before
anything starts, and every error is one line naming the arm and the field.

``roles`` names what the tables compare: role → the arm's peer (or ``ensemble``). An arm without
``roles`` shows its peers under their own names. The same role starts from the same initial
weights in every arm (with the same model and seed): the study sets each role's peer's
``init_seed`` to the role's name, unless the arm's topology already sets one.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import (
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

from cohort.config.errors import CohortError, did_you_mean, named, quoted
from cohort.config.loader import read_yaml
from cohort.config.overrides import parse_assignment
from cohort.config.schema import SAFE_NAME, SAFE_NAME_RULE, Int, SafeName, Seed, Strict, validated
from cohort.topology import Topology, topology_from_dict
from cohort.worker.report import ENSEMBLE

DEFAULT_METRICS = ("acc", "ece", "adaece", "nll", "brier")
MAX_RUNS = 1000  # arms x seeds: a study is one Tune experiment, planned and printed whole
SEED_FROM_SEEDS = "the study sets every run's seed from seeds: (or repeats:)"


class _Strict(Strict):
    model_config = ConfigDict(populate_by_name=True)


class ArmConfig(_Strict):
    topology: str = Field(min_length=1, description="the arm's topology file (relative: to the study file)")
    roles: dict[str, str] = Field({}, description="role shown in the tables -> the arm's peer (or ensemble)")
    overrides: dict[str, Any] = Field({}, alias="set", description="dotted topology keys -> values, for this arm")


class StudyConfig(_Strict):
    name: SafeName
    seeds: list[Seed] | None = Field(None, description="the seeds every arm runs with")
    repeats: Int | None = Field(None, ge=1, description="seeds 0..repeats-1 (instead of seeds)")
    baseline: str = Field(description="the arm every other arm is compared with")
    arms: dict[str, ArmConfig] = Field(min_length=1)
    metrics: list[str] = Field(list(DEFAULT_METRICS), min_length=1, description="the tables' columns")
    overrides: dict[str, Any] = Field({}, alias="set", description="dotted topology keys -> values, for every arm")
    experiment: str | None = Field(None, description="the MLflow experiment (default: the study's name)")
    max_concurrent: Int | None = Field(None, ge=1, description="runs at once (default: what the cluster allows)")

    @field_validator("arms")
    @classmethod
    def _arm_names(cls, arms: dict[str, ArmConfig]) -> dict[str, ArmConfig]:
        for arm in arms:
            if not SAFE_NAME.fullmatch(arm):
                raise ValueError(f"arms: {quoted(arm)} must be {SAFE_NAME_RULE}")
        return arms

    @model_validator(mode="after")
    def _seeds_and_baseline(self) -> StudyConfig:
        if (self.seeds is None) == (self.repeats is None):
            raise ValueError("seeds: give either seeds: [0, 1, ...] or repeats: N (seeds 0..N-1)")
        runs = len(self.arms) * (len(self.seeds) if self.seeds is not None else self.repeats)
        if runs > MAX_RUNS:
            raise ValueError(f"{'seeds' if self.seeds is not None else 'repeats'}: {len(self.arms)} arm(s) x "
                             f"{runs // len(self.arms)} seeds = {runs} runs; a study runs at most {MAX_RUNS}")
        if self.seeds is not None:
            seen = set()
            for seed in self.seeds:
                if seed in seen:
                    raise ValueError(f"seeds: {seed} is listed twice (each seed is one run of every arm)")
                seen.add(seed)
        if "seed" in self.overrides:
            raise ValueError(f"set.seed: {SEED_FROM_SEEDS}, not set")
        for name, arm in self.arms.items():
            if "seed" in arm.overrides:
                raise ValueError(f"arms.{name}.set.seed: {SEED_FROM_SEEDS}, not set")
        if self.baseline not in self.arms:
            raise ValueError(f"baseline: {quoted(self.baseline)} is not an arm{did_you_mean(self.baseline, list(self.arms))}"
                             f" (arms: {', '.join(self.arms)})")
        return self

    @property
    def seed_list(self) -> list[int]:
        return list(self.seeds) if self.seeds is not None else list(range(self.repeats or 0))


@dataclass(frozen=True)
class Arm:
    name: str
    path: Path  # its topology file
    topology: Topology  # resolved: every override and the roles' init seeds applied
    roles: dict[str, str]  # role -> peer (or ensemble)
    differences: dict[str, Any] = field(default_factory=dict)  # the dotted keys it sets (for the plan)


@dataclass(frozen=True)
class Study:
    path: Path
    config: StudyConfig
    arms: dict[str, Arm]

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def seeds(self) -> list[int]:
        return self.config.seed_list

    @property
    def baseline(self) -> str:
        return self.config.baseline

    @property
    def metrics(self) -> list[str]:
        return list(self.config.metrics)

    @property
    def experiment(self) -> str:
        return self.config.experiment or self.config.name

    @property
    def roles(self) -> list[str]:
        """Every role of the study, in the order the arms name them."""
        return list(dict.fromkeys(role for arm in self.arms.values() for role in arm.roles))

    def runs(self) -> list[tuple[str, int]]:
        """Every (arm, seed), seed by seed: a study stopped half-way has whole seeds to pair."""
        return [(arm, seed) for seed in self.seeds for arm in self.arms]


def load_study(path: str | Path, overrides: Iterable[str] = (), allow_single_seed: bool = False) -> Study:
    """Read and validate a study file and every arm's topology (with all overrides)."""
    path = Path(path)
    where = path.name
    if not path.is_file():
        raise CohortError(f"no such study file: {path}")
    config = validated(StudyConfig, read_yaml(path), where, "name, seeds, baseline, arms")
    seeds = config.seed_list
    if len(seeds) < 2 and not allow_single_seed:
        raise CohortError(f"seeds: {len(seeds)} seed gives no standard deviation and no interval (a study needs two "
                          "or more; --allow-single-seed runs it without them)", where)
    command_line = dict(parse_assignment(item) for item in overrides)
    if "seed" in command_line:
        raise CohortError(f"--set seed: {SEED_FROM_SEEDS}, not --set", where)
    arms = {name: load_arm(path, name, arm, config, command_line) for name, arm in config.arms.items()}
    return Study(path.resolve(), config, arms)


def load_arm(study_path: Path, name: str, arm: ArmConfig, config: StudyConfig, command_line: dict[str, Any]) -> Arm:
    where = study_path.name
    topology_path = (study_path.parent / arm.topology).resolve()
    if not topology_path.is_file():
        raise CohortError(f"arms.{name}.topology: no such file {quoted(arm.topology)} "
                          f"(relative paths start at the study file's folder)", where)
    overrides = {**config.overrides, **arm.overrides, **command_line}
    try:
        topology = topology_from_dict(read_yaml(topology_path), topology_path.name, overrides)
    except CohortError as error:
        located = f" ({error.where})" if error.where else ""
        raise CohortError(f"arms.{name}: {error.message}{located}", where) from None
    roles = dict(arm.roles) or {peer: peer for peer in topology.peer_names}
    taken: dict[str, str] = {}
    for role, peer in roles.items():
        if peer != ENSEMBLE and peer not in topology.peers:
            raise CohortError(f"arms.{name}.roles.{named(role)}: {quoted(peer)} is not a peer of {topology_path.name}"
                              f"{did_you_mean(peer, topology.peer_names)} (peers: {', '.join(topology.peer_names)}, "
                              f"or {ENSEMBLE})", where)
        if peer in taken:
            raise CohortError(f"arms.{name}.roles.{named(role)}: {quoted(peer)} already plays the role "
                              f"{quoted(taken[peer])} (each role needs its own peer)", where)
        taken[peer] = role
    # The same role starts from the same weights in every arm: its peer's initial weights are keyed
    # by the role (cohort.worker.peer.peer_seed), unless the topology chose a key itself.
    seeds = {f"peers.{peer}.init_seed": role for role, peer in roles.items()
             if peer in topology.peers and topology.peers[peer].init_seed is None}
    if seeds:
        topology = topology_from_dict(topology.to_dict(), topology_path.name, seeds)
    return Arm(name, topology_path, topology, roles, {**overrides, **seeds})


def with_seed(topology: Topology, seed: int) -> Topology:
    """One run of an arm: its topology with the study's seed."""
    return topology_from_dict(topology.to_dict(), topology.name, {"seed": seed})


def reported_metrics(arm: Arm, keys: Iterable[str]) -> set[str]:
    """The metrics the arm reports for its roles (``acc`` for ``student/acc``), from its report's keys."""
    owners = set(arm.roles.values())
    return {key.split("/", 1)[1] for key in keys if key.split("/", 1)[0] in owners}


def check_metrics(study: Study, reported: dict[str, set[str]]) -> None:
    """Every metric of the study must be reported by at least one arm (``reported``: arm -> metrics)."""
    everything = set().union(*reported.values()) if reported else set()
    for metric in study.metrics:
        if metric not in everything:
            shown = ", ".join(sorted(everything))
            raise CohortError(f"metrics: no arm reports {quoted(metric)}{did_you_mean(metric, sorted(everything))} "
                              f"(they report: {shown})", study.path.name)
