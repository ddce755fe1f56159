"""Architecture sweep: tiny random-weight models of every transformers architecture that exports.

    python -m tools.sweep [--arch a,b] [--exporter torchscript,dynamo] [--out build/sweep.json]
                          [--jobs 1] [--timeout 600] [--list]

For each architecture (a ``model_type`` of transformers' auto mappings, with one task head: a
seq2seq LM for encoder-decoders, a causal LM for decoders, sequence classification for encoders,
image classification for vision models) and each exporter it

1. builds a tiny model: the config class's defaults with every size field shrunk generically
   (``tiny_config``: hidden 32, 2 layers, 4 heads, vocab 100, ...), eager attention, random
   weights (``models.tiny._randomize_weights``);
2. exports it (``models._common.export_onnx``; TorchScript at opset 17, dynamo at opset 18; dynamic
   batch and sequence axes) and checks onnxruntime's logits against PyTorch's on other shapes
   (batch 2, sequence 7 instead of 6, row 1 right-padded) -- a mismatch is an *export failure*;
3. converts it with lrp_onnx in ``gradient`` mode and compares the relevance at the word-embedding
   lookup (or the pixels) with torch.autograd's Gradient x Input of the same logits (a forward hook
   turns the embedding module's output into a leaf), relative L2 <= 1e-4, and the original output
   with PyTorch's (where transformers defines a custom autograd.Function whose backward is not the
   derivative of its forward, ``APPROXIMATE_BACKWARDS``, autograd differentiates the forward instead);
4. for the families LXT 2.1 covers (``LXT_FAMILIES``), also converts with ``attnlrp`` and compares
   with the LXT reference of tests/reference.py (run in a fresh process), relative L2 <= 1e-3.

Each architecture runs in its own subprocess (``--worker``) under a timeout, so one hang or crash
only loses that architecture. Results: one JSON record per (architecture, exporter) in ``--out``;
the tally printed at the end groups refusals by the op they name.

Statuses: ``exact`` (converted, equal to autograd), ``refused`` (lrp_onnx.LRPError: the error line is
recorded), ``wrong`` (converted but not equal: must never happen), ``convert_crash`` (an exception
that is not an LRPError: a bug), ``export_failed`` / ``build_failed`` (PyTorch or the exporter could
not produce a faithful graph: not lrp_onnx's problem), ``no_reference`` (no embedding lookup to
compare at), ``timeout`` / ``worker_crash``.
"""
from __future__ import annotations

import argparse
import contextlib
import inspect
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter, defaultdict
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

REPO = Path(__file__).resolve().parent.parent
EXPORTERS = ("torchscript", "dynamo")
OPSET = {"torchscript": 17, "dynamo": 18}
GRADIENT_TOLERANCE = 1e-4
ATTNLRP_TOLERANCE = 1e-3   # tests/conftest.py TOLERANCE["attnlrp"]
EXPORT_TOLERANCE = 1e-3    # ORT vs PyTorch logits, relative to max(1, max |logit|)
VOCAB, HIDDEN, LAYERS, HEADS, KV_HEADS, INTERMEDIATE, HEAD_DIM, POSITIONS = 100, 32, 2, 4, 2, 64, 8, 64
NUM_LABELS = 3
IMAGE_SIZE = 32

# model_type -> the family name of tests/reference.py (LXT 2.1's maps, or LXT-built references)
LXT_FAMILIES = {"bert": "bert", "gpt2": "gpt2", "llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3",
                "gemma3_text": "gemma3", "mixtral": "mixtral", "t5": "t5", "vit": "vit"}

# Not a text-only or image-only model (speech, multimodal, retrieval, wrappers, ...): no tiny text
# or pixel model to build from the config class alone.
NOT_APPLICABLE = {
    "encoder-decoder": "wrapper of two configs", "speech-encoder-decoder": "speech", "vision-encoder-decoder": "wrapper",
    "granite_speech": "speech", "qwen2_audio": "audio", "seamless_m4t": "speech", "seamless_m4t_v2": "speech",
    "whisper": "speech", "speech_to_text_2": "speech decoder", "musicgen": "audio", "musicgen_melody": "audio",
    "moshi": "audio", "wav2vec2": "speech", "aria_text": "multimodal text part", "emu3": "multimodal",
    "fuyu": "multimodal", "git": "multimodal", "got_ocr2": "multimodal", "mllama": "multimodal",
    "llama4": "multimodal", "phi4_multimodal": "multimodal", "gemma3": "multimodal (gemma3_text is swept)",
    "shieldgemma2": "multimodal", "clip": "multimodal", "siglip": "multimodal", "siglip2": "multimodal",
    "timm_wrapper": "needs timm", "perceiver": "multimodal preprocessors", "layoutlmv2": "needs detectron2",
    "layoutlmv3": "needs bbox+pixels", "layoutlm": "needs bbox", "lilt": "needs bbox", "markuplm": "needs xpaths",
    "tapas": "needs table inputs", "trocr": "decoder of an image model", "vit_hybrid": "needs a backbone",
    "imagegpt": "pixels as token ids", "rwkv": "recurrent, custom kernel", "udop": "multimodal",
    "luke": "needs entity inputs", "encodec": "audio", "donut-swin": "no classification head",
    "canine": "character hashing of unicode code points", "cpmant": "custom inputs", "xlm-prophetnet": "deprecated",
}

