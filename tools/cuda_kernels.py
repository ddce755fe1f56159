"""Which nodes of an ONNX graph have no CUDA kernel in onnxruntime (and would run on the CPU).

The table is tools/data/cuda_kernels.json: the CUDAExecutionProvider rows of onnxruntime's published
operator-kernel table (docs/OperatorKernels.md; the file names the commit) for the ops this project's
graphs use. A node is covered when a row of its op and domain spans the node's opset version (the
version of the op's schema under the model's opset import) and every type constraint the row lists
admits the dtypes of the node's inputs and outputs bound to it (by the op's schema). Subgraphs (If
branches) are walked too.

    python -m tools.cuda_kernels model.onnx [...]     # prints every node that would fall back, exit 1 if any
"""
from __future__ import annotations

import functools
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import onnx
from onnx import TensorProto

TABLE = Path(__file__).resolve().parent / "data" / "cuda_kernels.json"
# With convert --inputs optional (and in models converted before plain inputs became the default),
# lrp_target / lrp_position are optional(tensor(int64)) inputs resolved by If(OptionalHasElement(x),
# OptionalGetElement(x), default) (lrp_onnx/lrp/seed.py); onnxruntime has CPU kernels only for the two
# Optional ops. They read a host-side int64 [batch] input once per run: the one expected CPU placement.
# The default form (plain int64 inputs) has no Optional op.
EXPECTED_ON_CPU = {"ai.onnx::OptionalHasElement", "ai.onnx::OptionalGetElement"}
TYPE_NAMES = {v: k.lower() for k, v in TensorProto.DataType.items()}
TYPE_NAMES[TensorProto.FLOAT] = "float"
TYPE_NAMES[TensorProto.DOUBLE] = "double"
TYPE_NAMES[TensorProto.FLOAT16] = "float16"
TYPE_NAMES[TensorProto.BFLOAT16] = "bfloat16"


@functools.lru_cache(maxsize=1)
def table() -> dict:
    return json.loads(TABLE.read_text())


@dataclass
class Fallback:
    node: str          # node name
    op: str            # domain::op_type
    version: int | None
    reason: str

    def __str__(self):
        return f"{self.node} ({self.op}, opset {self.version}): {self.reason}"


@functools.lru_cache(maxsize=None)
def _ort_schemas() -> dict:
    """(domain, op) -> [OpSchema] of onnxruntime's contrib ops (com.microsoft ...)."""
    from onnxruntime.capi import _pybind_state as C

    out: dict = {}
    for s in C.get_all_operator_schema():
        out.setdefault((s.domain, s.name), []).append(s)
    return out


def _schema(domain: str, op: str, opset: int):
    """(since_version, [(param name, type_str, variadic)] inputs, same for outputs) or None."""
    if domain in ("", "ai.onnx"):
        try:
            s = onnx.defs.get_schema(op, opset, "")
        except onnx.defs.SchemaError:
            return None
        def params(ps):
            return [(p.name, p.type_str, p.option == onnx.defs.OpSchema.FormalParameterOption.Variadic) for p in ps]
        return s.since_version, params(s.inputs), params(s.outputs)
    candidates = [s for s in _ort_schemas().get((domain, op), []) if s.since_version <= opset]
    if not candidates:
        return None
    s = max(candidates, key=lambda s: s.since_version)

    def params(ps):
        return [(p.name, p.typeStr, str(p.option).endswith("Variadic")) for p in ps]
    return s.since_version, params(s.inputs), params(s.outputs)


def _bind(params, names):
    """[(param name, type_str, tensor name)] for the tensors actually given ('' = absent optional)."""
    out = []
    for i, name in enumerate(names):
        if not name:
            continue
        if i < len(params):
            p = params[i]
        elif params and params[-1][2]:
            p = params[-1]
        else:
            continue
        out.append((p[0], p[1], name))
    return out


def _dtypes(graph: onnx.GraphProto, outer: dict) -> dict:
    types = dict(outer)
    for vi in list(graph.input) + list(graph.value_info) + list(graph.output):
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type:
            types[vi.name] = vi.type.tensor_type.elem_type
    for init in graph.initializer:
        types[init.name] = init.data_type
    for node in graph.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            for a in node.attribute:
                if a.name == "value" and a.type == onnx.AttributeProto.TENSOR:
                    types[node.output[0]] = a.t.data_type
    return types


