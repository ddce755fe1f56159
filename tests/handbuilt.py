"""Small hand-built ONNX graphs for the fused-op forms (opset-23 Attention / RotaryEmbedding,
onnxruntime's GroupQueryAttention / RotaryEmbedding / packed MultiHeadAttention, quantized MatMuls),
each next to an equivalent graph written out in standard ops, and helpers to compare them.

The written-out graphs are built here independently of lrp_onnx/passes/unfuse.py: attention as Einsum,
grouped heads by a Gather on the head axis, RoPE in the rotate-half form with full-width cos/sin,
masks as constant additive initializers (shapes are static: batch 2, sequence 5).

Also the one builder of small one-off graphs (``simple_model``), and the independent gradient
reference of every hand-built graph: central finite differences of the (written-out) graph itself
in float64, run by onnxruntime (``finite_difference_relevance``)."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

import lrp_onnx
from tests.conftest import CPU, cosine, rel_l2  # noqa: F401  (one definition; kept importable from here)

B, S, HID, VOCAB = 2, 5, 16, 6
TARGET, POSITION = np.array([1, 4]), np.array([-1, 2])
LOWEST = np.finfo(np.float32).min


class Graph:
    """A graph under construction: g.op("MatMul", a, b) -> output name; g.init(array) -> name."""

    def __init__(self, inputs, opset=23):
        self.nodes, self.inits, self.inputs, self.k, self.opset = [], [], list(inputs), 0, opset

    def init(self, value, dtype=np.float32):
        self.k += 1
        name = f"c{self.k}"
        self.inits.append(numpy_helper.from_array(np.asarray(value, dtype), name))
        return name

    def op(self, op_type, *inputs, n_out=1, domain="", **attrs):
        self.k += 1
        outs = [f"t{self.k}_{i}" for i in range(n_out)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, name=f"n{self.k}_{op_type}",
                                           domain=domain, **attrs))
        return outs[0] if n_out == 1 else outs

    def model(self, output, output_shape=(B, S, VOCAB)):
        self.nodes.append(helper.make_node("Identity", [output], ["logits"], name="logits"))
        graph = helper.make_graph(self.nodes, "g", self.inputs,
                                  [helper.make_tensor_value_info("logits", TensorProto.FLOAT, list(output_shape))],
                                  self.inits)
        opsets = [helper.make_opsetid("", self.opset), helper.make_opsetid("com.microsoft", 1)]
        model = helper.make_model(graph, opset_imports=opsets, ir_version=10)
        return model


def float_input(name="x", shape=(B, S, HID)):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, list(shape))


def weights(seed, *shape):
    return (np.random.default_rng(seed).standard_normal(shape) * 0.4).astype(np.float32)


def ort_run(model, feeds, output="logits"):
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    from lrp_onnx.run.session import input_defaults

    return session.run([output], {**input_defaults(session), **feeds})[0]  # -1 for a converted model's lrp_target


def reference_run(model, feeds):
    from onnx.reference import ReferenceEvaluator

    return ReferenceEvaluator(model).run(["logits"], feeds)[0]


def relevance(model, rules, feeds, **options):
    converted = lrp_onnx.convert(model, rules=rules, source="x", **options)
    for n in converted.graph.node:
        assert not n.op_type.endswith("Grad"), n.op_type
    explainer = lrp_onnx.Explainer.from_model(converted, providers=CPU)
    result = explainer.run(target=TARGET, position=POSITION, **feeds)
    forward = ort_run(converted, feeds)
    return result, forward


def simple_model(nodes, inputs, outputs, initializers=(), opset=17, domains=()):
    """A model from nodes; inputs/outputs: [(name, shape)] float32 (or (name, shape, elem_type));
    initializers: [(name, array)] (float arrays stored as float32, others as they are)."""
    def info(spec):
        name, shape, *elem = spec
        return helper.make_tensor_value_info(name, elem[0] if elem else TensorProto.FLOAT, list(shape))

    def array(v):
        v = np.asarray(v)
        return v.astype(np.float32) if v.dtype.kind == "f" else v

    graph = helper.make_graph(list(nodes), "g", [info(i) for i in inputs], [info(o) for o in outputs],
                              [numpy_helper.from_array(array(v), k) for k, v in initializers])
    opsets = [helper.make_opsetid("", opset)] + [helper.make_opsetid(d, 1) for d in domains]
    return helper.make_model(graph, opset_imports=opsets)


# -- the independent gradient reference: finite differences of the graph in float64 --------------------
def to_float64(model):
    """A copy of `model` computing in float64: float initializers, graph inputs/outputs, value infos,
    Cast targets and Constant values. Only for the standard ops written-out graphs use."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    for i, t in enumerate(g.initializer):
        if t.data_type == TensorProto.FLOAT:
            g.initializer[i].CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float64), t.name))
    for v in list(g.input) + list(g.output) + list(g.value_info):
        if v.type.tensor_type.elem_type == TensorProto.FLOAT:
            v.type.tensor_type.elem_type = TensorProto.DOUBLE
    for n in g.node:
        for a in n.attribute:
            if n.op_type == "Cast" and a.name == "to" and a.i == TensorProto.FLOAT:
                a.i = TensorProto.DOUBLE
            if n.op_type == "Constant" and a.name == "value" and a.t.data_type == TensorProto.FLOAT:
                a.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(a.t).astype(np.float64), a.t.name))
    return m


