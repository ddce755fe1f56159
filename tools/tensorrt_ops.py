"""Which nodes of an ONNX graph TensorRT's ONNX parser does not support (a static check, no GPU).

The table is tools/data/tensorrt_ops.json: onnx-tensorrt's operator support matrix (docs/operators.md;
the file names the commit and the TensorRT version). A node is flagged when

* its op is not in the matrix or marked N (every com.microsoft op: the parser reads ai.onnx only);
* the model's ai.onnx opset is outside the parser's range (opset_min..opset_max);
* an input bound to one of the op's type parameters (by the op's schema; for an op without such an
  input, its outputs) has an element type the row does not list;
* a restriction the page states and that the graph alone decides is broken: the `axes` input (Slice,
  Squeeze, Unsqueeze, Reduce*, Pad), OneHot's `depth` and CumSum's `axis` are not initializers or
  Constant outputs; EyeLike's input has a dynamic shape; TopK has sorted=0; LayerNormalization uses
  an output other than Y; Loop has scan outputs (their length follows the trip count, dynamic here).

Other restrictions (values, run-time shapes) are not checked. In onnxruntime's TensorRT execution
provider a flagged node does not fail the model: the provider hands it (and the partition around it)
to the next provider in the list (CUDA, then CPU).

    python -m tools.tensorrt_ops model.onnx [...]     # prints every flagged node, exit 1 if any
"""
from __future__ import annotations

import functools
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import onnx

from tools.cuda_kernels import TYPE_NAMES, _bind, _dtypes, _schema, report

TABLE = Path(__file__).resolve().parent / "data" / "tensorrt_ops.json"
AXES_INPUT = {"Slice": 3, "Squeeze": 1, "Unsqueeze": 1, "Pad": 3, "ReduceSum": 1, "ReduceMean": 1, "ReduceMax": 1,
              "ReduceMin": 1, "ReduceProd": 1, "ReduceL1": 1, "ReduceL2": 1, "ReduceLogSum": 1,
              "ReduceLogSumExp": 1, "ReduceSumSquare": 1}
CONSTANT_INPUT = {"OneHot": (1, "`depth` must be a build-time constant"),
                  "CumSum": (1, "`axis` must be an initializer")}


@functools.lru_cache(maxsize=1)
def table() -> dict:
    return json.loads(TABLE.read_text())


@dataclass(frozen=True)
class Unsupported:
    node: str
    op: str       # domain::op_type
    reason: str

    def __str__(self):
        return f"{self.node} ({self.op}): {self.reason}"


def _constants(graph: onnx.GraphProto, outer: set) -> set:
    out = set(outer) | {t.name for t in graph.initializer}
    out |= {n.output[0] for n in graph.node if n.op_type == "Constant" and n.domain in ("", "ai.onnx")}
    return out


def _static(graph: onnx.GraphProto, name: str) -> bool:
    for vi in list(graph.input) + list(graph.value_info) + list(graph.output):
        if vi.name == name and vi.type.HasField("tensor_type"):
            dims = vi.type.tensor_type.shape.dim
            return bool(dims) and all(d.HasField("dim_value") for d in dims)
    return False


def check_graph(graph: onnx.GraphProto, opset: int, outer_types: dict | None = None,
                outer_constants: set | None = None) -> tuple[list[Unsupported], int]:
    """(flagged nodes, number of nodes checked) for `graph` and its subgraphs."""
    ops = table()["ops"]
    types = _dtypes(graph, outer_types or {})
    constants = _constants(graph, outer_constants or set())
    flagged, checked = [], 0
    for node in graph.node:
        domain = node.domain or "ai.onnx"
        label = node.name or f"<{node.op_type} -> {node.output[0] if node.output else ''}>"
        op = f"{domain}::{node.op_type}"
        for attr in node.attribute:
            for sub in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)):
                sub_flagged, sub_checked = check_graph(sub, opset, types, constants)
                flagged += sub_flagged
                checked += sub_checked
        checked += 1
        row = ops.get(node.op_type) if domain == "ai.onnx" else None
        if row is None or not row["supported"]:
            why = "not in the parser's matrix" if row is None else "marked unsupported (N)"
            flagged.append(Unsupported(label, op, why))
            continue
        for reason in _restrictions(graph, node, row, opset, types, constants):
            flagged.append(Unsupported(label, op, reason))
    return flagged, checked


def _restrictions(graph, node, row, opset, types, constants):
    schema = _schema(node.domain, node.op_type, opset)
    if schema is not None:
        literal = {p[1] for p in schema[1] + schema[2] if p[1].startswith("tensor(")}
        bound = [(p, t, name) for p, t, name in _bind(schema[1], list(node.input)) if t not in literal]
        if not bound:
            bound = [(p, t, name) for p, t, name in _bind(schema[2], list(node.output)) if t not in literal]
        for _, type_str, tensor in bound:
            dtype = types.get(tensor)
            name = TYPE_NAMES.get(dtype, str(dtype)) if dtype else None
            if name is not None and row["types"] and name not in row["types"]:
                yield f"{type_str} = {name} ('{tensor}'); the parser takes {', '.join(row['types'])}"
    index = AXES_INPUT.get(node.op_type)
    if index is not None and len(node.input) > index and node.input[index] and node.input[index] not in constants:
        yield f"`axes` ('{node.input[index]}') is computed, not an initializer"
    if node.op_type in CONSTANT_INPUT:
        index, text = CONSTANT_INPUT[node.op_type]
        if len(node.input) > index and node.input[index] not in constants:
            yield f"{text} ('{node.input[index]}' is computed)"
    if node.op_type == "EyeLike" and not _static(graph, node.input[0]):
        yield f"`input` must have static dimensions ('{node.input[0]}' is dynamic)"
    if node.op_type == "TopK" and any(a.name == "sorted" and a.i == 0 for a in node.attribute):
        yield "`sorted` must be 1"
    if node.op_type == "LayerNormalization" and any(o for o in node.output[1:]):
        yield "only the first output `Y` is supported"
    if node.op_type == "Loop":
        body = next(a.g for a in node.attribute if a.name == "body")
        if len(body.output) - 1 > len(node.input) - 2:
            yield "scan outputs (their length is the trip count, dynamic)"


def check_model(model: onnx.ModelProto | str | Path, infer: bool = True) -> tuple[list[Unsupported], int]:
    """Every node of `model` TensorRT's ONNX parser does not support, plus a model-level entry when the
    opset is outside the parser's range. A file is read without its external data."""
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model), load_external_data=False)
    if infer:
        try:
            model = onnx.shape_inference.infer_shapes(model, strict_mode=False)
        except Exception:  # noqa: BLE001 -- unknown dtypes are simply not judged
            pass
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)
    flagged, checked = check_graph(model.graph, opset)
    data = table()
    if not data["opset_min"] <= opset <= data["opset_max"]:
        flagged.insert(0, Unsupported("<model>", "ai.onnx", f"opset {opset} outside the parser's "
                                      f"{data['opset_min']}..{data['opset_max']}"))
    return flagged, checked


def main(argv=None) -> int:
    return report(sys.argv[1:] if argv is None else argv, check_model,
                  f"that TensorRT {table()['tensorrt_version']}'s ONNX parser does not support")


if __name__ == "__main__":
    sys.exit(main())
