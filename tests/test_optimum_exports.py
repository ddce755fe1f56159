"""Graphs exported by others, the CI share of tools/optimum_sweep.py: optimum's exporter writes the files
of a few tiny architectures (a decoder with past, an encoder-decoder's four files, DeBERTa-v2, ConvNeXt-V2
with its GRN), and every file converts and explains with finite relevance, or is refused by design
(an encoder-decoder's decoder with past: its cross-attention cache is read as data) naming the reader."""
import pytest

from tools.optimum_sweep import run_architecture

EXPECTED = {  # arch -> {file: status prefix}
    "mistral": {"model.onnx": "ok (KV-cache inputs bound: 4)"},
    "deberta-v2": {"model.onnx": "ok (KV-cache inputs bound: 0)"},
    "convnextv2": {"model.onnx": "ok (KV-cache inputs bound: 0)"},
    "bart": {"encoder_model.onnx": "ok (KV-cache inputs bound: 0)",
             "decoder_model.onnx": "ok (KV-cache inputs bound: 0)",
             "decoder_model_merged.onnx": "ok (KV-cache inputs bound: 9)",
             "decoder_with_past_model.onnx": "refused: cache input 'past_key_values.0.encoder.key': read as data by"},
}


@pytest.mark.parametrize("arch", list(EXPECTED))
def test_optimum_export_converts_or_is_refused_by_design(arch, tmp_path):
    record = run_architecture(arch, tmp_path)
    assert "export" not in record, record
    assert sorted(record["files"]) == sorted(EXPECTED[arch])
    for name, status in record["files"].items():
        assert status.startswith(EXPECTED[arch][name]), (name, status)
