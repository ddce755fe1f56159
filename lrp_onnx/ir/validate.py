"""Validation of an input graph before any analysis: graph-structure errors named as such (no outputs,
dangling inputs, duplicate names, cycles), then onnx's checker with shape inference, run on a
weight-free copy (external weights are never opened)."""
from __future__ import annotations

import os

import onnx
from onnx import TensorProto, helper

from ..errors import first_line, LRPError
from .graph import constant_table_lookup, has_subgraph, node_label, subgraphs


def check_graph(model: onnx.ModelProto, label: str) -> None:
    g = model.graph
    if not g.output:
        raise LRPError(f"{label}: the graph has no outputs; nothing to explain")
    known = {}  # tensor -> what defines it
    for i in g.input:
        known.setdefault(i.name, f"graph input '{i.name}'")
    for t in g.initializer:
        known.setdefault(t.name, f"initializer '{t.name}'")
    names = [o.name for o in g.output]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise LRPError(f"{label}: graph error: duplicate graph output name '{duplicates[0]}'")
    producer = {}
    for n in g.node:
        for o in n.output:
            if not o:
                continue
            if o in producer:
                raise LRPError(f"{label}: graph error: tensor '{o}' is produced twice, by node "
                               f"{node_label(producer[o])} and by node {node_label(n)}")
            if o in known:
                raise LRPError(f"{label}: graph error: node {node_label(n)} writes '{o}', which is already "
                               f"the {known[o]}")
            producer[o] = n
    for n in g.node:
        for t in n.input:
            if t and t not in producer and t not in known:
                raise LRPError(f"{label}: graph error: node {node_label(n)} reads '{t}', which no node, "
                               f"graph input or initializer defines (a dangling input)")
    for o in names:
        if o not in producer and o not in known:
            raise LRPError(f"{label}: graph error: graph output '{o}' is not produced by any node")
    _check_acyclic(g, producer, label)
    _run_checker(model, label)


# -- what onnxruntime refuses at load time: declared sizes that cannot exist, wrong input types ---------
_INT64_MAX = 2 ** 63 - 1
_PACKED_BITS = {getattr(TensorProto, n): 4 for n in ("INT4", "UINT4", "FLOAT4E2M1") if hasattr(TensorProto, n)}


def check_declared_sizes(model: onnx.ModelProto, base_dir: str | None, label: str) -> None:
    """Declared shapes whose element count no index type holds (a product of dims beyond int64: every
    shape computation on them overflows, so onnxruntime refuses the converted graph), and initializers
    whose data does not match their declared shape (e.g. 16 x 1e12 elements and no data; external data
    checked by its declared length and its file's size, never read)."""
    g = model.graph
    for kind, infos in (("graph input", g.input), ("graph output", g.output), ("value_info", g.value_info)):
        check_element_counts(((vi.name, [d.dim_value if d.HasField("dim_value") else None
                                         for d in vi.type.tensor_type.shape.dim]) for vi in infos), label, kind)
    for t in g.initializer:
        count = _elements(t)
        if t.data_type in (TensorProto.STRING, TensorProto.UNDEFINED):
            continue
        bits = _PACKED_BITS.get(t.data_type)
        size = (count * bits + 7) // 8 if bits else count * helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
        if t.data_location == TensorProto.EXTERNAL:
            entries = {e.key: e.value for e in t.external_data}
            length = entries.get("length")
            if length is not None and length.isdigit() and int(length) != size:
                raise LRPError(f"{label}: initializer '{t.name}' declares {list(t.dims)} ({size} bytes) but its "
                               f"external data has length {length}")
            if base_dir is not None and entries.get("location"):
                path = os.path.join(base_dir, entries["location"])
                offset = int(entries["offset"]) if entries.get("offset", "").isdigit() else 0
                if os.path.isfile(path) and os.path.getsize(path) < offset + size:
                    raise LRPError(f"{label}: initializer '{t.name}' declares {list(t.dims)} ({size} bytes from "
                                   f"offset {offset}) but its file {entries['location']} holds "
                                   f"{os.path.getsize(path)} bytes")
            continue
        if t.HasField("raw_data"):
            held, expected, unit = len(t.raw_data), size, "bytes"
        else:  # typed fields: one value per element (two for complex; 4-bit types: two elements a value)
            held, unit = len(getattr(t, helper.tensor_dtype_to_field(t.data_type))), "values"
            expected = (count + 1) // 2 if bits else 2 * count if t.data_type in (
                TensorProto.COMPLEX64, TensorProto.COMPLEX128) else count
        if held != expected:
            raise LRPError(f"{label}: initializer '{t.name}' declares shape {list(t.dims)} ({count} elements) but "
                           f"holds {held} {unit} of data ({expected} expected); onnxruntime refuses it")


