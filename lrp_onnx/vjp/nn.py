"""VJPs of the convolutional-network and tensor-layout ops exporters emit: Conv / ConvTranspose (static
or dynamic spatial sizes, explicit or SAME pads), pools, Resize, BatchNormalization / InstanceNormalization
/ GroupNormalization, the Reduce* family, Tile, Pad, CumSum, DepthToSpace / SpaceToDepth.

Separable linear ops (Resize, AveragePool, Pad in reflect/edge/wrap mode) act on each axis by a matrix
A_k: y = (A_0 ⊗ A_1 ⊗ ...) x. The backward computes each A_k at run time, inside the graph, by
applying the same op with the same attributes to an identity matrix along that axis alone (EyeLike of
a [n, n] ConstantOfShape), and contracts the gradient with A_k along axis k (MatMul after Transpose).
So the backward follows onnxruntime's own coordinate arithmetic for every mode, and static or dynamic
sizes alike; the tests check each mode against finite differences.

Ties (measure zero for continuous inputs, common after Relu): ReduceMax / ReduceMin split the gradient
evenly among tied extrema (as torch.amax / torch.amin do); MaxPool and GlobalMaxPool send it to one
arg-max (MaxPool: the index onnxruntime's MaxPool reports; GlobalMaxPool: the first, as ArgMax and
PyTorch's max pooling pick it)."""
from __future__ import annotations

import itertools

import numpy as np
import onnx
from onnx import helper

from ..ir.builder import Builder
from ..ir.graph import TensorInfo, attr
from .registry import register, register_norm

INT64 = onnx.TensorProto.INT64


def _g(gy):
    return gy[0]


def _s(value) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _dim(b: Builder, t: str, axis: int) -> str:
    """t's size along `axis` as an int64 [1] tensor (a constant when static)."""
    s = b.view.shape(t)
    if s is not None and isinstance(s[axis], int):
        return b.ints([s[axis]])
    return b.op("Gather", [b.shape_of(t), b.ints([axis])], axis=0, dtype=INT64, shape=[1])


def _eye(b: Builder, n: str, like: str) -> str:
    """An [n, n] identity in `like`'s dtype, n an int64 [1] tensor."""
    dt = b.view.dtype(like) or onnx.TensorProto.FLOAT
    square = b.op("ConstantOfShape", [b.op("Concat", [n, n], axis=0)],
                  value=helper.make_tensor("value", dt, [1], [0]), dtype=dt, shape=[None, None])
    return b.op("EyeLike", [square], dtype=dt, shape=[None, None])


def contract_axis(b: Builder, g: str, axis: int, a_t: str, like: str) -> str:
    """out[..., i, ...] = sum_j g[..., j, ...] A[j, i] along `axis`, given A's transpose a_t [n_in, n_out]."""
    r = b.view.rank(g)
    dt = b.view.dtype(g)
    a = b.op("Transpose", [a_t], perm=[1, 0], dtype=dt, shape=[None, None])
    shape = list(b.view.shape(g))
    x_shape = b.view.shape(like)
    shape[axis] = x_shape[axis] if x_shape is not None else None
    if axis == r - 1:
        return b.op("MatMul", [g, a], dtype=dt, shape=shape)
    perm = list(range(r))
    perm[axis], perm[-1] = perm[-1], perm[axis]
    moved = b.op("Transpose", [g, ], perm=perm, dtype=dt, shape=[b.view.shape(g)[p] for p in perm])
    prod = b.op("MatMul", [moved, a], dtype=dt, shape=[shape[p] for p in perm])
    return b.op("Transpose", [prod], perm=perm, dtype=dt, shape=shape)


def _finish(b: Builder, g: str, like: str) -> str:
    b.view.info[g] = TensorInfo(b.view.dtype(like), b.view.shape(like))
    return g


# -- reductions -----------------------------------------------------------------------------------
def reduce_axes(b: Builder, node) -> list[int]:
    """The reduced axes (normalized); [] when none are (no axes and noop_with_empty_axes=1: the
    elementwise part of the reduction still applies, ReduceL1 gives |x|, ReduceSumSquare x²)."""
    axes = attr(node, "axes")
    if axes is None and len(node.input) > 1 and node.input[1]:
        v = b.view.value(node.input[1])
        if v is None:
            raise NotImplementedError(f"{node.op_type} with axes computed at run time")
        axes = [int(a) for a in np.asarray(v).reshape(-1)]
    r = b.view.rank(node.input[0])
    if r is None:
        raise NotImplementedError(f"{node.op_type} on an input of unknown rank")
    if not axes:
        return [] if attr(node, "noop_with_empty_axes", 0) else list(range(r))
    return sorted(a % r for a in axes)


def keep_reduced(b: Builder, node, t: str, axes: list[int]) -> str:
    """A reduced tensor (the output or its gradient) with the reduced axes kept as size 1, so it
    broadcasts against the input."""
    if attr(node, "keepdims", 1) or not axes:
        return t
    x_shape = b.view.shape(node.input[0])
    shape = [1 if i in axes else d for i, d in enumerate(x_shape)] if x_shape is not None else None
    return b.op("Unsqueeze", [t, b.ints(axes)], dtype=b.view.dtype(t), shape=shape)


def expand_reduced(b: Builder, node, g: str):
    """The output gradient broadcast back to the input's shape, and the reduced axes."""
    axes = reduce_axes(b, node)
    if not axes:
        return g, axes
    g = keep_reduced(b, node, g, axes)
    return b.op("Expand", [g, b.shape_of(node.input[0])], like=node.input[0]), axes


def _reduce_vjp(local):
    """Register a reduction whose gradient is (g kept) * local(b, node, x, y kept, axes)."""
    def fn(b, node, gy, wants):
        x = node.input[0]
        rest = [None] * (len(node.input) - 1)
        axes = reduce_axes(b, node)
        g = keep_reduced(b, node, _g(gy), axes)
        y = keep_reduced(b, node, node.output[0], axes)
        return [b.mul(local(b, node, x, y, axes, g), g, like=x)] + rest
    return fn


