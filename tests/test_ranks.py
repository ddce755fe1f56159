"""Ranks the graph determines where shape inference gives up (lrp_onnx/ir/ranks.py).

DeBERTa's relative positions come from an If whose branches differ in rank (3 and 4); both shape
inferences leave the If's output and everything downstream without a shape, although a Squeeze and an
Expand to a 3-element shape fix the rank again. The backward needs ranks (un-broadcasting), so such
graphs were refused "the rank of an intermediate of its backward ... is unknown". The graphs here are
built in that form; the DeBERTa exports themselves are in tests/test_sweep.py."""
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import lrp_onnx
from lrp_onnx.ir import shapes
from lrp_onnx.errors import LRPError
from tests.handbuilt import CPU, HID, S, TARGET, VOCAB, finite_difference_relevance, rel_l2, weights

POSITION = np.array([-1, 2])


def _branch(name, value):
    const = helper.make_node("Constant", [], [f"{name}_out"], value=onnx.numpy_helper.from_array(value))
    return helper.make_graph([const], name, [], [helper.make_tensor_value_info(f"{name}_out", TensorProto.INT64,
                                                                               list(value.shape))])


def relative_position_model():
    """Attention scores plus a position term gathered by indices that an If makes with rank 3 or 4 (the
    condition compares the symbolic sequence length with a constant: not decided at conversion)."""
    rel = np.clip(np.arange(S)[:, None] - np.arange(S)[None, :] + 2, 0, S - 1).astype(np.int64)
    inits = {"wq": weights(1, HID, HID), "wk": weights(2, HID, HID), "wv": weights(3, HID, HID),
             "wp": weights(4, HID, S), "wo": weights(5, HID, VOCAB), "perm_axes": np.array([0], np.int64),
             "s_const": np.array([S], np.int64), "ss": np.array([S, S], np.int64),
             "zero": np.array([0], np.int64), "one": np.array([1], np.int64), "two": np.array([2], np.int64)}
    nodes = [
        helper.make_node("MatMul", ["x", "wq"], ["q"]), helper.make_node("MatMul", ["x", "wk"], ["k"]),
        helper.make_node("MatMul", ["x", "wv"], ["v"]), helper.make_node("MatMul", ["q", "wp"], ["pos_scores"]),
        helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 2, 1]),
        helper.make_node("MatMul", ["q", "kt"], ["scores"]),
        helper.make_node("Shape", ["x"], ["x_shape"]),
        helper.make_node("Slice", ["x_shape", "one", "two"], ["seq"]),
        helper.make_node("Equal", ["seq", "s_const"], ["same1"]),
        helper.make_node("Squeeze", ["same1", "zero"], ["same"]),
        helper.make_node("If", ["same"], ["idx"], then_branch=_branch("then", rel[None]),
                         else_branch=_branch("else", rel[None, None])),
        helper.make_node("Squeeze", ["idx", "perm_axes"], ["idx2"]),
        helper.make_node("Slice", ["x_shape", "zero", "one"], ["batch"]),
        helper.make_node("Concat", ["batch", "ss"], ["target_shape"], axis=0),
        helper.make_node("Expand", ["idx2", "target_shape"], ["idx3"]),
        helper.make_node("GatherElements", ["pos_scores", "idx3"], ["pos_term"], axis=2),
        helper.make_node("Add", ["scores", "pos_term"], ["biased"]),
        helper.make_node("Softmax", ["biased"], ["probs"], axis=-1),
        helper.make_node("MatMul", ["probs", "v"], ["ctx"]),
        helper.make_node("MatMul", ["ctx", "wo"], ["logits"]),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", HID])
    graph = helper.make_graph(nodes, "g", [x],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "seq", VOCAB])],
                              [onnx.numpy_helper.from_array(v, k) for k, v in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)


def _rank(model, name):
    inferred = shapes.infer_shapes(model)
    for vi in list(inferred.graph.value_info) + list(inferred.graph.output):
        if vi.name == name:
            return len(vi.type.tensor_type.shape.dim) if vi.type.tensor_type.HasField("shape") else None
    return None


def test_shape_inference_alone_loses_the_rank(monkeypatch):
    """The graph is of the form that was refused: without the rank pass, the backward cannot be built."""
    model = relative_position_model()
    monkeypatch.setattr(shapes, "fill_ranks", lambda model, inferred: 0)
    assert _rank(model, "pos_term") is None and _rank(model, "idx") is None
    with pytest.raises(LRPError, match="rank"):
        lrp_onnx.convert(model, rules="gradient", source="x")


def test_ranks_propagated_through_an_if_of_two_ranks():
    model = relative_position_model()
    assert _rank(model, "idx") is None          # rank 3 or 4: stays unknown
    assert _rank(model, "idx2") is None         # 2 or 3
    assert _rank(model, "idx3") == 3            # Expand to a 3-element shape: 3 either way
    assert _rank(model, "pos_term") == 3 and _rank(model, "biased") == 3


@pytest.mark.parametrize("rules", ["gradient", "attnlrp"])
def test_converts_and_gradient_equals_finite_differences(rules):
    model = relative_position_model()
    x = np.random.default_rng(0).standard_normal((2, S, HID)).astype(np.float32)
    converted = lrp_onnx.convert(model, rules=rules, source="x")
    result = lrp_onnx.Explainer.from_model(converted, providers=CPU).run(x=x, target=TARGET, position=POSITION)
    relevance = result.relevances["lrp_relevance"]
    assert relevance.shape == x.shape and np.isfinite(relevance).all()
    if rules == "gradient":
        expected = finite_difference_relevance(model, {"x": x}, target=TARGET, position=POSITION)
        assert rel_l2(relevance, expected) < 1e-5


def test_reshape_to_a_computed_shape_of_known_length():
    """The rank of a Reshape is the length of its shape vector, here made of a slice of Shape(x) and a
    constant: known once x's rank is (its sizes need not be), unknown while x's rank is unknown."""
    from lrp_onnx.ir.ranks import fill_ranks

    nodes = [helper.make_node("Shape", ["x"], ["s"]),
             helper.make_node("Slice", ["s", "zero", "two"], ["head"]),
             helper.make_node("Concat", ["head", "minus1"], ["shape"], axis=0),
             helper.make_node("Reshape", ["x", "shape"], ["y"]),
             helper.make_node("Squeeze", ["y", "zero"], ["z"])]
    inits = [onnx.numpy_helper.from_array(np.array(v, np.int64), k) for k, v in
             {"zero": [0], "two": [2], "minus1": [-1]}.items()]

    def ranks_of(x_shape):
        graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                                  [helper.make_tensor_value_info("z", TensorProto.FLOAT, None)], inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        inferred = onnx.ModelProto()
        inferred.CopyFrom(model)
        fill_ranks(model, inferred)
        return {vi.name: len(vi.type.tensor_type.shape.dim) for vi in
                list(inferred.graph.value_info) + list(inferred.graph.output) if vi.type.tensor_type.HasField("shape")}

    assert ranks_of(["a", None, "c", "d"]) == {"s": 1, "head": 1, "shape": 1, "y": 3, "z": 2}
    assert ranks_of([None]) == {"s": 1, "head": 1, "shape": 1, "y": 2, "z": 1}  # Shape [0:2] of a 1-D x: 1 long
    assert ranks_of(None) == {"s": 1, "head": 1, "shape": 1}
