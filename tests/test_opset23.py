"""Opset-23 forms: RMSNormalization (own VJP), RotaryEmbedding and Attention (written out by
lrp_onnx/passes/unfuse.py). The tiny LLaMA exported at opset 23 (dynamo, SDPA attention) gives the relevance
of its opset-18 export and of torch autograd; hand-built graphs cover the other attribute forms
(3D inputs, GQA via kv_num_heads, is_causal, bool/float masks, softcap, scale; interleaved and
partial RoPE, position_ids) against the same graph written out in standard ops."""
import collections

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

import lrp_onnx
from lrp_onnx.errors import LRPError
from tests import handbuilt as hb
from tests.conftest import TOLERANCE, explain_inputs, explainer_for, rel_l2, run_explainer

RULES = ["gradient", "attnlrp", "cp-lrp"]
FD_BOUND = 1e-5  # gradient mode (fp32) vs central differences of the written-out graph in float64


@pytest.fixture(scope="module")
def llama23(tiny_model, workdir):
    """The tiny LLaMA (same weights as the opset-18 exports) exported at opset 23 with SDPA attention."""
    from models import tiny

    hf_dir, _ = tiny_model("llama")
    model = tiny.load("llama", hf_dir)
    model.config._attn_implementation = "sdpa"
    path = tiny.export(model, workdir / "llama-opset23" / "model.onnx", exporter="dynamo", opset=23)
    return model, path


def test_llama_opset23_export_uses_the_new_ops(llama23):
    ops = collections.Counter(n.op_type for n in onnx.load(llama23[1]).graph.node)
    assert {"RMSNormalization", "RotaryEmbedding", "Attention"} <= set(ops)
    assert not any(n.op_type in ("RotaryEmbedding", "Attention") for n in lrp_onnx.convert(llama23[1]).graph.node)


@pytest.mark.parametrize("rules", RULES)
def test_llama_opset23_relevance_equals_opset18(rules, llama23, converted, reference):
    model, path = llama23
    inputs = explain_inputs("llama")
    got = run_explainer(explainer_for(path, rules), "llama")
    expected = run_explainer(converted("llama", "dynamo", rules), "llama")
    assert rel_l2(got.relevance, expected.relevance) <= 1e-5  # ~5e-7 seen
    np.testing.assert_allclose(got.logit, expected.logit, rtol=1e-5, atol=1e-5)
    # independent of lrp_onnx: torch.autograd (gradient) / LXT 2.1 (attnlrp, cp-lrp) on the same weights
    assert rel_l2(got.relevance, reference("llama", rules)["relevance"]) <= TOLERANCE[rules]
    if rules == "attnlrp":  # relevance-only mode gathers the position before the RMSNormalization head
        only = lrp_onnx.convert(path, rules=rules, relevance_only=True)
        assert any(n.op_type == "RMSNormalization" and n.input[0].startswith("lrp/") for n in only.graph.node)
        fast = explainer_for(path, rules, relevance_only=True)
        assert rel_l2(run_explainer(fast, "llama").relevance, got.relevance) <= 1e-5
    # the converted graph runs the unfused RotaryEmbedding; its logits are PyTorch's
    feed = {k: inputs[k] for k in ("input_ids", "attention_mask")}
    logits = hb.ort_run(lrp_onnx.convert(path, rules=rules), feed)
    with torch.no_grad():
        expected_logits = model(**{k: torch.as_tensor(v) for k, v in feed.items()}).logits.numpy()
    valid = feed["attention_mask"].astype(bool)
    np.testing.assert_allclose(logits[valid], expected_logits[valid], rtol=1e-4, atol=1e-4)


# -- hand-built Attention (opset 23) --------------------------------------------------------------------
HEADS, D = 4, 4
ATTENTION_CASES = {  # name: (rank, groups, mask, is_causal, scale, softcap)
    "4d": (4, 1, None, 0, None, 0.0),
    "4d-gqa-causal-float-mask": (4, 2, "float", 1, None, 0.0),
    "3d-gqa-bool-mask-scale": (3, 2, "bool", 0, 0.3, 0.0),
    "3d-causal-bool-mask-softcap": (3, 1, "bool", 1, None, 1.5),
    "4d-kv1-causal-softcap": (4, 4, None, 1, 0.7, 2.0),
}


