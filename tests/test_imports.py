"""The library's import graph: no cycles (the adapter registry's register-on-import excepted), no research code.

The graph is read from the source with `ast`, not by importing: every `import` and `from ... import` statement
anywhere in a module (top level or inside a function; `if TYPE_CHECKING:` blocks skipped) is an edge.
"""
from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "sharedllm"
REGISTRY = "sharedllm.adapters"
# commands/bet.py and commands/bets.py still load experiments/bets (being moved into sharedllm.bets on another
# branch); once that lands this set is empty. No other module may join it.
PENDING_EXPERIMENTS_IMPORTERS: set = set()  # none left: the bets runtime is in sharedllm.bets


def module_files(src: Path = SRC) -> dict[str, Path]:
    """Dotted module name -> file, for every .py under src/sharedllm (packages by their __init__)."""
    out = {}
    for path in sorted((src / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(src).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _import_nodes(tree: ast.AST):
    """Every Import / ImportFrom node, at any depth, outside `if TYPE_CHECKING:` blocks."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        children = node.orelse if isinstance(node, ast.If) and _is_type_checking(node) else ast.iter_child_nodes(node)
        stack.extend(children)


def _absolute(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    here = module.split(".") if is_package else module.split(".")[:-1]
    anchor = here[: len(here) - (node.level - 1)]
    return ".".join(anchor + ([node.module] if node.module else []))


def imported_names(module: str, path: Path) -> set[str]:
    """The absolute dotted names a module imports (a `from X import y` gives X.y and X; the caller keeps real
    modules)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    out = set()
    for node in _import_nodes(tree):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        else:
            target = _absolute(module, path.name == "__init__.py", node)
            out.add(target)
            out.update(f"{target}.{alias.name}" for alias in node.names)
    return out


def import_graph(src: Path = SRC) -> dict[str, set[str]]:
    """module -> the modules of the package it imports (a submodule when the name is one, else its package)."""
    files = module_files(src)
    graph = {}
    for module, path in files.items():
        graph[module] = {name for name in imported_names(module, path) if name in files and name != module}
    return graph


def registry_edge(a: str, b: str) -> bool:
    """A method module importing the registry to register itself (`from . import register`)."""
    return b == REGISTRY and a.startswith(REGISTRY + ".")


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), registry edges left out."""
    index, low, on_stack, stack, found = {}, {}, set(), [], []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if registry_edge(v, w):
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_graph_sees_relative_absolute_and_function_level_imports():
    g = import_graph()
    assert "sharedllm.errors" in g["sharedllm.wire"]            # from .errors import ...
    assert "sharedllm.adapters" in g["sharedllm.wire"]          # inside check_adapter_meta
    assert "sharedllm.wire" in g["sharedllm.quant.adapter_int8"]  # from ..wire import ...
    assert "sharedllm.adapters" in g["sharedllm.adapters.norm"]  # the registry edge, seen and then excused


def test_the_file_format_imports_no_quantiser():
    """wire.py is the file-format room: int8 segments and decoding live there, the quantisers import them."""
    assert not {m for m in import_graph()["sharedllm.wire"] if m.startswith("sharedllm.quant")}


def test_no_import_cycle_in_src_except_the_adapter_registry():
    found = cycles(import_graph())
    assert not found, "import cycles in src/sharedllm: " + "; ".join(" <-> ".join(c) for c in found)


def test_a_cycle_is_caught(tmp_path):
    pkg = tmp_path / PACKAGE
    (pkg / "quant").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "quant" / "__init__.py").write_text("")
    (pkg / "base.py").write_text("def f():\n    from .quant.ternary import g\n")
    (pkg / "quant" / "ternary.py").write_text("from ..base import f\n")
    assert cycles(import_graph(tmp_path)) == [["sharedllm.base", "sharedllm.quant.ternary"]]


def test_no_module_in_src_imports_research_code():
    importers = {m for m, path in module_files().items()
                 if any(n == "experiments" or n.startswith("experiments.") for n in imported_names(m, path))}
    assert importers <= PENDING_EXPERIMENTS_IMPORTERS, f"src modules importing experiments: {sorted(importers)}"
