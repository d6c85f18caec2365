"""The house plan as rules (docs/ray.md, Code layout): the folder listing shows the architecture, the
layers import only downwards, no import cycle anywhere, no private name crosses a module, and no two
modules are named alike. Read from the source with ast: nothing is imported."""
from __future__ import annotations

import ast
import itertools
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COMMANDS = {"run", "tune", "study", "compare", "evaluate", "export"}
PACKAGES = {"comparison", "config", "console", "datasets", "driver", "evaluation", "gates", "losses", "metrics",
            "models", "studies", "topology", "tracking", "tuning", "worker"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules(*roots: str) -> dict[str, Path]:
    return {module_name(path): path for root in roots for path in sorted((REPO / root).rglob("*.py"))}


def imports(name: str, path: Path, known: dict[str, Path], top_level_only: bool = False) -> set[str]:
    """The project's modules that ``name`` imports (anywhere in it, or at its top level only)."""
    tree = ast.parse(path.read_text())
    found = set()
    for node in (tree.body if top_level_only else ast.walk(tree)):
        targets = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = name if path.name == "__init__.py" else name.rpartition(".")[0]
                for _ in range(node.level - 1):
                    package = package.rpartition(".")[0]
                base = f"{package}.{base}" if base else package
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def graph(*roots: str) -> dict[str, set[str]]:
    known = modules(*roots)
    return {name: imports(name, path, known) for name, path in known.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in edges.get(node, ()):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                other = stack.pop()
                on_stack.discard(other)
                component.append(other)
                if other == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def package_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_the_listing_shows_the_commands_the_api_and_the_concept_packages_only():
    entries = {path.name for path in (REPO / "cohort").iterdir() if path.name != "__pycache__"}
    assert entries == {"__init__.py"} | {f"{command}.py" for command in COMMANDS} | PACKAGES
    for package in PACKAGES:
        init = REPO / "cohort" / package / "__init__.py"
        assert init.is_file() and ast.get_docstring(ast.parse(init.read_text())), f"cohort/{package} says what it is"


def test_the_layers_import_downwards_only():
    edges = graph("cohort")
    commands = {f"cohort.{command}" for command in COMMANDS}
    wrong = []
    for module, targets in edges.items():
        for target in targets:
            if target in commands:
                wrong.append(f"{module} imports the command {target}")  # no library nor command imports a command
            if package_of(module) == "worker" and package_of(target) in ("console", "tracking"):
                wrong.append(f"{module} (inside a Ray worker) imports {target}")
    assert not wrong, wrong


def test_no_import_cycle_anywhere_bench_included():
    assert cycles(graph("cohort", "bench")) == []
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]  # the check can fail


def test_no_private_name_crosses_a_module():
    crossing = []
    for name, path in modules("cohort", "bench").items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(("cohort", "bench")):
                crossing += [f"{name}: {node.module}.{alias.name}" for alias in node.names
                             if alias.name.startswith("_")]
    assert not crossing, crossing


def test_no_two_modules_are_named_alike():
    """Names say what a thing is: no two library modules or packages whose names differ only by a
    suffix (peer / peers, table / tables); the same name in several packages is one role (registry)."""
    names = {path.stem for path in (REPO / "cohort").rglob("*.py")
             if path.parent != REPO / "cohort" and path.stem != "__init__"} | PACKAGES
    alike = [(a, b) for a, b in itertools.combinations(sorted(names), 2) if b.startswith(a)]
    assert not alike, alike


def run_id_assignments(tree: ast.AST) -> list[int]:
    """Lines that set some object's ``run_id`` from outside it (``x.run_id = ...``, ``setattr(x, "run_id", ...)``);
    a class setting its own (``self.run_id``) is not one."""
    def targets(node: ast.AST) -> list[ast.AST]:
        if isinstance(node, ast.Assign):
            found = []
            for target in node.targets:
                found += target.elts if isinstance(target, (ast.Tuple, ast.List)) else [target]
            return found
        if isinstance(node, (ast.AugAssign, ast.AnnAssign)):
            return [node.target]
        return []

    lines = []
    for node in ast.walk(tree):
        for target in targets(node):
            if isinstance(target, ast.Attribute) and target.attr == "run_id" and not (
                    isinstance(target.value, ast.Name) and target.value.id == "self"):
                lines.append(node.lineno)
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "setattr"
                and len(node.args) > 1 and isinstance(node.args[1], ast.Constant) and node.args[1].value == "run_id"):
            lines.append(node.lineno)
    return lines


def test_a_tracker_is_one_run_never_a_cursor_moved_from_outside():
    """A parent or child run is its own tracker (``Tracker.for_run``): no code but the Tracker's own sets
    a tracker's ``run_id``."""
    moved = [f"{name}:{line}" for name, path in modules("cohort", "bench").items() if name != "cohort.tracking.tracker"
             for line in run_id_assignments(ast.parse(path.read_text()))]
    assert not moved, moved
    assert run_id_assignments(ast.parse("tracker.run_id = parent\na.b, t.run_id = 1, 2\nsetattr(t, 'run_id', 3)\n"
                                        "self.run_id = 4")) == [1, 2, 3]  # the check can fail


def test_importing_cohort_loads_nothing_heavy(fresh_interpreter):
    loaded = fresh_interpreter("import cohort").modules
    assert "cohort" in loaded and not loaded & {"torch", "ray", "mlflow", "pandas", "numpy"}


def test_the_snapshot_boards_process_loads_no_torch(fresh_interpreter):
    """A codistilling run's ``SnapshotBoard`` actor keeps versions and object references only: the
    process Ray starts for it imports its module, and nothing heavy with it."""
    loaded = fresh_interpreter("the snapshot board").modules
    assert "cohort.worker.board" in loaded and not loaded & {"torch", "ray", "mlflow", "pandas", "numpy"}
