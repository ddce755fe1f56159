"""onnxruntime's QOperator quantized form (quantize_static(..., quant_format=QuantFormat.QOperator)):
QLinearMatMul, QLinearConv, QGemm, QLinearAdd, QLinearMul, QLinearSoftmax, QLinearSigmoid,
QLinearLeakyRelu, QLinearConcat compute on uint8/int8 tensors with their scales and zero points. Each is
rewritten to the QDQ form it stands for: its inputs dequantized (DequantizeLinear), the float op, its
output quantized again (QuantizeLinear). The relevance then flows in float as in a QDQ model: an
activation's QuantizeLinear -> DequantizeLinear pair passes it straight through, and a constant weight
is dequantized inside the run (no runtime constant-folds a DequantizeLinear). The forward computes the
same quantized values up to the rounding of a float accumulation (an integer kernel accumulates exactly):
a value on a rounding boundary may land one quantization step away. Other QLinear* ops stay as they
are, and the analysis refuses them by node.
"""
from __future__ import annotations

import onnx
from onnx import helper

MS = "com.microsoft"
# op type -> (domain, positions of (tensor, scale, zero point) inputs, position of (y_scale, y_zero_point))
ELEMENTWISE = {
    "QLinearAdd": ("Add", [(0, 1, 2), (3, 4, 5)], (6, 7)),
    "QLinearMul": ("Mul", [(0, 1, 2), (3, 4, 5)], (6, 7)),
    "QLinearSigmoid": ("Sigmoid", [(0, 1, 2)], (3, 4)),
    "QLinearLeakyRelu": ("LeakyRelu", [(0, 1, 2)], (3, 4)),
    "QLinearSoftmax": ("Softmax", [(0, 1, 2)], (3, 4)),
}


def qoperator_to_qdq(model: onnx.ModelProto) -> int:
    """Rewrite the model's QOperator nodes in place (the private copy); returns how many."""
    g = model.graph
    out, count = [], 0
    for n in g.node:
        new = _rewrite(n)
        if new is None:
            out.append(n)
        else:
            out.extend(new)
            count += 1
    if count:
        del g.node[:]
        g.node.extend(out)
    return count


def _get(inputs, k):
    return inputs[k] if k < len(inputs) and inputs[k] else ""


def _rewrite(n: onnx.NodeProto):
    name = n.name or f"{n.op_type}_{n.output[0]}"
    nodes = []

    def dq(x, scale, zero, axis=None, tag="x"):
        out = f"{name}/dequantized_{tag}"
        kwargs = {} if axis is None else {"axis": axis}
        nodes.append(helper.make_node("DequantizeLinear", [x, scale, zero] if zero else [x, scale], [out],
                                      name=f"{name}/DequantizeLinear_{tag}", **kwargs))
        return out

    def q(y, scale, zero):
        nodes.append(helper.make_node("QuantizeLinear", [y, scale, zero] if zero else [y, scale], [n.output[0]],
                                      name=f"{name}/QuantizeLinear"))

    attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
    inputs = list(n.input)
    y = f"{name}/float_output"
    if n.op_type == "QLinearMatMul" and n.domain in ("", "ai.onnx"):
        a = dq(inputs[0], inputs[1], _get(inputs, 2), tag="a")
        b = dq(inputs[3], inputs[4], _get(inputs, 5), axis=-1, tag="b")
        nodes.append(helper.make_node("MatMul", [a, b], [y], name=f"{name}/MatMul"))
        q(y, inputs[6], _get(inputs, 7))
    elif n.op_type == "QLinearConv" and n.domain in ("", "ai.onnx"):
        x = dq(inputs[0], inputs[1], _get(inputs, 2), tag="x")
        w = dq(inputs[3], inputs[4], _get(inputs, 5), axis=0, tag="w")
        conv_inputs = [x, w]
        if _get(inputs, 8):  # int32 bias at scale x_scale * w_scale, zero point 0
            conv_inputs.append(_bias(nodes, name, inputs[8], inputs[1], inputs[4]))
        nodes.append(helper.make_node("Conv", conv_inputs, [y], name=f"{name}/Conv", **attrs))
        q(y, inputs[6], _get(inputs, 7))
    elif n.op_type == "QGemm" and n.domain == MS:
        a = dq(inputs[0], inputs[1], _get(inputs, 2), tag="a")
        b = dq(inputs[3], inputs[4], _get(inputs, 5), axis=0 if attrs.get("transB", 0) else -1, tag="b")
        gemm_inputs = [a, b]
        if _get(inputs, 6):
            gemm_inputs.append(_bias(nodes, name, inputs[6], inputs[1], inputs[4]))
        if _get(inputs, 7):  # quantized output
            nodes.append(helper.make_node("Gemm", gemm_inputs, [y], name=f"{name}/Gemm", **attrs))
            q(y, inputs[7], _get(inputs, 8))
        else:  # float output
            nodes.append(helper.make_node("Gemm", gemm_inputs, [n.output[0]], name=f"{name}/Gemm", **attrs))
    elif n.op_type in ELEMENTWISE and n.domain == MS:
        op, operands, (ys, yz) = ELEMENTWISE[n.op_type]
        if op == "Softmax" and attrs.get("opset", 13) < 13 and attrs.get("axis", -1) != -1:
            return None  # the flattening Softmax of opset < 13 over a middle axis: left to be refused
        xs = [dq(inputs[t], inputs[s], _get(inputs, z), tag=f"in{k}") for k, (t, s, z) in enumerate(operands)]
        op_attrs = {"axis": attrs["axis"]} if op == "Softmax" and "axis" in attrs else \
            {"alpha": attrs["alpha"]} if op == "LeakyRelu" and "alpha" in attrs else {}
        nodes.append(helper.make_node(op, xs, [y], name=f"{name}/{op}", **op_attrs))
        q(y, inputs[ys], _get(inputs, yz))
    elif n.op_type == "QLinearConcat" and n.domain == MS:
        triples = [inputs[k:k + 3] for k in range(2, len(inputs), 3)]
        xs = [dq(t, s, z, tag=f"in{k}") for k, (t, s, z) in enumerate(triples)]
        nodes.append(helper.make_node("Concat", xs, [y], name=f"{name}/Concat", axis=attrs.get("axis", 0)))
        q(y, inputs[0], _get(inputs, 1))
    else:
        return None
    return nodes


def _bias(nodes, name, bias, a_scale, b_scale):
    """An int32 bias quantized at scale a_scale * b_scale (per output channel when b_scale is), zero point 0."""
    scale = f"{name}/bias_scale"
    nodes.append(helper.make_node("Mul", [a_scale, b_scale], [scale], name=f"{name}/bias_scale"))
    out = f"{name}/dequantized_bias"
    nodes.append(helper.make_node("DequantizeLinear", [bias, scale], [out], name=f"{name}/DequantizeLinear_bias",
                                  axis=0))
    return out
