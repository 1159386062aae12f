"""The layout shows the three programs (DESIGN.md section 6): the client (_client) and the worker (_worker)
never import each other, both import what they share (_wire), which imports nothing of theirs, and no
module imports itself back through others, TYPE_CHECKING imports included. Read from the source."""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import ROOT

PACKAGE = ROOT / "zmqexecutor"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports() -> dict[str, set[str]]:
    """Each module of the package and the modules of the package it imports (at any depth of its code)."""
    modules = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
                for alias in node.names:
                    candidate = f"{target}.{alias.name}"
                    found.add(candidate if candidate in modules else target)
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("zmqexecutor"):
                found.add(node.module)
        graph[name] = {m for m in found if m in modules and m != name}
    return graph


def program(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or module.endswith(("_client", "_worker", "_wire", "_tools")) else "top"


def test_client_and_worker_never_import_each_other_and_the_wire_imports_neither() -> None:
    graph = imports()
    crossings = [(a, b) for a, deps in graph.items() for b in deps
                 if (program(a), program(b)) in {("_client", "_worker"), ("_worker", "_client"),
                                                 ("_wire", "_client"), ("_wire", "_worker"), ("_wire", "_tools"),
                                                 ("_client", "_tools"), ("_worker", "_tools")}]
    assert crossings == []
    assert {program(m) for m in graph} == {"top", "_client", "_worker", "_wire", "_tools"}


def test_no_module_imports_itself_back() -> None:
    graph = imports()
    circles = []
    for start in graph:
        seen, stack = set(), [(start, [start])]
        while stack:
            node, path = stack.pop()
            for nxt in graph[node]:
                if nxt == start:
                    circles.append(path + [start])
                elif nxt not in seen and not nxt.endswith("zmqexecutor"):
                    seen.add(nxt)
                    stack.append((nxt, path + [nxt]))
    assert circles == []


def test_no_function_runs_over_80_lines_of_code() -> None:
    long = []
    for path in PACKAGE.rglob("*.py"):
        source = path.read_text()
        lines = source.splitlines()
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                docstring = ast.get_docstring(node)
                code = [line for line in lines[node.lineno - 1:node.end_lineno]
                        if line.strip() and not line.strip().startswith("#")]
                count = len(code) - (len(docstring.splitlines()) if docstring else 0)
                if count > 80:
                    long.append(f"{module_name(path)}.{node.name}: {count}")
    assert long == []
