"""Canonicalizers: graph rewrites that make the explain graph do less work.

`select_position_before_head` (relevance-only mode): an LM computes its head (final norm, last MLP,
the vocabulary projection) for every position, but attribution needs the logits at one position
per row. When the nodes between a hidden state h [batch, seq, hidden] and the explained output act
on each position independently, we gather h at `lrp_position` first and run those nodes on one
position only. The relevance is unchanged: the dropped positions receive zero gradient anyway.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..contract import POSITION_INPUT, SELECTED_OUTPUT, TARGET_INPUT
from ..ir.graph import GraphView, attr, free_names

# ops that act on each sequence position independently when their constant operands broadcast only
# over the last axis (and reductions run over the last axis)
POSITIONWISE = {"MatMul", "Add", "Sub", "Mul", "Div", "Pow", "Sqrt", "Reciprocal", "Cast", "Identity",
                "Sigmoid", "Tanh", "Erf", "Gelu", "Relu", "Neg", "Exp", "ReduceMean", "LayerNormalization",
                "RMSNormalization", "Softplus"}
MAX_CHAIN = 400


def _positionwise(view: GraphView, node) -> bool:
    if node.op_type not in POSITIONWISE or node.domain not in ("", "ai.onnx"):
        return False
    if node.op_type == "ReduceMean":
        axes = attr(node, "axes")
        if axes is None and len(node.input) > 1:
            v = view.value(node.input[1])
            axes = None if v is None else list(np.asarray(v).reshape(-1))
        r = view.rank(node.input[0])
        return axes is not None and r is not None and [a % r for a in axes] == [r - 1] \
            and attr(node, "keepdims", 1) == 1
    if node.op_type in ("LayerNormalization", "RMSNormalization"):
        r = view.rank(node.input[0])
        return r is not None and attr(node, "axis", -1) % r == r - 1
    if node.op_type == "MatMul":
        return view.is_constant(node.input[1]) and view.rank(node.input[1]) == 2 \
            and not view.is_constant(node.input[0])
    for t in node.input:
        if t and view.is_constant(t):
            s = view.shape(t)
            if s is None or (len(s) >= 2 and any(d != 1 for d in s[:-1])):
                return False
    return True


def find_head_chain(view: GraphView, output: str):
    """(h, nodes): the earliest hidden state h from which `output` is computed position-wise by
    `nodes` alone, or None."""
    frontier = {output}
    chain: set[int] = set()
    best = None
    while frontier and len(chain) < MAX_CHAIN:
        if len(frontier) == 1:
            (h,) = frontier
            if h != output and view.rank(h) == 3 and _exclusive(view, chain, output):
                best = (h, sorted(chain))
        t = max(frontier, key=lambda name: view.producer.get(name, -1))
        p = view.producer.get(t)
        if p is None or not _positionwise(view, view.nodes[p]):
            break
        chain.add(p)
        frontier.discard(t)
        frontier |= {i for i in view.nodes[p].input if i and not view.is_constant(i)}
    return best


def _exclusive(view: GraphView, chain: set, output: str) -> bool:
    for i in chain:
        for o in view.nodes[i].output:
            if o and o != output and any(c not in chain for c in view.consumers.get(o, [])):
                return False
    return True


def squeeze_class_output(model: onnx.ModelProto, view: GraphView, output: str) -> str | None:
    """A [batch, classes, 1, ..., 1] output (a CNN classifier's Conv head or global pool, e.g.
    DenseNet's [N, 1000, 1, 1]) explained as [batch, classes]: a Squeeze of the trailing static 1
    axes is added to the graph (in place) and its output is the explained tensor. None for any
    other shape."""
    shape = view.shape(output)
    if shape is None or len(shape) < 4 or any(d != 1 for d in shape[2:]):
        return None
    axes = f"lrp/squeezed/{output}/axes"
    model.graph.initializer.append(numpy_helper.from_array(np.arange(2, len(shape), dtype=np.int64), axes))
    squeezed = f"lrp/squeezed/{output}"
    model.graph.node.append(helper.make_node("Squeeze", [output, axes], [squeezed], name=squeezed))
    return squeezed


def select_position_before_head(model: onnx.ModelProto, view: GraphView, output: str,
                                multi_target: bool = False) -> str | None:
    """Rewrite `model` in place so the head runs at lrp_position only; return the new output name.
    multi_target: lrp_position is int64 [batch, K] (broadcast with lrp_target [batch, K]) and the head
    runs at the K positions: the new output is [batch, K, vocab]."""
    found = find_head_chain(view, output)
    if found is None:
        return None
    h, chain = found
    g = model.graph
    new_nodes, names = [], {}

    def name(t):
        return names.setdefault(t, f"lrp/at_position/{t}")

    def ints(tname, values):
        g.initializer.append(numpy_helper.from_array(np.asarray(values, dtype=np.int64), tname))
        return tname

    def node(op, inputs, out, **attrs):
        new_nodes.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        return out

    p = "lrp/at_position/"
    ints(p + "zero", [0]); ints(p + "one", [1]); ints(p + "two", [2]); ints(p + "three", [3])
    ints(p + "minus_one", [-1]); ints(p + "index_shape", [-1, 1, 1])
    shape = node("Shape", [h], p + "shape")
    batch = node("Slice", [shape, p + "zero", p + "one"], p + "batch")
    length = node("Slice", [shape, p + "one", p + "two"], p + "length")
    hidden = node("Slice", [shape, p + "two", p + "three"], p + "hidden")
    if multi_target:
        columns = [node("Slice", [node("Shape", [t], p + f"{t}_shape"), p + "one", p + "two"], p + f"{t}_columns")
                   for t in (TARGET_INPUT, POSITION_INPUT)]
        extent = node("Concat", [batch, node("Max", columns, p + "targets")], p + "rows_by_targets", axis=0)
        position = node("Expand", [POSITION_INPUT, extent], p + "position")
    else:
        position = node("Expand", [POSITION_INPUT, batch], p + "position")
    negative = node("Less", [position, p + "zero"], p + "negative")
    position = node("Where", [negative, node("Add", [position, length], p + "from_end"), position],
                    p + "position_normalized")
    in_range = node("And", [node("GreaterOrEqual", [position, p + "zero"], p + "not_before"),
                            node("Less", [position, length], p + "not_after")], p + "in_range")
    position = node("Where", [in_range, position, p + "zero"], p + "position_checked")  # seed.py flags the row
    if multi_target:
        index = node("Expand", [node("Unsqueeze", [position, p + "minus_one"], p + "index_column"),
                                node("Concat", [extent, hidden], p + "index_extent", axis=0)], p + "index")
    else:
        index = node("Expand", [node("Reshape", [position, p + "index_shape"], p + "index_column"),
                                node("Concat", [batch, p + "one", hidden], p + "index_extent", axis=0)], p + "index")
    names[h] = node("GatherElements", [h, index], p + "hidden_at_position", axis=1)
    if multi_target and view.shape(h) is not None:  # shape inference does not see through the Max of shapes
        g.value_info.append(helper.make_tensor_value_info(names[h], view.dtype(h) or TensorProto.FLOAT,
                                                          [view.shape(h)[0], "lrp_targets", view.shape(h)[2]]))
    for i in chain:
        n = view.nodes[i]
        clone = onnx.NodeProto()
        clone.CopyFrom(n)
        clone.name = f"{p}{n.name or i}"
        for k, t in enumerate(n.input):
            if t in names:
                clone.input[k] = names[t]
        for k, t in enumerate(n.output):
            if t:
                clone.output[k] = SELECTED_OUTPUT if t == output else name(t)
        new_nodes.append(clone)
    keep = [n for k, n in enumerate(g.node) if k not in set(chain)]
    del g.node[:]
    g.node.extend(keep + new_nodes)
    g.input.append(helper.make_tensor_value_info(POSITION_INPUT, TensorProto.INT64,
                                                 ["lrp_batch", "lrp_targets"] if multi_target else ["lrp_batch"]))
    g.initializer.append(numpy_helper.from_array(np.array([[-1]] if multi_target else [-1], dtype=np.int64),
                                                 POSITION_INPUT))
    out_vi = next(o for o in g.output if o.name == output)
    vi = helper.make_tensor_value_info(SELECTED_OUTPUT, out_vi.type.tensor_type.elem_type, None)
    shape_dims = [d for d in out_vi.type.tensor_type.shape.dim]
    if len(shape_dims) == 3:
        vi = helper.make_tensor_value_info(SELECTED_OUTPUT, out_vi.type.tensor_type.elem_type,
                                           [_dim(shape_dims[0]), "lrp_targets" if multi_target else 1,
                                            _dim(shape_dims[2])])
    g.output.append(vi)
    g.output.remove(out_vi)  # no node computes the full output any more
    return SELECTED_OUTPUT


def _dim(d):
    return d.dim_value if d.HasField("dim_value") else (d.dim_param or None)


def drop_outputs(model: onnx.ModelProto, keep: set[str]) -> None:
    """Remove graph outputs not in `keep`, and every node no kept output needs."""
    g = model.graph
    outputs = [o for o in g.output if o.name in keep]
    del g.output[:]
    g.output.extend(outputs)
    needed = set(keep)
    kept = []
    for n in reversed(list(g.node)):
        if any(o in needed for o in n.output):
            kept.append(n)
            needed.update(i for i in n.input if i)
            for a in n.attribute:
                if a.type == onnx.AttributeProto.GRAPH:
                    needed.update(free_names(a.g))
    del g.node[:]
    g.node.extend(reversed(kept))
    used = needed
    for k in reversed([k for k, t in enumerate(g.initializer) if t.name not in used]):
        del g.initializer[k]  # in place: rebuilding the list would copy every weight
