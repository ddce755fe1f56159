"""Vector-Jacobian products of ONNX ops, one small registered function per op.

Each function receives the builder, the forward node, the gradients of the node's outputs (None
where an output carries no gradient) and which inputs want a gradient; it returns one gradient
name (or None) per input. These are the exact derivatives: the LRP rules in `rules.py` reuse them
and change only the local Jacobians that AttnLRP modifies.
"""
from __future__ import annotations

import math

import numpy as np
import onnx

from ..ir.builder import Builder
from ..ir.graph import attr
from .nn import conv_geometry, conv_input_gradient, expand_reduced, normalize_vjp  # noqa: F401
from .registry import NORM_VJPS, VJPS, lookup, register, register_norm  # noqa: F401 (re-exported)


def _g(gy):
    return gy[0]


# -- pass-through and routing ops ---------------------------------------------------------------
@register("Identity", "Dropout")
def _identity(b: Builder, node, gy, wants):
    return [_g(gy)] + [None] * (len(node.input) - 1)


@register("Cast", "CastLike")
def _cast(b, node, gy, wants):
    return [b.cast_like(_g(gy), node.input[0])] + [None] * (len(node.input) - 1)


@register("Reshape", "Flatten", "Squeeze", "Unsqueeze")
def _reshape(b, node, gy, wants):
    return [b.reshape_like(_g(gy), node.input[0])] + [None] * (len(node.input) - 1)


@register("Transpose")
def _transpose(b, node, gy, wants):
    perm = attr(node, "perm")
    if perm is None:
        perm = list(reversed(range(b.view.rank(node.input[0]))))
    inverse = list(np.argsort(perm))
    return [b.op("Transpose", [_g(gy)], perm=inverse, like=node.input[0])]


@register("Expand")
def _expand(b, node, gy, wants):
    return [b.unbroadcast(_g(gy), node.input[0]), None]


@register("Concat")
def _concat(b, node, gy, wants):
    axis = attr(node, "axis")
    sizes = []
    for t in node.input:
        s = b.view.shape(t)
        r = len(s) if s is not None else b.view.rank(node.output[0])
        ax = axis % r
        if s is not None and isinstance(s[ax], int):
            sizes.append(b.ints([s[ax]]))
        else:
            sizes.append(b.op("Gather", [b.shape_of(t), b.ints([ax])], axis=0))
    split = sizes[0] if len(sizes) == 1 else b.op("Concat", sizes, axis=0)
    parts = b.op("Split", [_g(gy), split], n_out=len(node.input), axis=axis)
    parts = [parts] if isinstance(parts, str) else parts
    for p, t in zip(parts, node.input):
        b.view.info[p] = b.view.info.get(t)
    return [p if w else None for p, w in zip(parts, wants)]


@register("Split")
def _split(b, node, gy, wants):
    axis = attr(node, "axis", 0)
    pieces = [g if g is not None else b.zeros_like(o) for g, o in zip(gy, node.output)]
    return [b.op("Concat", pieces, axis=axis, like=node.input[0])] + [None] * (len(node.input) - 1)


