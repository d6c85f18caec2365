"""The strict YAML reader: a safe loader that refuses duplicate keys, anchors and aliases, with
one-line errors that name the file and the line."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from cohort.config.errors import CohortError, quoted


class PlainDumper(yaml.SafeDumper):
    """``yaml.SafeDumper`` that writes a value used twice out twice, never as an anchor and alias."""

    def ignore_aliases(self, data):
        return True


class AliasRefused(yaml.MarkedYAMLError):
    """An anchor or alias in a strictly read file: refused before anything is expanded."""


class NoAliasLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses any anchor or alias as it meets it, before anything is
    expanded (nested aliases grow exponentially: "billion laughs")."""

    def compose_node(self, parent, index):
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            raise AliasRefused(None, None, "YAML anchors and aliases (&name / *name) are not allowed: "
                               "write the value out", event.start_mark)
        return super().compose_node(parent, index)

    def construct_yaml_int(self, node):
        try:
            return super().construct_yaml_int(node)
        except ValueError:  # Python refuses to read an integer of more than 4300 digits
            raise yaml.constructor.ConstructorError(
                None, None, f"the number {quoted(node.value)} is too long", node.start_mark) from None


NoAliasLoader.add_constructor("tag:yaml.org,2002:int", NoAliasLoader.construct_yaml_int)


class UniqueKeyLoader(NoAliasLoader):
    """The strict loader of files: no anchors or aliases, and no key given twice in one mapping
    (plain YAML keeps the last)."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {quoted(key)} (first on line {seen[key] + 1})", key_node.start_mark
                )
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: str | Path) -> Any:
    """Parse a YAML file safely, with one-line errors that name the file and the line."""
    path = Path(path)
    if not path.exists():
        raise CohortError("no such file", str(path))
    if path.is_dir():
        raise CohortError("is a directory, not a YAML file", str(path))
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise CohortError(f"cannot read: {error}", str(path)) from None
    return read_yaml_text(text, path.name)


def read_yaml_text(text: str, where: str) -> Any:
    """``read_yaml`` for text already read; ``where`` names it in errors."""
    if not text.strip():
        raise CohortError("the file is empty", where)
    try:
        return yaml.load(text, Loader=UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as error:
        raise CohortError(yaml_problem(error), where) from None


def yaml_problem(error: yaml.YAMLError) -> str:
    """A YAML error as ``line N: problem``, one line."""
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    line = f"line {mark.line + 1}: " if mark is not None else ""
    return f"{line}{problem}" if isinstance(error, AliasRefused) else f"{line}YAML error: {problem}"


def dump_yaml(data: Any) -> str:
    """Plain data as YAML without anchors, so ``read_yaml`` reads it back."""
    return yaml.dump(data, Dumper=PlainDumper, sort_keys=False)
