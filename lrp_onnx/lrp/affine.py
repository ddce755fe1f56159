"""Affine layers with constant weights, as rules that re-run a layer with modified weights see them.

A Conv, a Gemm, or a "linear" region (MatMul by a constant matrix, plus a constant bias Add) is
y = layer(x, W, b). The gamma rule needs to run the same layer on other inputs with other weights
(`apply`) and to multiply a gradient by a modified weight's transpose (`transpose`); the weights
are never read at conversion time: modified weights are nodes computed from the initializers
(onnxruntime folds them once, at session start).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from onnx import helper

from .analysis import Unit
from ..ir.builder import Builder
from ..ir.graph import attr, node_label
from .patterns import linear_parts
from ..vjp import conv_input_gradient, weight_input_gradient


@dataclass
class AffineLayer:
    x: str                                             # the input that carries relevance
    weight: str
    bias: str | None
    y: str                                             # the layer's output (bias included)
    apply: Callable[[str, str, str | None], str]       # (x, weight, bias or None) -> layer output
    transpose: Callable[[str, str], str]               # (g like y, weight) -> weight^T g, shaped like x


def affine_layer(b: Builder, unit: Unit) -> AffineLayer:
    """The unit as an affine layer, or NotImplementedError saying why it is not one."""
    view = b.view
    if unit.region is not None:
        if unit.region.kind != "linear":
            raise NotImplementedError(f"{unit.region.pattern} is not a Conv or linear layer")
        x, w, bias = linear_parts(view, unit.region)
        y = unit.outputs[0]

        def apply_linear(x_, w_, bias_):
            out = b.op("MatMul", [x_, w_], like=y)
            return b.add(out, bias_, like=y) if bias_ else out

        def transpose_linear(g, w_):  # w_: the weight or one computed from it (constant, 2-D)
            return weight_input_gradient(b, g, w_, x)

        return AffineLayer(x, w, bias, y, apply_linear, transpose_linear)
    node = view.nodes[unit.nodes[0]]
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    x, w = node.input[0], node.input[1]
    bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
    y = node.output[0]
    if node.op_type == "Conv":
        def apply_conv(x_, w_, bias_):
            return b.op("Conv", [x_, w_] + ([bias_] if bias_ else []), like=y, **attrs)

        return AffineLayer(x, w, bias, y, apply_conv, lambda g, w_: conv_input_gradient(b, node, g, w_))
    if node.op_type == "Gemm":
        alpha, beta, trans_b = attr(node, "alpha", 1.0), attr(node, "beta", 1.0), attr(node, "transB", 0)
        if attr(node, "transA", 0) or alpha <= 0 or (bias and beta <= 0):
            raise NotImplementedError(f"{node_label(node)}: a Gemm with transA=1 or non-positive alpha/beta "
                                      f"is not a plain linear layer")

        def apply_gemm(x_, w_, bias_):
            return b.op("Gemm", [x_, w_] + ([bias_] if bias_ else []), like=y, **attrs)

        def transpose_gemm(g, w_):
            return weight_input_gradient(b, g, w_, x, trans_w=trans_b, alpha=alpha)

        return AffineLayer(x, w, bias, y, apply_gemm, transpose_gemm)
    raise NotImplementedError(f"{node_label(node)} is not a Conv or linear layer")