@register("Slice")
def _slice(b, node, gy, wants):
    """Pad the gradient back to the input's extent (steps of 1), or scatter it to the positions the
    slice took (any steps, negative too)."""
    x = node.input[0]
    r = b.view.rank(x)
    starts, ends = node.input[1], node.input[2]
    axes = node.input[3] if len(node.input) > 3 and node.input[3] else None
    steps = node.input[4] if len(node.input) > 4 and node.input[4] else None
    rest = [None] * (len(node.input) - 1)
    if axes is None:
        n = b.view.shape(starts)
        axes_v = np.arange(n[0] if n and isinstance(n[0], int) else r)
    else:
        axes_v = b.view.value(axes)
        if axes_v is None:
            raise NotImplementedError("Slice with runtime axes")
    axes_v = [int(a) % r for a in np.asarray(axes_v).reshape(-1)]
    if steps is not None:
        sv = b.view.value(steps)
        if sv is None or not np.all(sv == 1):
            return [_strided_slice_gradient(b, x, _g(gy), starts, ends, axes_v, steps)] + rest
    static = _static_slice_pads(b, x, starts, ends, axes_v)
    if static is not None:
        return [b.op("Pad", [_g(gy), b.ints(static)], like=x)] + rest
    shape = b.shape_of(x)
    dims = b.op("Gather", [shape, b.ints(axes_v)], axis=0)
    zero = b.ints([0])

    def normalize(idx):
        idx = b.op("Cast", [idx], to=onnx.TensorProto.INT64)
        neg = b.op("Less", [idx, zero])
        idx = b.op("Where", [neg, b.op("Add", [idx, dims]), idx])
        return b.op("Min", [b.op("Max", [idx, zero]), dims])

    s = normalize(starts)
    e = b.op("Max", [normalize(ends), s])
    before = b.op("ScatterElements", [b.ints([0] * r), b.ints(axes_v), s], axis=0)
    after = b.op("ScatterElements", [b.ints([0] * r), b.ints(axes_v), b.op("Sub", [dims, e])], axis=0)
    pads = b.op("Concat", [before, after], axis=0)
    return [b.op("Pad", [_g(gy), pads], like=x)] + rest


def _strided_slice_gradient(b, x, g, starts, ends, axes, steps):
    """Axis by axis: the positions along the axis that the slice took are Slice(Range(0, n)) with the
    same start, end and step; scatter the gradient there into zeros of the input's extent."""
    r = b.view.rank(x)
    dt = b.view.dtype(x)
    i64 = onnx.TensorProto.INT64
    shape = list(b.view.shape(g) or [None] * r)
    x_shape = b.view.shape(x) or [None] * r
    for pos, axis in enumerate(axes):
        n = b.op("Gather", [b.shape_of(x), b.ints([axis])], axis=0)
        positions = b.op("Range", [b.ints(0), b.op("Squeeze", [n, b.ints([0])]), b.ints(1)])

        def piece(t):
            return b.op("Cast", [b.op("Gather", [t, b.ints([pos])], axis=0)], to=i64)

        taken = b.op("Slice", [positions, piece(starts), piece(ends), b.ints([0]), piece(steps)],
                     dtype=i64, shape=[None])
        index_shape = [1] * r
        index_shape[axis] = -1
        index = b.op("Expand", [b.op("Reshape", [taken, b.ints(index_shape)]), b.shape_of(g)],
                     dtype=i64, shape=list(shape))
        g_shape = b.shape_of(g)
        target = b.op("ScatterElements", [g_shape, b.ints([axis]), n], axis=0)
        zero = onnx.helper.make_tensor("value", dt, [1], [0])
        shape[axis] = x_shape[axis]
        zeros = b.op("ConstantOfShape", [target], value=zero, dtype=dt, shape=list(shape))
        g = b.op("ScatterElements", [zeros, index, g], axis=axis, dtype=dt, shape=list(shape))
    b.view.info[g] = b.view.info.get(x)
    return g


def _static_slice_pads(b, x, starts, ends, axes):
    """Pads known at conversion time: constant starts/ends on axes of static size."""
    sv, ev, shape = b.view.value(starts), b.view.value(ends), b.view.shape(x)
    if sv is None or ev is None or shape is None or any(not isinstance(shape[a], int) for a in axes):
        return None
    before, after = [0] * len(shape), [0] * len(shape)
    for a, s0, e0 in zip(axes, np.asarray(sv).reshape(-1), np.asarray(ev).reshape(-1)):
        dim = shape[a]
        s1, e1 = (int(v) + dim if v < 0 else int(v) for v in (s0, e0))
        s1, e1 = min(max(s1, 0), dim), min(max(e1, 0), dim)
        before[a], after[a] = s1, dim - max(e1, s1)
    return before + after