# Hand corrections on top of tiny_config's generic shrinking, only where the generic sizes
# contradict a constraint of the architecture.
OVERRIDES = {
    "deepseek_v3": dict(first_k_dense_replace=1, n_group=1, topk_group=1, n_shared_experts=1, head_dim=4,
                        num_key_value_heads=4),  # k is expanded to every head before repeat_kv
    "dbrx": dict(attn_config={"kv_n_heads": 2, "clip_qkv": 8.0}, ffn_config={"ffn_hidden_size": 64, "moe_num_experts": 4,
                                                            "moe_top_k": 2}),
    # transformers' Swin clamps the window of a stage smaller than it but keeps the bias table of the
    # configured window: keep every stage >= the window (32 px / patch 2 = 16, 8, 4 with window 2)
    **{swin: dict(patch_size=2, window_size=2, depths=[1, 1, 1], num_heads=[1, 2, 4], embed_dim=16)
       for swin in ("swin", "swinv2", "donut-swin")},
    "reformer": dict(axial_pos_shape=[8, 8], axial_pos_embds_dim=[16, 16], attn_layers=["local", "lsh"],
                     local_attn_chunk_length=4, lsh_attn_chunk_length=4, max_position_embeddings=64),
    # state-space heads: num_heads * head_dim must equal expand (2) * hidden (32)
    "mamba2": dict(num_heads=8, head_dim=8, n_groups=1, state_size=8),
    "bamba": dict(mamba_n_heads=8, mamba_d_head=8, mamba_n_groups=1, mamba_d_state=8, attn_layer_indices=[1]),
    "funnel": dict(block_sizes=[1, 1], block_repeats=[1, 1]),
    "longformer": dict(attention_window=4), "led": dict(attention_window=4),
    "big_bird": dict(attention_type="original_full"), "bigbird_pegasus": dict(attention_type="original_full"),
    "jamba": dict(attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2, expert_layer_offset=1,
                  mamba_d_state=4, mamba_dt_rank=4, use_mamba_kernels=False),
    "zamba": dict(attn_layer_period=2, attn_layer_offset=1, mamba_d_state=4, use_mamba_kernels=False),
    # the configs default to no relative attention, which no released DeBERTa checkpoint uses: sweep the
    # disentangled attention (c2p, p2c; v2: log buckets, shared keys), whose relative positions come from
    # an If whose branches differ in rank
    "deberta": dict(relative_attention=True, pos_att_type=["c2p", "p2c"], max_relative_positions=-1),
    "deberta-v2": dict(relative_attention=True, pos_att_type=["c2p", "p2c"], position_buckets=16, share_att_key=True,
                       norm_rel_ebd="layer_norm", max_relative_positions=-1),
    "levit": dict(hidden_sizes=[16, 32, 48], num_attention_heads=[1, 2, 3], depths=[1, 1, 1], key_dim=[4, 4, 4],
                  down_ops=[["Subsample", 4, 1, 4, 2, 2], ["Subsample", 4, 2, 4, 2, 2]]),
}

GENERATION_KEYS = None  # filled lazily: fields every PretrainedConfig has (generation defaults ...)


# --------------------------------------------------------------------------- architectures


def architectures() -> dict[str, tuple[str, str]]:
    """model_type -> (task, model class name), one task per architecture."""
    from transformers.models.auto import modeling_auto as auto

    seq2seq = auto.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES
    causal = auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    classification = auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES
    masked = auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES
    image = auto.MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES
    result = {}
    seq2seq, causal, classification, masked, image = (
        {k: v[0] if isinstance(v, tuple) else v for k, v in mapping.items()}  # DeiT: (class, with teacher)
        for mapping in (seq2seq, causal, classification, masked, image))
    for model_type in sorted(set(seq2seq) | set(causal) | set(classification) | set(masked) | set(image)):
        if model_type in seq2seq:
            result[model_type] = ("seq2seq", seq2seq[model_type])
        elif model_type in causal and model_type not in masked and model_type not in ("bert-generation",):
            result[model_type] = ("causal", causal[model_type])
        elif model_type in classification:
            result[model_type] = ("classification", classification[model_type])
        elif model_type in masked:
            result[model_type] = ("masked", masked[model_type])
        elif model_type in causal:
            result[model_type] = ("causal", causal[model_type])
        else:
            result[model_type] = ("image", image[model_type])
    return result


# --------------------------------------------------------------------------- tiny configs

