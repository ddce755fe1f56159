"""examples/web in a real browser: Debian's Chromium, headless, driven by puppeteer-core
(examples/web/test/drive.mjs) against a static server on 127.0.0.1 that this module starts and stops.
The page tokenizes in JavaScript and runs onnxruntime-web; its relevance must equal
lrp_onnx.Explainer's (onnxruntime, CPU) for the same text and target, its tokens the `tokenizers`
package's, its colours lrp_onnx.run.heatmap's. Screenshots go to docs/web_*.png with LRP_UPDATE_DOCS=1.

Needs `bash tools/install_browser.sh` (chromium via apt-get, `npm ci` in examples/web); without it
the tests fail, saying so."""
import contextlib
import functools
import http.server
import json
import os
import re
import shutil
import subprocess
import threading
import urllib.parse
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper

import lrp_onnx
from lrp_onnx.run.heatmap import relevance_color, token_pieces
from tests.conftest import CPU, REPO, rel_l2

WEB = REPO / "examples" / "web"
DOCS = REPO / "docs"


def keep_screenshot(shot, name):
    """Screenshots refresh docs/ only when asked (LRP_UPDATE_DOCS=1): a test run leaves the checkout as it was."""
    assert shot.stat().st_size > 10_000  # a rendered page, not an empty canvas
    if os.environ.get("LRP_UPDATE_DOCS") == "1":
        shutil.copy(shot, DOCS / name)
TOLERANCE = 1e-4  # relative L2 between the page's relevance and Explainer's (seen: <= 1.5e-6)

# texts that exercise the tokenizers: accents, CJK, digits, emoji, contractions, control and
# zero-width characters, runs of spaces, special tokens written in the text
TRICKY = [
    "The capital of  France is Ünïcödé 12345 don't [CLS]<|im_end|> 你好!",
    "tabs\tand\nnewlines\r\n here  ", "emoji 😀 and ZWJ 👨‍👩‍👧 flags 🇫🇷", "I'll we've they're she'd it's",
    "numbers 3.14159, 1,000,000 and ٣٤٥", "Ça va? Señor naïve café résumé Straße İstanbul",
    "a-b_c/d\\e|f~g`h^i", "x\u0000y\ufeffz\u200bw", "supercalifragilisticexpialidocious", "日本語のテキストと한국어",
    "<|im_start|>user\nHi<|im_end|>",
]


def _require_browser():
    """Chromium and examples/web's node_modules, or a failure that says how to install them."""
    chromium = shutil.which("chromium")
    problems = [] if chromium else ["no chromium on PATH"]
    if shutil.which("node") is None:
        problems.append("no node on PATH")
    for package in ("onnxruntime-web", "puppeteer-core"):
        if not (WEB / "node_modules" / package / "package.json").exists():
            problems.append(f"examples/web/node_modules/{package} is missing")
    if problems:
        pytest.fail(f"{'; '.join(problems)}: run `bash tools/install_browser.sh` first", pytrace=False)
    return chromium


@pytest.fixture(scope="session", autouse=True)
def browser():
    """Fails first, before any model is exported, where the browser or the npm packages are missing."""
    return _require_browser()


class _StaticFiles(http.server.SimpleHTTPRequestHandler):
    """GET only, from a few roots: URL prefix -> folder. Nothing outside them is served."""
    extensions_map = {**http.server.SimpleHTTPRequestHandler.extensions_map,
                      ".mjs": "text/javascript", ".wasm": "application/wasm", ".onnx": "application/octet-stream"}

    def __init__(self, *args, roots, **kwargs):
        self.roots = roots
        super().__init__(*args, **kwargs)

    def translate_path(self, path):
        path = urllib.parse.unquote(urllib.parse.urlsplit(path).path)
        for prefix, root in self.roots.items():
            if path.startswith(prefix):
                target = (root / path[len(prefix):]).resolve()
                if target == root.resolve() or root.resolve() in target.parents:
                    return str(target)
        return str(WEB / "no such file")

    def log_message(self, *args):
        pass


