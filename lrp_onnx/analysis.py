"""Analysis: which tensors carry relevance, and what each unit on that path is.

A *unit* is one ONNX node or one fused region (see patterns.py). A tensor carries relevance when
it is a float tensor reachable from a relevance source and it reaches the explained output;
only units on that path get a backward. Units whose rule is "constant" block the path.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .control import has_subgraph, outer_references
from .graph import GraphView, attr
from .patterns import ACTIVATION_OPS, Region

PRODUCT_OPS = {"MatMul", "Mul", "Einsum", "Gemm", "FusedMatMul"}
NORM_OPS = {"LayerNormalization", "RMSNormalization", "SimplifiedLayerNormalization", "SkipLayerNormalization",
            "SkipSimplifiedLayerNormalization"}
ROUTING_OPS = {"Cast", "Dropout", "Identity", "Where", "Reshape", "Transpose", "Squeeze", "Unsqueeze",
               "Expand"}
# ops between an MoE router's softmax and the product with an expert's output: top-k selection,
# renormalisation by the sum of the selected weights, per-expert gathers of the tokens' weights
ROUTER_WEIGHT_OPS = ROUTING_OPS | {"TopK", "ReduceSum", "Div", "Gather", "GatherND", "GatherElements", "Flatten",
                                   "Slice", "Split", "Concat"}


@dataclass
class Unit:
    nodes: list                 # node indices, ascending; the last one produces the output
    inputs: list                # tensor names (for a node: its inputs, in order)
    outputs: list               # tensor names
    op_type: str                # the node's op type, or "Region:<pattern>"
    name: str                   # the node's name (for a region: its last node's name)
    region: Region | None = None
    categories: list = field(default_factory=list)
    rule: str = "gradient"
    n_relevant_inputs: int = 0  # after blocking: how many inputs carry relevance

    @property
    def position(self) -> int:
        return self.nodes[-1]

    def describe(self, view: GraphView) -> str:
        if self.region is not None:
            return f"{self.region.pattern} [{len(self.nodes)} nodes ending at '{self.name}']"
        n = view.nodes[self.nodes[0]]
        return f"'{n.name or '<unnamed>'}' ({n.domain or 'ai.onnx'}::{n.op_type})"


def make_units(view: GraphView, regions: list[Region]) -> list[Unit]:
    """One unit per region and per node outside every region, in topological order."""
    in_region = {}
    for r in regions:
        for i in r.nodes:
            in_region[i] = r
    units = []
    for i, node in enumerate(view.nodes):
        r = in_region.get(i)
        if r is None:  # a node with subgraphs also reads the enclosing-scope tensors its branches use
            inputs = list(node.input) + (outer_references(node) if has_subgraph(node) else [])
            units.append(Unit([i], inputs, list(node.output), node.op_type, node.name))
        elif i == r.nodes[-1]:
            units.append(Unit(r.nodes, [r.input], [r.output], f"Region:{r.pattern}", node.name, region=r))
    # a region's output might not be produced by its last node (norm_scale outputs d): keep order by the
    # node producing the output, which is always the region's last node since regions end at the output.
    return units


# inputs read only for their type (or shape): their values never reach the output
TYPE_ONLY_INPUTS = {("CastLike", 1)}


def relevance_path(view: GraphView, units: list[Unit], sources: list[str], target: str | list[str],
                   blocked: set[int] | None = None) -> set[str]:
    """Float tensors reachable from `sources` and reaching `target` (one tensor or several), skipping
    blocked units."""
    blocked = blocked or set()
    forward = set(sources)
    for k, u in enumerate(units):
        if k in blocked:
            continue
        if any(t in forward for i, t in enumerate(u.inputs) if t and (u.op_type, i) not in TYPE_ONLY_INPUTS):
            forward.update(o for o in u.outputs if o and view.may_carry_relevance(o))
    backward = {target} if isinstance(target, str) else set(target)
    for k in range(len(units) - 1, -1, -1):
        u = units[k]
        if k in blocked:
            continue
        if any(o in backward for o in u.outputs):
            backward.update(t for t in u.inputs if t in forward)
    return forward & backward


def on_path(unit: Unit, path: set[str]) -> bool:
    return any(o in path for o in unit.outputs) and any(t in path for t in unit.inputs if t)


def classify(view: GraphView, units: list[Unit], path: set[str]) -> None:
    """Give each unit its categories, most specific first; the rule set maps categories to rules."""
    producer_unit = {}
    for u in units:
        for o in u.outputs:
            producer_unit[o] = u
    for u in units:
        cats = []
        if u.region is not None:
            cats = [u.region.kind]
            if u.region.kind == "activation" and _feeds_gate(view, u.outputs[0], path):
                cats.insert(0, "gate")
        else:
            op = u.op_type
            if op == "Tanh" and _is_softcap(view, u.nodes[0]):
                cats = ["softcap"]  # c * tanh(x / c): a bound on logits, not an activation
            elif op == "Conv" and view.is_constant(u.inputs[1]) and all(view.is_constant(t) for t in u.inputs[2:] if t):
                cats = ["conv"]
            elif op == "Gemm" and _is_linear_gemm(view, u.nodes[0]):
                cats = ["linear"]
            elif op in ACTIVATION_OPS:
                cats = ["activation"]
                if _feeds_gate(view, u.outputs[0], path):
                    cats.insert(0, "gate")
            elif op in PRODUCT_OPS and sum(1 for t in u.inputs if t in path) >= 2:
                cats = ["product"]
            elif op in NORM_OPS:
                cats = ["norm"]
            elif op == "Softmax":
                if _feeds_attention(view, u.outputs[0], path):
                    cats = ["attention_probs", "softmax"]
                elif _weights_experts(view, u.outputs[0], path):
                    cats = ["router", "softmax"]
                else:
                    cats = ["softmax"]
            cats.append(op)
        u.categories = cats


def _is_linear_gemm(view: GraphView, k: int) -> bool:
    """Gemm(x, W, b) with constant W and b (or none) and x not transposed: a fully-connected layer."""
    node = view.nodes[k]
    a, w = node.input[0], node.input[1]
    c = node.input[2] if len(node.input) > 2 else ""
    return not view.is_constant(a) and view.is_constant(w) and (not c or view.is_constant(c)) \
        and not attr(node, "transA", 0)


def _scalar_operand(view: GraphView, node, other_than: str):
    """The value of a scalar constant operand of a binary node, or None."""
    for t in node.input:
        if t != other_than and view.is_constant(t):
            s = view.shape(t)
            if s is not None and all(d == 1 for d in s):
                return view.scalar(t) if view.value(t) is not None else 1.0
    return None


def _is_softcap(view: GraphView, k: int) -> bool:
    """Tanh fed by x / c (or x * 1/c) and read as tanh * c: logit soft-capping."""
    node = view.nodes[k]
    p = view.producer.get(node.input[0])
    if p is None or view.nodes[p].op_type not in ("Div", "Mul") \
            or _scalar_operand(view, view.nodes[p], view.nodes[p].input[0]) is None:
        return False
    consumers = view.consumers.get(node.output[0], [])
    return len(consumers) == 1 and view.nodes[consumers[0]].op_type == "Mul" \
        and _scalar_operand(view, view.nodes[consumers[0]], node.output[0]) is not None


def _consumers_through(view: GraphView, t: str, depth: int = 6):
    """Consumers of t, looking through routing ops (casts, reshapes, masks) and scalings by a
    scalar constant (exporters may write gelu's 0.5 after the rest)."""
    out, frontier = [], [(t, 0)]
    while frontier:
        name, d = frontier.pop()
        for c in view.consumers.get(name, []):
            n = view.nodes[c]
            scaled = n.op_type == "Mul" or (n.op_type == "Div" and n.input[0] == name)
            if scaled and d < depth and _scalar_operand(view, n, name) is not None:
                frontier.append((n.output[0], d + 1))
            elif n.op_type in ROUTING_OPS and d < depth and n.output and n.input and n.input[0] == name \
                    or n.op_type == "Where" and d < depth and name in n.input[1:]:
                frontier.append((n.output[0], d + 1))
            else:
                out.append((c, name))
    return out


def _feeds_attention(view: GraphView, probs: str, path: set[str]) -> bool:
    for c, via in _consumers_through(view, probs):
        n = view.nodes[c]
        if n.op_type in ("MatMul", "Einsum", "FusedMatMul") and any(i in path and i != via for i in n.input):
            return True
    return False


def _feeds_gate(view: GraphView, act: str, path: set[str]) -> bool:
    for c, via in _consumers_through(view, act, depth=3):
        n = view.nodes[c]
        if n.op_type == "Mul" and any(i in path and i != via for i in n.input):
            return True
    return False


def _weights_experts(view: GraphView, probs: str, path: set[str], depth: int = 12) -> bool:
    """An MoE router: the softmax's (top-k, renormalised, gathered) weights multiply a
    relevance-carrying tensor that does not come from the router (an expert's output)."""
    weights, frontier = {probs}, [(probs, 0)]
    while frontier:
        name, d = frontier.pop()
        for c in view.consumers.get(name, []):
            n = view.nodes[c]
            if n.op_type == "Mul" and any(i in path and i not in weights for i in n.input):
                return True
            if n.op_type in ROUTER_WEIGHT_OPS and d < depth:
                outputs = n.output[:1] if n.op_type == "TopK" else n.output  # not the indices
                for o in outputs:
                    if o and o not in weights and view.may_carry_relevance(o):
                        weights.add(o)
                        frontier.append((o, d + 1))
    return False
