"""Ranks where shape inference leaves a tensor without a shape.

Both shape inferences give up on a tensor whose rank depends on which branch an If takes (DeBERTa's
relative positions: a branch of rank 3, another of rank 4) and on everything downstream of it, even
where a later op fixes the rank again (a Squeeze and an Expand to a 3-element shape give rank 3
either way). The backward needs ranks, not sizes (un-broadcasting, transposes), so this pass
propagates the *set of possible ranks* of every tensor through the graph, on the weight-free copy
shape inference works on, and writes a shape of unknown sizes where the set has one element.
Nothing here guesses: an op without a rule below, or an input of unknown rank, leaves its outputs
unknown, and the refusal stays.
"""
from __future__ import annotations

import itertools

import numpy as np
import onnx
from onnx import helper, numpy_helper

# ops whose outputs all have the rank of input 0
_SAME_AS_FIRST = {
    "Abs", "Acos", "Acosh", "Asin", "Asinh", "Atan", "Atanh", "BatchNormalization", "Cast", "CastLike", "Ceil",
    "Celu", "Clip", "Conv", "ConvTranspose", "Cos", "Cosh", "CumSum", "DepthToSpace", "DequantizeLinear",
    "Dropout", "Elu", "Erf", "Exp", "Floor", "Gelu", "GroupNormalization", "HardSigmoid", "HardSwish", "Hardmax",
    "Identity", "InstanceNormalization", "IsInf", "IsNaN", "LayerNormalization", "LeakyRelu", "Log",
    "LogSoftmax", "LpNormalization", "LRN", "MaxPool", "AveragePool", "MeanVarianceNormalization", "Mish", "Neg",
    "Not", "Pad", "QuantizeLinear", "Reciprocal", "Relu", "Resize", "ReverseSequence", "RMSNormalization",
    "Round", "ScatterElements", "ScatterND", "Scatter", "Selu", "Shrink", "Sigmoid", "Sign", "Sin", "Sinh",
    "Slice", "Softmax", "Softplus", "Softsign", "SpaceToDepth", "Split", "Sqrt", "Tan", "Tanh",
    "ThresholdedRelu", "Tile", "TopK", "Transpose", "Trilu", "SimplifiedLayerNormalization",
    "SkipLayerNormalization", "SkipSimplifiedLayerNormalization", "FastGelu", "BiasGelu", "QuickGelu",
}
# elementwise with numpy broadcasting: the largest rank of the inputs
_BROADCAST = {"Add", "Sub", "Mul", "Div", "Pow", "Mod", "Where", "Equal", "Less", "LessOrEqual", "Greater",
              "GreaterOrEqual", "And", "Or", "Xor", "Max", "Min", "Sum", "Mean", "BitShift", "PRelu",
              "BitwiseAnd", "BitwiseOr", "BitwiseXor"}
_REDUCE = {"ReduceSum", "ReduceMean", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2",
           "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare"}
_MAX_RANK = 16


def _attr(node, name, default=None):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


class _Scope:
    """What is known about the tensors of one graph (and, through `outer`, of the graphs around it)."""

    def __init__(self, outer: "_Scope | None" = None):
        self.outer = outer
        self.ranks: dict[str, frozenset] = {}
        self.dims: dict[str, list] = {}       # known shapes (dims may be None)
        self.values: dict[str, np.ndarray] = {}  # small constants
        self.producers: dict[str, onnx.NodeProto] = {}
        self.lengths: dict[str, int] = {}  # element counts of 1-D tensors (shapes, axes lists)

    def _lookup(self, table: str, name: str):
        """`name` in this scope's `table` (ranks, dims, values, producers, lengths), else the outer ones'."""
        scope = self
        while scope is not None:
            found = getattr(scope, table)
            if name in found:
                return found[name]
            scope = scope.outer
        return None

    def rank(self, name: str):
        return self._lookup("ranks", name)

    def shape(self, name: str):
        return self._lookup("dims", name)

    def value(self, name: str):
        return self._lookup("values", name)

    def producer(self, name: str):
        return self._lookup("producers", name)

    def length(self, name: str):
        return self._lookup("lengths", name)

    def know_shape(self, name: str, type_proto) -> None:
        if not type_proto.HasField("tensor_type") or not type_proto.tensor_type.HasField("shape"):
            return
        dims = [d.dim_value if d.HasField("dim_value") else None for d in type_proto.tensor_type.shape.dim]
        self.dims[name] = dims
        self.ranks[name] = frozenset([len(dims)])


