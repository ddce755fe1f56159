"""VJPs of onnxruntime's com.microsoft ops that its transformer optimizer fuses in
(onnxruntime.transformers.optimizer / optimum O1-O4), and of its quantized MatMuls
(DynamicQuantizeMatMul, MatMulNBits: the float gradient with the dequantized weight). Norms are in
vjp/ops.py's norm registry; the attention ops and EmbedLayerNormalization are unfused by unfuse.py before
analysis."""
from __future__ import annotations

import numpy as np
import onnx

from ..ir.builder import Builder
from ..ir.graph import attr
from .ops import _matmul_shape, gelu_derivative, register

MS = "com.microsoft"
BIASED_ACTIVATIONS = {"BiasGelu", "FastGelu"}  # f(x + bias)


def activation_input(b: Builder, node) -> str:
    """The tensor an activation is applied to: x, or x + bias for the biased fused forms."""
    if node.op_type in BIASED_ACTIVATIONS and len(node.input) > 1 and node.input[1]:
        return b.add(node.input[0], node.input[1], like=node.input[0])
    return node.input[0]


def _biased_activation(b, node, gy, wants, local):
    g = b.mul(gy[0], local, like=gy[0])
    return [b.unbroadcast(g, t) if w else None for t, w in zip(node.input, wants)]


@register("BiasGelu", domain=MS)
def _bias_gelu(b, node, gy, wants):
    return _biased_activation(b, node, gy, wants, gelu_derivative(b, activation_input(b, node), tanh_form=False))


@register("FastGelu", domain=MS)
def _fast_gelu(b, node, gy, wants):
    return _biased_activation(b, node, gy, wants, gelu_derivative(b, activation_input(b, node), tanh_form=True))


@register("Gelu", domain=MS)
def _ms_gelu(b, node, gy, wants):
    return [b.mul(gy[0], gelu_derivative(b, node.input[0], tanh_form=False))]


@register("QuickGelu", domain=MS)
def _quick_gelu(b, node, gy, wants):
    """y = x * sigmoid(alpha x)."""
    x = node.input[0]
    alpha = b.scalar_like(attr(node, "alpha", 1.702), x)
    s = b.op("Sigmoid", [b.mul(x, alpha)], like=x)
    one_minus_s = b.op("Sub", [b.scalar_like(1.0, x), s], like=x)
    local = b.add(s, b.mul(b.mul(alpha, x, like=x), b.mul(s, one_minus_s)))
    return [b.mul(gy[0], local)]


@register("FusedMatMul", domain=MS)
def _fused_matmul(b, node, gy, wants):
    """Y = alpha * op(A) @ op(B), op = optional transpose of the last two axes."""
    if attr(node, "transBatchA", 0) or attr(node, "transBatchB", 0):
        raise NotImplementedError("FusedMatMul with transBatchA/transBatchB")
    a, w = node.input[0], node.input[1]
    ta, tb, alpha = attr(node, "transA", 0), attr(node, "transB", 0), attr(node, "alpha", 1.0)
    g = gy[0]

    def fused(x, y, trans_x, trans_y, like):
        out = b.op("FusedMatMul", [x, y], domain=MS, transA=trans_x, transB=trans_y, alpha=alpha,
                   dtype=b.view.dtype(g), shape=_matmul_shape(b, x, y, bool(trans_x), bool(trans_y)))
        return b.unbroadcast(out, like)

    ga = gw = None
    if wants[0]:
        ga = fused(w, g, tb, 1, a) if ta else fused(g, w, 0, 1 - tb, a)
    if wants[1]:
        gw = fused(g, a, 1, ta, w) if tb else fused(a, g, 1 - ta, 0, w)
    return [ga, gw]