@register("Gather")
def _gather(b, node, gy, wants):
    """Scatter-add the gradient back into a zero tensor of the data's shape."""
    data, indices = node.input[0], node.input[1]
    axis = attr(node, "axis", 0) % b.view.rank(data)
    g = _g(gy)
    idx_rank = b.view.rank(indices)
    r = b.view.rank(data)
    if idx_rank is None:
        raise NotImplementedError("Gather on the relevance path with indices of unknown rank")
    if idx_rank == 0:
        g = b.op("Unsqueeze", [g, b.ints([axis])])
        idx = b.op("Reshape", [indices, b.ints([1])])
    elif idx_rank == 1:
        idx = indices
    else:  # the index axes of g are consecutive (at `axis`): flatten them into one
        data_shape = b.shape_of(data)
        flat_shape = b.op("Concat", [b.op("Slice", [data_shape, b.ints([0]), b.ints([axis])]), b.ints([-1]),
                                     b.op("Slice", [data_shape, b.ints([axis + 1]), b.ints([r])])], axis=0)
        g = b.op("Reshape", [g, flat_shape], dtype=b.view.dtype(g), shape=[None] * r)
        idx = b.op("Reshape", [indices, b.ints([-1])])
    if b.opset < SCATTER_ADD_OPSET and idx_rank > 0:
        return [_gather_vjp_by_one_hot(b, data, idx, g, axis, r), None]
    idx_shape = [1] * r
    idx_shape[axis] = -1
    idx = b.op("Expand", [b.op("Reshape", [idx, b.ints(idx_shape)]), b.shape_of(g)])
    # a scalar index selects one slice: no index repeats, a plain scatter is exact below opset 16 too
    add = {"reduction": "add"} if b.opset >= SCATTER_ADD_OPSET else {}
    out = b.op("ScatterElements", [b.zeros_like(data), idx, g], axis=axis, like=data, **add)
    return [out, None]


SCATTER_ADD_OPSET = 16  # ScatterElements / ScatterND take reduction="add" from opset 16 on


def _gather_vjp_by_one_hot(b, data, idx, g, axis, r):
    """Below opset 16 (no scatter-add): the gradient of a Gather along `axis` with M (flattened) indices
    into N slices is OneHot(idx, N)ᵀ [N, M] @ g with `axis` moved first and the rest flattened
    [M, rest]; repeated indices add up. Negative indices count from the end, as Gather's do."""
    dt = b.view.dtype(data)
    n = b.op("Slice", [b.shape_of(data), b.ints([axis]), b.ints([axis + 1])])
    idx = b.op("Cast", [idx], to=onnx.TensorProto.INT64, dtype=onnx.TensorProto.INT64, shape=[None])  # int32 too
    idx = b.op("Where", [b.op("Less", [idx, b.ints([0])]), b.op("Add", [idx, n]), idx])
    perm = [axis] + [k for k in range(r) if k != axis]
    inverse = [perm.index(k) for k in range(r)]
    g_first = b.op("Transpose", [g], perm=perm, dtype=dt, shape=[None] * r)
    rows = b.op("Reshape", [g_first, b.ints([0, -1])], dtype=dt, shape=[None, None])
    slots = b.op("Unsqueeze", [b.op("Range", [b.ints(0), b.op("Squeeze", [n, b.ints([0])]), b.ints(1)]),
                               b.ints([1])])  # [N, 1]
    one_hot = b.op("Cast", [b.op("Equal", [slots, b.op("Unsqueeze", [idx, b.ints([0])])])], to=dt,
                   dtype=dt, shape=[None, None])  # [N, M] (onnxruntime's OneHot lacks most types)
    summed = b.op("MatMul", [one_hot, rows], dtype=dt, shape=[None, None])
    data_first = b.op("Transpose", [data], perm=perm, dtype=dt, shape=[None] * r)
    out = b.op("Reshape", [summed, b.shape_of(data_first)], dtype=dt, shape=[None] * r)
    return b.op("Transpose", [out], perm=inverse, like=data)


