"""Parity with PyTorch: gradient mode equals autograd; attnlrp and cp-lrp equal LXT 2.1."""
import numpy as np
import pytest

from tests.conftest import CONSERVATION, TOLERANCE, explain_inputs, rel_l2
from tests.conftest import run_explainer as run

FAMILIES = ["bert", "gpt2", "llama"]
EXPORTERS = ["torchscript", "dynamo"]

@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("rules", ["gradient", "attnlrp", "cp-lrp"])
def test_relevance_equals_reference(family, exporter, rules, converted, reference):
    ref = reference(family, rules)
    result = run(converted(family, exporter, rules), family)
    assert result.relevance.shape == ref["relevance"].shape
    assert rel_l2(result.relevance, ref["relevance"]) <= TOLERANCE[rules]
    assert rel_l2(result.relevance.sum(-1), ref["relevance"].sum(-1)) <= TOLERANCE[rules]
    np.testing.assert_allclose(result.logit, ref["explained"], rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(result.target, ref["target"])
    # padded positions of row 1 get no relevance
    mask = explain_inputs(family)["attention_mask"]
    assert np.abs(result.relevance[mask == 0]).max(initial=0) <= 1e-6 * np.abs(result.relevance).max()
    CONSERVATION[(family, exporter, rules)] = result.relevance.sum(axis=(1, 2)) / result.logit


@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("family", FAMILIES)
def test_original_outputs_unchanged(family, exporter, tiny_model, converted):
    import onnxruntime as ort

    _, path = tiny_model(family, exporter)
    inputs = explain_inputs(family)
    feed = {k: inputs[k] for k in ("input_ids", "attention_mask")}
    original = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feed)
    result = run(converted(family, exporter, "attnlrp"), family)
    np.testing.assert_allclose(result.outputs["logits"], original[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_default_target_is_argmax_at_last_position(family, converted, tiny_model):
    explainer = converted(family, "torchscript", "attnlrp")
    inputs = explain_inputs(family)
    feed = {k: inputs[k][:1] for k in ("input_ids", "attention_mask")}
    result = explainer.run(**feed)
    logits = result.outputs["logits"]
    assert result.target[0] == logits[0, -1].argmax()
    np.testing.assert_allclose(result.logit[0], logits[0, -1].max(), rtol=1e-6)
