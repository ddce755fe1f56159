"""Random-weight LLaMA-family graphs in onnxruntime-genai's model builder int4 CPU layout, written
directly and streamed to disk: nothing model-sized is ever held in memory (issue 21, goal 4).

    path = write("build/ladder/1b", "1b")          # build/ladder/1b/model.onnx + model.onnx.data
    path = write("out", "tiny", tied=False)        # the tiny shape of models.genai (tests)

CLI: ``python -m models.llama_int4 --shape 1b|3b|7b|tiny --out DIR [--seed N] [--accuracy-level 4]``.

Shapes (``SHAPES``): ``1b`` = LLaMA-3.2-1B (hidden 2048, 16 layers, 32 heads, 8 key/value heads,
intermediate 8192, vocab 128256, tied embeddings, rope theta 500000 with llama3 scaling), ``3b`` =
LLaMA-3.2-3B (hidden 3072, 28 layers, 24 heads, 8 kv, intermediate 8192, vocab 128256, tied), ``7b`` =
LLaMA-2-7B (hidden 4096, 32 layers, 32 heads, 32 kv, intermediate 11008, vocab 32000, untied, theta
10000), ``tiny`` = models.genai's tiny LLaMA (hidden 64, 2 layers, 4 heads, 2 kv, intermediate 128,
vocab 100, 64 positions).

The layout is what onnxruntime-genai 0.18.0's builder writes for ``-p int4 -e cpu`` (read off the
builder's own tiny graphs; tests/test_llama_int4.py compares them node for node): opset 22 +
com.microsoft 1, producer "onnxruntime-genai", graph "main_graph"; inputs ``input_ids`` int64
[batch_size, sequence_length], ``attention_mask`` int64 [batch_size, total_sequence_length],
``past_key_values.L.key`` then all ``past_key_values.L.value`` float [batch_size, kv_heads,
past_sequence_length, kv_cache_dim]; outputs ``logits`` and ``present.L.key`` /
``present.L.value``. seqlens_k = Cast<int32>(ReduceSum(attention_mask, 1) - 1), total_sequence_length =
Cast<int32>(Shape(attention_mask)[1]). Per layer: SimplifiedLayerNormalization (first layer) or the
previous SkipSimplifiedLayerNormalization, one packed-QKV MatMulNBits, GroupQueryAttention (do_rotary=1
on cos_cache / sin_cache [max_positions, head_size / 2], rotary_interleaved=0, scale 1/sqrt(head_size)),
o_proj MatMulNBits, SkipSimplifiedLayerNormalization, gate / up MatMulNBits, SiLU as Sigmoid * x, Mul,
down MatMulNBits; a final SkipSimplifiedLayerNormalization and the LM head ``/lm_head/MatMul_Q4``
writing ``logits``. Every MatMulNBits has bits 4, block_size 32, accuracy_level 4 (configurable), a
uint8 weight [N, K / 32, 16] and float scales [N, K / 32] (symmetric: no zero points). Embedding: untied
models get a float Gather on ``model.embed_tokens.weight``; tied ones (LLaMA-3.2) a Reshape of the LM
head's packed weight to [vocab, K / 2] and GatherBlockQuantized (bits 4, block_size 32, gather_axis 0,
quantize_axis 1) with the LM head's scales.

Weights are random: packed bytes uniform over 0..255 (each nibble uniform over 0..15, zero point 8),
scales of random sign and magnitude 0.02 / 4.61 * U(0.8, 1.2) (so a dequantized weight has a standard
deviation near 0.02, as Hugging Face's LLaMA initialisation); the float embedding N(0, 0.02); norm weights
ones; cos / sin caches from the shape's rope parameters. Each tensor is generated and written in chunks
of at most 16 MiB straight into ``model.onnx.data`` (4096-aligned offsets); the graph references it as
external data. Peak memory of writing 7B is a few hundred MB.
"""

from __future__ import annotations

import argparse
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

BLOCK_SIZE = 32
BITS = 4
CHUNK_BYTES = 16 << 20
ALIGN = 4096
WEIGHT_STD = 0.02
NIBBLE_STD = 4.61  # std of a uniform nibble 0..15 minus 8


