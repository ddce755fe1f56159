"""Rules by what an op computes (issue 9): a transformer of our own with squared ReLU, an
Exp/Log/Abs/Pow composite and an l2-normalised output equals the LXT-rule reference, and a unit
whose computation is not known is refused naming the node, never given a default gradient."""
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

import lrp_onnx
from lrp_onnx.errors import UnsupportedOpsError
from models import custom

IDS = np.array([[3, 17, 5, 22, 9, 31], [8, 2, 27, 14, 6, 1]], dtype=np.int64)
POSITION = np.array([5, 3], dtype=np.int64)
TARGET = np.array([11, 4], dtype=np.int64)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model = custom.build(seed=0)
    return model, custom.export(model, tmp_path_factory.mktemp("custom") / "model.onnx")


def rel_l2(a, b):
    return float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b))


@pytest.mark.parametrize("rules", ["gradient", "attnlrp", "cp-lrp"])
def test_custom_transformer_equals_lxt_rule_reference(exported, rules):
    model, path = exported
    explainer = lrp_onnx.Explainer.from_model(lrp_onnx.convert(path, rules=rules),
                                              providers=["CPUExecutionProvider"])
    got = explainer.run(input_ids=IDS, position=POSITION, target=TARGET).relevance
    want = custom.relevance(model, IDS, POSITION, TARGET, rules)
    assert got.shape == want.shape == (2, 6, 16)
    assert rel_l2(got, want) < 1e-5


def test_custom_transformer_units_get_the_rules_of_what_they_compute(exported):
    _, path = exported
    rows = lrp_onnx.inspect_model(path, rules="attnlrp").rows
    by_pattern = {desc: (cats[0], rule) for desc, cats, rule in rows}
    activations = [(d, r) for d, (c, r) in by_pattern.items() if c == "activation"]
    # relu(u) ** 2 and log(1 + exp(u)) + 0.1 |u| ** 1.5, each one unit with the identity rule
    assert len(activations) == 2 and all(r == "identity" for _, r in activations)
    assert any("Pow" in d and "Relu" in d for d, _ in activations)
    assert any("Exp" in d and "Log" in d and "Abs" in d for d, _ in activations)
    norms = [d for d, (c, r) in by_pattern.items() if c == "norm_scale" and r == "constant"]
    assert sum("L2 norm" in d for d in norms) == 1  # F.normalize's ReduceL2 -> Clip -> Expand, held constant
    assert sum("ratio of norm statistics" in d for d in norms) == 1  # GRN's ||h|| / mean ||h||, held constant


def _graph(nodes, inputs, output_shape, initializers=()):
    x = [helper.make_tensor_value_info(name, TensorProto.FLOAT, shape) for name, shape in inputs]
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, output_shape)
    graph = helper.make_graph(nodes, "g", x, [y], initializer=list(initializers))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _scalar(name, value):
    return helper.make_tensor(name, TensorProto.FLOAT, [], [value])


def test_division_of_two_relevance_carrying_tensors_is_refused_naming_the_node():
    """p / (|r| + 1) with p and r two projections of x: neither linear, nor elementwise in one
    tensor, nor a product, nor a normalisation by a statistic of p."""
    rng = np.random.default_rng(5)
    weight = lambda name: helper.make_tensor(name, TensorProto.FLOAT, [4, 4], rng.normal(size=16).tolist())
    model = _graph([helper.make_node("MatMul", ["x", "w1"], ["p"], name="proj_p"),
                    helper.make_node("MatMul", ["x", "w2"], ["r"], name="proj_r"),
                    helper.make_node("Abs", ["r"], ["a"], name="abs"),
                    helper.make_node("Add", ["a", "one"], ["den"], name="plus_one"),
                    helper.make_node("Div", ["p", "den"], ["q"], name="ratio"),
                    helper.make_node("MatMul", ["q", "w3"], ["y"], name="head")],
                   [("x", [2, 4])], [2, 4], [_scalar("one", 1.0), weight("w1"), weight("w2"), weight("w3")])
    for rules in ("attnlrp", "cp-lrp"):
        with pytest.raises(UnsupportedOpsError, match=r"'ratio' \(ai.onnx::Div\): no rule"):
            lrp_onnx.convert(model, rules=rules, seed_input=True)
        report = lrp_onnx.inspect_model(model, rules=rules)
        assert not report.supported and any("'ratio'" in p for p in report.problems)
    # the exact gradient needs no classification; an override gives the unit a rule
    for kwargs in ({"rules": "gradient"}, {"rules": "attnlrp", "overrides": {"ratio": "gradient"}}):
        converted = lrp_onnx.convert(model, seed_input=True, **kwargs)
        x = np.random.default_rng(0).normal(size=(2, 4)).astype(np.float32)
        seed = np.random.default_rng(1).normal(size=(2, 4)).astype(np.float32)
        sess = ort.InferenceSession(converted.SerializeToString(), providers=["CPUExecutionProvider"])
        relevance = sess.run(["lrp_relevance"], {"x": x, "lrp_seed": seed})[0]
        assert relevance.shape == x.shape and np.isfinite(relevance).all()
        if kwargs["rules"] == "gradient":
            assert rel_l2(relevance, x * _numeric_vjp(model, x, seed)) < 1e-3


