"""KV-cache exports: explain full sequences, with the cache fed empty inside the graph.

A decoder exported with a KV cache takes the keys and values of earlier tokens as inputs
(`past_key_values.N.key`/`.value` from optimum and onnxruntime-genai, `past_key`/`past_value` of a
fused attention op, `past_N` of older exports) and returns the extended cache (`present.*`). Relevance
has to reach every token of the sequence, and a cache holds only the earlier tokens' keys and values,
not the activations their relevance would flow through: a cached step cannot be explained. So the
converted model explains full sequences: each cache input is bound, inside the graph, to an empty
tensor (its past-length axis 0, its batch taken from the token ids), and is no longer an input.
Running the whole sequence through the no-past computation is what the exporter itself does for the
first step (the prompt), and gives the no-cache export's outputs; `present.*` outputs are kept (the
cache of the whole sequence).

* Cache input: a floating-point graph input whose name has a `past` component (`past_key_values.3.key`,
  `past_key_0`, `past.1`, `layer.0.past_value`) and one past-length axis: the dynamic axis named
  `past...`, else the only dynamic axis that is not the batch. The other axes must be static or the
  batch axis (named like an axis of the token-id input). Anything else is refused, naming the input.
* A boolean input that chooses between `If` branches in a graph with a cache (optimum's merged
  decoder, `use_cache_branch`) is bound to false, the branch without a cache; the If is then inlined.
* Consumers in the main graph are simplified: a Concat along the past axis drops the empty operand,
  and a fused attention op (GroupQueryAttention, MultiHeadAttention, Attention) gets its past slots
  emptied, which is how each op spells "no past". Everything else (Shape(past) for the past length,
  branches of an If) reads the in-graph empty tensor.

Nothing here reads weight data."""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import onnx
from onnx import TensorProto, helper

from ..errors import LRPError
from ..ir.graph import free_names, has_subgraph, node_label, outer_references, prune_unread, reads

_PAST_NAME = re.compile(r"(^|[._/:-])past([._/:-]|_?key|_?value|\d|$)", re.IGNORECASE)
_FLOAT_TYPES = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE)
# fused attention ops: the input slots that hold a past (an absent slot means "no past")
_PAST_SLOTS = {("com.microsoft", "GroupQueryAttention"): (3, 4),
               ("com.microsoft", "MultiHeadAttention"): (6, 7),
               ("com.microsoft", "Attention"): (4,),
               ("", "Attention"): (4, 5)}
SCOPE = "lrp/cache/"


def is_cache_name(name: str) -> bool:
    return bool(_PAST_NAME.search(name))


def _dims(value_info):
    t = value_info.type.tensor_type
    if not t.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in t.shape.dim]


def _past_axis(name: str, dims: list, token_dims: set) -> int:
    """The past-length axis: the dynamic axis named 'past...', else the later of two dynamic axes (the
    first being the batch), else the only one that is not an axis of the token ids (a static past, a
    fixed-size buffer, has none: refused)."""
    dynamic = [k for k, d in enumerate(dims) if not isinstance(d, int)]
    named = [k for k in dynamic if isinstance(dims[k], str) and "past" in dims[k].lower()]
    if len(named) == 1:
        return named[0]
    own = [k for k in dynamic if dims[k] is None or dims[k] not in token_dims]
    if len(own) == 1:
        return own[0]
    if len(dynamic) == 2 and dims[dynamic[0]] != dims[dynamic[1]] and dynamic[1] in own:
        # [batch, heads, past, head_dim] and [2, batch, heads, past, head_dim]: the later dynamic axis
        return dynamic[1]
    raise LRPError(f"cache input '{name}' (shape {dims}): cannot tell its past-length axis "
                   f"(one dynamic axis named 'past...' is expected)")


@dataclass
class Binding:
    bound: dict = field(default_factory=dict)    # input name -> what it was bound to (for metadata, inspect)
    axes: dict = field(default_factory=dict)     # empty cache tensor -> (past axis, rank)
    unknown: dict = field(default_factory=dict)  # empty cache tensor -> its axes of unknown size (set to 1)


