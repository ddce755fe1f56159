"""Tiny random-weight Hugging Face transformers, and their ONNX exports, for tests.

Each model has about 25k parameters (hidden 32, 2 layers, 4 heads, vocab 100), so
building one takes milliseconds, a TorchScript export ~0.2 s and a dynamo export ~4 s.

    model = build("llama", seed=0)
    save(model, "out/hf")                      # safetensors, reloadable in another process
    model = load("llama", "out/hf")
    export(model, "out/model.onnx", exporter="torchscript")
    verify_export(model, "out/model.onnx")      # onnxruntime vs PyTorch, returns max |error|

CLI: ``python -m models.tiny --family llama --exporter torchscript --out DIR`` writes
``DIR/hf`` (Hugging Face weights) and ``DIR/model.onnx``.

The ONNX graph has inputs ``input_ids`` and ``attention_mask`` (int64 [batch, sequence],
both axes dynamic) and one output ``logits``: [batch, num_labels] for bert,
[batch, sequence, vocab] for the causal LMs (gpt2, llama, qwen2, qwen3, gemma3, mixtral,
qwen3_moe, qwen2_moe).
The encoder-decoder t5 has a third input ``decoder_input_ids`` (int64 [batch,
decoder_sequence], its own dynamic length; no KV cache) and ``logits`` [batch,
decoder_sequence, vocab].
The vision family vit has one input ``pixel_values`` (float [batch, 3, 16, 16], batch dynamic)
and outputs ``logits`` [batch, num_labels].
Initializers that survive constant folding are named ``"model." + <Hugging Face parameter
name>`` (the export wraps the model in ``LogitsOnly``); folded ones (e.g. transposed linear
weights) get generated names.
"""

from __future__ import annotations

import argparse
import importlib
import types
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from torch import nn

from models._common import LogitsOnly, Seq2SeqLogitsOnly, export_onnx

FAMILIES = ("bert", "gpt2", "llama", "qwen2", "qwen3", "gemma3", "t5", "mixtral", "qwen3_moe", "qwen2_moe", "vit")
MOE_FAMILIES = ("mixtral", "qwen3_moe", "qwen2_moe")
ENCODER_DECODER_FAMILIES = ("t5",)
VISION_FAMILIES = ("vit",)
EXPORTERS = ("torchscript", "dynamo")
VOCAB_SIZE = 100
HIDDEN_SIZE = 32
NUM_LAYERS = 2
NUM_HEADS = 4
INTERMEDIATE_SIZE = 64
MAX_POSITIONS = 64
NUM_LABELS = 3  # bert sequence classification, vit image classification
SEQ2SEQ_INPUT_NAMES = ("input_ids", "attention_mask", "decoder_input_ids")
MIXTRAL_NUM_EXPERTS = 4
MIXTRAL_TOP_K = 2
MOE_NUM_EXPERTS = MIXTRAL_NUM_EXPERTS  # all three MoE families: 4 experts, top-2, every layer sparse
MOE_TOP_K = MIXTRAL_TOP_K
MOE_INTERMEDIATE_SIZE = 16  # qwen3_moe / qwen2_moe experts
SHARED_EXPERT_INTERMEDIATE_SIZE = 24  # qwen2_moe's shared expert
IMAGE_SIZE = 16  # vit: 16x16 RGB images cut into 2x2 patches of 8x8 (+ the CLS token: 5 tokens)
PATCH_SIZE = 8
NUM_CHANNELS = 3