@register("GatherElements")
def _gather_elements(b, node, gy, wants):
    data, indices = node.input[0], node.input[1]
    axis = attr(node, "axis", 0)
    if b.opset < SCATTER_ADD_OPSET:
        raise NotImplementedError(f"GatherElements on the relevance path below opset {SCATTER_ADD_OPSET} "
                                  f"(its gradient is a scatter-add; re-export at opset >= {SCATTER_ADD_OPSET})")
    out = b.op("ScatterElements", [b.zeros_like(data), indices, _g(gy)], axis=axis, reduction="add", like=data)
    return [out, None]


@register("GatherND")
def _gather_nd(b, node, gy, wants):
    """Scatter-add the gradient back into a zero tensor of the data's shape (indices may repeat)."""
    if attr(node, "batch_dims", 0):
        raise NotImplementedError("GatherND with batch_dims > 0 on the relevance path")
    data, indices = node.input[0], node.input[1]
    if b.opset < SCATTER_ADD_OPSET:
        raise NotImplementedError(f"GatherND on the relevance path below opset {SCATTER_ADD_OPSET} "
                                  f"(its gradient is a scatter-add; re-export at opset >= {SCATTER_ADD_OPSET})")
    out = b.op("ScatterND", [b.zeros_like(data), indices, _g(gy)], reduction="add", like=data)
    return [out, None]


@register("ScatterElements")
def _scatter_elements(b, node, gy, wants):
    """out = data with `updates` written (or added) at `indices` along `axis`. The updates get the
    gradient at the positions they went to; the data gets it where nothing overwrote it. (Repeated
    indices without reduction are undefined behaviour in ONNX; exporters write unique ones.)"""
    return _scatter_vjp(b, node, gy, wants, gather="GatherElements", axis=attr(node, "axis", 0))


@register("ScatterND")
def _scatter_nd(b, node, gy, wants):
    return _scatter_vjp(b, node, gy, wants, gather="GatherND", axis=None)


def _scatter_vjp(b, node, gy, wants, gather: str, axis):
    data, indices, updates = node.input
    reduction = attr(node, "reduction", "none")
    reduction = reduction.decode() if isinstance(reduction, bytes) else reduction
    if reduction not in ("none", "add"):
        raise NotImplementedError(f"{node.op_type} with reduction '{reduction}'")
    g = _g(gy)
    axis_attr = {} if axis is None else {"axis": axis}
    out = [None, None, None]
    if wants[0]:
        out[0] = g if reduction == "add" else \
            b.op(node.op_type, [g, indices, b.zeros_like(updates)], like=data, **axis_attr)
    if wants[2]:
        out[2] = b.op(gather, [g, indices], like=updates, **axis_attr)
    return out


@register("TopK")
def _top_k(b, node, gy, wants):
    """The selected values' gradient goes back to where they were taken from; the rest get zero.
    The indices output is an integer routing decision: no gradient."""
    x = node.input[0]
    g_values = gy[0]
    out = [None] * len(node.input)
    if g_values is not None and wants[0]:
        out[0] = b.op("ScatterElements", [b.zeros_like(x), node.output[1], g_values],
                      axis=attr(node, "axis", -1), like=x)
    return out


@register("Where")
def _where(b, node, gy, wants):
    cond, x, y = node.input
    g = _g(gy)
    zero = b.scalar_like(0.0, g)
    out = [None, None, None]
    if wants[1]:
        out[1] = b.unbroadcast(b.op("Where", [cond, g, zero], like=g), x)
    if wants[2]:
        out[2] = b.unbroadcast(b.op("Where", [cond, zero, g], like=g), y)
    return out


# -- arithmetic -------------------------------------------------------------------------------------
@register("Add")
def _add(b, node, gy, wants):
    g = _g(gy)
    return [b.unbroadcast(g, t) if w else None for t, w in zip(node.input, wants)]


