"""A tiny random-weight LLaMA written by onnxruntime-genai's model builder (KV-cache form), and the
no-cache export of the same weights, for the KV-cache tests.

    hf = hf_dir("out", seed=0)              # out/hf: LlamaForCausalLM config + safetensors + tokenizer
    genai = export_genai("out", seed=0)     # out/genai/model.onnx (+ model.onnx.data), fp32, cpu
    plain = export_no_cache("out", seed=0)  # out/no_cache.onnx: models.tiny's export of the same weights

CLI: ``python -m models.genai --out DIR [--seed N]`` writes all three.

The model: LlamaForCausalLM, 2 layers, hidden 64, 4 heads of 16, 2 key/value heads, SwiGLU MLP of
128, vocab 100, 64 positions, untied head; weights randomised as ``models.tiny`` does. The head size is
16 (not models.tiny's 8) because onnxruntime's CPU GroupQueryAttention with do_rotary refuses a head
size that is not a multiple of 16.

The builder (onnxruntime-genai 0.18.0, ``onnxruntime_genai.models.builder``, run offline from the
local Hugging Face directory with ``-p fp32 -e cpu``) is written for transformers 5. Under the
transformers 4.52 installed here it runs after three shims applied in its own process (see
``_run_builder``): placeholder classes for four vision-language model classes transformers 4.52 does
not have (``base.py`` imports them for a dispatch table the LLaMA path never uses), the config's
``rope_scaling=None`` dropped (the builder iterates over it), and ``rope_parameters`` =
``{"rope_type": "default", "rope_theta": config.rope_theta}`` (transformers 5's layout, which the
builder's LLaMA RoPE reads). It needs a tokenizer in the directory (``AutoTokenizer``): a WordLevel
one, "wN" -> N, is written next to the weights.

The builder's graph (opset 22 + com.microsoft 1): inputs ``input_ids`` int64 [batch_size,
sequence_length], ``attention_mask`` int64 [batch_size, total_sequence_length], and per layer L
``past_key_values.L.key`` / ``.value`` float [batch_size, 2, past_sequence_length, kv_cache_dim];
outputs ``logits`` float [batch_size, sequence_length, 100] and ``present.L.key`` / ``.value`` float
[batch_size, 2, total_sequence_length, kv_cache_dim]. seqlens_k = Cast<int32>(ReduceSum(attention_mask,
axis 1) - 1), total_sequence_length = Cast<int32>(Shape(attention_mask)[1]), shared by both layers'
GroupQueryAttention (packed QKV from one MatMul, do_rotary=1 on cos_cache/sin_cache [64, 8],
rotary_interleaved=0, local_window_size=-1, softcap=0, scale=1/4, no position_ids). Norms are
SimplifiedLayerNormalization (first) and SkipSimplifiedLayerNormalization (the rest); fp32 linears are
plain MatMuls (no MatMulNBits). Feeding the past inputs as empty [batch, 2, 0, 16] tensors computes the
full-sequence logits (equal to the no-cache export's on the valid positions).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import torch

from models import tiny

REPO = Path(__file__).resolve().parent.parent
GENAI_VERSION = "0.18.0"
HIDDEN_SIZE = 64
NUM_HEADS = 4
NUM_KV_HEADS = 2
HEAD_DIM = HIDDEN_SIZE // NUM_HEADS  # 16: onnxruntime's GroupQueryAttention with do_rotary needs a multiple of 16
INTERMEDIATE_SIZE = 128
MISSING_CLASSES = ("Lfm2VlForConditionalGeneration", "Qwen3_5ForConditionalGeneration",
                   "Qwen3_5MoeForConditionalGeneration", "Qwen3VLForConditionalGeneration")


def build(seed: int = 0) -> torch.nn.Module:
    """The tiny LlamaForCausalLM above, eval mode, fp32, eager attention, weights as models.tiny's."""
    from transformers import LlamaConfig, LlamaForCausalLM

    kwargs = dict(tiny._config_kwargs("llama"), hidden_size=HIDDEN_SIZE, num_attention_heads=NUM_HEADS,
                  num_key_value_heads=NUM_KV_HEADS, intermediate_size=INTERMEDIATE_SIZE)
    config = LlamaConfig(**kwargs)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    tiny._randomize_weights(model, seed)
    return model.float().eval()


