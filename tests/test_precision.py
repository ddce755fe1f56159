"""fp16 models: the backward runs in fp32, relevance is finite and equals the fp32 model's, and is
close to the PyTorch references of the fp32 model (torch.autograd / LXT 2.1, no lrp_onnx code)."""
import numpy as np
import onnx
import pytest

from tests.conftest import cosine, explain_inputs, explain_model, model_feed

MIN_COSINE = 0.9999  # fp16 relevance vs the fp32 model's and vs the fp32 PyTorch reference (>= 0.99995 seen)


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
def test_fp16_relevance_matches_fp32(family, rules, fp16_model, tiny_model, reference):
    half = fp16_model(family)
    assert onnx.load(half).graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    inputs = explain_inputs(family)
    full, reduced = (explain_model(path, model_feed(family), rules, target=inputs["target"],
                                   position=inputs.get("position")) for path in (tiny_model(family)[1], half))
    assert reduced.relevance.dtype == np.float32 and np.isfinite(reduced.relevance).all()
    assert cosine(reduced.relevance, full.relevance) >= MIN_COSINE
    assert cosine(reduced.relevance, reference(family, rules)["relevance"]) >= MIN_COSINE
    np.testing.assert_allclose(reduced.logit, full.logit, rtol=2e-2, atol=2e-2)