def _max_local(b, node, x, y, axes, g):
    dt = b.view.dtype(x)
    mask = b.op("Cast", [b.op("Equal", [x, y])], to=dt, like=x)
    if not axes:
        return mask
    count = b.op("ReduceSum", [mask, b.ints(axes)], keepdims=1, dtype=dt, shape=b.view.shape(y))
    return b.op("Div", [mask, count], like=x)


register("ReduceMax", "ReduceMin")(_reduce_vjp(_max_local))
register("ReduceLogSumExp")(_reduce_vjp(
    lambda b, n, x, y, axes, g: b.op("Exp", [b.op("Sub", [x, y], like=x)], like=x)))
register("ReduceLogSum")(_reduce_vjp(
    lambda b, n, x, y, axes, g: b.op("Reciprocal", [b.op("Exp", [y], like=y)], like=y)))
register("ReduceL1")(_reduce_vjp(lambda b, n, x, y, axes, g: b.op("Sign", [x], like=x)))
register("ReduceSumSquare")(_reduce_vjp(lambda b, n, x, y, axes, g: b.mul(x, b.scalar_like(2.0, x), like=x)))


def _prod_local(b, node, x, y, axes, g):
    """The product of the other elements, exact with zeros: y / x where the group has no zero; at the
    single zero of a group with one, the product of the rest; zero where a group has two or more."""
    dt = b.view.dtype(x)
    zero, one = b.scalar_like(0.0, x), b.scalar_like(1.0, x)
    is_zero = b.op("Equal", [x, zero])
    safe = b.op("Where", [is_zero, one, x], like=x)
    ax = b.ints(axes)
    zeros = b.op("ReduceSum", [b.op("Cast", [is_zero], to=dt, like=x), ax], keepdims=1, dtype=dt, shape=b.view.shape(y))
    rest = b.op("ReduceProd", [safe, ax], keepdims=1, dtype=dt, shape=b.view.shape(y))
    no_zero = b.op("Div", [rest, safe], like=x)
    single = b.op("Where", [is_zero, rest, zero], like=x)
    count = b.op("Where", [b.op("Equal", [zeros, one]), single, zero], like=x)
    return b.op("Where", [b.op("Equal", [zeros, zero]), no_zero, count], like=x)


register("ReduceProd")(_reduce_vjp(_prod_local))


def _l2_local(b, node, x, y, axes, g):
    """x / ||x||, defined as 0 where ||x|| = 0 (PyTorch's norm backward)."""
    zero = b.scalar_like(0.0, x)
    return b.op("Where", [b.op("Equal", [y, zero]), zero, b.op("Div", [x, y], like=x)], like=x)


register("ReduceL2")(_reduce_vjp(_l2_local))


# -- normalizations -------------------------------------------------------------------------------
def normalize_vjp(b: Builder, x: str, scale: str | None, g: str, axis: int, eps: float, rms: bool,
                  constant_std: bool) -> str:
    """Gradient at x of y = norm(x) * scale (+ bias), normalizing over axes [axis, rank).

    LayerNorm: norm(x) = (x - mean) * invstd; RMSNorm: norm(x) = x * invrms. With constant_std
    (AttnLRP's norm rule) invstd / invrms is held constant: only the centring is differentiated.
    scale None: already applied to g."""
    r = b.view.rank(x)
    axes = list(range(axis % r, r))

    def mean_over(t):
        if b.opset >= 18:
            return b.op("ReduceMean", [t, b.ints(axes)], keepdims=1, like=t)
        return b.op("ReduceMean", [t], keepdims=1, axes=axes, like=t)

    if scale is None:
        gs = g
    else:
        gs = b.unbroadcast(b.mul(g, scale, like=g), x) if b.view.rank(scale) == r else b.mul(g, scale, like=g)
    centred = x if rms else b.op("Sub", [x, mean_over(x)], like=x)
    var = mean_over(b.mul(centred, centred))
    inv = b.op("Reciprocal", [b.op("Sqrt", [b.add(var, b.scalar_like(eps, x))], like=var)], like=var)
    inner = gs if rms else b.op("Sub", [gs, mean_over(gs)], like=x)
    if not constant_std:
        xhat = b.mul(centred, inv, like=x)
        inner = b.op("Sub", [inner, b.mul(xhat, mean_over(b.mul(gs, xhat, like=x)))], like=x)
    return b.mul(inner, inv, like=x)


def _no_parameter_gradients(node, wants, what="scale, bias"):
    if any(wants[1:]):
        raise NotImplementedError(f"{node.op_type} with a relevance-carrying {what} (only the input's "
                                  f"gradient is implemented)")


def _per_channel(b: Builder, t: str, x: str) -> str:
    """A [C] tensor reshaped to [C, 1, ..., 1] so that it broadcasts along axis 1 of x."""
    r = b.view.rank(x)
    return b.op("Reshape", [t, b.ints([-1] + [1] * (r - 2))], dtype=b.view.dtype(t),
                shape=[None] + [1] * (r - 2))


@register("BatchNormalization")
def _batch_norm(b, node, gy, wants):
    """Inference: y = (x - mean) / sqrt(var + eps) * scale + bias with constant running statistics,
    an affine map of x: the gradient is g * scale / sqrt(var + eps) per channel (axis 1)."""
    if attr(node, "training_mode", 0):
        raise NotImplementedError("BatchNormalization with training_mode=1 (batch statistics): export the "
                                  "model in eval mode")
    if attr(node, "spatial", 1) == 0:
        raise NotImplementedError("BatchNormalization with spatial=0")
    _no_parameter_gradients(node, wants, "scale, bias or running statistics")
    x, scale, var = node.input[0], node.input[1], node.input[4]
    eps = attr(node, "epsilon", 1e-5)
    dt = b.view.dtype(x)
    v = b.op("Cast", [var], to=dt, like=var) if b.view.dtype(var) != dt else var
    s = b.op("Cast", [scale], to=dt, like=scale) if b.view.dtype(scale) != dt else scale
    factor = b.op("Div", [s, b.op("Sqrt", [b.add(v, b.scalar_like(eps, x), like=v)], like=v)], like=s)
    out = [None] * len(node.input)
    out[0] = b.mul(_g(gy), _per_channel(b, factor, x), like=x)
    return out


