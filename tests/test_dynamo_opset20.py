"""Dynamo exports beyond test_parity's opset 18: at opset 20 BERT's GELU becomes the `Gelu` op
(TorchScript and opset 18 write it out with Erf), and with transformers' SDPA attention the graph
masks and scales attention differently. Relevance equals the same references (torch.autograd,
LXT 2.1) or the eager export's."""
import numpy as np
import onnx
import pytest

import lrp_onnx
from tests.conftest import TOLERANCE, explainer_for, rel_l2
from tests.conftest import run_explainer as run

RULES = ["gradient", "attnlrp", "cp-lrp"]


@pytest.fixture(scope="module")
def opset20_models(tiny_model, workdir):
    from models import tiny

    paths = {}
    for family in ("bert", "gpt2", "llama"):
        hf_dir, _ = tiny_model(family)
        paths[family] = tiny.export(tiny.load(family, hf_dir), workdir / f"{family}-opset20" / "model.onnx",
                                    exporter="dynamo", opset=20)
    return paths


def test_opset20_export_uses_gelu_op(opset20_models):
    model = onnx.load(opset20_models["bert"], load_external_data=False)
    assert next(o.version for o in model.opset_import if o.domain == "") == 20
    ops = {n.op_type for n in model.graph.node}
    assert "Gelu" in ops and "LayerNormalization" in ops and "Erf" not in ops


# BERT in every rule set (the Gelu op: the identity rule under attnlrp/cp-lrp, the exact gradient
# otherwise); GPT-2 and LLaMA in one rule set each (their opset-18 dynamo exports are checked in all
# three by test_parity)
@pytest.mark.parametrize("family,rules", [("bert", r) for r in RULES] + [("gpt2", "attnlrp"), ("llama", "cp-lrp")])
def test_opset20_relevance_equals_reference(family, rules, opset20_models, reference):
    path = opset20_models[family]
    assert lrp_onnx.inspect_model(path, rules=rules).supported
    result = run(explainer_for(path, rules), family)
    ref = reference(family, rules)
    assert rel_l2(result.relevance, ref["relevance"]) <= TOLERANCE[rules]
    np.testing.assert_allclose(result.outputs["logits"], ref["logits"], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_sdpa_attention_export_equals_eager_export(family, tiny_model, converted, workdir, reference):
    """With transformers' SDPA attention the dynamo graph computes attention differently (masks as
    additive Where guards, scaling folded into the query); relevance equals the eager export's."""
    from models import tiny
    from tests.conftest import explain_inputs

    hf_dir, _ = tiny_model(family)
    model = tiny.load(family, hf_dir)
    model.config._attn_implementation = "sdpa"  # chosen per forward call in transformers 4.52
    path = tiny.export(model, workdir / f"{family}-sdpa" / "model.onnx", exporter="dynamo")
    inputs = explain_inputs(family)
    for rules in RULES:
        sdpa = run(explainer_for(path, rules), family)
        eager = run(converted(family, "dynamo", rules), family)
        assert rel_l2(sdpa.relevance, eager.relevance) <= 1e-5
        # independent of lrp_onnx: torch.autograd / LXT 2.1 on the same weights
        assert rel_l2(sdpa.relevance, reference(family, rules)["relevance"]) <= TOLERANCE[rules]
        np.testing.assert_allclose(sdpa.outputs["logits"], eager.outputs["logits"], rtol=1e-4, atol=1e-4)
    assert inputs["attention_mask"][1].sum() < inputs["attention_mask"].shape[1]  # the padded row is in it