@register("Sum")
def _sum(b, node, gy, wants):
    """Variadic, broadcasting: each input gets the gradient summed down to its shape."""
    return _add(b, node, gy, wants)


@register("Sub")
def _sub(b, node, gy, wants):
    g = _g(gy)
    ga = b.unbroadcast(g, node.input[0]) if wants[0] else None
    gb = b.unbroadcast(b.neg(g), node.input[1]) if wants[1] else None
    return [ga, gb]


@register("Neg")
def _neg(b, node, gy, wants):
    return [b.neg(_g(gy))]


@register("Mul")
def _mul(b, node, gy, wants):
    a, c = node.input
    g = _g(gy)
    ga = b.unbroadcast(b.mul(g, c, like=g), a) if wants[0] else None
    gc = b.unbroadcast(b.mul(g, a, like=g), c) if wants[1] else None
    return [ga, gc]


@register("Div")
def _div(b, node, gy, wants):
    a, c = node.input
    g = _g(gy)
    ga = gc = None
    gdiv = b.op("Div", [g, c], like=g)
    if wants[0]:
        ga = b.unbroadcast(gdiv, a)
    if wants[1]:  # d(a/c)/dc = -(a/c)/c
        gc = b.unbroadcast(b.neg(b.mul(gdiv, node.output[0], like=g)), c)
    return [ga, gc]


@register("Sqrt")
def _sqrt(b, node, gy, wants):
    y = node.output[0]
    return [b.op("Div", [_g(gy), b.mul(y, b.scalar_like(2.0, y))], like=y)]


@register("Reciprocal")
def _reciprocal(b, node, gy, wants):
    y = node.output[0]
    return [b.neg(b.mul(_g(gy), b.mul(y, y)))]


@register("Exp")
def _exp(b, node, gy, wants):
    return [b.mul(_g(gy), node.output[0])]


@register("Log")
def _log(b, node, gy, wants):
    return [b.op("Div", [_g(gy), node.input[0]], like=node.input[0])]


@register("Tanh")
def _tanh(b, node, gy, wants):
    y = node.output[0]
    one = b.scalar_like(1.0, y)
    return [b.mul(_g(gy), b.op("Sub", [one, b.mul(y, y)], like=y))]


@register("Sigmoid")
def _sigmoid(b, node, gy, wants):
    y = node.output[0]
    one = b.scalar_like(1.0, y)
    return [b.mul(_g(gy), b.mul(y, b.op("Sub", [one, y], like=y)))]


@register("Relu")
def _relu(b, node, gy, wants):
    x = node.input[0]
    positive = b.op("Greater", [x, b.scalar_like(0.0, x)])
    return [b.op("Where", [positive, _g(gy), b.scalar_like(0.0, x)], like=x)]


@register("Erf")
def _erf(b, node, gy, wants):
    x = node.input[0]
    x2 = b.mul(x, x)
    local = b.mul(b.op("Exp", [b.neg(x2)], like=x), b.scalar_like(2.0 / math.sqrt(math.pi), x))
    return [b.mul(_g(gy), local)]


@register("Gelu")
def _gelu(b, node, gy, wants):
    tanh_form = attr(node, "approximate", "none") in ("tanh", b"tanh")
    return [b.mul(_g(gy), gelu_derivative(b, node.input[0], tanh_form))]


