"""Shared fixtures: tiny exported models (built once per session) and their PyTorch references."""
import os
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# sum(input relevance) / explained logit, per model and rule set: reported, not asserted
CONSERVATION = {}


@pytest.fixture(scope="session")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("lrp")


@pytest.fixture(scope="session")
def tiny_model(workdir):
    """tiny_model(family, exporter) -> (hf_dir, onnx_path), exported once per session."""
    from models import tiny

    cache = {}

    def get(family, exporter="torchscript"):
        key = (family, exporter)
        if key not in cache:
            out = workdir / f"{family}-{exporter}"
            hf_dir = out / "hf"
            if not hf_dir.exists():
                model = tiny.build(family, seed=0)
                tiny.save(model, hf_dir)
            else:
                model = tiny.load(family, hf_dir)
            path = tiny.export(model, out / "model.onnx", exporter=exporter)
            cache[key] = (hf_dir, path)
        return cache[key]

    return get


TOLERANCE = {"gradient": 1e-4, "attnlrp": 1e-3, "cp-lrp": 1e-3}  # relative L2 error vs the reference


def rel_l2(a, b):
    return float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b))


@pytest.fixture(scope="session")
def converted(tiny_model, workdir):
    """converted(family, exporter, rules) -> Explainer of the converted tiny model, once per session."""
    import lrp_onnx

    cache = {}

    def get(family, exporter, rules):
        key = (family, exporter, rules)
        if key not in cache:
            _, path = tiny_model(family, exporter)
            out = workdir / f"{family}-{exporter}" / f"model.{rules}.onnx"
            lrp_onnx.convert(path, out, rules=rules)
            cache[key] = lrp_onnx.Explainer(out, providers=["CPUExecutionProvider"])
        return cache[key]

    return get


def run_explainer(explainer, family):
    """Explain explain_inputs(family) with its targets (and positions)."""
    inputs = explain_inputs(family)
    feed = {k: inputs[k] for k in ("input_ids", "attention_mask", "decoder_input_ids") if k in inputs}
    return explainer.run(target=inputs["target"], position=inputs.get("position"), **feed)


def explain_inputs(family):
    """Batch of 2, row 1 right-padded, a different target (and position) per row. Encoder-decoder
    families (t5) add 5 decoder tokens; their positions index the decoder sequence (-1 is its
    last token, not the encoder's)."""
    from models import tiny

    decoder_sequence = 5 if family in tiny.ENCODER_DECODER_FAMILIES else None
    inputs = {k: v.numpy() for k, v in tiny.example_inputs(batch=2, sequence=7, seed=3,
                                                           decoder_sequence=decoder_sequence).items()}
    inputs["target"] = np.array([1, 2] if family == "bert" else [7, 42], dtype=np.int64)
    if decoder_sequence is not None:
        inputs["position"] = np.array([-1, 2], dtype=np.int64)
    elif family != "bert":
        inputs["position"] = np.array([-1, 4], dtype=np.int64)  # row 1's last real token is 4
    return inputs


@pytest.fixture(scope="session")
def reference(workdir, tiny_model):
    """reference(family, mode) -> arrays from tests/reference.py, run once per session in a subprocess."""
    from tests.reference import run_reference

    cache = {}

    def get(family, mode):
        if (family, mode) not in cache:
            hf_dir, _ = tiny_model(family)
            cache[(family, mode)] = run_reference(family, hf_dir, mode, explain_inputs(family), workdir / "ref")
        return cache[(family, mode)]

    return get


def pytest_terminal_summary(terminalreporter):
    if CONSERVATION:
        terminalreporter.write_sep("-", "sum(input relevance) / explained logit (reported, not asserted)")
        for key, ratio in sorted(CONSERVATION.items()):
            terminalreporter.write_line(f"{' '.join(key):<32} " + "  ".join(f"{r:+.3f}" for r in ratio))