def _numeric_vjp(model, x, seed, h=1e-3):
    """seed . dy/dx by central differences of the original graph (float64 accumulation)."""
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    grad = np.zeros(x.shape)
    for i in np.ndindex(x.shape):
        up, down = x.copy(), x.copy()
        up[i] += h
        down[i] -= h
        diff = sess.run(None, {"x": up})[0].astype(np.float64) - sess.run(None, {"x": down})[0]
        grad[i] = float((diff * seed).sum()) / (2 * h)
    return grad


def test_unknown_op_on_the_path_is_refused_and_inspect_agrees():
    """An op outside every table (Hardmax here) is refused by the LRP rule sets, by convert and
    inspect alike, naming the node."""
    model = _graph([helper.make_node("Hardmax", ["x"], ["h"], name="pick"),
                    helper.make_node("Mul", ["h", "x"], ["y"], name="mask")],
                   [("x", [2, 4])], [2, 4])
    with pytest.raises(UnsupportedOpsError, match=r"'pick' \(ai.onnx::Hardmax\)"):
        lrp_onnx.convert(model, rules="attnlrp", seed_input=True)
    report = lrp_onnx.inspect_model(model, rules="attnlrp")
    assert any("'pick' (ai.onnx::Hardmax)" in p for p in report.problems)


@pytest.mark.parametrize("rules", ["attnlrp", "cp-lrp"])
def test_written_out_compositions_pass_relevance_unchanged(rules):
    """log(1 + exp(x)) and relu(x) ** 2, written as chains of ops, are one identity unit each: the
    relevance at x equals the relevance of y elementwise; a bias added before the first nonlinear
    op stays outside (it absorbs its share, as the linear layer's bias does)."""
    model = _graph([helper.make_node("Add", ["x", "bias"], ["z"], name="bias_add"),
                    helper.make_node("Exp", ["z"], ["e"], name="exp"),
                    helper.make_node("Add", ["e", "one"], ["e1"], name="plus_one"),
                    helper.make_node("Log", ["e1"], ["sp"], name="log"),
                    helper.make_node("Relu", ["sp"], ["r"], name="relu"),
                    helper.make_node("Pow", ["r", "two"], ["y"], name="square")],
                   [("x", [3, 5])], [3, 5],
                   [helper.make_tensor("bias", TensorProto.FLOAT, [5], [0.3, -0.2, 0.1, 0.5, -0.4]),
                    _scalar("one", 1.0), _scalar("two", 2.0)])
    converted = lrp_onnx.convert(model, rules=rules, seed_input=True, latent=["z"])
    x = np.random.default_rng(2).normal(size=(3, 5)).astype(np.float32)
    seed = np.random.default_rng(3).normal(size=(3, 5)).astype(np.float32)
    sess = ort.InferenceSession(converted.SerializeToString(), providers=["CPUExecutionProvider"])
    y, r_x, r_z = sess.run(["y", "lrp_relevance", "lrp_relevance_z"], {"x": x, "lrp_seed": seed})
    np.testing.assert_allclose(r_z, y * seed, rtol=1e-5, atol=1e-6)         # identity through the whole chain
    z = x + np.array([0.3, -0.2, 0.1, 0.5, -0.4], np.float32)
    np.testing.assert_allclose(r_x, x / z * r_z, rtol=1e-4, atol=1e-6)       # gradient through the bias add