@contextlib.contextmanager
def serve(models: Path):
    """http://127.0.0.1:PORT: / is examples/web, /models/ is `models`; stopped on exit."""
    handler = functools.partial(_StaticFiles, roots={"/models/": models, "/": WEB})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def drive(spec: dict, tmp_path: Path, timeout=240) -> dict:
    """Run examples/web/test/drive.mjs on `spec`; -> what it printed."""
    spec = {"chromium": _require_browser(), "timeoutMs": (timeout - 30) * 1000, **spec}
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec))
    done = subprocess.run(["node", str(WEB / "test" / "drive.mjs"), str(path)], capture_output=True, text=True,
                          timeout=timeout, cwd=WEB)
    assert done.returncode == 0, f"drive.mjs failed:\n{done.stderr}\n{done.stdout[-2000:]}"
    return json.loads(done.stdout)


def page_url(base, folder, **params):
    query = urllib.parse.urlencode({"model": f"/models/{folder}/model.lrp.onnx",
                                    "tokenizer": f"/models/{folder}/tokenizer.json", **params})
    return f"{base}/index.html?{query}"


def load_tokenizer(path):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(path))
    tok.no_truncation()
    tok.no_padding()
    return tok


def reference(explainer, tok, text, target=None):
    """What `lrp-onnx explain --text` computes for `text`: the last token explained (Explainer, CPU)."""
    e = tok.encode(text)
    ids = np.array([e.ids], np.int64)
    position = [len(e.ids) - 1] if "lrp_position" in explainer.input_names else None
    result = explainer.run(input_ids=ids, attention_mask=np.ones_like(ids), position=position,
                           target=None if target is None else [target])
    relevance = np.asarray(result.relevances[explainer.meta["relevance_outputs"][0]], np.float64)
    return {"encoding": e, "relevance": relevance, "per_token": result.token_relevance()[0].astype(np.float64),
            "target": int(result.target[0]), "logit": float(result.logit[0]),
            "pieces": token_pieces(text, e.offsets, e.tokens)}


def check_run(run, ref, label):
    """The page's result for one text equals the reference: tokens, target, logit, relevance, colours, title."""
    assert "error" not in run, run.get("error")
    assert run["ids"] == ref["encoding"].ids and run["tokens"] == ref["encoding"].tokens
    assert run["pieces"] == ref["pieces"]
    assert run["target"] == ref["target"]
    assert abs(run["logit"] - ref["logit"]) <= 1e-4 * max(1.0, abs(ref["logit"]))
    full = np.asarray(run["relevanceFull"], np.float64).reshape(run["shape"])
    assert rel_l2(full, ref["relevance"]) <= TOLERANCE
    assert rel_l2(run["relevance"], ref["per_token"]) <= TOLERANCE
    peak = float(np.abs(ref["per_token"]).max())
    for color, value in zip(run["colors"], ref["per_token"], strict=True):
        drawn = [int(c) for c in color.removeprefix("rgb(").removesuffix(")").split(",")]
        assert np.abs(np.subtract(drawn, relevance_color(value, peak))).max() <= 1, (color, value, peak)
    # the title of explain --html (its numbers to 3 decimals, which float rounding may move by one unit)
    title = re.fullmatch(r"explained: (.*) \(logit (\S+)\), sum of relevance (\S+)", run["title"])
    assert title and title[1] == label(ref["target"]), run["title"]
    assert abs(float(title[2]) - ref["logit"]) <= 1.5e-3 and abs(float(title[3]) - ref["per_token"].sum()) <= 1.5e-3


def convert_into(folder: Path, onnx_path, tokenizer_path, **convert_kwargs) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    out = folder / "model.lrp.onnx"
    lrp_onnx.convert(onnx_path, out, **convert_kwargs)
    shutil.copy(tokenizer_path, folder / "tokenizer.json")
    return out


def with_external_data(model: onnx.ModelProto, path: Path) -> Path:
    """Save `model` at `path` with its weights in path + '.data' (the page must fetch or be given it)."""
    onnx.save(model, path, save_as_external_data=True, all_tensors_to_one_file=True,
              location=path.name + ".data", size_threshold=1024)
    return path