def bind_cache_inputs(model: onnx.ModelProto) -> Binding:
    """Bind, in place, the KV-cache inputs of `model` (the private copy) to empty tensors and a
    cache-choosing boolean input to false. `.bound` is empty when the graph has no cache."""
    g = model.graph
    inputs = {i.name: i for i in g.input}
    initializers = {t.name for t in g.initializer}
    cache = [i for i in g.input if i.name not in initializers and is_cache_name(i.name)
             and i.type.tensor_type.elem_type in _FLOAT_TYPES]
    binding = Binding()
    if not cache:
        return binding
    readers = _readers(g)
    ids = _token_input(g, initializers, {i.name for i in cache})
    token_dims = {d for d in (_dims(ids) or []) if isinstance(d, str)} if ids is not None else set()
    caches, others = [], []
    for inp in cache:  # a cache is extended along its past axis; a time series' past_values is read as data
        dims = _dims(inp)
        try:
            axis = _past_axis(inp.name, dims, token_dims) if dims is not None else None
        except LRPError:
            axis = None
        if axis is None:
            reader = f"has no past-length axis that can be told (shape {dims})"
        else:
            found = _data_reader(readers, inp.name, axis, len(dims))
            reader = None if found is None else f"read as data by {node_label(found)}"
        (caches if reader is None else others).append((inp, dims, axis, reader))
    if not caches:
        return binding
    if others:
        inp, _, _, reader = others[0]
        raise LRPError(f"cache input '{inp.name}': {reader}, while the graph's other cache inputs "
                       f"({caches[0][0].name}, ...) are extended along their past axis; an empty cache would "
                       f"change what it computes (a cross-attention cache of a decoder with past): export the "
                       f"model without a cache")
    bound = binding.bound
    new_nodes = []
    for inp, dims, axis, _ in caches:
        pieces, unknown = [], []
        for k, d in enumerate(dims):
            if k == axis:
                pieces.append(("const", 0))
            elif isinstance(d, int):
                pieces.append(("const", d))
            else:
                where = _axis_of(ids, d)
                if where is None:  # only an error if something still reads the empty tensor (settle_cache)
                    unknown.append(f"axis {k} ('{d or 'unnamed'}')")
                    pieces.append(("const", 1))
                else:
                    pieces.append(("axis", where))
        new_nodes += _empty_tensor(inp.name, inp.type.tensor_type.elem_type, pieces)
        bound[inp.name] = f"empty (axis {axis} of length 0)"
        binding.axes[inp.name] = (axis, len(dims))
        binding.unknown[inp.name] = unknown
    cache_names = set(binding.axes)
    for name in [n for n in inputs if n not in initializers and n not in bound]:
        value = _cache_choice(g, inputs[name], cache_names)
        if value is not None:
            rank = len(_dims(inputs[name]) or [])
            g.initializer.append(helper.make_tensor(name, TensorProto.BOOL, [1] * rank, [value]))
            bound[name] = f"{str(value).lower()} (the branch without a cache)"
    kept = [i for i in g.input if i.name not in bound]
    del g.input[:]
    g.input.extend(kept)
    nodes = new_nodes + list(g.node)
    del g.node[:]
    g.node.extend(nodes)
    for name, axes in binding.axes.items():
        _simplify(g, name, *axes)
    return binding


def settle_cache(model: onnx.ModelProto, binding: Binding, keep: frozenset = frozenset()) -> None:
    """After unfusing and inlining: simplify the readers of each empty cache again (an inlined branch
    may read it), drop the binding nodes nothing reads, and refuse a cache that something reads as data:
    an empty tensor is the same as no cache only where it is concatenated along its past axis, given
    to a fused attention op as its past, or asked for its shape. A cross-attention cache (the encoder's
    keys of a seq2seq decoder with past) is read directly and is refused here, naming the reader.
    Tensors in `keep` are not dropped (the inputs of fused nodes the forward gets back, unfuse.refuse)."""
    g = model.graph
    cache = list(binding.axes)
    for name in cache:
        _simplify(g, name, *binding.axes[name])
    _prune(g, keep)
    readers = _readers(g)
    for name in cache:
        for node in _data_readers(readers, name):
            raise LRPError(f"cache input '{name}': read as data by {node_label(node)}, not only "
                           f"extended along its past axis; an empty cache would change what it computes, so it "
                           f"cannot be bound (a cross-attention cache of a decoder with past, or a fixed-size cache "
                           f"buffer): export the model without a cache")
        if readers.get(name) and binding.unknown[name]:
            node = readers[name][0]
            raise LRPError(f"cache input '{name}': {binding.unknown[name][0]} is neither static, its past length, nor an "
                           f"axis of the token ids, and {node_label(node)} reads its shape; "
                           f"cannot bind it to an empty cache")


_LAYOUT_OPS = ("Transpose", "Cast", "Identity")


def _readers(g):
    readers = {}
    for node in g.node:
        for t in reads(node):
            readers.setdefault(t, []).append(node)
    return readers


def _data_reader(readers, name, axis, rank):
    """The first main-graph node that reads `name` (through Transpose/Cast/Identity) other than as a
    cache: a Concat along the past axis, a fused attention op's past slot, Shape, or a node with
    subgraphs (a merged decoder's If: decided after it is inlined). None when every reader is one."""
    for node in readers.get(name, []):
        domain = "" if node.domain == "ai.onnx" else node.domain
        if domain == "" and node.op_type == "Shape" or has_subgraph(node) and name in outer_references(node):
            continue
        if domain == "" and node.op_type == "Concat":
            if next((a.i for a in node.attribute if a.name == "axis"), 0) % rank == axis:
                continue
            return node
        if domain == "" and node.op_type in _LAYOUT_OPS:
            next_axis = axis
            if node.op_type == "Transpose":
                perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), list(range(rank))[::-1])
                next_axis = perm.index(axis)
            found = _data_reader(readers, node.output[0], next_axis, rank)
            if found is not None:
                return found
            continue
        slots = _PAST_SLOTS.get((domain, node.op_type), ())
        if any(k < len(node.input) and node.input[k] == name for k in slots) and \
                all(t != name for k, t in enumerate(node.input) if k not in slots):
            continue
        return node
    return None


