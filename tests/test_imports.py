"""The package's import graph: no cycles (module-level or lazy imports inside functions alike), nothing
imports the CLI, nothing imports the source checkout's tools/ or tests/, and no PyTorch."""
from __future__ import annotations

import ast
import importlib
import pkgutil
from pathlib import Path

import lrp_onnx

PACKAGE_DIR = Path(lrp_onnx.__file__).parent


def _imports(path: Path, module: str) -> set[str]:
    """Every module name `module` imports, anywhere in the file (absolute names)."""
    out = set()
    package = module.rsplit(".", 1)[0] if not path.name == "__init__.py" else module
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module
            out.add(name)
            for alias in node.names:  # `from . import x` imports the submodule x
                out.add(f"{name}.{alias.name}")
    return out


def import_graph() -> dict[str, set[str]]:
    modules = {f"lrp_onnx.{info.name}" for info in pkgutil.iter_modules([str(PACKAGE_DIR)])}
    graph = {}
    for module in sorted(modules | {"lrp_onnx"}):
        path = PACKAGE_DIR / ("__init__.py" if module == "lrp_onnx" else module.split(".", 1)[1] + ".py")
        graph[module] = _imports(path, module)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle among the package's modules (the package __init__ excluded: importing any submodule
    runs it first by design), or None."""
    inside = {m: {d for d in deps if d in graph and d != "lrp_onnx"} for m, deps in graph.items() if m != "lrp_onnx"}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for d in sorted(inside[m]):
            if state.get(d) == 1:
                return stack[stack.index(d):] + [d]
            if d not in state:
                found = visit(d)
                if found:
                    return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(inside):
        if m not in state:
            found = visit(m)
            if found:
                return found
    return None


def test_find_cycle_sees_a_cycle():
    assert find_cycle({"lrp_onnx.a": {"lrp_onnx.b"}, "lrp_onnx.b": {"lrp_onnx.a"}}) == \
        ["lrp_onnx.a", "lrp_onnx.b", "lrp_onnx.a"]
    assert find_cycle({"lrp_onnx.a": {"lrp_onnx.b"}, "lrp_onnx.b": set()}) is None


def test_no_import_cycles():
    graph = import_graph()
    assert len(graph) > 20
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_nothing_imports_cli_tools_tests_or_torch():
    bad = {}
    for module, deps in import_graph().items():
        hits = sorted(d for d in deps if d == "lrp_onnx.cli" and module not in ("lrp_onnx.cli", "lrp_onnx.__main__")
                      or d.split(".")[0] in ("tools", "tests", "torch", "models"))
        if hits:
            bad[module] = hits
    assert bad == {}


def test_every_module_imports_alone():
    for info in pkgutil.iter_modules([str(PACKAGE_DIR)]):
        if info.name == "__main__":  # runs the CLI
            continue
        importlib.import_module(f"lrp_onnx.{info.name}")