def test_einsum_with_an_ellipsis_equals_numpy():
    """'...qk,...kd->...qd' (LongT5's local attention): the ellipsis is written out as letters; the
    gradient equals numpy's, and a product of two relevance-carrying operands gets the uniform rule."""
    rng = np.random.default_rng(7)
    w = rng.normal(size=(2, 3, 5, 6))
    nodes = [helper.make_node("Einsum", ["x", "w"], ["y"], equation="...qk,...kd->...qd", name="local")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.DOUBLE, [2, 3, 4, 5])],
                              [helper.make_tensor_value_info("y", TensorProto.DOUBLE, [2, 3, 4, 6])],
                              [onnx.numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    x, seed = rng.normal(size=(2, 3, 4, 5)), rng.normal(size=(2, 3, 4, 6))
    sess = ort.InferenceSession(lrp_onnx.convert(model, rules="gradient", seed_input=True).SerializeToString(),
                                providers=["CPUExecutionProvider"])
    relevance = sess.run(["lrp_relevance"], {"x": x, "lrp_seed": seed})[0]
    np.testing.assert_allclose(relevance, x * np.einsum("abqd,abkd->abqk", seed, w), rtol=1e-12, atol=1e-12)
    # x against itself: a product of two operands, each gets half (relevance = y ⊙ seed, summed over q·k)
    square = helper.make_model(helper.make_graph(
        [helper.make_node("Einsum", ["x", "x"], ["y"], equation="...qk,...pk->...qp", name="gram")], "g",
        [helper.make_tensor_value_info("x", TensorProto.DOUBLE, [2, 3, 4, 5])],
        [helper.make_tensor_value_info("y", TensorProto.DOUBLE, [2, 3, 4, 4])]),
        opset_imports=[helper.make_opsetid("", 17)])
    sess = ort.InferenceSession(lrp_onnx.convert(square, rules="attnlrp", seed_input=True).SerializeToString(),
                                providers=["CPUExecutionProvider"])
    seed = rng.normal(size=(2, 3, 4, 4))
    relevance = sess.run(["lrp_relevance"], {"x": x, "lrp_seed": seed})[0]
    gram = np.einsum("abqk,abpk->abqp", x, x)
    np.testing.assert_allclose(relevance.sum(), (gram * seed).sum(), rtol=1e-10)
    grad = (np.einsum("abqp,abpk->abqk", seed, x) + np.einsum("abqp,abqk->abpk", seed, x)) / 2
    np.testing.assert_allclose(relevance, x * grad, rtol=1e-10, atol=1e-12)


def test_einsum_whose_ellipsis_broadcasts_equals_numpy():
    """'...qk,...kd->...qd' with the weight's ellipsis [1, 3] broadcast against x's [2, 3]: the weight's
    gradient is summed back over the broadcast axis (numpy einsum broadcasts ellipsis dims too). The
    broadcast operand comes first: onnxruntime's symbolic shape inference gives the output the last
    operand's ellipsis dims."""
    rng = np.random.default_rng(8)
    nodes = [helper.make_node("Einsum", ["v", "x"], ["y"], equation="...kd,...qk->...qd", name="local")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.DOUBLE, [2, 3, 4, 5]),
                                           helper.make_tensor_value_info("v", TensorProto.DOUBLE, [1, 3, 5, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.DOUBLE, [2, 3, 4, 6])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    x, v, seed = rng.normal(size=(2, 3, 4, 5)), rng.normal(size=(1, 3, 5, 6)), rng.normal(size=(2, 3, 4, 6))
    converted = lrp_onnx.convert(model, rules="gradient", source=["x", "v"], seed_input=True)
    sess = ort.InferenceSession(converted.SerializeToString(), providers=["CPUExecutionProvider"])
    r_x, r_v = sess.run(["lrp_relevance", "lrp_relevance_1"], {"x": x, "v": v, "lrp_seed": seed})
    np.testing.assert_allclose(r_x, x * np.einsum("...qd,...kd->...qk", seed, v), rtol=1e-12, atol=1e-12)
    grad_v = np.einsum("...qd,...qk->...kd", seed, x).sum(axis=0, keepdims=True)
    np.testing.assert_allclose(r_v, v * grad_v, rtol=1e-12, atol=1e-12)
