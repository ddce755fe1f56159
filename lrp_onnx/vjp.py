"""Vector-Jacobian products of ONNX ops, one small registered function per op.

Each function receives the builder, the forward node, the gradients of the node's outputs (None
where an output carries no gradient) and which inputs want a gradient; it returns one gradient
name (or None) per input. These are the exact derivatives: the LRP rules in `rules.py` reuse them
and change only the local Jacobians that AttnLRP modifies.
"""
from __future__ import annotations

import functools
import math

import numpy as np
import onnx

from .builder import Builder
from .graph import attr

VJPS: dict = {}


def register(*op_types: str, domain: str = ""):
    def deco(fn):
        for op in op_types:
            VJPS[(domain, op)] = fn
        return fn
    return deco


def lookup(node: onnx.NodeProto):
    domain = "" if node.domain in ("", "ai.onnx") else node.domain
    return VJPS.get((domain, node.op_type))


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
    """Pad the gradient back to the input's extent (steps of 1 only)."""
    x = node.input[0]
    r = b.view.rank(x)
    starts, ends = node.input[1], node.input[2]
    axes = node.input[3] if len(node.input) > 3 and node.input[3] else None
    steps = node.input[4] if len(node.input) > 4 and node.input[4] else None
    if steps is not None:
        sv = b.view.value(steps)
        if sv is None or not np.all(sv == 1):
            raise NotImplementedError("Slice with steps other than 1")
    if axes is None:
        n = b.view.shape(starts)
        axes_v = np.arange(n[0] if n and isinstance(n[0], int) else r)
    else:
        axes_v = b.view.value(axes)
        if axes_v is None:
            raise NotImplementedError("Slice with runtime axes")
    axes_v = [int(a) % r for a in np.asarray(axes_v).reshape(-1)]
    static = _static_slice_pads(b, x, starts, ends, axes_v)
    if static is not None:
        return [b.op("Pad", [_g(gy), b.ints(static)], like=x)] + [None] * (len(node.input) - 1)
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
    return [b.op("Pad", [_g(gy), pads], like=x)] + [None] * (len(node.input) - 1)


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
    if idx_rank == 0:
        g = b.op("Unsqueeze", [g, b.ints([axis])])
        idx = b.op("Reshape", [indices, b.ints([1])])
    elif idx_rank == 1:
        idx = indices
    else:
        raise NotImplementedError("Gather on the relevance path with indices of rank > 1")
    r = b.view.rank(data)
    idx_shape = [1] * r
    idx_shape[axis] = -1
    idx = b.op("Expand", [b.op("Reshape", [idx, b.ints(idx_shape)]), b.shape_of(g)])
    out = b.op("ScatterElements", [b.zeros_like(data), idx, g], axis=axis, reduction="add", like=data)
    return [out, None]


@register("GatherElements")
def _gather_elements(b, node, gy, wants):
    data, indices = node.input[0], node.input[1]
    axis = attr(node, "axis", 0)
    out = b.op("ScatterElements", [b.zeros_like(data), indices, _g(gy)], axis=axis, reduction="add", like=data)
    return [out, None]


@register("GatherND")
def _gather_nd(b, node, gy, wants):
    """Scatter-add the gradient back into a zero tensor of the data's shape (indices may repeat)."""
    if attr(node, "batch_dims", 0):
        raise NotImplementedError("GatherND with batch_dims > 0 on the relevance path")
    data, indices = node.input[0], node.input[1]
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


@register("Pow")
def _pow(b, node, gy, wants):
    x, p = node.input
    g = _g(gy)
    if wants[1]:
        raise NotImplementedError("Pow with a relevance-carrying exponent")
    pv = b.view.scalar(p)
    if pv == 2:
        local = b.mul(x, b.scalar_like(2.0, x), like=x)
    else:
        p_x = b.cast_like(p, x) if b.view.dtype(p) != b.view.dtype(x) else p
        local = b.mul(p_x, b.op("Pow", [x, b.op("Sub", [p_x, b.scalar_like(1.0, x)])]), like=x)
    return [b.unbroadcast(b.mul(g, local, like=g), x), None]


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
def _reduce_axes(b, node):
    axes = attr(node, "axes")
    if axes is None and len(node.input) > 1 and node.input[1]:
        v = b.view.value(node.input[1])
        if v is None:
            raise NotImplementedError(f"{node.op_type} with runtime axes")
        axes = [int(a) for a in np.asarray(v).reshape(-1)]
    r = b.view.rank(node.input[0])
    if not axes:
        return list(range(r))
    return [a % r for a in axes]