def gelu_derivative(b: Builder, x: str, tanh_form: bool) -> str:
    if tanh_form:
        # y = 0.5 x (1 + tanh(u)), u = c (x + 0.044715 x^3)
        c = math.sqrt(2.0 / math.pi)
        x2 = b.mul(x, x)
        u = b.mul(b.scalar_like(c, x), b.mul(x, b.add(b.scalar_like(1.0, x), b.mul(x2, b.scalar_like(0.044715, x)))))
        t = b.op("Tanh", [u], like=x)
        du = b.mul(b.scalar_like(c, x), b.add(b.scalar_like(1.0, x), b.mul(x2, b.scalar_like(3 * 0.044715, x))))
        one_minus_t2 = b.op("Sub", [b.scalar_like(1.0, x), b.mul(t, t)], like=x)
        local = b.add(b.mul(b.scalar_like(0.5, x), b.add(b.scalar_like(1.0, x), t)),
                      b.mul(b.mul(b.scalar_like(0.5, x), x), b.mul(one_minus_t2, du)))
    else:
        cdf = b.mul(b.scalar_like(0.5, x), b.add(b.scalar_like(1.0, x),
                                                 b.op("Erf", [b.mul(x, b.scalar_like(1 / math.sqrt(2), x))], like=x)))
        pdf = b.mul(b.op("Exp", [b.mul(b.mul(x, x), b.scalar_like(-0.5, x))], like=x),
                    b.scalar_like(1 / math.sqrt(2 * math.pi), x))
        local = b.add(cdf, b.mul(x, pdf))
    return local


# -- reductions and normalizations ----------------------------------------------------------------
@register("ReduceSum")
def _reduce_sum(b, node, gy, wants):
    g, _ = expand_reduced(b, node, _g(gy))
    return [g] + [None] * (len(node.input) - 1)


@register("ReduceMean")
def _reduce_mean(b, node, gy, wants):
    g, axes = expand_reduced(b, node, _g(gy))
    rest = [None] * (len(node.input) - 1)
    if not axes:
        return [g] + rest
    x = node.input[0]
    shape = b.view.shape(x)
    dims = [shape[a] for a in axes] if shape else [None]
    if all(isinstance(d, int) for d in dims):
        return [b.scale(g, 1.0 / float(np.prod(dims)))] + rest
    count = b.op("ReduceProd", [b.op("Gather", [b.shape_of(x), b.ints(axes)], axis=0)], keepdims=0)
    count = b.op("Cast", [count], to=b.view.dtype(x))
    return [b.op("Div", [g, count], like=x)] + rest


@register("Softmax")
def _softmax(b, node, gy, wants):
    y = node.output[0]
    axis = attr(node, "axis", -1)
    gyy = b.mul(_g(gy), y)
    s = b.op("ReduceSum", [gyy, b.ints([axis])], keepdims=1)
    return [b.mul(y, b.op("Sub", [_g(gy), s], like=y))]


@register("LogSoftmax")
def _log_softmax(b, node, gy, wants):
    y = node.output[0]
    axis = attr(node, "axis", -1)
    s = b.op("ReduceSum", [_g(gy), b.ints([axis])], keepdims=1)
    return [b.op("Sub", [_g(gy), b.mul(b.op("Exp", [y], like=y), s)], like=y)]


@register_norm("LayerNormalization", "SimplifiedLayerNormalization", "RMSNormalization")
def _norm(b, node, gy, wants, constant_std):
    """LayerNormalization; RMSNormalization (opset 23) and onnxruntime's SimplifiedLayerNormalization
    (both x / rms(x) * scale, over the axes from `axis` on)."""
    x, scale = node.input[0], node.input[1]
    rms = node.op_type in ("SimplifiedLayerNormalization", "RMSNormalization")
    gx = normalize_vjp(b, x, scale, gy[0], attr(node, "axis", -1), attr(node, "epsilon", 1e-5), rms, constant_std)
    return [gx] + [None] * (len(node.input) - 1)


