"""KV-cache exports of a causal LM, written by optimum (optimum-onnx), for tests of lrp_onnx/passes/cache.py.

    with_past(hf_dir, "out/with_past.onnx")   # inputs input_ids, attention_mask, position_ids,
                                              #   past_key_values.N.key/.value [batch, kv_heads, past, head_dim];
                                              #   outputs logits, present.N.key/.value
    merged(hf_dir, "out/merged.onnx")         # optimum's merged decoder: the same inputs plus
                                              #   use_cache_branch (bool [1]); one If whose branches are
                                              #   the decoder without past (false) and with past (true)
    seq2seq(hf_dir, "out/t5")                 # an encoder-decoder: encoder, decoder, decoder with past
                                              #   (self- and cross-attention caches), merged decoder

hf_dir: a Hugging Face model directory (config.json + weights), e.g. models.tiny.save's. Both use
optimum's own export code (its ONNX configs, dummy inputs, dynamic axes, merge_decoders): the form
users of `optimum-cli export onnx --task text-generation-with-past` get.

CLI: ``python -m models.kvcache --hf DIR --out DIR`` writes with_past.onnx and merged.onnx."""
from __future__ import annotations

import argparse
import contextlib
import io
import warnings
from pathlib import Path


def _config(model, use_past_in_inputs: bool):
    from optimum.exporters.tasks import TasksManager

    constructor = TasksManager.get_exporter_config_constructor(exporter="onnx", model=model, task="text-generation-with-past",
                                                               library_name="transformers")
    config = constructor(model.config)
    return config.__class__(model.config, task="text-generation", use_past=True,
                            use_past_in_inputs=use_past_in_inputs)


def _export(model, path: Path, use_past_in_inputs: bool) -> Path:
    from optimum.exporters.onnx.convert import export

    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        export(model, _config(model, use_past_in_inputs), path)
    return path


def _load(hf_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(hf_dir).eval()


def with_past(hf_dir, path) -> Path:
    """optimum's decoder with past key/values in its inputs (what text-generation-with-past writes)."""
    return _export(_load(hf_dir), Path(path), use_past_in_inputs=True)


def merged(hf_dir, path) -> Path:
    """optimum's merged decoder: merge_decoders(decoder without past, decoder with past)."""
    from optimum.onnx.graph_transformations import merge_decoders

    path = Path(path)
    model = _load(hf_dir)
    first = _export(model, path.with_name(path.stem + ".decoder.onnx"), use_past_in_inputs=False)
    second = _export(model, path.with_name(path.stem + ".decoder_with_past.onnx"), use_past_in_inputs=True)
    merge_decoders(first, second, save_path=path)
    first.unlink()
    second.unlink()
    return path


def seq2seq(hf_dir, out_dir) -> dict:
    """optimum's export of an encoder-decoder with past (`text2text-generation-with-past`): {"encoder",
    "decoder" (no past), "decoder_with_past", "decoder_merged"} -> paths."""
    from optimum.exporters.onnx import main_export

    out = Path(out_dir)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        main_export(str(hf_dir), output=out, task="text2text-generation-with-past")
    names = {"encoder": "encoder_model", "decoder": "decoder_model", "decoder_with_past": "decoder_with_past_model",
             "decoder_merged": "decoder_model_merged"}
    return {k: out / f"{v}.onnx" for k, v in names.items()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hf", required=True, help="Hugging Face model directory (config.json + weights)")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    out = Path(args.out)
    print(with_past(args.hf, out / "with_past.onnx"))
    print(merged(args.hf, out / "merged.onnx"))


if __name__ == "__main__":
    main()