def check_element_counts(shapes, label: str, kind: str = "tensor") -> None:
    """(name, dims) pairs: refused where the known dims' product exceeds int64 (declared directly, or
    inferred from declared sizes): every shape computation on such a tensor overflows."""
    for name, dims in shapes:
        count = 1
        for d in dims or ():
            count *= d if isinstance(d, int) and d > 0 else 1
        if count > _INT64_MAX:
            raise LRPError(f"{label}: {kind} '{name}' has shape {list(dims)}: {count:.3g} elements, more than int64 "
                           f"can count; onnxruntime refuses the shape computations on it")


def check_input_types(model: onnx.ModelProto, dtype, label: str, nodes: set | None = None) -> None:
    """Every input of a standard op (of the main graph; those named in `nodes` if given) has a type its
    schema allows, as onnxruntime checks at load time (e.g. a Gather whose indices are float).
    `dtype(name)` -> element type or None (then unchecked)."""
    opset = _opset(model)
    names = {v: f"tensor({TensorProto.DataType.Name(v).lower()})" for v in TensorProto.DataType.values()}
    for n in model.graph.node:
        if n.domain not in ("", "ai.onnx") or not onnx.defs.has(n.op_type) or nodes is not None and n.name not in nodes:
            continue
        try:
            schema = onnx.defs.get_schema(n.op_type, opset)
        except onnx.defs.SchemaError:
            continue
        allowed = {c.type_param_str: set(c.allowed_type_strs) for c in schema.type_constraints}
        formals = list(schema.inputs)
        for k, t in enumerate(n.input):
            if not t or not formals:
                continue
            formal = formals[min(k, len(formals) - 1)]
            if k >= len(formals) and formal.option != onnx.defs.OpSchema.FormalParameterOption.Variadic:
                continue
            types = allowed.get(formal.type_str, {formal.type_str})
            dt = dtype(t)
            if dt and dt in names and names[dt] not in types and any(x.startswith("tensor(") for x in types):
                raise LRPError(f"{label}: node {node_label(n)}: input '{t}' ({formal.name}) is {names[dt]}, which "
                               f"{n.op_type}-{schema.since_version} does not accept (allowed: "
                               f"{', '.join(sorted(x for x in types if x.startswith('tensor(')))}); "
                               f"not a valid ONNX model")


def _check_acyclic(g, producer: dict, label: str) -> None:
    """Kahn's algorithm over node dependencies; what remains lies on (or behind) a cycle."""
    index = {id(n): k for k, n in enumerate(g.node)}
    deps = [{index[id(producer[t])] for t in n.input if t in producer} for n in g.node]
    users = [[] for _ in g.node]
    for k, d in enumerate(deps):
        for p in d:
            users[p].append(k)
    missing = [len(d) for d in deps]
    ready = [k for k, m in enumerate(missing) if m == 0]
    done = 0
    while ready:
        k = ready.pop()
        done += 1
        for u in users[k]:
            missing[u] -= 1
            if missing[u] == 0:
                ready.append(u)
    if done < len(g.node):
        stuck = [k for k, m in enumerate(missing) if m > 0]
        # follow dependencies among the stuck nodes until one repeats: that is a cycle
        seen, k = [], stuck[0]
        while k not in seen:
            seen.append(k)
            k = next(p for p in deps[k] if missing[p] > 0)
        cycle = seen[seen.index(k):]
        raise LRPError(f"{label}: graph error: a cycle through node(s) "
                       + " -> ".join(node_label(g.node[c]) for c in cycle))


