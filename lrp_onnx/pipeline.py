"""The conversion pipeline, top to bottom:

    load -> canonicalize (pattern fusion) -> analyze (path, categories, rules)
         -> emit backward -> seed targets -> assemble -> save

`convert` returns the converted onnx.ModelProto and, given a path, writes it (whole or not at all).
"""
from __future__ import annotations

import filecmp
import json
import os
import shutil
import re
import tempfile
from dataclasses import dataclass, field

import onnx
from onnx import TensorProto, helper

from . import __version__
from .analysis import Unit, classify, make_units, on_path, relevance_path
from .builder import Builder
from .shapes import infer_shapes
from .precision import HALF, is_half, promote_backward_to_fp32
from .remat import rematerialize
from .unfuse import unfuse_contrib_ops
from .canonicalize import drop_outputs, select_position_before_head
from .errors import LRPError, UnsupportedOpsError
from .graph import GraphView, node_label
from .patterns import find_regions
from .rules import GAMMA_CATEGORIES, RULE_SETS, check_rule_name, resolve_rule, rule_base, rule_function
from .seed import build_seed
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


# -- load ----------------------------------------------------------------------------------------
def load_model(model) -> tuple[onnx.ModelProto, str | None]:
    """A private copy of the model (the caller's is never modified) and its directory."""
    if isinstance(model, onnx.ModelProto):
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
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
    return loaded, os.path.dirname(os.path.abspath(path))


def source_inputs(view: GraphView, sources: list[str]) -> list[str | None]:
    """The graph input behind each source: the token-id input of an embedding lookup, the source
    itself if it is a graph input, else None."""
    looked_up = {out: token_input for _, _, token_input, _, out in _embedding_lookups(view)}
    return [looked_up.get(s, s if s in view.graph_inputs else None) for s in sources]


# -- analyze -------------------------------------------------------------------------------------
INDEX_ROUTING_OPS = ("Cast", "Reshape", "Unsqueeze", "Squeeze", "Identity", "Flatten")


def _integer_input_origins(view: GraphView) -> dict[str, str]:
    """Tensor -> the integer graph input it is a cast or reshape of (token ids and their views)."""
    origin = {i: i for i in view.graph_inputs if not view.is_float(i)}
    for n in view.nodes:
        if n.op_type in INDEX_ROUTING_OPS:
            feeding = next((origin[t] for t in n.input if t in origin), None)
            if feeding is not None:
                origin.update((o, feeding) for o in n.output if o)
    return origin


def _embedding_lookups(view: GraphView) -> list[tuple]:
    """(table rows, table, token input, node index, output) of each Gather of a constant float table
    by an integer graph input."""
    origin = _integer_input_origins(view)
    lookups = []
    for k, n in enumerate(view.nodes):
        if n.op_type == "Gather" and len(n.input) == 2 and n.input[1] in origin \
                and view.is_constant(n.input[0]):
            rows = (view.shape(n.input[0]) or [0])[0]
            out = n.output[0]
            if not view.is_float(n.input[0]):  # a quantized table: the source is the dequantized lookup
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
    plan = Plan(view, rules if isinstance(rules, str) else "custom", output, sources, units, path)
    plan.blocked_units = [units[k] for k in sorted(blocked) if on_path(units[k], path0)]
    for k, u in enumerate(units):
        if k in blocked or not on_path(u, path):
            continue
        u.n_relevant_inputs = sum(1 for t in u.inputs if t in path)
        if u.rule == "uniform" and u.n_relevant_inputs < 2:
            u.rule = "gradient"  # a product with one relevance-carrying operand is linear in it
        plan.path_units.append(u)
        problem = _rule_problem(view, u)
        if problem:
            plan.problems.append(problem)
    return plan


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
    if u.rule == "identity" and u.n_relevant_inputs != 1:
        return (f"{node_label(node)}: the identity rule needs an elementwise function of one "
                f"relevance-carrying tensor; this op has {u.n_relevant_inputs}")
    if u.rule == "constant_std" and node.op_type not in NORM_VJPS:
        return f"{node_label(node)}: rule constant_std applies to normalization ops only"
    return None


