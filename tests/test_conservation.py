"""Conservation, rule by rule, on small hand-built graphs.

Each graph is built so that its explained output is a conservative function of the source under
the rule being tested: sum(input relevance) must equal sum(output relevance) = sum(y * seed). Beyond
the sums, every element of the relevance is compared with the rule computed in numpy, and where
the rule splits relevance between operands (the uniform rule: 1/N each) the split itself is asserted.
"""
import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

import lrp_onnx
from tests import handbuilt as hb

B, S, H = 2, 5, 8


def _model(nodes, inputs, output_shape, initializers=(), output="y"):
    return hb.simple_model(nodes, [(n, s) for n, s in inputs], [(output, output_shape)], initializers)


def _relevance(model, feeds, rng, rules="attnlrp", **convert_kwargs):
    """(sum of input relevance, sum(y * seed), every output by name, seed) for a random seed."""
    converted = lrp_onnx.convert(model, rules=rules, seed_input=True, **convert_kwargs)
    sess = ort.InferenceSession(converted.SerializeToString(), providers=["CPUExecutionProvider"])
    original = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    out_shape = original.run(["y"], feeds)[0].shape
    seed = rng.normal(size=out_shape).astype(np.float32)
    names = [o.name for o in sess.get_outputs()]
    values = dict(zip(names, sess.run(None, {**feeds, "lrp_seed": seed})))
    latent = set(lrp_onnx.Explainer.from_model(converted, providers=["CPUExecutionProvider"]).meta.get("latent", {}))
    sources = [n for n in names if n.startswith("lrp_relevance") and n not in latent]
    assert len(sources) == len(convert_kwargs.get("source", [None])), sources
    relevance_in = sum(values[n].astype(np.float64).sum() for n in sources)
    relevance_out = (values["y"].astype(np.float64) * seed).sum()
    return relevance_in, relevance_out, values, seed


def _assert_conserved(model, feeds, rng, rules="attnlrp", **convert_kwargs):
    r_in, r_out, values, seed = _relevance(model, feeds, rng, rules, **convert_kwargs)
    assert abs(r_in - r_out) <= 1e-5 * max(1.0, abs(r_out)), (r_in, r_out)
    assert abs(r_out) > 1e-3  # the check is not vacuous
    return values, seed


def _close(got, expected):
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6 * np.abs(expected).max())


def test_bias_free_linear_is_conservative(rng):
    w, w2, x = rng.normal(size=(H, 6)), rng.normal(size=(4, 6)), rng.normal(size=(B, S, H)).astype(np.float32)
    m = _model([helper.make_node("MatMul", ["x", "w"], ["h"]),
                helper.make_node("Reshape", ["h", "shape"], ["h2"]),
                helper.make_node("Gemm", ["h2", "w2"], ["y"], transB=1)],
               [("x", [B, S, H])], [B * S, 4],
               [("w", w), ("w2", w2), ("shape", np.array([-1, 6], dtype=np.int64))])
    values, seed = _assert_conserved(m, {"x": x}, rng)
    w, w2 = w.astype(np.float32).astype(np.float64), w2.astype(np.float32).astype(np.float64)
    _close(values["lrp_relevance"], x * ((seed @ w2).reshape(B, S, 6) @ w.T))  # gradient x input


ACTIVATIONS = {"Gelu-erf": lambda x: 0.5 * x * (1 + np.vectorize(__import__("math").erf)(x / np.sqrt(2))),
               "Gelu-tanh": lambda x: 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3))),
               "SiLU": lambda x: x / (1 + np.exp(-x)), "Tanh": np.tanh, "Sigmoid": lambda x: 1 / (1 + np.exp(-x))}