_NAMED = [  # (regex on a constructor parameter of the config class, new value for an int)
    (r"(.*_)?vocab_size$", VOCAB),
    (r"(hidden_size|d_model|n_embd|n_embed|dim|embed_dim|d_embed|model_dim|word_embed_proj_dim|"
     r"pooler_hidden_size|hidden_dim_model)$", HIDDEN),
    (r"(num_hidden_layers|num_layers|n_layer|n_layers|encoder_layers|decoder_layers|num_decoder_layers|"
     r"num_encoder_layers|num_blocks)$", LAYERS),
    (r"(num_attention_heads|n_head|n_heads|num_heads|encoder_attention_heads|decoder_attention_heads|"
     r"num_decoder_attention_heads|n_attention_heads)$", HEADS),
    (r"(num_key_value_heads|num_kv_heads|n_kv_heads|multi_query_group_num|num_query_groups)$", KV_HEADS),
    (r"(intermediate_size|ffn_dim|encoder_ffn_dim|decoder_ffn_dim|d_ff|n_inner|d_inner|hidden_dim|"
     r"ffn_hidden_size|intermediate_dim|feed_forward_size|decoder_intermediate_size|inner_hidden_size)$",
     INTERMEDIATE),
    (r"(moe_intermediate_size|expert_intermediate_size|ffn_dim_expert)$", 16),
    (r"(shared_expert_intermediate_size|shared_intermediate_size)$", 24),
    (r"(num_local_experts|num_experts|n_routed_experts|moe_num_experts|num_moe_experts)$", 4),
    (r"(num_experts_per_tok|moe_top_k|num_selected_experts|top_k_experts|moe_topk)$", 2),
    (r"qk_rope_head_dim$", 4),
    (r"(head_dim|d_kv|d_head|kv_channels|attention_head_size|.*_head_dim)$", HEAD_DIM),
    (r"(rotary_dim|rotary_emb_dim)$", 4),
    (r".*_lora_rank$", 16),
    (r"(max_position_embeddings|n_positions|n_ctx|max_seq_len|max_sequence_length|seq_length|"
     r"max_source_positions|max_target_positions)$", POSITIONS),
    (r"embedding_size$", 16),
    (r"image_size$", IMAGE_SIZE),
    (r"num_groups$", 4),  # GroupNorm groups (BiT) must divide the shrunk channel counts
    (r"window_size$", 4),
    (r"(type_vocab_size)$", None),  # keep
]
_TOKEN_IDS = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}


def _shrink_list(name: str, value: list, default_layers: int | None):
    if not value or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        if default_layers and len(value) == default_layers and default_layers > LAYERS:
            return value[:LAYERS]
        return value
    n = len(value)
    if name == "depths" or name.endswith("_depths") or name == "num_layers" or name == "block_sizes":
        return [1] * n
    if re.search(r"(hidden_sizes|embed_dims|dims|hidden_size|embed_dim|channels|widths)$", name):
        return [16 * 2 ** i for i in range(n)]
    if re.search(r"(num_heads|num_attention_heads|heads)$", name):
        return [2 ** i for i in range(n)]
    if default_layers and n == default_layers and default_layers > LAYERS:
        return value[:LAYERS]
    return value


def tiny_config(model_type: str):
    """The config class's defaults with the size fields shrunk (see ``_NAMED``), eager attention."""
    from transformers import AutoConfig, PretrainedConfig

    global GENERATION_KEYS
    if GENERATION_KEYS is None:
        GENERATION_KEYS = set(PretrainedConfig().to_dict()) - {"pad_token_id", "bos_token_id", "eos_token_id",
                                                               "decoder_start_token_id", "sep_token_id"}
    default = AutoConfig.for_model(model_type)
    config_class = type(default)
    params = inspect.signature(config_class.__init__).parameters
    values = default.to_dict()
    default_layers = next((values[k] for k in ("num_hidden_layers", "num_layers", "n_layer", "n_layers",
                                                "encoder_layers") if isinstance(values.get(k), int)), None)
    default_hidden = next((values[k] for k in ("hidden_size", "d_model", "n_embd", "dim", "embed_dim")
                           if isinstance(values.get(k), int)), None)
    changes = {}
    for name in params:
        if name in ("self", "kwargs") or name in GENERATION_KEYS or name not in values:
            continue
        value = values[name]
        if isinstance(value, bool):
            continue
        if name == "num_key_value_heads" and value is None:  # some models do not default it to the heads
            changes[name] = KV_HEADS
            continue
        if name == "vocab_size" and value is None:  # ESM
            changes[name] = VOCAB
            continue
        if name.endswith("token_id"):
            if name in _TOKEN_IDS:
                changes[name] = _TOKEN_IDS[name]
            elif isinstance(value, int) and value >= VOCAB:
                changes[name] = 3
            elif isinstance(value, list):
                changes[name] = [v if v < VOCAB else 2 for v in value]
            continue
        if isinstance(value, list):
            shrunk = _shrink_list(name, value, default_layers)
            if shrunk != value:
                changes[name] = shrunk
            continue
        if not isinstance(value, int):
            continue
        for pattern, new in _NAMED:
            if re.fullmatch(pattern, name):
                if new is not None and value > new:
                    changes[name] = new
                break
        else:  # unnamed int fields that equal the default hidden size shrink with it
            if default_hidden and default_hidden >= 128 and value == default_hidden:
                changes[name] = HIDDEN
            elif default_hidden and default_hidden >= 128 and value == 4 * default_hidden:
                changes[name] = INTERMEDIATE
    if "patch_size" in values and isinstance(values["patch_size"], int) and values["patch_size"] > 8:
        changes["patch_size"] = 8
    if "num_labels" not in changes:
        changes["num_labels"] = NUM_LABELS
    if "use_cache" in values or "use_cache" in params:
        changes["use_cache"] = False
        if values.get("cache_implementation"):  # Gemma3's "hybrid" contradicts use_cache=False on save
            changes["cache_implementation"] = None
    changes.update(OVERRIDES.get(model_type, {}))
    # a kv-head count that does not divide the head count, or an unset one, follows the heads
    heads = changes.get("num_attention_heads", values.get("num_attention_heads"))
    for key in ("num_key_value_heads", "num_kv_heads"):
        if key in changes and isinstance(heads, int) and heads % changes[key]:
            changes[key] = heads
    derived = ("self", "kwargs", "out_features", "out_indices", "stage_names")  # recomputed from depths
    config = config_class(**{k: v for k, v in values.items() if k in params and k not in derived} | changes)
    config._attn_implementation = "eager"
    return config


