"""Dynamically quantized models: onnxruntime.quantization.quantize_dynamic (DynamicQuantizeLinear ->
MatMulInteger -> Cast -> Mul, int8 embedding tables -> DequantizeLinear), the same model after
onnxruntime's session optimizations (DynamicQuantizeMatMul, MatMulIntegerToFloat, FusedMatMul) and
weight-only MatMulNBits (MatMulNBitsQuantizer). Dequantization is linear: relevance flows in float,
each quantized MatMul's backward is the float gradient with its dequantized weight."""
import collections

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import lrp_onnx
from tests import handbuilt as hb
from tests.conftest import explain_inputs, rel_l2

RULES = ["gradient", "attnlrp", "cp-lrp"]
FORMS = {  # name: ops that must be present
    "quantize_dynamic": {"DynamicQuantizeLinear", "MatMulInteger", "DequantizeLinear"},
    "quantize_dynamic+ort-optimized": {"DynamicQuantizeMatMul", "MatMulIntegerToFloat", "FusedMatMul"},
    "matmul_nbits_8bit": {"MatMulNBits"},
}


def _session_optimized(src, dst):
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(dst)
    options.log_severity_level = 3
    ort.InferenceSession(str(src), options, providers=["CPUExecutionProvider"])
    return dst


def _nbits(src, dst, bits, symmetric, block_size=16):
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    quantizer = MatMulNBitsQuantizer(onnx.load(str(src)), bits=bits, block_size=block_size, is_symmetric=symmetric)
    quantizer.process()
    quantizer.model.save_model_to_file(str(dst))
    return dst


@pytest.fixture(scope="module")
def quantized_bert(tiny_model, workdir):
    from onnxruntime.quantization import QuantType, quantize_dynamic

    float_path = tiny_model("bert")[1]
    dq = workdir / "bert-dynamic.onnx"
    quantize_dynamic(str(float_path), str(dq), weight_type=QuantType.QInt8)
    return {"quantize_dynamic": dq,
            "quantize_dynamic+ort-optimized": _session_optimized(dq, workdir / "bert-dynamic-ort.onnx"),
            "matmul_nbits_8bit": _nbits(float_path, workdir / "bert-nbits8.onnx", 8, False)}


@pytest.mark.parametrize("form", list(FORMS))
def test_quantized_bert_relevance_close_to_float_model(form, quantized_bert, tiny_model):
    path = quantized_bert[form]
    ops = collections.Counter(n.op_type for n in onnx.load(path).graph.node)
    assert FORMS[form] <= set(ops), FORMS[form] - set(ops)
    inputs = explain_inputs("bert")
    feed = {k: inputs[k] for k in ("input_ids", "attention_mask")}
    kernel_logits = hb.ort_run(onnx.load(path), feed)
    for rules in RULES:
        results = []
        for p in (tiny_model("bert")[1], path):
            converted = lrp_onnx.convert(p, rules=rules)
            results.append(lrp_onnx.Explainer.from_model(converted, providers=["CPUExecutionProvider"])
                           .run(target=inputs["target"], **feed))
        np.testing.assert_allclose(hb.ort_run(converted, feed), kernel_logits, rtol=1e-5, atol=1e-6)
        assert np.isfinite(results[1].relevance).all()
        assert hb.cosine(results[1].relevance, results[0].relevance) >= 0.99, rules  # >= 0.998 seen


# -- one quantized layer: gradient x input against the exact dequantized weight ------------------------
K, N = 32, 8