@dataclass(frozen=True)
class Shape:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    max_positions: int
    tied: bool
    rope_theta: float = 10000.0
    rope_scaling: dict | None = field(default=None, hash=False)
    eps: float = 1e-5

    @property
    def head_size(self) -> int:
        return self.hidden // self.heads


LLAMA3_SCALING = {"factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
SHAPES = {
    "tiny": Shape(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, vocab=100, max_positions=64,
                  tied=False, eps=1e-6),
    "1b": Shape(hidden=2048, layers=16, heads=32, kv_heads=8, intermediate=8192, vocab=128256, max_positions=131072,
                tied=True, rope_theta=500000.0, rope_scaling=LLAMA3_SCALING),
    "3b": Shape(hidden=3072, layers=28, heads=24, kv_heads=8, intermediate=8192, vocab=128256, max_positions=131072,
                tied=True, rope_theta=500000.0, rope_scaling=LLAMA3_SCALING),
    "7b": Shape(hidden=4096, layers=32, heads=32, kv_heads=32, intermediate=11008, vocab=32000, max_positions=4096,
                tied=False, rope_theta=10000.0),
}


def rope_caches(shape: Shape) -> tuple[np.ndarray, np.ndarray]:
    """cos / sin caches [max_positions, head_size / 2] (float32), llama3 frequency scaling if set."""
    half = shape.head_size // 2
    inv_freq = 1.0 / shape.rope_theta ** (np.arange(0, half, dtype=np.float64) * 2 / shape.head_size)
    s = shape.rope_scaling
    if s:
        low_wavelen = s["original_max_position_embeddings"] / s["low_freq_factor"]
        high_wavelen = s["original_max_position_embeddings"] / s["high_freq_factor"]
        wavelen = 2 * math.pi / inv_freq
        smooth = (s["original_max_position_embeddings"] / wavelen - s["low_freq_factor"]) / (
            s["high_freq_factor"] - s["low_freq_factor"])
        scaled = np.where(wavelen > low_wavelen, inv_freq / s["factor"], inv_freq)
        mid = (wavelen <= low_wavelen) & (wavelen >= high_wavelen)
        inv_freq = np.where(mid, (1 - smooth) * inv_freq / s["factor"] + smooth * inv_freq, scaled)
    angles = np.outer(np.arange(shape.max_positions, dtype=np.float64), inv_freq)
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


class _ExternalWriter:
    """Appends tensors to one external-data file, a chunk at a time; returns TensorProtos that reference it."""

    def __init__(self, path: Path):
        self.path = path
        self.file = open(path, "wb")
        self.offset = 0

    def add(self, name: str, data_type: int, dims: list[int], chunks) -> TensorProto:
        pad = -self.offset % ALIGN
        if pad:
            self.file.write(b"\0" * pad)
            self.offset += pad
        start, length = self.offset, 0
        for chunk in chunks:
            data = np.ascontiguousarray(chunk).tobytes()
            self.file.write(data)
            length += len(data)
        itemsize = {TensorProto.FLOAT: 4, TensorProto.UINT8: 1}[data_type]
        assert length == int(np.prod(dims)) * itemsize, (name, length, dims)
        self.offset += length
        tensor = TensorProto(name=name, data_type=data_type, dims=dims)
        tensor.data_location = TensorProto.EXTERNAL
        for key, value in (("location", self.path.name), ("offset", str(start)), ("length", str(length))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
        return tensor

    def close(self):
        self.file.close()


def _chunked(total: int, per_item: int):
    """Split `total` items into runs whose byte size (`per_item` each) stays under CHUNK_BYTES."""
    step = max(1, CHUNK_BYTES // per_item)
    for start in range(0, total, step):
        yield min(step, total - start)


class _Graph:
    """Nodes, initializers and value infos in the builder's naming."""

    def __init__(self, writer: _ExternalWriter, rng: np.random.Generator, accuracy_level: int):
        self.writer, self.rng, self.accuracy_level = writer, rng, accuracy_level
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[TensorProto] = []
        self.value_info: list[onnx.ValueInfoProto] = []
        self.constants: set[str] = set()

    def node(self, op, inputs, outputs, name, domain="", **attrs):
        self.nodes.append(helper.make_node(op, inputs, outputs, name=name, domain=domain or None, **attrs))

    def value(self, name, elem_type, shape):
        self.value_info.append(helper.make_tensor_value_info(name, elem_type, shape))

    def constant(self, value) -> str:
        """The builder's shared int64 constants: /model/constants/INT64/<value> made by a Constant node."""
        key = str(value)
        output = f"/model/constants/INT64/{key}"
        if key not in self.constants:
            self.constants.add(key)
            array = np.array(value, dtype=np.int64)
            self.node("Constant", [], [output], f"/model/constant_nodes/INT64/{key}",
                      value=onnx.numpy_helper.from_array(array, output))
            self.value(output, TensorProto.INT64, [])  # the builder declares them with no shape
        return output

    def init_array(self, name: str, array: np.ndarray):
        data_type = onnx.helper.np_dtype_to_tensor_dtype(array.dtype)
        self.initializers.append(self.writer.add(name, data_type, list(array.shape), [array]))
        self.value(name, data_type, list(array.shape))

    def init_random_float(self, name: str, dims: list[int], std: float):
        rows, cols = dims[0], int(np.prod(dims[1:]))
        chunks = (self.rng.standard_normal((n, cols), dtype=np.float32) * np.float32(std)
                  for n in _chunked(rows, cols * 4))
        self.initializers.append(self.writer.add(name, TensorProto.FLOAT, dims, chunks))
        self.value(name, TensorProto.FLOAT, dims)

    def quantized_weight(self, prefix: str, n: int, k: int) -> tuple[str, str]:
        """Random packed uint8 weight [n, k / 32, 16] and float scales [n, k / 32]: names."""
        blocks = -(-k // BLOCK_SIZE)
        packed = BLOCK_SIZE * BITS // 8
        weight, scales = f"{prefix}.weight_Q4", f"{prefix}.weight_scales"
        chunks = (self.rng.integers(0, 256, (rows, blocks, packed), dtype=np.uint8)
                  for rows in _chunked(n, blocks * packed))
        self.initializers.append(self.writer.add(weight, TensorProto.UINT8, [n, blocks, packed], chunks))
        self.value(weight, TensorProto.UINT8, [n, blocks, packed])

        def scale_chunks():
            base = np.float32(WEIGHT_STD / NIBBLE_STD)
            for rows in _chunked(n, blocks * 4):
                magnitude = self.rng.uniform(0.8, 1.2, (rows, blocks)).astype(np.float32) * base
                yield np.where(self.rng.random((rows, blocks)) < 0.5, -magnitude, magnitude).astype(np.float32)

        self.initializers.append(self.writer.add(scales, TensorProto.FLOAT, [n, blocks], scale_chunks()))
        self.value(scales, TensorProto.FLOAT, [n, blocks])
        return weight, scales

    def matmul_nbits(self, basename: str, prefix: str, x: str, n: int, k: int, output: str | None = None,
                     weights: tuple[str, str] | None = None) -> str:
        weight, scales = weights or self.quantized_weight(prefix, n, k)
        output = output or f"{basename}/MatMul/output_0"
        self.node("MatMulNBits", [x, weight, scales], [output], f"{basename}/MatMul_Q4", domain="com.microsoft",
                  K=k, N=n, accuracy_level=self.accuracy_level, bits=BITS, block_size=BLOCK_SIZE)
        return output


def _hidden(width: int) -> list:
    return ["batch_size", "sequence_length", width]


def write(out_dir: str | Path, shape: str | Shape, seed: int = 0, accuracy_level: int = 4,
          tied: bool | None = None, filename: str = "model.onnx") -> Path:
    """Write out_dir/<filename> (+ <filename>.data): the builder's int4 CPU graph of `shape` with random
    weights. `tied` overrides the shape's tied embeddings (GatherBlockQuantized on the LM head's weight)."""
    spec = SHAPES[shape] if isinstance(shape, str) else shape
    if tied is not None:
        spec = Shape(**{**spec.__dict__, "tied": tied})
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / filename
    writer = _ExternalWriter(out / f"{filename}.data")
    g = _Graph(writer, np.random.default_rng(seed), accuracy_level)
    h, hs, kv = spec.hidden, spec.head_size, spec.kv_heads
    f32, i64, i32 = TensorProto.FLOAT, TensorProto.INT64, TensorProto.INT32
    try:
        # initializers in the builder's order: embedding, norms + rope caches, then the quantized weights
        if not spec.tied:
            g.init_random_float("model.embed_tokens.weight", [spec.vocab, h], WEIGHT_STD)
        cos, sin = rope_caches(spec)
        ones = np.ones(h, np.float32)
        for layer in range(spec.layers):
            g.init_array(f"model.layers.{layer}.input_layernorm.weight", ones)
            if layer == 0:
                g.init_array("cos_cache", cos)
                g.init_array("sin_cache", sin)
            g.init_array(f"model.layers.{layer}.post_attention_layernorm.weight", ones)
        final_norm = f"model.layers.{spec.layers}.final_norm_layernorm.weight"
        g.init_array(final_norm, ones)
        del cos, sin

        # attention-mask subgraph
        sub = "/model/attn_mask_reformat/attn_mask_subgraph"
        one_list = g.constant([1])
        g.node("ReduceSum", ["attention_mask", one_list], [f"{sub}/ReduceSum/output_0"], f"{sub}/ReduceSum", keepdims=0)
        g.value(f"{sub}/ReduceSum/output_0", i64, ["batch_size"])
        g.node("Sub", [f"{sub}/ReduceSum/output_0", one_list], [f"{sub}/Sub/output_0"], f"{sub}/Sub")
        g.value(f"{sub}/Sub/output_0", i64, ["batch_size"])
        seqlens_k = f"{sub}/Sub/Cast/output_0"
        g.node("Cast", [f"{sub}/Sub/output_0"], [seqlens_k], f"{sub}/Sub/Cast", to=i32)
        g.value(seqlens_k, i32, ["batch_size"])
        g.node("Shape", ["attention_mask"], [f"{sub}/Shape/output_0"], f"{sub}/Shape")
        g.value(f"{sub}/Shape/output_0", i64, [2])
        one = g.constant(1)
        g.node("Gather", [f"{sub}/Shape/output_0", one], [f"{sub}/Gather/output_0"], f"{sub}/Gather", axis=0)
        g.value(f"{sub}/Gather/output_0", i64, [])
        total_len = f"{sub}/Gather/Cast/output_0"
        g.node("Cast", [f"{sub}/Gather/output_0"], [total_len], f"{sub}/Gather/Cast", to=i32)
        g.value(total_len, i32, None)

        # embedding
        if spec.tied:
            head_weights = None  # written after the layers (the builder's order), referenced here by name
            blocks = -(-h // BLOCK_SIZE)
            flat = blocks * BLOCK_SIZE * BITS // 8
            shape_const = g.constant([spec.vocab, flat])
            g.node("Reshape", ["lm_head.MatMul.weight_Q4", shape_const], ["/model/embed_tokens/Reshape/output_0"],
                   "/model/embed_tokens/Reshape")
            g.value("/model/embed_tokens/Reshape/output_0", TensorProto.UINT8, [spec.vocab, flat])
            embeds = "/model/embed_tokens/GatherBlockQuantized/output_0"
            g.node("GatherBlockQuantized", ["/model/embed_tokens/Reshape/output_0", "input_ids",
                                            "lm_head.MatMul.weight_scales"], [embeds],
                   "/model/embed_tokens/GatherBlockQuantized", domain="com.microsoft",
                   bits=BITS, block_size=BLOCK_SIZE, gather_axis=0, quantize_axis=1)
            if blocks * BLOCK_SIZE != h:
                raise ValueError(f"hidden size {h} is not a multiple of {BLOCK_SIZE} (the builder would Slice)")
        else:
            embeds = "/model/embed_tokens/Gather/output_0"
            g.node("Gather", ["model.embed_tokens.weight", "input_ids"], [embeds], "/model/embed_tokens/Gather")
        g.value(embeds, f32, _hidden(h))

        residual, normed = embeds, None
        for layer in range(spec.layers):
            p, m = f"/model/layers.{layer}", f"model.layers.{layer}"
            if layer == 0:
                normed = f"{p}/input_layernorm/output_0"
                g.node("SimplifiedLayerNormalization", [embeds, f"{m}.input_layernorm.weight"], [normed],
                       f"{p}/input_layernorm/LayerNorm", epsilon=spec.eps, axis=-1, stash_type=1)
                g.value(normed, f32, _hidden(h))
            qkv = g.matmul_nbits(f"{p}/attn/qkv_proj", f"{m}.attn.qkv_proj.MatMul", normed, (spec.heads + 2 * kv) * hs, h)
            g.value(qkv, f32, _hidden((spec.heads + 2 * kv) * hs))
            attn = f"{p}/attn/GroupQueryAttention/output_0"
            g.node("GroupQueryAttention",
                   [qkv, "", "", f"past_key_values.{layer}.key", f"past_key_values.{layer}.value", seqlens_k, total_len,
                    "cos_cache", "sin_cache", "", "", ""],
                   [attn, f"present.{layer}.key", f"present.{layer}.value"], f"{p}/attn/GroupQueryAttention",
                   domain="com.microsoft", num_heads=spec.heads, kv_num_heads=kv, scale=1.0 / math.sqrt(hs),
                   local_window_size=-1, softcap=0.0, do_rotary=1, rotary_interleaved=0)
            g.value(attn, f32, _hidden(spec.heads * hs))
            o = g.matmul_nbits(f"{p}/attn/o_proj", f"{m}.attn.o_proj.MatMul", attn, h, spec.heads * hs)
            g.value(o, f32, _hidden(h))
            post = f"{p}/post_attention_layernorm"
            g.node("SkipSimplifiedLayerNormalization", [residual, o, f"{m}.post_attention_layernorm.weight"],
                   [f"{post}/output_0", "", "", f"{post}/output_3"], f"{post}/SkipLayerNorm",
                   domain="com.microsoft", epsilon=spec.eps)
            g.value(f"{post}/output_0", f32, _hidden(h))
            g.value(f"{post}/output_3", f32, _hidden(h))
            gate = g.matmul_nbits(f"{p}/mlp/gate_proj", f"{m}.mlp.gate_proj.MatMul", f"{post}/output_0", spec.intermediate, h)
            g.value(gate, f32, _hidden(spec.intermediate))
            up = g.matmul_nbits(f"{p}/mlp/up_proj", f"{m}.mlp.up_proj.MatMul", f"{post}/output_0", spec.intermediate, h)
            g.value(up, f32, _hidden(spec.intermediate))
            g.node("Sigmoid", [gate], [f"{p}/mlp/act_fn/Sigmoid/output_0"], f"{p}/mlp/act_fn/Sigmoid")
            g.value(f"{p}/mlp/act_fn/Sigmoid/output_0", f32, _hidden(spec.intermediate))
            g.node("Mul", [gate, f"{p}/mlp/act_fn/Sigmoid/output_0"], [f"{p}/mlp/act_fn/Mul/output_0"], f"{p}/mlp/act_fn/Mul")
            g.value(f"{p}/mlp/act_fn/Mul/output_0", f32, _hidden(spec.intermediate))
            g.node("Mul", [f"{p}/mlp/act_fn/Mul/output_0", up], [f"{p}/mlp/Mul/output_0"], f"{p}/mlp/Mul")
            g.value(f"{p}/mlp/Mul/output_0", f32, _hidden(spec.intermediate))
            down = g.matmul_nbits(f"{p}/mlp/down_proj", f"{m}.mlp.down_proj.MatMul", f"{p}/mlp/Mul/output_0", h,
                                  spec.intermediate)
            g.value(down, f32, _hidden(h))
            if layer + 1 < spec.layers:
                nxt = f"/model/layers.{layer + 1}/input_layernorm"
                g.node("SkipSimplifiedLayerNormalization",
                       [f"{post}/output_3", down, f"model.layers.{layer + 1}.input_layernorm.weight"],
                       [f"{nxt}/output_0", "", "", f"{nxt}/output_3"], f"{nxt}/SkipLayerNorm",
                       domain="com.microsoft", epsilon=spec.eps)
                g.value(f"{nxt}/output_0", f32, _hidden(h))
                g.value(f"{nxt}/output_3", f32, _hidden(h))
                normed, residual = f"{nxt}/output_0", f"{nxt}/output_3"
            else:
                fin = f"/model/layers.{spec.layers}/final_norm_layernorm"
                g.node("SkipSimplifiedLayerNormalization", [f"{post}/output_3", down, final_norm],
                       [f"{fin}/output_0"], f"{fin}/SkipLayerNorm", domain="com.microsoft", epsilon=spec.eps)
                g.value(f"{fin}/output_0", f32, _hidden(h))
                normed = f"{fin}/output_0"
        g.matmul_nbits("/lm_head", "lm_head.MatMul", normed, spec.vocab, h, output="logits")
    finally:
        writer.close()

    # the builder lists the Constant nodes where first used; its initializer order puts the quantized
    # weights after the float ones, which g already follows except for the rope caches' position
    cache = ["batch_size", kv, "past_sequence_length", "kv_cache_dim"]  # the builder's symbolic head size
    present = ["batch_size", kv, "total_sequence_length", "kv_cache_dim"]
    inputs = [helper.make_tensor_value_info("input_ids", i64, ["batch_size", "sequence_length"]),
              helper.make_tensor_value_info("attention_mask", i64, ["batch_size", "total_sequence_length"])]
    inputs += [helper.make_tensor_value_info(f"past_key_values.{i}.{kind}", f32, cache)
               for kind in ("key", "value") for i in range(spec.layers)]
    outputs = [helper.make_tensor_value_info("logits", f32, ["batch_size", "sequence_length", spec.vocab])]
    outputs += [helper.make_tensor_value_info(f"present.{i}.{kind}", f32, present)
                for kind in ("key", "value") for i in range(spec.layers)]
    graph = helper.make_graph(g.nodes, "main_graph", inputs, outputs, g.initializers, value_info=g.value_info)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 22), helper.make_opsetid("com.microsoft", 1)],
                              producer_name="onnxruntime-genai", ir_version=10)
    onnx.save(model, str(path))
    return path


def past_inputs(shape: str | Shape, batch: int = 1) -> dict[str, np.ndarray]:
    """Empty past_key_values.* feeds [batch, kv_heads, 0, head_size] for a graph of `shape`."""
    spec = SHAPES[shape] if isinstance(shape, str) else shape
    empty = np.zeros((batch, spec.kv_heads, 0, spec.head_size), np.float32)
    return {f"past_key_values.{i}.{kind}": empty for kind in ("key", "value") for i in range(spec.layers)}


def builder_reference(dst_dir: str | Path, seed: int = 0, timeout: float = 300) -> dict[str, Path]:
    """onnxruntime-genai's builder itself, ``-p int4 -e cpu``, on models.genai's tiny random LLaMA, untied and
    tied (tie_word_embeddings): {"untied": .../model.onnx, "tied": .../model.onnx}, both built in one
    process (models.genai's shims). For comparing this recipe's layout with the builder's; needs torch and
    transformers (the recipe itself does not)."""
    import subprocess
    import sys

    from models import genai, tiny

    out = Path(dst_dir)
    paths = {kind: out / f"builder-int4-{kind}" / "model.onnx" for kind in ("untied", "tied")}
    if all(p.exists() for p in paths.values()):
        return paths
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    runs = []
    for kind, path in paths.items():
        hf = out / f"hf-{kind}"
        if not (hf / "tokenizer.json").exists():
            kwargs = dict(tiny._config_kwargs("llama"), hidden_size=genai.HIDDEN_SIZE, num_attention_heads=genai.NUM_HEADS,
                          num_key_value_heads=genai.NUM_KV_HEADS, intermediate_size=genai.INTERMEDIATE_SIZE,
                          tie_word_embeddings=kind == "tied")
            torch.manual_seed(seed)
            model = LlamaForCausalLM(LlamaConfig(**kwargs))
            tiny._randomize_weights(model, seed)
            tiny.save(model.float().eval(), hf)
            genai._save_tokenizer(hf)
        runs.append(["-i", str(hf), "-o", str(path.parent), "-p", "int4", "-e", "cpu", "-c", str(out / f"cache-{kind}")])
    code = "from models.genai import _run_builder\n" + "".join(f"_run_builder({argv!r})\n" for argv in runs)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    done = subprocess.run([sys.executable, "-c", code], cwd=str(Path(__file__).resolve().parent.parent), env=env,
                          capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0 or not all(p.exists() for p in paths.values()):
        raise RuntimeError(f"onnxruntime-genai builder failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return paths


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--accuracy-level", type=int, default=4)
    args = parser.parse_args(argv)
    path = write(args.out, args.shape, args.seed, args.accuracy_level)
    size = os.path.getsize(path) + os.path.getsize(f"{path}.data")
    print(f"{path} ({size / 2**30:.2f} GiB with its data)")


if __name__ == "__main__":
    main()
