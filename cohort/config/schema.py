"""Building blocks of the file schemas (topologies, search spaces, study files)."""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict
from pydantic_core import PydanticCustomError


class Strict(BaseModel):
    """A section of a file: unknown keys are refused, and the validated value is immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def problem(message: str, key: str | None = None) -> PydanticCustomError:
    """A validation error whose ``key`` (a path below the validated object) joins the location
    (``cohort.config.errors.describe`` writes it as ``location: message``)."""
    return PydanticCustomError("cohort", "{message}", {"message": message, "key": key or ""})
