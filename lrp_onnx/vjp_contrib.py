"""VJPs of onnxruntime's com.microsoft ops that its transformer optimizer fuses in
(onnxruntime.transformers.optimizer / optimum O1-O4). Norms are in vjp.py's norm registry;
EmbedLayerNormalization and Attention are unfused by unfuse.py before analysis."""
from __future__ import annotations

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