def _weight_free_copy(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with its externally stored and large initializers turned into graph inputs of the
    same type and shape: the checker then never opens a weight file, and never serializes hundreds of
    MB of inline weights (1.6 s of a 30-layer conversion). Small initializers stay for it to check."""
    copy = onnx.ModelProto()
    copy.CopyFrom(_without_graph_initializers(model))
    g = copy.graph
    inputs = {i.name for i in g.input}
    for t in model.graph.initializer:
        if t.data_location == TensorProto.EXTERNAL or _elements(t) > 4096:
            if t.name not in inputs:
                g.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
        else:
            g.initializer.append(t)
    # onnxruntime registers a few ops in the ONNX domain that onnx has no schema for
    # (SimplifiedLayerNormalization): checked as ops of an unknown domain, whether they run is
    # onnxruntime's to say (and whether they have a rule, the analysis')
    unknown = False
    for n in g.node:
        if n.domain in ("", "ai.onnx") and not onnx.defs.has(n.op_type):
            n.domain, unknown = "lrp.unchecked", True
    if unknown:
        copy.opset_import.append(helper.make_opsetid("lrp.unchecked", 1))
    if copy.ir_version < 4:
        copy.ir_version = 4
    return copy


def _without_graph_initializers(model: onnx.ModelProto) -> onnx.ModelProto:
    """A rebuild of the model without the main graph's initializers (nothing else is dropped)."""
    light = onnx.ModelProto()
    for holder, source in ((light, model), (light.graph, model.graph)):
        for fd, value in source.ListFields():
            if source is model and fd.name == "graph" or source is model.graph and fd.name == "initializer":
                continue
            if hasattr(value, "extend"):
                getattr(holder, fd.name).extend(value)
            elif hasattr(value, "CopyFrom"):
                getattr(holder, fd.name).CopyFrom(value)
            else:
                setattr(holder, fd.name, value)
    return light


def _elements(t) -> int:
    n = 1
    for d in t.dims:
        n *= int(d)
    return n


def _run_checker(model: onnx.ModelProto, label: str) -> None:
    copy = _weight_free_copy(model)
    try:
        onnx.checker.check_model(copy, full_check=False)
    except onnx.checker.ValidationError as exc:
        first = first_line(exc)
        # a tensor type without a shape is one of unknown rank (the IR spec allows it; onnxruntime runs it)
        if "Field 'shape' of 'type' is required but missing" not in first:
            raise LRPError(f"{label}: not a valid ONNX model (onnx checker: {first[:300]})") from None
    # (no strict shape inference: onnx's own fails on valid models, e.g. in the function body of
    # MeanVarianceNormalization; graph errors are found by check_graph, the rest by onnxruntime)


def check_emitted(model: onnx.ModelProto, original_nodes: set) -> None:
    """Every node the conversion wrote (any node whose name the input model's nodes do not have, inside
    subgraphs too) through onnx's node checker at the model's opsets: a backward node the opset does not
    define (an attribute added in a later opset, a wrong input count) is refused here, naming it, instead
    of being written out for onnxruntime to reject at load time. Ops of other domains are onnxruntime's
    to check; a deprecation notice is not an error."""
    ctx = onnx.checker.C.CheckerContext()
    ctx.ir_version = model.ir_version
    ctx.opset_imports = {o.domain if o.domain != "ai.onnx" else "": o.version for o in model.opset_import}

    def walk(nodes):
        for n in nodes:
            if n.name in original_nodes:
                continue
            if has_subgraph(n):  # its branches' nodes one by one (outer-scope names are not the node checker's)
                for _, g in subgraphs(n):
                    walk(g.node)
                continue
            if n.domain not in ("", "ai.onnx"):
                continue
            try:
                onnx.checker.check_node(n, ctx)
            except onnx.checker.ValidationError as exc:
                first = first_line(exc)
                if "deprecated" in first:
                    continue
                raise LRPError(f"the converted graph is not valid ONNX at {node_label(n)} (onnx checker: "
                               f"{first[:300]}); this is an lrp-onnx bug for this model's opset "
                               f"{_opset(model)}: please report it") from None

    walk(model.graph.node)


def _opset(model) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


# -- index ranges of a model's integer inputs (recorded at conversion, checked by Explainer.run) --------
INDEX_ROUTING_OPS = ("Cast", "Reshape", "Unsqueeze", "Squeeze", "Identity", "Flatten")


def input_limits(view) -> dict:
    """{"inputs": {integer input: rows of the constant table it indexes (ids must lie in [0, rows))},
    "max_length": rows of a constant position table indexed by computed positions, or None}.
    Only tables whose first dimension is static count; several tables by one input: the smallest."""
    origin = {i: i for i in view.graph_inputs if not view.is_float(i)}
    for n in view.nodes:
        if n.op_type in INDEX_ROUTING_OPS:
            feeding = next((origin[t] for t in n.input if t in origin), None)
            if feeding is not None:
                origin.update((o, feeding) for o in n.output if o)
    limits, max_length = {}, None
    for n in view.nodes:
        lookup = constant_table_lookup(view, n)  # a Gather or GatherBlockQuantized on a constant table
        if lookup is None or lookup[2] is None:
            continue
        rows, index = lookup[2], lookup[1]
        if index in origin:
            name = origin[index]
            limits[name] = min(rows, limits.get(name, rows))
        elif view.is_float(n.input[0]) and not view.is_constant(index) and _from_positions(view, index):
            max_length = rows if max_length is None else min(max_length, rows)
    if "position_ids" in limits:  # position_ids = cumsum(mask) - 1 < rows
        max_length = limits["position_ids"] if max_length is None else min(max_length, limits["position_ids"])
    return {"inputs": limits, "max_length": max_length}


def _from_positions(view, tensor: str, depth: int = 8) -> bool:
    """Whether `tensor` is computed by a Range (arange over the sequence), through a few ops."""
    frontier = [(tensor, 0)]
    seen = set()
    while frontier:
        t, d = frontier.pop()
        p = view.producer.get(t)
        if p is None or t in seen or d > depth:
            continue
        seen.add(t)
        node = view.nodes[p]
        if node.op_type == "Range":
            return True
        frontier.extend((i, d + 1) for i in node.input if i and not view.is_constant(i))
    return False