def _save_tokenizer(directory: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, **{f"w{i}": i for i in range(1, tiny.VOCAB_SIZE)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[UNK]").save_pretrained(str(directory))


def hf_dir(dst_dir: str | Path, seed: int = 0) -> Path:
    """dst_dir/hf: the model's config + safetensors + tokenizer (written once, reused after)."""
    directory = Path(dst_dir) / "hf"
    if not (directory / "model.safetensors").exists() or not (directory / "tokenizer.json").exists():
        directory.mkdir(parents=True, exist_ok=True)
        tiny.save(build(seed), directory)
        _save_tokenizer(directory)
    return directory


def export_no_cache(dst_dir: str | Path, seed: int = 0) -> Path:
    """dst_dir/no_cache.onnx: models.tiny's TorchScript export (input_ids, attention_mask -> logits) of
    the weights in dst_dir/hf."""
    path = Path(dst_dir) / "no_cache.onnx"
    if not path.exists():
        model = tiny.load("llama", hf_dir(dst_dir, seed))
        tiny.export(model, path)
    return path


def _run_builder(argv: list[str]) -> None:
    """onnxruntime-genai's builder CLI with the transformers-4.52 shims (see the module docstring).
    Runs in its own process (export_genai): the shims patch transformers."""
    import runpy

    import transformers

    for name in MISSING_CLASSES:
        if not hasattr(transformers, name):
            setattr(transformers, name, type(name, (), {}))
    original = transformers.AutoConfig.from_pretrained.__func__

    def from_pretrained(cls, *args, **kwargs):
        result = original(cls, *args, **kwargs)
        config = result[0] if isinstance(result, tuple) else result
        if getattr(config, "rope_scaling", 0) is None:
            del config.rope_scaling
        if not hasattr(config, "rope_parameters"):
            config.rope_parameters = {"rope_type": "default", "rope_theta": config.rope_theta}
        return result

    transformers.AutoConfig.from_pretrained = classmethod(from_pretrained)
    import onnxruntime_genai.models  # noqa: F401  (puts the builder's own modules on sys.path)

    sys.argv = ["onnxruntime_genai.models.builder", *argv]
    runpy.run_module("onnxruntime_genai.models.builder", run_name="__main__")


def export_genai(dst_dir: str | Path, seed: int = 0, timeout: float = 300) -> Path:
    """dst_dir/genai/model.onnx (+ model.onnx.data, genai_config.json, tokenizer files): the builder's
    fp32 CPU export of dst_dir/hf. Raises RuntimeError with the builder's output tail if it fails."""
    return run_builder(hf_dir(dst_dir, seed), Path(dst_dir) / "genai", "fp32", timeout=timeout)


def run_builder(source: str | Path, out: str | Path, precision: str = "fp32", extra_options: dict | None = None,
                timeout: float = 600) -> Path:
    """out/model.onnx: onnxruntime-genai's builder run on the Hugging Face directory `source` (config,
    safetensors, tokenizer) with ``-p precision -e cpu`` (fp32, int4: MatMulNBits weights, a
    GatherBlockQuantized embedding where the builder writes one) and ``--extra_options`` (e.g.
    ``{"int4_accuracy_level": 1}``). Written once, reused after."""
    out = Path(out)
    path = out / "model.onnx"
    if path.exists():
        return path
    argv = ["-i", str(source), "-o", str(out), "-p", precision, "-e", "cpu", "-c", str(out) + "-cache"]
    if extra_options:
        argv += ["--extra_options", *(f"{k}={v}" for k, v in extra_options.items())]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONPATH=str(REPO))
    done = subprocess.run([sys.executable, "-c", f"from models.genai import _run_builder; _run_builder({argv!r})"],
                          cwd=str(REPO), env=env, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0 or not path.exists():
        raise RuntimeError(f"onnxruntime-genai builder failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return path


def empty_past(model_path: str | Path, batch: int) -> dict[str, np.ndarray]:
    """The builder graph's past_key_values.* inputs as empty float32 [batch, kv_heads, 0, head_dim]."""
    model = onnx.load(str(model_path), load_external_data=False)
    return {i.name: np.zeros((batch, NUM_KV_HEADS, 0, HEAD_DIM), np.float32)
            for i in model.graph.input if i.name.startswith("past_key_values.")}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(export_genai(args.out, args.seed))
    print(export_no_cache(args.out, args.seed))


if __name__ == "__main__":
    main()