def _data_readers(readers, name):
    for node in readers.get(name, []):
        if node.op_type == "Shape" and node.domain in ("", "ai.onnx"):
            continue
        if node.op_type in _LAYOUT_OPS and node.domain in ("", "ai.onnx"):
            yield from _data_readers(readers, node.output[0])
            continue
        yield node


def _token_input(g, initializers, cache_names):
    """The integer input whose axes name the batch (token ids; else any integer input)."""
    ints = [i for i in g.input if i.name not in initializers and i.name not in cache_names
            and i.type.tensor_type.elem_type in (TensorProto.INT64, TensorProto.INT32)]
    for i in ints:
        if i.name == "input_ids":
            return i
    return ints[0] if ints else None


def _axis_of(ids, dim):
    if ids is None or not isinstance(dim, str):
        return None
    for k, d in enumerate(_dims(ids) or []):
        if d == dim:
            return ids.name, k
    return None


def _empty_tensor(name, elem_type, pieces):
    """Nodes computing a zero-size tensor `name` of the given axes (constants, or an axis of an input)."""
    nodes, parts = [], []
    for k, (kind, value) in enumerate(pieces):
        out = f"{SCOPE}{name}/dim{k}"
        if kind == "const":
            nodes.append(helper.make_node("Constant", [], [out], name=out,
                                          value=helper.make_tensor(out, TensorProto.INT64, [1], [value])))
        else:
            source, axis = value
            nodes.append(helper.make_node("Shape", [source], [out + "/shape"], name=out + "/shape"))
            nodes.append(helper.make_node("Constant", [], [out + "/axis"], name=out + "/axis",
                                          value=helper.make_tensor(out, TensorProto.INT64, [1], [axis])))
            nodes.append(helper.make_node("Gather", [out + "/shape", out + "/axis"], [out], name=out, axis=0))
        parts.append(out)
    shape = f"{SCOPE}{name}/shape"
    nodes.append(helper.make_node("Concat", parts, [shape], name=shape, axis=0))
    nodes.append(helper.make_node("ConstantOfShape", [shape], [name], name=f"{SCOPE}{name}",
                                  value=helper.make_tensor("value", elem_type, [1], [0])))
    return nodes


def _simplify(g, name, axis, rank):
    """Readers of the empty tensor `name` (past axis `axis`) in the main graph, through Transpose/Cast/
    Identity: a Concat along the past axis drops the operand (one operand left: an Identity), a fused
    attention op's past slot is emptied."""
    for node in [n for n in g.node if name in n.input]:
        domain = "" if node.domain == "ai.onnx" else node.domain
        if domain == "" and node.op_type == "Concat":
            concat_axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
            if concat_axis % rank == axis:
                kept = [t for t in node.input if t != name]
                if kept:
                    del node.input[:]
                    node.input.extend(kept)
                    if len(kept) == 1:
                        node.op_type = "Identity"
                        del node.attribute[:]
        elif domain == "" and node.op_type == "Transpose":
            perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), list(range(rank))[::-1])
            _simplify(g, node.output[0], perm.index(axis), rank)
        elif domain == "" and node.op_type in ("Cast", "Identity"):
            _simplify(g, node.output[0], axis, rank)
        elif (domain, node.op_type) in _PAST_SLOTS:
            for k in _PAST_SLOTS[(domain, node.op_type)]:
                if k < len(node.input) and node.input[k] == name:
                    node.input[k] = ""
            while node.input and node.input[-1] == "":
                node.input.pop()


def _prune(g, keep=frozenset()):
    """Drop nodes whose outputs nothing reads (nor `keep` names), among the binding nodes and the layout
    ops left reading an empty cache."""
    prune_unread(g, lambda n: n.name.startswith(SCOPE) or n.op_type in _LAYOUT_OPS + ("Shape", "Gather", "Constant"),
                 keep)


def _cache_choice(g, inp, cache_names: set):
    """For a boolean input read only as the condition of If nodes (a merged decoder's use_cache_branch):
    the value that picks, in every one of them, the branch that reads no cache input while the other
    branch does. None for any other input (it stays an input, and its If a dynamic one)."""
    if inp.type.tensor_type.elem_type != TensorProto.BOOL:
        return None
    readers = [n for n in g.node if inp.name in n.input]
    if not readers or any(n.op_type != "If" or list(n.input) != [inp.name] for n in readers):
        return None
    choice = None
    for n in readers:
        branches = {a.name: a.g for a in n.attribute if a.name in ("then_branch", "else_branch")}
        reads = {k: bool(set(free_names(b)) & cache_names) for k, b in branches.items()}
        if len(reads) != 2 or reads["then_branch"] == reads["else_branch"]:
            return None
        value = not reads["then_branch"]  # true picks then_branch
        if choice is not None and value != choice:
            return None
        choice = value
    return choice