# -- emit backward -------------------------------------------------------------------------------
def emit_backward(plan: Plan, b: Builder, seed_gradient: str, wanted: list[str]) -> dict[str, str]:
    """Reverse-mode pass over the path units; returns the gradient of each wanted tensor."""
    view = b.view
    pending: dict[str, list[str]] = {plan.output: [seed_gradient]}
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
            grads = rule_function(u.rule)(b, u, gy, wants)
        except (NotImplementedError, ValueError) as exc:
            problems.append(f"{u.describe(view)}: {exc}")
            continue
        for t, g, w in zip(u.inputs, grads, wants):
            if w and g is not None:
                pending.setdefault(t, []).append(g)
    if problems:
        raise UnsupportedOpsError(problems)
    b.scope = "relevance"
    return {t: total(t) for t in wanted}


# -- assemble and save ---------------------------------------------------------------------------
def _sanitize(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_]+", "_", name).strip("_")


def convert(model, output_path=None, *, rules: str | dict = "attnlrp", source=None, output: str | None = None,
            latent=(), seed_input: bool = False, overrides: dict | None = None,
            relevance_only: bool = False) -> onnx.ModelProto:
    """Convert an ONNX model into one that also outputs relevance. See README for the contract.

    relevance_only: drop the original outputs and run the model's head (everything after the last
    position-mixing op) at the explained position only."""
    if isinstance(rules, str) and rules not in RULE_SETS:
        raise LRPError(f"unknown rule set '{rules}'; choose one of: {', '.join(RULE_SETS)}")
    # load
    model, base_dir = load_model(model)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < MIN_OPSET:
        raise LRPError(f"the model uses opset {opset}; lrp-onnx needs opset >= {MIN_OPSET}: re-export it "
                       f"(torch.onnx.export(..., opset_version=17))")
    unfuse_contrib_ops(model)
    view = GraphView.build(model, infer_shapes(model))
    # choose output and sources
    output = output or view.graph_outputs[0]
    if output not in view.graph_outputs:
        raise LRPError(f"--output '{output}' is not a graph output; outputs are: {', '.join(view.graph_outputs)}")
    sources = [source] if isinstance(source, str) else list(source or [])
    known = set(view.producer) | set(view.graph_inputs)
    for s in list(sources) + list(latent):
        if s not in known:
            raise LRPError(f"tensor '{s}' is not in the graph (no node produces it and no input has that name)")
    if not sources:
        sources = default_sources(view, output)
    # canonicalize: in relevance-only mode, compute the head at the explained position only
    explained = output
    position_selected = False
    if relevance_only and not seed_input:
        selected = select_position_before_head(model, view, output)
        if selected is not None:
            explained, position_selected = selected, True
            view = GraphView.build(model, infer_shapes(model))
    output = explained
    # analyze
    plan = analyze(view, rules, output, sources, overrides)
    if plan.problems:
        raise UnsupportedOpsError(plan.problems)
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
        seed = build_seed(b, output, seed_input, position_selected)
    except ValueError as exc:
        raise LRPError(str(exc)) from None
    grads = emit_backward(plan, b, seed.gradient, list(sources) + list(latent))
    relevance_outputs = []
    names = [RELEVANCE_OUTPUT if k == 0 else f"{RELEVANCE_OUTPUT}_{k}" for k in range(len(sources))]
    names += [f"{RELEVANCE_OUTPUT}_{_sanitize(t)}" for t in latent]
    for name, t in zip(names, list(sources) + list(latent)):
        g = grads[t]
        if g is None:
            b.nodes.append(helper.make_node("Mul", [t, b.scalar_like(0.0, t)], [name], name=f"lrp/{name}"))
        else:
            b.nodes.append(helper.make_node("Mul", [t, g], [name], name=f"lrp/{name}"))
        relevance_outputs.append(helper.make_tensor_value_info(name, view.dtype(t) or TensorProto.FLOAT,
                                                               view.shape(t)))
    # the backward reads only forward tensors that onnxruntime's fused forward still computes as they are
    half = any(is_half(view, t) for t in [output] + list(sources))
    rematerialize(b, b.nodes, half)
    # half-precision models: the backward (seed included) runs in fp32, relevance comes out in fp32
    if half:
        promote_backward_to_fp32(b, b.nodes)
        for vi in relevance_outputs + [vi for _, vi in seed.outputs.values()]:
            if vi.type.tensor_type.elem_type in HALF:
                vi.type.tensor_type.elem_type = TensorProto.FLOAT
    # assemble
    g = model.graph
    g.node.extend(b.nodes)
    g.initializer.extend(b.initializers)
    g.initializer.extend(seed.defaults)
    g.input.extend(seed.inputs)
    for tensor, vi in seed.outputs.values():
        g.node.append(helper.make_node("Identity", [tensor], [vi.name], name=f"lrp/{vi.name}"))
        g.output.append(vi)
    g.output.extend(relevance_outputs)
    meta = {
        "version": __version__, "rules": plan.rules, "explained_output": output, "sources": sources,
        "latent": dict(zip(names[len(sources):], latent)), "relevance_outputs": names,
        "source_inputs": dict(zip(names, source_inputs(view, sources))),
        "seed_input": seed_input, "overrides": overrides or {}, "relevance_only": relevance_only,
        "head_at_position": position_selected,
    }
    for p in list(model.metadata_props):
        if p.key == "lrp_onnx":
            model.metadata_props.remove(p)
    model.metadata_props.add(key="lrp_onnx", value=json.dumps(meta))
    if relevance_only:
        drop_outputs(model, keep={o.name for o in g.output if o.name.startswith("lrp_")})
    if output_path is not None:
        save_model(model, output_path, base_dir)
    return model


