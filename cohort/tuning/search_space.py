"""Search-space files (``tune_spaces/*.yaml``) and the metric expressions they optimize.

A space file says which metric to optimize, how, and which topology values to sample::

    metric: student/acc - 0.5 * student/ece
    mode: max
    num_samples: 16
    scheduler: {name: asha, grace_period: 2, reduction_factor: 2}
    search: {name: optuna}
    space:
      edges.0.temperature: {loguniform: [1, 8]}

Keys of ``space`` are the same dotted paths as ``cohort.run --set``.
"""
from __future__ import annotations

import ast
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    Field,
    field_validator,
    model_validator,
)

from cohort.config.errors import CohortError, named, quoted
from cohort.config.loader import read_yaml
from cohort.config.schema import Int, Number, Strict, validated
from cohort.config.signatures import finite_number
from cohort.topology import Topology, topology_from_dict

DISTRIBUTIONS = ("uniform", "loguniform", "quniform", "randint", "choice", "grid")


class Scheduler(Strict):
    name: Literal["asha", "fifo", "pbt"] = "fifo"
    grace_period: Int = Field(1, ge=1, description="asha: epochs every trial runs before it can be stopped")
    reduction_factor: Number = Field(2, gt=1, description="asha: keep 1/reduction_factor of the trials at each rung")
    perturbation_interval: Int = Field(2, ge=1, description="pbt: epochs between exploit/explore decisions")
    quantile_fraction: Number = Field(0.25, gt=0, le=0.5,
                                     description="pbt: the bottom fraction copies a trial of the top fraction")
    resample_probability: Number = Field(0.25, ge=0, le=1,
                                        description="pbt: chance of a fresh sample instead of a x0.8 / x1.2 step")
    synch: bool = Field(False, description="pbt: decide when every trial has reached the perturbation epoch")

    @model_validator(mode="after")
    def _fields_of_this_scheduler(self) -> Scheduler:
        for field in sorted(self.model_fields_set - {"name"}):
            if field not in SCHEDULER_FIELDS[self.name]:
                takes = ", ".join(SCHEDULER_FIELDS[self.name]) or "no settings"
                raise ValueError(f"scheduler.{field}: not a setting of {self.name} (it takes {takes})")
        return self


SCHEDULER_FIELDS = {
    "fifo": (),
    "asha": ("grace_period", "reduction_factor"),
    "pbt": ("perturbation_interval", "quantile_fraction", "resample_probability", "synch"),
}


class Search(Strict):
    name: Literal["random", "grid", "optuna"] = "random"