# (transformers module, config class, model class) per family. Classes are looked up at
# call time from the module, so a module patched by LXT (which may replace classes, as
# its BERT map does) is honoured as long as it is patched before build()/load().
_FAMILY_CLASSES = {
    "bert": ("transformers.models.bert.modeling_bert", "BertConfig", "BertForSequenceClassification"),
    "gpt2": ("transformers.models.gpt2.modeling_gpt2", "GPT2Config", "GPT2LMHeadModel"),
    "llama": ("transformers.models.llama.modeling_llama", "LlamaConfig", "LlamaForCausalLM"),
    "qwen2": ("transformers.models.qwen2.modeling_qwen2", "Qwen2Config", "Qwen2ForCausalLM"),
    "qwen3": ("transformers.models.qwen3.modeling_qwen3", "Qwen3Config", "Qwen3ForCausalLM"),
    "gemma3": ("transformers.models.gemma3.modeling_gemma3", "Gemma3TextConfig", "Gemma3ForCausalLM"),
    "t5": ("transformers.models.t5.modeling_t5", "T5Config", "T5ForConditionalGeneration"),
    "mixtral": ("transformers.models.mixtral.modeling_mixtral", "MixtralConfig", "MixtralForCausalLM"),
    "qwen3_moe": ("transformers.models.qwen3_moe.modeling_qwen3_moe", "Qwen3MoeConfig", "Qwen3MoeForCausalLM"),
    "qwen2_moe": ("transformers.models.qwen2_moe.modeling_qwen2_moe", "Qwen2MoeConfig", "Qwen2MoeForCausalLM"),
    "vit": ("transformers.models.vit.modeling_vit", "ViTConfig", "ViTForImageClassification"),
}
HEAD_DIM = HIDDEN_SIZE // NUM_HEADS
GEMMA3_SLIDING_WINDOW = 4
GEMMA3_FINAL_LOGIT_SOFTCAPPING = 30.0
GEMMA3_QUERY_PRE_ATTN_SCALAR = 16  # != HEAD_DIM, so the scaling differs from 1/sqrt(head_dim)
T5_RELATIVE_BUCKETS = 8   # relative-position buckets (4 exact, 4 logarithmic up to the max distance)
T5_RELATIVE_MAX_DISTANCE = 16
DECODER_SEQUENCE = 5      # decoder length of the t5 export's example inputs (!= the encoder's 6)


