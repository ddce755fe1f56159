"""`inspect`: which rule each unit of the graph gets, and what is unsupported, without converting."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from .errors import LRPError
from .graph import GraphView
from .pipeline import analyze, default_sources, load_model
from .shapes import infer_shapes
from .rules import RULE_SETS
from .unfuse import unfuse_contrib_ops


@dataclass
class Report:
    rules: str
    output: str
    sources: list
    rows: list = field(default_factory=list)       # (unit, op/pattern, categories, rule) on the path
    off_path: int = 0                              # nodes that need no backward
    problems: list = field(default_factory=list)   # unsupported units on the path

    @property
    def supported(self) -> bool:
        return not self.problems

    def format(self) -> str:
        lines = [f"rules: {self.rules}   explained output: {self.output}   sources: {', '.join(self.sources)}",
                 f"{'rule':<13} {'category':<16} unit"]
        for desc, cats, rule in self.rows:
            lines.append(f"{rule or 'none':<13} {cats[0] if cats else '-':<16} {desc}")
        counts = Counter(rule or "none" for _, _, rule in self.rows)
        lines.append(f"{len(self.rows)} units on the relevance path ("
                     + ", ".join(f"{n} {r}" for r, n in sorted(counts.items()))
                     + f"); {self.off_path} nodes off the path need no rule")
        if self.problems:
            lines.append(f"UNSUPPORTED ({len(self.problems)}):")
            lines.extend(f"  {p}" for p in self.problems)
        else:
            lines.append("coverage: every unit on the relevance path has a rule")
        return "\n".join(lines)


def inspect_model(model, *, rules="attnlrp", source=None, output=None, overrides=None) -> Report:
    if isinstance(rules, str) and rules not in RULE_SETS:
        raise LRPError(f"unknown rule set '{rules}'; choose one of: {', '.join(RULE_SETS)}")
    model, _ = load_model(model)
    unfuse_contrib_ops(model)
    view = GraphView.build(model, infer_shapes(model))
    output = output or view.graph_outputs[0]
    if output not in view.graph_outputs:
        raise LRPError(f"--output '{output}' is not a graph output; outputs are: {', '.join(view.graph_outputs)}")
    sources = [source] if isinstance(source, str) else list(source or [])
    for s in sources:
        if s not in view.producer and s not in view.graph_inputs:
            raise LRPError(f"tensor '{s}' is not in the graph")
    sources = sources or default_sources(view, output)
    plan = analyze(view, rules, output, sources, overrides)
    report = Report(plan.rules, output, sources, problems=list(plan.problems))
    on_path_nodes = set()
    for u in plan.path_units:
        report.rows.append((u.describe(view), u.categories, u.rule))
        on_path_nodes.update(u.nodes)
    for u in plan.blocked_units:
        report.rows.append((u.describe(view), u.categories, u.rule))
        on_path_nodes.update(u.nodes)
    report.off_path = len(view.nodes) - len(on_path_nodes)
    if report.supported:  # attribute combinations a rule refuses show only when it emits its backward
        report.problems.extend(_backward_problems(view, plan, output, sources))
    return report


def _backward_problems(view: GraphView, plan, output: str, sources: list) -> list[str]:
    """Emit the backward (in memory, thrown away) and return what its rules refused."""
    from .builder import Builder
    from .errors import UnsupportedOpsError
    from .pipeline import emit_backward
    from .seed import build_seed

    b = Builder(view)
    try:
        seed = build_seed(b, output, seed_input=True)
        emit_backward(plan, b, seed.gradient, list(sources))
    except UnsupportedOpsError as exc:
        return list(exc.problems)
    return []
