"""The conversion pipeline, top to bottom:

    load -> canonicalize (pattern fusion) -> analyze (path, categories, rules)
         -> emit backward -> seed targets -> assemble -> save

`convert` returns the converted onnx.ModelProto and, given a path, writes it (whole or not at all).
"""
from __future__ import annotations

import json
import os
import sys
import re
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper

from ._version import __version__
from .lrp.analysis import Unit, classify, make_units, on_path, relevance_path
from .ir.builder import PREFIX as BACKWARD_PREFIX, Builder
from .ir.shapes import infer_shapes
from .passes.precision import HALF, is_half, promote_backward_to_fp32
from .passes.remat import rematerialize
from .passes.unfuse import prune_copies, refuse, unfuse_contrib_ops
from .passes.cache import bind_cache_inputs, settle_cache
from .passes.control import branch_model, inline_constant_ifs, renamed_branch
from .passes.canonicalize import drop_outputs, select_position_before_head, squeeze_class_output
from .errors import LRPError, UnsupportedOpsError
from .ir.files import all_tensors as _all_tensors, check_convert_paths, save_model  # noqa: F401 (re-exported)
from .passes.qoperator import qoperator_to_qdq
from .ir.graph import GraphView, TensorInfo, constant_table_lookup, free_names as outer_references_of_graph, \
    has_subgraph, node_label, subgraphs
from .ir.validate import check_declared_sizes, check_element_counts, check_emitted, check_graph, check_input_types, \
    input_limits
from .lrp.patterns import find_regions
from .lrp.rules import GAMMA_CATEGORIES, RULE_SETS, check_rule_name, resolve_rule, rule_base, rule_function
from .lrp.rules import rule_misfit, warn_unmatched_overrides
from .contract import INPUT_FORMS
from .lrp.seed import build_seed, finish_target_inputs
from .lrp.multitarget import build_multi_seed, close_loop
from .vjp import NORM_VJPS, lookup

RELEVANCE_OUTPUT = "lrp_relevance"
MIN_OPSET = 13


@dataclass
class Plan:
    """Everything the analysis decided, before any backward node is written."""
    view: GraphView
    rules: str
    output: str
    sources: list
    units: list
    path: set
    path_units: list = field(default_factory=list)
    blocked_units: list = field(default_factory=list)  # rule "constant" units that would be on the path
    problems: list = field(default_factory=list)
    rule_set: dict = field(default_factory=dict)
    overrides: dict = field(default_factory=dict)


# -- load ----------------------------------------------------------------------------------------
def load_model(model) -> tuple[onnx.ModelProto, str | None]:
    """A private copy of the model (the caller's is never modified) and its directory."""
    if isinstance(model, onnx.ModelProto):
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        check_graph(copy, "<in-memory model>")
        check_declared_sizes(copy, None, "<in-memory model>")
        return copy, None
    path = os.fspath(model)
    if not os.path.isfile(path):
        raise LRPError(f"{path}: no such file")
    try:
        loaded = onnx.load(path, load_external_data=False)
    except Exception as exc:  # protobuf raises DecodeError and others
        raise LRPError(f"{path}: not a readable ONNX model ({type(exc).__name__}); "
                       f"check that the file is complete and was written by an ONNX exporter") from None
    if not loaded.graph.node:
        raise LRPError(f"{path}: the file holds no ONNX graph (empty or not an ONNX model)")
    check_graph(loaded, path)
    check_declared_sizes(loaded, os.path.dirname(os.path.abspath(path)), path)
    return loaded, os.path.dirname(os.path.abspath(path))


def model_opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


# quantized ops whose backward dequantizes a constant weight with a blocked DequantizeLinear (opset 21)
BLOCKED_DEQUANTIZATION_OPS = {"MatMulNBits"}
BLOCKED_DEQUANTIZATION_OPSET = 21


