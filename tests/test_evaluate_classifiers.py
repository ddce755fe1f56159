"""Faithfulness of classifiers: `evaluate --task classification` (text) and `evaluate --images` (image).

On the tiny random-weight models of conftest (bert: BertForSequenceClassification, 3 labels; vit:
ViTForImageClassification, 16x16 RGB, 3 labels), with a word-level tokenizer that adds [CLS]/[SEP]:
* every perturbed score equals PyTorch's class logit (or log-softmax) with those tokens'
  inputs_embeds zeroed (text), or the original ONNX model on images whose patches are blanked by
  numpy here (images); special tokens are never removed;
* each method's relevance equals the converted original model's (per token; per patch: summed here);
* the explained class is the argmax, or the label of --target-column; ABPC is the trapezoid area;
* the CLI writes results.json/abpc.csv/curves.*, and bad input gets one error line, nothing written.
"""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import lrp_onnx
from lrp_onnx.check.faithfulness import abpc, evaluate, evaluate_images, patch_grid, perturbation_curves
from tests.conftest import lrp_cli as lrp_onnx_cli
from tests.evaluation import assert_relevance_equals_converted_original, integrated_gradients
from tests.evaluation import torch_logits as torch_class_logits

TEXTS = ["w5 w17 w3 w44 w9", "w8 w4 w61 w30", "w7 w7 w90 w11 w23 w4"]
CLS, SEP = 1, 2