def _mask_feed(kind):
    if kind == "bool":  # row 1 cannot attend its last two keys
        mask = np.ones((hb.B, 1, hb.S, hb.S), bool)  # full [q, kv] extent: onnxruntime needs it
        mask[1, ..., -2:] = False
        return mask
    return np.random.default_rng(5).standard_normal((hb.B, 1, hb.S, hb.S)).astype(np.float32)


def attention_graphs(rank, groups, mask, causal, scale, softcap):
    """(fused model, written-out model, feeds)."""
    kv = HEADS // groups
    x = hb.float_input()
    mask_input = [] if mask is None else [helper.make_tensor_value_info(
        "mask", TensorProto.BOOL if mask == "bool" else TensorProto.FLOAT,
        [hb.B, 1, hb.S, hb.S])]
    feeds = {"x": np.random.default_rng(1).standard_normal((hb.B, hb.S, hb.HID)).astype(np.float32)}
    if mask is not None:
        feeds["mask"] = _mask_feed(mask)
    models = []
    for fused in (True, False):
        g = hb.Graph([x] + mask_input)
        q, k, v = (g.op("MatMul", "x", g.init(hb.weights(s, hb.HID, n * D))) for s, n in ((1, HEADS), (2, kv), (3, kv)))
        if fused:
            attrs = dict(is_causal=causal, softcap=softcap)
            if scale is not None:
                attrs["scale"] = scale
            if rank == 4:
                q, k, v = hb.heads_first(g, q, HEADS), hb.heads_first(g, k, kv), hb.heads_first(g, v, kv)
            else:
                attrs.update(q_num_heads=HEADS, kv_num_heads=kv)
            y = g.op("Attention", q, k, v, "mask" if mask else "", **attrs)
            y = hb.heads_last(g, y) if rank == 4 else y
        else:
            bias = None
            if causal:
                bias = g.init(np.where(np.tril(np.ones((hb.S, hb.S), bool)), 0.0, hb.LOWEST))
            if mask is not None:
                m = g.op("Where", "mask", g.init(0.0), g.init(hb.LOWEST)) if mask == "bool" else "mask"
                bias = m if bias is None else g.op("Add", bias, m)
            y = hb.written_attention(g, hb.heads_first(g, q, HEADS), hb.heads_first(g, k, kv), hb.heads_first(g, v, kv),
                                     scale if scale is not None else 1 / np.sqrt(D), bias, groups, softcap)
            y = hb.heads_last(g, y)
        models.append(g.model(g.op("MatMul", y, g.init(hb.weights(4, HEADS * D, hb.VOCAB)))))
    return models[0], models[1], feeds


def _fused_forward(model, feeds):
    """onnxruntime's output of the fused op, or the ONNX reference implementation's where onnxruntime
    fails to run it."""
    try:
        return hb.ort_run(model, feeds), "onnxruntime"
    except Exception:
        return hb.reference_run(model, feeds), "onnx.reference"


@pytest.mark.parametrize("case", list(ATTENTION_CASES))
def test_attention23_gives_written_out_relevance(case):
    fused, written, feeds = attention_graphs(*ATTENTION_CASES[case])
    expected_forward, _ = _fused_forward(fused, feeds)
    np.testing.assert_allclose(hb.ort_run(written, feeds), expected_forward, rtol=1e-4, atol=1e-5)
    for rules in RULES:
        got, forward = hb.relevance(fused, rules, feeds)
        np.testing.assert_allclose(forward, expected_forward, rtol=1e-4, atol=1e-5)
        expected, _ = hb.relevance(written, rules, feeds)
        assert np.isfinite(got.relevance).all()
        assert rel_l2(got.relevance, expected.relevance) <= 1e-5, rules
        if rules == "gradient":  # independent of lrp_onnx: finite differences of the written-out graph
            assert rel_l2(got.relevance, hb.finite_difference_relevance(written, feeds)) <= FD_BOUND


