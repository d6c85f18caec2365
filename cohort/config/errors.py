"""The one exception type the commands turn into a one-line message (``CohortError``), the quoting of
a user's value in it, and validation errors in the file's own words: one pydantic error as
``location: message``."""
from __future__ import annotations

import difflib
import reprlib
from collections.abc import Iterable, Mapping
from typing import Any

from pydantic import BaseModel

_QUOTE = reprlib.Repr()
_QUOTE.maxstring = _QUOTE.maxother = _QUOTE.maxlong = 60
_QUOTE.maxlist = _QUOTE.maxtuple = _QUOTE.maxdict = _QUOTE.maxset = _QUOTE.maxfrozenset = 6
_QUOTE.maxlevel = 3


class CohortError(Exception):
    """A problem with the user's input or environment, reported as one line without a traceback.

    ``where`` names the file (and, for topology errors, the key) the problem is in.
    """

    def __init__(self, message: str, where: str | None = None):
        super().__init__(message)
        self.message = message
        self.where = where

    def __str__(self) -> str:
        return f"{self.where}: {self.message}" if self.where else self.message


def quoted(value: object) -> str:
    """``repr(value)`` cut short, for quoting a user's value in an error (a 1 MB string or a long
    list must not make a 1 MB message); at most 100 characters, however the value nests."""
    return named(_QUOTE.repr(value), 100)


def named(text: object, limit: int = 60) -> str:
    """A key or path as an error names it (unquoted): as is, or its ends around ``...`` when long."""
    text = str(text)
    return text if len(text) <= limit else f"{text[:(limit - 3) // 2]}...{text[len(text) - (limit - 3) // 2:]}"


def first_line(error: BaseException, limit: int = 300) -> str:
    """The first line of an exception's text (its type's name if it has none)."""
    text = str(error).strip()
    return (text.splitlines()[0] if text else type(error).__name__)[:limit]



def describe(error: Mapping[str, Any], root: type[BaseModel]) -> str:
    """One pydantic error of a file validated as ``root`` as ``location: message``, in the file's own words."""
    loc = [part for part in error["loc"] if not (isinstance(part, str) and part in ("str", "EnsembleSource"))]
    ctx = error.get("ctx") or {}
    if ctx.get("key"):
        loc.extend(ctx["key"].split("."))
    path = loc_text(loc)
    kind = error["type"]
    value = error.get("input")
    if kind == "extra_forbidden":
        allowed = allowed_keys(error["loc"][:-1], root)
        return f"{path}: unknown key{did_you_mean(str(loc[-1]), allowed)}"
    if kind == "missing":
        return f"{path}: missing (required)"
    if kind == "cohort":
        return f"{path}: {ctx['message']}" if path else ctx["message"]
    if kind in ("dict_type", "model_type", "model_attributes_type"):
        return f"{path}: must be a mapping, not a {kind_of(value)}"
    if kind == "literal_error":
        return f"{path}: {quoted(value)} is not one of {ctx.get('expected')}"
    if kind in ("value_error", "assertion_error"):
        message = error["msg"].split(", ", 1)[1] if ", " in error["msg"] else error["msg"]
        return message if not path or message.startswith(path) else f"{path}: {message}"
    if kind.startswith(("greater_than", "less_than")):
        return f"{path}: {error['msg'].replace('Input should be', 'must be')}, not {quoted(value)}"
    if kind in ("float_parsing", "int_parsing", "float_type", "int_type", "bool_parsing", "bool_type", "string_type",
                "int_from_float", "tuple_type", "too_short", "finite_number"):
        return f"{path}: {error['msg'].replace('Input should be', 'must be')}, not {quoted(value)}"
    return f"{path}: {error['msg']}"


def allowed_keys(loc: tuple, root: type[BaseModel]) -> list[str]:
    """The keys the section at ``loc`` accepts, for 'did you mean' hints."""
    model: Any = root
    for part in loc:
        if isinstance(part, int):
            continue  # an item of a list keeps the list's item model
        fields = {field.alias or name: field for name, field in model.model_fields.items()}
        if part in fields:
            model = model_in(fields[part].annotation)
            if model is None:
                return []
        # any other part is a mapping key, such as a peer's name: the value model stays
    return [field.alias or name for name, field in model.model_fields.items()]


def model_in(annotation: Any) -> Any:
    """The pydantic model an annotation holds (``X | None``, ``tuple[X, ...]``, ...), or None."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = model_in(arg)
        if found is not None:
            return found
    return None


def loc_text(loc: list) -> str:
    """A location as the file writes it: ``edges[0].temperature``."""
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{named(part)}" if text else named(part))
    return named(text, 200)


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest choice, or nothing."""
    match = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {match[0]!r}?)" if match else ""


def unknown(kind: str, name: object, known: Iterable[str], sort: bool = True) -> str:
    """The one wording of a name a registry does not have: ``unknown loss 'kdd' (known: bdkd, dkd, kd, ...)``."""
    known = sorted(known) if sort else list(known)
    return f"unknown {kind} {quoted(name)} (known: {', '.join(known) or 'none'})"


def kind_of(value: Any) -> str:
    """A value's kind in YAML's words: mapping, list, string, number, ..."""
    return {list: "list", dict: "mapping", str: "string", int: "number", float: "number", bool: "boolean",
            type(None): "null"}.get(type(value), type(value).__name__)


def byte_size(count: int) -> str:
    """``count`` bytes in kB, MB or GB (decimal units), two or three significant digits."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if count >= size:
            value = count / size
            return f"{value:.0f} {unit}" if value >= 10 else f"{value:.1f} {unit}"
    return f"{count} bytes"
