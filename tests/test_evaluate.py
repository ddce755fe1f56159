"""Faithfulness evaluation (lrp_onnx.evaluate, `lrp-onnx evaluate`) and heatmaps (explain --html/--png).

On tiny random-weight models with a word-level tokenizer over their 100-token vocabulary:
* every perturbed score equals PyTorch's logit with those tokens' inputs_embeds zeroed;
* each method's relevance equals the PyTorch references (LXT 2.1 for attnlrp / cp-lrp,
  torch.autograd for gradient and IG) and the converted original model's (the perturbation input
  must not change it);
* MoRF removes the most relevant token first, ABPC is the trapezoid area between the curves (both
  recomputed here with this file's own small code, not lrp_onnx.check.faithfulness's);
* the CLI writes JSON/CSV/PNG, and bad input gets one error line and no output files.
"""
import json

import numpy as np
import pytest
import torch

import lrp_onnx
from lrp_onnx.check.faithfulness import abpc, evaluate, perturbation_curves
from tests.conftest import lrp_cli as lrp_onnx_cli
from tests.conftest import rel_l2
from tests.evaluation import assert_relevance_equals_converted_original, integrated_gradients, torch_logits

TEXTS = ["w5 w17 w3 w44 w9 w12", "w8 w2 w61 w30", "w7 w7 w90 w11 w23 w4 w56"]
METHODS = {"attnlrp", "cp-lrp", "gradient", "ig", "random"}


def own_scales(relevance, removable, length):
    """The protocol, written here: rows of per-token scales, MoRF (most relevant removable token zeroed
    first, one more per step, from none to all) then LeRF (least relevant first)."""
    removable = np.asarray(removable)
    order = removable[np.argsort(-np.asarray(relevance)[removable], kind="stable")]
    rows = []
    for sequence in (order, order[::-1]):
        for step in range(len(sequence) + 1):
            row = np.ones(length)
            row[sequence[:step]] = 0.0
            rows.append(row)
    return np.array(rows)


def own_abpc(morf, lerf):
    """area(LeRF) - area(MoRF) over the removed fraction 0..1, trapezoid rule."""
    morf, lerf = np.asarray(morf, np.float64), np.asarray(lerf, np.float64)
    if len(morf) < 2:
        return 0.0
    width = 1.0 / (len(morf) - 1)
    area = lambda c: width * (c[0] / 2 + c[1:-1].sum() + c[-1] / 2)  # noqa: E731
    return float(area(lerf) - area(morf))


def ids_of(text):
    return np.array([int(w[1:]) for w in text.split()], dtype=np.int64)


@pytest.fixture(scope="module")
def llama_evaluation(tiny_model, word_tokenizer, workdir):
    _, path = tiny_model("llama")
    return evaluate(path, word_tokenizer, TEXTS, task="next-token", workdir=workdir / "eval-llama",
                    ig_steps=8, batch_size=5, progress=False)


def test_curves_equal_pytorch_with_zeroed_embeddings(llama_evaluation, tiny_model):
    from models import tiny

    hf_dir, _ = tiny_model("llama")
    model = tiny.load("llama", hf_dir)
    assert len(llama_evaluation.examples) == len(TEXTS)
    assert set(llama_evaluation.methods) == METHODS
    for k, example in enumerate(llama_evaluation.examples):
        prompt = ids_of(TEXTS[k])[:-1]  # next-token: the text without its last word
        np.testing.assert_array_equal(example.input_ids, prompt)
        np.testing.assert_array_equal(example.removable, np.arange(len(prompt)))  # no special tokens
        full = torch_logits(model, prompt, np.ones((1, len(prompt))))[0, -1]
        assert example.target == int(full.argmax())
        for method, result in llama_evaluation.methods.items():
            assert len(result.morf[k]) == len(result.lerf[k]) == len(prompt) + 1
            scales = own_scales(result.relevance[k], example.removable, len(prompt))
            expected = torch_logits(model, prompt, scales)[:, -1, example.target].numpy()
            got = np.concatenate([result.morf[k], result.lerf[k]])
            np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
            assert result.morf[k][0] == pytest.approx(float(full[example.target]), rel=1e-4, abs=1e-5)
            assert result.abpc[k] == pytest.approx(own_abpc(result.morf[k], result.lerf[k]), rel=1e-9, abs=1e-12)


