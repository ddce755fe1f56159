"""Unfusing: rewrite fused attention-type ops into standard ONNX ops before analysis.

onnxruntime's `EmbedLayerNormalization` hides the word-embedding lookup (the relevance source);
`Attention`, `MultiHeadAttention` (also packed QKV / KV), `GroupQueryAttention` (no KV cache) and
ONNX's opset-23 `Attention` hide Q·Kᵀ, the softmax and A·V (where AttnLRP's uniform rule and
CP-LRP's constant probabilities apply); `RotaryEmbedding` (ONNX opset 23 and com.microsoft) becomes
Slice/Mul/Sub/Add/Concat on the cos/sin caches (which also makes opset-23 llama exports run in
onnxruntime 1.32, whose RotaryEmbedding kernel refuses them); `FusedGemm` becomes Gemm + activation.
Written out, every rule applies as it does to the exporter's own graph, and the relevance equals the
unfused model's. Other fused ops (SkipLayerNormalization, BiasGelu, FastGelu, QuickGelu, FusedMatMul,
SimplifiedLayerNormalization, RMSNormalization, quantized MatMuls) keep their fused forward and have
their own VJPs.

The written-out copy is what the backward differentiates; the forward keeps a vendor's fused kernel (`refuse`,
onnxruntime's com.microsoft ops; convert(forward="written") opts out):
after the backward is emitted, the fused node is put back to compute its outputs, and the copy is left
computing only what the backward reads (Q, K, the probabilities...), its tail pruned. The converted
model's original outputs are then the original's bit for bit (a written-out attention rounds
differently, and int8/int4 kernels that quantize their input amplify that), at the cost of the copy's
cheap part. A fused node whose copy multiplies by a tensor from outside it (Attention's QKV weights,
FusedGemm's Gemm) stays written out: re-fusing it would repeat that product. Standard ops (ONNX's
Attention and RotaryEmbedding) stay written out: their numbers are the spec's, and the written-out form
runs in runtimes whose kernel for them is missing or refuses the export (onnxruntime 1.32's
RotaryEmbedding on opset-23 llama exports).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..errors import LRPError
from ..ir.graph import attr, node_label

MS = "com.microsoft"
SCOPE = "lrp/unfused/"  # the written-out copies' node and tensor names


class _Emitter:
    def __init__(self, model: onnx.ModelProto, prefix: str, known_ranks: dict, shapes: dict):
        self.model, self.prefix, self.nodes, self.k = model, prefix, [], 0
        self.known_ranks = known_ranks  # outputs of ops unfused earlier in the pass, rank fixed by their spec
        self.known_dims = {}  # tensors written in this pass -> their static last dim
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
        pos_index = _positions(e, e.op("Gather", [e.op("Shape", [ids]), e.const(1, np.int64)], axis=0))
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
    if not k and not v and _rank_of(e, q) == 5:  # packed QKV [batch, seq, heads, 3, head_size]
        q, k, v = _unpack(e, q, 3)
    elif k and not v and _rank_of(e, k) == 5:  # packed KV [batch, kv_seq, heads, 2, head_size]
        k, v = _unpack(e, k, 2)
    if not k or not v or _rank_of(e, k) != 3:
        raise LRPError(f"{node_label(node)}: only [batch, sequence, hidden] query/key/value, packed QKV "
                       f"[batch, sequence, heads, 3, head_size] or packed KV are supported")
    sizes = [_last_dim(e, t) for t in (q, k, v)]
    if bias:
        offsets = np.cumsum([0] + sizes)
        parts = []
        for t, start, end in zip((q, k, v), offsets[:-1], offsets[1:]):
            piece = e.op("Slice", [bias, e.const([start], np.int64), e.const([end], np.int64)])
            parts.append(e.op("Add", [t, piece]))
        q, k, v = parts
    _scaled_dot_product(model, node, e, q, k, v, sizes, key_padding_mask, attention_bias)


def _unpack(e: _Emitter, packed, n):
    """[batch, seq, heads, n, head_size] -> n tensors [batch, seq, heads * head_size]."""
    parts = [e.name("unpacked") for _ in range(n)]
    e.nodes.append(helper.make_node("Split", [packed, e.const([1] * n, np.int64)], parts, axis=3,
                                    name=e.name("Split_node")))
    flat = [e.op("Reshape", [p, e.const([0, 0, -1], np.int64)]) for p in parts]
    heads, size = _static_dim(e, packed, 2), _static_dim(e, packed, 4)
    if heads is not None and size is not None:
        e.known_dims.update({f: heads * size for f in flat})
    for f in flat:
        e.known_ranks[f] = 3
    return flat


def _scaled_dot_product(model, node, e: _Emitter, q, k, v, sizes, mask_index, attention_bias):
    """softmax(q kᵀ * scale + bias + mask) v over heads, written out, into node.output[0]."""
    heads = attr(node, "num_heads")
    scale = attr(node, "scale", 0.0) or 1.0 / np.sqrt(sizes[0] // heads)
    dtype = _np_dtype(e, node.input[0], np.float32)
    filter_value = e.const(np.asarray(attr(node, "mask_filter_value", -10000.0), dtype))
    zero = e.const(np.asarray(0, dtype))
    masks = []  # additive float biases: masked keys get mask_filter_value, not the lowest float
    if attention_bias:
        masks.append(lambda scores: (attention_bias, False))
    if mask_index:
        masks.append(lambda scores: (_additive_mask(model, node, e, mask_index, scores, filter_value, zero), False))
    if attr(node, "unidirectional", 0):
        masks.append(lambda scores: (e.op("Where", [_causal_valid(e, scores), zero, filter_value]), False))
    context = _attend(e, _split_heads(e, q, heads), _split_heads(e, k, heads), _split_heads(e, v, heads),
                      scale, 0.0, masks, dtype)
    _merge_heads(e, context, out=node.output[0])


def _keys_before(e: _Emitter, scores, ends):
    """bool [batch, keys]: key j < ends[b] (right padding); ends [batch] int64."""
    length = e.op("Gather", [e.op("Shape", [scores]), e.const(3, np.int64)], axis=0)
    positions = e.op("Range", [e.const(0, np.int64), length, e.const(1, np.int64)])
    ends = e.op("Unsqueeze", [ends, e.const([1], np.int64)])
    return e.op("Less", [e.op("Unsqueeze", [positions, e.const([0], np.int64)]), ends])


def _additive_mask(model, node, e, mask_index, scores, filter_value, zero):
    """0 where a key may be attended, mask_filter_value elsewhere, broadcastable to the scores."""
    rank = _rank_of(e, mask_index)
    if rank == 1:  # end position (valid length) per row, right padding
        valid = _keys_before(e, scores, e.op("Cast", [mask_index], to=TensorProto.INT64))
        axes = [1, 2]
    elif rank == 2:  # raw 0/1 mask [batch, keys]
        zeros = e.const(np.zeros((), _np_dtype(e, mask_index, np.int32)))
        valid, axes = e.op("Greater", [mask_index, zeros]), [1, 2]
    elif rank == 3:  # raw mask [batch, queries, keys]
        zeros = e.const(np.zeros((), _np_dtype(e, mask_index, np.int32)))
        valid, axes = e.op("Greater", [mask_index, zeros]), [1]
    else:
        raise LRPError(f"{node_label(node)}: mask_index of rank {rank} is not supported")
    return e.op("Unsqueeze", [e.op("Where", [valid, zero, filter_value]), e.const(axes, np.int64)])


def _rank_of(e: _Emitter, name: str) -> int:
    if name in e.known_ranks:
        return e.known_ranks[name]
    dims = _dims(e.model, name)
    if dims is not None:
        return len(dims)
    vi = e.shapes.get(name)
    if vi is not None and vi.type.tensor_type.HasField("shape"):
        return len(vi.type.tensor_type.shape.dim)
    raise LRPError(f"cannot tell the rank of '{name}' (shape inference did not reach it)")


def _last_dim(e: _Emitter, name: str) -> int:
    """The static last dim of `name` (also of tensors written in this pass); raises if it is dynamic."""
    last = e.known_dims[name] if name in e.known_dims else _static_dim(e, name, -1)
    if last is None:
        raise LRPError(f"the hidden size of '{name}' must be static")
    return last


def _np_dtype(e: _Emitter, name: str, default):
    """The numpy dtype of `name` (an initializer's, else the inferred one), `default` if unknown."""
    elem = next((t.data_type for t in e.model.graph.initializer if t.name == name), None)
    if elem is None:
        vi = e.shapes.get(name)
        elem = vi.type.tensor_type.elem_type if vi is not None else None
    return helper.tensor_dtype_to_np_dtype(elem) if elem else default


# -- ONNX opset-23 Attention, RotaryEmbedding; onnxruntime GroupQueryAttention, RotaryEmbedding ----
INT64_MAX = np.iinfo(np.int64).max


def _static_dim(e: _Emitter, name: str, axis: int):
    """A static size of `name` along `axis`, or None."""
    dims = _dims(e.model, name)
    if dims is not None:
        return dims[axis]
    vi = e.shapes.get(name)
    if vi is None or not vi.type.tensor_type.HasField("shape"):
        return None
    dim = vi.type.tensor_type.shape.dim
    if not dim:
        return None
    d = dim[axis]
    return d.dim_value if d.HasField("dim_value") else None


def _present(inputs, k):
    return len(inputs) > k and bool(inputs[k])


def _split_heads(e: _Emitter, t, heads):
    """[batch, seq, heads*size] -> [batch, heads, seq, size]."""
    shaped = e.op("Reshape", [t, e.const([0, 0, heads, -1], np.int64)])
    return e.op("Transpose", [shaped], perm=[0, 2, 1, 3])


def _merge_heads(e: _Emitter, t, out=None):
    """[batch, heads, seq, size] -> [batch, seq, heads*size]."""
    return e.op("Reshape", [e.op("Transpose", [t], perm=[0, 2, 1, 3]), e.const([0, 0, -1], np.int64)], out=out)


def _repeat_heads(e: _Emitter, t, groups):
    """[b, h, s, d] -> [b, h*groups, s, d], each head repeated `groups` times in a row (GQA)."""
    if groups == 1:
        return t
    shape = e.op("Shape", [t])
    lead = e.op("Slice", [shape, e.const([0], np.int64), e.const([2], np.int64)])
    tail = e.op("Slice", [shape, e.const([2], np.int64), e.const([4], np.int64)])
    wide = e.op("Expand", [e.op("Unsqueeze", [t, e.const([2], np.int64)]),
                           e.op("Concat", [lead, e.const([groups], np.int64), tail], axis=0)])
    batch = e.op("Slice", [shape, e.const([0], np.int64), e.const([1], np.int64)])
    return e.op("Reshape", [wide, e.op("Concat", [batch, e.const([-1], np.int64), tail], axis=0)])


def _causal_valid(e: _Emitter, scores, window: int = -1):
    """bool [q, kv]: key j <= query i (top-left aligned), and i - j < window if window >= 0 (onnxruntime's
    local_window_size: the query and the window - 1 keys before it, as its kernel computes)."""
    shape = e.op("Shape", [scores])
    q_len = e.op("Gather", [shape, e.const(2, np.int64)], axis=0)
    kv_len = e.op("Gather", [shape, e.const(3, np.int64)], axis=0)
    zero, one = e.const(0, np.int64), e.const(1, np.int64)
    i = e.op("Unsqueeze", [e.op("Range", [zero, q_len, one]), e.const([1], np.int64)])
    j = e.op("Unsqueeze", [e.op("Range", [zero, kv_len, one]), e.const([0], np.int64)])
    valid = e.op("LessOrEqual", [j, i])
    if window >= 0:
        valid = e.op("And", [valid, e.op("Less", [e.op("Sub", [i, j]), e.const(window, np.int64)])])
    return valid


def _attend(e: _Emitter, q, k, v, scale, softcap, masks, dtype, groups=1):
    """softmax(mask(softcap(q kᵀ * scale))) v on heads-first [b, h, s, d] tensors, written out.

    `masks`: callables scores -> (bool "may attend" tensor or float additive bias, is_bool)."""
    k, v = _repeat_heads(e, k, groups), _repeat_heads(e, v, groups)
    scores = e.op("MatMul", [q, e.op("Transpose", [k], perm=[0, 1, 3, 2])])
    scores = e.op("Mul", [scores, e.const(np.asarray(scale, dtype))])
    if softcap and softcap > 0:  # c * tanh(s / c), before masking (the softcap unit of the analysis)
        c = e.const(np.asarray(softcap, dtype))
        scores = e.op("Mul", [e.op("Tanh", [e.op("Div", [scores, c])]), c])
    for make in masks:
        mask, is_bool = make(scores)
        if is_bool:  # may attend -> 0, else the lowest float (finite: a fully masked row stays finite)
            mask = e.op("Where", [mask, e.const(np.asarray(0, dtype)), e.const(np.asarray(np.finfo(dtype).min, dtype))])
        scores = e.op("Add", [scores, mask])
    probs = e.op("Softmax", [scores], axis=-1)
    return e.op("MatMul", [probs, v])


def _onnx_attention(model, node, e: _Emitter):
    """ai.onnx Attention (opset 23): 3D or 4D q/k/v, GQA, causal, bool or float mask, softcap."""
    inputs = list(node.input)
    q, k, v = inputs[:3]
    mask = inputs[3] if _present(inputs, 3) else ""
    if _present(inputs, 4) or _present(inputs, 5) or _present(inputs, 6):
        raise LRPError(f"{node_label(node)}: Attention with past_key/past_value (a KV cache) or nonpad_kv_seqlen "
                       f"is not supported for attribution; export without a cache")
    if len(node.output) > 3 and node.output[3]:
        raise LRPError(f"{node_label(node)}: the qk_matmul_output output (qk_matmul_output_mode="
                       f"{attr(node, 'qk_matmul_output_mode', 0)}) is not supported")
    if attr(node, "left_window_size", -1) != -1 or attr(node, "right_window_size", -1) != -1:
        raise LRPError(f"{node_label(node)}: Attention with a sliding window is not supported")
    dtype = _np_dtype(e, q, np.float32)
    rank = _rank_of(e, q)
    if rank == 3:
        q_heads, kv_heads = attr(node, "q_num_heads"), attr(node, "kv_num_heads")
        if not q_heads or not kv_heads:
            raise LRPError(f"{node_label(node)}: 3D Attention needs the q_num_heads and kv_num_heads attributes")
        q4, k4, v4 = _split_heads(e, q, q_heads), _split_heads(e, k, kv_heads), _split_heads(e, v, kv_heads)
        head_size = _static_dim(e, q, 2) and _static_dim(e, q, 2) // q_heads
    elif rank == 4:
        q_heads, kv_heads = _static_dim(e, q, 1), _static_dim(e, k, 1)
        q_heads, kv_heads = attr(node, "q_num_heads") or q_heads, attr(node, "kv_num_heads") or kv_heads
        if q_heads is None or kv_heads is None:
            raise LRPError(f"{node_label(node)}: the number of query and key/value heads must be static")
        q4, k4, v4 = q, k, v
        head_size = _static_dim(e, q, 3)
    else:
        raise LRPError(f"{node_label(node)}: Attention inputs of rank {rank} are not supported")
    if q_heads % kv_heads:
        raise LRPError(f"{node_label(node)}: {q_heads} query heads are not a multiple of {kv_heads} key/value heads")
    scale = attr(node, "scale")
    if scale is None:
        if not head_size:
            raise LRPError(f"{node_label(node)}: without a scale attribute the head size must be static")
        scale = 1.0 / np.sqrt(head_size)
    masks = []
    if mask:
        is_bool = _np_dtype(e, mask, np.int32) == np.bool_
        mask_len, kv_len = _static_dim(e, mask, -1), _static_dim(e, k, 1 if rank == 3 else 2)
        if mask_len is not None and kv_len is not None and mask_len != kv_len:
            raise LRPError(f"{node_label(node)}: an attn_mask shorter than the key sequence is not supported")
        masks.append(lambda scores: (mask, is_bool))
    if attr(node, "is_causal", 0):
        masks.append(lambda scores: (_causal_valid(e, scores), True))
    context = _attend(e, q4, k4, v4, scale, attr(node, "softcap", 0.0), masks, dtype, q_heads // kv_heads)
    if rank == 3:
        _merge_heads(e, context, out=node.output[0])
    else:
        e.op("Identity", [context], out=node.output[0])
    _write_present(e, node, k4, v4)


def _write_present(e: _Emitter, node, k4, v4):
    """present_key / present_value (outputs 1, 2) without a cache: the heads-first [b, kv_heads, s, d] key
    and value, written whenever the node names them (an unused one is a harmless dangling Identity)."""
    for t, out in zip((k4, v4), node.output[1:3]):
        if out:
            e.op("Identity", [t], out=out)


def _rotate(e: _Emitter, x, cos, sin, interleaved, rotary_dim, half):
    """RoPE on the last axis of x; cos/sin broadcast against x[..., :rotary_dim/2] (half = rotary_dim/2).
    rotary_dim None: the whole last axis rotates."""
    def piece(t, start, end):
        return e.op("Slice", [t, e.const([start], np.int64), e.const([end], np.int64), e.const([-1], np.int64)])

    rot = x if rotary_dim is None else piece(x, 0, rotary_dim)
    if interleaved:  # pairs (x[2i], x[2i+1])
        pairs = e.op("Reshape", [rot, e.const([0, 0, 0, -1, 2], np.int64)])
        x1, x2 = piece(pairs, 0, 1), piece(pairs, 1, 2)
        cos = e.op("Unsqueeze", [cos, e.const([-1], np.int64)])
        sin = e.op("Unsqueeze", [sin, e.const([-1], np.int64)])
    else:  # halves (x[i], x[i + d/2])
        x1, x2 = piece(rot, 0, half), piece(rot, half, 2 * half)
    real = e.op("Sub", [e.op("Mul", [x1, cos]), e.op("Mul", [x2, sin])])
    imag = e.op("Add", [e.op("Mul", [x1, sin]), e.op("Mul", [x2, cos])])
    out = e.op("Concat", [real, imag], axis=-1)
    if interleaved:
        out = e.op("Reshape", [out, e.const([0, 0, 0, -1], np.int64)])
    if rotary_dim is not None:
        out = e.op("Concat", [out, piece(x, rotary_dim, INT64_MAX)], axis=-1)
    return out


def _rotary_dims(node, e: _Emitter, cos, head_size, whole_by_default=True):
    """(rotary_dim or None for the whole head, half): from the attribute or the cache's last axis.
    With the head size unknown and no attribute the whole head rotates (the RotaryEmbedding specs'
    default), or, with whole_by_default=False (GroupQueryAttention), the caches' width."""
    attr_dim = attr(node, "rotary_embedding_dim", 0)
    half = _static_dim(e, cos, -1)
    if half is None:
        raise LRPError(f"{node_label(node)}: the last axis of the cos/sin caches must be static")
    rotary_dim = attr_dim or 2 * half
    if attr_dim and attr_dim != 2 * half:
        raise LRPError(f"{node_label(node)}: rotary_embedding_dim {attr_dim} does not match the caches "
                       f"(last axis {half})")
    if head_size is not None and rotary_dim == head_size:
        return None, half
    if head_size is None and not attr_dim and whole_by_default:
        return None, half  # the whole head rotates (the spec's default)
    return rotary_dim, half


def _apply_rotary(node, e: _Emitter, xs, cos, sin, cache, head_size, interleaved, heads_axis,
                  whole_by_default=True):
    """RoPE on heads-split tensors xs ([b, heads, s, d]: heads_axis 1; [b, s, heads, d]: 2); cos/sin
    [b or 1, s, r/2] gain the heads axis; the rotary width comes from `cache` (see _rotary_dims)."""
    cos = e.op("Unsqueeze", [cos, e.const([heads_axis], np.int64)])
    sin = e.op("Unsqueeze", [sin, e.const([heads_axis], np.int64)])
    rotary_dim, half = _rotary_dims(node, e, cache, head_size, whole_by_default)
    return [_rotate(e, x, cos, sin, interleaved, rotary_dim, half) for x in xs]


def _rotary_embedding_output(node, e: _Emitter, x, rank, heads, cos, sin, cache):
    """A RotaryEmbedding op's output: x [b, heads, s, d] rotated as is, or [b, s, hidden] split into `heads`,
    rotated and merged back."""
    interleaved = attr(node, "interleaved", 0)
    if rank == 4:
        (out,) = _apply_rotary(node, e, [x], cos, sin, cache, _static_dim(e, x, 3), interleaved, 1)
        e.op("Identity", [out], out=node.output[0])
    else:
        hidden = _static_dim(e, x, 2)
        xh = e.op("Reshape", [x, e.const([0, 0, heads, -1], np.int64)])
        (out,) = _apply_rotary(node, e, [xh], cos, sin, cache, hidden // heads if hidden else None, interleaved, 2)
        e.op("Reshape", [out, e.const([0, 0, -1], np.int64)], out=node.output[0])


def _onnx_rotary_embedding(model, node, e: _Emitter):
    """ai.onnx RotaryEmbedding (opset 23): x [b, heads, s, d] or [b, s, hidden]; caches [b, s, r/2], or
    [max_pos, r/2] indexed by position_ids [b, s]."""
    inputs = list(node.input) + [""] * (4 - len(node.input))
    x, cos, sin, position_ids = inputs[:4]
    if position_ids:
        cos = e.op("Gather", [cos, position_ids], axis=0)
        sin = e.op("Gather", [sin, position_ids], axis=0)
    rank = _rank_of(e, x)
    if rank not in (3, 4):
        raise LRPError(f"{node_label(node)}: RotaryEmbedding on a rank-{rank} input is not supported")
    heads = attr(node, "num_heads")
    if rank == 3 and not heads:
        raise LRPError(f"{node_label(node)}: RotaryEmbedding on a 3D input needs the num_heads attribute")
    _rotary_embedding_output(node, e, x, rank, heads, cos, sin, inputs[1])


def _positions(e: _Emitter, length, offset=None):
    """[1, seq] int64 positions offset + 0..seq-1."""
    zero, one = e.const(0, np.int64), e.const(1, np.int64)
    pos = e.op("Range", [zero, length, one])
    if offset is not None:
        pos = e.op("Add", [pos, offset])
    return e.op("Unsqueeze", [pos, e.const([0], np.int64)])


def _ms_rotary_embedding(model, node, e: _Emitter):
    """com.microsoft RotaryEmbedding: x [b, s, hidden] or [b, heads, s, d]; position_ids [b, s], or one
    offset; caches [max_pos, r/2]."""
    x, position_ids, cos_cache, sin_cache = list(node.input)[:4]
    if attr(node, "is_packed_batching", 0):
        raise LRPError(f"{node_label(node)}: RotaryEmbedding with is_packed_batching is not supported")
    rank = _rank_of(e, x)
    if rank not in (3, 4):
        raise LRPError(f"{node_label(node)}: RotaryEmbedding on a rank-{rank} input is not supported")
    seq_axis = 1 if rank == 3 else 2
    if _rank_of(e, position_ids) == 1:  # an offset: positions offset, offset+1, ...
        length = e.op("Gather", [e.op("Shape", [x]), e.const(seq_axis, np.int64)], axis=0)
        offset = e.op("Cast", [e.op("Squeeze", [position_ids, e.const([0], np.int64)])], to=TensorProto.INT64)
        position_ids = _positions(e, length, offset)
    cos = e.op("Gather", [cos_cache, position_ids], axis=0)  # [b or 1, s, r/2]
    sin = e.op("Gather", [sin_cache, position_ids], axis=0)
    heads = attr(node, "num_heads", 0)
    if rank == 3 and not heads:  # onnxruntime's default: the head size is the caches' rotary width
        hidden, half = _static_dim(e, x, 2), _static_dim(e, cos_cache, -1)
        if attr(node, "rotary_embedding_dim", 0) or not hidden or not half:
            raise LRPError(f"{node_label(node)}: num_heads is needed to rotate this 3D input")
        heads = hidden // (2 * half)
    _rotary_embedding_output(node, e, x, rank, heads, cos, sin, cos_cache)


def _group_query_attention(model, node, e: _Emitter):
    """com.microsoft GroupQueryAttention without a KV cache: causal attention over the valid keys
    (j <= seqlens_k[b]), optional rotary on q and k, optional packed QKV."""
    inputs = list(node.input) + [""] * (12 - len(node.input))
    query, key, value, past_key, past_value, seqlens_k, total_len, cos_cache, sin_cache = inputs[:9]
    position_ids, attention_bias, head_sink = inputs[9:12]
    label = node_label(node)
    if past_key or past_value:
        raise LRPError(f"{label}: GroupQueryAttention with past_key/past_value (a KV cache) is not supported "
                       f"for attribution; export without a cache")
    for name in ("smooth_softmax", "qk_output"):
        if attr(node, name, 0):
            raise LRPError(f"{label}: GroupQueryAttention with {name}={attr(node, name)} is not supported")
    if head_sink:
        raise LRPError(f"{label}: GroupQueryAttention with a head_sink input is not supported")
    heads, kv_heads = attr(node, "num_heads"), attr(node, "kv_num_heads")
    dtype = _np_dtype(e, query, np.float32)
    if bool(key) != bool(value):
        raise LRPError(f"{label}: key and value must both be given, or both absent (packed QKV)")
    if not key:  # packed [b, s, (heads + 2 kv_heads) * d]
        width = _static_dim(e, query, 2)
        if width is None:
            raise LRPError(f"{label}: packed QKV needs a static hidden size")
        d = width // (heads + 2 * kv_heads)
        query, key, value = (e.name("q"), e.name("k"), e.name("v"))
        e.nodes.append(helper.make_node("Split", [inputs[0], e.const([heads * d, kv_heads * d, kv_heads * d],
                                                                     np.int64)],
                                        [query, key, value], axis=-1, name=e.name("Split_node")))
    else:
        width = _static_dim(e, query, 2)
        d = width // heads if width else None
    qh = e.op("Reshape", [query, e.const([0, 0, heads, -1], np.int64)])  # [b, s, heads, d]
    kh = e.op("Reshape", [key, e.const([0, 0, kv_heads, -1], np.int64)])
    vh = e.op("Reshape", [value, e.const([0, 0, kv_heads, -1], np.int64)])
    if attr(node, "do_rotary", 0):
        if position_ids:
            pos = position_ids
        else:  # a prompt without cache: positions 0..s-1
            pos = _positions(e, e.op("Gather", [e.op("Shape", [query]), e.const(1, np.int64)], axis=0))
        cos = e.op("Gather", [cos_cache, pos], axis=0)
        sin = e.op("Gather", [sin_cache, pos], axis=0)
        qh, kh = _apply_rotary(node, e, [qh, kh], cos, sin, cos_cache, d, attr(node, "rotary_interleaved", 0), 2,
                               whole_by_default=False)
    q4, k4, v4 = (e.op("Transpose", [t], perm=[0, 2, 1, 3]) for t in (qh, kh, vh))
    scale = attr(node, "scale", 0.0)
    if not scale:
        if not d:
            raise LRPError(f"{label}: without a scale attribute the head size must be static")
        scale = 1.0 / np.sqrt(d)

    def key_padding(scores):  # key j is valid for row b iff j <= seqlens_k[b]
        ends = e.op("Add", [e.op("Cast", [seqlens_k], to=TensorProto.INT64), e.const(1, np.int64)])
        return e.op("Unsqueeze", [_keys_before(e, scores, ends), e.const([1, 2], np.int64)]), True

    masks = [lambda scores: (_causal_valid(e, scores, attr(node, "local_window_size", -1)), True), key_padding]
    if attention_bias:
        masks.append(lambda scores: (attention_bias, False))
    context = _attend(e, q4, k4, v4, scale, attr(node, "softcap", 0.0), masks, dtype, heads // kv_heads)
    _merge_heads(e, context, out=node.output[0])
    _write_present(e, node, k4, v4)


def _fused_gemm(model, node, e: _Emitter):
    """com.microsoft FusedGemm (onnxruntime's session optimizer): activation(Gemm(...)), written as the two
    ops so the activation gets its own rule."""
    activation = attr(node, "activation", b"")
    activation = activation.decode() if isinstance(activation, bytes) else activation
    gemm_attrs = {k: attr(node, k) for k in ("alpha", "beta", "transA", "transB") if attr(node, k) is not None}
    if activation not in ("Relu", "Tanh", "Sigmoid"):
        raise LRPError(f"{node_label(node)}: FusedGemm with activation '{activation}' is not supported")
    y = e.op("Gemm", list(node.input), **gemm_attrs)
    e.op(activation, [y], out=node.output[0])


UNFUSERS = {(MS, "FusedGemm"): _fused_gemm, (MS, "EmbedLayerNormalization"): _embed_layer_norm, (MS, "Attention"): _attention,
            (MS, "MultiHeadAttention"): _multi_head_attention, (MS, "GroupQueryAttention"): _group_query_attention,
            (MS, "RotaryEmbedding"): _ms_rotary_embedding,
            ("", "Attention"): _onnx_attention, ("", "RotaryEmbedding"): _onnx_rotary_embedding}


def _unfuser(node):
    return UNFUSERS.get(("" if node.domain == "ai.onnx" else node.domain, node.op_type))


@dataclass
class Unfused:
    """A fused node and the names of the nodes written in its place."""
    node: onnx.NodeProto
    copy: list[str]


def unfuse_contrib_ops(model: onnx.ModelProto) -> list[Unfused]:
    """Rewrite the fused ops in place (the model is the pipeline's private copy); return what was rewritten."""
    if not any(_unfuser(n) for n in model.graph.node):
        return []
    from ..ir.shapes import infer_shapes

    inferred = infer_shapes(model)
    shapes = {vi.name: vi for vi in (list(inferred.graph.value_info) + list(inferred.graph.input)
                                     if inferred is not None else [])}
    rewritten, done, known_ranks = [], [], {}
    for i, node in enumerate(model.graph.node):
        unfuse = _unfuser(node)
        if unfuse is not None:
            e = _Emitter(model, f"{SCOPE}{node.name or node.op_type + str(i)}", known_ranks, shapes)
            unfuse(model, node, e)
            rewritten.extend(e.nodes)
            done.append(Unfused(onnx.NodeProto.FromString(node.SerializeToString()), [n.name for n in e.nodes]))
        else:
            rewritten.append(node)
    del model.graph.node[:]
    model.graph.node.extend(rewritten)
    return done


_PRODUCTS = {"MatMul", "Gemm", "Conv", "Einsum", "MatMulInteger", "MatMulNBits", "ConvInteger", "FusedMatMul"}


def refuse(model: onnx.ModelProto, unfused: list[Unfused]) -> int:
    """Put each fused node back in the forward of the converted `model`, in place of its written-out
    copy's outputs (see the module's docstring); return how many. A copy that is no longer whole, whose
    fused node reads a tensor the graph lost, or that multiplies by a tensor from outside it stays as it is."""
    g = model.graph
    index = {n.name: k for k, n in enumerate(g.node)}
    available = {i.name for i in g.input} | {t.name for t in g.initializer} | {""}
    available |= {o for n in g.node for o in n.output}
    count = 0
    for u in unfused:
        if u.node.domain in ("", "ai.onnx") or not u.copy or any(name not in index for name in u.copy):
            continue  # standard ops (opset-23 Attention, RotaryEmbedding) stay written out: every runtime runs those
        nodes = [g.node[index[name]] for name in u.copy]
        inside = {o for n in nodes for o in n.output} | {t.name for t in g.initializer}
        if any(n.op_type in _PRODUCTS and not all(t in inside for t in n.input if t) for n in nodes):
            continue
        if not all(t in available for t in u.node.input):
            continue
        renamed = {o: f"{u.copy[0].rsplit('/', 1)[0]}/fused_{o}" for o in u.node.output if o}
        for n in nodes:
            for k, t in enumerate(n.input):
                n.input[k] = renamed.get(t, t)
            for k, t in enumerate(n.output):
                n.output[k] = renamed.get(t, t)
        at = min(index[name] for name in u.copy)
        for k, n in enumerate(_empty_past(model, u.node) + [u.node]):
            g.node.insert(at + k, n)
        index = {n.name: k for k, n in enumerate(g.node)}
        count += 1
    if count:  # the copies' tails, now read by nothing
        prune_copies(model)
    return count


def _empty_past(model: onnx.ModelProto, node: onnx.NodeProto) -> list[onnx.NodeProto]:
    """A GroupQueryAttention whose past slots the cache binding emptied (cache.py: "no past") gets an
    empty past instead, [batch, kv_num_heads, 0, head_size] of the query's type, sliced from the query:
    what the exporter's runtime feeds at the first step, and what OpenVINO (2026.4)
    requires ("past_key and past_value must be provided as tensors"). Other fused ops keep the
    empty slots. Adds the nodes' output to `node`'s inputs and returns the nodes."""
    if (node.domain, node.op_type) != (MS, "GroupQueryAttention") or any(node.input[3:5]) or len(node.input) < 3:
        return []
    heads, kv_heads = attr(node, "num_heads"), attr(node, "kv_num_heads")
    packed = not (node.input[1] if len(node.input) > 1 else "")
    e = _Emitter(model, f"{SCOPE}past/{node.output[0]}", {}, {})  # the output: a node may have no name

    def ints(values):
        return e.const(values, np.int64)

    # the first position's query heads [batch, 1, heads (+ 2 kv_heads), head_size] -> [batch, kv_heads, 0,
    # head_size]: constants only (OpenVINO's Reshape of a zero-size tensor by a computed shape went wrong)
    first = e.op("Slice", [node.input[0], ints([0]), ints([1]), ints([1])])
    split = e.op("Reshape", [first, ints([0, 0, heads + 2 * kv_heads if packed else heads, -1])])
    past = e.op("Slice", [e.op("Transpose", [split], perm=[0, 2, 1, 3]), ints([0, 0]), ints([kv_heads, 0]), ints([1, 2])])
    while len(node.input) < 5:
        node.input.append("")
    node.input[3] = node.input[4] = past
    return e.nodes


def prune_copies(model: onnx.ModelProto) -> None:
    """Drop the nodes of written-out copies (SCOPE) whose outputs nothing reads: a copy's tail once
    its fused node computes the forward again, and its score chain once the backward recomputes it (lean)."""
    from ..ir.graph import prune_unread

    prune_unread(model.graph, lambda n: n.name.startswith(SCOPE))