def save_model(model: onnx.ModelProto, path, base_dir: str | None) -> None:
    """Write atomically. External weights keep their file: in the source directory it is simply
    referenced; elsewhere it is hard-linked (or, across file systems, copied once) beside the output,
    because onnxruntime refuses external data outside the model's directory. Weights are never parsed."""
    path = os.path.abspath(os.fspath(path))
    out_dir = os.path.dirname(path)
    if not os.path.isdir(out_dir):
        raise LRPError(f"{path}: the output directory does not exist")
    if base_dir is not None and os.path.abspath(base_dir) != out_dir:
        for location in _external_locations(model):
            _place_external_file(os.path.join(base_dir, location), os.path.join(out_dir, location))
    fd, tmp = tempfile.mkstemp(prefix=".lrp-", suffix=".onnx", dir=out_dir)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(model.SerializeToString())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _external_locations(model: onnx.ModelProto) -> set[str]:
    locations = set()
    for tensor in _all_tensors(model):
        if tensor.data_location == TensorProto.EXTERNAL:
            for entry in tensor.external_data:
                if entry.key == "location":
                    locations.add(entry.value)
    return locations


def _place_external_file(src: str, dst: str) -> None:
    if not os.path.isfile(src):
        raise LRPError(f"{src}: external weight file of the model is missing")
    if os.path.exists(dst):
        if os.path.samefile(src, dst) or filecmp.cmp(src, dst, shallow=False):
            return
        raise LRPError(f"{dst} exists and differs from the model's weights {src}; "
                       f"write the converted model to another directory")
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    tmp = dst + ".lrp-partial"
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def _all_tensors(model: onnx.ModelProto):
    yield from model.graph.initializer
    for n in model.graph.node:
        for a in n.attribute:
            if a.type == onnx.AttributeProto.TENSOR:
                yield a.t
