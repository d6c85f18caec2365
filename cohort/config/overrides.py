"""The ``--set`` engine: ``key=value`` assignments to dotted paths of a configuration tree."""
from __future__ import annotations

from typing import Any

import yaml

from cohort.config.errors import CohortError, did_you_mean, named, quoted
from cohort.config.loader import AliasRefused, NoAliasLoader, yaml_problem


def parse_assignment(text: str) -> tuple[str, Any]:
    """``"edges.0.temperature=2"`` → ``("edges.0.temperature", 2.0)``; the value is read as YAML."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise CohortError(f"--set {quoted(text)}: expected key=value, for example edges.0.temperature=2")
    try:
        parsed = yaml.load(value, Loader=NoAliasLoader) if value.strip() else None  # noqa: S506
    except AliasRefused as error:
        raise CohortError(f"--set {named(key.strip())}: {yaml_problem(error)}") from None
    except yaml.YAMLError:
        parsed = value
    return key.strip(), parsed


def set_dotted(tree: dict[str, Any], key: str, value: Any, where: str = "topology") -> None:
    """Set ``tree[a][b][0][c] = value`` for ``key = "a.b.0.c"``; every step must already exist."""
    node: Any = tree
    parts = key.split(".")
    for depth, part in enumerate(parts):
        last = depth == len(parts) - 1
        so_far = ".".join(parts[: depth + 1])
        if isinstance(node, dict):
            if part not in node:
                hint = did_you_mean(part, [str(k) for k in node])
                raise CohortError(f"--set {named(key)}: unknown key {quoted(so_far)}{hint}", where)
            if last:
                node[part] = value
            else:
                node = node[part]
        elif isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise CohortError(f"--set {named(key)}: {quoted(so_far)} is not an index below {len(node)}", where)
            if last:
                node[int(part)] = value
            else:
                node = node[int(part)]
        else:
            raise CohortError(f"--set {named(key)}: {quoted('.'.join(parts[:depth]))} is a value, not a section", where)
