"""A read-only view of an ONNX graph: producers, consumers, constants, dtypes and shapes.

The view never loads external weight data: initializers are known by name, dtype and dims only,
and small constants (shape vectors, exponents, scales) are read when they are stored inline.
Also the scope helpers of nodes with subgraphs (If/Loop/Scan): their graphs and the outer-scope names they read.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import AttributeProto, TensorProto, numpy_helper

FLOAT_TYPES = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE}

Dim = "int | str | None"  # static size, symbolic name, or unknown


@dataclass
class TensorInfo:
    dtype: int | None = None
    shape: list | None = None  # list of int | str | None; None = rank unknown

    @property
    def rank(self) -> int | None:
        return None if self.shape is None else len(self.shape)


def _type_to_info(type_proto: onnx.TypeProto) -> TensorInfo:
    if not type_proto.HasField("tensor_type"):
        return TensorInfo()
    tt = type_proto.tensor_type
    dtype = tt.elem_type or None
    if not tt.HasField("shape"):
        return TensorInfo(dtype, None)
    dims = []
    for d in tt.shape.dim:
        if d.HasField("dim_value"):
            dims.append(int(d.dim_value))
        elif d.HasField("dim_param") and d.dim_param:
            dims.append(d.dim_param)
        else:
            dims.append(None)
    return TensorInfo(dtype, dims)


def node_label(node: onnx.NodeProto) -> str:
    """How errors and reports name a node: its name, op type and domain."""
    domain = node.domain or "ai.onnx"
    return f"'{node.name or '<unnamed>'}' ({domain}::{node.op_type})"


@dataclass
class GraphView:
    model: onnx.ModelProto
    nodes: list = field(default_factory=list)
    producer: dict = field(default_factory=dict)  # tensor -> node index
    consumers: dict = field(default_factory=dict)  # tensor -> [node index]
    initializers: dict = field(default_factory=dict)  # name -> TensorProto (data maybe external)
    constant_values: dict = field(default_factory=dict)  # name -> np.ndarray (small, inline only)
    info: dict = field(default_factory=dict)  # name -> TensorInfo
    graph_inputs: list = field(default_factory=list)
    graph_outputs: list = field(default_factory=list)

    @classmethod
    def build(cls, model: onnx.ModelProto, inferred: onnx.ModelProto | None = None) -> "GraphView":
        g = model.graph
        view = cls(model=model)
        view.nodes = list(g.node)
        for i, n in enumerate(view.nodes):
            for o in n.output:
                if o:
                    view.producer[o] = i
            for t in n.input:
                if t:
                    view.consumers.setdefault(t, []).append(i)
        for init in g.initializer:
            view.initializers[init.name] = init
            view.info[init.name] = TensorInfo(init.data_type, [int(d) for d in init.dims])
            if not _is_external(init) and np.prod(init.dims, dtype=np.int64) <= 64:
                view.constant_values[init.name] = numpy_helper.to_array(init)
        for n in view.nodes:
            if n.op_type == "Constant" and n.domain in ("", "ai.onnx"):
                value = _constant_node_value(n)
                if value is not None:
                    view.constant_values[n.output[0]] = value
                    view.info[n.output[0]] = TensorInfo(
                        onnx.helper.np_dtype_to_tensor_dtype(value.dtype), list(value.shape))
        source = inferred if inferred is not None else model
        for vi in list(source.graph.value_info) + list(source.graph.input) + list(source.graph.output):
            info = _type_to_info(vi.type)
            if vi.name not in view.info or view.info[vi.name].shape is None:
                view.info[vi.name] = info
        init_names = set(view.initializers)
        view.graph_inputs = [i.name for i in g.input if i.name not in init_names]
        view.graph_outputs = [o.name for o in g.output]
        return view

    # -- questions about tensors ------------------------------------------------------------
    def dtype(self, name: str) -> int | None:
        info = self.info.get(name)
        return info.dtype if info else None

    def shape(self, name: str) -> list | None:
        info = self.info.get(name)
        return info.shape if info else None

    def rank(self, name: str) -> int | None:
        s = self.shape(name)
        return None if s is None else len(s)

    def is_float(self, name: str) -> bool:
        return self.dtype(name) in FLOAT_TYPES

    def may_carry_relevance(self, name: str) -> bool:
        """Float, or of unknown type (an op shape inference does not know): never silently cut the path."""
        return self.dtype(name) in FLOAT_TYPES or self.dtype(name) is None

    def is_constant(self, name: str) -> bool:
        """An initializer, a Constant node output, or anything computed only from those."""
        return name in self._constant_set()

    def _constant_set(self) -> set:
        if not hasattr(self, "_consts"):
            consts = set(self.initializers) | set(self.constant_values)
            for n in self.nodes:  # nodes are topologically sorted
                if n.input and all((not t) or t in consts for t in n.input) and not _has_subgraph(n):
                    consts.update(o for o in n.output if o)
                elif not n.input and n.op_type != "RandomNormal":
                    consts.update(o for o in n.output if o)
            self._consts = consts
        return self._consts

    def value(self, name: str):
        """The value of a small inline constant, or None."""
        return self.constant_values.get(name)

    def scalar(self, name: str):
        v = self.value(name)
        if v is None or v.size != 1:
            return None
        return v.reshape(()).item()


def _is_external(init: TensorProto) -> bool:
    return init.data_location == TensorProto.EXTERNAL


def _has_subgraph(node: onnx.NodeProto) -> bool:
    return any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute)


def _constant_node_value(node: onnx.NodeProto):
    for a in node.attribute:
        if a.name == "value":
            if _is_external(a.t):
                return None
            return numpy_helper.to_array(a.t)
        if a.name == "value_float":
            return np.array(a.f, dtype=np.float32)
        if a.name == "value_floats":
            return np.array(list(a.floats), dtype=np.float32)
        if a.name == "value_int":
            return np.array(a.i, dtype=np.int64)
        if a.name == "value_ints":
            return np.array(list(a.ints), dtype=np.int64)
    return None


def attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def constant_table_lookup(view: GraphView, node: onnx.NodeProto):
    """(table, indices, rows) when `node` looks rows up in a constant table along its axis 0 — a Gather,
    or onnxruntime's GatherBlockQuantized (a 4/8-bit blocked table, dequantized as it is read) — else
    None. `rows` is the table's static row count, or None."""
    if node.op_type == "Gather" and node.domain in ("", "ai.onnx") and len(node.input) == 2:
        axis, sized = attr(node, "axis", 0), [node.input[0]]
    elif node.op_type == "GatherBlockQuantized" and node.domain == "com.microsoft" and len(node.input) >= 3:
        axis = attr(node, "gather_axis", 0)
        # the packed data or, along an axis that is not quantized, the scales have the table's rows
        sized = [node.input[0]] + ([node.input[2]] if attr(node, "quantize_axis", 1) != axis else [])
    else:
        return None
    if axis != 0 or not view.is_constant(node.input[0]):
        return None
    rows = next((s[0] for s in map(view.shape, sized) if s and isinstance(s[0], int) and s[0] > 0), None)
    return node.input[0], node.input[1], rows


