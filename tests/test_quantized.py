"""QDQ-quantized models (onnxruntime.quantization, QuantizeLinear/DequantizeLinear around MatMul and
Gemm): dequantization is linear, activation rounding passes relevance straight through, and the
relevance stays close to the float model's (the quantized model is a slightly different function)."""
import numpy as np
import pytest

import lrp_onnx
from tests.conftest import explain_inputs

MIN_COSINE = {"gradient": 0.99, "attnlrp": 0.9, "cp-lrp": 0.9}


@pytest.fixture(scope="module")
def qdq_bert(tiny_model, workdir):
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    from models import tiny

    class Calibration(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{k: v.numpy() for k, v in tiny.example_inputs(2, 7, seed=i).items()}
                                 for i in range(8)])

        def get_next(self):
            return next(self.batches, None)

    out = workdir / "bert-qdq.onnx"
    quantize_static(str(tiny_model("bert")[1]), str(out), Calibration(), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Gemm"])
    return out


@pytest.mark.parametrize("rules", ["gradient", "attnlrp", "cp-lrp"])
def test_qdq_bert_relevance_close_to_float_model(rules, qdq_bert, tiny_model):
    report = lrp_onnx.inspect_model(qdq_bert, rules=rules)
    assert report.supported
    assert sum(rule == "straight_through" for _, _, rule in report.rows) >= 20  # every activation QDQ pair
    inputs = explain_inputs("bert")
    feed = {k: inputs[k] for k in ("input_ids", "attention_mask")}
    results = [lrp_onnx.Explainer.from_model(lrp_onnx.convert(p, rules=rules), providers=["CPUExecutionProvider"])
               .run(target=inputs["target"], **feed) for p in (tiny_model("bert")[1], qdq_bert)]
    a, b = (r.relevance.ravel().astype(np.float64) for r in results)
    assert results[1].relevance.dtype == np.float32 and np.isfinite(b).all()
    assert a @ b / (np.linalg.norm(a) * np.linalg.norm(b)) >= MIN_COSINE[rules]
    np.testing.assert_allclose(results[1].logit, results[0].logit, rtol=0.05, atol=0.05)
