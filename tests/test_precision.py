"""fp16 models: the backward runs in fp32, relevance is finite and equals the fp32 model's."""
import numpy as np
import onnx
import pytest

import lrp_onnx
from tests.conftest import explain_inputs


@pytest.fixture(scope="module")
def fp16_model(workdir):
    from models import tiny

    def get(family):
        path = workdir / f"{family}-fp16.onnx"
        if not path.exists():
            tiny.export(tiny.build(family, seed=0).half(), path)
        return path

    return get


@pytest.mark.parametrize("rules", ["gradient", "attnlrp", "cp-lrp"])
@pytest.mark.parametrize("family", ["bert", "gpt2", "llama"])
def test_fp16_relevance_matches_fp32(family, rules, fp16_model, tiny_model):
    half = fp16_model(family)
    assert onnx.load(half).graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    inputs = explain_inputs(family)
    feed = {k: inputs[k] for k in ("input_ids", "attention_mask")}
    results = []
    for path in (tiny_model(family)[1], half):
        explainer = lrp_onnx.Explainer.from_model(lrp_onnx.convert(path, rules=rules), providers=["CPUExecutionProvider"])
        results.append(explainer.run(target=inputs["target"], position=inputs.get("position"), **feed))
    full, reduced = results
    assert reduced.relevance.dtype == np.float32 and np.isfinite(reduced.relevance).all()
    a, b = full.relevance.ravel(), reduced.relevance.ravel()
    assert a @ b / (np.linalg.norm(a) * np.linalg.norm(b)) >= 0.999
    np.testing.assert_allclose(reduced.logit, full.logit, rtol=2e-2, atol=2e-2)
