"""Pattern fusion: find the written-out functions that LRP rules treat as one unit.

Exporters write GELU as x*0.5*(1+erf(x/sqrt2)) or 0.5x(1+tanh(...)), SiLU as x*sigmoid(x), and
LayerNorm/RMSNorm as a mean, a power, a square root and a division. The rules need to see these
as wholes: an activation gets the identity rule over the whole function, and the std/rms of a norm
is a constant. The forward graph is never changed; a region only groups existing nodes.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..ir.graph import GraphView

ACTIVATION_OPS = {"Gelu", "Tanh", "Sigmoid", "Relu", "LeakyRelu", "Elu", "Selu", "Celu", "Softplus",
                  "Softsign", "HardSigmoid", "HardSwish", "Mish", "Erf", "ThresholdedRelu", "PRelu",
                  "FastGelu", "BiasGelu", "QuickGelu", "Swish"}
# elementwise ops of the standard domain: one output element from the same element of each input
UNARY_NONLINEAR = (ACTIVATION_OPS - {"FastGelu", "BiasGelu", "QuickGelu"}) | {
    "Exp", "Log", "Sqrt", "Reciprocal", "Abs", "Sin", "Cos", "Tan", "Asin", "Acos", "Atan", "Sinh", "Cosh",
    "Asinh", "Acosh", "Atanh", "Sign", "Floor", "Ceil", "Round", "Clip", "Shrink"}
COMPARISONS = {"Greater", "Less", "GreaterOrEqual", "LessOrEqual", "Equal", "Not", "And", "Or", "Xor", "IsNaN",
               "IsInf"}
ELEMENTWISE = UNARY_NONLINEAR | COMPARISONS | {"Add", "Sub", "Mul", "Div", "Pow", "Neg", "Max", "Min", "Where",
                                               "Cast", "Identity", "Sum", "Mean"}
MAX_REGION_NODES = 24


@dataclass
class Region:
    kind: str            # "activation" (identity rule), "norm_scale" (std/rms treated as constant),
                         # "fake_quantization" (straight through), "quantized_matmul" (dequantized weight),
                         # "linear" (MatMul by a constant matrix plus a constant bias: a fully-connected
                         # layer, for the gamma rule)
    pattern: str         # what was recognised, for reports
    nodes: list          # node indices, ascending
    input: str           # the tensor the function is applied to
    output: str          # the function's result (activation) or the std/rms factor (norm_scale)


def _is_scalar_const(view: GraphView, t: str) -> bool:
    if not view.is_constant(t):
        return False
    s = view.shape(t)
    return s is not None and all(isinstance(d, int) for d in s) and int(np.prod(s, dtype=np.int64)) <= 1


def _pattern_name(view: GraphView, nodes: list) -> str:
    ops = {view.nodes[i].op_type for i in nodes}
    if "Erf" in ops:
        return "GELU (erf form)"
    if "Tanh" in ops and "Pow" in ops or ("Tanh" in ops and len(nodes) >= 6):
        return "GELU (tanh form)"
    if "Sigmoid" in ops and len(nodes) == 2 and "Mul" in ops:
        return "SiLU (x*sigmoid(x))"
    if "Sigmoid" in ops and "Mul" in ops:
        return "x*sigmoid(a*x) (QuickGELU/SiLU form)"
    return "elementwise activation (" + "+".join(sorted(ops)) + ")"


def _non_constant(view: GraphView, node) -> set:
    return {t for t in node.input if t and not view.is_constant(t)}


def _is_nonlinear(view: GraphView, node) -> bool:
    """A nonlinear elementwise op: a nonlinear function, a product or quotient of two non-constant
    tensors, a division by a non-constant tensor, a power other than 1, a selection by a computed
    condition."""
    op = node.op_type
    if op in UNARY_NONLINEAR or op in ("Max", "Min"):
        return True
    if op in ("Mul", "Div"):
        return len(_non_constant(view, node)) >= 2 or op == "Div" and not view.is_constant(node.input[1])
    if op == "Pow":
        return view.scalar(node.input[1]) != 1
    return op == "Where" and not view.is_constant(node.input[0])


def _constants_keep_shape(view: GraphView, node) -> bool:
    """Every constant input of `node` is a scalar or broadcasts into each non-constant input's shape
    without enlarging it: the node maps its operand(s) elementwise."""
    varying = [view.shape(t) for t in _non_constant(view, node)]
    for t in node.input:
        if not t or not view.is_constant(t) or _is_scalar_const(view, t):
            continue
        cs = view.shape(t)
        if cs is None or any(not isinstance(d, int) for d in cs):
            return False
        for vs in varying:
            if vs is None or len(cs) > len(vs):
                return False
            if any(c != 1 and c != v for c, v in zip(reversed(cs), reversed(vs))):
                return False
    return True


def _growable(view: GraphView, p, t: str, region: set, claimed: set) -> bool:
    """Can the region (which reads t) take in t's producer p?"""
    if p is None or p in claimed or p in region:
        return False
    n = view.nodes[p]
    if n.op_type not in ELEMENTWISE or n.domain not in ("", "ai.onnx"):
        return False
    if any(c not in region for c in view.consumers.get(t, [])) or t in view.graph_outputs:
        return False
    return len([o for o in n.output if o]) == 1 and _constants_keep_shape(view, n)


