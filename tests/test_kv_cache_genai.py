"""onnxruntime-genai's model builder form of a KV-cache LLaMA (issue #13): GroupQueryAttention (packed QKV,
do_rotary on cos/sin caches, seqlens_k / total_sequence_length from the attention mask) with
past_key_values.* inputs and present.* outputs, written by the builder itself (models/genai.py) for a tiny
random-weight LlamaForCausalLM.

The builder's file converts as it is (lrp_onnx/passes/cache.py binds the past inputs to empty tensors and empties
GroupQueryAttention's past slots), and:
* its forward equals onnxruntime's run of the builder's graph with empty past tensors (logits and the
  present key/value outputs);
* its relevance equals that of the no-cache export of the same weights (models.tiny's TorchScript
  export), in all three rule sets, and the PyTorch reference (autograd for gradient, LXT for attnlrp /
  cp-lrp) of the Hugging Face model.
"""
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import lrp_onnx
from models import genai, tiny
from tests.conftest import CPU, TOLERANCE, explain_inputs, rel_l2
from tests.reference import run_reference

RULES = ["attnlrp", "cp-lrp", "gradient"]
SAME_WEIGHTS_BOUND = 1e-4  # relative L2, builder graph vs no-cache export (issue #13); seen <= 2e-6
INPUTS = explain_inputs("llama")  # batch 2, sequence 7, row 1 right-padded; targets [7, 42], positions [-1, 4]
FEED = {k: INPUTS[k] for k in ("input_ids", "attention_mask")}
VALID = INPUTS["attention_mask"].astype(bool)


@pytest.fixture(scope="module")
def exports(workdir):
    """{"hf", "genai", "no_cache"}: the builder's model.onnx and the no-cache export of the same weights."""
    out = workdir / "genai-llama"
    return {"hf": genai.hf_dir(out), "genai": genai.export_genai(out), "no_cache": genai.export_no_cache(out)}


@pytest.fixture(scope="module")
def builder_run(exports):
    """onnxruntime's run of the builder's graph as is, past_key_values.* fed empty: name -> array."""
    session = ort.InferenceSession(str(exports["genai"]), providers=CPU)
    values = session.run(None, {**FEED, **genai.empty_past(exports["genai"], 2)})
    return dict(zip([o.name for o in session.get_outputs()], values))


def _explain(model, rules, target=None, out=None):
    if out is not None:  # a file with external data: converted to a file beside it
        lrp_onnx.convert(model, out, rules=rules)
        explainer = lrp_onnx.Explainer(out, providers=CPU)
    else:
        explainer = lrp_onnx.Explainer.from_model(lrp_onnx.convert(model, rules=rules), providers=CPU)
    return explainer.run(target=INPUTS["target"] if target is None else target, position=INPUTS["position"], **FEED)


def _autograd_reference(hf_dir):
    """Gradient x input at the word embeddings of the Hugging Face model (plain autograd)."""
    model = tiny.load("llama", hf_dir)
    ids, mask = (torch.as_tensor(INPUTS[k]) for k in ("input_ids", "attention_mask"))
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_()
    logits = model(inputs_embeds=embeds, attention_mask=mask, return_dict=False)[0]
    rows = torch.arange(2)
    positions = torch.as_tensor(INPUTS["position"]) % ids.shape[1]
    logits[rows, positions, torch.as_tensor(INPUTS["target"])].sum().backward()
    return (embeds.detach().double() * embeds.grad.double()).numpy()


def test_builder_graph_has_the_kv_cache_form(exports):
    model = onnx.load(str(exports["genai"]), load_external_data=False)
    past = [i.name for i in model.graph.input if i.name.startswith("past_key_values.")]
    present = [o.name for o in model.graph.output if o.name.startswith("present.")]
    assert len(past) == len(present) == 4
    gqa = [n for n in model.graph.node if n.op_type == "GroupQueryAttention"]
    assert len(gqa) == 2 and all(n.input[3] in past and n.input[4] in past for n in gqa)


@pytest.mark.parametrize("rules", RULES)
def test_builder_graph_gives_the_no_cache_relevance(exports, builder_run, rules):
    got = _explain(str(exports["genai"]), rules, out=str(exports["genai"].with_name(f"model.{rules}.lrp.onnx")))
    assert set(builder_run) < set(got.outputs)  # logits and present.* are kept
    # forward: the converted graph = the builder's graph run with empty past tensors
    np.testing.assert_allclose(got.outputs["logits"][VALID], builder_run["logits"][VALID], rtol=1e-4, atol=1e-5)
    for name, value in builder_run.items():
        if name.startswith("present."):
            np.testing.assert_allclose(got.outputs[name], value, rtol=1e-4, atol=1e-5)
    expected = _explain(onnx.load(str(exports["no_cache"])), rules)
    np.testing.assert_array_equal(got.target, expected.target)
    np.testing.assert_allclose(got.logit, expected.logit, rtol=1e-4, atol=1e-5)
    assert np.isfinite(got.relevance).all()
    assert rel_l2(got.relevance, expected.relevance) <= SAME_WEIGHTS_BOUND
    # and the PyTorch reference of the Hugging Face model (independent of lrp_onnx)
    if rules == "gradient":
        reference = _autograd_reference(exports["hf"])
    else:
        reference = run_reference("llama", exports["hf"], rules, INPUTS, exports["genai"].parent.parent / "ref")
        reference = reference["relevance"]
    assert rel_l2(got.relevance, reference) <= TOLERANCE[rules]