@register_norm("SkipLayerNormalization", "SkipSimplifiedLayerNormalization")
def _skip_norm(b, node, gy, wants, constant_std):
    """y = norm(input + skip (+ bias)); output 3, if used, is that sum. The backward reads output 3 where
    the node has it (one saved tensor, not input and skip: the forward keeps it for the next layer)."""
    x, skip = node.input[0], node.input[1]
    rms = node.op_type == "SkipSimplifiedLayerNormalization"
    bias_index = 3 if rms else 4
    if len(node.output) > 3 and node.output[3] and b.view.shape(node.output[3]) == b.view.shape(x):
        total = node.output[3]
    else:
        total = b.add(x, skip, like=x) if b.view.rank(x) >= b.view.rank(skip) else b.add(skip, x, like=skip)
        if len(node.input) > bias_index and node.input[bias_index]:
            total = b.add(total, node.input[bias_index], like=total)
    terms = []
    if gy[0] is not None:
        terms.append(normalize_vjp(b, total, node.input[2], gy[0], -1, attr(node, "epsilon", 1e-5), rms,
                                   constant_std))
    if len(gy) > 3 and gy[3] is not None:
        terms.append(gy[3])
    g = b.sum(terms)
    out = [None] * len(node.input)
    out[0] = b.unbroadcast(g, x) if wants[0] else None
    out[1] = b.unbroadcast(g, skip) if wants[1] else None
    return out


# -- linear algebra -----------------------------------------------------------------------------
def _weight_2d(b, t) -> bool:
    return b.view.rank(t) == 2 and b.view.is_constant(t)


def weight_input_gradient(b, g, w, like, trans_w: int = 0, alpha: float = 1.0) -> str:
    """g @ op(W)^T shaped like `like`, for a constant 2-D weight W read by a forward product x @ op(W)
    (op(W) = W^T when trans_w), as Transpose(Gemm(W, g2, transA=trans_w, transB=1)) = (op(W) g2^T)^T,
    g2 being g flattened to [rows, out features]. W is the original tensor (no transposed copy), and it is
    the product's first operand: OpenVINO's CPU plugin (2026.4) computes g @ W^T wrongly when the same
    square constant W also feeds a product as its second operand (the forward), whether written
    MatMul(g, Transpose(W)) or Gemm(g, W, transB=1); the product with W first is computed correctly. In
    onnxruntime this reads the weight in place as the other orders do (tools/bench.py: no slower)."""
    dt = b.view.dtype(g)
    if b.view.rank(w) != 2:
        raise ValueError(f"weight_input_gradient: {w} is not a 2-D weight")
    g_in = g
    n = b.view.shape(w)[0 if trans_w else 1]
    if b.view.rank(g) != 2:
        if isinstance(n, int):
            g = b.op("Reshape", [g, b.ints([-1, n])], dtype=dt, shape=[None, n])
        else:
            g = b.op("Reshape", [g, b.op("Concat", [b.ints([-1]), b.op(
                "Gather", [b.shape_of(w), b.ints([0 if trans_w else 1])], axis=0)], axis=0)], dtype=dt, shape=[None, None])
    k = b.view.shape(w)[1 if trans_w else 0]
    extra = {"alpha": float(alpha)} if alpha != 1.0 else {}
    prod = b.op("Gemm", [w, g], transA=trans_w, transB=1, dtype=dt, shape=[k, None], **extra)
    out = b.op("Transpose", [prod], perm=[1, 0], dtype=dt, shape=[None, k])
    if b.view.rank(like) == 2:
        return out
    if isinstance(k, int) and b.view.rank(g_in) == b.view.rank(like):  # not by a Shape of `like`
        return b.reshape_leading(out, g_in, k, shape=b.view.shape(like))
    return b.reshape_like(out, like)


@register("MatMul")
def _matmul(b, node, gy, wants):
    a, w = node.input
    g = _g(gy)
    ra, rw = b.view.rank(a), b.view.rank(w)
    if ra is None or rw is None or ra < 2 or rw < 2:
        raise NotImplementedError("MatMul on the relevance path with operands of rank < 2 or unknown rank")
    ga = gw = None
    if wants[0]:
        if _weight_2d(b, w) and ra >= 2:
            ga = weight_input_gradient(b, g, w, a)
        else:
            ga = b.unbroadcast(b.op("MatMul", [g, b.transpose_last2(w)], dtype=b.view.dtype(g),
                                    shape=_matmul_shape(b, g, w, trans_b=True)), a)
    if wants[1]:
        gw = b.unbroadcast(b.op("MatMul", [b.transpose_last2(a), g], dtype=b.view.dtype(g),
                                shape=_matmul_shape(b, a, g, trans_a=True)), w)
    return [ga, gw]