def test_logprob_score_equals_pytorch_log_softmax(tiny_model, word_tokenizer, workdir):
    from models import tiny

    hf_dir, path = tiny_model("llama")
    ev = evaluate(path, word_tokenizer, TEXTS[:2], task="next-token", methods=["attnlrp"], score="logprob",
                  workdir=workdir / "eval-llama-logprob", progress=False)
    model = tiny.load("llama", hf_dir)
    assert len(ev.examples) == 2 and set(ev.methods) == {"attnlrp"}
    for k, example in enumerate(ev.examples):
        result = ev.methods["attnlrp"]
        scales = own_scales(result.relevance[k], example.removable, len(example.input_ids))
        logits = torch_logits(model, example.input_ids, scales)[:, -1]
        expected = torch.log_softmax(logits.double(), -1)[:, example.target].numpy()
        np.testing.assert_allclose(np.concatenate([result.morf[k], result.lerf[k]]), expected, rtol=1e-4, atol=1e-4)
    with pytest.raises(lrp_onnx.LRPError, match="score 'logprob' does not apply to task similarity"):
        evaluate(path, word_tokenizer, [("w5", "w6")], task="similarity", score="logprob", progress=False)


@pytest.mark.parametrize("method", ["attnlrp", "cp-lrp", "gradient"])
def test_relevance_equals_reference_and_converted_original(method, llama_evaluation, tiny_model, workdir):
    from tests.reference import run_reference

    hf_dir, path = tiny_model("llama")
    examples = llama_evaluation.examples
    assert len(examples) == len(TEXTS)
    if method == "attnlrp":  # LXT 2.1 (a subprocess), every example in one right-padded batch
        lengths = np.array([len(e.input_ids) for e in examples])
        ids = np.zeros((len(examples), lengths.max()), np.int64)
        mask = np.zeros_like(ids)
        for k, e in enumerate(examples):
            ids[k, :lengths[k]], mask[k, :lengths[k]] = e.input_ids, 1
        ref = run_reference("llama", hf_dir, method, {"input_ids": ids, "attention_mask": mask, "position": lengths - 1,
                                                      "target": np.array([e.target for e in examples])},
                            workdir / "ref-evaluate")
        expected = [ref["relevance"][k, :lengths[k]].sum(-1) for k in range(len(examples))]
    elif method == "gradient":  # torch.autograd, in this process
        from models import tiny

        model = tiny.load("llama", hf_dir)
        expected = []
        for e in examples:
            x = model.get_input_embeddings()(torch.as_tensor(e.input_ids)[None]).detach().requires_grad_()
            model(inputs_embeds=x, attention_mask=torch.ones(x.shape[:2], dtype=torch.int64)).logits[0, -1, e.target].backward()
            expected.append((x * x.grad)[0].sum(-1).detach().double().numpy())
    else:  # cp-lrp: checked against LXT in test_parity; here only against the converted original below
        expected = None
    for k in range(len(examples) if expected is not None else 0):
        # token relevance (summed over the hidden axis, which cancels): ~3e-7 (attnlrp), ~8e-6 (gradient) seen
        assert rel_l2(llama_evaluation.methods[method].relevance[k], expected[k]) <= 5e-5, k
    # the converted original model (without the perturbation input) gives the same
    assert_relevance_equals_converted_original(llama_evaluation, method, path,
                                               workdir / f"eval-llama-original.{method}.onnx")


def test_integrated_gradients_equal_autograd(llama_evaluation, tiny_model):
    from models import tiny

    hf_dir, _ = tiny_model("llama")
    model = tiny.load("llama", hf_dir)
    steps = llama_evaluation.settings["ig_steps"]
    assert steps == 8 and len(llama_evaluation.examples) == len(TEXTS)
    for k, example in enumerate(llama_evaluation.examples):
        expected = integrated_gradients(model, example.input_ids, steps,
                                        lambda logits: logits[:, -1, example.target].sum())
        got = np.asarray(llama_evaluation.methods["ig"].relevance[k])
        assert rel_l2(got, expected) <= 5e-5  # ~6e-6 seen (token sums, fp32)


def test_morf_removes_most_relevant_first_and_abpc_is_the_area():
    relevance = np.array([0.1, 3.0, -2.0, 0.5])
    scales = perturbation_curves(relevance, np.array([0, 1, 2, 3]), 4)
    assert scales.shape == (10, 4)
    np.testing.assert_array_equal(scales[1], [1, 0, 1, 1])      # MoRF: token 1 first
    np.testing.assert_array_equal(scales[2], [1, 0, 1, 0])      # then token 3
    np.testing.assert_array_equal(scales[6], [1, 1, 0, 1])      # LeRF: token 2 first
    assert not scales[4].any() and not scales[9].any()
    only = perturbation_curves(relevance, np.array([1, 3]), 4)  # special tokens are never removed
    np.testing.assert_array_equal(only[2], [1, 0, 1, 0])
    assert abpc(np.array([2.0, 1.0, 0.0]), np.array([2.0, 2.0, 2.0])) == pytest.approx(1.0)
    assert abpc(np.array([1.0, 1.0]), np.array([1.0, 1.0])) == 0.0
    # lrp_onnx's protocol code equals this file's on random relevance with a special token kept
    relevance = np.random.default_rng(4).standard_normal(7)
    np.testing.assert_array_equal(perturbation_curves(relevance, np.arange(1, 7), 7), own_scales(relevance, np.arange(1, 7), 7))
    curves = np.random.default_rng(5).standard_normal((2, 7))
    assert abpc(*curves) == pytest.approx(own_abpc(*curves), rel=1e-12)
    # and so does the LXT side's separate implementation (tools/lxt_perturbation.py)
    from tools.lxt_perturbation import area_between, removal_scales

    np.testing.assert_array_equal(removal_scales(relevance, np.arange(1, 7), 7), own_scales(relevance, np.arange(1, 7), 7))
    assert area_between(*curves) == pytest.approx(own_abpc(*curves), rel=1e-12)


