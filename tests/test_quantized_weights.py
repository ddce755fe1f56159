"""Quantized constant weights stay quantized in the converted model under onnxruntime's default session
options (issue 21): the backward dequantizes them with DequantizeLinear, which onnxruntime does not
constant-fold, so the optimized converted model holds about as much float initializer data as the
optimized original — a folded dequantization would add 4 bytes per int8 weight, 8 per 4-bit one.
Every form onnxruntime's tools write for a tiny BERT: quantize_dynamic (MatMulInteger), the same after
onnxruntime's optimizations (DynamicQuantizeMatMul / MatMulIntegerToFloat), MatMulNBits 4 and 8 bit, and
quantize_static QDQ and QOperator."""
import numpy as np
import onnx
import onnxruntime as ort
import pytest

import lrp_onnx
from tests.conftest import CPU, quantize_static_tiny

FORMS = ["dynamic", "dynamic+ort-optimized", "nbits4", "nbits8", "qdq", "qoperator"]
QUANTIZED_TYPES = (onnx.TensorProto.INT8, onnx.TensorProto.UINT8)


def _quantize(form, src, dst):
    from onnxruntime.quantization import QuantType, quantize_dynamic

    if form.startswith("dynamic"):
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8)
        if form.endswith("optimized"):
            options = ort.SessionOptions()
            options.optimized_model_filepath = str(dst)
            ort.InferenceSession(str(dst), options, providers=CPU)
    elif form.startswith("nbits"):
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        quantizer = MatMulNBitsQuantizer(onnx.load(str(src)), bits=int(form[5:]), block_size=32, is_symmetric=False)
        quantizer.process()
        quantizer.model.save_model_to_file(str(dst))
    else:
        quantize_static_tiny(src, dst, "QDQ" if form == "qdq" else "QOperator", batches=4,
                             activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                             op_types_to_quantize=["MatMul", "Gemm"])
    return dst


def _float_bytes_under_default_options(model, out):
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(out)
    options.log_severity_level = 3
    ort.InferenceSession(model if isinstance(model, str) else model.SerializeToString(), options, providers=CPU)
    optimized = onnx.load(str(out))
    return sum(onnx.numpy_helper.to_array(t).nbytes for t in optimized.graph.initializer
               if t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16))


@pytest.mark.parametrize("form", FORMS)
def test_no_weight_is_dequantized_at_session_creation(form, tiny_model, workdir, tmp_path):
    path = _quantize(form, tiny_model("bert")[1], workdir / f"bert-weights-{form}.onnx")
    model = onnx.load(str(path))
    weights = [t for t in model.graph.initializer if t.data_type in QUANTIZED_TYPES and len(t.dims) >= 2]
    quantized_weight_count = sum(int(np.prod(t.dims)) for t in weights)  # bytes for int8; 2 weights a byte packed
    assert quantized_weight_count > 5000
    original = _float_bytes_under_default_options(str(path), tmp_path / "original.onnx")
    converted = _float_bytes_under_default_options(lrp_onnx.convert(str(path)), tmp_path / "converted.onnx")
    # a folded dequantization adds >= 4 bytes per stored byte; scales, zero points, the seed's constants stay small
    assert converted - original < 0.5 * quantized_weight_count, (converted, original, quantized_weight_count)


@pytest.mark.parametrize("form,memory", [("nbits4", "fast"), ("nbits4", "lean"), ("dynamic", "fast")])
def test_explainer_prepacks_n_bit_weights_only(form, memory, tiny_model, workdir, tmp_path):
    """Pre-packed, MatMulNBits weights compute what a default session does (docs/quantized.md); float and
    int8 models keep prepacking off (a packed copy of each weight the backward also reads), and so do
    lean conversions (the backward reads the packed bytes: pre-packing would keep a second copy). The
    converted model's metadata says which, read by Explainer without parsing the graph (model_metadata)."""
    from lrp_onnx.run.session import model_metadata

    path = _quantize(form, tiny_model("bert")[1], workdir / f"bert-weights-{form}.onnx")
    lrp_onnx.convert(str(path), str(tmp_path / "m.lrp.onnx"), memory=memory)
    assert model_metadata(str(tmp_path / "m.lrp.onnx")) == {
        p.key: p.value for p in onnx.load(str(tmp_path / "m.lrp.onnx")).metadata_props}
    explainer = lrp_onnx.Explainer(str(tmp_path / "m.lrp.onnx"), providers=CPU)
    prepacked = form == "nbits4" and memory == "fast"
    assert explainer.meta["prepack"] is prepacked
    assert _has_entry(explainer.session.get_session_options(), "session.disable_prepacking") is not prepacked


def _has_entry(options, key):
    try:
        return options.get_session_config_entry(key) == "1"
    except RuntimeError:
        return False
