"""`memory="lean"`: the backward recomputes each attention's scores and probabilities from Q and K
instead of keeping every layer's [batch, heads, L, L] tensors alive from the forward to its backward.

A post-pass over the converted graph (it does not touch rule or VJP code). For every forward Softmax,
the *attention chain* is the forward nodes between the score MatMul(s) (Q @ K^T) and the Softmax
(scale, mask, bias, casts: Add, Sub, Mul, Div, Where, Cast), the Softmax itself and the Casts after it.
When backward nodes (named lrp/...) read tensors of a chain, the chain is cloned for them (outputs
lrp/lean/...), and the clone is anchored to the backward timeline: one input of each score MatMul
becomes Reshape(x, Concat(Shape(x), Slice(Shape(g), 0, 0))) -- the same tensor, no copy, but a data
dependency on a backward tensor g of that layer (an input of the chain's first backward consumer),
so onnxruntime cannot run the clone before the layer's backward starts and cannot merge it with the
forward chain (common-subexpression elimination). The forward chain's [L, L] tensors then die right
after the forward uses them: at most a layer's worth is alive at a time, instead of all layers'.

Cost: one more Q @ K^T and softmax per layer (the attention forward's quadratic part, a few percent of
a layer at 128 tokens, more at long contexts). The recomputed values are bitwise the forward's (same
ops, same inputs, same kernels), so relevance is unchanged.
"""
from __future__ import annotations

import onnx
from onnx import TensorProto, helper

from .cache import SCOPE as CACHE_SCOPE
from .unfuse import SCOPE as UNFUSED_SCOPE

CHAIN_OPS = {"Add", "Sub", "Mul", "Div", "Where", "Cast"}
PREFIX = "lrp/lean/"


# nodes lrp_onnx writes into the forward (the written-out copies of fused ops, the bound cache, the head
# at the explained position, a squeezed class output); every other lrp/ node belongs to the backward
FORWARD_SCOPES = (UNFUSED_SCOPE, CACHE_SCOPE, "lrp/at_position/", "lrp/squeezed/")


def _is_backward(node: onnx.NodeProto) -> bool:
    return node.name.startswith("lrp/") and not node.name.startswith(FORWARD_SCOPES)


def recompute_attention(model: onnx.ModelProto) -> dict:
    """Rewrite `model` in place; return {"chains": found, "recomputed": rewritten, "skipped": [reasons]}."""
    g = model.graph
    nodes = list(g.node)
    producer = {o: i for i, n in enumerate(nodes) for o in n.output if o}
    consumers: dict[str, list[int]] = {}
    for i, n in enumerate(nodes):
        for x in n.input:
            if x:
                consumers.setdefault(x, []).append(i)
    graph_outputs = {o.name for o in g.output}
    report = {"chains": 0, "recomputed": 0, "skipped": []}
    additions: dict[int, list[onnx.NodeProto]] = {}  # insert before node index
    renames: dict[int, dict[str, str]] = {}  # node index -> {old input: new input}
    for sm_index, sm in enumerate(nodes):
        if sm.op_type != "Softmax" or _is_backward(sm) or sm.domain not in ("", "ai.onnx"):
            continue
        chain = _chain(nodes, producer, consumers, sm_index)
        if chain is None:
            continue
        report["chains"] += 1
        chain_tensors = {o for i in chain for o in nodes[i].output if o}
        readers = sorted({c for t in chain_tensors for c in consumers.get(t, []) if _is_backward(nodes[c])})
        if not readers:
            continue
        if chain_tensors & graph_outputs:
            report["skipped"].append(f"{sm.name}: a chain tensor is a graph output")
            continue
        # the anchor: a backward tensor that readers consume and that no reader feeds (no cycle), the
        # earliest produced of those
        downstream = _descendants(nodes, consumers, readers)
        # readers that read nothing else of the backward (e.g. Transpose(P) for P^T @ dO) relay the search
        # to their consumers
        search, stack, seen = [], list(readers), set()
        while stack:
            c = stack.pop()
            if c in seen:
                continue
            seen.add(c)
            search.append(c)
            if not any(x in producer and _is_backward(nodes[producer[x]]) and producer[x] not in seen
                       and x not in chain_tensors for x in nodes[c].input):
                stack += [d for o in nodes[c].output for d in consumers.get(o, [])]
        candidates = sorted({producer[x] for c in search for x in nodes[c].input
                             if x and x not in chain_tensors and x in producer and _is_backward(nodes[producer[x]])
                             and producer[x] not in downstream})
        if not candidates:
            report["skipped"].append(f"{sm.name}: no backward tensor to anchor the recomputation to")
            continue
        first = candidates[0]
        anchor = next(o for o in nodes[first].output if o)
        roots = [i for i in chain if nodes[i].op_type == "MatMul"]
        tag = f"{PREFIX}{sm.name or sm.output[0]}"
        new_nodes, mapping = [], {}
        empty = f"{tag}/anchor_empty"
        new_nodes += [
            helper.make_node("Shape", [anchor], [f"{tag}/anchor_shape"], name=f"{tag}/anchor_shape"),
            helper.make_node("Slice", [f"{tag}/anchor_shape", f"{tag}/zero", f"{tag}/zero"], [empty],
                             name=f"{tag}/anchor_empty"),
        ]
        g.initializer.append(helper.make_tensor(f"{tag}/zero", TensorProto.INT64, [1], [0]))
        for r in roots:
            x = nodes[r].input[1]
            late = f"{tag}/late/{x}"
            if x in mapping:
                continue
            new_nodes += [
                helper.make_node("Shape", [x], [f"{late}/shape"], name=f"{late}/shape"),
                helper.make_node("Concat", [f"{late}/shape", empty], [f"{late}/anchored_shape"], axis=0,
                                 name=f"{late}/anchored_shape"),
                helper.make_node("Reshape", [x, f"{late}/anchored_shape"], [late], name=f"{late}/reshape"),
            ]
            mapping[x] = late
        for i in chain:  # chain is in graph order
            n = nodes[i]
            clone = onnx.NodeProto()
            clone.CopyFrom(n)
            clone.name = f"{tag}/{n.name or n.output[0]}"
            for k, x in enumerate(clone.input):
                if x in chain_tensors:
                    clone.input[k] = f"{PREFIX}{x}"
                elif i in roots and k == 1 and x in mapping:
                    clone.input[k] = mapping[x]
            for k, o in enumerate(clone.output):
                if o:
                    clone.output[k] = f"{PREFIX}{o}"
            new_nodes.append(clone)
        additions.setdefault(first, []).extend(new_nodes)  # after the anchor's producer
        for c in readers:
            renames.setdefault(c, {}).update({t: f"{PREFIX}{t}" for t in chain_tensors})
        report["recomputed"] += 1
    if not additions:
        return report
    for i, n in enumerate(nodes):
        for k, x in enumerate(n.input):
            new = renames.get(i, {}).get(x)
            if new is not None:
                n.input[k] = new
    ordered = []
    for i, n in enumerate(nodes):
        ordered.append(n)
        ordered.extend(additions.get(i, []))
    out = _toposort(ordered, {i.name for i in g.input} | {t.name for t in g.initializer})
    del g.node[:]
    g.node.extend(out)
    _copy_value_info(g)
    return report


