"""onnxruntime-optimized graphs (onnxruntime.transformers.optimizer): fused contrib ops
(EmbedLayerNormalization, Attention, MultiHeadAttention, SkipLayerNormalization, BiasGelu, FastGelu, QuickGelu,
SimplifiedLayerNormalization, SkipSimplifiedLayerNormalization) give the relevance of the unfused graph
and, independently of lrp_onnx, of the PyTorch references (torch.autograd for gradient, LXT 2.1 for
attnlrp / cp-lrp)."""
import collections

import numpy as np
import onnx
import pytest

import lrp_onnx
from tests.conftest import TOLERANCE, explain_model, model_feed, rel_l2

CASES = [  # family, optimizer model_type, opt_level, fused ops that must be present
    ("bert", "bert", 1, {"EmbedLayerNormalization", "Attention", "SkipLayerNormalization", "BiasGelu"}),
    ("bert", "bert-mha", 1, {"EmbedLayerNormalization", "MultiHeadAttention", "SkipLayerNormalization"}),
    ("gpt2", "gpt2", 1, {"SkipLayerNormalization", "FastGelu"}),
    ("llama", "gpt2", 1, {"SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization"}),
    ("llama", "gpt2", 2, {"SimplifiedLayerNormalization", "QuickGelu"}),
]


@pytest.fixture(scope="module")
def optimized(tiny_model, workdir):
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    cache = {}

    def get(family, model_type, level):
        key = (family, model_type, level)
        if key not in cache:
            _, path = tiny_model(family)
            out = workdir / f"{family}-torchscript" / f"ort-{model_type}-opt{level}.onnx"
            options = FusionOptions(model_type.split("-")[0])
            options.use_multi_head_attention = model_type.endswith("-mha")  # MultiHeadAttention, not Attention
            optimize_model(str(path), model_type=model_type.split("-")[0], num_heads=4, hidden_size=32,
                           opt_level=level, optimization_options=options).save_model_to_file(str(out))
            cache[key] = out
        return cache[key]

    return get


def relevance(path, family, rules):
    from tests.conftest import explain_inputs

    inputs = explain_inputs(family)
    return explain_model(path, model_feed(family), rules, target=inputs["target"], position=inputs.get("position"))


@pytest.mark.parametrize("rules", ["gradient", "attnlrp", "cp-lrp"])
@pytest.mark.parametrize("family,model_type,level,fused", CASES)
def test_optimized_graph_gives_unfused_relevance(family, model_type, level, fused, rules, optimized, tiny_model,
                                                 reference):
    path = optimized(family, model_type, level)
    ops = collections.Counter(n.op_type for n in onnx.load(path).graph.node)
    assert fused <= set(ops), f"the optimizer did not fuse {fused - set(ops)}"
    assert lrp_onnx.inspect_model(path, rules=rules).supported
    expected = relevance(tiny_model(family)[1], family, rules)
    got = relevance(path, family, rules)
    assert rel_l2(got.relevance, expected.relevance) <= 1e-5
    np.testing.assert_allclose(got.logit, expected.logit, rtol=1e-5, atol=1e-5)
    ref = reference(family, rules)  # PyTorch: autograd / LXT, no lrp_onnx code
    assert rel_l2(got.relevance, ref["relevance"]) <= TOLERANCE[rules]
    np.testing.assert_allclose(got.logit, ref["explained"], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("rules", ["gradient", "attnlrp", "cp-lrp"])
def test_session_optimized_graph_gives_unfused_relevance(rules, tiny_model, workdir, reference):
    """onnxruntime's own session optimizations (saved with optimized_model_filepath) write Q·Kᵀ as a
    FusedMatMul: a product of two relevance-carrying operands like the MatMul it replaces."""
    import onnxruntime

    out = workdir / "bert-torchscript" / "ort-session-extended.onnx"
    if not out.exists():
        options = onnxruntime.SessionOptions()
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        options.optimized_model_filepath = str(out)
        onnxruntime.InferenceSession(str(tiny_model("bert")[1]), options, providers=["CPUExecutionProvider"])
    assert "FusedMatMul" in {n.op_type for n in onnx.load(out).graph.node}
    expected = relevance(tiny_model("bert")[1], "bert", rules)
    got = relevance(out, "bert", rules)
    assert rel_l2(got.relevance, expected.relevance) <= 1e-5
    assert rel_l2(got.relevance, reference("bert", rules)["relevance"]) <= TOLERANCE[rules]