def check_graph(graph: onnx.GraphProto, opsets: dict, outer: dict | None = None) -> tuple[list[Fallback], int]:
    """(fallbacks, number of nodes checked) for every node of `graph` and its subgraphs."""
    data = table()
    kernels, exempt = data["kernels"], data["no_kernel_needed"]
    types = _dtypes(graph, outer or {})
    fallbacks, checked = [], 0
    for node in graph.node:
        domain = node.domain or "ai.onnx"
        label = node.name or f"<{node.op_type} -> {node.output[0] if node.output else ''}>"
        op = f"{domain}::{node.op_type}"
        for attr in node.attribute:
            for sub in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)):
                sub_fallbacks, sub_checked = check_graph(sub, opsets, types)
                fallbacks += sub_fallbacks
                checked += sub_checked
        checked += 1
        if node.op_type in exempt.get(domain, ()):
            continue
        opset = opsets.get(domain if domain != "ai.onnx" else "", opsets.get(domain))
        schema = _schema(node.domain, node.op_type, opset or 1)
        version = schema[0] if schema else None
        rows = kernels.get(domain, {}).get(node.op_type)
        if rows is None:
            fallbacks.append(Fallback(label, op, version, "no CUDA kernel for this op in the table"))
            continue
        if schema is None:
            fallbacks.append(Fallback(label, op, version, f"no schema for opset {opset}"))
            continue
        row = next((r for r in rows if r["since"] <= version and (r["until"] is None or version <= r["until"])), None)
        if row is None:
            fallbacks.append(Fallback(label, op, version, "no CUDA kernel for this opset version"))
            continue
        bound = _bind(schema[1], list(node.input)) + _bind(schema[2], list(node.output))
        for constraint, allowed in row["types"].items():
            for pname, type_str, tensor in bound:
                if type_str != constraint and pname != constraint:
                    continue
                dtype = types.get(tensor)
                if dtype is None:
                    fallbacks.append(Fallback(label, op, version, f"dtype of '{tensor}' unknown (run shape inference)"))
                    continue
                name = TYPE_NAMES.get(dtype, str(dtype))
                if name not in allowed:
                    fallbacks.append(Fallback(label, op, version,
                                              f"{constraint} = {name} ('{tensor}'); CUDA has {', '.join(allowed)}"))
    return fallbacks, checked


def check_model(model: onnx.ModelProto | str | Path, infer: bool = True) -> tuple[list[Fallback], int]:
    """Every node of `model` without a CUDA kernel. Dtypes come from the graph's value_info (after
    onnx shape inference when `infer`); a file is read without its external data."""
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model), load_external_data=False)
    if infer:
        try:  # initializers loaded without their external data still carry dtype and dims
            model = onnx.shape_inference.infer_shapes(model, strict_mode=False)
        except Exception:  # noqa: BLE001 -- keep the value_info the graph carries; unknown dtypes are reported
            pass
    opsets = {(o.domain or ""): o.version for o in model.opset_import}
    opsets.setdefault("ai.onnx", opsets.get(""))
    return check_graph(model.graph, opsets)


def report(paths: list[str], check, what: str) -> int:
    """Print, per model, how many nodes `check(path) -> (flagged, checked)` flagged and which; exit code 1
    if any was. Shared by this checker and tools/tensorrt_ops.py."""
    bad = 0
    for path in paths:
        flagged, checked = check(path)
        print(f"{path}: {checked} nodes, {len(flagged)} {what}")
        for f in flagged:
            print(f"  {f}")
        bad += len(flagged)
    return 1 if bad else 0


def _unexpected_fallbacks(path):
    fallbacks, checked = check_model(path)
    return [f for f in fallbacks if f.op not in EXPECTED_ON_CPU], checked


def main(argv=None) -> int:
    return report(sys.argv[1:] if argv is None else argv, _unexpected_fallbacks,
                  "without a CUDA kernel (besides the lrp_target/lrp_position Optional ops)")


if __name__ == "__main__":
    sys.exit(main())