def _length(scope: _Scope, name: str):
    """The possible element counts of a 1-D tensor (a shape or an axes list), or None if unknown."""
    if not name:
        return None
    value = scope.value(name)
    if value is not None:
        return frozenset([int(value.size)])
    if scope.length(name) is not None:
        return scope.length(name)
    dims = scope.shape(name)
    if dims is not None and len(dims) == 1 and dims[0] is not None:
        return frozenset([int(dims[0])])
    return None


_LENGTH_PRESERVING = {"Cast", "CastLike", "Identity", "Neg", "Abs", "Relu", "Clip", "Sign", "Not", "Floor", "Ceil",
                      "Round", "CumSum"}


def _clamp(v) -> int:
    return int(max(min(int(v), 2 ** 62), -(2 ** 62)))  # INT64_MAX ends


def _node_length(node, scope: _Scope):
    """The possible element counts of a node's 1-D output (the data propagation of shape vectors:
    Shape, Slice, Concat, ConstantOfShape, broadcasting arithmetic on them), or None."""
    op = node.op_type
    ins = list(node.input)
    if op == "Shape":
        start, end = _attr(node, "start", 0), _attr(node, "end")
        return _combine([scope.rank(ins[0])], lambda r: len(range(r)[slice(start, r if end is None else end)]))
    if op in _LENGTH_PRESERVING:
        return _length(scope, ins[0])
    if op == "Concat":
        return _combine([_length(scope, t) for t in ins], lambda *ns: sum(ns))
    if op == "Unsqueeze" and scope.rank(ins[0]) == frozenset([0]):
        return frozenset([1])
    if op == "Slice":
        starts, ends, steps = (scope.value(ins[k]) if len(ins) > k and ins[k] else None for k in (1, 2, 4))
        if starts is None or ends is None or starts.size != 1 or ends.size != 1:
            return None
        step = 1 if steps is None else int(np.asarray(steps).reshape(-1)[0])
        begin, stop = _clamp(starts.reshape(-1)[0]), _clamp(ends.reshape(-1)[0])
        return _combine([_length(scope, ins[0])], lambda n: len(range(n)[slice(begin, stop, step)]))
    if op == "Gather":
        indices = scope.value(ins[1])
        return frozenset([int(indices.size)]) if indices is not None and indices.ndim == 1 else None
    if op == "ConstantOfShape":
        shape = scope.value(ins[0])
        if shape is not None:
            return frozenset([int(shape.reshape(-1)[0])]) if shape.size == 1 else None
        producer = scope.producer(ins[0])
        if producer is not None and producer.op_type == "Shape" and _length(scope, ins[0]) == frozenset([1]):
            return _length(scope, producer.input[0])  # the shape of a 1-D tensor y: as long as y
        return None
    if op in _BROADCAST:
        sets = [_length(scope, t) for t in ins if t and scope.rank(t) != frozenset([0])]
        return _combine(sets, _broadcast_length)
    return None


def _broadcast_length(*ns):
    sizes = {n for n in ns if n != 1}
    if len(sizes) > 1:
        return None
    return sizes.pop() if sizes else 1


def _fold(node, scope: _Scope):
    """The value of a node computing on small constants (shape arithmetic), or None."""
    op = node.op_type
    if op not in ("Unsqueeze", "Squeeze", "Cast", "Identity", "Concat", "Reshape", "Neg", "Add", "Sub", "Mul",
                  "Gather") or node.domain not in ("", "ai.onnx"):
        return None
    values = [scope.value(t) if t else None for t in node.input]
    if not values or any(v is None for v in values[:1]) or any(t and v is None for t, v in zip(node.input, values)):
        return None
    x = values[0]
    if op in ("Unsqueeze", "Squeeze"):
        axes = _attr(node, "axes")
        if axes is None:
            axes = values[1].reshape(-1).tolist() if len(values) > 1 and values[1] is not None else None
        if op == "Squeeze":
            return np.squeeze(x, axis=tuple(axes)) if axes is not None else np.squeeze(x)
        if axes is None:
            return None
        out = x
        rank = x.ndim + len(axes)
        for a in sorted(a % rank for a in axes):
            out = np.expand_dims(out, a)
        return out
    if op == "Cast":
        return x.astype(helper.tensor_dtype_to_np_dtype(_attr(node, "to")))
    if op == "Identity":
        return x
    if op == "Concat":
        return np.concatenate(values, axis=_attr(node, "axis"))
    if op == "Reshape":
        shape = values[1].reshape(-1).tolist()
        shape = [x.shape[i] if d == 0 and not _attr(node, "allowzero", 0) else d for i, d in enumerate(shape)]
        return x.reshape(shape)
    if op == "Neg":
        return -x
    if op == "Gather":
        return np.take(x, values[1], axis=_attr(node, "axis", 0))
    a, b = values[0], values[1]
    return {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply}[op](a, b).astype(np.result_type(a, b))


