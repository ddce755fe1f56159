"""Sparse mixture of experts: tiny random-weight Mixtral (4 SwiGLU experts, top-2 routing).

Same protocol as test_families.py (fp32, batch 2 with a right-padded row, a different target and
position per row, both exporters): ``gradient`` equals torch.autograd, ``attnlrp`` / ``cp-lrp``
equal the LXT-style reference of tests/reference.py (LXT 2.1 has no Mixtral map; the reference
patches the MoE block the way LXT's Qwen3-MoE patch does).

Rules checked here: under attnlrp the router softmax, top-k and renormalisation get the plain
gradient and routing weight x expert output the uniform rule (both operands carry relevance, as in
LXT); under cp-lrp the router is a constant (category ``router``), like attention probabilities and
gates, so the bias-free model is linear in the embeddings and relevance sums to the logit.
"""
import numpy as np
import pytest
import torch

import lrp_onnx
from models import tiny
from models._common import LogitsOnly, export_onnx
from tests.conftest import CONSERVATION, TOLERANCE, rel_l2
from tests.conftest import run_explainer as run
from tests.reference import compute_relevance
from tests.test_families import check_parity

FAMILY = "mixtral"
EXPORTERS = ["torchscript", "dynamo"]
RULES = ["gradient", "attnlrp", "cp-lrp"]
MOE_LAYERS = tiny.NUM_LAYERS * tiny.MIXTRAL_NUM_EXPERTS  # (layer, expert) pairs


@pytest.mark.parametrize("rules", RULES)
@pytest.mark.parametrize("exporter", EXPORTERS)
def test_relevance_equals_reference(exporter, rules, tiny_model, converted, reference):
    _, path = tiny_model(FAMILY, exporter)
    assert lrp_onnx.inspect_model(path, rules=rules).supported
    result = run(converted(FAMILY, exporter, rules), FAMILY)
    ref = reference(FAMILY, rules)
    ratio = result.relevance.sum(axis=(1, 2)) / result.logit
    CONSERVATION[(FAMILY, exporter, rules)] = ratio
    check_parity(result, ref, FAMILY, rules)
    # the original output of the converted graph equals that of the exported graph
    original = tiny.onnx_logits(path, {k: v for k, v in _feeds().items()})
    np.testing.assert_allclose(result.outputs["logits"], original, rtol=0, atol=1e-5)
    if rules == "cp-lrp":  # router, gates and attention constant, no biases: a linear model
        np.testing.assert_allclose(ratio, 1.0, atol=1e-4)


def _feeds():
    from tests.conftest import explain_inputs
    inputs = explain_inputs(FAMILY)
    return {k: inputs[k] for k in ("input_ids", "attention_mask")}


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_router_and_expert_products_are_classified(exporter, tiny_model):
    _, path = tiny_model(FAMILY, exporter)
    attn = lrp_onnx.inspect_model(path, rules="attnlrp").rows
    routers = [rule for _, cats, rule in attn if cats[0] == "router"]
    assert routers == ["gradient"] * tiny.NUM_LAYERS
    # per (layer, expert): the gate product act(w1 x) * w3 x and routing weight * expert output
    uniform_muls = [desc for desc, cats, rule in attn if cats == ["product", "Mul"] and rule == "uniform"]
    assert len(uniform_muls) == 2 * MOE_LAYERS
    gates = [rule for _, cats, rule in attn if cats[0] == "gate"]
    assert gates == ["identity"] * MOE_LAYERS
    cp = lrp_onnx.inspect_model(path, rules="cp-lrp").rows
    assert [rule for _, cats, rule in cp if cats[0] == "router"] == ["constant"] * tiny.NUM_LAYERS
    assert [rule for _, cats, rule in cp if cats[0] == "gate"] == ["constant"] * MOE_LAYERS
    # with router and gates constant, no Mul in the MoE block has two relevance-carrying operands
    assert not [desc for desc, cats, rule in cp if cats == ["product", "Mul"] and rule == "uniform"]


def test_export_routes_at_run_time(tmp_path):
    """Exported from ONE token (2 of 4 experts hit per layer), the graph still computes every expert
    for other inputs: models.tiny exports a forward that loops over all experts. (transformers'
    own forward loops over the experts hit by the example, so such an export would lose two.)"""
    model = tiny.build(FAMILY, seed=0)
    with tiny._moe_loops_over_all_experts(model):
        path = export_onnx(LogitsOnly(model), tmp_path / "one_token.onnx", tiny.example_inputs(1, 1), ["logits"])
    assert tiny.verify_export(model, path) < 1e-4  # batch 2 x 7, row 1 padded
    assert tiny.verify_export(model, path, tiny.example_inputs(3, 9, seed=5)) < 1e-4


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_experts_without_tokens(exporter, tiny_model, converted):
    """One token: top-2 of 4, so two experts per layer gather an empty batch, forward and backward."""
    hf_dir, _ = tiny_model(FAMILY, exporter)
    ids = np.array([[17]], dtype=np.int64)
    mask = np.ones_like(ids)
    result = converted(FAMILY, exporter, "gradient").run(target=np.array([5]), position=np.array([-1]),
                                                          input_ids=ids, attention_mask=mask)
    with torch.enable_grad():
        ref = compute_relevance(tiny.load(FAMILY, hf_dir), FAMILY, ids, mask, np.array([5]), np.array([-1]))
    np.testing.assert_allclose(result.logit, ref["explained"], rtol=1e-4, atol=1e-5)
    assert rel_l2(result.relevance, ref["relevance"]) <= TOLERANCE["gradient"]
