"""`inspect`: which rule each unit of the graph gets, and what is unsupported, without converting."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from ..pipeline import plan_conversion


@dataclass
class Report:
    rules: str
    output: str
    sources: list
    rows: list = field(default_factory=list)       # (unit, op/pattern, categories, rule) on the path
    off_path: int = 0                              # nodes that need no backward
    problems: list = field(default_factory=list)   # unsupported units on the path
    bound_inputs: dict = field(default_factory=dict)  # KV-cache inputs bound inside the graph (cache.py)

    @property
    def supported(self) -> bool:
        return not self.problems

    def format(self) -> str:
        lines = [f"rules: {self.rules}   explained output: {self.output}   sources: {', '.join(self.sources)}"]
        if self.bound_inputs:
            lines.append(f"KV cache: {len(self.bound_inputs)} inputs bound inside the graph (full sequences are "
                         f"explained): " + ", ".join(f"{n} = {v}" for n, v in self.bound_inputs.items()))
        lines.append(f"{'rule':<13} {'category':<16} unit")
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


def inspect_model(model, *, rules="attnlrp", source=None, output=None, overrides=None, latent=(),
                  seed_input=False, relevance_only=False, multi_target=False) -> Report:
    """What `convert` with the same arguments would do, without writing anything: the same checks
    (pipeline.plan_conversion), so the report is unsupported exactly when `convert` refuses, naming the
    same nodes; bad arguments and unusable graphs raise the same LRPError."""
    conv = plan_conversion(model, rules=rules, source=source, output=output, latent=latent,
                           seed_input=seed_input, overrides=overrides, relevance_only=relevance_only,
                           multi_target=multi_target)
    view, plan = conv.view, conv.plan
    report = Report(plan.rules, conv.output, conv.sources, problems=list(conv.problems),
                    bound_inputs=dict(conv.bound_inputs))
    on_path_nodes = set()
    for u in plan.path_units:
        report.rows.append((u.describe(view), u.categories, u.rule))
        on_path_nodes.update(u.nodes)
    for u in plan.blocked_units:
        report.rows.append((u.describe(view), u.categories, u.rule))
        on_path_nodes.update(u.nodes)
    report.off_path = len(view.nodes) - len(on_path_nodes)
    return report
