"""The converted model's original outputs equal the original model's under the session options a user
runs (onnxruntime defaults: all graph optimizations), for fp32, fp16 and quantize_dynamic'd int8 graphs.

The backward must not read a tensor that an onnxruntime fusion hides (a norm's statistics, a GELU's
input, a dynamic quantization scale), nor, in half-precision graphs, any fp16 intermediate (the CPU
provider runs fp16 chains in fp32 and keeps a node in fp16 once another node reads its output):
lrp_onnx/passes/remat.py recomputes those in the backward. Here the fused forward kernels must survive the
conversion and the outputs must be bit-identical; the fp16 bert has embeddings whose sum exceeds the
fp16 range before its LayerNorm (the original, run in fp32 on CPU, is finite; a forward that stored
that sum in fp16 gave NaN logits everywhere)."""
import collections

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import lrp_onnx
from lrp_onnx.run.session import input_defaults
from tests.conftest import explain_inputs

FAMILIES = ["bert", "gpt2", "llama", "t5"]
PRECISIONS = ["fp32", "fp16", "int8"]
FUSED = {"LayerNormalization", "SimplifiedLayerNormalization", "SkipLayerNormalization",
         "SkipSimplifiedLayerNormalization", "Gelu", "BiasGelu", "FastGelu", "QuickGelu", "DynamicQuantizeMatMul",
         "MatMulIntegerToFloat"}


def _large_fp16(family, path):
    """The tiny model in fp16 with large activations: bert's word and position embeddings offset by
    33000 each (their sum, ~66000, overflows fp16; LayerNorm removes the offset), the others' input
    embeddings scaled to a peak of 3000 (gpt2, tied to its head) or 20000 (RMSNorm families)."""
    import torch
    from models import tiny

    model = tiny.build(family, seed=0)
    table = model.get_input_embeddings().weight
    with torch.no_grad():
        if family == "bert":
            table.mul_(1000 / table.abs().max()).add_(33000.0)
            model.bert.embeddings.position_embeddings.weight.add_(33000.0)
        else:
            table.mul_((3000.0 if family == "gpt2" else 20000.0) / table.abs().max())
    return tiny.export(model.half(), path)


@pytest.fixture(scope="module")
def model_path(tiny_model, workdir):
    cache = {}

    def get(family, precision):
        key = (family, precision)
        if key not in cache:
            path = tiny_model(family)[1]
            if precision == "fp16":
                path = _large_fp16(family, workdir / f"{family}-fp16-large.onnx")
            elif precision == "int8":
                from onnxruntime.quantization import QuantType, quantize_dynamic

                quantized = workdir / f"{family}-int8-dynamic.onnx"
                quantize_dynamic(str(path), str(quantized), weight_type=QuantType.QInt8)
                path = quantized
            cache[key] = path
        return cache[key]

    return get


def _session(model, optimized_path=None):
    options = ort.SessionOptions()  # onnxruntime's defaults: ORT_ENABLE_ALL
    options.log_severity_level = 3
    if optimized_path is not None:
        options.optimized_model_filepath = str(optimized_path)
    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])


def _fused_kernels(path):
    """Fused kernels of the forward in an optimized graph (those of the backward write lrp/ tensors)."""
    return collections.Counter(n.op_type for n in onnx.load(str(path)).graph.node
                               if n.op_type in FUSED and not any(o.startswith("lrp/") for o in n.output))


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("family", FAMILIES)
def test_original_outputs_bit_identical_under_default_session(family, precision, model_path, tmp_path):
    path = model_path(family, precision)
    inputs = explain_inputs(family)
    feed = {k: inputs[k] for k in ("input_ids", "attention_mask", "decoder_input_ids") if k in inputs}
    original = _session(path, tmp_path / "original.opt.onnx").run(["logits"], feed)[0]
    assert np.isfinite(original).all()
    converted = lrp_onnx.convert(path, rules="attnlrp")
    explainer = lrp_onnx.Explainer.from_model(converted, providers=["CPUExecutionProvider"])
    result = explainer.run(target=inputs["target"], position=inputs.get("position"), **feed)
    session = _session(converted, tmp_path / "converted.opt.onnx")
    got = session.run(["logits"], {**input_defaults(session), **feed})[0]
    # the same fused kernels, and (fp32 round-off allowed, none seen) the same numbers
    assert _fused_kernels(tmp_path / "converted.opt.onnx") == _fused_kernels(tmp_path / "original.opt.onnx")
    scale = np.abs(original.astype(np.float64)).max()
    assert np.abs(got.astype(np.float64) - original).max() <= 1e-6 * scale
    np.testing.assert_array_equal(result.outputs["logits"], original)
    assert np.isfinite(result.relevance).all() and np.abs(result.relevance).max() > 0


def test_dynamic_quantization_scale_is_recomputed():
    """A quantized MatMul whose scale product the backward must read (here behind an Identity): the
    activation's DynamicQuantizeLinear scale is recomputed from x, never read, and the gradient is the
    exact one with the dequantized weight."""
    from onnx import TensorProto as T, helper as h, numpy_helper as nh

    rng = np.random.default_rng(0)
    k, n = 8, 5
    weight = rng.integers(-127, 127, (k, n)).astype(np.int8)
    b_scale = np.float32(0.02)
    nodes = [h.make_node("DynamicQuantizeLinear", ["x"], ["xq", "a_scale", "a_zp"]),
             h.make_node("MatMulInteger", ["xq", "W", "a_zp"], ["acc"]),
             h.make_node("Cast", ["acc"], ["accf"], to=T.FLOAT),
             h.make_node("Mul", ["a_scale", "b_scale"], ["s0"]),
             h.make_node("Identity", ["s0"], ["s"]),
             h.make_node("Mul", ["accf", "s"], ["logits"])]
    graph = h.make_graph(nodes, "q", [h.make_tensor_value_info("x", T.FLOAT, [2, 3, k])],
                         [h.make_tensor_value_info("logits", T.FLOAT, [2, 3, n])],
                         [nh.from_array(weight, "W"), nh.from_array(np.array(b_scale), "b_scale")])
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])
    converted = lrp_onnx.convert(model, rules="gradient", source="x")
    assert not [m.name for m in converted.graph.node if m.name.startswith("lrp/") and
                {"a_scale", "s0", "s"} & set(m.input)]
    x = rng.normal(size=(2, 3, k)).astype(np.float32)
    result = lrp_onnx.Explainer.from_model(converted, providers=["CPUExecutionProvider"]).run(
        x=x, target=np.array([1, 3]))
    seed = np.zeros((2, 3, n), np.float32)
    seed[0, -1, 1] = seed[1, -1, 3] = 1
    expected = x * (seed @ (weight.astype(np.float32) * b_scale).T)
    np.testing.assert_allclose(result.relevance, expected, rtol=1e-6, atol=1e-7)
    session = _session(converted)
    np.testing.assert_array_equal(session.run(["logits"], {**input_defaults(session), "x": x})[0],
                                  _session(model).run(["logits"], {"x": x})[0])
