"""The layout rules of issue 18, read from the code itself (ast, no third-party tool): no import cycles in models/
or service/, no API adapter that reaches another adapter, no module over 500 lines.

Imports count wherever they are written (module top or inside a function): an import deferred to dodge a cycle is
still a cycle in the design. Planting a cycle or an adapter-to-adapter import makes these tests fail (see the
``planted`` tests, which run the same checks on a small tree written for the purpose).
"""

from __future__ import annotations

import ast
from collections.abc import Iterable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("models", "service")
GENERATED = ("service/grpc/gen",)
# The API adapters: each translates one wire format to data-plane calls (service/dataplane/) and back. Composition
# roots (gateway/app.py, grpc/server.py, runner.py, cli.py) put them together and may import them; they may not
# import each other, directly or through anything else.
ADAPTERS = (
    "service.gateway.rest",
    "service.gateway.kserve",
    "service.gateway.dicomweb",
    "service.grpc.segmentation",
    "service.grpc.inference",
)
MAX_LINES = 500


def modules(root: Path, packages: Iterable[str] = PACKAGES) -> dict[str, Path]:
    """Dotted module name -> file, for every .py under the packages (generated code left out)."""
    found = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            relative = path.relative_to(root).as_posix()
            if any(relative.startswith(g) for g in GENERATED):
                continue
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def _imported(node: ast.AST, module: str, is_package: bool) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if isinstance(node, ast.ImportFrom):
        if node.level:
            base = module.split(".") if is_package else module.split(".")[:-1]
            base = base[: len(base) - (node.level - 1)]
            prefix = ".".join(base + ([node.module] if node.module else []))
        else:
            prefix = node.module or ""
        return [prefix, *(f"{prefix}.{alias.name}" for alias in node.names)]
    return []


def import_graph(root: Path, packages: Iterable[str] = PACKAGES) -> dict[str, set[str]]:
    """module -> the project modules it imports (``from a import b`` counts a.b when b is a module, else a)."""
    known = modules(root, packages)
    graph: dict[str, set[str]] = {}
    for name, path in known.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        edges = set()
        for node in ast.walk(tree):
            candidates = _imported(node, name, path.name == "__init__.py")
            if isinstance(node, ast.ImportFrom):
                prefix, *members = candidates
                hits = [m for m in members if m in known]
                edges.update(hits if hits else ([prefix] if prefix in known else []))
            else:
                edges.update(c for c in candidates if c in known)
        edges.discard(name)
        graph[name] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for start in graph:
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen: set[str] = set()
    todo = list(graph.get(start, ()))
    while todo:
        node = todo.pop()
        if node not in seen:
            seen.add(node)
            todo.extend(graph.get(node, ()))
    return seen


def adapter_crossings(graph: dict[str, set[str]], adapters: Iterable[str] = ADAPTERS) -> list[tuple[str, str]]:
    adapters = tuple(adapters)
    return [(a, b) for a in adapters for b in adapters if a != b and b in reachable(graph, a)]


def test_no_import_cycles_in_models_or_service() -> None:
    assert cycles(import_graph(ROOT)) == []


def test_no_adapter_reaches_another_adapter() -> None:
    graph = import_graph(ROOT)
    assert all(adapter in graph for adapter in ADAPTERS), "an adapter named here no longer exists: update ADAPTERS"
    assert adapter_crossings(graph) == []


def test_no_module_over_500_lines() -> None:
    long = {name: n for name, path in modules(ROOT).items() if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert long == {}


def _tree(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


@pytest.mark.parametrize(
    "files",
    [
        {  # a plain cycle, one side deferred inside a function
            "service/__init__.py": "",
            "service/a.py": "from service.b import thing\n",
            "service/b.py": "def thing():\n    from service import a\n",
        },
        {  # through a package's re-exports: a submodule importing its own package's __init__
            "service/__init__.py": "",
            "service/queue/__init__.py": "from .jobs import Job\n",
            "service/queue/jobs.py": "from service.queue import keys\nclass Job: ...\n",
            "service/queue/keys.py": "from service.queue import Job\n",
        },
    ],
)
def test_a_planted_cycle_is_found(tmp_path: Path, files: dict[str, str]) -> None:
    assert cycles(import_graph(_tree(tmp_path, files), ("service",)))


def test_a_planted_adapter_crossing_is_found(tmp_path: Path) -> None:
    root = _tree(
        tmp_path,
        {
            "service/__init__.py": "",
            "service/shared.py": "from service.b import X\n",  # a helper that drags adapter b into adapter a
            "service/a.py": "import service.shared\n",
            "service/b.py": "X = 1\n",
        },
    )
    graph = import_graph(root, ("service",))
    assert cycles(graph) == []
    assert adapter_crossings(graph, ("service.a", "service.b")) == [("service.a", "service.b")]