# -- scopes ----------------------------------------------------------------------------------------
def subgraphs(node: onnx.NodeProto):
    """(attribute name, GraphProto) of every graph attribute of a node."""
    for a in node.attribute:
        if a.type == AttributeProto.GRAPH:
            yield a.name, a.g
        elif a.type == AttributeProto.GRAPHS:
            for k, g in enumerate(a.graphs):
                yield f"{a.name}[{k}]", g


def has_subgraph(node: onnx.NodeProto) -> bool:
    return any(True for _ in subgraphs(node))


def _local_names(graph: onnx.GraphProto) -> set[str]:
    names = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    names |= {t.values.name for t in graph.sparse_initializer}
    for n in graph.node:
        names.update(o for o in n.output if o)
    return names


def free_names(graph: onnx.GraphProto) -> list[str]:
    """Names a graph reads from its enclosing scopes, in order of first use (nested graphs included)."""
    local = _local_names(graph)
    seen, free = set(), []

    def use(t):
        if t and t not in local and t not in seen:
            seen.add(t)
            free.append(t)

    for n in graph.node:
        for t in n.input:
            use(t)
        for _, g in subgraphs(n):
            for t in free_names(g):
                use(t)
    for o in graph.output:
        use(o.name)
    return free


def outer_references(node: onnx.NodeProto) -> list[str]:
    """The enclosing-scope tensors a node's subgraphs read, not already among its inputs."""
    refs = []
    for _, g in subgraphs(node):
        for t in free_names(g):
            if t not in refs and t not in node.input:
                refs.append(t)
    return refs


def reads(node: onnx.NodeProto):
    """Every tensor a node reads: its inputs, then what its subgraphs read from the enclosing scopes."""
    yield from node.input
    if has_subgraph(node):
        yield from outer_references(node)


def prune_unread(graph: onnx.GraphProto, removable, keep=frozenset()) -> None:
    """Drop, in place and until none is left, the nodes `removable(node)` accepts whose outputs no node
    reads and that are neither graph outputs nor in `keep`."""
    while True:
        read = {t for n in graph.node for t in reads(n)} | {o.name for o in graph.output} | set(keep)
        dead = [k for k, n in enumerate(graph.node) if removable(n) and not any(o in read for o in n.output)]
        if not dead:
            return
        for k in reversed(dead):
            del graph.node[k]
