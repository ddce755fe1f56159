"""Parity for more decoder families LXT 2.1 supports: Qwen2, Qwen3 and (text-only) Gemma3.

Same protocol as test_parity.py (tiny random-weight models from models/tiny.py, fp32, batch 2
with a right-padded row and a different target and position per row, both exporters):
``gradient`` equals torch.autograd, ``attnlrp`` / ``cp-lrp`` equal LXT's ``attnLRP`` / ``cp_LRP``
maps (tests/reference.py).

Gemma3 exercises two classifications that LXT's maps imply: the final-logit softcap
``c * tanh(x / c)`` is category ``softcap`` (plain gradient, as LXT leaves it unpatched), and
TorchScript's gelu(approximate="tanh") -- whose 0.5 comes after the fused region -- is still seen as
the ``gate`` of the gated MLP (constant under cp-lrp, as LXT's stop_gradient(gate_proj(x))).
"""
import numpy as np
import pytest

import lrp_onnx
from tests.conftest import CONSERVATION, TOLERANCE, explain_inputs, exports, rel_l2
from tests.conftest import run_explainer as run

FAMILIES = ["qwen2", "qwen3", "gemma3"]
EXPORTERS = ["torchscript", "dynamo"]
RULES = ["gradient", "attnlrp", "cp-lrp"]


def check_outputs(result, ref, family):
    """Everything but the relevance values: explained logit, target, original output, padding."""
    assert result.relevance.shape == ref["relevance"].shape
    np.testing.assert_allclose(result.logit, ref["explained"], rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(result.target, ref["target"])
    # the original output is unchanged and equals PyTorch's logits
    np.testing.assert_allclose(result.outputs["logits"], ref["logits"], rtol=1e-4, atol=1e-4)
    # padded positions of row 1 get no relevance
    mask = explain_inputs(family)["attention_mask"]
    assert np.abs(result.relevance[mask == 0]).max(initial=0) <= 1e-6 * np.abs(result.relevance).max()


def check_parity(result, ref, family, rules):
    check_outputs(result, ref, family)
    assert rel_l2(result.relevance, ref["relevance"]) <= TOLERANCE[rules]
    assert rel_l2(result.relevance.sum(-1), ref["relevance"].sum(-1)) <= TOLERANCE[rules]


@pytest.mark.parametrize("rules", RULES)
@pytest.mark.parametrize("family,exporter", exports(FAMILIES))
def test_relevance_equals_reference(family, exporter, rules, tiny_model, converted, reference):
    _, path = tiny_model(family, exporter)
    assert lrp_onnx.inspect_model(path, rules=rules).supported
    result = run(converted(family, exporter, rules), family)
    ref = reference(family, rules)
    CONSERVATION[(family, exporter, rules)] = result.relevance.sum(axis=(1, 2)) / result.logit
    check_parity(result, ref, family, rules)


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_gemma3_softcap_and_gate_are_classified(exporter, tiny_model):
    _, path = tiny_model("gemma3", exporter)
    attn = lrp_onnx.inspect_model(path, rules="attnlrp").rows
    softcaps = [rule for _, cats, rule in attn if cats[0] == "softcap"]
    assert softcaps == ["gradient"]
    cp = lrp_onnx.inspect_model(path, rules="cp-lrp").rows
    gates = [(desc, rule) for desc, cats, rule in cp if cats[0] == "gate"]
    assert len(gates) == 2 and {rule for _, rule in gates} == {"constant"}  # one gated MLP per layer


def test_gpt2_contrastive_seed_equals_lxt_difference(tiny_model, converted, workdir):
    """GPT-2 with a contrastive seed (+1 on token 7, -1 on token 9 at each row's position): relevance
    equals LXT's attnLRP relevance for 7 minus LXT's for 9 (the rules are linear in the seed)."""
    from tests.reference import run_reference

    hf_dir, path = tiny_model("gpt2")
    inputs = explain_inputs("gpt2")
    seeded = lrp_onnx.Explainer.from_model(lrp_onnx.convert(path, rules="attnlrp", seed_input=True))
    batch, sequence = inputs["input_ids"].shape
    seed = np.zeros((batch, sequence, 100), np.float32)
    positions = inputs["position"] % sequence
    seed[np.arange(batch), positions, 7] = 1.0
    seed[np.arange(batch), positions, 9] = -1.0
    result = seeded.run(seed=seed, input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
    refs = {}
    for token in (7, 9):
        ref_inputs = dict(inputs, target=np.full(batch, token, np.int64))
        refs[token] = run_reference("gpt2", hf_dir, "attnlrp", ref_inputs, workdir / f"ref-contrast-{token}")
    expected = refs[7]["relevance"] - refs[9]["relevance"]
    assert rel_l2(result.relevance, expected) <= TOLERANCE["attnlrp"]
    explained = (result.outputs["logits"] * seed).sum(axis=(1, 2))  # what the seed explains, per row
    np.testing.assert_allclose(explained, refs[7]["explained"] - refs[9]["explained"], rtol=1e-4, atol=1e-5)