# -- quantized MatMuls: dequantization is linear, the gradient flows in float -------------------------
# A constant weight is dequantized by DequantizeLinear inside the run, one weight at a time: no ONNX
# runtime constant-folds a DequantizeLinear of a constant (onnxruntime keeps it for its QDQ fusions), so
# the converted model keeps the weight in its quantized form (docs/quantized.md). Anything built from the
# weight with other ops (Cast, Sub, Mul, Transpose) would be folded into an fp32 copy at session creation.
def value_anchor(b: Builder, g: str) -> str:
    """A run-time int64 scalar from the values of `g`, always 0 or 1: isinf of g's first element (0 for
    an empty g). What `after` picks with; made once per gradient."""
    first = b.op("Slice", [b.op("Reshape", [g, b.ints([-1])]), b.ints([0]), b.ints([1])])
    total = b.op("ReduceSum", [b.op("Cast", [first], to=onnx.TensorProto.FLOAT)], keepdims=0)  # a scalar
    return b.op("Cast", [b.op("IsInf", [total])], to=onnx.TensorProto.INT64)


def after(b: Builder, small: str, anchor: str) -> str:
    """`small` (a small constant) made to depend on the run-time values of a gradient, values unchanged:
    [small, small][anchor], `anchor` = value_anchor(gradient). A DequantizeLinear of constants alone may
    run as soon as the run starts (nothing orders it), and every dequantized weight would be alive at
    once; through this, each runs when its gradient arrives and is freed after its one MatMul. And
    nothing built from it can be constant-folded: a dependency on the gradient's shape alone (an empty
    slice of it) is folded by OpenVINO, whose shape inference knows the slice is empty, and it then
    folded every unpacked weight into float constants (a 7B model did not fit in 24 GB)."""
    pair = b.op("Concat", [b.op("Unsqueeze", [small, b.ints([0])]) for _ in range(2)], axis=0)
    return b.op("Gather", [pair, anchor], axis=0, dtype=b.view.dtype(small), shape=b.view.shape(small))


def dequantized_input_gradient(b: Builder, g, weight, scale, zero_point, like):
    """g @ ((W - zero_point) * scale)ᵀ for y = x @ dequantized(W), W int8/uint8 [K, N], per-tensor or
    per-column scale / zero point (scale None: already applied to g)."""
    dt = b.view.dtype(g) or onnx.TensorProto.FLOAT
    if scale:
        g = b.mul(g, scale, like=g)
    if zero_point and b.view.rank(zero_point) not in (0, 1) or scale and b.view.rank(scale) not in (0, 1):
        raise NotImplementedError("a quantized MatMul whose weight scale / zero point is not per tensor or per column")
    per_column = bool(zero_point and b.view.rank(zero_point) == 1 and (b.view.shape(zero_point) or [1])[0] != 1)
    unit_scale = after(b, b.const(np.ones(b.view.shape(zero_point) if per_column else [], np.float32)),
                       value_anchor(b, g))
    w = b.op("DequantizeLinear", [weight, unit_scale, zero_point or None], axis=1)  # W - zero_point, [K, N]
    w = b.op("Cast", [w], to=dt) if dt != onnx.TensorProto.FLOAT else w
    n = (b.view.shape(weight) or [None, None])[1]
    columns = b.ints([-1, n]) if isinstance(n, int) else \
        b.op("Concat", [b.ints([-1]), b.op("Slice", [b.shape_of(weight), b.ints([1]), b.ints([2])])], axis=0)
    flat = b.op("Reshape", [g, columns])
    out = b.op("Gemm", [flat, w], transB=1, dtype=dt)  # [rows, K]: the transpose is Gemm's, never a folded copy
    return b.reshape_like(out, like)


def _as(b, t, like):
    b.view.info[t] = b.view.info.get(like)
    return t


@register("DynamicQuantizeMatMul", domain=MS)
def _dynamic_quantize_matmul(b, node, gy, wants):
    """Y = dynamic_quantize(A) @ (B - b_zero_point) * b_scale (+ bias): straight through the rounding of A."""
    inputs = list(node.input) + [""] * (5 - len(node.input))
    grads = [None] * len(node.input)
    grads[0] = dequantized_input_gradient(b, gy[0], inputs[1], inputs[2], inputs[3], like=node.input[0])
    return grads


