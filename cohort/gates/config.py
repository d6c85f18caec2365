"""A gate in a topology file: ``{rule: switokd, teacher: t, student: s}`` and the rule's own
parameters (``cohort.gates.registry``), validated like an edge's loss parameters."""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, field_validator, model_validator

from cohort.config.errors import quoted, unknown
from cohort.config.schema import problem
from cohort.config.signatures import resolve_extras

from .registry import GATE_FIELD_NAMES, GATES


class Gate(BaseModel):
    """``rule`` decides each step from the logits of ``teacher`` and ``student``; when it fires, the
    teacher's edges from the student are off, and a teacher all of whose gates fire takes no step.

    Keys other than the gate fields are the rule's parameters; validation fills in the defaults of
    those not given, so the resolved topology shows every value a run used.
    """

    model_config = ConfigDict(extra="allow", frozen=True)

    rule: str
    teacher: str
    student: str

    @field_validator("rule")
    @classmethod
    def _known_rule(cls, name: str) -> str:
        if name not in GATES:
            raise problem(unknown("gate rule", name, GATES))
        return name

    @model_validator(mode="after")
    def _rule_parameters(self) -> Gate:
        resolve_extras(self, f"gate rule {quoted(self.rule)}", GATES[self.rule].params, GATE_FIELD_NAMES)
        return self

    @property
    def params(self) -> dict[str, Any]:
        """The rule's keyword arguments for this gate."""
        return dict(self.__pydantic_extra__ or {})

    @property
    def label(self) -> str:
        return f"{self.rule}:{self.teacher}/{self.student}"

    @property
    def expert_metric(self) -> str:
        """The metric (of the teacher, ``<teacher>/<this>``) of the share of steps in which it fired."""
        return f"{GATES[self.rule].fired}_{self.student}"