# --------------------------------------------------------------------------- build and export


def build(model_type: str, seed: int = 0):
    import torch
    import transformers

    from models.tiny import _randomize_weights

    task, class_name = architectures()[model_type]
    model_class = getattr(transformers, class_name)
    config = tiny_config(model_type)
    torch.manual_seed(seed)
    model = model_class(config)
    _randomize_weights(model, seed)
    return task, model.float().eval()


def _accepts(model, name: str) -> bool:
    params = inspect.signature(model.forward).parameters
    return name in params


def _logits(output):
    if hasattr(output, "logits") and output.logits is not None:
        return output.logits
    return output[0]


def _make_wrappers():
    import torch
    from torch import nn

    class TextLogits(nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model
            self.extra = {"use_cache": False} if _accepts(model, "use_cache") else {}

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            return _logits(self.model(input_ids=input_ids, attention_mask=attention_mask, **self.extra))

    class IdsLogits(TextLogits):
        def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
            return _logits(self.model(input_ids=input_ids, **self.extra))

    class Seq2SeqLogits(TextLogits):
        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    decoder_input_ids: torch.Tensor) -> torch.Tensor:
            return _logits(self.model(input_ids=input_ids, attention_mask=attention_mask,
                                      decoder_input_ids=decoder_input_ids, **self.extra))

    class PixelLogits(nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
            return _logits(self.model(pixel_values=pixel_values))

    return TextLogits, IdsLogits, Seq2SeqLogits, PixelLogits


def wrap(model, task: str):
    """(wrapper module, graph input names) for the task."""
    text, ids_only, seq2seq, pixels = _make_wrappers()
    if task == "image":
        return pixels(model).eval(), ["pixel_values"]
    if task == "seq2seq":
        return seq2seq(model).eval(), ["input_ids", "attention_mask", "decoder_input_ids"]
    if _accepts(model, "attention_mask"):
        return text(model).eval(), ["input_ids", "attention_mask"]
    return ids_only(model).eval(), ["input_ids"]


def example(task: str, names: list[str], batch: int, sequence: int, seed: int) -> dict:
    import torch

    from models import tiny

    if task == "image":
        generator = torch.Generator().manual_seed(seed)
        return {"pixel_values": torch.randn(batch, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)}
    inputs = tiny.example_inputs(batch=batch, sequence=sequence, seed=seed,
                                 decoder_sequence=sequence - 2 if task == "seq2seq" else None)
    return {name: inputs[name] for name in names}


def export(model, task: str, path: Path, exporter: str) -> tuple[Path, list[str]]:
    from models._common import export_onnx
    from models.tiny import _moe_loops_over_all_experts

    wrapper, names = wrap(model, task)
    inputs = example(task, names, batch=2, sequence=6, seed=0)
    if task == "image":
        axes = {"pixel_values": {0: "batch"}}
        output_axes = {"logits": {0: "batch"}}
    else:
        axes = {name: {0: "batch", 1: "decoder_sequence" if name == "decoder_input_ids" else "sequence"}
                for name in names}
        output_axes = {"logits": {0: "batch"}}
    with _moe_loops_over_all_experts(model):
        export_onnx(wrapper, path, inputs, ["logits"], exporter=exporter, opset=OPSET[exporter],
                    max_sequence=POSITIONS, input_axes=axes, output_axes=None if exporter == "dynamo" else
                    _output_axes(wrapper, inputs, task))
    return path, names


def _output_axes(wrapper, inputs, task):
    import torch

    with torch.no_grad():
        logits = wrapper(*inputs.values())
    axes = {0: "batch"}
    if logits.dim() == 3:
        axes[1] = "decoder_sequence" if task == "seq2seq" else "sequence"
    return {"logits": axes}


# --------------------------------------------------------------------------- references


def explain_setup(task: str, names: list[str]) -> dict:
    """Inputs (batch 2, sequence 7, row 1 right-padded: not the export's shapes)."""
    return {k: v.numpy() for k, v in example(task, names, batch=2, sequence=7, seed=3).items()}


def targets_for(logits_shape, task) -> tuple:
    import numpy as np

    classes = logits_shape[-1]
    target = np.array([7, 42] if len(logits_shape) == 3 else [1, 2], dtype=np.int64) % classes
    position = None
    if len(logits_shape) == 3:
        position = np.array([-1, 2] if task == "seq2seq" else [-1, 4], dtype=np.int64)
    return target, position


# Custom torch.autograd.Functions whose hand-written backward is NOT the derivative of their forward
# (module, class): the ONNX graph holds the forward only, so gradient mode must equal the derivative of
# that forward, and the reference differentiates the forward as written instead (``true_gradients``).
# - yoso: YosoCumulation computes E = (1 - acos(q k^T) / pi) ** H; its backward replaces dE/d(q k^T)
#   = H (1 - acos/pi) ** (H-1) / (pi sqrt(1 - (q k^T)^2)) by (H / 2) E (YOSO's LSH approximation),
#   0.11 relative L2 off the true Gradient x Input of the tiny model (float64 central differences
#   of the original forward agree with lrp_onnx to 7e-7).
APPROXIMATE_BACKWARDS = {
    "yoso": [("transformers.models.yoso.modeling_yoso", "YosoCumulation")],
}


class _NoContext:
    """Stands in for an autograd.Function's ctx when its forward is called directly."""

    def save_for_backward(self, *tensors):
        pass

    def mark_non_differentiable(self, *tensors):
        pass


@contextlib.contextmanager
def true_gradients(model_type: str):
    """While active, the model_type's APPROXIMATE_BACKWARDS Functions run their forward under autograd
    (so torch differentiates what the exported graph computes) instead of their own backward."""
    import importlib

    saved = []
    try:
        for module_name, class_name in APPROXIMATE_BACKWARDS.get(model_type, []):
            function = getattr(importlib.import_module(module_name), class_name)
            saved.append((function, function.__dict__["apply"] if "apply" in function.__dict__ else None))
            function.apply = staticmethod(
                lambda *args, _forward=function.forward: _forward(_NoContext(), *args))
        yield
    finally:
        for function, apply in reversed(saved):
            if apply is None:
                del function.apply
            else:
                function.apply = apply


def autograd_relevance(model, task, names, inputs, target, position):
    """Gradient x Input of sum over rows of the explained logits, at every call of the word-embedding
    module(s) (keyed by the graph input whose ids it looked up) or at the pixels."""
    import torch

    wrapper, _ = wrap(model, task)
    feeds = {k: torch.as_tensor(v) for k, v in inputs.items()}
    captured = []
    handles = []
    if task == "image":
        feeds["pixel_values"] = feeds["pixel_values"].clone().requires_grad_()
    else:
        modules = {id(m): m for m in _embedding_modules(model)}

        def hook(module, args, output):
            rest = ()
            if isinstance(output, tuple):  # I-BERT's quantized embedding: (values, scaling factor)
                output, rest = output[0], output[1:]
            leaf = output.detach().requires_grad_()
            captured.append((args[0] if args else None, leaf))
            return (leaf.clone(), *rest) if rest else leaf.clone()  # the model may scale it in place (CTRL)

        handles = [m.register_forward_hook(hook) for m in modules.values()]
    try:
        logits = wrapper(*(feeds[n] for n in names))
    finally:
        for h in handles:
            h.remove()
    rows = torch.arange(logits.shape[0])
    explained_rows = logits if position is None else logits[rows, torch.as_tensor(position) % logits.shape[1]]
    explained = explained_rows[rows, torch.as_tensor(target)]
    explained.sum().backward()
    result = {"logits": logits.detach().numpy(), "explained": explained.detach().numpy(), "relevance": {}}
    if task == "image":
        x = feeds["pixel_values"]
        result["relevance"]["pixel_values"] = (x.detach().double() * x.grad.double()).numpy()
        return result
    for ids, leaf in captured:
        if leaf.grad is None:
            continue
        for name in names:
            layout = _ids_layout(ids, feeds[name]) if ids is not None and name.endswith("input_ids") else None
            if layout is not None:
                # in the layout of the graph input (XLNet looks up its ids transposed, [seq, batch])
                relevance = layout((leaf.detach().double() * leaf.grad.double()).numpy())
                if name in result["relevance"]:
                    result["relevance"][name] = result["relevance"][name] + relevance
                else:
                    result["relevance"][name] = relevance
    return result


def _ids_layout(looked_up, fed):
    """How the ids an embedding module looked up are laid out relative to the ids fed to the model: a
    function taking relevance [looked-up ids..., hidden] to [fed ids..., hidden] -- the identity, the
    inverse of a transpose, or a reshape -- or None if the module looked up other ids."""
    import itertools

    import torch

    if looked_up.shape == fed.shape and torch.equal(looked_up, fed):
        return lambda r: r
    if looked_up.dim() == fed.dim():
        for perm in itertools.permutations(range(fed.dim())):
            if fed.permute(perm).shape == looked_up.shape and torch.equal(fed.permute(perm), looked_up):
                inverse = [perm.index(a) for a in range(len(perm))] + [len(perm)]
                return lambda r: r.transpose(inverse)
    if looked_up.numel() == fed.numel() and torch.equal(looked_up.reshape(fed.shape), fed):
        return lambda r: r.reshape(tuple(fed.shape) + r.shape[looked_up.dim():])
    return None


def _embedding_modules(model):
    """The word-embedding module and every module sharing its table (e.g. BART's encoder and decoder
    each hold their own module tied to ``shared``), plus the decoder's own, if any."""
    modules = []
    with contextlib.suppress(Exception):
        modules.append(model.get_input_embeddings())
    with contextlib.suppress(Exception):
        decoder = model.get_decoder()
        if hasattr(decoder, "get_input_embeddings"):
            modules.append(decoder.get_input_embeddings())
        elif hasattr(decoder, "embed_tokens"):
            modules.append(decoder.embed_tokens)
    tables = {id(getattr(m, "weight", None)) for m in modules if m is not None}
    modules += [m for m in model.modules() if id(getattr(m, "weight", None)) in tables
                and type(m).__name__.endswith("Embedding")]
    unique = {id(m): m for m in modules if m is not None}
    return list(unique.values())


def rel_l2(a, b) -> float:
    import numpy as np

    b = np.asarray(b, np.float64)
    return float(np.linalg.norm(np.asarray(a, np.float64) - b) / max(np.linalg.norm(b), 1e-30))


# --------------------------------------------------------------------------- one architecture


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:600]


