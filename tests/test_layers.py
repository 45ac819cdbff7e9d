"""The one-way layout: data flows corpus -> engine -> pipeline -> store -> api -> pages.

Each module under app/ may import only the layers before it. This test reads every import
statement (module level, inside functions and under TYPE_CHECKING alike) and fails on an upward
one, on torch outside the engine and the pipeline, on the engine reading global settings, and on
any import cycle between app modules.

The layers, lowest first:

- base: ``app.errors``, ``app.resources``, ``app.records`` (the pipeline/store contract),
  ``app.settings``: importable by every layer (except that the engine takes its settings as
  arguments and never imports ``app.settings``).
- ``app.engine``: everything that touches weights (torch lives here and in the pipeline).
- ``app.pipeline``: the offline jobs; may use the engine and write through the store.
- ``app.store``: the database; plain Python, no engine, no pipeline.
- ``app.api``: the JSON API over the store; holds the engine only through a Protocol.
- ``app.web``: the HTML pages, built on the API's dependencies and the store.
- composition roots ``app.main``, ``app.cli`` (with ``app.cli_explain``), ``app.serving``,
  ``app.server_scoring`` (the server's label scorer): wire everything; nothing imports them.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

APP_DIR = Path(__file__).resolve().parent.parent / "app"

BASE = {"app.errors", "app.resources", "app.records", "app.settings"}
ROOTS = {"app.main", "app.cli", "app.cli_explain", "app.serving", "app.server_scoring"}
# What each layer may import from the app (besides itself and the base modules).
ALLOWED = {
    "engine": set(),
    "pipeline": {"engine", "store"},
    "store": set(),
    "api": {"store"},
    "web": {"store", "api"},
    "base": set(),
}
TORCH_LAYERS = {"engine", "pipeline"}
HEAVY = ("torch", "transformers", "safetensors", "accelerate", "gguf")


def _module_name(path: Path) -> str:
    rel = path.relative_to(APP_DIR.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _layer(module: str) -> str:
    if module in BASE:
        return "base"
    if module in ROOTS or module == "app":
        return "root"
    return module.split(".")[1]


def _imports(path: Path, module: str) -> list[tuple[int, str]]:
    """(line, imported module) for every import in the file, relative ones resolved."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base]) if base else ".".join(anchor)
            # `from app.store import queries` imports the submodule app.store.queries.
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                if (APP_DIR.parent / Path(*candidate.split("."))).with_suffix(".py").exists() or (
                    APP_DIR.parent / Path(*candidate.split(".")) / "__init__.py"
                ).exists():
                    found.append((node.lineno, candidate))
                else:
                    found.append((node.lineno, base))
    return found


def _all_modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(APP_DIR.rglob("*.py"))}


MODULES = _all_modules()


def _owner(name: str) -> str | None:
    """The app module an imported name refers to (a package's __init__ for `app.store`)."""
    while name:
        if name in MODULES:
            return name
        name = name.rpartition(".")[0]
    return None


def _violations(module: str, path: Path) -> list[str]:
    layer = _layer(module)
    out = []
    for line, name in _imports(path, module):
        where = f"{module} (line {line}) imports {name}"
        top = name.split(".")[0]
        if top in HEAVY and layer not in TORCH_LAYERS:
            out.append(f"{where}: {top} is imported only in app/engine and app/pipeline")
            continue
        if top != "app" or layer == "root":
            continue
        target = _owner(name)
        if target is None:
            continue
        target_layer = _layer(target)
        if target_layer == "root":
            out.append(f"{where}: nothing imports the composition roots {sorted(ROOTS)}")
        elif layer == "engine" and target == "app.settings":
            out.append(f"{where}: the engine reads no global settings; pass them in")
        elif target_layer in (layer, "base"):
            continue
        elif target_layer not in ALLOWED[layer]:
            out.append(f"{where}: {layer} may import only "
                       f"{sorted(ALLOWED[layer] | {'base'})} (upward import)")
    return out


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_flow_one_way(module: str) -> None:
    problems = _violations(module, MODULES[module])
    assert not problems, "\n".join(problems)


def test_no_import_cycles_between_app_modules() -> None:
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for module, path in MODULES.items():
        for _, name in _imports(path, module):
            target = _owner(name) if name.split(".")[0] == "app" else None
            # A package's own __init__ does not count as a dependency of its submodules.
            if target and target != module and not module.startswith(f"{target}."):
                graph[module].add(target)
    cycles = _strongly_connected(graph)
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(sorted(c)) for c in cycles)


def _strongly_connected(graph: dict[str, set[str]]) -> list[set[str]]:
    """Tarjan's algorithm, iterative; returns the components with more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[set[str]] = []
    counter = 0
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.add(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(component)
    return found


def test_the_rule_catches_upward_imports_and_torch(tmp_path: Path) -> None:
    """The checker itself, on planted files: each bad import is reported, a good one is not."""
    bad_engine = tmp_path / "lm.py"
    bad_engine.write_text("import torch\nfrom app.store import queries\n"
                          "def f():\n    from app.settings import get_settings\n")
    problems = _violations("app.engine.lm", bad_engine)
    assert any("app.store.queries" in p and "upward" in p for p in problems)
    assert any("global settings" in p for p in problems)
    assert not any("torch" in p for p in problems)
    bad_store = tmp_path / "queries.py"
    bad_store.write_text("import torch\nfrom app.records import WINDOW_KIND_TOP\n")
    problems = _violations("app.store.queries", bad_store)
    assert len(problems) == 1 and "torch" in problems[0]
