"""Unfusing: rewrite onnxruntime's fused transformer ops into standard ONNX ops before analysis.

`EmbedLayerNormalization` hides the word-embedding lookup (the relevance source) and
`Attention` / `MultiHeadAttention` hide Q·Kᵀ, the softmax and A·V (where AttnLRP's uniform rule and CP-LRP's constant
probabilities apply). Written out, every rule applies as it does to the exporter's own graph, and
the relevance equals the unfused model's. Other fused ops (SkipLayerNormalization, BiasGelu,
FastGelu, QuickGelu, FusedMatMul, SimplifiedLayerNormalization) keep their fused forward and have
their own VJPs.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .errors import LRPError
from .graph import attr, node_label

MS = "com.microsoft"


class _Emitter:
    def __init__(self, model: onnx.ModelProto, prefix: str, known_ranks: dict, shapes: dict):
        self.model, self.prefix, self.nodes, self.k = model, prefix, [], 0
        self.known_ranks = known_ranks  # outputs of ops unfused earlier in the pass, rank fixed by their spec
        self.shapes = shapes  # tensor -> ValueInfoProto, inferred once on the model before the pass

    def name(self, hint):
        self.k += 1
        return f"{self.prefix}/{hint}_{self.k}"

    def op(self, op_type, inputs, out=None, **attrs):
        out = out or self.name(op_type)
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=self.name(op_type + "_node"), **attrs))
        return out

    def const(self, value, dtype=None):
        arr = np.asarray(value, dtype=dtype)
        name = self.name("const")
        self.model.graph.initializer.append(numpy_helper.from_array(arr, name))
        return name


def _dims(model: onnx.ModelProto, name: str):
    for t in model.graph.initializer:
        if t.name == name:
            return list(t.dims)
    return None


def _embed_layer_norm(model, node, e: _Emitter):
    inputs = list(node.input) + [""] * (9 - len(node.input))
    ids, segment_ids, word, position, segment, gamma, beta, mask, position_ids = inputs[:9]
    total = e.op("Gather", [word, ids], axis=0)
    if position_ids:
        pos_index = position_ids
    else:
        length = e.op("Gather", [e.op("Shape", [ids]), e.const(1, np.int64)], axis=0)
        pos_index = e.op("Unsqueeze", [e.op("Range", [e.const(0, np.int64), length, e.const(1, np.int64)]),
                                       e.const([0], np.int64)])
    total = e.op("Add", [total, e.op("Gather", [position, pos_index], axis=0)])
    if segment_ids and segment:
        total = e.op("Add", [total, e.op("Gather", [segment, segment_ids], axis=0)])
    outputs = list(node.output) + [""] * (3 - len(node.output))
    e.op("LayerNormalization", [total, gamma, beta], out=outputs[0], axis=-1, epsilon=attr(node, "epsilon", 1e-12))
    if outputs[1]:
        e.known_ranks[outputs[1]] = 1  # mask_index: valid length per row
        if not mask:
            raise LRPError(f"{node_label(node)}: a mask_index output without a mask input is not supported")
        e.op("Cast", [e.op("ReduceSum", [mask, e.const([1], np.int64)], keepdims=0)], out=outputs[1],
             to=TensorProto.INT32)
    if outputs[2]:
        e.op("Identity", [total], out=outputs[2])


def _attention(model, node, e: _Emitter):
    """com.microsoft Attention: one packed QKV projection of the input, then attention."""
    inputs = list(node.input) + [""] * (7 - len(node.input))
    x, weights, bias, mask_index, past, attention_bias = inputs[:6]
    if past or attr(node, "do_rotary", 0) or len(node.output) > 1 and node.output[1]:
        raise LRPError(f"{node_label(node)}: Attention with a KV cache or rotary is not supported for "
                       f"attribution; export without past key/values")
    wdims = _dims(model, weights)
    if wdims is None:
        raise LRPError(f"{node_label(node)}: the Attention weights must be an initializer")
    sizes = attr(node, "qkv_hidden_sizes") or [wdims[1] // 3] * 3
    qkv = e.op("MatMul", [x, weights])
    if bias:
        qkv = e.op("Add", [qkv, bias])
    q, k, v = (e.name("q"), e.name("k"), e.name("v"))
    e.nodes.append(helper.make_node("Split", [qkv, e.const(sizes, np.int64)], [q, k, v], axis=-1,
                                    name=e.name("Split_node")))
    _scaled_dot_product(model, node, e, q, k, v, sizes, mask_index, attention_bias)


def _multi_head_attention(model, node, e: _Emitter):
    """com.microsoft MultiHeadAttention with separate [batch, seq, hidden] query, key and value."""
    inputs = list(node.input) + [""] * (8 - len(node.input))
    q, k, v, bias, key_padding_mask, attention_bias, past_key, past_value = inputs[:8]
    if past_key or past_value or any(node.output[1:]):
        raise LRPError(f"{node_label(node)}: MultiHeadAttention with a KV cache is not supported for "
                       f"attribution; export without past key/values")
    if not k or not v or _rank_of(e, k) != 3:
        raise LRPError(f"{node_label(node)}: only unpacked [batch, sequence, hidden] query/key/value are "
                       f"supported")
    sizes = [_last_dim(e, t) for t in (q, k, v)]
    if bias:
        offsets = np.cumsum([0] + sizes)
        parts = []
        for t, start, end in zip((q, k, v), offsets[:-1], offsets[1:]):
            piece = e.op("Slice", [bias, e.const([start], np.int64), e.const([end], np.int64)])
            parts.append(e.op("Add", [t, piece]))
        q, k, v = parts
    _scaled_dot_product(model, node, e, q, k, v, sizes, key_padding_mask, attention_bias)


def _scaled_dot_product(model, node, e: _Emitter, q, k, v, sizes, mask_index, attention_bias):
    """softmax(q kᵀ * scale + bias + mask) v over heads, written out, into node.output[0]."""
    heads = attr(node, "num_heads")
    head_size = sizes[0] // heads
    scale = attr(node, "scale", 0.0) or 1.0 / np.sqrt(head_size)

    def heads_first(t, size, perm):
        shaped = e.op("Reshape", [t, e.const([0, 0, heads, size // heads], np.int64)])
        return e.op("Transpose", [shaped], perm=perm)

    q = heads_first(q, sizes[0], [0, 2, 1, 3])
    k = heads_first(k, sizes[1], [0, 2, 3, 1])
    v = heads_first(v, sizes[2], [0, 2, 1, 3])
    scores = e.op("Mul", [e.op("MatMul", [q, k]), e.const(np.float32(scale))])
    if attention_bias:
        scores = e.op("Add", [scores, attention_bias])
    filter_value = e.const(np.float32(attr(node, "mask_filter_value", -10000.0)))
    zero = e.const(np.float32(0.0))
    if mask_index:
        scores = e.op("Add", [scores, _additive_mask(model, node, e, mask_index, k, filter_value, zero)])
    if attr(node, "unidirectional", 0):
        ones = e.op("ConstantOfShape", [e.op("Slice", [e.op("Shape", [scores]), e.const([2], np.int64),
                                                        e.const([4], np.int64)])],
                    value=helper.make_tensor("value", TensorProto.FLOAT, [1], [1.0]))
        causal = e.op("Cast", [e.op("Trilu", [ones], upper=0)], to=TensorProto.BOOL)
        scores = e.op("Add", [scores, e.op("Where", [causal, zero, filter_value])])
    probs = e.op("Softmax", [scores], axis=-1)
    context = e.op("Transpose", [e.op("MatMul", [probs, v])], perm=[0, 2, 1, 3])
    e.op("Reshape", [context, e.const([0, 0, sizes[2]], np.int64)], out=node.output[0])


def _additive_mask(model, node, e, mask_index, k, filter_value, zero):
    """0 where a key may be attended, mask_filter_value elsewhere, broadcastable to the scores."""
    rank = _rank_of(e, mask_index)
    if rank == 1:  # end position (valid length) per row, right padding
        length = e.op("Gather", [e.op("Shape", [k]), e.const(3, np.int64)], axis=0)
        positions = e.op("Range", [e.const(0, np.int64), length, e.const(1, np.int64)])
        ends = e.op("Unsqueeze", [e.op("Cast", [mask_index], to=TensorProto.INT64), e.const([1], np.int64)])
        valid = e.op("Less", [e.op("Unsqueeze", [positions, e.const([0], np.int64)]), ends])
        axes = [1, 2]
    elif rank == 2:  # raw 0/1 mask [batch, keys]
        valid, axes = e.op("Greater", [mask_index, e.const(np.zeros((), _np_dtype(e, mask_index)))]), [1, 2]
    elif rank == 3:  # raw mask [batch, queries, keys]
        valid, axes = e.op("Greater", [mask_index, e.const(np.zeros((), _np_dtype(e, mask_index)))]), [1]
    else:
        raise LRPError(f"{node_label(node)}: mask_index of rank {rank} is not supported")
    return e.op("Unsqueeze", [e.op("Where", [valid, zero, filter_value]), e.const(axes, np.int64)])


def _rank_of(e: _Emitter, name: str) -> int:
    if name in e.known_ranks:
        return e.known_ranks[name]
    vi = e.shapes.get(name)
    if vi is not None and vi.type.tensor_type.HasField("shape"):
        return len(vi.type.tensor_type.shape.dim)
    raise LRPError(f"cannot tell the rank of '{name}' (shape inference did not reach it)")


def _last_dim(e: _Emitter, name: str) -> int:
    dims = _dims(e.model, name)
    if dims is None:
        vi = e.shapes.get(name)
        last = vi.type.tensor_type.shape.dim[-1] if vi is not None and vi.type.tensor_type.shape.dim else None
        if last is None or not last.HasField("dim_value"):
            raise LRPError(f"the hidden size of '{name}' must be static")
        return last.dim_value
    return dims[-1]


def _np_dtype(e: _Emitter, name: str):
    vi = e.shapes.get(name)
    elem = vi.type.tensor_type.elem_type if vi is not None else TensorProto.INT32
    return helper.tensor_dtype_to_np_dtype(elem)


UNFUSERS = {"EmbedLayerNormalization": _embed_layer_norm, "Attention": _attention,
            "MultiHeadAttention": _multi_head_attention}


def unfuse_contrib_ops(model: onnx.ModelProto) -> int:
    """Rewrite the fused ops in place (the model is the pipeline's private copy); return how many."""
    if not any(n.domain == MS and n.op_type in UNFUSERS for n in model.graph.node):
        return 0
    from .shapes import infer_shapes

    inferred = infer_shapes(model)
    shapes = {vi.name: vi for vi in (list(inferred.graph.value_info) + list(inferred.graph.input)
                                     if inferred is not None else [])}
    rewritten, count, known_ranks = [], 0, {}
    for i, node in enumerate(model.graph.node):
        if node.domain == MS and node.op_type in UNFUSERS:
            e = _Emitter(model, f"lrp/unfused/{node.name or node.op_type + str(i)}", known_ranks, shapes)
            UNFUSERS[node.op_type](model, node, e)
            rewritten.extend(e.nodes)
            count += 1
        else:
            rewritten.append(node)
    del model.graph.node[:]
    model.graph.node.extend(rewritten)
    return count
