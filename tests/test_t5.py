"""T5 / Flan-T5 (encoder-decoder): relevance at both lookups of the shared embedding table.

Tiny random-weight T5ForConditionalGeneration with Flan-T5 settings (models/tiny.py "t5"), fp32,
inputs input_ids / attention_mask (encoder, 7 tokens, row 1 right-padded) and decoder_input_ids
(5 tokens, no KV cache), both exporters. The explained logit is at a decoder position (-1 = the
decoder's last token). The shared table is looked up twice, so the converted model has two
relevance outputs: lrp_relevance at the encoder tokens, lrp_relevance_1 at the decoder tokens.

``gradient`` equals torch.autograd at both sources; ``attnlrp`` / ``cp-lrp`` equal the LXT-style
T5 reference of tests/reference.py (LXT 2.1 has no T5 map): rms of T5LayerNorm constant, identity
rule on the gated GELU and uniform on its product (cp-lrp: gate constant), uniform on Q.K^T and A.V
of self- and cross-attention (cp-lrp: attention weights constant); the relative position bias
carries no relevance.
"""
import numpy as np
import onnx
import pytest

import lrp_onnx
from lrp_onnx.ir.graph import GraphView
from lrp_onnx.pipeline import analyze, default_sources
from lrp_onnx.ir.shapes import infer_shapes
from tests.conftest import CONSERVATION, TOLERANCE, explain_inputs, rel_l2
from tests.conftest import run_explainer as run

FAMILY = "t5"
EXPORTERS = ["torchscript", "dynamo"]
RULES = ["gradient", "attnlrp", "cp-lrp"]
SOURCE_INPUTS = {"lrp_relevance": "input_ids", "lrp_relevance_1": "decoder_input_ids"}
REFERENCE_KEY = {"input_ids": "relevance", "decoder_input_ids": "decoder_relevance"}  # in reference.py's output
# 2 encoder layers (self-attention, MLP) + 2 decoder layers (self-attention, cross-attention, MLP)
ATTENTIONS, MLPS, NORMS = 2 + 2 * 2, 2 + 2, 2 * 2 + 1 + 2 * 3 + 1


def original_logits(path, inputs):
    from models import tiny

    return tiny.onnx_logits(path, {k: inputs[k] for k in ("input_ids", "attention_mask", "decoder_input_ids")})