def _config_kwargs(family: str) -> dict:
    if family == "vit":  # patch embedding = Conv2d(3, 32, kernel 8, stride 8); q/k/v biases; exact GELU
        return dict(
            image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, num_channels=NUM_CHANNELS, hidden_size=HIDDEN_SIZE,
            num_hidden_layers=NUM_LAYERS, num_attention_heads=NUM_HEADS, intermediate_size=INTERMEDIATE_SIZE,
            num_labels=NUM_LABELS, hidden_act="gelu", qkv_bias=True,
        )
    common = dict(vocab_size=VOCAB_SIZE, use_cache=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if family == "bert":
        return dict(
            common, hidden_size=HIDDEN_SIZE, num_hidden_layers=NUM_LAYERS, num_attention_heads=NUM_HEADS,
            intermediate_size=INTERMEDIATE_SIZE, max_position_embeddings=MAX_POSITIONS,
            num_labels=NUM_LABELS, hidden_act="gelu",
        )
    if family == "gpt2":
        return dict(
            common, n_embd=HIDDEN_SIZE, n_layer=NUM_LAYERS, n_head=NUM_HEADS, n_inner=INTERMEDIATE_SIZE,
            n_positions=MAX_POSITIONS, activation_function="gelu_new",
        )
    if family == "llama":
        return dict(
            common, hidden_size=HIDDEN_SIZE, num_hidden_layers=NUM_LAYERS, num_attention_heads=NUM_HEADS,
            num_key_value_heads=2, intermediate_size=INTERMEDIATE_SIZE, max_position_embeddings=MAX_POSITIONS,
            hidden_act="silu", tie_word_embeddings=False,
        )
    decoder = dict(
        common, hidden_size=HIDDEN_SIZE, num_hidden_layers=NUM_LAYERS, num_attention_heads=NUM_HEADS,
        num_key_value_heads=2, intermediate_size=INTERMEDIATE_SIZE, max_position_embeddings=MAX_POSITIONS,
        tie_word_embeddings=False,
    )
    if family == "qwen2":  # q/k/v projections always have biases in Qwen2
        return dict(decoder, hidden_act="silu", use_sliding_window=False, sliding_window=None)
    if family == "qwen3":  # RMSNorm on each query/key head (qk-norm); head_dim must be set (default 128)
        return dict(decoder, hidden_act="silu", head_dim=HEAD_DIM, use_sliding_window=False, sliding_window=None)
    if family == "gemma3":
        # Layer 0 is sliding-window (window 4 < the tests' sequence 7), layer 1 global:
        # is_sliding = (layer_idx + 1) % sliding_window_pattern. attn_logit_softcapping stays None:
        # transformers 4.52's Gemma3Attention never passes it to the attention function.
        return dict(
            decoder, head_dim=HEAD_DIM, hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=True,
            query_pre_attn_scalar=GEMMA3_QUERY_PRE_ATTN_SCALAR, sliding_window=GEMMA3_SLIDING_WINDOW,
            sliding_window_pattern=2, final_logit_softcapping=GEMMA3_FINAL_LOGIT_SOFTCAPPING,
            attn_logit_softcapping=None, rope_theta=10_000.0, rope_local_base_freq=1_000.0,
            cache_implementation=None,  # "hybrid" only matters with a cache, and warns on every load
        )
    if family == "t5":
        # Flan-T5 settings: gated GELU (gelu_new, tanh form) MLP, untied LM head (so no d_model**-0.5
        # rescaling of the decoder output), RMS-style T5LayerNorm, relative position bias in layer 0.
        return dict(
            common, d_model=HIDDEN_SIZE, d_kv=HEAD_DIM, d_ff=INTERMEDIATE_SIZE, num_layers=NUM_LAYERS,
            num_decoder_layers=NUM_LAYERS, num_heads=NUM_HEADS, relative_attention_num_buckets=T5_RELATIVE_BUCKETS,
            relative_attention_max_distance=T5_RELATIVE_MAX_DISTANCE, feed_forward_proj="gated-gelu",
            tie_word_embeddings=False, dropout_rate=0.0, decoder_start_token_id=0,
        )
    if family == "mixtral":  # sparse MoE MLP: 4 SwiGLU experts, top-2 routing, weights renormalised
        return dict(
            decoder, hidden_act="silu", num_local_experts=MIXTRAL_NUM_EXPERTS, num_experts_per_tok=MIXTRAL_TOP_K,
            sliding_window=None, router_jitter_noise=0.0, output_router_logits=False,
        )
    moe = dict(num_experts=MOE_NUM_EXPERTS, num_experts_per_tok=MOE_TOP_K, moe_intermediate_size=MOE_INTERMEDIATE_SIZE,
               decoder_sparse_step=1, mlp_only_layers=[], output_router_logits=False, use_sliding_window=False,
               sliding_window=None)
    if family == "qwen3_moe":  # Qwen3 attention (qk-norm) + sparse MoE of 4 SwiGLU experts, top-2, renormalised
        return dict(decoder, **moe, hidden_act="silu", head_dim=HEAD_DIM, norm_topk_prob=True)
    if family == "qwen2_moe":  # Qwen2 attention (q/k/v biases) + sparse MoE + sigmoid-gated shared expert;
        # norm_topk_prob=False as in Qwen2MoeConfig's default (Qwen1.5-MoE): top-k weights not renormalised
        return dict(decoder, **moe, hidden_act="silu", qkv_bias=True, norm_topk_prob=False,
                    shared_expert_intermediate_size=SHARED_EXPERT_INTERMEDIATE_SIZE)
    raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")


def _family_classes(family: str):
    if family not in _FAMILY_CLASSES:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
    module_name, config_name, model_name = _FAMILY_CLASSES[family]
    module = importlib.import_module(module_name)
    config_module = importlib.import_module(module_name.replace(".modeling_", ".configuration_"))
    return getattr(config_module, config_name), getattr(module, model_name)


def _randomize_weights(model: nn.Module, seed: int) -> None:
    """Overwrite every parameter with deterministic, not-too-small random values.

    Matrices (linear, conv1d, embedding) ~ N(0, 0.2); vectors named ``*weight`` (norm
    scales) ~ 1 + N(0, 0.1); vectors named ``*bias`` ~ N(0, 0.1), so no bias is zero.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator, dtype=torch.float32)
            if param.dim() >= 2:
                param.copy_(0.2 * noise)
            elif name.endswith("bias"):
                param.copy_(0.1 * noise)
            else:
                param.copy_(1.0 + 0.1 * noise)


def build(family: str, seed: int = 0) -> nn.Module:
    """Return a tiny eval-mode fp32 model of ``family`` with eager attention and random weights.

    bert: BertForSequenceClassification (3 labels, with pooler, GELU); gpt2: GPT2LMHeadModel
    (gelu_new, tied embeddings); llama: LlamaForCausalLM (GQA with 2 key/value heads, RoPE,
    SwiGLU, RMSNorm, untied head); qwen2: Qwen2ForCausalLM (llama-like, with q/k/v biases);
    qwen3: Qwen3ForCausalLM (llama-like, no biases, RMSNorm on every query/key head);
    gemma3: text-only Gemma3ForCausalLM (Gemma3TextConfig: embeddings scaled by sqrt(hidden),
    RMSNorm with (1 + weight) before and after attention and MLP, qk-norm, gelu_pytorch_tanh
    gated MLP, attention scale query_pre_attn_scalar**-0.5 = 1/4 instead of 1/sqrt(8), layer 0
    sliding-window (window 4) and layer 1 global with their own RoPE bases, tied head, final
    logits softcapped as 30 * tanh(logits / 30)); t5: T5ForConditionalGeneration with Flan-T5
    settings (2 encoder + 2 decoder layers, gated gelu_new MLP, untied head, 8 relative-position
    buckets; one embedding table ``shared`` looked up by encoder and decoder). All with GQA (2
    key/value heads) except bert, gpt2 and t5, and ``use_cache=False``. Same seed, same weights.
    mixtral: MixtralForCausalLM (llama-like attention and RMSNorm; the MLP is a sparse MoE block of 4
    SwiGLU experts with top-2 routing: router softmax, top-k, weights renormalised to sum 1).
    qwen3_moe: Qwen3MoeForCausalLM (qwen3's qk-norm attention; both layers a sparse MoE block of 4
    SwiGLU experts of width 16, top-2, ``norm_topk_prob=True``: weights renormalised as Mixtral's).
    qwen2_moe: Qwen2MoeForCausalLM (qwen2's attention with q/k/v biases; both layers a sparse MoE block
    of 4 SwiGLU experts of width 16, top-2, ``norm_topk_prob=False``: the top-k softmax weights are
    used as they are, plus a SwiGLU shared expert of width 24 scaled by ``sigmoid(shared_expert_gate(x))``).
    vit: ViTForImageClassification (16x16 images, 8x8 patches by a strided Conv2d, CLS token,
    learned position embeddings, 3 labels from the CLS token's final state).
    """
    config_class, model_class = _family_classes(family)
    config = config_class(**_config_kwargs(family))
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = model_class(config)
    _randomize_weights(model, seed)
    return model.float().eval()


def save(model: nn.Module, directory: str | Path) -> None:
    """Save config and weights (safetensors) so that ``load`` can rebuild the model elsewhere."""
    model.save_pretrained(str(directory), safe_serialization=True)


def load(family: str, directory: str | Path) -> nn.Module:
    """Reload a model written by ``save`` as an eval-mode fp32 model with eager attention."""
    _, model_class = _family_classes(family)
    model = model_class.from_pretrained(str(directory), attn_implementation="eager", torch_dtype=torch.float32)
    return model.eval()




def example_inputs(batch: int = 2, sequence: int = 6, seed: int = 0,
                   decoder_sequence: int | None = None) -> dict[str, torch.Tensor]:
    """Random token ids (never the pad id 0) and a mask whose row 1 (if any) is right-padded.

    Row 1 loses its last two positions (one if ``sequence`` is 2; none if it is 1). With
    ``decoder_sequence`` (encoder-decoder models) also ``decoder_input_ids``: the decoder start
    token 0, then random ids; the decoder is not padded (causal, no decoder mask).
    """
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1, VOCAB_SIZE, (batch, sequence), generator=generator)
    attention_mask = torch.ones(batch, sequence, dtype=torch.int64)
    padding = min(2, sequence - 1)
    if batch > 1 and padding > 0:
        attention_mask[1, sequence - padding:] = 0
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
    if decoder_sequence is not None:
        decoder_input_ids = torch.randint(1, VOCAB_SIZE, (batch, decoder_sequence), generator=generator)
        decoder_input_ids[:, 0] = 0
        inputs["decoder_input_ids"] = decoder_input_ids
    return inputs


def _is_encoder_decoder(model: nn.Module) -> bool:
    return bool(getattr(model.config, "is_encoder_decoder", False))


def example_pixels(batch: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random N(0, 1) images for the vit family: ``pixel_values`` float32 [batch, 3, 16, 16]."""
    generator = torch.Generator().manual_seed(seed)
    return {"pixel_values": torch.randn(batch, NUM_CHANNELS, IMAGE_SIZE, IMAGE_SIZE, generator=generator)}


class PixelLogits(nn.Module):
    """Wrap an image classifier so it maps pixel_values to its logits alone."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixel_values, return_dict=False)[0]


def is_vision(model: nn.Module) -> bool:
    return model.config.model_type in VISION_FAMILIES


def export(model: nn.Module, path: str | Path, exporter: str = "torchscript", opset: int | None = None) -> Path:
    """Export ``model`` to a single self-contained ONNX file and return its path.

    ``exporter="torchscript"`` uses ``torch.onnx.export(dynamo=False)``; opset 14-21 work
    (default 17; from 17 on LayerNorm is one ``LayerNormalization`` node, below it is
    written out). ``exporter="dynamo"`` uses ``torch.onnx.export(dynamo=True)``; opsets
    18-21 work (default 18). Dynamo quietly exports opset 18 when asked for less than 17,
    and its down-conversion to 17 breaks gpt2 (``Split`` with ``num_outputs``); at 23 it
    emits ``RMSNormalization``/``RotaryEmbedding``, which onnxruntime 1.32 fails to run for llama.
    The MoE blocks (mixtral, qwen3_moe, qwen2_moe) are exported with ``moe_forward_all_experts``
    (same values; both exporters work with it, while the Mixtral and Qwen2-MoE forwards of
    transformers 4.52 are traced with the routing of the example baked in and refused by torch.export).
    """
    if is_vision(model):
        return export_onnx(PixelLogits(model).eval(), path, example_pixels(), ["logits"], exporter=exporter,
                           opset=opset, input_axes={"pixel_values": {0: "batch"}}, output_axes={"logits": {0: "batch"}})
    if _is_encoder_decoder(model):
        return export_onnx(Seq2SeqLogitsOnly(model).eval(), path, example_inputs(decoder_sequence=DECODER_SEQUENCE),
                           ["logits"], exporter=exporter, opset=opset, max_sequence=MAX_POSITIONS,
                           input_names=SEQ2SEQ_INPUT_NAMES, sequence_axes={"decoder_input_ids": "decoder_sequence"},
                           output_axes={"logits": {0: "batch", 1: "decoder_sequence"}})
    with _moe_loops_over_all_experts(model):
        return export_onnx(LogitsOnly(model).eval(), path, example_inputs(), ["logits"], exporter=exporter,
                           opset=opset, max_sequence=MAX_POSITIONS)


MOE_BLOCKS = ("MixtralSparseMoeBlock", "Qwen3MoeSparseMoeBlock", "Qwen2MoeSparseMoeBlock")


def moe_forward_all_experts(self, hidden_states: torch.Tensor):
    """The sparse MoE block's forward of transformers 4.52 (Mixtral, Qwen3-MoE, Qwen2-MoE), looping
    over every expert.

    Mixtral's and Qwen2-MoE's originals loop over the experts that got at least one token, computed
    with ``.tolist()``: a trace bakes in the experts hit by the export example, and an expert missed
    there would be missing from the graph for every other input (torch.export refuses the
    data-dependent loop outright). Qwen3-MoE's already loops over all experts; it gets this forward
    too, which computes the same. Here an expert with no tokens gathers an empty batch and adds
    nothing, so the result is the same for every input and the exported graph routes at run time
    (OneHot, NonZero, Gather, ScatterND/ScatterElements). The top-k weights are renormalised unless
    the block has ``norm_topk_prob=False`` (Qwen's flag; Mixtral always renormalises). A Qwen2-MoE
    shared expert is added as ``sigmoid(shared_expert_gate(x)) * shared_expert(x)``. Inference only:
    no router jitter.
    """
    batch_size, sequence_length, hidden_dim = hidden_states.shape
    hidden_states = hidden_states.view(-1, hidden_dim)
    router_logits = self.gate(hidden_states)
    routing_weights = nn.functional.softmax(router_logits, dim=1, dtype=torch.float)
    routing_weights, selected_experts = torch.topk(routing_weights, self.top_k, dim=-1)
    if getattr(self, "norm_topk_prob", True):
        routing_weights /= routing_weights.sum(dim=-1, keepdim=True)
    routing_weights = routing_weights.to(hidden_states.dtype)
    final_hidden_states = torch.zeros_like(hidden_states)
    expert_mask = nn.functional.one_hot(selected_experts, num_classes=self.num_experts).permute(2, 1, 0)
    for expert_idx in range(self.num_experts):
        idx, top_x = torch.where(expert_mask[expert_idx])
        current_state = hidden_states[None, top_x].reshape(-1, hidden_dim)
        current_hidden_states = self.experts[expert_idx](current_state) * routing_weights[top_x, idx, None]
        final_hidden_states.index_add_(0, top_x, current_hidden_states.to(hidden_states.dtype))
    if hasattr(self, "shared_expert"):
        shared = nn.functional.sigmoid(self.shared_expert_gate(hidden_states)) * self.shared_expert(hidden_states)
        final_hidden_states = final_hidden_states + shared
    return final_hidden_states.reshape(batch_size, sequence_length, hidden_dim), router_logits


@contextmanager
def _moe_loops_over_all_experts(model: nn.Module):
    """Give every sparse MoE block (``MOE_BLOCKS``) ``moe_forward_all_experts`` for the duration (export)."""
    blocks = [m for m in model.modules() if type(m).__name__ in MOE_BLOCKS]
    for block in blocks:
        block.forward = types.MethodType(moe_forward_all_experts, block)
    try:
        yield
    finally:
        for block in blocks:
            del block.forward


def onnx_logits(path: str | Path, inputs: dict) -> np.ndarray:
    """Run the exported model in onnxruntime (CPU) and return its logits."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {name: torch.as_tensor(value).numpy() for name, value in inputs.items()}
    return session.run(["logits"], feeds)[0]


def verify_export(model: nn.Module, path: str | Path, inputs: dict | None = None, atol: float = 1e-4) -> float:
    """Check that the ONNX file reproduces the PyTorch logits; return the max abs error.

    Default inputs: batch 2, sequence 7 (not the export's 6), row 1 right-padded; for t5 a
    decoder sequence of 4 (not the export's 5); for vit, batch 3 (not the export's 2) of other
    random images.
    """
    seq2seq = _is_encoder_decoder(model)
    if inputs is None:
        if is_vision(model):
            inputs = example_pixels(batch=3, seed=1)
        else:
            inputs = example_inputs(batch=2, sequence=7, seed=1, decoder_sequence=4 if seq2seq else None)
    with torch.no_grad():
        if is_vision(model):
            expected = PixelLogits(model)(inputs["pixel_values"]).numpy()
        elif seq2seq:
            expected = Seq2SeqLogitsOnly(model)(*(inputs[name] for name in SEQ2SEQ_INPUT_NAMES)).numpy()
        else:
            expected = LogitsOnly(model)(inputs["input_ids"], inputs["attention_mask"]).numpy()
    error = float(np.abs(onnx_logits(path, inputs) - expected).max())
    if not error < atol:
        raise AssertionError(f"{path}: ONNX logits differ from PyTorch by {error:.3g} (atol {atol})")
    return error


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=FAMILIES, required=True)
    parser.add_argument("--exporter", choices=EXPORTERS, default="torchscript")
    parser.add_argument("--opset", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True, help="directory; receives hf/ and model.onnx")
    args = parser.parse_args(argv)
    out = Path(args.out)
    model = build(args.family, args.seed)
    save(model, out / "hf")
    path = export(model, out / "model.onnx", args.exporter, args.opset)
    print(f"{path} (max abs error vs PyTorch {verify_export(model, path):.2g})")


if __name__ == "__main__":
    main()