def test_similarity_task_explains_dot_product_with_reference(tiny_model, word_tokenizer, workdir):
    _, path = tiny_model("bert")
    pairs = [("w5 w17 w3 w44", "w5 w17 w9"), ("w8 w2 w61", "w30 w2")]
    ev = evaluate(path, word_tokenizer, pairs, task="similarity", methods=["attnlrp", "random"],
                  workdir=workdir / "eval-bert", progress=False)
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out = workdir / "eval-bert-original.attnlrp.onnx"
    lrp_onnx.convert(path, out, rules="attnlrp", seed_input=True)
    explainer = lrp_onnx.Explainer(out, providers=["CPUExecutionProvider"])
    assert len(ev.examples) == len(pairs)
    for k, (text, reference) in enumerate(pairs):
        ids, ref_ids = ids_of(text)[None], ids_of(reference)[None]
        embedding = session.run(None, {"input_ids": ids, "attention_mask": np.ones_like(ids)})[0][0]
        seed = session.run(None, {"input_ids": ref_ids, "attention_mask": np.ones_like(ref_ids)})[0]
        np.testing.assert_allclose(ev.examples[k].seed, seed[0], rtol=1e-5, atol=1e-6)
        assert ev.methods["attnlrp"].morf[k][0] == pytest.approx(float(embedding @ seed[0]), rel=1e-4, abs=1e-6)
        result = explainer.run(seed=seed, input_ids=ids, attention_mask=np.ones_like(ids))
        np.testing.assert_allclose(ev.methods["attnlrp"].relevance[k], result.token_relevance()[0],
                                   rtol=1e-4, atol=1e-6)


def test_similarity_both_ways(tiny_model, word_tokenizer, workdir):
    _, path = tiny_model("bert")
    pairs = [("w5 w17 w3", "w9 w2"), ("w8 w61", "w30 w2 w4")]
    ev = evaluate(path, word_tokenizer, pairs, task="similarity", methods=["random"], both_ways=True, limit=1,
                  workdir=workdir / "eval-bert-both", progress=False)
    assert [e.text for e in ev.examples] == ["w5 w17 w3", "w9 w2"]  # limit first, then both ways
    np.testing.assert_array_equal(ev.examples[1].reference_ids, ids_of("w5 w17 w3"))
    with pytest.raises(lrp_onnx.LRPError, match="both ways needs"):
        evaluate(path, word_tokenizer, ["w5 w17"], task="similarity", both_ways=True, progress=False)


def test_cli_evaluate_writes_results_and_plot(tiny_model, word_tokenizer, workdir):
    _, path = tiny_model("gpt2")
    texts = workdir / "texts.txt"
    texts.write_text("# comment\n" + "\n".join(TEXTS) + "\n")
    out = workdir / "evaluate-cli"
    done = lrp_onnx_cli("evaluate", path, "--tokenizer", word_tokenizer, "--texts", texts, "--out", out,
                        "--methods", "attnlrp,gradient,random", "--limit", "2", "--quiet")
    assert done.returncode == 0, done.stderr
    results = json.loads((out / "results.json").read_text())
    assert [e["text"] for e in results["examples"]] == [t.rsplit(" ", 1)[0] for t in TEXTS[:2]]
    assert len(results["examples"]) == 2 and set(results["summary"]) == {"attnlrp", "gradient", "random"}
    for method in ("attnlrp", "gradient", "random"):
        a = [e["abpc"][method] for e in results["examples"]]
        assert len(a) == 2
        assert results["summary"][method]["abpc_mean"] == pytest.approx(np.mean(a))
        assert f"\n{method} " in done.stdout
    rows = (out / "abpc.csv").read_text().splitlines()
    assert rows[0] == "example,attnlrp,gradient,random" and len(rows) == 3
    assert len((out / "curves.csv").read_text().splitlines()) == 1 + 3 * 2
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("case, message", [
    ("similarity-on-lm", "task similarity needs an embedding"),
    ("unknown-method", "unknown method(s) shap"),
    ("missing-texts", "no such text file"),
])
def test_cli_evaluate_errors(case, message, tiny_model, word_tokenizer, workdir):
    _, path = tiny_model("gpt2")
    texts = workdir / "texts-errors.txt"
    texts.write_text("w5 w17 w3\tw5 w17\n")
    out = workdir / f"evaluate-error-{case}"
    args = ["evaluate", path, "--tokenizer", word_tokenizer, "--texts", texts, "--out", out, "--quiet"]
    if case == "similarity-on-lm":
        args += ["--task", "similarity"]
    elif case == "unknown-method":
        args += ["--methods", "attnlrp,shap"]
    else:
        args[5] = workdir / "no-such-file.txt"
    done = lrp_onnx_cli(*args)
    assert done.returncode == 2
    assert message in done.stderr and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    assert not out.exists()