@pytest.mark.parametrize("rules", RULES)
@pytest.mark.parametrize("exporter", EXPORTERS)
def test_relevance_equals_reference_at_both_sources(exporter, rules, tiny_model, converted, reference):
    _, path = tiny_model(FAMILY, exporter)
    assert lrp_onnx.inspect_model(path, rules=rules).supported
    explainer = converted(FAMILY, exporter, rules)
    assert explainer.meta["source_inputs"] == SOURCE_INPUTS
    result = run(explainer, FAMILY)
    ref = reference(FAMILY, rules)
    inputs = explain_inputs(FAMILY)
    np.testing.assert_allclose(result.logit, ref["explained"], rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(result.target, ref["target"])
    np.testing.assert_allclose(result.outputs["logits"], ref["logits"], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(result.outputs["logits"], original_logits(path, inputs), rtol=1e-5, atol=1e-5)
    for token_input, key in REFERENCE_KEY.items():
        relevance = result.relevance_of(token_input)
        assert relevance.shape == ref[key].shape == inputs[token_input].shape + (32,)
        assert rel_l2(relevance, ref[key]) <= TOLERANCE[rules], token_input
        assert rel_l2(relevance.sum(-1), ref[key].sum(-1)) <= TOLERANCE[rules], token_input
    total = sum(result.relevance_of(i).sum(axis=(1, 2)) for i in REFERENCE_KEY)
    CONSERVATION[(FAMILY, exporter, rules)] = total / result.logit
    if rules == "cp-lrp":  # no biases; attention weights, gate and norms constant: linear in both sources
        np.testing.assert_allclose(total / result.logit, 1.0, rtol=0, atol=1e-5)


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_padding_and_decoder_position(exporter, converted):
    """Padded encoder tokens get nothing; the decoder is causal, so decoder tokens after the explained
    decoder position get nothing: position -1 is the decoder's last token (4), not the encoder's (6)."""
    result = run(converted(FAMILY, exporter, "attnlrp"), FAMILY)
    mask = explain_inputs(FAMILY)["attention_mask"]
    encoder = np.abs(result.relevance_of("input_ids")).sum(-1)
    decoder = np.abs(result.relevance_of("decoder_input_ids")).sum(-1)
    scale = max(encoder.max(), decoder.max())
    assert encoder[mask == 0].max() <= 1e-6 * scale and encoder[mask == 1].min() > 1e-4 * scale
    assert decoder[0].min() > 1e-4 * scale                 # row 0, position -1: all 5 decoder tokens
    assert decoder[1, :3].min() > 1e-4 * scale and decoder[1, 3:].max() <= 1e-6 * scale  # row 1, position 2


def test_explanation_exposes_both_sources(converted):
    explainer = converted(FAMILY, "torchscript", "attnlrp")
    result = run(explainer, FAMILY)
    assert list(result.relevances) == ["lrp_relevance", "lrp_relevance_1"]
    assert result.source_inputs == SOURCE_INPUTS
    assert result.relevance is result.relevances["lrp_relevance"]
    np.testing.assert_array_equal(result.relevance_of("input_ids"), result.outputs["lrp_relevance"])
    np.testing.assert_array_equal(result.relevance_of("decoder_input_ids"), result.outputs["lrp_relevance_1"])
    assert result.token_relevance().shape == (2, 7)
    np.testing.assert_allclose(result.token_relevance("decoder_input_ids"),
                               result.outputs["lrp_relevance_1"].sum(-1), rtol=1e-6)
    with pytest.raises(lrp_onnx.LRPError, match="'attention_mask'.*input_ids, decoder_input_ids"):
        result.relevance_of("attention_mask")


def _late_nodes_first(model: onnx.ModelProto) -> onnx.ModelProto:
    """The same graph, topologically re-sorted so that, among ready nodes, the one that came latest
    goes first: the decoder's embedding lookup then precedes the encoder's."""
    nodes = list(model.graph.node)
    available = {i.name for i in model.graph.input} | {i.name for i in model.graph.initializer} | {""}
    order, pending = [], list(range(len(nodes)))
    while pending:
        ready = [k for k in pending if all(t in available for t in nodes[k].input)]
        k = max(ready)
        order.append(k)
        pending.remove(k)
        available.update(nodes[k].output)
    reordered = onnx.ModelProto()
    reordered.CopyFrom(model)
    del reordered.graph.node[:]
    reordered.graph.node.extend(nodes[k] for k in order)
    return reordered


def test_sources_are_encoder_first_whatever_the_node_order(tiny_model):
    _, path = tiny_model(FAMILY, "torchscript")
    model = onnx.load(str(path))
    sources = default_sources(GraphView.build(model, infer_shapes(model)), "logits")
    reordered = _late_nodes_first(model)
    view = GraphView.build(reordered, infer_shapes(reordered))
    lookup_order = [n.output[0] for n in view.nodes if n.output[0] in sources]
    assert lookup_order == sources[::-1]  # the decoder's lookup now comes first in the graph
    assert default_sources(view, "logits") == sources
    explainer = lrp_onnx.Explainer.from_model(lrp_onnx.convert(reordered), providers=["CPUExecutionProvider"])
    assert explainer.meta["sources"] == sources and explainer.meta["source_inputs"] == SOURCE_INPUTS
    assert run(explainer, FAMILY).relevance.shape == (2, 7, 32)


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_t5_units_get_their_rules(exporter, tiny_model):
    _, path = tiny_model(FAMILY, exporter)
    rows = {rules: lrp_onnx.inspect_model(path, rules=rules).rows for rules in ("attnlrp", "cp-lrp")}

    def units(rules, category):
        return [(desc, rule) for desc, cats, rule in rows[rules] if cats and cats[0] == category]

    norms = units("attnlrp", "norm_scale")  # T5LayerNorm written out, incl. its fp32 cast
    assert len(norms) == NORMS and all("RMSNorm rms" in d and r == "constant" for d, r in norms)
    gates = units("attnlrp", "gate")        # gelu_new (tanh form) of the gated MLP
    assert len(gates) == MLPS and all("GELU (tanh form)" in d and r == "identity" for d, r in gates)
    assert [r for _, r in units("attnlrp", "product")].count("uniform") == 2 * ATTENTIONS + MLPS
    assert {r for _, r in units("attnlrp", "attention_probs")} == {"gradient"}
    assert len(units("attnlrp", "attention_probs")) == ATTENTIONS
    assert [r for _, r in units("cp-lrp", "gate")] == ["constant"] * MLPS
    assert [r for _, r in units("cp-lrp", "attention_probs")] == ["constant"] * ATTENTIONS
    assert not [d for d, r in units("cp-lrp", "product") if r == "uniform"]


def test_relative_position_bias_carries_no_relevance(tiny_model):
    _, path = tiny_model(FAMILY, "torchscript")
    model = onnx.load(str(path))
    view = GraphView.build(model, infer_shapes(model))
    plan = analyze(view, "gradient", "logits", default_sources(view, "logits"))
    bias_lookups = [n.output[0] for n in view.nodes if n.op_type == "Gather" and "relative_attention_bias" in n.input[0]]
    assert len(bias_lookups) == 2  # encoder and decoder layer 0; later layers reuse the bias
    assert not [t for t in bias_lookups if t in plan.path]


def test_relevance_only_equals_full(tiny_model, converted, workdir):
    _, path = tiny_model(FAMILY, "torchscript")
    out = workdir / "t5-torchscript" / "model.attnlrp.relevance-only.onnx"
    lrp_onnx.convert(path, out, rules="attnlrp", relevance_only=True)
    head_at_position = lrp_onnx.Explainer(out, providers=["CPUExecutionProvider"])
    assert head_at_position.meta["head_at_position"]
    result, full = run(head_at_position, FAMILY), run(converted(FAMILY, "torchscript", "attnlrp"), FAMILY)
    assert "logits" not in result.outputs
    np.testing.assert_allclose(result.logit, full.logit, rtol=1e-5)
    for name in SOURCE_INPUTS:
        assert rel_l2(result.relevances[name], full.relevances[name]) <= 1e-5