def _expand_reduced(b, node, g):
    axes = _reduce_axes(b, node)
    if not attr(node, "keepdims", 1):
        g = b.op("Unsqueeze", [g, b.ints(axes)])
    return b.op("Expand", [g, b.shape_of(node.input[0])], like=node.input[0]), axes


@register("ReduceSum")
def _reduce_sum(b, node, gy, wants):
    g, _ = _expand_reduced(b, node, _g(gy))
    return [g] + [None] * (len(node.input) - 1)


@register("ReduceMean")
def _reduce_mean(b, node, gy, wants):
    g, axes = _expand_reduced(b, node, _g(gy))
    x = node.input[0]
    shape = b.view.shape(x)
    dims = [shape[a] for a in axes] if shape else [None]
    if all(isinstance(d, int) for d in dims):
        return [b.scale(g, 1.0 / float(np.prod(dims)))] + [None] * (len(node.input) - 1)
    count = b.op("ReduceProd", [b.op("Gather", [b.shape_of(x), b.ints(axes)], axis=0)], keepdims=0)
    count = b.op("Cast", [count], to=b.view.dtype(x))
    return [b.op("Div", [g, count], like=x)] + [None] * (len(node.input) - 1)


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


def normalize_vjp(b: Builder, x: str, scale: str, g: str, axis: int, eps: float, rms: bool,
                  constant_std: bool) -> str:
    """Gradient at x of y = norm(x) * scale (+ bias), normalizing over axes [axis, rank).

    LayerNorm: norm(x) = (x - mean) * invstd; RMSNorm: norm(x) = x * invrms. With constant_std
    (AttnLRP's norm rule) invstd / invrms is held constant: only the centring is differentiated."""
    r = b.view.rank(x)
    axes = list(range(axis % r, r))

    def mean_over(t):
        if b.opset >= 18:
            return b.op("ReduceMean", [t, b.ints(axes)], keepdims=1, like=t)
        return b.op("ReduceMean", [t], keepdims=1, axes=axes, like=t)

    gs = b.unbroadcast(b.mul(g, scale, like=g), x) if b.view.rank(scale) == r else b.mul(g, scale, like=g)
    centred = x if rms else b.op("Sub", [x, mean_over(x)], like=x)
    var = mean_over(b.mul(centred, centred))
    inv = b.op("Reciprocal", [b.op("Sqrt", [b.add(var, b.scalar_like(eps, x))], like=var)], like=var)
    inner = gs if rms else b.op("Sub", [gs, mean_over(gs)], like=x)
    if not constant_std:
        xhat = b.mul(centred, inv, like=x)
        inner = b.op("Sub", [inner, b.mul(xhat, mean_over(b.mul(gs, xhat, like=x)))], like=x)
    return b.mul(inner, inv, like=x)


NORM_VJPS: dict = {}  # op type -> fn(b, node, gy, wants, constant_std)