@register_norm("InstanceNormalization")
def _instance_norm(b, node, gy, wants, constant_std):
    """y = scale[c] (x - mean) / sqrt(var + eps) + bias[c], statistics over the spatial axes of each
    (sample, channel)."""
    _no_parameter_gradients(node, wants)
    x, scale = node.input[0], node.input[1]
    gx = normalize_vjp(b, x, _per_channel(b, scale, x), _g(gy), 2, attr(node, "epsilon", 1e-5), False,
                       constant_std)
    return [gx] + [None] * (len(node.input) - 1)


@register_norm("GroupNormalization")
def _group_norm(b, node, gy, wants, constant_std):
    """Statistics over each group of C / num_groups channels (and the spatial axes) of each sample.
    Opset 21: scale and bias per channel [C]; opset 18 (and onnxruntime's kernel for it): per group
    [num_groups]."""
    _no_parameter_gradients(node, wants)
    x, scale = node.input[0], node.input[1]
    groups = attr(node, "num_groups")
    dt = b.view.dtype(x)
    g = _g(gy)
    if b.opset >= 21:
        g = b.mul(g, _per_channel(b, scale, x), like=x)
    grouped = b.ints([0, groups, -1])
    x3 = b.op("Reshape", [x, grouped], dtype=dt, shape=[None, groups, None])
    g3 = b.op("Reshape", [g, grouped], dtype=dt, shape=[None, groups, None])
    if b.opset < 21:
        g3 = b.mul(g3, b.op("Reshape", [scale, b.ints([groups, 1])], dtype=dt, shape=[groups, 1]), like=g3)
    gx = normalize_vjp(b, x3, None, g3, 2, attr(node, "epsilon", 1e-5), False, constant_std)
    return [b.reshape_like(gx, x)] + [None] * (len(node.input) - 1)


@register_norm("LpNormalization")
def _lp_normalization(b, node, gy, wants, constant_std):
    """y = x / ||x||_p along `axis` (p = 1 or 2). With constant_std the norm is held constant: g / ||x||."""
    x, y = node.input[0], node.output[0]
    p = attr(node, "p", 2)
    if p not in (1, 2):
        raise NotImplementedError(f"LpNormalization with p={p}")
    axis = attr(node, "axis", -1)
    g = _g(gy)
    ax = b.ints([axis])
    op = "ReduceL2" if p == 2 else "ReduceL1"
    norm = b.op(op, [x, ax], keepdims=1, like=x) if b.opset >= 18 else b.op(op, [x], axes=[axis], keepdims=1, like=x)
    if constant_std:
        return [b.op("Div", [g, norm], like=x)]
    direction = y if p == 2 else b.op("Sign", [x], like=x)  # d||x|| / dx
    gy_sum = b.op("ReduceSum", [b.mul(g, y, like=x), ax], keepdims=1, like=x)
    return [b.op("Div", [b.op("Sub", [g, b.mul(direction, gy_sum, like=x)], like=x), norm], like=x)]


@register_norm("MeanVarianceNormalization")
def _mean_variance_normalization(b, node, gy, wants, constant_std):
    """y = (x - mean) / (std + 1e-9) over `axes` (default [0, 2, 3]), std = sqrt(mean((x - mean)^2)), as
    ONNX's function body writes it. With constant_std the std is held constant."""
    x = node.input[0]
    r = b.view.rank(x)
    axes = [a % r for a in attr(node, "axes", [0, 2, 3])]
    g = _g(gy)

    def mean_over(t):
        if b.opset >= 18:
            return b.op("ReduceMean", [t, b.ints(axes)], keepdims=1, like=t)
        return b.op("ReduceMean", [t], keepdims=1, axes=axes, like=t)

    centred = b.op("Sub", [x, mean_over(x)], like=x)
    std = b.op("Sqrt", [mean_over(b.mul(centred, centred))], like=x)
    denom = b.add(std, b.scalar_like(1e-9, x), like=x)
    inner = b.op("Div", [g, denom], like=x)
    gx = b.op("Sub", [inner, mean_over(inner)], like=x)
    if not constant_std:  # d std / dx = centred / (N std); the std's gradient is -sum(g c) / denom^2
        g_std = b.op("Div", [mean_over(b.mul(g, centred, like=x)), b.mul(denom, denom, like=x)], like=x)
        gx = b.op("Sub", [gx, b.mul(b.op("Div", [centred, std], like=x), g_std, like=x)], like=x)
    return [gx]