def test_explain_html_and_png_heatmaps(tiny_model, word_tokenizer, workdir):
    from PIL import Image

    from lrp_onnx.run.heatmap import relevance_color

    _, path = tiny_model("gpt2")
    converted = workdir / "gpt2-heatmap.lrp.onnx"
    lrp_onnx.convert(path, converted)
    html, png = workdir / "heat.html", workdir / "heat.png"
    done = lrp_onnx_cli("explain", converted, "--tokenizer", word_tokenizer, "--text", TEXTS[0],
                        "--text", TEXTS[1], "--html", html, "--png", png, "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert len(report) == 2 and [len(r["tokens"]) for r in report] == [len(TEXTS[0].split()), len(TEXTS[1].split())]
    page = html.read_text()
    assert page.count("<span class='t'") == sum(len(r["tokens"]) for r in report)
    for r in report:  # the most relevant token of each text is pure red (or blue), zero is white
        values = np.array([t["relevance"] for t in r["tokens"]])
        peak = np.abs(values).max()
        r_, g, b = relevance_color(values[np.abs(values).argmax()], peak)
        assert f"background:rgb({r_},{g},{b})" in page and (r_, g, b) in [(255, 0, 0), (0, 0, 255)]
    assert relevance_color(0.0, 1.0) == (255, 255, 255) and relevance_color(-0.5, 1.0) == (128, 128, 255)
    image = Image.open(png)
    assert image.format == "PNG" and image.width == 900 and image.height > 40


def test_token_pieces_rebuild_the_text():
    from lrp_onnx.run.heatmap import token_pieces

    text = "Hello, world  again"
    offsets = [(0, 0), (0, 5), (5, 6), (7, 12), (14, 19), (0, 0)]
    tokens = ["[CLS]", "hello", ",", "world", "again", "[SEP]"]
    pieces = token_pieces(text, offsets, tokens)
    assert "".join(pieces[1:-1]) == text and pieces[0] == "[CLS] " and pieces[-1] == " [SEP]"


def test_explain_image_overlay(tiny_model, workdir):
    from PIL import Image

    _, path = tiny_model("vit")
    converted = workdir / "vit-heatmap.lrp.onnx"
    lrp_onnx.convert(path, converted, rules="attnlrp")
    picture = workdir / "picture.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (24, 30, 3), dtype=np.uint8)).save(picture)
    overlay = workdir / "overlay.png"
    done = lrp_onnx_cli("explain", converted, "--image", picture, "--png", overlay, "--json")
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    # the same pixels through the API: resized to 16x16, (x/255 - 0.5) / 0.5
    pixels = np.asarray(Image.open(picture).convert("RGB").resize((16, 16)), np.float32).transpose(2, 0, 1) / 255.0
    result = lrp_onnx.Explainer(converted).run(pixel_values=((pixels - 0.5) / 0.5)[None])
    assert summary["target"] == int(result.target[0])
    assert summary["relevance_sum"] == pytest.approx(float(result.relevance.sum()), rel=1e-4, abs=1e-6)
    image = np.asarray(Image.open(overlay).convert("RGB")).astype(int)
    scale = 256 // 16
    assert image.shape == (16 * scale, (2 * 16 + 2) * scale, 3)
    heat = result.relevance[0].sum(0)
    y, x = np.unravel_index(np.abs(heat).argmax(), heat.shape)
    right = image[y * scale, (16 + 2 + x) * scale]  # the heatmap panel: the peak is pure red or blue
    assert tuple(right) in [(255, 0, 0), (0, 0, 255)]
    assert (tuple(right) == (255, 0, 0)) == (heat[y, x] > 0)