def _combine(sets, f):
    if any(s is None for s in sets):
        return None
    out = set()
    for combo in itertools.product(*sets):
        r = f(*combo)
        if r is None:
            return None
        if r < 0 or r > _MAX_RANK:
            continue
        out.add(r)
    return frozenset(out) or None


def _matmul_rank(a, b):
    if a == 0 or b == 0:
        return None
    if a == 1 and b == 1:
        return 0
    if a == 1:
        return b - 1
    if b == 1:
        return a - 1
    return max(a, b)


def _axes(node, scope: _Scope):
    """The number of axes a Squeeze/Unsqueeze/Reduce names (attribute or input 1), or None if unknown;
    -1 when it names none."""
    axes = _attr(node, "axes")
    if axes is not None:
        return len(axes)
    if len(node.input) > 1 and node.input[1]:
        n = _length(scope, node.input[1])
        return next(iter(n)) if n is not None and len(n) == 1 else None
    return -1


def _einsum_rank(node):
    equation = _attr(node, "equation")
    if isinstance(equation, bytes):
        equation = equation.decode()
    if not equation or "->" not in equation or "." in equation:
        return None
    return len(equation.split("->")[1].strip())


def _node_ranks(node, scope: _Scope, propagate_graph) -> list:
    """The rank sets of the node's outputs (None where unknown)."""
    op = node.op_type
    n_out = len(node.output)
    ins = [scope.rank(t) if t else None for t in node.input]
    first = ins[0] if ins else None
    same = [first] * n_out
    if op in _SAME_AS_FIRST:
        if op in ("TopK", "Split", "Dropout"):
            return same
        return [first] + [None] * (n_out - 1)
    if op in _BROADCAST:
        present = [r for t, r in zip(node.input, ins) if t]
        return [_combine(present, lambda *rs: max(rs))] + [None] * (n_out - 1)
    if op == "Concat":
        known = [r for r in ins if r is not None]
        if not known:
            return [None]
        common = frozenset.intersection(*known)
        return [common or None]
    if op in ("MatMul", "FusedMatMul", "MatMulInteger"):
        return [_combine(ins[:2], _matmul_rank)]
    if op == "Gemm":
        return [frozenset([2])]
    if op == "Einsum":
        r = _einsum_rank(node)
        return [frozenset([r]) if r is not None else None]
    if op == "Gather":
        return [_combine(ins[:2], lambda a, i: a + i - 1 if a >= 1 else None)]
    if op == "GatherElements":
        return [ins[1] if len(ins) > 1 else None]
    if op in ("Shape",):
        return [frozenset([1])]
    if op == "Size":
        return [frozenset([0])]
    if op in ("Range", "Compress") and not (op == "Compress" and _attr(node, "axis") is not None):
        return [frozenset([1])]
    if op == "Compress":
        return [first]
    if op in ("NonZero", "Flatten"):
        return [frozenset([2])]
    if op == "Reshape":
        return [_length(scope, node.input[1]) if len(node.input) > 1 else None]
    if op == "ConstantOfShape":
        return [_length(scope, node.input[0])]
    if op == "Expand":
        n = _length(scope, node.input[1]) if len(node.input) > 1 else None
        return [_combine([first, n], max)]
    if op == "Unsqueeze":
        k = _axes(node, scope)
        if k is None or k < 0:
            return [None]
        return [_combine([first], lambda r: r + k)]
    if op == "Squeeze":
        k = _axes(node, scope)
        if k is None or k < 0:  # squeezes whatever is 1: depends on sizes
            return [None]
        return [_combine([first], lambda r: r - k)]
    if op in _REDUCE or op in ("ArgMax", "ArgMin"):
        if _attr(node, "keepdims", 1):
            return [first]
        if op in ("ArgMax", "ArgMin"):
            return [_combine([first], lambda r: r - 1)]
        k = _axes(node, scope)
        if k is None:
            return [None]
        if k < 0:
            return [None if _attr(node, "noop_with_empty_axes", 0) else frozenset([0])]
        return [_combine([first], lambda r: r - k)]
    if op == "OneHot":
        return [_combine([first], lambda r: r + 1)]
    if op == "Constant":
        value = _constant_value(node)
        return [frozenset([value.ndim]) if value is not None else None]
    if op == "If":
        branches = [a.g for a in node.attribute if a.name in ("then_branch", "else_branch")]
        if len(branches) != 2:
            return [None] * n_out
        outs = [propagate_graph(g, scope) for g in branches]
        result = []
        for i in range(n_out):
            sets = [o[i] if i < len(o) else None for o in outs]
            result.append(None if any(s is None for s in sets) else frozenset.union(*sets))
        return result
    return [None] * n_out