def refused_ops(message: str) -> list[str]:
    """The op types an lrp_onnx refusal names ('name' (domain::Op)), else a short key."""
    ops = re.findall(r"\((?:[\w.]+)::(\w+)\)", message)
    if ops:
        return sorted(set(ops))
    if "found no relevance source" in message:
        return ["<no relevance source>"]
    if "does not reach" in message:
        return ["<source does not reach output>"]
    return ["<other: " + message[:80] + ">"]


def run_architecture(model_type: str, exporters: list[str], workdir: Path, emit) -> None:
    """Build once, then per exporter: export, verify, convert, compare. ``emit(record)`` per exporter."""
    import numpy as np
    import onnxruntime as ort
    import torch

    import lrp_onnx
    from lrp_onnx.errors import LRPError

    task, class_name = architectures()[model_type]
    base = {"arch": model_type, "task": task, "class": class_name}
    try:
        _, model = build(model_type)
    except Exception as exc:  # noqa: BLE001 - any failure of transformers itself
        for exporter in exporters:
            emit(dict(base, exporter=exporter, status="build_failed", error=_one_line(exc)))
        return
    base["parameters"] = sum(p.numel() for p in model.parameters())
    hf_dir = None
    for exporter in exporters:
        record = dict(base, exporter=exporter)
        t0 = time.perf_counter()
        path = workdir / f"{model_type}-{exporter}.onnx"
        try:
            # 1. export, then check the graph against PyTorch on other shapes
            with contextlib.redirect_stdout(io.StringIO()):
                _, names = export(model, task, path, exporter)
            record["export_s"] = round(time.perf_counter() - t0, 1)
            inputs = explain_setup(task, names)
            options = ort.SessionOptions()
            options.log_severity_level = 3
            session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            # an input the graph does not read is dropped by the exporter (e.g. an unused mask)
            graph_inputs = {i.name for i in session.get_inputs()}
            feeds = {k: v for k, v in inputs.items() if k in graph_inputs}
            onnx_logits = session.run(["logits"], feeds)[0]
            wrapper, _ = wrap(model, task)
            with torch.no_grad():
                torch_logits = wrapper(*(torch.as_tensor(inputs[n]) for n in names)).numpy()
            scale = max(1.0, float(np.abs(torch_logits).max()))
            error = float(np.abs(onnx_logits - torch_logits).max()) if onnx_logits.shape == torch_logits.shape \
                else float("inf")
            record["export_error"] = error
            if not error <= EXPORT_TOLERANCE * scale:
                raise RuntimeError(f"onnxruntime logits {onnx_logits.shape} differ from PyTorch's "
                                   f"{tuple(torch_logits.shape)} by {error:.3g} on batch 2 x sequence 7")
        except Exception as exc:  # noqa: BLE001
            emit(dict(record, status="export_failed", error=_one_line(exc)))
            continue
        # 2. gradient mode against torch.autograd
        target, position = targets_for(torch_logits.shape, task)
        try:
            with true_gradients(model_type):
                reference = autograd_relevance(model, task, names, inputs, target, position)
        except Exception as exc:  # noqa: BLE001
            emit(dict(record, status="no_reference", error=_one_line(exc)))
            continue
        converted_path = workdir / f"{model_type}-{exporter}.gradient.onnx"
        t1 = time.perf_counter()
        try:
            stderr = io.StringIO()
            with contextlib.redirect_stderr(stderr):
                lrp_onnx.convert(path, converted_path, rules="gradient")
            record["convert_s"] = round(time.perf_counter() - t1, 1)
            if stderr.getvalue().strip():
                record["convert_stderr"] = stderr.getvalue().strip()[:300]
        except LRPError as exc:
            emit(dict(record, status="refused", error=str(exc).splitlines()[0][:2000], ops=refused_ops(str(exc))))
            continue
        except Exception as exc:  # noqa: BLE001
            emit(dict(record, status="convert_crash", error=_one_line(exc),
                      traceback=traceback.format_exc()[-1500:]))
            continue
        try:
            explainer = lrp_onnx.Explainer(converted_path, providers=["CPUExecutionProvider"])
            result = explainer.run(target=target, position=position, **feeds)
        except Exception as exc:  # noqa: BLE001
            emit(dict(record, status="convert_crash", error="running the converted model: " + _one_line(exc)))
            continue
        errors, problems = {}, []
        if not np.allclose(result.outputs["logits"], onnx_logits, rtol=1e-4, atol=1e-4 * scale):
            problems.append("original output changed")
        if not np.allclose(result.logit, reference["explained"], rtol=1e-4, atol=1e-4 * scale):
            problems.append("explained logit differs")
        sources = {name: result.relevances[out] for out, name in result.source_inputs.items()}
        if not reference["relevance"]:
            emit(dict(record, status="no_reference", error="the embedding module got no gradient"))
            continue
        missing = []
        for out, name in result.source_inputs.items():  # relevance in the layout of the ids it belongs to
            ids = feeds.get(name)
            got = result.relevances[out].shape
            if ids is not None and not np.issubdtype(ids.dtype, np.floating) and got[:ids.ndim] != ids.shape:
                problems.append(f"{name}: relevance {got} is not in the layout of the ids {ids.shape}")
        for name, expected in reference["relevance"].items():
            if name not in sources:
                missing.append(f"no relevance output for the lookup of {name} (sources: {sorted(sources)})")
                continue
            if sources[name].shape != expected.shape:
                problems.append(f"{name}: relevance shape {sources[name].shape} != {expected.shape}")
                continue
            errors[name] = rel_l2(sources[name], expected)
            if not errors[name] <= GRADIENT_TOLERANCE:
                problems.append(f"{name}: relative L2 error {errors[name]:.3g}")
        record["gradient_rel_l2"] = errors
        unchecked = sorted(set(sources) - set(errors))
        if problems:
            record["status"] = "wrong"
        elif unchecked or not errors:  # a source the reference did not see: not verified
            record["status"] = "no_reference"
            problems.append(f"no autograd reference for the relevance at {unchecked}")
        elif missing:  # exact where it explains, but a word-embedding lookup is not a source
            record["status"] = "partial"
        else:
            record["status"] = "exact"
        problems += missing
        if problems:
            record["error"] = "; ".join(problems)
        # 3. attnlrp against LXT where the project has an LXT reference for the family
        family = LXT_FAMILIES.get(model_type)
        if family is not None and not problems:
            try:
                if hf_dir is None:
                    hf_dir = workdir / f"{model_type}-hf"
                    model.save_pretrained(str(hf_dir), safe_serialization=True)
                record["attnlrp"] = lxt_check(family, hf_dir, path, workdir / f"{model_type}-{exporter}",
                                              inputs, feeds, target, position)
            except Exception as exc:  # noqa: BLE001
                record["attnlrp"] = {"status": "reference_failed", "error": _one_line(exc)}
        record["seconds"] = round(time.perf_counter() - t0, 1)
        emit(record)


