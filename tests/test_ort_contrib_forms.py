"""onnxruntime contrib forms, hand-built (the onnxruntime optimizer does not emit them for the tiny
exports): GroupQueryAttention without a KV cache (seqlens_k / total_sequence_length, do_rotary,
packed QKV, softcap, local window), com.microsoft RotaryEmbedding, packed-QKV / packed-KV
MultiHeadAttention. Each is checked against onnxruntime's own kernel (forward) and then against the
same graph written out in standard ops (relevance, three rule sets)."""
import numpy as np
import pytest
from onnx import TensorProto, helper

import lrp_onnx
from lrp_onnx.errors import LRPError
from tests import handbuilt as hb
from tests.conftest import rel_l2

RULES = ["gradient", "attnlrp", "cp-lrp"]
FD_BOUND = 1e-5  # gradient mode (fp32) vs central differences of the written-out graph in float64
MS = "com.microsoft"
HEADS, D = 4, 4
MASK = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], np.int64)  # row 1 right-padded
VALID = MASK.astype(bool)  # query rows whose output is defined (padded rows differ between kernels)
X = np.random.default_rng(1).standard_normal((hb.B, hb.S, hb.HID)).astype(np.float32)
FEEDS = {"x": X, "attention_mask": MASK}
INPUTS = [hb.float_input(), helper.make_tensor_value_info("attention_mask", TensorProto.INT64, [hb.B, hb.S])]


def _projections(g, kv, d=D):
    return [g.op("MatMul", "x", g.init(hb.weights(s, hb.HID, n * d))) for s, n in ((1, HEADS), (2, kv), (3, kv))]


def _key_padding_bias(g):
    """[B, 1, 1, S]: 0 for real keys, the lowest float for padding."""
    valid = g.op("Cast", g.op("Unsqueeze", "attention_mask", g.init([1, 2], np.int64)), to=TensorProto.BOOL)
    return g.op("Where", valid, g.init(0.0), g.init(hb.LOWEST))


def _head(g, y, d=D):
    return g.model(g.op("MatMul", y, g.init(hb.weights(4, HEADS * d, hb.VOCAB))))


def _check(fused, written, feeds=FEEDS, rows=VALID, kernel=None, exact=False, **options):
    """Forward of the converted fused graph = onnxruntime's kernel = the written-out graph (on the rows
    both define), then relevance = the written-out graph's in every rule set; returns the errors.
    exact: the converted forward keeps the fused kernel (unfuse.refuse), so its outputs are the kernel's
    bit for bit, on every row."""
    kernel = hb.ort_run(fused, feeds) if kernel is None else kernel
    np.testing.assert_allclose(hb.ort_run(written, feeds)[rows], kernel[rows], rtol=1e-4, atol=1e-5)
    errors = {}
    for rules in RULES:
        got, forward = hb.relevance(fused, rules, feeds, **options)
        np.testing.assert_allclose(forward[rows], kernel[rows], rtol=1e-4, atol=1e-5)
        if exact:
            np.testing.assert_array_equal(forward, kernel)
        expected, _ = hb.relevance(written, rules, feeds)
        assert np.isfinite(got.relevance).all()
        errors[rules] = rel_l2(got.relevance, expected.relevance)
        assert errors[rules] <= 1e-5, (rules, errors)
        if rules == "gradient":  # independent of lrp_onnx: finite differences of the written-out graph
            errors["finite-differences"] = rel_l2(got.relevance, hb.finite_difference_relevance(written, feeds))
            assert errors["finite-differences"] <= FD_BOUND, errors
    return errors


# -- GroupQueryAttention -------------------------------------------------------------------------------
GQA_CASES = {  # name: (kv_heads, packed, do_rotary, interleaved, softcap, local_window, scale)
    "gqa": (2, False, False, 0, 0.0, -1, 0.0),
    "gqa-rotary": (2, False, True, 0, 0.0, -1, 0.0),
    "packed-rotary-interleaved-softcap": (2, True, True, 1, 1.5, -1, 0.0),
    "mha-local-window-scale": (4, False, False, 0, 0.0, 2, 0.4),
    "packed-kv1": (1, True, False, 0, 0.0, -1, 0.0),
}
GD = 16  # onnxruntime: GroupQueryAttention needs a head size multiple of 8, with do_rotary of 16
COS, SIN = hb.rope_tables(np.arange(16), GD)  # [max_pos, GD/2]