@pytest.mark.parametrize("activation", list(ACTIVATIONS))
def test_identity_rule_is_conservative(activation, rng):
    nodes = []
    if activation == "Gelu-erf":  # x * 0.5 * (1 + erf(x / sqrt 2)), as the TorchScript exporter writes it
        nodes = [helper.make_node("Div", ["x", "sqrt2"], ["d"]), helper.make_node("Erf", ["d"], ["e"]),
                 helper.make_node("Add", ["e", "one"], ["a"]), helper.make_node("Mul", ["x", "a"], ["m"]),
                 helper.make_node("Mul", ["m", "half"], ["y"])]
    elif activation == "Gelu-tanh":  # 0.5 x (1 + tanh(c (x + 0.044715 x^3)))
        nodes = [helper.make_node("Mul", ["half", "x"], ["hx"]), helper.make_node("Pow", ["x", "three"], ["x3"]),
                 helper.make_node("Mul", ["k", "x3"], ["kx3"]), helper.make_node("Add", ["x", "kx3"], ["s"]),
                 helper.make_node("Mul", ["c", "s"], ["cs"]), helper.make_node("Tanh", ["cs"], ["t"]),
                 helper.make_node("Add", ["one", "t"], ["a"]), helper.make_node("Mul", ["hx", "a"], ["y"])]
    elif activation == "SiLU":
        nodes = [helper.make_node("Sigmoid", ["x"], ["s"]), helper.make_node("Mul", ["x", "s"], ["y"])]
    else:
        nodes = [helper.make_node(activation, ["x"], ["y"])]
    consts = [("sqrt2", np.array(np.sqrt(2))), ("one", np.array(1.0)), ("half", np.array(0.5)),
              ("three", np.array(3.0)), ("k", np.array(0.044715)), ("c", np.array(np.sqrt(2 / np.pi)))]
    m = _model(nodes, [("x", [B, S, H])], [B, S, H], consts)
    x = rng.normal(size=(B, S, H)).astype(np.float32)
    values, seed = _assert_conserved(m, {"x": x}, rng)
    # identity rule: each element hands on exactly its own output relevance, f(x) * seed
    _close(values["lrp_relevance"], ACTIVATIONS[activation](x.astype(np.float64)) * seed)
    rules = [rule for _, _, rule in lrp_onnx.inspect_model(m).rows]
    assert rules.count("identity") == 1 and set(rules) <= {"identity", "gradient"}  # a trailing *0.5 is linear


def test_uniform_rule_on_attention_products_is_conservative(rng):
    """y = (q kᵀ) v, all three relevance-carrying: each product hands 1/2 to each operand, so v gets
    half of the output relevance and q, k a quarter each (any other split fails)."""
    nodes = [helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 2, 1]),
             helper.make_node("MatMul", ["q", "kt"], ["scores"]),
             helper.make_node("MatMul", ["scores", "v"], ["y"])]
    m = _model(nodes, [("q", [B, S, H]), ("k", [B, S, H]), ("v", [B, S, H])], [B, S, H])
    q, k, v = (rng.normal(size=(B, S, H)).astype(np.float32) for _ in range(3))
    values, seed = _assert_conserved(m, {"q": q, "k": k, "v": v}, rng, source=["q", "k", "v"])
    r_q, r_k, r_v = values["lrp_relevance"], values["lrp_relevance_1"], values["lrp_relevance_2"]
    q, k, v = (t.astype(np.float64) for t in (q, k, v))
    total = (values["y"] * seed).sum()
    np.testing.assert_allclose([r_q.sum(), r_k.sum(), r_v.sum()], [total / 4, total / 4, total / 2], rtol=1e-4)
    scores = q @ k.transpose(0, 2, 1)
    g_scores = seed @ v.transpose(0, 2, 1) / 2  # 1/2 of the gradient to each operand of y = scores v
    _close(r_v, v * (scores.transpose(0, 2, 1) @ seed) / 2)
    _close(r_q, q * (g_scores @ k) / 2)
    _close(r_k, k * (g_scores.transpose(0, 2, 1) @ q) / 2)
    report = lrp_onnx.inspect_model(m, source=["q", "k", "v"])
    assert [rule for _, _, rule in report.rows if "MatMul" in _] == ["uniform", "uniform"]


