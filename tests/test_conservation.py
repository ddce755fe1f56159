"""Conservation, rule by rule, on small hand-built graphs.

Each graph is built so that its explained output is a conservative function of the source under
the rule being tested: sum(input relevance) must equal sum(output relevance) = sum(y * seed).
"""
import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import lrp_onnx

RNG = np.random.default_rng(0)
B, S, H = 2, 5, 8


def _model(nodes, inputs, output_shape, initializers=(), output="y"):
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs],
        [helper.make_tensor_value_info(output, TensorProto.FLOAT, output_shape)],
        initializer=[numpy_helper.from_array(_as_model_dtype(np.asarray(v)), k) for k, v in initializers])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _as_model_dtype(v):
    return v.astype(np.float32) if v.dtype.kind == "f" else v


def _relevance(model, feeds, rules="attnlrp"):
    converted = lrp_onnx.convert(model, rules=rules, seed_input=True)
    sess = ort.InferenceSession(converted.SerializeToString(), providers=["CPUExecutionProvider"])
    original = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    out_shape = original.run(["y"], feeds)[0].shape
    seed = RNG.normal(size=out_shape).astype(np.float32)
    names = [o.name for o in sess.get_outputs()]
    values = dict(zip(names, sess.run(None, {**feeds, "lrp_seed": seed})))
    relevance_in = sum(values[n].sum() for n in names if n.startswith("lrp_relevance"))
    relevance_out = (values["y"] * seed).sum()
    return relevance_in, relevance_out, values


def _x(*shape):
    return RNG.normal(size=shape).astype(np.float32)


def _assert_conserved(model, feeds, rules="attnlrp"):
    r_in, r_out, values = _relevance(model, feeds, rules)
    assert abs(r_in - r_out) <= 1e-5 * max(1.0, abs(r_out)), (r_in, r_out)
    assert abs(r_out) > 1e-3  # the check is not vacuous
    return values


def test_bias_free_linear_is_conservative():
    w = _x(H, 6)
    m = _model([helper.make_node("MatMul", ["x", "w"], ["h"]),
                helper.make_node("Reshape", ["h", "shape"], ["h2"]),
                helper.make_node("Gemm", ["h2", "w2"], ["y"], transB=1)],
               [("x", [B, S, H])], [B * S, 4],
               [("w", w), ("w2", _x(4, 6)), ("shape", np.array([-1, 6], dtype=np.int64))])
    _assert_conserved(m, {"x": _x(B, S, H)})


@pytest.mark.parametrize("activation", ["Gelu-erf", "Gelu-tanh", "SiLU", "Tanh", "Sigmoid"])
def test_identity_rule_is_conservative(activation):
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
    x = _x(B, S, H)
    _assert_conserved(m, {"x": x})
    rules = [rule for _, _, rule in lrp_onnx.inspect_model(m).rows]
    assert rules.count("identity") == 1 and set(rules) <= {"identity", "gradient"}  # a trailing *0.5 is linear


def test_uniform_rule_on_attention_products_is_conservative():
    # scores = q @ k^T ; probs held linear via seed ; out = probs_like(a) @ v with a from x too
    nodes = [helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 2, 1]),
             helper.make_node("MatMul", ["q", "kt"], ["scores"]),
             helper.make_node("MatMul", ["scores", "v"], ["y"])]
    m = _model(nodes, [("q", [B, S, H]), ("k", [B, S, H]), ("v", [B, S, H])], [B, S, H])
    _assert_conserved(m, {"q": _x(B, S, H), "k": _x(B, S, H), "v": _x(B, S, H)})
    report = lrp_onnx.inspect_model(m)
    assert [rule for _, _, rule in report.rows if "MatMul" in _] == ["uniform", "uniform"]


def test_uniform_rule_on_gating_is_conservative():
    nodes = [helper.make_node("MatMul", ["x", "wg"], ["g"]), helper.make_node("MatMul", ["x", "wu"], ["u"]),
             helper.make_node("Mul", ["g", "u"], ["y"])]
    m = _model(nodes, [("x", [B, S, H])], [B, S, 6], [("wg", _x(H, 6)), ("wu", _x(H, 6))])
    _assert_conserved(m, {"x": _x(B, S, H)})


def test_layer_normalization_with_constant_std_is_conservative():
    nodes = [helper.make_node("LayerNormalization", ["x", "w", "b"], ["y"], axis=-1, epsilon=1e-5)]
    m = _model(nodes, [("x", [B, S, H])], [B, S, H], [("w", _x(H)), ("b", np.zeros(H))])
    _assert_conserved(m, {"x": _x(B, S, H)})


def test_written_out_rms_norm_with_constant_rms_is_conservative():
    nodes = [helper.make_node("Pow", ["x", "two"], ["p"]),
             helper.make_node("ReduceMean", ["p"], ["ms"], axes=[-1], keepdims=1),
             helper.make_node("Add", ["ms", "eps"], ["mse"]), helper.make_node("Sqrt", ["mse"], ["rms"]),
             helper.make_node("Reciprocal", ["rms"], ["inv"]), helper.make_node("Mul", ["x", "inv"], ["n"]),
             helper.make_node("Mul", ["w", "n"], ["y"])]
    m = _model(nodes, [("x", [B, S, H])], [B, S, H], [("two", np.array(2.0)), ("eps", np.array(1e-6)),
                                                       ("w", _x(H))])
    _assert_conserved(m, {"x": _x(B, S, H)})
    rules = {rule for _, cats, rule in lrp_onnx.inspect_model(m).rows if cats[0] == "norm_scale"}
    assert rules == {"constant"}


def test_written_out_layer_norm_with_constant_std_is_conservative():
    nodes = [helper.make_node("ReduceMean", ["x"], ["mean"], axes=[-1], keepdims=1),
             helper.make_node("Sub", ["x", "mean"], ["c"]), helper.make_node("Pow", ["c", "two"], ["p"]),
             helper.make_node("ReduceMean", ["p"], ["var"], axes=[-1], keepdims=1),
             helper.make_node("Add", ["var", "eps"], ["ve"]), helper.make_node("Sqrt", ["ve"], ["std"]),
             helper.make_node("Div", ["c", "std"], ["n"]), helper.make_node("Mul", ["n", "w"], ["y"])]
    m = _model(nodes, [("x", [B, S, H])], [B, S, H], [("two", np.array(2.0)), ("eps", np.array(1e-5)),
                                                       ("w", _x(H))])
    _assert_conserved(m, {"x": _x(B, S, H)})


def test_residual_add_is_conservative():
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Add", ["x", "h"], ["y"])]
    m = _model(nodes, [("x", [B, S, H])], [B, S, H], [("w", _x(H, H))])
    _assert_conserved(m, {"x": _x(B, S, H)})


def test_routing_ops_are_conservative():
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
    _assert_conserved(m, {"x": _x(B, S, H)})


def test_softmax_rule_is_gradient_times_input():
    """AttnLRP's softmax rule is G×I through softmax: not conservative, equal to x*(g - sum(g*y))*y."""
    m = _model([helper.make_node("Softmax", ["x"], ["y"], axis=-1)], [("x", [B, H])], [B, H])
    x = _x(B, H)
    converted = lrp_onnx.convert(m, seed_input=True)
    sess = ort.InferenceSession(converted.SerializeToString(), providers=["CPUExecutionProvider"])
    seed = _x(B, H)
    y, relevance = sess.run(["y", "lrp_relevance"], {"x": x, "lrp_seed": seed})
    expected = x * y * (seed - (seed * y).sum(-1, keepdims=True))
    np.testing.assert_allclose(relevance, expected, rtol=1e-5, atol=1e-6)