def lxt_check(family, hf_dir, path, workdir, inputs, feeds, target, position) -> dict:
    import lrp_onnx
    from lrp_onnx.errors import LRPError
    from tests.reference import run_reference

    out = Path(f"{workdir}.attnlrp.onnx")
    try:
        lrp_onnx.convert(path, out, rules="attnlrp")
    except LRPError as exc:
        return {"status": "refused", "error": str(exc).splitlines()[0][:1000], "ops": refused_ops(str(exc))}
    ref_inputs = dict(inputs, target=target)
    if position is not None:
        ref_inputs["position"] = position
    ref = run_reference(family, hf_dir, "attnlrp", ref_inputs, Path(f"{workdir}-ref"))
    result = lrp_onnx.Explainer(out, providers=["CPUExecutionProvider"]).run(target=target, position=position,
                                                                              **feeds)
    errors = {}
    keys = {"input_ids": "relevance", "decoder_input_ids": "decoder_relevance", "pixel_values": "relevance"}
    for out_name, name in result.source_inputs.items():
        if keys.get(name) in ref:
            errors[name] = rel_l2(result.relevances[out_name], ref[keys[name]])
    ok = bool(errors) and all(e <= ATTNLRP_TOLERANCE for e in errors.values())
    return {"status": "exact" if ok else "wrong", "rel_l2": errors}