def test_uniform_rule_on_gating_is_conservative(rng):
    """y = g * u with g, u both from x: each factor gets exactly half of y's relevance, elementwise."""
    wg, wu = rng.normal(size=(H, 6)).astype(np.float32), rng.normal(size=(H, 6)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "wg"], ["g"]), helper.make_node("MatMul", ["x", "wu"], ["u"]),
             helper.make_node("Mul", ["g", "u"], ["y"])]
    m = _model(nodes, [("x", [B, S, H])], [B, S, 6], [("wg", wg), ("wu", wu)])
    x = rng.normal(size=(B, S, H)).astype(np.float32)
    values, seed = _assert_conserved(m, {"x": x}, rng, latent=["g", "u"])
    r_y = values["y"].astype(np.float64) * seed
    _close(values["lrp_relevance_g"], r_y / 2)
    _close(values["lrp_relevance_u"], r_y / 2)
    x, g, u = x.astype(np.float64), x.astype(np.float64) @ wg, x.astype(np.float64) @ wu
    _close(values["lrp_relevance"], x * ((seed * u / 2) @ wg.T + (seed * g / 2) @ wu.T))


def _constant_std_relevance(x, w, seed, centered):
    """x * d(sum(y * seed))/dx with the std (rms) held constant: y = (x - mean) / std * w."""
    x = x.astype(np.float64)
    c = x - x.mean(-1, keepdims=True) if centered else x
    std = np.sqrt((c ** 2).mean(-1, keepdims=True) + (1e-5 if centered else 1e-6))
    g = seed * w
    if centered:
        g = g - g.mean(-1, keepdims=True)
    return x * g / std


def test_layer_normalization_with_constant_std_is_conservative(rng):
    w, x = rng.normal(size=H).astype(np.float32), rng.normal(size=(B, S, H)).astype(np.float32)
    nodes = [helper.make_node("LayerNormalization", ["x", "w", "b"], ["y"], axis=-1, epsilon=1e-5)]
    m = _model(nodes, [("x", [B, S, H])], [B, S, H], [("w", w), ("b", np.zeros(H))])
    values, seed = _assert_conserved(m, {"x": x}, rng)
    _close(values["lrp_relevance"], _constant_std_relevance(x, w, seed, centered=True))


def test_written_out_rms_norm_with_constant_rms_is_conservative(rng):
    w, x = rng.normal(size=H).astype(np.float32), rng.normal(size=(B, S, H)).astype(np.float32)
    nodes = [helper.make_node("Pow", ["x", "two"], ["p"]),
             helper.make_node("ReduceMean", ["p"], ["ms"], axes=[-1], keepdims=1),
             helper.make_node("Add", ["ms", "eps"], ["mse"]), helper.make_node("Sqrt", ["mse"], ["rms"]),
             helper.make_node("Reciprocal", ["rms"], ["inv"]), helper.make_node("Mul", ["x", "inv"], ["n"]),
             helper.make_node("Mul", ["w", "n"], ["y"])]
    m = _model(nodes, [("x", [B, S, H])], [B, S, H], [("two", np.array(2.0)), ("eps", np.array(1e-6)), ("w", w)])
    values, seed = _assert_conserved(m, {"x": x}, rng)
    expected = _constant_std_relevance(x, w, seed, centered=False)
    _close(values["lrp_relevance"], expected)
    _close(values["lrp_relevance"], values["y"].astype(np.float64) * seed)  # elementwise: R_in = R_out
    rules = {rule for _, cats, rule in lrp_onnx.inspect_model(m).rows if cats[0] == "norm_scale"}
    assert rules == {"constant"}


def test_written_out_layer_norm_with_constant_std_is_conservative(rng):
    w, x = rng.normal(size=H).astype(np.float32), rng.normal(size=(B, S, H)).astype(np.float32)
    nodes = [helper.make_node("ReduceMean", ["x"], ["mean"], axes=[-1], keepdims=1),
             helper.make_node("Sub", ["x", "mean"], ["c"]), helper.make_node("Pow", ["c", "two"], ["p"]),
             helper.make_node("ReduceMean", ["p"], ["var"], axes=[-1], keepdims=1),
             helper.make_node("Add", ["var", "eps"], ["ve"]), helper.make_node("Sqrt", ["ve"], ["std"]),
             helper.make_node("Div", ["c", "std"], ["n"]), helper.make_node("Mul", ["n", "w"], ["y"])]
    m = _model(nodes, [("x", [B, S, H])], [B, S, H], [("two", np.array(2.0)), ("eps", np.array(1e-5)), ("w", w)])
    values, seed = _assert_conserved(m, {"x": x}, rng)
    _close(values["lrp_relevance"], _constant_std_relevance(x, w, seed, centered=True))