def _descendants(nodes, consumers, start) -> set[int]:
    seen, stack = set(), list(start)
    while stack:
        i = stack.pop()
        if i in seen:
            continue
        seen.add(i)
        for o in nodes[i].output:
            stack += consumers.get(o, [])
    return seen


def _toposort(nodes, available: set[str]) -> list:
    """A topological order of `nodes` that keeps their given order where it can (Kahn's algorithm,
    lowest position first). Subgraph inputs from the outer scope count as dependencies too."""
    import heapq

    def needs(n):
        out = {x for x in n.input if x}
        for a in n.attribute:
            for sub in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
                inner = {o for m in sub.node for o in m.output} | {i.name for i in sub.input} | \
                    {t.name for t in sub.initializer}
                out |= {x for m in sub.node for x in m.input if x and x not in inner}
        return out

    producer = {o: i for i, n in enumerate(nodes) for o in n.output if o}
    waiting, dependents = [], {}
    for i, n in enumerate(nodes):
        deps = {producer[x] for x in needs(n) if x in producer and producer[x] != i}
        waiting.append(len(deps))
        for d in deps:
            dependents.setdefault(d, []).append(i)
    ready = [i for i, w in enumerate(waiting) if w == 0]
    heapq.heapify(ready)
    out = []
    while ready:
        i = heapq.heappop(ready)
        out.append(nodes[i])
        for j in dependents.get(i, []):
            waiting[j] -= 1
            if waiting[j] == 0:
                heapq.heappush(ready, j)
    if len(out) != len(nodes):
        raise RuntimeError("lean: the recomputation made the graph cyclic")  # a bug, never bad input
    return out


def _chain(nodes, producer, consumers, sm_index) -> list[int] | None:
    """Indices (graph order) of the attention chain of the Softmax at `sm_index`, or None."""
    up, stack, roots = set(), [sm_index], []
    while stack:  # forward ancestors through CHAIN_OPS, stopping at (and including) MatMuls
        i = stack.pop()
        if i in up:
            continue
        up.add(i)
        if nodes[i].op_type == "MatMul":
            roots.append(i)
            continue
        for x in nodes[i].input:
            j = producer.get(x)
            if j is not None and not _is_backward(nodes[j]) and nodes[j].domain in ("", "ai.onnx") \
                    and (nodes[j].op_type in CHAIN_OPS or nodes[j].op_type == "MatMul"):
                stack.append(j)
    if not roots:
        return None
    chain, stack = set(), list(roots)
    while stack:  # of those, the descendants of the score MatMul(s): the mask / bias branches stay leaves
        i = stack.pop()
        if i in chain:
            continue
        chain.add(i)
        if i == sm_index:
            continue
        for o in nodes[i].output:
            stack += [c for c in consumers.get(o, []) if c in up]
    if sm_index not in chain:
        return None
    # the Casts after the Softmax (exporters cast the probabilities back to the activation dtype)
    stack = [sm_index]
    while stack:
        i = stack.pop()
        for o in nodes[i].output:
            for c in consumers.get(o, []):
                n = nodes[c]
                if n.op_type == "Cast" and not _is_backward(n) and c not in chain:
                    chain.add(c)
                    stack.append(c)
    return sorted(chain)


def _copy_value_info(g: onnx.GraphProto) -> None:
    """Give each lrp/lean/ clone output the value_info of the tensor it recomputes (when known)."""
    known = {vi.name: vi for vi in g.value_info}
    have = set(known)
    for n in g.node:
        for o in n.output:
            if o.startswith(PREFIX) and o not in have:
                original = known.get(o[len(PREFIX):])
                if original is not None:
                    vi = onnx.ValueInfoProto()
                    vi.CopyFrom(original)
                    vi.name = o
                    g.value_info.append(vi)
                    have.add(o)