def gqa_graphs(kv, packed, rotary, interleaved, softcap, window, scale):
    models = []
    for fused in (True, False):
        g = hb.Graph(INPUTS, opset=17)
        q, k, v = _projections(g, kv, GD)
        if fused:
            seqlens = g.op("Cast", g.op("Sub", g.op("ReduceSum", "attention_mask", g.init([1], np.int64), keepdims=0),
                                        g.init(1, np.int64)), to=TensorProto.INT32)
            total = g.op("Cast", g.op("Gather", g.op("Shape", "attention_mask"), g.init(1, np.int64), axis=0),
                         to=TensorProto.INT32)
            qkv = [g.op("Concat", q, k, v, axis=-1), "", ""] if packed else [q, k, v]
            caches = [g.init(COS), g.init(SIN)] if rotary else ["", ""]
            y = g.op("GroupQueryAttention", *qkv, "", "", seqlens, total, *caches, domain=MS, n_out=3,
                     num_heads=HEADS, kv_num_heads=kv, do_rotary=int(rotary), rotary_interleaved=interleaved,
                     softcap=softcap, local_window_size=window, scale=scale)[0]
        else:
            q4, k4, v4 = hb.heads_first(g, q, HEADS), hb.heads_first(g, k, kv), hb.heads_first(g, v, kv)
            if rotary:
                cos, sin = hb.rope_tables(np.arange(hb.S), GD)
                q4, k4 = (hb.written_rope(g, t, cos, sin, interleaved, GD, GD, None) for t in (q4, k4))
            i, j = np.arange(hb.S)[:, None], np.arange(hb.S)[None, :]
            allowed = (j <= i) & ((i - j < window) if window >= 0 else True)
            bias = g.op("Add", g.init(np.where(allowed, 0.0, hb.LOWEST)), _key_padding_bias(g))
            y = hb.heads_last(g, hb.written_attention(g, q4, k4, v4, scale or 1 / np.sqrt(GD), bias, HEADS // kv, softcap))
        models.append(_head(g, y, GD))
    return models


@pytest.mark.parametrize("case", list(GQA_CASES))
def test_group_query_attention_gives_written_out_relevance(case):
    _check(*gqa_graphs(*GQA_CASES[case]), exact=True)


def test_group_query_attention_with_kv_cache_is_refused_by_name():
    fused, _ = gqa_graphs(*GQA_CASES["gqa"])
    node = next(n for n in fused.graph.node if n.op_type == "GroupQueryAttention")
    node.input[3] = "x"
    with pytest.raises(LRPError, match=f"'{node.name}' .*GroupQueryAttention.*past_key"):
        lrp_onnx.convert(fused, source="x")


# -- com.microsoft RotaryEmbedding ---------------------------------------------------------------------
ROTARY_CASES = {  # name: (rank, interleaved, rotary_embedding_dim, positions: "ids" [B, S] or "offset" [1])
    "3d-position-ids": (3, 0, 0, "ids"),
    "3d-interleaved-offset": (3, 1, 0, "offset"),
    "4d-partial-position-ids": (4, 0, 2, "ids"),
    "4d-interleaved-partial-offset": (4, 1, 2, "offset"),
}
POSITIONS = np.array([[0, 1, 2, 3, 4], [3, 4, 5, 6, 7]])
OFFSET = 2


def ms_rotary_graphs(rank, interleaved, rotary_dim, positions):
    r = rotary_dim or D
    cache_cos, cache_sin = hb.rope_tables(np.arange(16), r)
    pos = POSITIONS if positions == "ids" else np.broadcast_to(OFFSET + np.arange(hb.S), (hb.B, hb.S))
    row_cos, row_sin = hb.rope_tables(pos, r)
    models = []
    for fused in (True, False):
        g = hb.Graph(INPUTS, opset=17)
        q, k, v = _projections(g, HEADS)
        if fused:
            ids = g.init(POSITIONS if positions == "ids" else [OFFSET], np.int64)
            attrs = dict(domain=MS, interleaved=interleaved, rotary_embedding_dim=rotary_dim, num_heads=HEADS)
            if rank == 4:
                q, k = (g.op("RotaryEmbedding", hb.heads_first(g, t, HEADS), ids, g.init(cache_cos), g.init(cache_sin),
                             **attrs) for t in (q, k))
            else:
                q, k = (hb.heads_first(g, g.op("RotaryEmbedding", t, ids, g.init(cache_cos), g.init(cache_sin), **attrs),
                                       HEADS) for t in (q, k))
        else:
            q, k = (hb.written_rope(g, hb.heads_first(g, t, HEADS), row_cos[:, None], row_sin[:, None], interleaved,
                                    r, D, None) for t in (q, k))
        y = hb.written_attention(g, q, k, hb.heads_first(g, v, HEADS), 1 / np.sqrt(D), _key_padding_bias(g))
        models.append(_head(g, hb.heads_last(g, y)))
    return models


@pytest.mark.parametrize("case", list(ROTARY_CASES))
def test_ms_rotary_embedding_gives_written_out_relevance(case):
    _check(*ms_rotary_graphs(*ROTARY_CASES[case]), exact=True)


# -- packed MultiHeadAttention -------------------------------------------------------------------------
def packed_mha_graphs(packing, with_bias):
    """(packed fused, written-out, the same MultiHeadAttention unpacked): onnxruntime's CPU kernel runs
    the unpacked form only ("Packed QKV ... not implemented for CPU"); the converted packed graph runs."""
    bias = (np.random.default_rng(7).standard_normal(3 * HEADS * D) * 0.3).astype(np.float32)
    models = []
    for form in ("packed", "written", "unpacked"):
        g = hb.Graph(INPUTS, opset=17)
        q, k, v = _projections(g, HEADS)
        if form != "written":
            def pack(*ts):  # [B, S, heads, n, d]
                split = [g.op("Reshape", t, g.init([0, 0, HEADS, 1, D], np.int64)) for t in ts]
                return g.op("Concat", *split, axis=3)

            mask = g.op("Cast", "attention_mask", to=TensorProto.INT32)
            args = [q, k, v] if form == "unpacked" else [pack(q, k, v), "", ""] if packing == "qkv" else [q, pack(k, v), ""]
            y = g.op("MultiHeadAttention", *args, g.init(bias) if with_bias else "", mask, domain=MS,
                     num_heads=HEADS)
        else:
            if with_bias:
                q, k, v = (g.op("Add", t, g.init(bias[i * HEADS * D:(i + 1) * HEADS * D])) for i, t in enumerate((q, k, v)))
            y = hb.heads_last(g, hb.written_attention(g, hb.heads_first(g, q, HEADS), hb.heads_first(g, k, HEADS),
                                                      hb.heads_first(g, v, HEADS), 1 / np.sqrt(D), _key_padding_bias(g)))
        models.append(_head(g, y))
    return models


@pytest.mark.parametrize("packing,with_bias", [("qkv", False), ("qkv", True), ("kv", False)])
def test_packed_multi_head_attention_gives_written_out_relevance(packing, with_bias):
    """onnxruntime's CPU kernel refuses packed QKV [B, L, N, 3, H] (CUDA only): the converted model's forward
    is written out (forward="written") to run here, and checked against the unpacked kernel's."""
    packed, written, unpacked = packed_mha_graphs(packing, with_bias)
    _check(packed, written, kernel=hb.ort_run(unpacked, FEEDS), forward="written")


# -- FusedGemm (onnxruntime's session optimizer: Gemm + activation) ------------------------------------
def fused_gemm_graphs(activation, trans_b, alpha, beta):
    """(FusedGemm, Gemm + activation) on x reshaped to [B*S, HID]: the activation carries its rule."""
    w = hb.weights(5, 8, hb.HID) if trans_b else hb.weights(5, hb.HID, 8)
    c = hb.weights(6, 8)
    models = []
    for fused in (True, False):
        g = hb.Graph(INPUTS[:1], opset=17)
        flat = g.op("Reshape", "x", g.init([hb.B * hb.S, hb.HID], np.int64))
        gemm = dict(alpha=alpha, beta=beta, transB=trans_b)
        if fused:
            y = g.op("FusedGemm", flat, g.init(w), g.init(c), domain=MS, activation=activation, **gemm)
        else:
            y = g.op(activation, g.op("Gemm", flat, g.init(w), g.init(c), **gemm))
        y = g.op("Reshape", y, g.init([hb.B, hb.S, 8], np.int64))
        models.append(g.model(g.op("MatMul", y, g.init(hb.weights(7, 8, hb.VOCAB)))))
    return models


@pytest.mark.parametrize("activation,trans_b,alpha,beta", [("Tanh", 1, 1.0, 1.0), ("Relu", 0, 0.7, 1.3),
                                                           ("Sigmoid", 1, 1.0, 0.5)])
def test_fused_gemm_gives_written_out_relevance(activation, trans_b, alpha, beta):
    fused, written = fused_gemm_graphs(activation, trans_b, alpha, beta)
    assert "FusedGemm" in {n.op_type for n in fused.graph.node}
    feeds = {"x": X}
    errors = _check(fused, written, feeds=feeds, rows=slice(None))
    assert set(errors) == {"gradient", "attnlrp", "cp-lrp", "finite-differences"}
    if activation != "Relu":  # the activation gets AttnLRP's identity rule, not its gradient
        rows = lrp_onnx.inspect_model(fused, rules="attnlrp", source="x").rows
        assert [rule for _, cats, rule in rows if cats[0] == "activation"] == ["identity"]


def test_fused_gemm_with_other_activation_is_refused_by_name():
    fused, _ = fused_gemm_graphs("Tanh", 1, 1.0, 1.0)
    node = next(n for n in fused.graph.node if n.op_type == "FusedGemm")
    node.attribute[[a.name for a in node.attribute].index("activation")].s = b"LeakyRelu"
    with pytest.raises(LRPError, match=f"{node.name}.*FusedGemm with activation 'LeakyRelu'"):
        lrp_onnx.convert(fused, source="x")