def test_residual_add_is_conservative(rng):
    w, x = rng.normal(size=(H, H)).astype(np.float32), rng.normal(size=(B, S, H)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Add", ["x", "h"], ["y"])]
    m = _model(nodes, [("x", [B, S, H])], [B, S, H], [("w", w)])
    values, seed = _assert_conserved(m, {"x": x}, rng)
    _close(values["lrp_relevance"], x * (seed + seed @ w.T.astype(np.float64)))


def test_routing_ops_are_conservative(rng):
    i64 = lambda v: np.array(v, dtype=np.int64)  # noqa: E731
    nodes = [helper.make_node("Reshape", ["x", "shape4"], ["r"]),
             helper.make_node("Transpose", ["r"], ["t"], perm=[0, 2, 1, 3]),
             helper.make_node("Slice", ["t", "s0", "s1", "s_ax"], ["sl"]),
             helper.make_node("Split", ["sl", "split"], ["p1", "p2"], axis=3),
             helper.make_node("Concat", ["p2", "p1"], ["cat"], axis=3),
             helper.make_node("Gather", ["cat", "idx"], ["gat"], axis=2),
             helper.make_node("Unsqueeze", ["gat", "ax0"], ["un"]),
             helper.make_node("Squeeze", ["un", "ax0"], ["sq"]),
             helper.make_node("Cast", ["sq"], ["cast"], to=TensorProto.FLOAT),
             helper.make_node("Where", ["cond", "cast", "zero"], ["wh"]),
             helper.make_node("Expand", ["wh", "eshape"], ["y"])]
    consts = {"shape4": i64([B, S, 2, 4]), "s0": i64([1]), "s1": i64([4]), "s_ax": i64([2]), "split": i64([2, 2]),
              "idx": i64([0, 2, 1]), "ax0": i64([0]), "eshape": i64([B, 2, 3, 4]), "zero": np.array(0.0),
              "cond": np.array([True, False, True, True]).reshape(1, 1, 1, 4)}
    m = _model(nodes, [("x", [B, S, H])], [B, 2, 3, 4], consts.items())
    x = rng.normal(size=(B, S, H)).astype(np.float32)
    values, seed = _assert_conserved(m, {"x": x}, rng)
    # the same routing in numpy: x -> [B, 2, S, 4] -> rows 1..3 -> halves swapped -> rows 0, 2, 1 -> masked
    t = np.arange(x.size).reshape(B, S, 2, 4).transpose(0, 2, 1, 3)[:, :, 1:4]
    t = np.concatenate([t[..., 2:], t[..., :2]], axis=3)[:, :, [0, 2, 1]]
    keep = np.broadcast_to(consts["cond"], t.shape)
    grad = np.zeros(x.size)
    np.add.at(grad, t[keep], seed.astype(np.float64)[keep])
    _close(values["lrp_relevance"], x * grad.reshape(x.shape))


def test_softmax_rule_is_gradient_times_input(rng):
    """AttnLRP's softmax rule is G×I through softmax: not conservative, equal to x*(g - sum(g*y))*y."""
    m = _model([helper.make_node("Softmax", ["x"], ["y"], axis=-1)], [("x", [B, H])], [B, H])
    x = rng.normal(size=(B, H)).astype(np.float32)
    converted = lrp_onnx.convert(m, seed_input=True)
    sess = ort.InferenceSession(converted.SerializeToString(), providers=["CPUExecutionProvider"])
    seed = rng.normal(size=(B, H)).astype(np.float32)
    y, relevance = sess.run(["y", "lrp_relevance"], {"x": x, "lrp_seed": seed})
    expected = x * y * (seed - (seed * y).sum(-1, keepdims=True))
    np.testing.assert_allclose(relevance, expected, rtol=1e-5, atol=1e-6)