class SearchSpace(Strict):
    metric: str = Field(min_length=1)
    mode: Literal["min", "max"]
    num_samples: Int = Field(8, ge=1)
    max_concurrent: Int | None = Field(None, ge=1, description="default: what the cluster's CPUs allow")
    scheduler: Scheduler = Scheduler()
    search: Search = Search()
    space: dict[str, dict[str, Any]] = Field(min_length=1)

    @field_validator("scheduler", "search", mode="before")
    @classmethod
    def _from_name(cls, value: Any) -> Any:
        return {"name": value} if isinstance(value, str) else value

    @field_validator("space")
    @classmethod
    def _distributions(cls, space: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        for key, spec in space.items():
            check_distribution(key, spec)
        return space

    @model_validator(mode="after")
    def _grid_needs_grid_search(self) -> SearchSpace:
        kinds = {next(iter(spec)) for spec in self.space.values()}
        if self.search.name == "grid" and kinds != {"grid"}:
            raise ValueError("search: grid needs every space entry to be {grid: [...]}")
        if self.search.name == "optuna" and "grid" in kinds:
            raise ValueError("search: optuna cannot sample {grid: [...]} entries (use choice)")
        if self.scheduler.name == "pbt":
            # Tune's PBT chooses the next values itself, so it refuses a search algorithm.
            if self.search.name == "optuna":
                raise ValueError("search: pbt explores by itself and cannot be combined with optuna (use random)")
            if kinds == {"grid"}:
                raise ValueError("scheduler: pbt needs at least one space entry that is not {grid: [...]} to mutate")
        return self

    def mutations(self) -> dict[str, dict[str, Any]]:
        """The entries PBT may perturb: all but grid entries, which only set starting points."""
        return {key: spec for key, spec in self.space.items() if next(iter(spec)) != "grid"}

    def parsed_metric(self) -> MetricExpression:
        return MetricExpression(self.metric)


def check_distribution(key: str, spec: Any) -> None:
    where = f"space.{named(key)}"
    if not isinstance(spec, dict) or len(spec) != 1:
        raise ValueError(f"{where}: must be one distribution, e.g. {{uniform: [0.5, 2.0]}} (one of {', '.join(DISTRIBUTIONS)})")
    kind, args = next(iter(spec.items()))
    if kind not in DISTRIBUTIONS:
        raise ValueError(f"{where}: unknown distribution {quoted(kind)} (one of {', '.join(DISTRIBUTIONS)})")
    if kind in ("choice", "grid"):
        if not isinstance(args, list) or not args:
            raise ValueError(f"{where}: {kind} takes a non-empty list of values")
        return
    size = 3 if kind == "quniform" else 2
    if (not isinstance(args, list) or len(args) != size
            or not all(finite_number(a) for a in args)):
        shape = "[low, high, step]" if kind == "quniform" else "[low, high]"
        raise ValueError(f"{where}: {kind} takes {shape} as numbers")
    low, high = args[0], args[1]
    if low >= high:
        raise ValueError(f"{where}: {kind} needs low < high, got [{quoted(low)}, {quoted(high)}]")
    if kind == "loguniform" and low <= 0:
        raise ValueError(f"{where}: loguniform needs low > 0, got {quoted(low)}")
    if kind == "quniform" and args[2] <= 0:
        raise ValueError(f"{where}: quniform needs a step > 0, got {quoted(args[2])}")
    if kind == "randint" and not all(isinstance(a, int) for a in args):
        raise ValueError(f"{where}: randint takes whole numbers")


def tune_distribution(spec: Mapping[str, Any]):
    from ray import tune

    kind, args = next(iter(spec.items()))
    if kind == "uniform":
        return tune.uniform(*args)
    if kind == "loguniform":
        return tune.loguniform(*args)
    if kind == "quniform":
        return tune.quniform(*args)
    if kind == "randint":
        return tune.randint(args[0], args[1] + 1)  # both bounds included, as the file reads
    if kind == "choice":
        return tune.choice(args)
    return tune.grid_search(args)


def load_space(path: str | Path, topology: Topology) -> SearchSpace:
    """Read and validate a space file; every key must be a path of the topology."""
    where = Path(path).name
    space = validated(SearchSpace, read_yaml(path), where, "metric, mode, space")
    flat = topology.flatten()
    for key, spec in space.space.items():
        if key not in flat:
            raise CohortError(f"space.{named(key)}: not a path of topology {quoted(topology.name)} "
                              "(the keys are those of cohort.run --set, e.g. edges.0.temperature)", where)
        # One sampled value of each kind must make a valid topology: catches e.g. a loss name typo.
        kind, args = next(iter(spec.items()))
        if kind in ("choice", "grid"):
            for value in args:
                try:
                    topology_from_dict(topology.to_dict(), "topology", {key: value})
                except CohortError as error:
                    raise CohortError(f"space.{named(key)}: value {quoted(value)} makes the topology invalid ({error.message})",
                                      where) from None
    try:
        space.parsed_metric()
    except ValueError as error:
        raise CohortError(f"metric: {error}", where) from None
    return space


# --------------------------------------------------------------------------- metric expressions


_KEY = re.compile(r"(?<![\w.])[A-Za-z_][\w.-]*/[\w.-]+")  # not inside a word: no restart at each letter
METRIC_MAX_CHARS = 1000
_FUNCTIONS = {"min": min, "max": max, "abs": abs}


class MetricExpression:
    """A reported key (``student/ece``) or arithmetic over keys and numbers
    (``student/acc - 0.5 * student/ece``, ``max(a/acc, b/acc)``); evaluated without ``eval``."""

    def __init__(self, text: str):
        self.text = text.strip()
        self.keys: list[str] = []
        if len(self.text) > METRIC_MAX_CHARS:
            raise ValueError(f"{quoted(self.text)} is longer than {METRIC_MAX_CHARS} characters")

        def placeholder(match: re.Match) -> str:
            if match.group(0) not in self.keys:
                self.keys.append(match.group(0))
            return f"_k{self.keys.index(match.group(0))}"

        source = _KEY.sub(placeholder, self.text)
        try:
            self.tree = ast.parse(source, mode="eval").body
        except SyntaxError:
            raise ValueError(f"cannot read {quoted(self.text)} (a metric key, or + - * / over keys and numbers)") from None
        self._check(self.tree)
        if not self.keys:
            raise ValueError(f"{quoted(self.text)} names no metric (keys look like student/acc)")

    @property
    def is_plain_key(self) -> bool:
        return self.text in self.keys and len(self.keys) == 1

    def _check(self, node: ast.AST) -> None:
        allowed = (ast.BinOp, ast.UnaryOp, ast.Constant, ast.Name, ast.Call, ast.Add, ast.Sub, ast.Mult, ast.Div,
                   ast.USub, ast.UAdd, ast.Load)
        for child in ast.walk(node):
            if not isinstance(child, allowed):
                raise ValueError(f"{quoted(self.text)}: only + - * / min max abs, numbers and metric keys are allowed")
            if isinstance(child, ast.Constant) and not isinstance(child.value, (int, float)):
                raise ValueError(f"{quoted(self.text)}: {quoted(child.value)} is not a number")
            if isinstance(child, ast.Name) and not (child.id.startswith("_k") or child.id in _FUNCTIONS):
                raise ValueError(f"{quoted(self.text)}: {quoted(child.id)} is not a metric key (keys look like student/acc)")
            if isinstance(child, ast.Call) and not (isinstance(child.func, ast.Name) and child.func.id in _FUNCTIONS):
                raise ValueError(f"{quoted(self.text)}: only min, max and abs can be called")

    def missing(self, report: Mapping[str, Any]) -> list[str]:
        return [key for key in self.keys if key not in report]

    def __call__(self, report: Mapping[str, Any]) -> float:
        missing = self.missing(report)
        if missing:
            available = ", ".join(sorted(k for k in report if "/" in k and isinstance(report[k], (int, float))))
            raise KeyError(f"metric {quoted(missing[0])} is not reported (available: {available})")
        values = {f"_k{i}": float(report[key]) for i, key in enumerate(self.keys)}
        return float(self._evaluate(self.tree, values))

    def _evaluate(self, node: ast.AST, values: dict[str, float]) -> float:
        if isinstance(node, ast.Constant):
            return node.value
        if isinstance(node, ast.Name):
            return values[node.id]
        if isinstance(node, ast.UnaryOp):
            operand = self._evaluate(node.operand, values)
            return -operand if isinstance(node.op, ast.USub) else operand
        if isinstance(node, ast.Call):
            return _FUNCTIONS[node.func.id](*(self._evaluate(arg, values) for arg in node.args))
        left, right = self._evaluate(node.left, values), self._evaluate(node.right, values)
        if isinstance(node.op, ast.Add):
            return left + right
        if isinstance(node.op, ast.Sub):
            return left - right
        if isinstance(node.op, ast.Mult):
            return left * right
        return left / right if right != 0 else math.copysign(math.inf, left)