def register_norm(*op_types: str):
    """Register a norm's VJP both as its exact gradient and for the constant_std rule."""
    def deco(fn):
        for op in op_types:
            NORM_VJPS[op] = fn
            for domain in ("", "com.microsoft"):  # onnxruntime registers some of these in both
                VJPS[(domain, op)] = functools.partial(fn, constant_std=False)
        return fn
    return deco


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
    """y = norm(input + skip (+ bias)); output 3, if used, is that sum."""
    x, skip = node.input[0], node.input[1]
    rms = node.op_type == "SkipSimplifiedLayerNormalization"
    bias_index = 3 if rms else 4
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
            # g @ W^T without a transposed copy of W: Gemm reads the original initializer.
            n = b.view.shape(w)[1]
            g2 = b.op("Reshape", [g, b.ints([-1, n if isinstance(n, int) else 0])])
            if not isinstance(n, int):
                g2 = b.op("Reshape", [g, b.op("Concat", [b.ints([-1]), b.op(
                    "Gather", [b.shape_of(w), b.ints([1])], axis=0)], axis=0)])
            prod = b.op("Gemm", [g2, w], transB=1, dtype=b.view.dtype(g))
            ga = b.reshape_like(prod, a)
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
    if "->" not in eq or "." in eq:
        raise NotImplementedError(f"Einsum '{eq}' (implicit output or ellipsis)")
    lhs, out_sub = eq.split("->")
    subs = lhs.split(",")
    g = _g(gy)
    grads = []
    for i, (t, w) in enumerate(zip(node.input, wants)):
        if not w:
            grads.append(None)
            continue
        others = [(s, x) for j, (s, x) in enumerate(zip(subs, node.input)) if j != i]
        available = set(out_sub).union(*[set(s) for s, _ in others])
        if set(subs[i]) - available or len(set(subs[i])) != len(subs[i]):
            raise NotImplementedError(f"Einsum '{eq}': operand {i} sums out an index of its own")
        sub_eq = ",".join([out_sub] + [s for s, _ in others]) + "->" + subs[i]
        grads.append(b.op("Einsum", [g] + [x for _, x in others], equation=sub_eq, like=t))
    return grads


# -- convolution --------------------------------------------------------------------------------
def conv_geometry(b: Builder, node) -> dict:
    """Kernel, strides, pads, dilations and group of a Conv node, with explicit pads."""
    x, w = node.input[0], node.input[1]
    w_shape = b.view.shape(w)
    spatial = (b.view.rank(x) or 0) - 2
    if spatial < 1 or w_shape is None:
        raise NotImplementedError("Conv with an input or weight of unknown rank")
    kernel = list(attr(node, "kernel_shape", w_shape[2:]))
    auto_pad = attr(node, "auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    if auto_pad not in ("NOTSET", "VALID"):
        raise NotImplementedError(f"Conv with auto_pad={auto_pad}; re-export with explicit pads")
    return dict(kernel=kernel, strides=list(attr(node, "strides", [1] * spatial)),
                pads=list(attr(node, "pads", [0] * 2 * spatial)) if auto_pad == "NOTSET" else [0] * 2 * spatial,
                dilations=list(attr(node, "dilations", [1] * spatial)), group=attr(node, "group", 1))


def conv_input_gradient(b: Builder, node, g: str, w: str) -> str:
    """W^T g for y = Conv(x, w): ConvTranspose with the same weights, strides, pads, dilations and
    group. output_padding restores the trailing input rows a stride skips, so the shape is x's."""
    x = node.input[0]
    geo = conv_geometry(b, node)
    x_shape = b.view.shape(x)
    output_padding = []
    for i, (k, s, d) in enumerate(zip(geo["kernel"], geo["strides"], geo["dilations"])):
        size = x_shape[2 + i] if x_shape is not None else None
        if s == 1:
            output_padding.append(0)
        elif isinstance(size, int):
            pad = geo["pads"][i] + geo["pads"][i + len(geo["kernel"])]
            output_padding.append((size + pad - d * (k - 1) - 1) % s)
        else:
            raise NotImplementedError("strided Conv with a dynamic spatial size (the gradient's "
                                      "output_padding needs the input size)")
    return b.op("ConvTranspose", [g, w], like=x, kernel_shape=geo["kernel"], strides=geo["strides"],
                pads=geo["pads"], dilations=geo["dilations"], group=geo["group"], output_padding=output_padding)


@register("Conv")
def _conv(b, node, gy, wants):
    g = _g(gy)
    out = [None] * len(node.input)
    if wants[0]:
        out[0] = conv_input_gradient(b, node, g, node.input[1])
    if wants[1]:
        raise NotImplementedError("Conv with a relevance-carrying weight")
    if len(node.input) > 2 and wants[2]:  # bias [M]: sum over batch and spatial axes
        r = b.view.rank(g)
        out[2] = b.reduce_sum(g, [0] + list(range(2, r)), keepdims=0)
    return out