def _chain_to_nonlinear(view: GraphView, t: str, region: set, claimed: set):
    """Walk back from t through single-operand elementwise ops while they are linear; if the walk
    reaches a nonlinear one, return (the nodes walked, the tensor it reads), else None. A linear op
    between two nonlinear ones belongs to the function (GELU's 1 + erf); one before the first
    nonlinear op is the input's affine map (a bias), which keeps its own rule."""
    walked = []
    while len(region) + len(walked) < MAX_REGION_NODES:
        p = view.producer.get(t)
        if not _growable(view, p, t, region | set(walked), claimed):
            return None
        operands = _non_constant(view, view.nodes[p])
        if len(operands) != 1:
            return None
        walked.append(p)
        t = next(iter(operands))
        if _is_nonlinear(view, view.nodes[p]):
            return walked, t
    return None


def find_activation(view: GraphView, end: int, claimed: set) -> Region | None:
    """An elementwise function of one tensor written out of several ops, ending at node `end`: grown
    backward until every non-constant input collapses into one tensor x, and through chains of
    elementwise ops up to the earliest nonlinear one (log(1 + exp(x)), relu(x) ** 2, x * sigmoid(x),
    GELU's erf and tanh forms). The region computes y = f(x) elementwise and gets the identity rule
    as a whole; a single nonlinear op needs no region."""
    node = view.nodes[end]
    if end in claimed or node.op_type not in ELEMENTWISE or node.domain not in ("", "ai.onnx") \
            or len([o for o in node.output if o]) != 1 or not _constants_keep_shape(view, node):
        return None
    frontier = _non_constant(view, node)
    if not frontier or len(frontier) < 2 and not _is_nonlinear(view, node):
        return None
    region = {end}
    while True:
        if len(frontier) == 1:
            chain = _chain_to_nonlinear(view, next(iter(frontier)), region, claimed)
            if chain is None:
                break
            region.update(chain[0])
            frontier = {chain[1]}
            continue
        if len(region) >= MAX_REGION_NODES:
            return None
        t = max(frontier, key=lambda name: view.producer.get(name, -1))
        p = view.producer.get(t)
        if not _growable(view, p, t, region, claimed):
            return None
        region.add(p)
        frontier.discard(t)
        frontier |= _non_constant(view, view.nodes[p])
    x = next(iter(frontier))
    if len(region) < 2 or not view.is_float(x) or not any(_is_nonlinear(view, view.nodes[i]) for i in region):
        return None
    y = _absorb_scalings(view, region, node.output[0], claimed)
    nodes = sorted(region)
    return Region("activation", _pattern_name(view, nodes), nodes, x, y)