def _constant_value(node):
    for a in node.attribute:
        if a.name == "value" and a.t.data_location != onnx.TensorProto.EXTERNAL:
            return numpy_helper.to_array(a.t)
        if a.name in ("value_float", "value_int"):
            return np.array(0)
        if a.name in ("value_floats", "value_ints"):
            return np.zeros(len(helper.get_attribute_value(a)))
    return None


def _propagate(graph: onnx.GraphProto, outer: _Scope | None, found: dict, known=()) -> list:
    """Rank sets of the graph's outputs; `found` collects every tensor's rank set (this graph's only).
    `known`: further value infos (shape inference's) of this graph's tensors."""
    scope = _Scope(outer)
    for vi in list(graph.input) + list(graph.value_info) + list(graph.output) + list(known):
        scope.know_shape(vi.name, vi.type)
    for init in graph.initializer:
        scope.dims[init.name] = list(init.dims)
        scope.ranks[init.name] = frozenset([len(init.dims)])
        if init.data_location != onnx.TensorProto.EXTERNAL and np.prod(init.dims, dtype=np.int64) <= 64:
            scope.values[init.name] = numpy_helper.to_array(init)
    for node in graph.node:
        if node.op_type == "Constant":
            value = _constant_value(node)
            if value is not None and value.size <= 64:
                scope.values[node.output[0]] = value
        outputs = list(node.output)
        for name in outputs:
            scope.producers[name] = node
        if not all(not o or o in scope.ranks for o in outputs):
            try:
                sets = _node_ranks(node, scope, lambda g, s: _propagate(g, s, {}))
            except Exception:  # a malformed node: its outputs stay unknown
                sets = [None] * len(outputs)
            for name, ranks in zip(outputs, sets):
                if name and name not in scope.ranks and ranks is not None:
                    scope.ranks[name] = ranks
                    found[name] = ranks
        if len(outputs) != 1 or not outputs[0]:
            continue
        try:
            value = _fold(node, scope) if outputs[0] not in scope.values else None
            if value is not None and value.size <= 64:
                scope.values[outputs[0]] = value
            elif scope.rank(outputs[0]) == frozenset([1]) and _length(scope, outputs[0]) is None:
                n = _node_length(node, scope)
                if n is not None:
                    scope.lengths[outputs[0]] = n
        except Exception:  # a malformed node: nothing more is known of its output
            pass
    return [scope.rank(o.name) for o in graph.output]


def fill_ranks(model: onnx.ModelProto, inferred: onnx.ModelProto) -> int:
    """Give every top-level tensor of `model` that shape inference (`inferred`) left without a shape, and
    whose rank the graph determines, a shape of that rank with unknown sizes (in `inferred`, in place).
    Returns how many. The nodes are `model`'s: onnxruntime's symbolic inference rewrites an If in its
    copy (both branches become the one it judged taken, even on a condition known only at run time)."""
    shaped = {vi.name for vi in list(inferred.graph.value_info) + list(inferred.graph.output)
              if vi.type.HasField("tensor_type") and vi.type.tensor_type.HasField("shape")}
    shaped |= {i.name for i in inferred.graph.initializer}
    if all(not o or o in shaped for n in model.graph.node for o in n.output):
        return 0  # inference shaped everything (the common case): nothing to propagate
    found: dict = {}
    _propagate(model.graph, None, found,
               list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output))
    entries = {vi.name: vi for vi in inferred.graph.value_info}
    entries.update({vi.name: vi for vi in inferred.graph.output})
    filled = 0
    for name, ranks in found.items():
        if len(ranks) != 1:
            continue
        (rank,) = ranks
        vi = entries.get(name)
        if vi is None:
            vi = inferred.graph.value_info.add()
            vi.name = name
            vi.type.tensor_type.elem_type = 0
        elif vi.type.HasField("tensor_type") and vi.type.tensor_type.HasField("shape"):
            continue
        elif not vi.type.HasField("tensor_type") and vi.type.WhichOneof("value") is not None:
            continue  # a sequence or optional: not a tensor's shape
        shape = vi.type.tensor_type.shape
        shape.Clear()
        for _ in range(rank):
            shape.dim.add()
        filled += 1
    return filled