@pytest.fixture(scope="module")
def cls_tokenizer(workdir):
    """tokenizer.json: "wN" -> id N (N in 3..99), whitespace split, "[CLS] text [SEP]" added."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    path = workdir / "cls-word-tokenizer.json"
    if not path.exists():
        vocab = {"[UNK]": 0, "[CLS]": CLS, "[SEP]": SEP, **{f"w{i}": i for i in range(3, 100)}}
        tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
        tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]",
                                                           special_tokens=[("[CLS]", CLS), ("[SEP]", SEP)])
        tok.save(str(path))
    return path


def ids_of(text):
    return np.array([CLS] + [int(w[1:]) for w in text.split()] + [SEP], dtype=np.int64)


@pytest.fixture(scope="module")
def bert_evaluation(tiny_model, cls_tokenizer, workdir):
    _, path = tiny_model("bert")
    return evaluate(path, cls_tokenizer, TEXTS, task="classification", workdir=workdir / "eval-bert-cls",
                    ig_steps=8, batch_size=7, progress=False)


def test_classification_curves_equal_pytorch_with_zeroed_embeddings(bert_evaluation, tiny_model):
    from models import tiny

    hf_dir, _ = tiny_model("bert")
    model = tiny.load("bert", hf_dir).eval()
    for k, example in enumerate(bert_evaluation.examples):
        ids = ids_of(TEXTS[k])
        np.testing.assert_array_equal(example.input_ids, ids)
        np.testing.assert_array_equal(example.removable, np.arange(1, len(ids) - 1))  # never [CLS]/[SEP]
        full = torch_class_logits(model, ids, np.ones((1, len(ids))))[0]
        assert example.target == int(full.argmax())
        for method, result in bert_evaluation.methods.items():
            scales = perturbation_curves(np.asarray(result.relevance[k]), example.removable, len(ids))
            assert (scales[:, 0] == 1).all() and (scales[:, -1] == 1).all()
            expected = torch_class_logits(model, ids, scales)[:, example.target].numpy()
            got = np.concatenate([result.morf[k], result.lerf[k]])
            np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
            assert result.morf[k][0] == pytest.approx(float(full[example.target]), rel=1e-4, abs=1e-6)
            assert result.abpc[k] == pytest.approx(abpc(result.morf[k], result.lerf[k]))


@pytest.mark.parametrize("method", ["attnlrp", "cp-lrp", "gradient"])
def test_classification_relevance_equals_converted_original(method, bert_evaluation, tiny_model, workdir):
    _, path = tiny_model("bert")
    assert_relevance_equals_converted_original(bert_evaluation, method, path,
                                               workdir / f"eval-bert-cls-original.{method}.onnx")


def test_classification_integrated_gradients_equal_autograd(bert_evaluation, tiny_model):
    from models import tiny

    hf_dir, _ = tiny_model("bert")
    model = tiny.load("bert", hf_dir).eval()
    steps = bert_evaluation.settings["ig_steps"]
    for k, example in enumerate(bert_evaluation.examples):
        expected = integrated_gradients(model, example.input_ids, steps, lambda logits: logits[:, example.target].sum())
        got = np.asarray(bert_evaluation.methods["ig"].relevance[k])
        assert np.linalg.norm(got - expected) <= 1e-4 * np.linalg.norm(expected)


def test_classification_label_column_and_logprob(tiny_model, cls_tokenizer, workdir):
    from models import tiny

    hf_dir, path = tiny_model("bert")
    texts = workdir / "labelled.tsv"
    texts.write_text("# text, id, label\nw5 w17 w3\tx\tneg\nw8 w4 w61 w30\ty\t2\n")
    ev = evaluate(path, cls_tokenizer, texts, task="classification", methods=["gradient", "random"],
                  score="logprob", target_column=3, labels=["neg", "neu", "pos"],
                  workdir=workdir / "eval-bert-label", progress=False)
    assert [e.target for e in ev.examples] == [0, 2]
    model = tiny.load("bert", hf_dir).eval()
    for k, example in enumerate(ev.examples):
        for method, result in ev.methods.items():
            scales = perturbation_curves(np.asarray(result.relevance[k]), example.removable, len(example.input_ids))
            logits = torch_class_logits(model, example.input_ids, scales).double()
            expected = torch.log_softmax(logits, -1)[:, example.target].numpy()
            np.testing.assert_allclose(np.concatenate([result.morf[k], result.lerf[k]]), expected,
                                       rtol=1e-4, atol=1e-5)
    with pytest.raises(lrp_onnx.LRPError, match="label 'happy' is neither a class index nor a class name"):
        evaluate(path, cls_tokenizer, [("w5 w6", "happy")], task="classification", methods=["random"],
                 progress=False)
    with pytest.raises(lrp_onnx.LRPError, match="class index 3 is out of range for 3 classes"):
        evaluate(path, cls_tokenizer, [("w5 w6", 3)], task="classification", methods=["random"], progress=False)
    with pytest.raises(lrp_onnx.LRPError, match="line 2: no column 4"):
        evaluate(path, cls_tokenizer, texts, task="classification", target_column=4, progress=False)


# -- images --------------------------------------------------------------------------------------
PATCH = 4  # 16x16 images -> a 4x4 grid of patches


def images():
    rng = np.random.default_rng(3)
    return [(f"image{k}", rng.standard_normal((3, 16, 16)).astype(np.float32)) for k in range(2)]


@pytest.fixture(scope="module")
def vit_evaluation(tiny_model, workdir):
    _, path = tiny_model("vit")
    return evaluate_images(path, images(), patch=PATCH, ig_steps=8, batch_size=9,
                           workdir=workdir / "eval-vit", progress=False)


def test_image_curves_equal_original_model_with_patches_blanked(vit_evaluation, tiny_model):
    import onnxruntime as ort

    _, path = tiny_model("vit")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for k, (name, pixels) in enumerate(images()):
        example = vit_evaluation.examples[k]
        assert example.text == name and example.grid == (4, 4)
        logits = session.run(None, {"pixel_values": pixels[None]})[0][0]
        assert example.target == int(logits.argmax())
        for method, result in vit_evaluation.methods.items():
            relevance = np.asarray(result.relevance[k])
            assert relevance.shape == (16,)
            for which, order in (("morf", np.argsort(-relevance, kind="stable")),
                                 ("lerf", np.argsort(relevance, kind="stable"))):
                batch = []
                for step in range(17):  # blank the first `step` patches of the order, by hand
                    image = pixels.copy()
                    for p in order[:step]:
                        r, c = divmod(int(p), 4)
                        image[:, r * PATCH:(r + 1) * PATCH, c * PATCH:(c + 1) * PATCH] = 0.0
                    batch.append(image)
                expected = session.run(None, {"pixel_values": np.stack(batch)})[0][:, example.target]
                np.testing.assert_allclose(getattr(result, which)[k], expected, rtol=1e-4, atol=1e-5)
            assert result.morf[k][0] == pytest.approx(float(logits[example.target]), rel=1e-4, abs=1e-6)
            assert result.abpc[k] == pytest.approx(abpc(result.morf[k], result.lerf[k]))


@pytest.mark.parametrize("method", ["attnlrp", "gradient"])
def test_image_relevance_equals_converted_original_summed_per_patch(method, vit_evaluation, tiny_model, workdir):
    _, path = tiny_model("vit")
    out = workdir / f"eval-vit-original.{method}.onnx"
    lrp_onnx.convert(path, out, rules=method)
    explainer = lrp_onnx.Explainer(out, providers=["CPUExecutionProvider"])
    for k, (_, pixels) in enumerate(images()):
        example = vit_evaluation.examples[k]
        heat = explainer.run(target=[example.target], pixel_values=pixels[None]).relevance[0].sum(0)
        expected = heat.reshape(4, PATCH, 4, PATCH).sum(axis=(1, 3)).ravel()
        np.testing.assert_allclose(vit_evaluation.methods[method].relevance[k], expected, rtol=1e-4, atol=1e-6)


def test_image_integrated_gradients_equal_autograd(vit_evaluation, tiny_model):
    from models import tiny

    hf_dir, _ = tiny_model("vit")
    model = tiny.load("vit", hf_dir).eval()
    steps = vit_evaluation.settings["ig_steps"]
    for k, (_, pixels) in enumerate(images()):
        example = vit_evaluation.examples[k]
        x = torch.as_tensor(pixels)[None]
        alphas = (torch.arange(steps, dtype=torch.float32) + 0.5) / steps
        scaled = (alphas[:, None, None, None] * x).requires_grad_()
        model(pixel_values=scaled).logits[:, example.target].sum().backward()
        heat = (x[0] * scaled.grad.mean(0)).sum(0).double().numpy()
        expected = heat.reshape(4, PATCH, 4, PATCH).sum(axis=(1, 3)).ravel()
        got = np.asarray(vit_evaluation.methods["ig"].relevance[k])
        assert np.linalg.norm(got - expected) <= 1e-4 * np.linalg.norm(expected)


def test_patch_grid_with_a_ragged_edge():
    grid, shape = patch_grid(5, 7, 3)
    assert shape == (2, 3)
    np.testing.assert_array_equal(grid[0], [0, 0, 0, 1, 1, 1, 2])
    np.testing.assert_array_equal(grid[4], [3, 3, 3, 4, 4, 4, 5])
    # ABPC of a hand-made curve: MoRF falls 4 -> 0 linearly over 4 steps, LeRF stays at 4: area 2
    assert abpc(np.array([4.0, 3.0, 2.0, 1.0, 0.0]), np.full(5, 4.0)) == pytest.approx(2.0)


def test_cli_evaluate_images_and_classification(tiny_model, cls_tokenizer, workdir):
    from PIL import Image

    _, vit = tiny_model("vit")
    folder = workdir / "eval-images"
    folder.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    for k in range(2):
        Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(folder / f"{k}.png")
    (folder / "notes.txt").write_text("not an image")
    out = workdir / "evaluate-cli-images"
    done = lrp_onnx_cli("evaluate", vit, "--images", folder, "--patch", "8", "--out", out,
                        "--methods", "attnlrp,random", "--quiet")
    assert done.returncode == 0, done.stderr
    results = json.loads((out / "results.json").read_text())
    assert results["task"] == "image-classification"
    assert [e["image"] for e in results["examples"]] == ["0.png", "1.png"]
    assert all(len(e["morf"]["attnlrp"]) == 5 for e in results["examples"])  # 2x2 patches + the intact image
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    _, bert = tiny_model("bert")
    texts = workdir / "cls-texts.txt"
    texts.write_text("\n".join(TEXTS) + "\n")
    out = workdir / "evaluate-cli-cls"
    done = lrp_onnx_cli("evaluate", bert, "--tokenizer", cls_tokenizer, "--texts", texts, "--task", "classification",
                        "--out", out, "--methods", "gradient,random", "--score", "logprob", "--quiet")
    assert done.returncode == 0, done.stderr
    results = json.loads((out / "results.json").read_text())
    assert results["settings"]["score"] == "logprob" and len(results["examples"]) == 3
    assert len((out / "abpc.csv").read_text().splitlines()) == 4


@pytest.mark.parametrize("case, message", [
    ("no-images", "holds no image files"),
    ("lm-images", "--images needs class logits [batch, classes]"),
    ("lm-classification", "task classification needs class logits [batch, classes]"),
    ("bad-patch", "--patch must be a positive number of pixels"),
])
def test_cli_evaluate_classifier_errors(case, message, tiny_model, cls_tokenizer, workdir, capsys):
    from lrp_onnx.cli import main

    _, vit = tiny_model("vit")
    _, gpt2 = tiny_model("gpt2")
    from PIL import Image

    empty, one = workdir / "no-images", workdir / "one-image"
    empty.mkdir(exist_ok=True)
    one.mkdir(exist_ok=True)
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(one / "black.png")
    texts = workdir / "cls-error-texts.txt"
    texts.write_text("w5 w17 w3\n")
    out = workdir / f"evaluate-cls-error-{case}"
    args = {"no-images": [vit, "--images", empty],
            "lm-images": [gpt2, "--images", one],
            "lm-classification": [gpt2, "--tokenizer", cls_tokenizer, "--texts", texts, "--task", "classification"],
            "bad-patch": [vit, "--images", empty, "--patch", "0"]}[case]
    code = main(["evaluate", *map(str, args), "--out", str(out), "--quiet"])  # in-process: no interpreter start
    stderr = capsys.readouterr().err
    assert code == 2
    assert message in stderr and "Traceback" not in stderr
    assert len(stderr.strip().splitlines()) == 1
    assert not out.exists()


def test_lxt_side_of_the_classifier_table_matches(bert_evaluation, tiny_model, workdir):
    """tools/lxt_perturbation.py --loader classifier (LXT 2.1's AttnLRP in PyTorch, a fresh process) on
    the examples of the classification evaluation: its relevance and curves equal lrp-onnx's attnlrp."""
    from pathlib import Path

    hf_dir, _ = tiny_model("bert")
    results, out = workdir / "bert-cls-results.json", workdir / "bert-cls-lxt.json"
    results.write_text(json.dumps(bert_evaluation.to_dict()))
    repo = Path(__file__).resolve().parent.parent
    done = subprocess.run([sys.executable, str(repo / "tools" / "lxt_perturbation.py"), "--loader", "classifier",
                           "--hf-dir", str(hf_dir), "--results", str(results), "--out", str(out)],
                          cwd=repo, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    lxt = json.loads(out.read_text())
    for k, theirs in enumerate(lxt["examples"]):
        ours = np.asarray(bert_evaluation.methods["attnlrp"].relevance[k])
        reference = np.asarray(theirs["relevance"])
        assert np.linalg.norm(ours - reference) <= 1e-3 * np.linalg.norm(reference)
        np.testing.assert_allclose(bert_evaluation.methods["attnlrp"].morf[k], theirs["morf"], rtol=1e-4, atol=1e-5)
        assert theirs["abpc"] == pytest.approx(bert_evaluation.methods["attnlrp"].abpc[k], rel=1e-3, abs=1e-4)