@register("MatMulNBits", domain=MS)
def _matmul_nbits(b, node, gy, wants):
    """Y = A @ Wᵀ (+ bias), W [N, K] stored in `bits`-bit blocks of `block_size` along K, each block with
    a scale and a zero point (default 2^(bits-1)). The gradient is g @ W. A constant B is read by the
    backward itself (no second initializer): its values are taken out at run time (the 8-bit bytes, or
    the low and high nibbles of the 4-bit ones: the even and odd columns of W) and dequantized by blocked
    DequantizeLinear (opset 21), one weight at a time when its gradient arrives."""
    inputs = list(node.input) + [""] * (6 - len(node.input))
    a, packed, scales, zero_points, g_idx = inputs[:5]
    bits, block = attr(node, "bits", 4), attr(node, "block_size")
    k, n = attr(node, "K"), attr(node, "N")
    if bits not in (4, 8) or g_idx:
        raise NotImplementedError(f"MatMulNBits with bits={bits}{' and g_idx' if g_idx else ''}")
    dt = b.view.dtype(gy[0]) or onnx.TensorProto.FLOAT
    grads = [None] * len(node.input)
    stored = b.view.shape(packed)  # the spec's [N, ceil(K / block_size), block_size * bits / 8]
    if b.opset < 21 or not b.view.is_constant(packed) or bits == 4 and block % 2 or \
            not stored or len(stored) != 3 or stored[1] != -(-k // block):
        w = _dequantize_with_standard_ops(b, packed, scales, zero_points, bits, block, k, n, dt)
        grads[0] = _as(b, b.op("MatMul", [gy[0], w], dtype=dt), a)
        return grads
    blocks = -(-k // block)
    g = gy[0]  # [..., N]; the result is shaped from g's shape, never from A's (that would keep A alive)
    parts = []
    for w, factor in _dequantize_blocked(b, packed, scales, zero_points, bits, block, n, blocks, dt, g):
        part = b.op("MatMul", [g, w], dtype=dt)
        parts.append(b.op("Mul", [part, b.const(np.array(1 / factor, np.float32))]) if factor != 1 else part)
    out = parts[0]
    if len(parts) == 2:  # even and odd columns, interleaved: [..., blocks*block/2, 2] -> [..., blocks*block]
        pairs = b.op("Concat", [b.op("Unsqueeze", [p, b.ints([-1])]) for p in parts], axis=-1)
        out = b.reshape_leading(pairs, g, blocks * block)
    if blocks * block != k:
        out = b.op("Slice", [out, b.ints([0]), b.ints([k]), b.ints([-1])])
    grads[0] = _as(b, out, a)
    return grads


def _dequantize_blocked(b, packed, scales, zero_points, bits, block, n, blocks, dt, g) -> list[tuple[str, int]]:
    """W's columns from the constant packed B [N, blocks, block·bits/8], each with the factor it is
    scaled by: [(W, 1)] for 8 bits; [(W[:, 0::2], 1), (16 · W[:, 1::2], 16)] (each [N, blocks·block/2])
    for 4 bits, from B & 0x0F and B & 0xF0 (the high nibble in place, its zero point times 16: scaling
    by a power of two is exact, so (g · 16W) / 16 = g · W to the last bit).

    The bytes are masked with a mask made from the run-time gradient `g` (`after`, one anchor per g): nothing a runtime can
    fold into a weight-sized initializer, and nothing runs before the weight's gradient arrives. Only
    bitwise AND and static shapes: OpenVINO 2026.4 rounds BitShift of uint8 (0xF8 >> 4 gave 16) and
    converts a DequantizeLinear only with a static input shape. DequantizeLinear (opset 21, axis 1,
    block_size) applies the per-block scales and zero points (made at run time too: they are [N, blocks],
    6% of a 4-bit weight's bytes)."""
    per_byte = 8 // bits
    width = blocks * block // per_byte  # each part's columns
    uint8 = onnx.TensorProto.UINT8

    anchor = value_anchor(b, g)

    def masked(t, value):
        return b.op("BitwiseAnd", [t, after(b, b.const(np.array([value], np.uint8)), anchor)])

    factors = [1] if bits == 8 else [1, 16]
    masks = [0xFF] if bits == 8 else [0x0F, 0xF0]
    parts = [b.op("Reshape", [masked(packed, m), b.ints([n, width])]) for m in masks]
    scale = scales if b.view.shape(scales) == [n, blocks] else b.op("Reshape", [scales, b.ints([n, blocks])],
                                                                     dtype=b.view.dtype(scales), shape=[n, blocks])
    offset = zps = None  # float zero points: W = q * scale - zero_point * scale
    if zero_points and b.view.dtype(zero_points) == onnx.TensorProto.INT8:
        raise NotImplementedError("MatMulNBits with int8 zero points (the spec's are uint8 or float)")
    if zero_points and b.view.dtype(zero_points) == uint8:
        zp = b.op("Cast", [masked(zero_points, 0xFF)], to=onnx.TensorProto.INT32)  # [N, ceil(blocks * bits / 8)]
        zp = _unpack_nibbles(b, zp, [n, -1]) if bits == 4 else b.op("Reshape", [zp, b.ints([n, -1])])
        zp = b.op("Slice", [zp, b.ints([0]), b.ints([blocks]), b.ints([1])])
        zps = [b.op("Cast", [b.op("Mul", [zp, b.const(np.array(f, np.int32))]) if f != 1 else zp], to=uint8)
               for f in factors]
    elif zero_points:
        offset = b.op("Mul", [b.op("Reshape", [zero_points, b.ints([n, blocks, 1])]),
                              b.op("Reshape", [scales, b.ints([n, blocks, 1])])])
    else:
        middle = 2 ** (bits - 1)
        zps = [b.op("Expand", [after(b, b.const(np.array([middle * f], np.uint8)), anchor), b.ints([n, blocks])])
               for f in factors]
    out = []
    for i, (q, factor) in enumerate(zip(parts, factors)):
        w = b.op("DequantizeLinear", [q, scale, zps[i] if zps else None], axis=1, block_size=block // per_byte)
        if offset is not None:
            shift = b.op("Mul", [offset, b.const(np.array(factor, np.float32))]) if factor != 1 else offset
            w = b.op("Reshape", [b.op("Sub", [b.op("Reshape", [w, b.ints([n, blocks, block // per_byte])]),
                                              shift]), b.ints([n, width])])
        if b.view.dtype(scales) != dt:
            w = b.op("Cast", [w], to=dt)
        out.append((w, factor))
    return out


def _dequantize_with_standard_ops(b, packed, scales, zero_points, bits, block, k, n, dt):
    """W [N, K] from a packed B computed at run time (or below opset 21): unpacked with Cast/Mod/Div."""
    blocks = -(-k // block)
    ints = b.op("Cast", [packed], to=onnx.TensorProto.INT32)  # [N, blocks, block * bits / 8]
    ints = _unpack_nibbles(b, ints, [n, blocks, block]) if bits == 4 else ints
    q = b.op("Cast", [ints], to=dt)
    if zero_points and b.view.dtype(zero_points) in (onnx.TensorProto.UINT8, onnx.TensorProto.INT8):
        zp = b.op("Cast", [zero_points], to=onnx.TensorProto.INT32)  # [N, ceil(blocks * bits / 8)]
        zp = _unpack_nibbles(b, zp, [n, -1]) if bits == 4 else zp
        zp = b.op("Slice", [zp, b.ints([0]), b.ints([blocks]), b.ints([1])])
        zp = b.op("Unsqueeze", [b.op("Cast", [zp], to=dt), b.ints([2])])
    elif zero_points:  # float zero points [N, blocks]: dequantized = (q - zp) * scale as well
        zp = b.op("Reshape", [zero_points, b.ints([n, blocks, 1])])
    else:
        zp = b.const(np.array(2 ** (bits - 1), dtype=onnx.helper.tensor_dtype_to_np_dtype(dt)))
    w = b.mul(b.op("Sub", [q, zp]), b.op("Reshape", [scales, b.ints([n, blocks, 1])]))
    w = b.op("Reshape", [w, b.ints([n, blocks * block])])
    if blocks * block != k:
        w = b.op("Slice", [w, b.ints([0]), b.ints([k]), b.ints([1])])
    return w


def _unpack_nibbles(b, ints, shape):
    """int32 bytes -> their 4-bit values, low nibble first, reshaped to `shape`."""
    sixteen = b.const(np.array(16, np.int32))
    low, high = b.op("Mod", [ints, sixteen]), b.op("Div", [ints, sixteen])
    pairs = b.op("Concat", [b.op("Unsqueeze", [low, b.ints([-1])]), b.op("Unsqueeze", [high, b.ints([-1])])], axis=-1)
    return b.op("Reshape", [pairs, b.ints(shape)])