# --------------------------------------------------------------------------- driver


def worker(args) -> int:
    sys.path.insert(0, str(REPO))
    import warnings

    warnings.filterwarnings("ignore")
    import torch

    torch.set_num_threads(1)
    exporters = args.exporter.split(",")
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    with open(args.worker_out, "a") as sink:
        def emit(record):
            sink.write(json.dumps(record) + "\n")
            sink.flush()

        run_architecture(args.worker, exporters, workdir, emit)
    return 0


def run_sweep(archs: list[str], exporters: list[str], out: Path, jobs: int, timeout: int, keep: bool) -> list[dict]:
    records = []
    tmp = Path(tempfile.mkdtemp(prefix="lrp-sweep-"))
    pending = list(archs)
    running = {}
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1")
    start = time.time()

    def launch(arch):
        sink = tmp / f"{arch}.jsonl"
        command = [sys.executable, "-m", "tools.sweep", "--worker", arch, "--exporter", ",".join(exporters),
                   "--worker-out", str(sink), "--workdir", str(tmp / arch)]
        log = open(tmp / f"{arch}.log", "w")
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        running[arch] = (process, time.time(), sink, log)

    def collect(arch, timed_out):
        process, _, sink, log = running.pop(arch)
        log.close()
        got = []
        if sink.exists():
            got = [json.loads(line) for line in sink.read_text().splitlines() if line.strip()]
        seen = {r["exporter"] for r in got}
        task, class_name = architectures()[arch]
        for exporter in exporters:
            if exporter not in seen:
                tail = (tmp / f"{arch}.log").read_text(errors="replace").strip().splitlines()[-1:] or [""]
                got.append({"arch": arch, "task": task, "class": class_name, "exporter": exporter,
                            "status": "timeout" if timed_out else "worker_crash",
                            "error": f"after {timeout} s" if timed_out else
                            f"exit code {process.returncode}: {tail[0][:300]}"})
        for record in got:
            print(f"[{time.time() - start:6.0f}s] {record['arch']:<24} {record['exporter']:<11} "
                  f"{record['status']:<14} {record.get('error', '')[:150]}", flush=True)
        records.extend(got)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"records": records}, indent=1))

    while pending or running:
        while pending and len(running) < jobs:
            launch(pending.pop(0))
        time.sleep(0.5)
        for arch in list(running):
            process, started, _, _ = running[arch]
            if process.poll() is not None:
                collect(arch, False)
            elif time.time() - started > timeout:
                process.kill()
                process.wait()
                collect(arch, True)
    elapsed = time.time() - start
    result = {"elapsed_s": round(elapsed), "exporters": exporters, "records": records}
    out.write_text(json.dumps(result, indent=1))
    if not keep:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return records