@register_norm("LRN")
def _local_response_normalization(b, node, gy, wants, constant_std):
    """y = x / d^beta, d = bias + alpha / size * S, S[c] = sum of x^2 over the channels
    [c - floor((size-1)/2), c + ceil((size-1)/2)] (clipped to [0, C)) of each position. The statistic d
    is one of the tensor itself: with constant_std it is held constant (g / d^beta); the gradient adds
    -2 alpha beta / size * x[j] * sum of g x d^(-beta-1) over the channels whose window holds j."""
    x = node.input[0]
    size = attr(node, "size")
    alpha, beta, bias = attr(node, "alpha", 1e-4), attr(node, "beta", 0.75), attr(node, "bias", 1.0)
    r = b.view.rank(x)
    if r is None or r < 3:
        raise NotImplementedError("LRN of an input of unknown rank")
    lo, hi = (size - 1) // 2, size - 1 - (size - 1) // 2
    g = _g(gy)

    def window_sum(t, before, after):
        """sum over t[c - before .. c + after] (zero outside) along the channel axis."""
        pads = [0] * (2 * r)
        pads[1], pads[r + 1] = before, after
        padded = b.op("Pad", [t, b.ints(pads)], mode="constant", dtype=b.view.dtype(t), shape=[None] * r)
        channels = b.op("Slice", [b.shape_of(t), b.ints([1]), b.ints([2])], dtype=INT64, shape=[1])
        parts = [b.op("Slice", [padded, b.ints([k]), b.op("Add", [channels, b.ints([k])], dtype=INT64, shape=[1]),
                                b.ints([1])], like=t) for k in range(before + after + 1)]
        return parts[0] if len(parts) == 1 else b.op("Sum", parts, like=t)

    d = b.add(b.scalar_like(bias, x), b.mul(b.scalar_like(alpha / size, x), window_sum(b.mul(x, x, like=x), lo, hi),
                                             like=x), like=x)
    d_beta = b.op("Pow", [d, b.scalar_like(beta, x)], like=x)
    gx = b.op("Div", [g, d_beta], like=x)
    if not constant_std:  # the statistic's own gradient: each x[j] is in the windows of c in [j - hi, j + lo]
        u = b.op("Div", [b.mul(g, x, like=x), b.mul(d_beta, d, like=x)], like=x)
        v = window_sum(u, hi, lo)
        gx = b.op("Sub", [gx, b.mul(b.scalar_like(2 * alpha * beta / size, x), b.mul(x, v, like=x), like=x)], like=x)
    return [gx]


# -- pooling --------------------------------------------------------------------------------------
def _spatial(b, node) -> int:
    r = b.view.rank(node.input[0])
    if r is None or r < 3:
        raise NotImplementedError(f"{node.op_type} on an input of unknown rank")
    return r - 2


@register("GlobalAveragePool")
def _global_average_pool(b, node, gy, wants):
    x = node.input[0]
    r = b.view.rank(x)
    g = b.op("Expand", [_g(gy), b.shape_of(x)], like=x)
    shape = b.view.shape(x)
    if shape is not None and all(isinstance(d, int) for d in shape[2:]):
        return [b.scale(g, 1.0 / float(np.prod(shape[2:])))]
    count = b.op("ReduceProd", [b.op("Slice", [b.shape_of(x), b.ints([2]), b.ints([r])])], keepdims=0)
    return [b.op("Div", [g, b.op("Cast", [count], to=b.view.dtype(x))], like=x)]


@register("GlobalMaxPool")
def _global_max_pool(b, node, gy, wants):
    """To the first arg-max of each (sample, channel)."""
    x = node.input[0]
    dt = b.view.dtype(x)
    flat = b.op("Reshape", [x, b.ints([0, 0, -1])], dtype=dt, shape=[None, None, None])
    index = b.op("ArgMax", [flat], axis=2, keepdims=1, select_last_index=0)
    g = b.op("Reshape", [_g(gy), b.ints([0, 0, 1])], dtype=dt, shape=[None, None, 1])
    out = b.op("ScatterElements", [b.zeros_like(flat), index, g], axis=2, like=flat)
    return [b.reshape_like(out, x)]