# -- hand-built RotaryEmbedding (opset 23) ---------------------------------------------------------------
ROTARY_CASES = {  # name: (rank, interleaved, rotary_embedding_dim (0: whole head), position_ids)
    "4d-halves-caches-per-row": (4, 0, 0, False),
    "4d-interleaved-position-ids": (4, 1, 0, True),
    "3d-halves-partial-position-ids": (3, 0, 2, True),
    "3d-interleaved-partial": (3, 1, 2, False),
}
POSITIONS = np.array([[0, 1, 2, 3, 4], [3, 4, 5, 6, 7]])


def rotary_graphs(rank, interleaved, rotary_dim, with_ids):
    r = rotary_dim or D
    cache_cos, cache_sin = hb.rope_tables(np.arange(16), r)  # [max_pos, r/2]
    row_cos, row_sin = hb.rope_tables(POSITIONS, r)  # [B, S, r/2]
    x = hb.float_input()
    feeds = {"x": np.random.default_rng(2).standard_normal((hb.B, hb.S, hb.HID)).astype(np.float32)}
    ids_input = [helper.make_tensor_value_info("position_ids", TensorProto.INT64, [hb.B, hb.S])]
    models = []
    for fused in (True, False):
        g = hb.Graph([x] + (ids_input if fused and with_ids else []))
        q, k, v = (g.op("MatMul", "x", g.init(hb.weights(s, hb.HID, HEADS * D))) for s in (1, 2, 3))
        if fused:
            cos, sin = (g.init(cache_cos), g.init(cache_sin)) if with_ids else (g.init(row_cos), g.init(row_sin))
            attrs = dict(interleaved=interleaved, rotary_embedding_dim=rotary_dim)
            extra = ["position_ids"] if with_ids else []
            if rank == 4:
                q, k = (g.op("RotaryEmbedding", hb.heads_first(g, t, HEADS), cos, sin, *extra, **attrs) for t in (q, k))
            else:
                q, k = (hb.heads_first(g, g.op("RotaryEmbedding", t, cos, sin, *extra, num_heads=HEADS, **attrs), HEADS)
                        for t in (q, k))
        else:
            q, k = (hb.written_rope(g, hb.heads_first(g, t, HEADS), row_cos[:, None], row_sin[:, None], interleaved, r, D,
                                    None) for t in (q, k))
        y = hb.written_attention(g, q, k, hb.heads_first(g, v, HEADS), 1 / np.sqrt(D))
        models.append(g.model(g.op("MatMul", hb.heads_last(g, y), g.init(hb.weights(4, HEADS * D, hb.VOCAB)))))
    fused_feeds = dict(feeds, position_ids=POSITIONS) if with_ids else feeds
    return models[0], models[1], fused_feeds, feeds


@pytest.mark.parametrize("case", list(ROTARY_CASES))
def test_rotary_embedding23_gives_written_out_relevance(case):
    fused, written, fused_feeds, feeds = rotary_graphs(*ROTARY_CASES[case])
    expected_forward = hb.reference_run(fused, fused_feeds)  # the ONNX reference implementation
    np.testing.assert_allclose(hb.ort_run(written, feeds), expected_forward, rtol=1e-4, atol=1e-5)
    for rules in RULES:
        got, forward = hb.relevance(fused, rules, fused_feeds)
        np.testing.assert_allclose(forward, expected_forward, rtol=1e-4, atol=1e-5)
        expected, _ = hb.relevance(written, rules, feeds)
        assert rel_l2(got.relevance, expected.relevance) <= 1e-5, rules
        if rules == "gradient":  # independent of lrp_onnx: finite differences of the written-out graph
            assert rel_l2(got.relevance, hb.finite_difference_relevance(written, feeds)) <= FD_BOUND


def test_attention23_with_kv_cache_is_refused_by_name():
    fused, _, _ = attention_graphs(4, 1, None, 0, None, 0.0)
    node = next(n for n in fused.graph.node if n.op_type == "Attention")
    node.input.extend(["x", "x"])  # past_key, past_value
    with pytest.raises(LRPError, match=f"'{node.name}' .*Attention.*past_key"):
        lrp_onnx.convert(fused)
