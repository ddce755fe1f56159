"""Which nodes of the converted graphs TensorRT's ONNX parser supports, statically (no GPU):
tools/tensorrt_ops.py against tools/data/tensorrt_ops.json, onnx-tensorrt's operator matrix (TensorRT
10.0/10.1, opset 9..20).

What the parser does not take, by conversion form (asserted exactly below):
* default (plain lrp_target / lrp_position inputs, one target per row): nothing, on every dense family and
  rule set here (the seed's one-hots are Equal(Range) rather than OneHot with a shape-computed depth);
* a sparse mixture of experts (Mixtral): its export's own bool NonZero, plus the backward's runtime
  un-broadcast (ReduceSum over computed axes);
* multi_target: the one Loop over the targets, whose scan outputs (one relevance per target) have the
  trip count's length, dynamic; onnxruntime's TensorRT provider runs that Loop on its next provider;
* inputs="optional": the OptionalHasElement / OptionalGetElement pair of each input (marked N).
"""
import onnx
import pytest
from onnx import TensorProto, helper

import lrp_onnx
from tests.test_cuda_kernels import CONVERSIONS
from tools.tensorrt_ops import check_model, table


def flagged(model):
    found, checked = check_model(model)
    assert checked > 50
    return sorted({(f.op, f.reason.split(" (")[0].split(" ('")[0]) for f in found})


def test_table_is_the_parsers_matrix():
    data = table()
    assert "onnx-tensorrt" in data["source"] and len(data["source"].split("commit ")[1].split()[0]) == 40
    assert (data["opset_min"], data["opset_max"]) == (9, 20)
    ops = data["ops"]
    assert len(ops) > 180
    assert ops["MatMul"]["supported"] and ops["MatMul"]["types"] == ["float", "float16", "bfloat16"]
    assert not ops["OptionalHasElement"]["supported"]
    assert ops["ConstantOfShape"]["types"][4] == "int64"  # the page's "INF64"


def test_checker_flags_what_the_parser_lacks():
    t = helper.make_tensor_value_info
    graph = helper.make_graph(
        [helper.make_node("Shape", ["x"], ["s"], name="shape"),
         helper.make_node("Slice", ["s", "one", "two"], ["n"], name="length"),
         helper.make_node("OneHot", ["i", "n", "v"], ["h"], name="onehot_dynamic_depth"),
         helper.make_node("OneHot", ["i", "three", "v"], ["h3"], name="onehot_constant_depth"),
         helper.make_node("Unsqueeze", ["x", "n"], ["u"], name="unsqueeze_computed_axes"),
         helper.make_node("MatMul", ["d", "d"], ["dd"], name="matmul_double"),
         helper.make_node("FusedMatMul", ["x", "x"], ["f"], name="contrib", domain="com.microsoft")],
        "g", [t("x", TensorProto.FLOAT, [2, 2]), t("i", TensorProto.INT64, [2]), t("d", TensorProto.DOUBLE, [2, 2])],
        [t(o, TensorProto.FLOAT, None) for o in ("h", "h3", "u", "f")] + [t("dd", TensorProto.DOUBLE, None)],
        [helper.make_tensor(n, TensorProto.INT64, [1], [v]) for n, v in (("one", 1), ("two", 2), ("three", 3))]
        + [helper.make_tensor("v", TensorProto.FLOAT, [2], [0, 1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    found = {f.node: f.reason for f in check_model(model)[0]}
    assert set(found) == {"onehot_dynamic_depth", "unsqueeze_computed_axes", "matmul_double", "contrib"}
    assert found["matmul_double"].startswith("T = double")
    assert found["contrib"] == "not in the parser's matrix"
    newer = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])
    assert "opset 23 outside" in str(check_model(newer)[0][0])


@pytest.mark.parametrize("family,exporter,rules,relevance_only", CONVERSIONS + [
    ("vit", "torchscript", "vit-gamma", False),  # mixtral: test_mixture_of_experts
])
def test_converted_graphs_parse(family, exporter, rules, relevance_only, tiny_model):
    _, path = tiny_model(family, exporter)
    assert flagged(onnx.load(str(path))) == []
    assert flagged(lrp_onnx.convert(path, rules=rules, relevance_only=relevance_only)) == []


def test_mixture_of_experts(tiny_model):
    """Mixtral: the export itself routes tokens with NonZero on a bool mask (the parser takes NonZero on
    float only); the conversion adds the backward's runtime un-broadcast of the routing weights
    (ReduceSum over axes computed from the shapes)."""
    _, path = tiny_model("mixtral")
    assert flagged(onnx.load(str(path))) == [("ai.onnx::NonZero", "T = bool")]
    assert flagged(lrp_onnx.convert(path)) == [("ai.onnx::NonZero", "T = bool"), ("ai.onnx::ReduceSum", "`axes`")]


def test_multi_target_and_optional_forms(tiny_model):
    _, path = tiny_model("llama")
    assert flagged(lrp_onnx.convert(path, multi_target=True)) == [
        ("ai.onnx::Loop", "scan outputs")]
    assert flagged(lrp_onnx.convert(path, inputs="optional")) == [
        ("ai.onnx::OptionalGetElement", "marked unsupported"), ("ai.onnx::OptionalHasElement", "marked unsupported")]
