"""Analysis: which tensors carry relevance, and what each unit on that path is.

A *unit* is one ONNX node or one fused region (see patterns.py). A tensor carries relevance when
it is a float tensor reachable from a relevance source and it reaches the explained output;
only units on that path get a backward. Units whose rule is "constant" block the path.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..ir.graph import GraphView, attr, has_subgraph, outer_references
from .patterns import ACTIVATION_OPS, Region, _strip_casts as strip_casts

# -- what each op computes in its relevance-carrying inputs (rules are chosen by this, not by name) --
# Ops linear (or affine: plus a constant) in every relevance-carrying input: the plain gradient is
# LRP's rule for them (a constant term absorbs its share, as a bias does).
AFFINE_OPS = {"Identity", "Dropout", "Cast", "CastLike", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose",
              "Expand", "Concat", "Split", "Slice", "Gather", "GatherElements", "GatherND", "ScatterElements",
              "ScatterND", "Tile", "Pad", "DepthToSpace", "SpaceToDepth", "Where", "Add", "Sub", "Neg", "Sum", "DFT",
              "Mean", "ReduceSum", "ReduceMean", "CumSum", "Resize", "Upsample", "AveragePool", "GlobalAveragePool",
              "BatchNormalization", "Conv", "ConvTranspose", "Compress", "ReverseSequence", "Trilu",
              "DynamicQuantizeMatMul", "MatMulNBits"}  # onnxruntime's quantized MatMuls: linear in x
# Multilinear: linear in each operand. With one relevance-carrying operand a linear map; with two or
# more a product (AttnLRP's uniform rule).
MULTILINEAR_OPS = {"Mul", "MatMul", "Gemm", "Einsum", "FusedMatMul"}
PRODUCT_OPS = MULTILINEAR_OPS
# Positively homogeneous of degree 1 and piecewise linear or a norm (max, min, top-k, max-pooling,
# L1/L2 norms): Gradient x Input conserves exactly (Euler), so the plain gradient is the rule.
HOMOGENEOUS_OPS = {"MaxPool", "GlobalMaxPool", "ReduceMax", "ReduceMin", "TopK", "ReduceL1", "ReduceL2", "LpPool",
                   "GlobalLpPool"}
# Elementwise functions of one tensor (other inputs constant or not relevance-carrying): AttnLRP's
# identity rule. Max/Min/Div/Pow are elementwise in each input; which inputs carry relevance decides.
ELEMENTWISE_OPS = ACTIVATION_OPS | {
    "Exp", "Log", "Sqrt", "Reciprocal", "Abs", "Sin", "Cos", "Tan", "Asin", "Acos", "Atan", "Sinh", "Cosh",
    "Asinh", "Acosh", "Atanh", "Sign", "Floor", "Ceil", "Round", "Clip", "Pow", "Max", "Min", "Div", "Shrink",
    "Swish"}
NORM_OPS = {"LayerNormalization", "RMSNormalization", "SimplifiedLayerNormalization", "SkipLayerNormalization",
            "SkipSimplifiedLayerNormalization", "InstanceNormalization", "GroupNormalization", "LpNormalization",
            "MeanVarianceNormalization", "LRN"}
SOFTMAX_OPS = {"Softmax", "LogSoftmax", "ReduceLogSumExp"}
ROUTING_OPS = {"Cast", "Dropout", "Identity", "Where", "Reshape", "Transpose", "Squeeze", "Unsqueeze",
               "Expand"}
# a QDQ model's QuantizeLinear -> DequantizeLinear pairs: a rounding, seen through like a cast
FAKE_QUANTIZATION = {"QuantizeLinear", "DequantizeLinear"}
# ops between an MoE router's softmax and the product with an expert's output: top-k selection,
# renormalisation by the sum of the selected weights, per-expert gathers of the tokens' weights
ROUTER_WEIGHT_OPS = ROUTING_OPS | {"TopK", "ReduceSum", "Div", "Gather", "GatherND", "GatherElements", "Flatten",
                                   "Slice", "Split", "Concat"}
# a unit on the path whose computation is none of the above: refused by the LRP rule sets (the
# `gradient` rule set needs only an exact derivative)
UNCLASSIFIED = "unclassified"


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
TYPE_ONLY_INPUTS = {("CastLike", 1), ("EyeLike", 0), ("RandomNormalLike", 0), ("RandomUniformLike", 0)}


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
    """Give each unit its categories, most specific first; the rule set maps categories to rules.
    The last category is the op type (overrides name op types); a unit whose computation is not
    known gets UNCLASSIFIED before it, which the LRP rule sets refuse."""
    for u in units:
        if u.region is not None:
            cats = [u.region.kind]
            if u.region.kind == "activation" and _feeds_gate(view, u.outputs[0], path):
                cats.insert(0, "gate")
            u.categories = cats
            continue
        k = u.nodes[0]
        cats = _op_categories(view, view.nodes[k], k, u, path)
        if "activation" in cats and _feeds_gate(view, u.outputs[0], path):
            cats.insert(0, "gate")
        u.categories = cats + [u.op_type]


def _op_categories(view: GraphView, node, k: int, u: Unit, path: set[str]) -> list[str]:
    """What one node computes in its relevance-carrying inputs."""
    op = node.op_type
    relevant = [i for i, t in enumerate(u.inputs) if t and t in path]
    n = len({u.inputs[i] for i in relevant})
    if op in ("If", "Loop", "Scan"):  # an If's branches get the rule set's rules (pipeline.py); loops are refused
        return ["control_flow"]
    if op == "Tanh" and _is_softcap(view, k):
        return ["softcap"]  # c * tanh(x / c): a bound on logits, not an activation
    if op == "Conv" and view.is_constant(u.inputs[1]) and all(view.is_constant(t) for t in u.inputs[2:] if t):
        return ["conv"]
    if op == "Gemm" and _is_linear_gemm(view, k):
        return ["linear"]
    if op in NORM_OPS:
        return ["norm"]
    if op in SOFTMAX_OPS:
        if op == "Softmax" and _feeds_attention(view, u.outputs[0], path):
            return ["attention_probs", "softmax"]
        if op == "Softmax" and _weights_experts(view, u.outputs[0], path):
            return ["router", "softmax"]
        return ["softmax"]
    if op in MULTILINEAR_OPS:  # x * x is a product of two operands, though of one tensor
        return ["product"] if len(relevant) >= 2 else ["affine"]
    if op in ("Max", "Min"):  # of two or more tensors: routing; of one tensor and constants: elementwise
        return ["homogeneous"] if n >= 2 else ["activation"]
    if op == "Div":  # a / c is linear in a; c -> a / c is elementwise; a / b of two tensors is neither
        if relevant == [0]:
            return ["affine"]
        if relevant == [1]:
            return ["activation"]
        return ["renormalization"] if _is_sum_renormalization(view, node) else [UNCLASSIFIED]
    if op == "Pow":  # x ** c and c ** x are elementwise; x ** y of two tensors is not
        return ["activation"] if n == 1 else [UNCLASSIFIED]
    if op in ("Conv", "ConvTranspose"):  # linear in the input; a relevance-carrying kernel is not covered
        return ["affine"] if relevant == [0] else [UNCLASSIFIED]
    if op in AFFINE_OPS:
        return ["affine"]
    if op in HOMOGENEOUS_OPS:
        return ["homogeneous"]
    if op in ELEMENTWISE_OPS:
        return ["activation"] if n == 1 else [UNCLASSIFIED]
    return [UNCLASSIFIED]


STATISTIC_ROUTING = {"Cast", "Identity", "Expand", "Unsqueeze", "Reshape", "Squeeze"}


# reductions whose result, for a fixed p, is a p-norm-like statistic of the tensor: positively homogeneous
REDUCE_STATISTICS = {"ReduceSum", "ReduceL1", "ReduceL2", "ReduceMean", "ReduceSumSquare", "ReduceMax"}


def _is_sum_renormalization(view: GraphView, node) -> bool:
    """a / s(a), s a sum or p-norm of the same tensor along some axes (+ a constant epsilon, or clamped
    by one): weights renormalised to sum, or to have norm, one, as an MoE block renormalises its top-k
    routing weights (Mixtral, Qwen3-MoE: a / sum(a); DBRX: a / ||a||_p, p = 1 by default, ReduceL1).
    The statistic is written as a reduction, possibly with an elementwise power before it (|a|^p,
    a * a) and a power or square root after it."""
    a, t = node.input[0], node.input[1]
    for _ in range(12):
        p = view.producer.get(t)
        if p is None:
            return False
        n = view.nodes[p]
        if n.op_type in REDUCE_STATISTICS:
            return _is_power_of(view, n.input[0], strip_casts(view, a))
        with_constants = n.op_type in ("Add", "Max", "Clip", "Pow") and \
            all(view.is_constant(i) for i in n.input[1:] if i)
        if n.op_type in STATISTIC_ROUTING or n.op_type in ("Sqrt", "Abs") or with_constants:
            t = n.input[0]
        else:
            return False
    return False


def _is_power_of(view: GraphView, t: str, a: str) -> bool:
    """t is a, |a|, a ** c, |a| ** c or a * a (through casts)."""
    for _ in range(4):
        t = strip_casts(view, t)
        if t == a:
            return True
        p = view.producer.get(t)
        if p is None:
            return False
        n = view.nodes[p]
        if n.op_type == "Mul" and len(n.input) == 2 and strip_casts(view, n.input[0]) == strip_casts(view, n.input[1]):
            t = n.input[0]
        elif n.op_type == "Abs" or n.op_type == "Pow" and view.is_constant(n.input[1]):
            t = n.input[0]
        else:
            return False
    return False


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
            elif n.op_type in ROUTING_OPS | FAKE_QUANTIZATION and d < depth and n.output and n.input \
                    and n.input[0] == name \
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
