"""QDQ-quantized models (onnxruntime.quantization, QuantizeLinear/DequantizeLinear around MatMul and
Gemm): dequantization is linear, activation rounding passes relevance straight through, and the
relevance stays close to the float model's (the quantized model is a slightly different function)."""
import collections

import numpy as np
import onnx
import pytest

import lrp_onnx
from tests.conftest import cosine, explain_inputs, explain_model, model_feed, quantize_static_tiny

RULES = ["gradient", "attnlrp", "cp-lrp"]
# cosine to the float model's relevance under the same rule set (seen: 0.999 / 0.963 / 0.920), set between
# it and the cosine to the float model's relevance under the other rule sets (seen <= 0.73 / 0.92 / 0.96)
MIN_COSINE = {"gradient": 0.99, "attnlrp": 0.94, "cp-lrp": 0.94}

@pytest.fixture(scope="module")
def qdq_bert(tiny_model, workdir):
    from onnxruntime.quantization import QuantType

    out = workdir / "bert-qdq.onnx"
    quantize_static_tiny(tiny_model("bert")[1], out, "QDQ", activation_type=QuantType.QInt8,
                         weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Gemm"])
    return out


@pytest.fixture(scope="module")
def relevances(qdq_bert, tiny_model):
    """{(model, rules): Explanation} for the float and the QDQ model, every rule set."""
    inputs = explain_inputs("bert")
    return {(kind, rules): explain_model(path, model_feed("bert"), rules, target=inputs["target"])
            for kind, path in (("float", tiny_model("bert")[1]), ("qdq", qdq_bert)) for rules in RULES}


def activation_qdq_pairs(model):
    """(QuantizeLinear, DequantizeLinear) node pairs on activations, counted from the graph alone:
    a QuantizeLinear of a non-constant tensor, and each DequantizeLinear reading its output."""
    constants = {t.name for t in model.graph.initializer}
    readers = collections.defaultdict(list)
    for n in model.graph.node:
        for name in n.input:
            readers[name].append(n)
    return [(q.name, d.name) for q in model.graph.node if q.op_type == "QuantizeLinear" and q.input[0] not in constants
            for d in readers[q.output[0]] if d.op_type == "DequantizeLinear"]


@pytest.mark.parametrize("rules", RULES)
def test_every_activation_qdq_pair_passes_straight_through(rules, qdq_bert):
    pairs = activation_qdq_pairs(onnx.load(qdq_bert))
    assert len(pairs) >= 20  # every MatMul/Gemm input of 2 layers, attention products included
    report = lrp_onnx.inspect_model(qdq_bert, rules=rules)
    assert report.supported
    if rules == "cp-lrp":  # the attention probabilities are constants: pairs feeding only Q·Kᵀ are off the path
        model = onnx.load(qdq_bert)
        probs = {n.output[0] for n in model.graph.node if n.op_type == "Softmax"}
        after_softmax = {n.name for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] in probs}
        pairs = [p for p in pairs if p[1] in _nodes_reaching_output(model, cut="Softmax") and p[0] not in after_softmax]
        assert len(pairs) >= 20
    assert sum(rule == "straight_through" for _, _, rule in report.rows) == len(pairs)


def _nodes_reaching_output(model, cut):
    """Names of the nodes whose outputs reach the first graph output without passing through an op of
    type `cut` (from the graph alone)."""
    needed, reaching = {model.graph.output[0].name}, set()
    for n in reversed(model.graph.node):
        if n.op_type != cut and any(o in needed for o in n.output):
            reaching.add(n.name)
            needed.update(n.input)
    return reaching


@pytest.mark.parametrize("rules", ["gradient", "attnlrp", "cp-lrp"])
def test_qdq_bert_relevance_close_to_float_model(rules, relevances):
    qdq, full = relevances["qdq", rules], relevances["float", rules]
    assert qdq.relevance.dtype == np.float32 and np.isfinite(qdq.relevance).all()
    own = cosine(qdq.relevance, full.relevance)
    assert own >= MIN_COSINE[rules]
    # the bound tells the rule sets apart: the float model's relevance under another rule set is further
    for other in RULES:
        if other != rules:
            assert cosine(qdq.relevance, relevances["float", other].relevance) < MIN_COSINE[rules], other
    np.testing.assert_allclose(qdq.logit, full.logit, rtol=0.05, atol=0.05)



def test_qdq_attention_softmax_keeps_its_category(qdq_bert):
    rules = {r: [(cats, rule) for desc, cats, rule in lrp_onnx.inspect_model(qdq_bert, rules=r).rows
                 if "::Softmax" in desc] for r in ("attnlrp", "cp-lrp")}
    assert len(rules["cp-lrp"]) == 2  # one attention per layer
    assert all("attention_probs" in cats and rule == "constant" for cats, rule in rules["cp-lrp"]), rules