def finite_difference_relevance(model, feeds, source="x", target=TARGET, position=POSITION, eps=1e-5,
                                output="logits"):
    """x * d(sum_b output[b, position[b], target[b]])/dx by central differences of `model` run in
    float64 by onnxruntime: the gradient-mode relevance, computed with nothing from lrp_onnx."""
    session = ort.InferenceSession(to_float64(model).SerializeToString(), providers=["CPUExecutionProvider"])
    fixed = {k: np.asarray(v, np.float64) if np.asarray(v).dtype == np.float32 else v
             for k, v in feeds.items() if k != source}
    x = np.asarray(feeds[source], np.float64)
    rows = np.arange(x.shape[0])

    def f(value):
        out = session.run([output], {**fixed, source: value})[0]
        return out[rows, position, target].sum()

    grad = np.zeros_like(x)
    flat, g = x.reshape(-1), grad.reshape(-1)
    for i in range(flat.size):
        keep = flat[i]
        flat[i] = keep + eps
        up = f(x)
        flat[i] = keep - eps
        down = f(x)
        flat[i] = keep
        g[i] = (up - down) / (2 * eps)
    return x * grad


# -- written-out building blocks (standard ops only) -----------------------------------------------
def heads_first(g, t, heads):
    """[B, S, heads*d] -> [B, heads, S, d]."""
    return g.op("Transpose", g.op("Reshape", t, g.init([B, S, heads, -1], np.int64)), perm=[0, 2, 1, 3])


def heads_last(g, t):
    return g.op("Reshape", g.op("Transpose", t, perm=[0, 2, 1, 3]), g.init([B, S, -1], np.int64))


def written_attention(g, q, k, v, scale, bias=None, groups=1, softcap=0.0):
    """q [B, H, S, d], k/v [B, H/groups, S, d]: softmax(q·kᵀ·scale (+bias)) v, products as Einsum,
    each key/value head serving `groups` query heads in a row (a Gather on the head axis)."""
    if groups > 1:
        kv_heads = 4 // groups  # the tests use 4 query heads
        index = g.init(np.repeat(np.arange(kv_heads), groups), np.int64)
        k, v = g.op("Gather", k, index, axis=1), g.op("Gather", v, index, axis=1)
    scores = g.op("Mul", g.op("Einsum", q, k, equation="bhqd,bhkd->bhqk"), g.init(scale))
    if softcap:
        scores = g.op("Mul", g.op("Tanh", g.op("Div", scores, g.init(softcap))), g.init(softcap))
    if bias is not None:
        scores = g.op("Add", scores, bias)
    probs = g.op("Softmax", scores, axis=-1)
    return g.op("Einsum", probs, v, equation="bhqk,bhkd->bhqd")


def rope_tables(positions, rotary_dim, base=100.0):
    """cos, sin [..., rotary_dim/2] for integer positions."""
    inv = 1.0 / base ** (np.arange(0, rotary_dim, 2, dtype=np.float64) / rotary_dim)
    angles = np.asarray(positions, np.float64)[..., None] * inv
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def written_rope(g, x, cos, sin, interleaved, rotary_dim, head_size, seq_axis_shape):
    """x [..., head_size] with cos/sin [..., rotary_dim/2] constants already broadcastable to x[..., :r/2]:
    HF's rotate-half form x*cos_full + rotate_half(x)*sin_full (interleaved: GPT-J's pairwise form,
    as a constant permutation matrix)."""
    r = rotary_dim
    half = r // 2
    if interleaved:
        cos_full, sin_full = np.repeat(cos, 2, axis=-1), np.repeat(sin, 2, axis=-1)
        rot = np.zeros((r, r), np.float32)  # rotate_every_two: out[2i] = -x[2i+1], out[2i+1] = x[2i]
        for i in range(half):
            rot[2 * i + 1, 2 * i] = -1.0
            rot[2 * i, 2 * i + 1] = 1.0
    else:
        cos_full, sin_full = np.concatenate([cos, cos], -1), np.concatenate([sin, sin], -1)
        rot = np.zeros((r, r), np.float32)  # rotate_half: out[:h] = -x[h:], out[h:] = x[:h]
        for i in range(half):
            rot[half + i, i] = -1.0
            rot[i, half + i] = 1.0
    if r < head_size:
        x_rot = g.op("Slice", x, g.init([0], np.int64), g.init([r], np.int64), g.init([-1], np.int64))
        x_pass = g.op("Slice", x, g.init([r], np.int64), g.init([head_size], np.int64), g.init([-1], np.int64))
    else:
        x_rot = x
    out = g.op("Add", g.op("Mul", x_rot, g.init(cos_full)), g.op("Mul", g.op("MatMul", x_rot, g.init(rot)),
                                                                  g.init(sin_full)))
    if r < head_size:
        out = g.op("Concat", out, x_pass, axis=-1)
    return out


def relevance_path_nodes(model, source, output):
    """Names of the nodes on a float path from tensor `source` to graph output `output`, from the graph
    alone (onnx shape inference for the element types): reached from the source through float tensors,
    and reaching the output."""
    inferred = onnx.shape_inference.infer_shapes(model)
    g = inferred.graph
    types = {v.name: v.type.tensor_type.elem_type for v in list(g.value_info) + list(g.output) + list(g.input)}
    floats = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.BFLOAT16}
    reached, forward = {source}, set()
    for n in g.node:  # ONNX nodes are in topological order
        if any(i in reached for i in n.input):
            outs = [o for o in n.output if types.get(o) in floats]
            if outs:
                forward.add(n.name)
                reached.update(outs)
    needed, backward = {output}, set()
    for n in reversed(g.node):
        if any(o in needed for o in n.output):
            backward.add(n.name)
            needed.update(n.input)
    return forward & backward