def _absorb_scalings(view: GraphView, region: set, y: str, claimed: set) -> str:
    """Extend the region over trailing multiplications by a scalar constant (GELU's 0.5 written
    last), so the backward reads the activation's final output and onnxruntime can still fuse
    the whole activation in the forward."""
    while True:
        consumers = view.consumers.get(y, [])
        if len(consumers) != 1 or consumers[0] in claimed or y in view.graph_outputs:
            return y
        n = view.nodes[consumers[0]]
        if n.op_type not in ("Mul", "Div") or (n.op_type == "Div" and n.input[0] != y):
            return y
        other = [t for t in n.input if t != y]
        if len(other) != 1 or not _is_scalar_const(view, other[0]):
            return y
        region.add(consumers[0])
        y = n.output[0]


NORM_CONE_OPS = {"Cast", "Reciprocal", "Sqrt", "Add", "ReduceMean", "ReduceSum", "Pow", "Mul", "Div", "Identity",
                 "Max", "Clip", "ReduceL2", "ReduceSumSquare", "Expand"}
SQUARE_REDUCTIONS = {"ReduceL2", "ReduceSumSquare"}  # reductions that square the normalized tensor


def _strip_casts(view: GraphView, t: str) -> str:
    while True:
        p = view.producer.get(t)
        if p is None or view.nodes[p].op_type not in ("Cast", "Identity"):
            return t
        t = view.nodes[p].input[0]


def find_norm_scale(view: GraphView, end: int, claimed: set) -> Region | None:
    """Match Mul(a, d) / Div(a, d) where d = 1/sqrt(mean(a^2)+eps) (RMSNorm) or
    sqrt(mean(a^2)+eps) with a = x - mean(x) (LayerNorm): d is the std/rms factor."""
    node = view.nodes[end]
    if node.op_type not in ("Mul", "Div") or end in claimed or len(node.input) != 2:
        return None
    candidates = [(node.input[0], node.input[1])]
    if node.op_type == "Mul":
        candidates.append((node.input[1], node.input[0]))
    for a, d in candidates:
        if view.is_constant(a) or view.is_constant(d):
            continue
        cone = _norm_cone(view, d, _strip_casts(view, a), claimed)
        if cone is None:
            continue
        ops = {view.nodes[i].op_type for i in cone}
        if "ReduceL2" not in ops and (not ({"ReduceMean", "ReduceSum", "ReduceSumSquare"} & ops)
                                      or not ({"Sqrt", "Pow"} & ops)):
            continue
        if any(c not in cone and c != end for i in cone for o in view.nodes[i].output
               for c in view.consumers.get(o, []) if o != d):
            continue
        if any(view.nodes[i].op_type == "Div" and not view.is_constant(view.nodes[i].input[0]) for i in cone):
            pattern = "ratio of norm statistics"  # ConvNeXt-V2's GRN: ||x|| / mean ||x||
        elif ({"ReduceSum"} | SQUARE_REDUCTIONS) & ops and "ReduceMean" not in ops:
            pattern = "L2 norm"
        else:
            pattern = "RMSNorm rms" if node.op_type == "Mul" else "LayerNorm std"
        return Region("norm_scale", pattern, sorted(cone), a, d)
    return None


