"""Control flow: `If` nodes (and the refusal of `Loop`/`Scan`).

Exporters emit `If` mostly for shape questions (torch's `squeeze(dim)` with a dynamic size becomes
`If(Equal(Gather(Shape(x), dim), 1))`), and their branches read tensors of the enclosing graph
(outer-scope references). Two mechanisms:

* `inline_constant_ifs`: an If whose condition is known at conversion time (constant-folded from
  initializers and Constant nodes, or from static dims that shape inference knows, through
  Shape/Gather/Equal/... chains) is replaced by the nodes of the branch taken; the branch's
  internal tensors are renamed, the If's output names are kept.
* otherwise the If is a unit whose inputs are its condition and its branches' outer-scope
  references (`graph.outer_references`), and whose backward is an If on the same condition with the
  backward of each branch (pipeline.py emits them over a `branch_model` of each branch).

Nothing here reads weight data: folding uses small inline constants and shapes only.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..ir.graph import GraphView, _local_names, has_subgraph, subgraphs

SUBGRAPH_OPS = ("If", "Loop", "Scan")
MAX_FOLDED_ELEMENTS = 4096  # a folded value bigger than this is not a shape question


# -- renaming (the scope helpers subgraphs/free_names/outer_references are in graph.py) -------------
def _rename_inputs(nodes, mapping: dict) -> None:
    """Rename in place the inputs of `nodes` that `mapping` names, and the references inside their
    subgraphs (respecting names a nested graph defines itself)."""
    for n in nodes:
        for k, t in enumerate(n.input):
            if t in mapping:
                n.input[k] = mapping[t]
        for _, g in subgraphs(n):
            _rename_graph(g, mapping)


def _rename_graph(graph: onnx.GraphProto, mapping: dict) -> None:
    """Rename references (inputs, outputs) in place, respecting names a nested graph defines itself."""
    local = _local_names(graph)
    mapping = {k: v for k, v in mapping.items() if k not in local}
    if not mapping:
        return
    _rename_inputs(graph.node, mapping)
    for o in graph.output:
        if o.name in mapping:
            o.name = mapping[o.name]


def all_names(model: onnx.ModelProto) -> set[str]:
    names = set()

    def walk(graph):
        names.update(_local_names(graph))
        for n in graph.node:
            names.update(t for t in n.input if t)
            for _, g in subgraphs(n):
                walk(g)
    walk(model.graph)
    return names


def renamed_branch(branch: onnx.GraphProto, prefix: str, used: set[str]) -> tuple[onnx.GraphProto, dict]:
    """A copy of `branch` whose own tensors (node outputs, initializers) have fresh names `prefix/...`
    not in `used` (which is updated); references inside nested graphs follow. Returns (copy, mapping)."""
    copy = onnx.GraphProto()
    copy.CopyFrom(branch)
    mapping = {}
    own = [o for n in copy.node for o in n.output if o] + [t.name for t in copy.initializer]
    for name in own:
        if name in mapping:
            continue
        new, k = f"{prefix}/{name}", 0
        while new in used:
            k += 1
            new = f"{prefix}/{name}_{k}"
        used.add(new)
        mapping[name] = new
    _rename_inputs(copy.node, mapping)
    for n in copy.node:
        for k, o in enumerate(n.output):
            if o in mapping:
                n.output[k] = mapping[o]
    for t in copy.initializer:
        t.name = mapping[t.name]
    for vi in copy.value_info:
        vi.name = mapping.get(vi.name, vi.name)
    for o in copy.output:
        o.name = mapping.get(o.name, o.name)
    return copy, mapping


# -- constant folding of conditions -----------------------------------------------------------------
def _attr_int(node, name, default):
    for a in node.attribute:
        if a.name == name:
            return a.i
    return default


class _Folder:
    """Values computable at conversion time: small inline constants, static dims, and every default-domain
    op applied to such values (run with onnx's reference implementation)."""

    def __init__(self, view: GraphView):
        self.view = view
        self.memo: dict = {}

    def partial_shape(self, t: str):
        """A 1-D int64 tensor as a list of int|None (a Shape whose dims are partly static), or None."""
        v = self.value(t)
        if v is not None:
            return [int(x) for x in np.asarray(v).reshape(-1)] if v.ndim == 1 and v.dtype.kind == "i" else None
        p = self.view.producer.get(t)
        if p is None:
            return None
        n = self.view.nodes[p]
        if n.op_type == "Shape" and n.domain in ("", "ai.onnx"):
            s = self.view.shape(n.input[0])
            if s is None:
                return None
            r = len(s)
            start, end = _attr_int(n, "start", 0), _attr_int(n, "end", r)
            start, end = (start + r if start < 0 else start), (end + r if end < 0 else end)
            return [d if isinstance(d, int) else None for d in s[max(0, start):min(r, end)]]
        return None

    def value(self, t: str, depth: int = 0):
        if not t:
            return None
        if t in self.memo:
            return self.memo[t]
        self.memo[t] = None  # cycles and failures: unknown
        v = self.view.value(t)
        if v is None and depth < 200:
            v = self._compute(t, depth)
        if v is not None and np.asarray(v).size > MAX_FOLDED_ELEMENTS:
            v = None
        self.memo[t] = v
        return v

    def _compute(self, t: str, depth: int):
        view = self.view
        p = view.producer.get(t)
        if p is None:
            return None
        n = view.nodes[p]
        if n.domain not in ("", "ai.onnx") or has_subgraph(n) or n.op_type.startswith("Random"):
            return None
        if n.op_type == "Shape":
            dims = self.partial_shape(t)
            return np.array(dims, dtype=np.int64) if dims is not None and None not in dims else None
        if n.op_type == "Size":
            s = view.shape(n.input[0])
            return np.array(int(np.prod(s)), dtype=np.int64) \
                if s is not None and all(isinstance(d, int) for d in s) else None
        if n.op_type == "Gather" and len(n.input) == 2:  # a static dim picked from a partly static shape
            dims, idx = self.partial_shape(n.input[0]), self.value(n.input[1], depth + 1)
            if dims is not None and idx is not None and _attr_int(n, "axis", 0) == 0:
                picked = [dims[int(i)] for i in np.asarray(idx).reshape(-1)] \
                    if all(-len(dims) <= int(i) < len(dims) for i in np.asarray(idx).reshape(-1)) else [None]
                if None not in picked:
                    return np.array(picked, dtype=np.int64).reshape(np.asarray(idx).shape)
                return None
        inputs = [self.value(i, depth + 1) if i else None for i in n.input]
        if any(i and v is None for i, v in zip(n.input, inputs)):
            return None
        return _run_node(n, inputs, t, self.opset)

    @property
    def opset(self) -> int:
        return next((o.version for o in self.view.model.opset_import if o.domain in ("", "ai.onnx")), 17)


def _run_node(node: onnx.NodeProto, inputs: list, wanted: str, opset: int):
    from onnx.reference import ReferenceEvaluator

    try:
        names = [f"in{k}" if t else "" for k, t in enumerate(node.input)]
        outs = [f"out{k}" if o else "" for k, o in enumerate(node.output)]
        single = helper.make_node(node.op_type, names, outs, domain=node.domain)
        single.attribute.extend(node.attribute)
        graph = helper.make_graph(
            [single], "fold",
            [helper.make_tensor_value_info(nm, helper.np_dtype_to_tensor_dtype(np.asarray(v).dtype), None)
             for nm, v in zip(names, inputs) if nm],
            [helper.make_tensor_value_info(o, TensorProto.UNDEFINED, None) for o in outs if o])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
        results = ReferenceEvaluator(model).run(None, {nm: np.asarray(v) for nm, v in zip(names, inputs) if nm})
        k = [o for o in node.output if o].index(wanted)
        return np.asarray(results[k])
    except Exception:
        return None


def _condition(view: GraphView, folder: _Folder, node) -> bool | None:
    v = folder.value(node.input[0])
    if v is None or np.asarray(v).size != 1:
        return None
    return bool(np.asarray(v).reshape(()))


# -- inlining ---------------------------------------------------------------------------------------
def _inline(model: onnx.ModelProto, k: int, taken: bool, used: set[str]) -> None:
    graph = model.graph
    node = graph.node[k]
    branch = next(g for name, g in subgraphs(node) if name == ("then_branch" if taken else "else_branch"))
    tag = (node.output[0] if node.output and node.output[0] else node.name or "if")
    copy, mapping = renamed_branch(branch, f"{tag}/{'then' if taken else 'else'}", used)
    nodes = list(copy.node)
    produced = {o: n for n in nodes for o in n.output if o}
    extra, claimed = [], set()
    for out, target in zip(copy.output, node.output):
        if not target:
            continue
        name = out.name
        source = produced.get(name)
        if source is not None and name not in claimed:
            claimed.add(name)
            for j, o in enumerate(source.output):
                if o == name:
                    source.output[j] = target
            _rename_inputs(nodes, {name: target})  # later readers of the renamed tensor read the If's output name
            for o2 in copy.output:
                if o2.name == name and o2 is not out:
                    o2.name = target
        else:
            extra.append(helper.make_node("Identity", [name], [target], name=f"{tag}/inlined_output"))
    graph.initializer.extend(copy.initializer)
    del graph.node[k]
    for j, n in enumerate(nodes + extra):
        graph.node.insert(k + j, n)


def inline_constant_ifs(model: onnx.ModelProto, infer) -> onnx.ModelProto | None:
    """Inline, in place, every main-graph If whose condition is known at conversion time (repeatedly:
    a taken branch may hold another). Returns the shape-inferred model (`infer(model)`) of the result."""
    inferred = infer(model)
    for _ in range(100):
        if not any(n.op_type == "If" for n in model.graph.node):
            return inferred
        view = GraphView.build(model, inferred)
        folder = _Folder(view)
        decided = [(k, _condition(view, folder, n)) for k, n in enumerate(model.graph.node)
                   if n.op_type == "If" and n.domain in ("", "ai.onnx")]
        decided = [(k, c) for k, c in decided if c is not None]
        if not decided:
            return inferred
        used = all_names(model)
        for k, taken in reversed(decided):
            _inline(model, k, taken, used)
        inferred = infer(model)
    return inferred


# -- branches as models (for the backward of a non-constant If) -------------------------------------
def branch_model(view: GraphView, branch: onnx.GraphProto, outer: list[str]) -> onnx.ModelProto:
    """A standalone model of a branch for analysis and shape inference: the outer-scope tensors it reads
    become inputs, small constants (initializers with their value), or weight stubs (initializers marked
    external, never read); its outputs are the branch's outputs."""
    graph = helper.make_graph(list(branch.node), branch.name or "branch", [], list(branch.output),
                              list(branch.initializer))
    graph.value_info.extend(branch.value_info)
    for t in outer:
        value, dtype, shape = view.value(t), view.dtype(t), view.shape(t)
        if value is not None:
            graph.initializer.append(numpy_helper.from_array(np.asarray(value), t))
        elif view.is_constant(t) and shape is not None and all(isinstance(d, int) for d in shape) and dtype:
            stub = helper.make_tensor(t, dtype, shape, vals=[], raw=False)
            stub.data_location = TensorProto.EXTERNAL
            stub.external_data.add(key="location", value="lrp-onnx-not-loaded")
            graph.initializer.append(stub)
        else:
            graph.input.append(helper.make_tensor_value_info(t, dtype or TensorProto.UNDEFINED, shape))
    model = helper.make_model(graph, opset_imports=list(view.model.opset_import),
                              ir_version=view.model.ir_version)
    return model
