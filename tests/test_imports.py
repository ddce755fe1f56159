"""The package's import graph (subpackages included): no cycles (module-level or lazy imports inside functions
alike), no import from a later pipeline stage (FLOORS), nothing imports the CLI, nothing imports the source
checkout's tools/ or tests/, and no PyTorch."""
from __future__ import annotations

import ast
import importlib
import pkgutil
from pathlib import Path

import lrp_onnx

PACKAGE_DIR = Path(lrp_onnx.__file__).parent

# The stages, low to high: a module may import (at module level or lazily) only from its own floor or lower
# ones. A subpackage's entry covers its modules; every module of the package needs a floor here.
FLOORS = {
    "lrp_onnx.errors": 0, "lrp_onnx.contract": 0, "lrp_onnx._version": 0,
    "lrp_onnx.ir": 1,        # graph view, node writer, shape/rank inference, validation, files
    "lrp_onnx.passes": 2,    # rewrites before/after the analysis
    "lrp_onnx.vjp": 3,       # one registered VJP per op
    "lrp_onnx.lrp": 4,       # what AttnLRP decides
    "lrp_onnx.pipeline": 5,
    "lrp_onnx.run": 6,       # running a converted model
    "lrp_onnx.check": 7,     # evaluate, audit, inspect
    "lrp_onnx.cli": 8, "lrp_onnx.__main__": 8, "lrp_onnx": 8,
}


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
    out.discard(module)  # a package's `from . import x` names the package itself
    return out


def package_modules() -> dict[str, Path]:
    """Every module of the package, subpackages and their modules included -> its file."""
    found = {"lrp_onnx": PACKAGE_DIR / "__init__.py"}
    for info in pkgutil.walk_packages([str(PACKAGE_DIR)], prefix="lrp_onnx."):
        base = Path(info.module_finder.path) / info.name.rsplit(".", 1)[1]
        found[info.name] = base / "__init__.py" if info.ispkg else base.with_suffix(".py")
    return found


def import_graph() -> dict[str, set[str]]:
    return {module: _imports(path, module) for module, path in sorted(package_modules().items())}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle among the package's modules, or None. The package __init__ is left out (importing any
    submodule runs it first by design), and so is a module's import of its own enclosing package (the
    `from . import x` of a subpackage's module): that package is being imported already. A subpackage's
    __init__ counts with its explicit imports."""
    inside = {m: {d for d in deps if d in graph and d != "lrp_onnx" and not m.startswith(d + ".")}
              for m, deps in graph.items() if m != "lrp_onnx"}
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


def floor(module: str) -> int | None:
    """The floor of a package module: its own entry in FLOORS, or its enclosing subpackage's (the package's
    own name counts only for its __init__), or None."""
    if module in FLOORS:
        return FLOORS[module]
    parts = module.split(".")
    for k in range(len(parts) - 1, 1, -1):
        if ".".join(parts[:k]) in FLOORS:
            return FLOORS[".".join(parts[:k])]
    return None


def layering_violations(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    """(module, imported module) for every import of a module of a higher floor than the importer's."""
    return sorted((m, d) for m, deps in graph.items() for d in deps
                  if d in graph and floor(m) is not None and floor(d) is not None and floor(d) > floor(m))


def test_find_cycle_sees_a_cycle():
    assert find_cycle({"lrp_onnx.a": {"lrp_onnx.b"}, "lrp_onnx.b": {"lrp_onnx.a"}}) == \
        ["lrp_onnx.a", "lrp_onnx.b", "lrp_onnx.a"]
    assert find_cycle({"lrp_onnx.a": {"lrp_onnx.b"}, "lrp_onnx.b": set()}) is None
    # a subpackage's module importing its own package (`from . import x`) is no cycle; its siblings are
    assert find_cycle({"lrp_onnx.p": {"lrp_onnx.p.a"}, "lrp_onnx.p.a": {"lrp_onnx.p", "lrp_onnx.p.b"},
                       "lrp_onnx.p.b": set()}) is None
    assert find_cycle({"lrp_onnx.p.a": {"lrp_onnx.p.b"}, "lrp_onnx.p.b": {"lrp_onnx.p.a"}}) == \
        ["lrp_onnx.p.a", "lrp_onnx.p.b", "lrp_onnx.p.a"]


def test_no_import_cycles():
    graph = import_graph()
    assert len(graph) > 20
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_layering_check_sees_a_violation():
    graph = {"lrp_onnx.ir.graph": {"lrp_onnx.errors"}, "lrp_onnx.errors": set(),
             "lrp_onnx.ir.shapes": {"lrp_onnx.ir.graph", "lrp_onnx.passes.control"},  # up: ir (1) -> passes (2)
             "lrp_onnx.passes.control": {"lrp_onnx.ir.graph"},
             "lrp_onnx.run.runner": {"lrp_onnx.lrp.seed", "lrp_onnx.run.session", "lrp_onnx.check.report"},
             "lrp_onnx.run.session": set(), "lrp_onnx.lrp.seed": {"lrp_onnx.contract"}, "lrp_onnx.contract": set(),
             "lrp_onnx.check.report": {"lrp_onnx.pipeline"}, "lrp_onnx.pipeline": {"lrp_onnx"}, "lrp_onnx": set()}
    assert layering_violations(graph) == [("lrp_onnx.ir.shapes", "lrp_onnx.passes.control"),
                                          ("lrp_onnx.pipeline", "lrp_onnx"),
                                          ("lrp_onnx.run.runner", "lrp_onnx.check.report")]
    assert floor("lrp_onnx.vjp.contrib") == 3 and floor("lrp_onnx.vjp") == 3 and floor("lrp_onnx.new_module") is None


def test_imports_follow_the_stages():
    graph = import_graph()
    assert sorted(m for m in graph if floor(m) is None) == [], "give every module a floor in FLOORS"
    assert layering_violations(graph) == []


def test_nothing_imports_cli_tools_tests_or_torch():
    bad = {}
    for module, deps in import_graph().items():
        hits = sorted(d for d in deps if d == "lrp_onnx.cli" and module not in ("lrp_onnx.cli", "lrp_onnx.__main__")
                      or d.split(".")[0] in ("tools", "tests", "torch", "models"))
        if hits:
            bad[module] = hits
    assert bad == {}


def test_every_module_imports_alone():
    for module in package_modules():
        if module == "lrp_onnx.__main__":  # runs the CLI
            continue
        importlib.import_module(module)