@register("MaxPool")
def _max_pool(b, node, gy, wants):
    """To the arg-max of each window (several windows may pick the same input: the gradients add).
    The backward re-runs the MaxPool with its Indices output (row-major, over the whole tensor)."""
    x = node.input[0]
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute if a.name != "storage_order"}
    dt = b.view.dtype(x)
    _, indices = b.op("MaxPool", [x], n_out=2, **attrs)
    zeros = b.op("Reshape", [b.zeros_like(x), b.ints([-1])], dtype=dt, shape=[None])
    if b.opset >= 16:
        flat_g = b.op("Reshape", [_g(gy), b.ints([-1])], dtype=dt, shape=[None])
        flat_i = b.op("Reshape", [indices, b.ints([-1])], dtype=INT64, shape=[None])
        out = b.op("ScatterElements", [zeros, flat_i, flat_g], axis=0, reduction="add", dtype=dt, shape=[None])
        return [b.reshape_like(out, x)]
    # below opset 16 (no scatter-add): the windows in output positions m apart along each spatial axis,
    # m * stride >= the dilated kernel, are disjoint, so each such group of outputs scatters to distinct
    # inputs; the groups' plain scatters add up
    kernel = attrs["kernel_shape"]
    strides = attrs.get("strides", [1] * len(kernel))
    dilations = attrs.get("dilations", [1] * len(kernel))
    steps = [-(-((k - 1) * d + 1) // s) for k, s, d in zip(kernel, strides, dilations)]
    axes = list(range(2, 2 + len(kernel)))
    parts = []
    for offsets in itertools.product(*[range(m) for m in steps]):
        def pick(t, dtype):
            return b.op("Reshape", [b.op("Slice", [t, b.ints(list(offsets)), b.ints([2 ** 62] * len(axes)), b.ints(axes),
                                                   b.ints(steps)], dtype=dtype, shape=None), b.ints([-1])],
                        dtype=dtype, shape=[None])
        parts.append(b.op("ScatterElements", [zeros, pick(indices, INT64), pick(_g(gy), dt)], axis=0, dtype=dt,
                          shape=[None]))
    out = parts[0] if len(parts) == 1 else b.op("Sum", parts, dtype=dt, shape=[None])
    return [b.reshape_like(out, x)]


def _axis_matrix_pool(b, node, x, axis_k, n):
    """A_kᵀ [n, m] of an AveragePool along spatial axis k: the pool, restricted to that axis, applied
    to an identity laid out as n one-channel 1-D signals."""
    spatial = _spatial(b, node)
    dt = b.view.dtype(x)

    def pick(name, default):
        v = attr(node, name)
        return default if v is None else v

    kernel = attr(node, "kernel_shape")
    one_d = dict(kernel_shape=[kernel[axis_k]], strides=[pick("strides", [1] * spatial)[axis_k]])
    pads = attr(node, "pads")
    if pads is not None:
        one_d["pads"] = [pads[axis_k], pads[axis_k + spatial]]
    dil = attr(node, "dilations")
    if dil is not None:
        one_d["dilations"] = [dil[axis_k]]
    for name in ("ceil_mode", "count_include_pad", "auto_pad") if node.op_type == "AveragePool" else \
            ("ceil_mode", "auto_pad"):
        v = attr(node, name)
        if v is not None:
            one_d[name] = v
    signals = b.op("Unsqueeze", [_eye(b, n, x), b.ints([1])], dtype=dt, shape=[None, 1, None])
    pooled = b.op("AveragePool", [signals], dtype=dt, shape=[None, 1, None], **one_d)
    return b.op("Squeeze", [pooled, b.ints([1])], dtype=dt, shape=[None, None])


@register("LpPool")
def _lp_pool(b, node, gy, wants):
    """y = (sum over the window of |x|^p)^(1/p): gx = sign(x) |x|^(p-1) Sᵀ(g y^(1-p)), S the 0/1 window
    matrix of each axis (where the AveragePool with the same geometry has non-zero weight); zero where
    y = 0."""
    if attr(node, "dilations") is not None and b.opset < 19:
        raise NotImplementedError("LpPool with dilations below opset 19")
    x, y = node.input[0], node.output[0]
    p = float(attr(node, "p", 2))
    zero = b.scalar_like(0.0, x)
    inner = b.mul(_g(gy), b.op("Pow", [y, b.scalar_like(1.0 - p, y)], like=y), like=y)
    g = b.op("Where", [b.op("Equal", [y, zero]), zero, inner], like=y)
    for k in range(_spatial(b, node)):
        axis = 2 + k
        a_t = _axis_matrix_pool(b, node, x, k, _dim(b, x, axis))
        window = b.op("Cast", [b.op("Greater", [a_t, zero])], to=b.view.dtype(x), dtype=b.view.dtype(x),
                      shape=[None, None])
        g = contract_axis(b, g, axis, window, x)
    local = b.mul(b.op("Sign", [x], like=x), b.op("Pow", [b.op("Abs", [x], like=x), b.scalar_like(p - 1.0, x)],
                                                  like=x), like=x)
    return [b.mul(_finish(b, g, x), local, like=x)]


@register("AveragePool")
def _average_pool(b, node, gy, wants):
    """A box filter, separable per spatial axis: each axis' matrix (its divisor included, for
    count_include_pad 0 or 1, ceil_mode, pads, dilations, auto_pad) is computed by the pool itself."""
    x = node.input[0]
    g = _g(gy)
    for k in range(_spatial(b, node)):
        axis = 2 + k
        a_t = _axis_matrix_pool(b, node, x, k, _dim(b, x, axis))
        g = contract_axis(b, g, axis, a_t, x)
    return [_finish(b, g, x)]


# -- Resize ---------------------------------------------------------------------------------------
RESIZE_ATTRS = ("mode", "coordinate_transformation_mode", "nearest_mode", "cubic_coeff_a", "exclude_outside",
                "antialias")


@register("Resize")
def _resize(b, node, gy, wants):
    """Nearest / linear / cubic interpolation is separable: y = (A_0 ⊗ A_1 ⊗ ...) x with one matrix per
    axis. A_k comes from resizing an identity along one axis with the same attributes and the same
    scale (or output size), roi and all; extrapolated points (tf_crop_and_resize) are constants and get
    no gradient."""
    if b.opset < 11:
        raise NotImplementedError("Resize of opset < 11")
    x = node.input[0]
    inputs = list(node.input) + [""] * (4 - len(node.input))
    roi, scales, sizes = inputs[1], inputs[2], inputs[3]
    if wants[1:] and any(wants[1:]):
        raise NotImplementedError("Resize with relevance-carrying roi or scales")
    r = b.view.rank(x)
    if r is None:
        raise NotImplementedError("Resize on an input of unknown rank")
    policy = _s(attr(node, "keep_aspect_ratio_policy", "stretch"))
    if sizes and policy != "stretch":
        raise NotImplementedError(f"Resize with keep_aspect_ratio_policy={policy}")
    axes = attr(node, "axes")
    axes = list(range(r)) if axes is None else [a % r for a in axes]
    ctm = _s(attr(node, "coordinate_transformation_mode", "half_pixel"))
    use_scales = bool(scales) and not (b.view.shape(scales) == [0])
    scales_v = b.view.value(scales) if use_scales else None
    roi_v = b.view.value(roi) if roi else None
    x_shape, y_shape = b.view.shape(x), b.view.shape(node.output[0])
    copied = {a.name: helper.get_attribute_value(a) for a in node.attribute if a.name in RESIZE_ATTRS}
    dt = b.view.dtype(x)
    g = _g(gy)
    for pos, axis in enumerate(axes):
        if ctm != "tf_crop_and_resize":
            if scales_v is not None and float(np.asarray(scales_v).reshape(-1)[pos]) == 1.0:
                continue
            if not use_scales and x_shape and y_shape and isinstance(x_shape[axis], int) \
                    and x_shape[axis] == y_shape[axis]:
                continue
        n = _dim(b, x, axis)
        signals = b.op("Reshape", [_eye(b, n, x), b.ints([0, 1, 1, -1])], dtype=dt, shape=[None, 1, 1, None])
        if use_scales:
            s_k = b.op("Gather", [scales, b.ints([pos])], axis=0)
            eye_scales = b.op("Concat", [b.const(np.ones(3, np.float32)), s_k], axis=0)
            eye_sizes = ""
        else:
            eye_scales = ""
            eye_sizes = b.op("Concat", [n, b.ints([1, 1]), _dim(b, node.output[0], axis)], axis=0)
        eye_roi = ""
        if ctm == "tf_crop_and_resize":
            rdt = b.view.dtype(roi) or onnx.TensorProto.FLOAT
            npdt = helper.tensor_dtype_to_np_dtype(rdt)
            if roi_v is not None:
                flat = np.asarray(roi_v).reshape(-1)
                eye_roi = b.const(np.array([0, 0, 0, flat[pos], 1, 1, 1, flat[pos + len(axes)]], npdt))
            else:
                start = b.op("Gather", [roi, b.ints([pos])], axis=0)
                end = b.op("Gather", [roi, b.ints([pos + len(axes)])], axis=0)
                eye_roi = b.op("Concat", [b.const(np.zeros(3, npdt)), start, b.const(np.ones(3, npdt)), end], axis=0)
        resized = b.op("Resize", [signals, eye_roi, eye_scales, eye_sizes], dtype=dt, shape=[None, 1, 1, None],
                       extrapolation_value=0.0, **copied)
        a_t = b.op("Reshape", [resized, b.ints([0, -1])], dtype=dt, shape=[None, None])
        g = contract_axis(b, g, axis, a_t, x)
    return [_finish(b, g if g != _g(gy) else b.op("Identity", [g]), x)] + [None] * (len(node.input) - 1)


# -- layout and padding ---------------------------------------------------------------------------
@register("Tile")
def _tile(b, node, gy, wants):
    """y = x repeated r_k times along each axis: view g as [r_0, d_0, r_1, d_1, ...] and sum the r axes."""
    x, repeats = node.input
    r = b.view.rank(x)
    if r is None:
        raise NotImplementedError("Tile on an input of unknown rank")
    dt = b.view.dtype(x)
    interleaved = b.op("Concat", [b.op("Unsqueeze", [repeats, b.ints([1])]),
                                  b.op("Unsqueeze", [b.shape_of(x), b.ints([1])])], axis=1)
    split = b.op("Reshape", [_g(gy), b.op("Reshape", [interleaved, b.ints([-1])])], dtype=dt, shape=[None] * 2 * r)
    summed = b.op("ReduceSum", [split, b.ints(list(range(0, 2 * r, 2)))], keepdims=0, like=x)
    return [summed, None]


@register("Pad")
def _pad(b, node, gy, wants):
    """constant: the gradient is g cropped back, i.e. Pad(g, -pads) (negative pads crop; a cropped
    input gets zeros); the pad value gets the rest. reflect / edge / wrap: separable per axis, each axis'
    matrix from padding an identity the same way."""
    if b.opset < 11:
        raise NotImplementedError("Pad of opset < 11")
    x, g = node.input[0], _g(gy)
    inputs = list(node.input) + [""] * (4 - len(node.input))
    pads, value, axes_in = inputs[1], inputs[2], inputs[3]
    mode = _s(attr(node, "mode", "constant"))
    r = b.view.rank(x)
    out = [None] * len(node.input)
    if len(wants) > 1 and wants[1]:
        raise NotImplementedError("Pad with relevance-carrying pads")
    pads_v = b.view.value(pads)
    axes = list(range(r))
    if axes_in:
        av = b.view.value(axes_in)
        if av is None:
            raise NotImplementedError("Pad with axes computed at run time")
        axes = [int(a) % r for a in np.asarray(av).reshape(-1)]
    if mode == "constant":
        neg = b.ints(-np.asarray(pads_v, dtype=np.int64)) if pads_v is not None else \
            b.op("Neg", [pads], dtype=INT64, shape=b.view.shape(pads))
        out[0] = b.op("Pad", [g, neg] + ([""] * 1 + [axes_in] if axes_in else []), mode="constant", like=x)
        if len(wants) > 2 and wants[2]:
            rest = b.op("Sub", [b.op("ReduceSum", [g], keepdims=0), b.op("ReduceSum", [out[0]], keepdims=0)])
            out[2] = b.reshape_like(rest, value)
        return out
    if mode not in ("reflect", "edge", "wrap"):
        raise NotImplementedError(f"Pad in mode '{mode}'")
    dt = b.view.dtype(x)
    for pos, axis in enumerate(axes):
        if pads_v is not None:
            before, after = int(pads_v[pos]), int(pads_v[pos + len(axes)])
            if before == 0 and after == 0:
                continue
            eye_pads = b.ints([0, before, 0, after])
        else:
            zero = b.ints([0])
            eye_pads = b.op("Concat", [zero, b.op("Gather", [pads, b.ints([pos])], axis=0), zero,
                                       b.op("Gather", [pads, b.ints([pos + len(axes)])], axis=0)], axis=0)
        a_t = b.op("Pad", [_eye(b, _dim(b, x, axis), x), eye_pads], mode=mode, dtype=dt, shape=[None, None])
        g = contract_axis(b, g, axis, a_t, x)
    out[0] = _finish(b, g if g != _g(gy) else b.op("Identity", [g]), x)
    return out


@register("CumSum")
def _cumsum(b, node, gy, wants):
    """The transpose of a running sum is the running sum in the other direction (exclusive stays)."""
    x, axis = node.input
    g = b.op("CumSum", [_g(gy), axis], exclusive=attr(node, "exclusive", 0),
             reverse=1 - attr(node, "reverse", 0), like=x)
    return [g, None]


@register("SpaceToDepth")
def _space_to_depth(b, node, gy, wants):
    """A permutation whose inverse is DepthToSpace in DCR mode."""
    return [b.op("DepthToSpace", [_g(gy)], blocksize=attr(node, "blocksize"), mode="DCR", like=node.input[0])]


@register("DepthToSpace")
def _depth_to_space(b, node, gy, wants):
    """DCR: the inverse permutation is SpaceToDepth. CRD: x [N, C, H, W] -> [N, C/b², b, b, H, W] ->
    transpose (0, 1, 4, 2, 5, 3) -> [N, C/b², H b, W b]; undone step by step."""
    x, g = node.input[0], _g(gy)
    bs = attr(node, "blocksize")
    if _s(attr(node, "mode", "DCR")) == "DCR":
        return [b.op("SpaceToDepth", [g], blocksize=bs, like=x)]
    dt = b.view.dtype(x)
    shape = b.op("Concat", [_dim(b, x, 0), b.ints([-1]), _dim(b, x, 2), b.ints([bs]), _dim(b, x, 3),
                            b.ints([bs])], axis=0)
    six = b.op("Reshape", [g, shape], dtype=dt, shape=[None] * 6)
    moved = b.op("Transpose", [six], perm=[0, 1, 3, 5, 2, 4], dtype=dt, shape=[None] * 6)
    return [b.reshape_like(moved, x)]


# -- convolution ----------------------------------------------------------------------------------
def conv_geometry(b: Builder, node) -> dict:
    """Kernel, strides, pads, dilations, group and auto_pad of a Conv / ConvTranspose node. pads is
    explicit, or None for SAME_UPPER / SAME_LOWER (they depend on the input size)."""
    x, w = node.input[0], node.input[1]
    w_shape = b.view.shape(w)
    spatial = (b.view.rank(x) or 0) - 2
    if spatial < 1 or w_shape is None:
        raise NotImplementedError(f"{node.op_type} with an input or weight of unknown rank")
    kernel = list(attr(node, "kernel_shape", w_shape[2:]))
    if not all(isinstance(k, int) for k in kernel):
        raise NotImplementedError(f"{node.op_type} with a kernel of unknown size")
    auto_pad = _s(attr(node, "auto_pad", "NOTSET"))
    if auto_pad == "NOTSET":
        pads = list(attr(node, "pads", [0] * 2 * spatial))
    elif auto_pad == "VALID":
        pads = [0] * 2 * spatial
    elif auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        pads = None
    else:
        raise NotImplementedError(f"{node.op_type} with auto_pad={auto_pad}")
    return dict(kernel=kernel, strides=list(attr(node, "strides", [1] * spatial)), pads=pads, auto_pad=auto_pad,
                dilations=list(attr(node, "dilations", [1] * spatial)), group=attr(node, "group", 1))


def _same_pads_static(geo, sizes):
    """Explicit pads of a SAME_* Conv for static input sizes (ONNX: output = ceil(in / stride))."""
    begin, end = [], []
    for size, k, s, d in zip(sizes, geo["kernel"], geo["strides"], geo["dilations"]):
        out = -(-size // s)
        total = max(0, (out - 1) * s + (k - 1) * d + 1 - size)
        head = total // 2 if geo["auto_pad"] == "SAME_UPPER" else total - total // 2
        begin.append(head)
        end.append(total - head)
    return begin + end


def conv_input_gradient(b: Builder, node, g: str, w: str) -> str:
    """Wᵀ g for y = Conv(x, w): ConvTranspose with the same weights, strides, pads, dilations and group.
    The rows a stride skips at the end of x get zero gradient: by output_padding when x's size is
    static, else by a ConvTranspose without end pads, padded with zeros or cropped to x's run-time
    shape. SAME_* pads
    with a dynamic size: a ConvTranspose without pads, cropped (negative Pad) by the head pads computed
    from x's run-time size."""
    x = node.input[0]
    geo = conv_geometry(b, node)
    n = len(geo["kernel"])
    x_shape = b.view.shape(x)
    sizes = x_shape[2:] if x_shape is not None else [None] * n
    static = all(isinstance(s, int) for s in sizes)
    common = dict(kernel_shape=geo["kernel"], strides=geo["strides"], dilations=geo["dilations"], group=geo["group"])
    pads = geo["pads"]
    if pads is None and static:
        pads = _same_pads_static(geo, sizes)
    if static:
        output_padding = []
        for i, (k, s, d) in enumerate(zip(geo["kernel"], geo["strides"], geo["dilations"])):
            output_padding.append((sizes[i] + pads[i] + pads[i + n] - d * (k - 1) - 1) % s)
        return b.op("ConvTranspose", [g, w], like=x, pads=pads, output_padding=output_padding, **common)
    if all(s == 1 for s in geo["strides"]) and pads is not None:
        return b.op("ConvTranspose", [g, w], like=x, pads=pads, **common)
    dt = b.view.dtype(x)
    r = n + 2
    x_sizes = b.op("Slice", [b.shape_of(x), b.ints([2]), b.ints([r])], dtype=INT64, shape=[n])
    if pads is not None:  # the head pads crop; the end pads may cover input rows (not all pad is used)
        full = b.op("ConvTranspose", [g, w], pads=pads[:n] + [0] * n, dtype=dt, shape=[None] * r, **common)
        head = b.ints([0] * n)
    else:
        full = b.op("ConvTranspose", [g, w], pads=[0] * 2 * n, dtype=dt, shape=[None] * r, **common)
        strides = b.ints(geo["strides"])
        span = b.ints([(k - 1) * d + 1 for k, d in zip(geo["kernel"], geo["dilations"])])
        out = b.op("Div", [b.op("Add", [x_sizes, b.op("Sub", [strides, b.ints([1] * n)])]), strides])
        total = b.op("Max", [b.op("Sub", [b.op("Add", [b.op("Mul", [b.op("Sub", [out, b.ints([1] * n)]), strides]),
                                                        span]), x_sizes]), b.ints([0] * n)])
        half = b.op("Div", [total, b.ints([2] * n)])
        head = half if geo["auto_pad"] == "SAME_UPPER" else b.op("Sub", [total, half])
    full_sizes = b.op("Slice", [b.shape_of(full), b.ints([2]), b.ints([r])])
    tail = b.op("Sub", [b.op("Add", [x_sizes, head]), full_sizes])
    zeros2 = b.ints([0, 0])
    pad_vec = b.op("Concat", [zeros2, b.op("Neg", [head]), zeros2, tail], axis=0)
    return b.op("Pad", [full, pad_vec], mode="constant", like=x)


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


@register("ConvTranspose")
def _conv_transpose(b, node, gy, wants):
    """y = ConvTranspose(x, w): the gradient at x is Conv(g, w) with the same strides, pads, dilations
    and group (output_padding only adds rows to y; Conv's floor division drops them again). SAME_*
    pads and output_shape fix the total padding from static quantities; it is split as onnxruntime
    splits it."""
    x, w = node.input[0], node.input[1]
    g = _g(gy)
    out = [None] * len(node.input)
    if wants[1]:
        raise NotImplementedError("ConvTranspose with a relevance-carrying weight")
    geo = conv_geometry(b, node)
    n = len(geo["kernel"])
    output_padding = list(attr(node, "output_padding", [0] * n))
    output_shape = attr(node, "output_shape")
    pads = geo["pads"]
    if output_shape is not None or pads is None:
        x_shape = b.view.shape(x)
        totals = []
        for i, (k, s, d) in enumerate(zip(geo["kernel"], geo["strides"], geo["dilations"])):
            if output_shape is not None:
                size = x_shape[2 + i] if x_shape is not None else None
                if not isinstance(size, int):
                    raise NotImplementedError("ConvTranspose with output_shape and a dynamic spatial size")
                target = list(output_shape)[-n:][i]
                totals.append(s * (size - 1) + output_padding[i] + (k - 1) * d + 1 - target)
            else:
                totals.append(output_padding[i] + (k - 1) * d + 1 - s)
        upper = geo["auto_pad"] == "SAME_UPPER"
        halves = [t // 2 for t in totals]
        heads = [h if upper else t - h for t, h in zip(totals, halves)]
        pads = heads + [t - h for t, h in zip(totals, heads)]
    if wants[0]:
        gc = g
        if any(p < 0 for p in pads):  # negative pads extend y beyond the full result: crop g there
            crop = [0, 0] + [min(p, 0) for p in pads[:n]] + [0, 0] + [min(p, 0) for p in pads[n:]]
            gc = b.op("Pad", [g, b.ints(crop)], mode="constant", dtype=b.view.dtype(g), shape=[None] * (n + 2))
            pads = [max(p, 0) for p in pads]
        out[0] = b.op("Conv", [gc, w], like=x, kernel_shape=geo["kernel"], strides=geo["strides"], pads=pads,
                      dilations=geo["dilations"], group=geo["group"])
    if len(node.input) > 2 and wants[2]:
        r = b.view.rank(g)
        out[2] = b.reduce_sum(g, [0] + list(range(2, r)), keepdims=0)
    return out


# -- DFT ------------------------------------------------------------------------------------------
@register("DFT")
def _dft(b, node, gy, wants):
    """y = F x along the signal axis (complex numbers as a trailing [re, im] axis; a real input has a
    trailing axis of 1), x zero-padded or truncated to dft_length, onesided: the first L//2 + 1
    frequencies only. The adjoint of the unnormalized forward transform is L times the inverse one
    (F is symmetric, F^H = conj(F)); of the inverse transform (1/L conj(F)), 1/L times the forward one.
    For the loss sum(g * y) the gradient at (x_re, x_im) is (Re, Im) of F^H g; a real input keeps Re."""
    x = node.input[0]
    inputs = list(node.input) + [""] * (3 - len(node.input))
    length_in = inputs[1]
    r = b.view.rank(x)
    if r is None:
        raise NotImplementedError("DFT on an input of unknown rank")
    if b.opset >= 20:
        axis = -2
        if inputs[2]:
            v = b.view.value(inputs[2])
            if v is None:
                raise NotImplementedError("DFT with an axis computed at run time")
            axis = int(np.asarray(v).reshape(-1)[0])
    else:
        axis = attr(node, "axis", 1)
    axis %= r
    inverse, onesided = attr(node, "inverse", 0), attr(node, "onesided", 0)
    if inverse and onesided:
        raise NotImplementedError("DFT with inverse=1 and onesided=1")
    dt = b.view.dtype(x)
    g = _g(gy)

    def end_pad(t, amount):
        """Pad (or, negative, crop) t at the end of `axis` by an int64 [1] amount."""
        pads = b.op("Concat", [b.ints([0] * (r + axis)), amount, b.ints([0] * (r - axis - 1))], axis=0)
        return b.op("Pad", [t, pads], mode="constant", dtype=dt, shape=[None] * r)

    n = _dim(b, x, axis)
    length = n
    if length_in:
        length = b.op("Reshape", [b.op("Cast", [length_in], to=INT64), b.ints([1])], dtype=INT64, shape=[1])
    if onesided:
        g = end_pad(g, b.op("Sub", [length, _dim(b, g, axis)]))
    axis_args = {"axis": axis} if b.opset < 20 else {}
    extra = [length_in if length_in else "", b.ints(axis)] if b.opset >= 20 else ([length_in] if length_in else [])
    adjoint = b.op("DFT", [g] + extra, inverse=1 - inverse, onesided=0, dtype=dt, shape=[None] * r, **axis_args)
    scale = b.op("Cast", [length], to=dt)
    adjoint = b.op("Div" if inverse else "Mul", [adjoint, scale], dtype=dt, shape=[None] * r)
    if length_in:
        adjoint = end_pad(adjoint, b.op("Sub", [n, length]))
    x_shape = b.view.shape(x)
    if x_shape is not None and x_shape[-1] == 1:
        adjoint = b.op("Slice", [adjoint, b.ints([0]), b.ints([1]), b.ints([r - 1])], dtype=dt, shape=[None] * r)
    elif x_shape is None or x_shape[-1] != 2:
        raise NotImplementedError("DFT whose input's trailing (complex) axis is not of static size 1 or 2")
    return [_finish(b, adjoint, x)] + [None] * (len(node.input) - 1)