@pytest.fixture(scope="module")
def minilm_files(workdir):
    from models import minilm

    out = workdir / "minilm"
    if not ((out / "model.onnx").exists() and (out / "tokenizer.json").exists()):
        minilm.export(out)
    return out / "model.onnx", out / "tokenizer.json"


def test_page_on_minilm(minilm_files, workdir, tmp_path):
    """Real MiniLM (6 layers), its weights in an external data file that the page fetches: the sentence
    embedding's argmax dimension and a chosen one; the tokenizer on TRICKY texts; screenshot
    docs/web_minilm.png."""
    models = workdir / "web"
    model = convert_into(models / "minilm", *minilm_files)
    with_external_data(onnx.load(model), model)
    text = "A man is eating a piece of bread."
    shot = tmp_path / "web_minilm.png"
    with serve(models) as base:
        out = drive({"url": page_url(base, "minilm"), "tokenize": TRICKY, "screenshot": str(shot),
                     "runs": [{"text": text, "target": "argmax"}, {"text": text, "target": "index", "value": "7"},
                              {"text": text, "target": "token", "value": "man"},
                              {"text": text, "target": "index", "value": "384"}]}, tmp_path)
    assert "on wasm" in out["load"] and "+ external data" in out["load"] and "lrp_target" in out["load"], out["load"]
    tok = load_tokenizer(minilm_files[1])
    for text_, got in zip(TRICKY, out["tokenized"], strict=True):
        e = tok.encode(text_)
        assert (got["ids"], got["tokens"]) == (e.ids, e.tokens), text_
    explainer = lrp_onnx.Explainer(model, providers=CPU)
    check_run(out["runs"][0], reference(explainer, tok, text), str)
    check_run(out["runs"][1], reference(explainer, tok, text, target=7), str)
    assert out["runs"][1]["target"] == 7
    # a token as the target of an embedding: refused, as `explain --target-token` refuses it
    assert "not a vocabulary" in out["runs"][2]["error"]
    assert "target 384 is out of range: the explained output has 384 values" in out["runs"][3]["error"]
    keep_screenshot(shot, "web_minilm.png")


def test_page_on_smollm2_relevance_only(smollm2_2layers, workdir, tmp_path):
    """SmolLM2's real weights (first 2 of 30 layers) converted --relevance-only: the predicted next token
    and a chosen one (' Paris'); a target of several tokens is refused. Screenshot docs/web_smollm2_2layers.png."""
    models = workdir / "web"
    model = convert_into(models / "smollm2", smollm2_2layers["onnx"], smollm2_2layers["tokenizer"],
                         relevance_only=True)
    text = "The capital of France is"
    shot = tmp_path / "web_smollm2.png"
    with serve(models) as base:
        out = drive({"url": page_url(base, "smollm2"), "screenshot": str(shot), "screenshotRun": 1,
                     "tokenize": TRICKY,
                     "runs": [{"text": text, "target": "argmax"}, {"text": text, "target": "token", "value": " Paris"},
                              {"text": text, "target": "token", "value": "Paris is"}]}, tmp_path)
    assert "relevance only" in out["load"] and "lrp_position" in out["load"], out["load"]
    tok = load_tokenizer(smollm2_2layers["tokenizer"])
    for text_, got in zip(TRICKY, out["tokenized"], strict=True):
        e = tok.encode(text_)
        assert (got["ids"], got["tokens"]) == (e.ids, e.tokens), text_
    explainer = lrp_onnx.Explainer(model, providers=CPU)
    label = lambda i: repr(tok.decode([i]))  # noqa: E731  (as explain --html labels a vocabulary token)
    check_run(out["runs"][0], reference(explainer, tok, text), label)
    paris = tok.token_to_id("ĠParis")
    check_run(out["runs"][1], reference(explainer, tok, text, target=paris), label)
    assert out["runs"][1]["target"] == paris
    assert "is 2 tokens, not one" in out["runs"][2]["error"]
    keep_screenshot(shot, "web_smollm2_2layers.png")


