"""Building blocks of the file schemas (topologies, search spaces, study files)."""
from __future__ import annotations

import re
from typing import Annotated, Any, TypeVar

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, ValidationError
from pydantic_core import PydanticCustomError

from cohort.config.errors import CohortError, describe, kind_of, quoted

Model = TypeVar("Model", bound=BaseModel)

# The largest seed: numpy's seeding takes 0 .. 2**32 - 1 (Tune's searchers seed numpy with the
# topology's seed), and every seed derived from it (cohort.datasets, cohort.worker.peer) stays in torch's range.
SEED_MAX = 2**32 - 1
# A name that becomes a folder or a path component (a topology's, a study's, a registered model's):
# letters, digits, '_', '.' and '-', not starting with punctuation, no '..', at most 100 characters.
SAFE_NAME = re.compile(r"(?!.*\.\.)[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")
SAFE_NAME_RULE = "letters, digits, '_', '.' or '-' (at most 100, no leading punctuation, no '..')"


class Strict(BaseModel):
    """A section of a file: unknown keys are refused, the validated value is immutable, and a number
    is finite (``.inf`` and ``.nan`` are refused)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


def validated(model: type[Model], raw: Any, where: str, first_keys: str) -> Model:
    """A file's parsed YAML (``raw``) validated as ``model``, or one ``CohortError`` that names the
    file (``where``): empty, a top level that is not a mapping (``first_keys``: the keys it starts
    with, as the message shows them), or the first problem found, in the file's own words. The one
    check of a topology, a search space and a study file."""
    if raw is None:
        raise CohortError("the file is empty", where)
    if not isinstance(raw, dict):
        raise CohortError(f"the top level must be a mapping of keys ({first_keys}, ...), not a {kind_of(raw)}", where)
    try:
        return model.model_validate(raw)
    except ValidationError as error:
        errors = error.errors()
        # A value that may be a string or a mapping (an edge's `from: {ensemble: ...}`) is also reported
        # as not a string: the other error says what is wrong.
        relevant = [e for e in errors if "str" not in e["loc"]] or errors
        raise CohortError(describe(relevant[0], model), where) from None


def problem(message: str, key: str | None = None) -> PydanticCustomError:
    """A validation error whose ``key`` (a path below the validated object) joins the location
    (``cohort.config.errors.describe`` writes it as ``location: message``)."""
    return PydanticCustomError("cohort", "{message}", {"message": message, "key": key or ""})


def _not_a_boolean(value: Any) -> Any:
    # Python's bool is an int: pydantic would read `epochs: true` as 1 and `lr: true` as 1.0.
    if isinstance(value, bool):
        raise problem(f"must be a number, not {str(value).lower()}")
    return value


def _seed_in_range(seed: int) -> int:
    if not 0 <= seed <= SEED_MAX:
        raise problem(f"must be a whole number from 0 to {SEED_MAX} (2**32 - 1, what numpy's seeding takes), "
                      f"not {quoted(seed)}")
    return seed


def _safe_name(name: str) -> str:
    if not SAFE_NAME.fullmatch(name):
        raise problem(f"{quoted(name)} must be {SAFE_NAME_RULE}: it names folders and MLflow runs")
    return name


Int = Annotated[int, BeforeValidator(_not_a_boolean)]  # a whole number (20.0 from a sweep's quniform too), never a boolean
Number = Annotated[float, BeforeValidator(_not_a_boolean)]  # never a boolean; finite in a Strict section
Seed = Annotated[int, BeforeValidator(_not_a_boolean), AfterValidator(_seed_in_range)]
SafeName = Annotated[str, AfterValidator(_safe_name)]