def _layer(workdir, form):
    """(model, dequantized weight [K, N]) for x [B, S, K] -> logits [B, S, N] through one quantized MatMul."""
    w, w2 = hb.weights(11, K, N), hb.weights(12, K, N)
    shared = "shared" in form or form == "matmul_integer_to_float"  # x @ w + x @ w2: one quantized x
    nodes = [helper.make_node("MatMul", ["x", "w"], ["logits" if not shared else "y1"], name="layer")]
    if shared:
        nodes += [helper.make_node("MatMul", ["x", "w2"], ["y2"], name="layer2"),
                  helper.make_node("Add", ["y1", "y2"], ["logits"], name="sum")]
    graph = helper.make_graph(nodes, "layer", [hb.float_input(shape=(hb.B, hb.S, K))],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [hb.B, hb.S, N])],
                              [numpy_helper.from_array(w, "w")] + ([numpy_helper.from_array(w2, "w2")] if shared else []))
    src = workdir / "layer-float.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), src)
    dst = workdir / f"layer-{form}.onnx"
    if form.startswith("nbits"):
        bits, symmetric, block = {"nbits4-symmetric": (4, True, 16), "nbits4-zero-points": (4, False, 16),
                                  "nbits4-padded": (4, False, 2 * K), "nbits8": (8, False, 16)}[form]
        model = onnx.load(_nbits(src, dst, bits, symmetric, block))  # padded: K < one block
        # the weight is all that is quantized: the kernel's output for the rows of I_K is W dequantized
        eye = np.broadcast_to(np.eye(K, dtype=np.float32), (hb.B, K, K)).copy()
        probe = onnx.ModelProto()
        probe.CopyFrom(model)
        probe.graph.output[0].type.tensor_type.shape.dim[1].dim_value = K
        probe.graph.input[0].type.tensor_type.shape.dim[1].dim_value = K
        return model, hb.ort_run(probe, {"x": eye})[0]
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(src), str(dst), weight_type=QuantType.QUInt8 if form == "matmul_integer_uint8"
                     else QuantType.QInt8, per_channel=form == "matmul_integer_per_channel")
    if form in ("dynamic_quantize_matmul", "matmul_integer_to_float"):
        dst = _session_optimized(dst, workdir / f"layer-{form}-ort.onnx")
    model = onnx.load(dst)
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}

    def dequantized(name):
        q, scale, zero = (inits[f"{name}_{suffix}"] for suffix in ("quantized", "scale", "zero_point"))
        if form == "matmul_integer_per_channel":
            assert scale.shape == (N,)
        return (q.astype(np.float64) - zero) * scale

    return model, dequantized("w") + (dequantized("w2") if shared else 0)


LAYER_FORMS = ["matmul_integer", "matmul_integer_uint8", "matmul_integer_per_channel", "matmul_integer_shared",
               "dynamic_quantize_matmul", "matmul_integer_to_float", "nbits4-symmetric", "nbits4-zero-points", "nbits4-padded", "nbits8"]
LAYER_OPS = {"matmul_integer": "MatMulInteger", "matmul_integer_uint8": "MatMulInteger",
             "matmul_integer_per_channel": "MatMulInteger", "matmul_integer_shared": "MatMulInteger",
             "dynamic_quantize_matmul": "DynamicQuantizeMatMul", "matmul_integer_to_float": "MatMulIntegerToFloat"}


@pytest.mark.parametrize("form", LAYER_FORMS)
def test_quantized_layer_gradient_is_exact(form, workdir):
    model, w = _layer(workdir, form)
    assert LAYER_OPS.get(form, "MatMulNBits") in {n.op_type for n in model.graph.node}
    x = np.random.default_rng(3).standard_normal((hb.B, hb.S, K)).astype(np.float32)
    for rules in RULES:  # one linear layer: every rule set is gradient x input
        result, forward = hb.relevance(model, rules, {"x": x})
        np.testing.assert_allclose(forward, hb.ort_run(model, {"x": x}), rtol=1e-6, atol=1e-6)
        expected = np.zeros((hb.B, hb.S, K))
        for b, (t, p) in enumerate(zip(hb.TARGET, hb.POSITION)):
            expected[b, p] = x[b, p] * w[:, t]
        assert rel_l2(result.relevance, expected) <= 2e-7, rules  # <= 4.4e-8 seen (0 for MatMulNBits)