def plain_target_inputs(model: onnx.ModelProto) -> onnx.ModelProto:
    """The converted model with optional(tensor) inputs made plain tensors: If(OptionalHasElement(x), ...)
    becomes x (what `convert` makes by default once lrp_target/lrp_position are plain inputs; a model
    without optional inputs is returned as it is). onnxruntime-web 1.30's WebGPU build has no Optional."""
    graph = model.graph
    optional = {i.name for i in graph.input if i.type.HasField("optional_type")}
    for i in graph.input:
        if i.name in optional:
            plain = onnx.TypeProto()
            plain.CopyFrom(i.type.optional_type.elem_type)
            i.type.CopyFrom(plain)
    has = {n.output[0]: n.input[0] for n in graph.node if n.op_type == "OptionalHasElement" and n.input[0] in optional}
    nodes = [helper.make_node("Identity", [has[n.input[0]]], [n.output[0]], name=n.name)
             if n.op_type == "If" and n.input[0] in has else n
             for n in graph.node if n.output[0] not in has]
    del graph.node[:]
    graph.node.extend(nodes)
    onnx.checker.check_model(model)
    return model


def test_page_on_webgpu(tiny_model, word_tokenizer, workdir, tmp_path):
    """The WebGPU backend (Chromium's SwiftShader adapter: WebGPU on the CPU) on a tiny GPT-2 given as
    local files (model, its external data, tokenizer.json) through the page's file input: relevance
    equal to Explainer's. The optional-input form is refused by name on WebGPU. (A tiny LLaMA differs by
    1.0-1.3e-4, its logits already by up to 6.6e-5: WGSL's sin/cos, which its rotary embedding computes
    in the graph, need only be accurate to 2^-11 absolute; docs/web.md.)"""
    _, path = tiny_model("gpt2")
    models = workdir / "web"
    folder = models / "gpt2-webgpu"
    model = convert_into(folder, path, word_tokenizer)
    reference_explainer = lrp_onnx.Explainer(model, providers=CPU)
    optional = any(i.type.HasField("optional_type") for i in onnx.load(model).graph.input)
    with_external_data(plain_target_inputs(onnx.load(model)), model)
    files = [str(model), str(model) + ".data", str(folder / "tokenizer.json")]
    text = "w5 w17 w3 w42 w8 w61"
    swiftshader = ["--enable-unsafe-webgpu", "--enable-features=Vulkan", "--use-vulkan=swiftshader",
                   "--use-webgpu-adapter=swiftshader", "--use-angle=swiftshader", "--enable-unsafe-swiftshader"]
    with serve(models) as base:
        out = drive({"url": f"{base}/index.html?backend=webgpu", "files": files, "chromiumArgs": swiftshader,
                     "runs": [{"text": text, "target": "argmax"}, {"text": text, "target": "index", "value": "7"}]},
                    tmp_path)
    assert "on webgpu" in out["load"] and "+ external data" in out["load"], out["load"]
    tok = load_tokenizer(word_tokenizer)
    label = lambda i: repr(tok.decode([i]))  # noqa: E731
    check_run(out["runs"][0], reference(reference_explainer, tok, text), label)
    check_run(out["runs"][1], reference(reference_explainer, tok, text, target=7), label)
    assert out["runs"][0]["target"] != 7 and out["runs"][1]["target"] == 7
    if optional:  # today's default form: refused with a message that says what to do
        optional_folder = models / "gpt2-optional"
        convert_into(optional_folder, path, word_tokenizer)
        with serve(models) as base:
            spec = {"url": page_url(base, "gpt2-optional", backend="webgpu"), "chromiumArgs": swiftshader}
            path_ = tmp_path / "spec.json"
            path_.write_text(json.dumps({"chromium": _require_browser(), "timeoutMs": 60000, **spec}))
            done = subprocess.run(["node", str(WEB / "test" / "drive.mjs"), str(path_)], capture_output=True,
                                  text=True, timeout=120, cwd=WEB)
        assert done.returncode == 2 and "does not take optional inputs" in done.stderr, done.stderr