def upgrade_opset(model: onnx.ModelProto) -> None:
    """A model below opset 13 is upgraded in place (the private copy) with onnx's version converter,
    which rewrites attributes into inputs (Squeeze/Unsqueeze/Split axes, ReduceSum axes...). The
    converter sees a weight-free copy: the initializers become typed inputs, their data is never read.
    A model with n-bit quantized MatMuls (MatMulNBits) below opset 21 is upgraded to 21: their backward
    dequantizes the weight with a blocked DequantizeLinear, which no runtime constant-folds
    (vjp/contrib.py; docs/quantized.md)."""
    opset = model_opset(model)
    target = MIN_OPSET
    if opset < BLOCKED_DEQUANTIZATION_OPSET and any(
            n.op_type in BLOCKED_DEQUANTIZATION_OPS and n.domain == "com.microsoft" for n in model.graph.node):
        target = BLOCKED_DEQUANTIZATION_OPSET
    if opset >= target:
        return
    from onnx import version_converter

    light = onnx.ModelProto()
    light.ir_version = model.ir_version
    light.opset_import.extend(model.opset_import)
    light.graph.name = model.graph.name
    for part in ("node", "input", "output", "value_info"):
        getattr(light.graph, part).extend(getattr(model.graph, part))
    inputs = {i.name for i in model.graph.input}
    stubs = [i.name for i in model.graph.initializer if i.name not in inputs]
    for init in model.graph.initializer:
        if init.name not in inputs:
            light.graph.input.append(helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
    try:
        upgraded = version_converter.convert_version(light, target)
    except Exception as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise LRPError(f"the model uses opset {opset}; lrp-onnx needs opset >= {target} and onnx's version "
                       f"converter could not upgrade it ({reason}); re-export it "
                       f"(torch.onnx.export(..., opset_version={max(17, target)}))") from None
    graph = model.graph
    del graph.node[:]
    graph.node.extend(upgraded.graph.node)
    graph.initializer.extend(t for t in upgraded.graph.initializer if t.name not in set(stubs))
    del graph.value_info[:]
    del model.opset_import[:]
    model.opset_import.extend(upgraded.opset_import)
    model.ir_version = max(model.ir_version, upgraded.ir_version)
    print(f"lrp-onnx: upgraded from opset {opset} to {target} in memory", file=sys.stderr)


def source_inputs(view: GraphView, sources: list[str]) -> list[str | None]:
    """The graph input behind each source: the token-id input of an embedding lookup (when its relevance
    comes out in that input's layout, see id_layouts), the source itself if it is a graph input, else None."""
    layouts = id_layouts(view, sources)
    return [layouts[s].token_input if s in layouts and layouts[s].offender is None
            else s if s in view.graph_inputs else None for s in sources]


# ops that only retype, reshape (keeping the element order) or transpose token ids on their way to a
# lookup: the relevance at the lookup ([indices..., hidden]) is brought back to the ids' layout through them
ID_LAYOUT_OPS = ("Cast", "Identity", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose")


@dataclass
class IdLayout:
    """How an embedding lookup's indices come from its token ids (a graph input, or the ids a tokenizer
    made inside the graph: `tokenized`). `chain`: when only layout ops lie between them, those ops from
    the ids to the indices in order (empty: the ids themselves). `routed`: otherwise the routing ops
    between them (slices, concatenations, gathers, repeats of ids), in graph order; their positions are
    routed the same way to bring relevance back. `offender`: a routing op where that cannot be emitted
    (below opset 16, which has no scatter-add): then the relevance cannot be given in the ids' layout."""
    token_input: str
    indices: str  # the lookup's indices
    chain: list = field(default_factory=list)
    routed: list = field(default_factory=list)
    offender: onnx.NodeProto | None = None
    tokenized: str | None = None  # ids a tokenizer made inside the graph from the (string) token input


def id_layouts(view: GraphView, sources: list[str]) -> dict[str, IdLayout]:
    """{source: IdLayout} for each source that is an embedding lookup (or its dequantized output)."""
    origin = _integer_input_origins(view)
    opset = model_opset(view.model)
    layouts = {}
    for _, _, token_input, k, out in _embedding_lookups(view):
        if out not in sources:
            continue
        layout, between, stack = IdLayout(token_input, view.nodes[k].input[1]), {}, [view.nodes[k].input[1]]
        while stack:  # the nodes that make the indices from the ids, walking back over id-carrying operands
            t = stack.pop()
            if t == token_input or view.producer[t] in between:
                continue
            node = view.nodes[view.producer[t]]
            if _tokenized_ids(view, node, {token_input: token_input}):  # the ids are made here, from text:
                layout.tokenized = t                                      # relevance in the ids' layout
                continue
            between[view.producer[t]] = node
            data = node.input if node.op_type == "Concat" else node.input[:1]
            stack.extend(x for x in data if x and origin.get(x) == token_input)
        nodes = [between[j] for j in sorted(between)]
        if all(n.op_type in ID_LAYOUT_OPS for n in nodes):
            layout.chain = nodes  # one operand each: a chain
        elif opset >= 16:
            layout.routed = nodes
        else:
            layout.offender = next(n for n in nodes if n.op_type not in ID_LAYOUT_OPS)
        layouts[out] = layout
    return layouts


def check_id_layouts(view: GraphView, sources: list[str]) -> None:
    """Default sources only: a lookup whose relevance cannot be brought to its ids' layout is refused,
    rather than giving relevance whose positions silently differ from the ids' (named with --source, the
    lookup's relevance is given in its own layout, mapped to no input)."""
    for s, layout in id_layouts(view, sources).items():
        if layout.offender is not None:
            raise LRPError(f"the relevance at the embedding lookup '{s}' cannot be given in the layout of input "
                           f"'{layout.token_input}': its indices are that input through "
                           f"{node_label(layout.offender)}, whose relevance needs a scatter-add (opset >= 16; "
                           f"the model has {model_opset(view.model)}); re-export at opset >= 16, "
                           f"or name the lookup with --source {s} to explain it in the lookup's own layout")


def restore_id_layout(b: Builder, relevance: str, layout: IdLayout) -> str:
    """The relevance at a lookup, [indices..., hidden], in its ids' layout [ids..., hidden]."""
    return _route_back(b, relevance, layout) if layout.routed else _undo_chain(b, relevance, layout.chain)


def _hidden_size(b: Builder, relevance: str) -> str:
    """[hidden], the last dimension of `relevance`, as a 1-D int64 tensor."""
    if b.opset >= 15:
        return b.op("Shape", [relevance], start=-1, dtype=TensorProto.INT64, shape=[1])
    return b.op("Slice", [b.shape_of(relevance), b.ints([-1]), b.ints([2 ** 62])], dtype=TensorProto.INT64)


def _undo_chain(b: Builder, relevance: str, chain: list) -> str:
    """The layout ops from the ids to the indices undone in reverse order: a Transpose by its inverse
    with the hidden axis kept last, a reshape by a Reshape to the ids-side shape."""
    view = b.view
    for node in reversed(chain):
        before = node.input[0]
        if node.op_type == "Transpose":
            rank = view.rank(before)
            perm = [a.ints for a in node.attribute if a.name == "perm"]
            perm = list(perm[0]) if perm else list(range(rank))[::-1]
            inverse = [perm.index(a) for a in range(len(perm))]
            relevance = b.op("Transpose", [relevance], perm=inverse + [len(perm)], dtype=view.dtype(relevance))
        elif node.op_type != "Cast" and node.op_type != "Identity":
            shape = b.op("Concat", [b.shape_of(before), _hidden_size(b, relevance)], axis=0, dtype=TensorProto.INT64)
            relevance = b.op("Reshape", [relevance, shape], dtype=view.dtype(relevance))
    return relevance


def _route_back(b: Builder, relevance: str, layout: IdLayout) -> str:
    """Ids sliced, concatenated, gathered or repeated before the lookup: the position of each id (0 ..
    n-1 in the ids' layout) is routed through copies of the same ops (other operands of a Concat, and a
    Pad's value, become -1: no id), so each looked-up row knows which id it came from; the relevance rows
    are then scatter-added to their ids' positions (a repeated id sums its copies' relevance, a row of no
    id is dropped: that token is not an input)."""
    view = b.view
    ids = layout.tokenized or layout.token_input
    count = b.op("Size", [ids], dtype=TensorProto.INT64, shape=[])
    flat = b.op("Range", [b.const(np.array(0, np.int64)), count, b.const(np.array(1, np.int64))],
                dtype=TensorProto.INT64, shape=[None])
    routed = {ids: b.op("Reshape", [flat, b.shape_of(ids)], dtype=TensorProto.INT64, shape=view.shape(ids))}

    def no_id(t):
        value = helper.make_tensor("value", TensorProto.INT64, [1], [-1])
        return b.op("ConstantOfShape", [b.shape_of(t)], dtype=TensorProto.INT64, shape=view.shape(t), value=value)

    for node in layout.routed:
        if node.op_type in ("Cast", "Identity"):
            routed[node.output[0]] = routed[node.input[0]]
            continue
        data = range(len(node.input)) if node.op_type == "Concat" else [0]
        inputs = [routed[x] if x in routed else no_id(x) if k in data and x else x for k, x in enumerate(node.input)]
        if node.op_type == "Pad" and len(inputs) > 2 and inputs[2]:
            inputs[2] = b.const(np.array(-1, np.int64))
        outs = [b.fresh(f"{node.op_type}_positions") if o else "" for o in node.output]
        b.nodes.append(helper.make_node(node.op_type, inputs, outs, name=b.fresh(f"{node.op_type}_positions_node"),
                                        domain=node.domain, **{a.name: helper.get_attribute_value(a)
                                                               for a in node.attribute}))
        for o, r in zip(node.output, outs):
            if o:
                routed[o] = r
                view.info[r] = TensorInfo(TensorProto.INT64, view.shape(o))
    positions = routed[layout.indices]
    hidden = _hidden_size(b, relevance)
    dtype = view.dtype(relevance) or TensorProto.FLOAT
    rows = b.op("Reshape", [relevance, b.op("Concat", [b.ints([-1]), hidden], axis=0, dtype=TensorProto.INT64)],
                dtype=dtype, shape=[None, None])
    where = b.op("Reshape", [positions, b.ints([-1])], dtype=TensorProto.INT64, shape=[None])
    where = b.op("Where", [b.op("Less", [where, b.const(np.array(0, np.int64))], dtype=TensorProto.BOOL), count, where],
                 dtype=TensorProto.INT64, shape=[None])  # no id: an extra row, dropped below
    where = b.op("Expand", [b.op("Unsqueeze", [where, b.ints([1])], dtype=TensorProto.INT64, shape=[None, 1]),
                            b.shape_of(rows)], dtype=TensorProto.INT64, shape=[None, None])
    extra = b.op("Add", [count, b.const(np.array(1, np.int64))], dtype=TensorProto.INT64, shape=[])
    size = b.op("Concat", [b.op("Unsqueeze", [extra, b.ints([0])], dtype=TensorProto.INT64, shape=[1]), hidden],
                axis=0, dtype=TensorProto.INT64)
    zeros = b.op("ConstantOfShape", [size], dtype=dtype, shape=[None, None],
                 value=helper.make_tensor("value", dtype, [1], [0]))
    summed = b.op("ScatterElements", [zeros, where, rows], axis=0, reduction="add", dtype=dtype, shape=[None, None])
    kept = b.op("Slice", [summed, b.ints([0]), b.op("Unsqueeze", [count, b.ints([0])], dtype=TensorProto.INT64,
                                                              shape=[1])], dtype=dtype, shape=[None, None])
    shape = b.op("Concat", [b.shape_of(ids), hidden], axis=0, dtype=TensorProto.INT64)
    return b.op("Reshape", [kept, shape], dtype=dtype)


# -- analyze -------------------------------------------------------------------------------------
# ops that move, copy or retype integer ids without computing new ones: input 0 is routed to the output
INDEX_ROUTING_OPS = ("Cast", "Reshape", "Unsqueeze", "Squeeze", "Identity", "Flatten", "Transpose", "Slice",
                     "Expand", "Tile", "Gather", "GatherElements", "GatherND", "Split", "Pad", "Concat",
                     "ReverseSequence", "DepthToSpace", "SpaceToDepth")


def _integer_input_origins(view: GraphView) -> dict[str, str]:
    """Tensor -> the integer graph input it is a view of: token ids cast, reshaped, transposed, sliced,
    expanded, concatenated (with constants or other ids) on their way to the embedding lookup."""
    origin = {i: i for i in view.graph_inputs if not view.is_float(i)}
    for n in view.nodes:
        if n.op_type not in INDEX_ROUTING_OPS or n.domain not in ("", "ai.onnx") or not n.input:
            origin.update(_tokenized_ids(view, n, origin))
            continue
        routed = [t for t in n.input if t] if n.op_type == "Concat" else n.input[:1]
        feeding = next((origin[t] for t in routed if t in origin), None)
        if feeding is not None:
            origin.update((o, feeding) for o in n.output if o and not view.is_float(o))
    return origin


def _tokenized_ids(view: GraphView, node, origin: dict) -> dict[str, str]:
    """Ids made inside the graph from text: a node reading a string graph input (or a string made from
    one) that outputs integers -- a tokenizer (onnxruntime-extensions' SentencepieceTokenizer,
    BertTokenizer, ..., ai.onnx.ml's LabelEncoder). Its non-float outputs are ids of that string input
    (which of them is the token ids, the embedding lookup they feed decides); string outputs (a
    normalizer's) stay text of it. Untyped outputs (an op shape inference does not know) count as ids."""
    text = next((origin[t] for t in node.input if t in origin and view.dtype(origin[t]) == TensorProto.STRING), None)
    if text is None:
        return {}
    return {o: text for o in node.output if o and not view.is_float(o)}


def token_id_outputs(view: GraphView, sources: list[str], names: list[str]):
    """For each source looked up by ids a tokenizer made inside the graph, an extra output holding those
    ids as the tokenizer made them (`lrp_token_ids`, `lrp_token_ids_1`, ...: the leading shape of the
    relevance, which comes out in their layout), so that a consumer can map relevance to tokens;
    (nodes, value infos, {relevance output: ids output})."""
    nodes, infos, mapping = [], [], {}
    layouts = id_layouts(view, sources)
    for name, source in zip(names, sources):
        if source not in layouts or layouts[source].tokenized is None:
            continue
        ids = layouts[source].tokenized
        out = "lrp_token_ids" + name[len(RELEVANCE_OUTPUT):]
        # int64 whatever the tokenizer's type (which shape inference may not know for a custom op)
        nodes.append(helper.make_node("Cast", [ids], [out], name=f"lrp/{out}", to=TensorProto.INT64))
        infos.append(helper.make_tensor_value_info(out, TensorProto.INT64, view.shape(ids)))
        mapping[name] = out
    return nodes, infos, mapping


def _embedding_lookups(view: GraphView) -> list[tuple]:
    """(table rows, table, token input, node index, output) of each lookup of a constant table by an
    integer graph input: a Gather of a float table (a DequantizeLinear'd one included), a Gather of an
    integer table followed by DequantizeLinear (quantize_dynamic, QOperator), or a GatherBlockQuantized
    (onnxruntime-genai's int4 embedding); the output is the float embedding."""
    origin = _integer_input_origins(view)
    lookups = []
    for k, n in enumerate(view.nodes):
        lookup = constant_table_lookup(view, n)
        if lookup is not None and lookup[1] in origin:
            rows = lookup[2] or 0
            out = n.output[0]
            if n.op_type == "Gather" and not view.is_float(n.input[0]):  # the source: the dequantized lookup
                deq = [view.nodes[c] for c in view.consumers.get(out, [])]
                if len(deq) != 1 or deq[0].op_type != "DequantizeLinear" or deq[0].input[0] != out:
                    continue
                out = deq[0].output[0]
            lookups.append((rows if isinstance(rows, int) else 0, n.input[0], origin[n.input[1]], k, out))
    return lookups


def default_sources(view: GraphView, output: str) -> list[str]:
    """The word-embedding lookup(s): Gathers on the largest float table fed by an integer graph
    input (or on a quantized table, then dequantized: quantize_dynamic), in the order of those inputs
    among the graph inputs, then in node order. An encoder-decoder that shares its table (T5) gives
    two: the encoder's (`input_ids`) first, then the decoder's (`decoder_input_ids`). Without one,
    the float graph inputs (pixels, features)."""
    lookups = _embedding_lookups(view)
    if lookups:
        biggest = max((rows, table) for rows, table, *_ in lookups)[1]
        order = view.graph_inputs.index
        return [out for _, _, out in sorted((order(token_input), k, out)
                                            for _, table, token_input, k, out in lookups if table == biggest)]
    floats = [i for i in view.graph_inputs if view.is_float(i)]
    if floats:
        return floats
    raise LRPError("found no relevance source: no word-embedding Gather fed by an integer graph input "
                   "and no float graph input; name one with --source TENSOR")


def analyze(view: GraphView, rules: str | dict, output: str, sources: list[str],
            overrides: dict | None = None) -> Plan:
    rule_set = RULE_SETS[rules] if isinstance(rules, str) else dict(rules)
    for key, r in {**rule_set, **(overrides or {})}.items():
        check_rule_name(r, f"rule mapping entry '{key}'")
    regions = find_regions(view)
    while True:
        units = make_units(view, regions)
        path0 = relevance_path(view, units, sources, output)
        classify(view, units, path0)
        for u in units:
            u.rule = resolve_rule(u, rule_set, overrides)
        dissolved = [u.region for u in units if u.region is not None and u.rule == "gradient"]
        if not dissolved:
            break
        regions = [r for r in regions if r not in dissolved]
    blocked = {k for k, u in enumerate(units) if u.rule == "constant"}
    path = relevance_path(view, units, sources, output, blocked)
    unclassified = [u for u in units if u.rule is None]
    if unclassified and blocked:  # a statistic held constant (a norm's std) leaves a linear op
        classify(view, unclassified, path)
        for u in unclassified:
            u.rule = resolve_rule(u, rule_set, overrides)
    plan = Plan(view, rules if isinstance(rules, str) else "custom", output, sources, units, path,
                rule_set=rule_set, overrides=dict(overrides or {}))
    plan.blocked_units = [units[k] for k in sorted(blocked) if on_path(units[k], path0)]
    for k, u in enumerate(units):
        if k in blocked or not on_path(u, path):
            continue
        u.n_relevant_inputs = sum(1 for t in u.inputs if t in path)
        if u.rule == "uniform" and u.n_relevant_inputs < 2:
            u.rule = "gradient"  # a product with one relevance-carrying operand is linear in it
        plan.path_units.append(u)
        if u.region is None and has_subgraph(view.nodes[u.nodes[0]]):
            plan.problems.extend(_control_flow_problems(plan, u))
            continue
        problem = _rule_problem(view, u) or rule_misfit(view, u)
        if problem:
            plan.problems.append(problem)
    warn_unmatched_overrides(units, overrides)
    return plan


def _control_flow_problems(plan: Plan, u: Unit) -> list[str]:
    """An If gets the backward of both branches (each analysed like a graph of its own, with the
    same rules); Loop and Scan are refused."""
    view = plan.view
    node = view.nodes[u.nodes[0]]
    label = node_label(node)
    if u.rule == "constant":
        return []
    if node.op_type != "If" or node.domain not in ("", "ai.onnx"):
        return [f"{label}: {node.op_type} on the relevance path is not supported (no backward through "
                f"a loop body); re-export with the loop unrolled (fixed shapes) or pick another --source"]
    if rule_base(u.rule) in ("identity", "uniform", "constant_std", "gamma", "straight_through", "dequantized"):
        return [f"{label}: an If takes rule gradient (its branches get the rule set's rules) or constant, "
                f"not {u.rule}"]
    if any(is_half(view, t) for t in list(u.inputs[1:]) + list(u.outputs) if t):
        return [f"{label}: an If in a half-precision model is not supported (the backward runs in fp32 and "
                f"would need fp32 copies of its branches)"]
    problems = []
    for name, branch_plan in _branch_plans(plan, u, [True] * len(u.outputs)):
        problems.extend(f"{label}: in its {name}: {p}" for p in branch_plan.problems)
    return problems


def _branch_plans(plan: Plan, u: Unit, seeded: list[bool], rename=None):
    """(branch name, Plan) of each branch of If unit u: the branch analysed as a graph whose sources
    are the If's relevance-carrying outer-scope inputs and whose targets are its seeded outputs.
    `rename(branch) -> branch`: analyse a renamed copy (for emission)."""
    view = plan.view
    node = view.nodes[u.nodes[0]]
    sources = [t for t in u.inputs[1:] if t in plan.path]
    result = []
    for name, branch in subgraphs(node):
        if rename is not None:
            branch = rename(name, branch)
        sub = branch_model(view, branch, outer_references_of_graph(branch))
        sub_view = GraphView.build(sub, infer_shapes(sub))
        targets = [o.name for o, s in zip(branch.output, seeded) if s]
        result.append((name, analyze(sub_view, plan.rule_set, targets, sources, plan.overrides)))
    return result


def _if_backward(b: Builder, plan: Plan, u: Unit, gy: list, wants: list) -> list:
    """The backward of a non-constant If: an If on the same condition whose branches recompute their
    forward (renamed) and run its backward, each returning the gradients of the If's relevance-carrying
    outer-scope inputs (zeros where a branch does not read one)."""
    view = plan.view
    node = view.nodes[u.nodes[0]]
    wanted = [t for t, w in zip(u.inputs, wants) if w and t]
    if not wanted:
        return [None] * len(u.inputs)
    scope = b.scope
    copies = {}

    def rename(name, branch):
        copies[name], _ = renamed_branch(branch, f"lrp/{scope}/{name}", b._used)
        return copies[name]

    branches = {}
    for name, branch_plan in _branch_plans(plan, u, [g is not None for g in gy], rename):
        sub_view = branch_plan.view
        for g in gy:
            if g is not None:
                sub_view.info.setdefault(g, view.info.get(g))
        for t in wanted:
            sub_view.info.setdefault(t, view.info.get(t))
        sub = Builder(sub_view)
        sub._used = b._used
        sub.scope = f"{scope}/{name}"
        seeds = [(o.name, g) for o, g in zip(copies[name].output, gy) if g is not None]
        try:
            grads = emit_backward(branch_plan, sub, seeds, wanted)
        except UnsupportedOpsError as exc:
            raise ValueError(f"in its {name}: " + "; ".join(exc.problems)) from None
        outputs = []
        for t in wanted:
            g = grads.get(t)
            out = b.fresh(f"{name}_grad")
            if g is None:
                sub.nodes.append(helper.make_node("ConstantOfShape", [sub.shape_of(t)], [out], name=out + "_node",
                                                  value=helper.make_tensor("value", view.dtype(t) or 1, [1], [0])))
            else:
                sub.nodes.append(helper.make_node("Identity", [sub.cast_like(g, t)], [out], name=out + "_node"))
            outputs.append(helper.make_tensor_value_info(out, view.dtype(t) or TensorProto.FLOAT, None))
        branches[name] = helper.make_graph(list(copies[name].node) + sub.nodes, f"{name}_backward", [], outputs,
                                           list(copies[name].initializer) + sub.initializers)
    outs = b.op("If", [node.input[0]], n_out=len(wanted), then_branch=branches["then_branch"],
                else_branch=branches["else_branch"])
    outs = [outs] if isinstance(outs, str) else outs
    by_input = {}
    for t, o in zip(wanted, outs):
        view.info[o] = TensorInfo(view.dtype(t), view.shape(t))
        by_input[t] = o
    return [by_input.get(t) if w else None for t, w in zip(u.inputs, wants)]


def _rule_problem(view: GraphView, u: Unit) -> str | None:
    if u.rule is None:
        return (f"{u.describe(view)}: no rule: what this op computes in its relevance-carrying inputs is not "
                f"known (not linear, elementwise in one tensor, a product or a normalization); "
                f"give it one with --override '{u.name or u.op_type}=RULE' if you know it")
    if rule_base(u.rule) == "gamma" and not any(c in GAMMA_CATEGORIES for c in u.categories):
        return f"{u.describe(view)}: rule {u.rule} applies to Conv and linear layers (constant weights) only"
    if u.region is not None and u.region.kind == "linear" and rule_base(u.rule) not in ("gamma", "constant"):
        return f"{u.describe(view)}: a linear layer takes rules gradient, gamma or constant, not {u.rule}"
    if u.region is not None or rule_base(u.rule) == "gamma":
        return None
    node = view.nodes[u.nodes[0]]
    if u.rule in ("gradient", "uniform") and lookup(node) is None:
        return f"{node_label(node)}: no gradient rule for this op"
    if u.rule == "constant_std" and node.op_type not in NORM_VJPS:
        return f"{node_label(node)}: rule constant_std applies to normalization ops only"
    return None


# -- emit backward -------------------------------------------------------------------------------
def emit_backward(plan: Plan, b: Builder, seed_gradient, wanted: list[str], probe=None) -> dict[str, str]:
    """Reverse-mode pass over the path units; returns the gradient of each wanted tensor.
    `seed_gradient`: the gradient of plan.output, or (tensor, gradient) pairs.

    probe(b, unit, gy, grads, wants), if given, sees each unit's output gradients (totals) and its
    own contributions to its inputs' gradients, and may add nodes (the conservation audit)."""
    view = b.view
    pending: dict[str, list[str]] = {}
    for t, g in ([(plan.output, seed_gradient)] if isinstance(seed_gradient, str) else seed_gradient):
        pending.setdefault(t, []).append(g)
    totals: dict[str, str] = {}

    def total(t):
        if t not in totals and pending.get(t):
            totals[t] = b.sum(pending[t])
        return totals.get(t)

    problems = []
    for u in reversed(plan.path_units):
        gy = [total(o) if o in plan.path else None for o in u.outputs]
        if all(g is None for g in gy):
            continue
        wants = [bool(t) and t in plan.path for t in u.inputs]
        b.scope = re.sub(r"[^A-Za-z0-9_.-]+", "_", u.name or u.op_type)[-60:] or "node"
        try:
            if u.region is None and u.op_type == "If" and u.rule != "constant":
                grads = _if_backward(b, plan, u, gy, wants)
            else:
                grads = rule_function(u.rule)(b, u, gy, wants)
        except (NotImplementedError, ValueError, TypeError, KeyError, IndexError) as exc:
            problems.append(f"{u.describe(view)}: {_user_facing(exc)}")
            continue
        if probe is not None:
            probe(b, u, gy, grads, wants)
        for t, g, w in zip(u.inputs, grads, wants):
            if w and g is not None:
                pending.setdefault(t, []).append(g)
    if problems:
        raise UnsupportedOpsError(problems)
    b.scope = "relevance"
    return {t: total(t) for t in wanted}


def _user_facing(exc: Exception) -> str:
    """A rule's complaint, without the names of the backward's own tensors (lrp/...), which mean
    nothing to the user: the problem is already prefixed with the forward node."""
    text = str(exc) if isinstance(exc, (NotImplementedError, ValueError)) else \
        f"its backward cannot be built ({type(exc).__name__}: {exc})"
    text = re.sub(r"'%s[^']*'" % re.escape(BACKWARD_PREFIX), "an intermediate of its backward", text)
    return re.sub(r"%s\S*" % re.escape(BACKWARD_PREFIX), "an intermediate of its backward", text)


# -- assemble and save ---------------------------------------------------------------------------
def _sanitize(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_]+", "_", name).strip("_")


@dataclass
class Conversion:
    """What `plan_conversion` decided and emitted: everything `convert` assembles, and `inspect` reports."""
    model: onnx.ModelProto          # the private copy, rewritten in memory (upgraded, unfused, inlined)
    base_dir: str | None
    view: GraphView
    plan: Plan
    output: str                     # the explained tensor (the head's output at the position, if selected)
    sources: list
    latent: list
    position_selected: bool = False
    builder: Builder | None = None
    seed: object = None
    grads: dict = field(default_factory=dict)
    problems: list = field(default_factory=list)  # unsupported units: `convert` refuses, `inspect` lists them
    bound_inputs: dict = field(default_factory=dict)  # KV-cache inputs bound inside the graph (cache.py)
    original_nodes: set = field(default_factory=set)  # the input model's node names (the rest was written here)
    unfused: list = field(default_factory=list)  # fused nodes written out (unfuse.Unfused), put back by `refuse`


def plan_conversion(model, *, rules: str | dict = "attnlrp", source=None, output: str | None = None,
                    latent=(), seed_input: bool = False, overrides: dict | None = None,
                    relevance_only: bool = False, multi_target: bool = False, _probe=None,
                    output_path=None) -> Conversion:
    """The one check path of `convert` and `inspect`: load, upgrade, unfuse, inline constant Ifs, infer
    shapes, choose output and sources, analyze, seed and emit the backward (in memory). Bad arguments
    and unusable graphs raise LRPError; units no rule handles come back in `problems` (every one of
    them, each starting with the forward node's label)."""
    if isinstance(rules, str) and rules not in RULE_SETS:
        raise LRPError(f"unknown rule set '{rules}'; choose one of: {', '.join(RULE_SETS)}")
    # load
    model_path = None if isinstance(model, onnx.ModelProto) else model
    model, base_dir = load_model(model)
    original_nodes = {n.name for n in model.graph.node}
    check_convert_paths(model, model_path, base_dir, output_path)
    upgrade_opset(model)
    cache = bind_cache_inputs(model)  # a KV-cache export explains full sequences: its cache is fed empty
    qoperator_to_qdq(model)  # QLinearMatMul, QLinearAdd, ...: the QDQ form they stand for
    unfused = unfuse_contrib_ops(model)
    view = GraphView.build(model, inline_constant_ifs(model, infer_shapes))
    label = os.fspath(model_path) if model_path is not None else "<in-memory model>"
    check_input_types(model, view.dtype, label, original_nodes)
    check_element_counts(((t, info.shape) for t, info in view.info.items()), label, "tensor")
    if cache.bound:
        settle_cache(model, cache, keep=frozenset(t for u in unfused for t in u.node.input))
        view = GraphView.build(model, infer_shapes(model))
    # choose output and sources
    output = output or view.graph_outputs[0]
    if output not in view.graph_outputs:
        raise LRPError(f"--output '{output}' is not a graph output; outputs are: {', '.join(view.graph_outputs)}")
    sources = [source] if isinstance(source, str) else list(source or [])
    latent = list(latent or ())
    known = set(view.producer) | set(view.graph_inputs)
    for s in sources + latent:
        if s not in known:
            raise LRPError(f"tensor '{s}' is not in the graph (no node produces it and no input has that name)")
    if not sources:
        sources = default_sources(view, output)
        check_id_layouts(view, sources)
    # canonicalize: a [batch, classes, 1, 1] output is explained as [batch, classes]; in relevance-only
    # mode, the head is computed at the explained position only
    if not seed_input:
        squeezed = squeeze_class_output(model, view, output)
        if squeezed is not None:
            output = squeezed
            view = GraphView.build(model, infer_shapes(model))
    position_selected = False
    if relevance_only and not seed_input:
        selected = select_position_before_head(model, view, output, multi_target)
        if selected is not None:
            output, position_selected = selected, True
            view = GraphView.build(model, infer_shapes(model))
    # analyze
    plan = analyze(view, rules, output, sources, overrides)
    conv = Conversion(model, base_dir, view, plan, output, sources, latent, position_selected, bound_inputs=cache.bound,
                      original_nodes=original_nodes, unfused=unfused)
    if plan.problems:
        conv.problems = list(plan.problems)
        return conv
    for s in sources:
        if s not in plan.path:
            raise LRPError(f"source '{s}' does not reach output '{output}' on a relevance-carrying path")
    for t in latent:
        if t not in plan.path:
            raise LRPError(f"--latent '{t}' is not on the relevance path from the source to '{output}'")
    # seed targets and emit backward
    b = Builder(view)
    b.scope = "seed"
    try:
        if multi_target:
            seed = build_multi_seed(b, output, seed_input, position_selected)
        else:
            seed = build_seed(b, output, seed_input, position_selected)
    except ValueError as exc:
        raise LRPError(str(exc)) from None
    try:
        grads = emit_backward(plan, b, seed.gradient, sources + latent, probe=_probe)
    except UnsupportedOpsError as exc:
        conv.problems = list(exc.problems)
        return conv
    conv.builder, conv.seed, conv.grads = b, seed, grads
    return conv


def convert(model, output_path=None, *, rules: str | dict = "attnlrp", source=None, output: str | None = None,
            latent=(), seed_input: bool = False, overrides: dict | None = None,
            relevance_only: bool = False, multi_target: bool = False, memory: str = "fast",
            inputs: str = "plain", forward: str = "fused", _probe=None) -> onnx.ModelProto:
    """Convert an ONNX model into one that also outputs relevance. See docs/contract.md for the contract.

    relevance_only: drop the original outputs and run the model's head (everything after the last
    position-mixing op) at the explained position only.
    multi_target: lrp_target/lrp_position take [batch, K] (K targets per row, one forward pass) and the
    relevance outputs get a target axis, [batch, K, ...] (see multitarget.py).
    memory: "fast" (default) or "lean": the backward recomputes each attention's scores and
    probabilities from Q and K instead of keeping them from the forward (lrp_onnx/passes/lean.py).
    inputs: the form of lrp_target / lrp_position: "plain" (default) int64 inputs, fed -1 for the
    default, which every runtime runs (onnxruntime, OpenVINO, TensorRT); or "optional"
    (optional(tensor(int64)), omissible in onnxruntime's core, not readable by OpenVINO). See seed.py.
    forward: "fused" (default): the forward keeps the model's vendor fused kernels (onnxruntime's
    GroupQueryAttention, MultiHeadAttention, RotaryEmbedding, EmbedLayerNormalization), so its original
    outputs are the original model's bit for bit, and the backward differentiates their written-out copies;
    "written": the forward runs the written-out copies too (a model with only standard ops, for runtimes
    without those kernels). See unfuse.py."""
    if memory not in ("fast", "lean"):
        raise LRPError(f"memory '{memory}': choose 'fast' or 'lean'")
    if forward not in ("fused", "written"):
        raise LRPError(f"forward '{forward}': choose 'fused' or 'written'")
    if inputs not in INPUT_FORMS:
        raise LRPError(f"inputs '{inputs}': choose {' or '.join(repr(f) for f in INPUT_FORMS)}")
    if multi_target and _probe is not None:
        raise LRPError("the conservation audit explains one target per row; convert without multi_target")
    conv = plan_conversion(model, rules=rules, source=source, output=output, latent=latent,
                           seed_input=seed_input, overrides=overrides, relevance_only=relevance_only,
                           multi_target=multi_target, _probe=_probe, output_path=output_path)
    if conv.problems:
        raise UnsupportedOpsError(conv.problems)
    model, base_dir, view, plan, b, seed, grads = (conv.model, conv.base_dir, conv.view, conv.plan,
                                                   conv.builder, conv.seed, conv.grads)
    output, sources, latent, position_selected = conv.output, conv.sources, conv.latent, conv.position_selected
    relevance_outputs, ranks = [], []
    names = [RELEVANCE_OUTPUT if k == 0 else f"{RELEVANCE_OUTPUT}_{k}" for k in range(len(sources))]
    names += [f"{RELEVANCE_OUTPUT}_{_sanitize(t)}" for t in latent]
    layouts = {s: layout for s, layout in id_layouts(view, sources).items() if layout.chain or layout.routed}
    for name, t in zip(names, list(sources) + list(latent)):
        g = grads[t]
        shape = view.shape(t)
        factor = g if g is not None else b.scalar_like(0.0, t)
        if t in layouts:  # ids reshaped, transposed, sliced... before the lookup: relevance in the ids' layout
            relevance = restore_id_layout(b, b.op("Mul", [t, factor], like=t), layouts[t])
            ids = view.shape(layouts[t].tokenized or layouts[t].token_input)
            shape = None if ids is None or shape is None else list(ids) + list(shape[-1:])
            b.nodes.append(helper.make_node("Identity", [relevance], [name], name=f"lrp/{name}"))
        else:
            b.nodes.append(helper.make_node("Mul", [t, factor], [name], name=f"lrp/{name}"))
        relevance_outputs.append(helper.make_tensor_value_info(name, view.dtype(t) or TensorProto.FLOAT, shape))
        ranks.append(None if shape is None else len(shape))
    # the backward reads only forward tensors that onnxruntime's fused forward still computes as they are
    half = any(is_half(view, t) for t in [output] + list(sources))
    before = len(b.nodes)
    rematerialize(b, b.nodes, half)  # prepends its recomputations: they read forward tensors only
    if seed.loop is not None:
        seed.loop.outer_nodes += len(b.nodes) - before
    # half-precision models: the backward (seed included) runs in fp32, relevance comes out in fp32
    if half:
        promote_backward_to_fp32(b, b.nodes)
        for vi in relevance_outputs + [vi for _, vi in seed.outputs.values()]:
            if vi.type.tensor_type.elem_type in HALF:
                vi.type.tensor_type.elem_type = TensorProto.FLOAT
    if seed.loop is not None:  # several targets per row: the backward runs in a Loop over them
        try:
            seed.outputs = close_loop(b, seed, [(vi.name, vi.type.tensor_type.elem_type, rank)
                                                for vi, rank in zip(relevance_outputs, ranks)])
        except ValueError as exc:
            raise LRPError(str(exc)) from None
        for k, vi in enumerate(list(relevance_outputs)):
            shape = [d.dim_param or d.dim_value or None for d in vi.type.tensor_type.shape.dim] \
                if vi.type.tensor_type.HasField("shape") else None
            relevance_outputs[k] = helper.make_tensor_value_info(
                relevance_outputs[k].name, relevance_outputs[k].type.tensor_type.elem_type,
                None if shape is None else [shape[0], "lrp_targets"] + list(shape[1:]))
    # assemble
    g = model.graph
    g.node.extend(b.nodes)
    g.initializer.extend(b.initializers)
    refused = refuse(model, conv.unfused) if forward == "fused" else 0  # the forward keeps the fused kernels
    g.initializer.extend(seed.defaults)
    g.input.extend(seed.inputs)
    for tensor, vi in seed.outputs.values():
        g.node.append(helper.make_node("Identity", [tensor], [vi.name], name=f"lrp/{vi.name}"))
        g.output.append(vi)
    g.output.extend(relevance_outputs)
    id_nodes, id_outputs, token_ids = token_id_outputs(view, sources, names[:len(sources)])
    g.node.extend(id_nodes)
    g.output.extend(id_outputs)
    meta = {
        "version": __version__, "rules": plan.rules, "explained_output": output, "sources": sources,
        "latent": dict(zip(names[len(sources):], latent)), "relevance_outputs": names,
        "source_inputs": dict(zip(names, source_inputs(view, sources))),
        "seed_input": seed_input, "overrides": overrides or {}, "relevance_only": relevance_only,
        "head_at_position": position_selected, "multi_target": multi_target,
        # n-bit weights (MatMulNBits): Explainer pre-packs them (the forward's kernel then computes what a
        # default session does) unless the conversion is lean: the backward reads each packed weight as it
        # is, and pre-packing keeps a second, kernel-layout copy of it (docs/quantized.md, Memory)
        "prepack": memory != "lean" and any(n.op_type == "MatMulNBits" for n in view.nodes),
        "input_limits": input_limits(view),
        "forward": {"unfused": len(conv.unfused), "fused_kept": refused},
    }
    if conv.bound_inputs:
        meta["bound_inputs"] = conv.bound_inputs
    if token_ids:  # ids tokenized inside the graph: {relevance output: its ids output}
        meta["token_ids"] = token_ids
    if relevance_only:
        drop_outputs(model, keep={o.name for o in g.output if o.name.startswith("lrp_")})
    defaults = finish_target_inputs(model, inputs)
    if defaults:
        optional = any(vi.type.HasField("optional_type") for vi in g.input if vi.name in defaults)
        meta["inputs"] = "optional" if optional else "plain" if inputs == "plain" else "initializer"
        meta["input_defaults"] = defaults
    if memory == "lean":
        from .passes.lean import recompute_attention

        lean = recompute_attention(model)
        prune_copies(model)  # the forward's score chains the backward now recomputes
        meta["memory"] = {"mode": "lean", "attention_recomputed": lean["recomputed"], "attention_chains": lean["chains"]}
    for p in list(model.metadata_props):
        if p.key == "lrp_onnx":
            model.metadata_props.remove(p)
    model.metadata_props.add(key="lrp_onnx", value=json.dumps(meta))
    check_emitted(model, conv.original_nodes)
    if output_path is not None:
        save_model(model, output_path, base_dir)
    return model
