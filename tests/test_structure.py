"""The layers hold: inmap/ never imports Prefect (but the command line's face, cli.py), imports
form no circle, and functions take few parameters."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import REPO_ROOT

PACKAGES = ("inmap", "flows", "tasks", "deployments")
# The flow's parameters are its users' interface (Prefect shows and validates them one by one);
# everything inside takes a Job.
# The preflight takes its checks as keyword-only switches, each defaulting to "not asked".
MANY_PARAMETERS_ALLOWED = {"inmap/cluster.py:preflight"}
MAX_PARAMETERS = 6


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((REPO_ROOT / package).rglob("*.py")):
            name = ".".join(path.relative_to(REPO_ROOT).with_suffix("").parts)
            found[name.removesuffix(".__init__")] = path
    return found


def imports_of(path: Path, package_names: set[str]) -> set[str]:
    """The project modules `path` imports, anywhere in the file."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        found |= {name for name in names if name in package_names}
    return found


def test_inmap_never_imports_prefect_but_its_command_line():
    for name, path in modules().items():
        if not name.startswith("inmap") or name == "inmap.cli":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                imported = node.module if isinstance(node, ast.ImportFrom) else node.names[0].name
                assert not (imported or "").startswith(("prefect", "flows", "tasks")), name


def test_imports_form_no_circle():
    graph = {name: imports_of(path, set(modules())) - {name} for name, path in modules().items()}
    visiting, done, cycles = set(), set(), []

    def visit(name: str, trail: list[str]) -> None:
        if name in done:
            return
        if name in visiting:
            cycles.append(trail[trail.index(name) :] + [name])
            return
        visiting.add(name)
        for imported in sorted(graph.get(name, ())):
            visit(imported, [*trail, name])
        visiting.discard(name)
        done.add(name)

    for name in graph:
        visit(name, [])
    assert cycles == []


def test_functions_take_few_parameters():
    crowded = []
    for path in modules().values():
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            arguments = node.args
            count = len(arguments.posonlyargs + arguments.args + arguments.kwonlyargs)
            count -= bool(arguments.args and arguments.args[0].arg in ("self", "cls"))
            where = f"{path.relative_to(REPO_ROOT)}:{node.name}"
            if count > MAX_PARAMETERS and where not in MANY_PARAMETERS_ALLOWED:
                crowded.append(f"{where} ({count})")
    assert crowded == []