def _norm_cone(view: GraphView, d: str, leaf: str, claimed: set):
    """Nodes computing d from `leaf` alone through the norm ops, or None."""
    cone, stack = set(), [d]
    saw_square = False
    while stack:
        t = stack.pop()
        if view.is_constant(t):
            continue
        if t != d and _strip_casts(view, t) == leaf:
            continue  # reached the normalized tensor (or a cast of it): the cone's input
        p = view.producer.get(t)
        if p is None or p in claimed:
            return None
        n = view.nodes[p]
        if n.op_type not in NORM_CONE_OPS or n.domain not in ("", "ai.onnx"):
            return None
        if n.op_type == "Pow":  # leaf ** 2, or a (reciprocal) square root of the variance
            exponent = view.scalar(n.input[1])
            if _strip_casts(view, n.input[0]) == leaf:
                if exponent != 2:
                    return None
                saw_square = True
            elif exponent not in (0.5, -0.5):
                return None
        if n.op_type in SQUARE_REDUCTIONS:
            if _strip_casts(view, n.input[0]) != leaf:
                return None
            saw_square = True
        if n.op_type == "Mul" and not any(view.is_constant(i) for i in n.input):
            if not (n.input[0] == n.input[1] and _strip_casts(view, n.input[0]) == leaf):
                return None
            saw_square = True
        if n.op_type in ("Add", "Max") and not any(view.is_constant(i) for i in n.input):
            return None  # only a constant epsilon may be added (or clamped to)
        cone.add(p)
        stack.extend(i for i in n.input if i and view.may_carry_relevance(i))  # not shapes or axes
        if len(cone) > MAX_REGION_NODES:
            return None
    return cone if saw_square and _is_statistic(view, d, leaf, cone) else None


def _is_statistic(view: GraphView, t: str, leaf: str, cone: set) -> bool:
    """t depends on `leaf` only through reductions (a statistic of it, e.g. a std, or GRN's ratio of an
    L2 norm to its mean), never elementwise: every path from t down to the leaf passes a Reduce*."""
    if view.is_constant(t) or not view.may_carry_relevance(t):
        return True
    if _strip_casts(view, t) == leaf:
        return False
    p = view.producer.get(t)
    if p is None or p not in cone:
        return False
    n = view.nodes[p]
    if n.op_type.startswith("Reduce") and _reduces(view, n):
        return True
    return all(_is_statistic(view, i, leaf, cone) for i in n.input if i)


def _reduces(view: GraphView, n) -> bool:
    """A Reduce* that really reduces: not the identity of noop_with_empty_axes with no axes, and not
    only over axes known to have size 1 (both are elementwise)."""
    axes = next((list(a.ints) for a in n.attribute if a.name == "axes"), None)
    if axes is None and len(n.input) > 1 and n.input[1]:
        value = view.value(n.input[1])
        if value is None:
            return False  # axes computed at run time: not known to reduce
        axes = [int(a) for a in np.asarray(value).reshape(-1)]
    noop = next((a.i for a in n.attribute if a.name == "noop_with_empty_axes"), 0)
    if not axes:
        return not noop
    shape = view.shape(n.input[0])
    if shape is None:
        return True
    return any(shape[a % len(shape)] != 1 for a in axes)


def find_fake_quantization(view: GraphView, end: int, claimed: set) -> Region | None:
    """DequantizeLinear(QuantizeLinear(x)) on activations (QDQ models): a rounding of x, whose
    relevance passes straight through (dequantization is linear, rounding has no useful gradient)."""
    node = view.nodes[end]
    if node.op_type != "DequantizeLinear" or end in claimed:
        return None
    q = view.producer.get(node.input[0])
    if q is None or view.nodes[q].op_type != "QuantizeLinear":
        return None
    x = view.nodes[q].input[0]
    if view.is_constant(x) or not view.may_carry_relevance(x):
        return None
    return Region("fake_quantization", "QuantizeLinear->DequantizeLinear", [end], x, node.output[0])


