"""The edges of a topology: a receiver learns from a sender (a peer or an ensemble of peers)
through a registered loss, whose parameters the edge carries."""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from cohort.config.errors import quoted, unknown
from cohort.config.schema import Int, Number, Strict, problem
from cohort.config.signatures import resolve_extras
from cohort.losses import LOSSES


class EnsembleSource(Strict):
    ensemble: tuple[str, ...] = Field(min_length=1)


EDGE_FIELDS = ("from", "to", "loss", "weight", "reduce", "warmup")  # no loss parameter may be named so:
# the registry refuses those in its EDGE_FIELD_NAMES, which a test checks covers every field of Edge


class Edge(BaseModel):
    """A directed edge: ``to`` learns from ``from`` through ``loss``.

    Keys other than the edge fields are the loss function's parameters (``temperature``,
    ``delta_high``, ...); validation fills in the defaults of those not given, so the resolved
    topology shows every value a run used.
    """

    model_config = ConfigDict(extra="allow", frozen=True, populate_by_name=True, allow_inf_nan=False)

    source: str | EnsembleSource = Field(alias="from")
    to: str
    loss: str
    weight: Number = Field(1.0, ge=0)
    reduce: Literal["mean", "sum"] = "mean"
    warmup: Int = Field(0, ge=0, description="epochs over which the weight ramps up linearly (DKD's warm-up)")

    @field_validator("source", mode="before")
    @classmethod
    def _peer_or_ensemble(cls, source: Any) -> Any:
        if not isinstance(source, (str, dict)):
            raise problem(f"must be a peer name or {{ensemble: [peer, ...]}}, not {quoted(source)}")
        return source

    @field_validator("loss")
    @classmethod
    def _known_loss(cls, name: str) -> str:
        if name not in LOSSES:
            raise problem(unknown("loss", name, LOSSES))
        return name

    @model_validator(mode="after")
    def _loss_parameters(self) -> Edge:
        resolve_extras(self, f"loss {quoted(self.loss)}", LOSSES[self.loss].params, EDGE_FIELDS)
        return self

    @property
    def params(self) -> dict[str, Any]:
        """The loss function's keyword arguments for this edge."""
        return dict(self.__pydantic_extra__ or {})

    @property
    def senders(self) -> tuple[str, ...]:
        return self.source.ensemble if isinstance(self.source, EnsembleSource) else (self.source,)

    @property
    def label(self) -> str:
        source = "+".join(self.senders)
        return f"{source}->{self.to}:{self.loss}"
