"""Every node of the converted graphs has a CUDA kernel in onnxruntime for its op, domain, opset version
and dtypes (tools/data/cuda_kernels.json: the CUDAExecutionProvider rows of onnxruntime's published
operator-kernel table), so that nothing silently falls back to the CPU on a GPU. Runs without a GPU."""
from pathlib import Path

import onnx
import pytest
from onnx import TensorProto, helper

import lrp_onnx
from tools.cuda_kernels import EXPECTED_ON_CPU, check_model, table

REPO = Path(__file__).resolve().parent.parent



def fallbacks_of(model, allow_optional=False):
    """Nodes without a CUDA kernel. The default conversion has plain lrp_target / lrp_position inputs
    and no Optional op; `allow_optional`: graphs converted with inputs="optional" (or by earlier versions)
    keep their two Optional ops on the CPU."""
    fallbacks, checked = check_model(model)
    assert checked > 50
    return [str(f) for f in fallbacks if not (allow_optional and f.op in EXPECTED_ON_CPU)]


def _graph(nodes, inputs, outputs, opset=17):
    g = helper.make_graph(nodes, "g", inputs, outputs)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])


def test_checker_flags_what_cuda_lacks():
    """Hand-built: the checker sees dtypes CUDA lacks (Where on bool, Pad on int64, Range on float16,
    OptionalHasElement) and passes what it has."""
    t = helper.make_tensor_value_info
    ok = _graph([helper.make_node("Add", ["a", "a"], ["b"], name="add"),
                 helper.make_node("Where", ["c", "b", "a"], ["w"], name="where_float")],
                [t("a", TensorProto.FLOAT, [2]), t("c", TensorProto.BOOL, [2])], [t("w", TensorProto.FLOAT, [2])])
    bad = _graph([helper.make_node("Where", ["c", "c", "c"], ["w"], name="where_bool"),
                  helper.make_node("Pad", ["i", "p"], ["q"], name="pad_int64"),
                  helper.make_node("Range", ["h", "h", "h"], ["r"], name="range_half"),
                  helper.make_node("Cast", ["i"], ["s"], name="cast_string", to=TensorProto.STRING)],
                 [t("c", TensorProto.BOOL, [2]), t("i", TensorProto.INT64, [2]), t("p", TensorProto.INT64, [2]),
                  t("h", TensorProto.FLOAT16, [])],
                 [t("w", TensorProto.BOOL, [2]), t("q", TensorProto.INT64, [None]), t("r", TensorProto.FLOAT16, [None]),
                  t("s", TensorProto.STRING, [2])])
    assert check_model(ok)[0] == []
    flagged = {f.node: f.reason for f in check_model(bad)[0]}
    assert set(flagged) == {"where_bool", "pad_int64", "range_half", "cast_string"}
    assert flagged["where_bool"].startswith("T = bool")
    assert flagged["pad_int64"].startswith("T = int64")
    assert flagged["range_half"].startswith("T = float16")
    assert flagged["cast_string"].startswith("T2 = string")
    assert "OptionalHasElement" not in table()["kernels"]["ai.onnx"]


# the conversion forms both static runtime checks take (tests/test_tensorrt_ops.py too): each exporter,
# rule set and --relevance-only on the text families
CONVERSIONS = [
    ("bert", "torchscript", "attnlrp", False),
    ("bert", "dynamo", "cp-lrp", False),
    ("llama", "torchscript", "attnlrp", True),
    ("llama", "dynamo", "gradient", False),
    ("gpt2", "torchscript", "cp-lrp", True),
    ("t5", "torchscript", "attnlrp", False),
]


@pytest.mark.parametrize("family,exporter,rules,relevance_only", CONVERSIONS + [
    ("mixtral", "torchscript", "attnlrp", False),
    ("vit", "torchscript", "attnlrp", False),
])
def test_converted_graph_has_cuda_kernels(family, exporter, rules, relevance_only, tiny_model, workdir):
    _, path = tiny_model(family, exporter)
    out = workdir / f"{family}-{exporter}" / f"model.cuda.{rules}.{int(relevance_only)}.onnx"
    converted = lrp_onnx.convert(path, out, rules=rules, relevance_only=relevance_only)
    assert fallbacks_of(onnx.load(str(path))) == []
    assert fallbacks_of(converted) == []


def test_optional_inputs_keep_their_optional_ops_on_cpu(tiny_model, workdir):
    _, path = tiny_model("llama", "torchscript")
    converted = lrp_onnx.convert(path, rules="attnlrp", inputs="optional")
    optional = [f for f in check_model(converted)[0] if f.op in EXPECTED_ON_CPU]
    assert len(optional) == 4  # OptionalHasElement and OptionalGetElement (in an If branch), per input
    assert fallbacks_of(converted, allow_optional=True) == []


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_fp16_converted_graph_has_cuda_kernels(family, workdir):
    from models import tiny

    path = workdir / f"{family}-fp16-cuda.onnx"
    if not path.exists():
        tiny.export(tiny.build(family, seed=0).half(), path)
    converted = lrp_onnx.convert(path, workdir / f"{family}-fp16-cuda.lrp.onnx", rules="attnlrp")
    assert any(i.data_type == TensorProto.FLOAT16 for i in converted.graph.initializer)
    assert fallbacks_of(converted) == []


def test_benchmark_graphs_have_cuda_kernels():
    """SmolLM2 / MiniLM, when `python -m tools.bench` has exported and converted them (build/bench)."""
    found = sorted((REPO / "build" / "bench").glob("*/model.lrp.*.onnx"))
    for path in found:
        assert fallbacks_of(onnx.load(str(path), load_external_data=False), allow_optional=True) == [], path


def test_lean_converted_graph_has_cuda_kernels(tiny_model, workdir):
    _, path = tiny_model("llama", "torchscript")
    converted = lrp_onnx.convert(path, workdir / "llama-cuda-lean.onnx", rules="attnlrp", memory="lean")
    assert sum(n.name.startswith("lrp/lean/") for n in converted.graph.node) > 10
    assert fallbacks_of(converted) == []