def _matmul_shape(b, x, y, trans_a=False, trans_b=False):
    sx, sy = b.view.shape(x), b.view.shape(y)
    if sx is None or sy is None:
        return None
    m = sx[-1] if trans_a else sx[-2]
    n = sy[-2] if trans_b else sy[-1]
    bx, by = sx[:-2], sy[:-2]
    if len(bx) < len(by):
        bx = [1] * (len(by) - len(bx)) + bx
    if len(by) < len(bx):
        by = [1] * (len(bx) - len(by)) + by
    batch = [p if q == 1 else q if p == 1 else p for p, q in zip(bx, by)]
    return batch + [m, n]


@register("Gemm")
def _gemm(b, node, gy, wants):
    a, w = node.input[0], node.input[1]
    c = node.input[2] if len(node.input) > 2 else ""
    alpha, beta = attr(node, "alpha", 1.0), attr(node, "beta", 1.0)
    ta, tb = attr(node, "transA", 0), attr(node, "transB", 0)
    g = _g(gy)
    out = [None] * len(node.input)
    if wants[0]:
        if ta:
            out[0] = b.op("Gemm", [w, g], transA=tb, transB=1, alpha=alpha, like=a)
        elif _weight_2d(b, w):
            out[0] = weight_input_gradient(b, g, w, a, trans_w=tb, alpha=alpha)
        else:
            out[0] = b.op("Gemm", [g, w], transB=1 - tb, alpha=alpha, like=a)
    if wants[1]:
        if tb:
            out[1] = b.op("Gemm", [g, a], transA=1, transB=ta, alpha=alpha, like=w)
        else:
            out[1] = b.op("Gemm", [a, g], transA=1 - ta, alpha=alpha, like=w)
    if c and len(wants) > 2 and wants[2]:
        out[2] = b.unbroadcast(b.scale(g, beta), c)
    return out


@register("Einsum")
def _einsum(b, node, gy, wants):
    eq = attr(node, "equation")
    eq = eq.decode() if isinstance(eq, bytes) else eq
    eq = eq.replace(" ", "")
    if "->" not in eq:
        raise NotImplementedError(f"Einsum '{eq}' (implicit output)")
    lhs, out_sub = eq.split("->")
    subs = lhs.split(",")
    ellipsis = "..." in eq
    if ellipsis and any(("..." in s) != ("..." in out_sub) for s in subs):
        raise NotImplementedError(f"Einsum '{eq}': an ellipsis summed out")
    g = _g(gy)
    grads = []
    for i, (t, w) in enumerate(zip(node.input, wants)):
        if not w:
            grads.append(None)
            continue
        others = [(s, x) for j, (s, x) in enumerate(zip(subs, node.input)) if j != i]
        letters = subs[i].replace("...", "")
        available = set(out_sub).union(*[set(s) for s, _ in others])
        if set(letters) - available or len(set(letters)) != len(letters):
            raise NotImplementedError(f"Einsum '{eq}': operand {i} sums out an index of its own")
        sub_eq = ",".join([out_sub] + [s for s, _ in others]) + "->" + subs[i]
        if not ellipsis:
            grads.append(b.op("Einsum", [g] + [x for _, x in others], equation=sub_eq, like=t))
            continue
        # the ellipsis dims may broadcast between operands: the gradient has their broadcast extent,
        # summed back to the operand's own
        grad = b.op("Einsum", [g] + [x for _, x in others], equation=sub_eq, dtype=b.view.dtype(t),
                    shape=[None] * b.view.rank(t) if b.view.rank(t) is not None else None)
        grads.append(b.unbroadcast(grad, t))
    return grads


# The other VJP modules register on import (they import only vjp.registry, builder and graph).
from . import elementwise  # noqa: E402,F401
