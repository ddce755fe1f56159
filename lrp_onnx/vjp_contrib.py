"""VJPs of onnxruntime's com.microsoft ops that its transformer optimizer fuses in
(onnxruntime.transformers.optimizer / optimum O1-O4), and of its quantized MatMuls
(DynamicQuantizeMatMul, MatMulNBits: the float gradient with the dequantized weight). Norms are in
vjp.py's norm registry; the attention ops and EmbedLayerNormalization are unfused by unfuse.py before
analysis."""
from __future__ import annotations

import numpy as np
import onnx

from .builder import Builder
from .graph import attr
from .vjp import _matmul_shape, gelu_derivative, register

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
def dequantized_input_gradient(b: Builder, g, weight, scale, zero_point, like):
    """g @ ((W - zero_point) * scale)ᵀ for y = x @ dequantized(W), W int8/uint8 [K, N], per-tensor or
    per-column scale / zero point (scale None: already applied to g)."""
    dt = b.view.dtype(g) or onnx.TensorProto.FLOAT
    w = b.op("Cast", [weight], to=dt)
    if zero_point:
        w = b.op("Sub", [w, b.op("Cast", [zero_point], to=dt)])
    if scale:
        g = b.mul(g, scale, like=g)
    out = b.op("MatMul", [g, b.op("Transpose", [w], perm=[1, 0])], dtype=dt)
    return b.reshape_like(out, like) if b.view.rank(like) != b.view.rank(g) else _as(b, out, like)


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
    a scale and a zero point (default 2^(bits-1)). The gradient is g @ W, W dequantized with standard ops."""
    inputs = list(node.input) + [""] * (6 - len(node.input))
    a, packed, scales, zero_points, g_idx = inputs[:5]
    bits, block = attr(node, "bits", 4), attr(node, "block_size")
    k, n = attr(node, "K"), attr(node, "N")
    if bits not in (4, 8) or g_idx:
        raise NotImplementedError(f"MatMulNBits with bits={bits}{' and g_idx' if g_idx else ''}")
    blocks = -(-k // block)
    dt = b.view.dtype(gy[0]) or onnx.TensorProto.FLOAT
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
    out = b.op("MatMul", [gy[0], w], dtype=dt)
    grads = [None] * len(node.input)
    grads[0] = _as(b, out, a)
    return grads


def _unpack_nibbles(b, ints, shape):
    """int32 bytes -> their 4-bit values, low nibble first, reshaped to `shape`."""
    sixteen = b.const(np.array(16, np.int32))
    low, high = b.op("Mod", [ints, sixteen]), b.op("Div", [ints, sixteen])
    pairs = b.op("Concat", [b.op("Unsqueeze", [low, b.ints([-1])]), b.op("Unsqueeze", [high, b.ints([-1])])], axis=-1)
    return b.op("Reshape", [pairs, b.ints(shape)])