def find_quantized_matmul(view: GraphView, end: int, claimed: set) -> Region | None:
    """A dynamically quantized MatMul of a float activation x (onnxruntime.quantization.quantize_dynamic):
    DynamicQuantizeLinear(x) -> MatMulInteger -> Cast -> Mul(scale), or DynamicQuantizeLinear(x) ->
    MatMulIntegerToFloat. The region maps x to the float result; its backward is the float gradient
    with the dequantized weight (the activation's rounding passes straight through). The
    DynamicQuantizeLinear node stays outside: several MatMuls may share it."""
    node = view.nodes[end]
    if end in claimed:
        return None
    if node.op_type == "MatMulIntegerToFloat" and node.domain == "com.microsoft":
        nodes, matmul = [end], node
    elif node.op_type == "Mul" and len(node.input) == 2:
        for t in node.input:
            c = view.producer.get(t)
            if c is not None and view.nodes[c].op_type == "Cast" and c not in claimed:
                m = view.producer.get(view.nodes[c].input[0])
                if m is not None and view.nodes[m].op_type == "MatMulInteger" and m not in claimed \
                        and view.consumers.get(t) == [end] \
                        and view.consumers.get(view.nodes[m].output[0]) == [c]:
                    nodes, matmul = [m, c, end], view.nodes[m]
                    break
        else:
            return None
    else:
        return None
    q = view.producer.get(matmul.input[0])
    if q is None or view.nodes[q].op_type != "DynamicQuantizeLinear" or not view.is_constant(matmul.input[1]):
        return None
    x = view.nodes[q].input[0]
    if view.is_constant(x) or not view.may_carry_relevance(x):
        return None
    return Region("quantized_matmul", f"DynamicQuantizeLinear->{matmul.op_type}", nodes, x, node.output[0])


def find_linear(view: GraphView, end: int, claimed: set) -> Region | None:
    """A fully-connected layer written as MatMul(x, W) (+ b): W a constant matrix, b a constant added
    to the MatMul's only use. Rules that re-run the layer with modified weights (gamma) need W and b
    together, as torch.nn.Linear holds them; under any other rule the region dissolves again."""
    node = view.nodes[end]
    if end in claimed or node.domain not in ("", "ai.onnx"):
        return None
    matmul, bias_add = end, None
    if node.op_type == "Add" and len(node.input) == 2:
        for t, other in ((node.input[0], node.input[1]), (node.input[1], node.input[0])):
            p = view.producer.get(t)
            if p is not None and view.nodes[p].op_type == "MatMul" and view.is_constant(other) \
                    and not view.is_constant(t) and view.consumers.get(t) == [end] and p not in claimed:
                matmul, bias_add = p, end
                break
        else:
            return None
    mm = view.nodes[matmul]
    if mm.op_type != "MatMul" or view.is_constant(mm.input[0]) or not view.is_float(mm.input[0]) \
            or not view.is_constant(mm.input[1]) or view.rank(mm.input[1]) != 2:
        return None
    if bias_add is None:
        return Region("linear", "Linear (MatMul by a constant matrix)", [matmul], mm.input[0], mm.output[0])
    return Region("linear", "Linear (MatMul + bias Add)", [matmul, bias_add], mm.input[0], node.output[0])


def linear_parts(view: GraphView, region: Region) -> tuple[str, str, str | None]:
    """(x, W, bias or None) of a "linear" region: y = x @ W (+ bias)."""
    mm = view.nodes[region.nodes[0]]
    bias = None
    if len(region.nodes) == 2:
        add = view.nodes[region.nodes[1]]
        bias = add.input[1] if add.input[0] == mm.output[0] else add.input[0]
    return mm.input[0], mm.input[1], bias


def find_regions(view: GraphView, enabled: bool = True) -> list[Region]:
    """All activation, norm and linear-layer regions of the graph, found from the outputs backward."""
    if not enabled:
        return []
    regions, claimed = [], set()
    for i in range(len(view.nodes) - 1, -1, -1):
        for finder in (find_quantized_matmul, find_norm_scale, find_activation, find_fake_quantization, find_linear):
            r = finder(view, i, claimed)
            if r is not None:
                regions.append(r)
                claimed.update(r.nodes)
                break
    return regions