def tally(records: list[dict]) -> str:
    lines = []
    counts = Counter(r["status"] for r in records)
    exported = sum(1 for r in records if r["status"] not in ("export_failed", "build_failed", "timeout",
                                                             "worker_crash", "not_applicable"))
    archs = {r["arch"] for r in records}
    lines.append(f"{len(archs)} architectures, {len(records)} (architecture, exporter) pairs")
    lines.append(f"exported (and equal to PyTorch): {exported}")
    lines.append(f"  converted and exact (gradient = autograd, rel L2 <= {GRADIENT_TOLERANCE:g}): {counts['exact']}")
    lines.append(f"  refused with the node named: {counts['refused']}")
    lines.append(f"  WRONG (converted, not equal): {counts['wrong']}")
    lines.append(f"  convert crashed (not an LRPError): {counts['convert_crash']}")
    lines.append(f"  no reference (no embedding lookup to compare at): {counts['no_reference']}")
    lines.append(f"  partial (exact at its sources, but a word-embedding lookup is not a source): {counts['partial']}")
    lines.append(f"export failed: {counts['export_failed']}; build failed: {counts['build_failed']}; "
                 f"timeout: {counts['timeout']}; worker crash: {counts['worker_crash']}")
    exact = [r for r in records if r["status"] == "exact"]
    if exact:
        worst = max(max(r["gradient_rel_l2"].values()) for r in exact)
        lines.append(f"largest gradient rel L2 among exact: {worst:.2g}")
    lxt = [r for r in records if "attnlrp" in r]
    if lxt:
        lines.append("attnlrp vs LXT: " + ", ".join(
            f"{r['arch']}/{r['exporter']}={r['attnlrp']['status']}"
            + (f"({max(r['attnlrp']['rel_l2'].values()):.1g})" if r["attnlrp"].get("rel_l2") else "")
            for r in lxt))
    by_op = defaultdict(list)
    for r in records:
        if r["status"] == "refused":
            for op in r["ops"]:
                by_op[op].append(f"{r['arch']}/{r['exporter'][0]}")
    if by_op:
        lines.append("refusals by op (t = torchscript, d = dynamo):")
        for op, who in sorted(by_op.items(), key=lambda kv: -len(kv[1])):
            lines.append(f"  {op:<28} {len(who):>3}: {', '.join(sorted(who))}")
    for status in ("wrong", "convert_crash", "no_reference", "partial"):
        for r in records:
            if r["status"] == status:
                lines.append(f"{status.upper()}: {r['arch']}/{r['exporter']}: {r.get('error', '')[:300]}")
    failures = [r for r in records if r["status"] in ("export_failed", "build_failed", "timeout", "worker_crash")]
    if failures:
        lines.append("not exported (not lrp_onnx's problem):")
        for r in failures:
            lines.append(f"  {r['arch']}/{r['exporter']}: {r['status']}: {r.get('error', '')[:160]}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", help="comma-separated model types (default: all applicable)")
    parser.add_argument("--exporter", default=",".join(EXPORTERS))
    parser.add_argument("--out", default="build/sweep.json")
    parser.add_argument("--jobs", type=int, default=1, help="architectures run in parallel")
    parser.add_argument("--timeout", type=int, default=600, help="seconds per architecture (all exporters)")
    parser.add_argument("--keep", action="store_true", help="keep the exported graphs (temporary directory)")
    parser.add_argument("--list", action="store_true", help="list the architectures and their tasks")
    parser.add_argument("--tally", help="print the tally of an earlier --out file")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args)
    if args.tally:  # several files: later records of the same (architecture, exporter) replace earlier ones
        merged = {}
        for name in args.tally.split(","):
            for record in json.loads(Path(name).read_text())["records"]:
                merged[(record["arch"], record["exporter"])] = record
        print(tally(list(merged.values())))
        return 0
    known = architectures()
    if args.list:
        for arch, (task, name) in known.items():
            print(f"{arch:<28} {task:<15} {name}{'  (n/a: ' + NOT_APPLICABLE[arch] + ')' if arch in NOT_APPLICABLE else ''}")
        return 0
    if args.arch:
        archs = args.arch.split(",")
        unknown = [a for a in archs if a not in known]
        if unknown:
            parser.error(f"unknown architecture(s) {unknown}; see --list")
    else:
        archs = [a for a in known if a not in NOT_APPLICABLE]
    exporters = args.exporter.split(",")
    if any(e not in EXPORTERS for e in exporters):
        parser.error(f"--exporter takes {', '.join(EXPORTERS)}")
    out = Path(args.out)
    records = run_sweep(archs, exporters, out, args.jobs, args.timeout, args.keep)
    print()
    print(tally(records))
    print(f"written {out}")
    return 1 if any(r["status"] in ("wrong", "convert_crash") for r in records) else 0


if __name__ == "__main__":
    sys.exit(main())
