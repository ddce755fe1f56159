"""The Python API: rule overrides, latent relevance, seed inputs, external data, no torch at inference."""
import json
import filecmp
import os
import subprocess
import sys

import numpy as np
import onnx
import pytest

import lrp_onnx
from tests.conftest import explain_inputs


def feed_of(family, rows=slice(None)):
    inputs = explain_inputs(family)
    return {k: inputs[k][rows] for k in ("input_ids", "attention_mask")}


def explain(model, family, tmp_path, name, **run_kwargs):
    path = tmp_path / f"{name}.onnx"
    onnx.save(model, path)
    return lrp_onnx.Explainer(path, providers=["CPUExecutionProvider"]).run(**run_kwargs, **feed_of(family))


def test_input_model_proto_is_not_modified(tiny_model):
    _, path = tiny_model("gpt2")
    model = onnx.load(path)
    before = model.SerializeToString()
    lrp_onnx.convert(model, rules="attnlrp")
    assert model.SerializeToString() == before


def test_override_by_category_reproduces_cp_lrp(tiny_model, tmp_path):
    """attnlrp with attention probabilities held constant is exactly GPT-2's cp-lrp."""
    _, path = tiny_model("gpt2")
    overridden = lrp_onnx.convert(path, rules="attnlrp", overrides={"attention_probs": "constant"})
    cp = lrp_onnx.convert(path, rules="cp-lrp")
    a = explain(overridden, "gpt2", tmp_path, "overridden")
    b = explain(cp, "gpt2", tmp_path, "cp")
    np.testing.assert_allclose(a.relevance, b.relevance, rtol=1e-5, atol=1e-7)
    plain = explain(lrp_onnx.convert(path, rules="attnlrp"), "gpt2", tmp_path, "attnlrp")
    assert np.abs(plain.relevance - b.relevance).max() > 1e-4  # the override changed something


def test_override_by_node_name_pattern(tiny_model):
    _, path = tiny_model("llama")
    report = lrp_onnx.inspect_model(path, overrides={"*layers.0/mlp/act_fn*": "gradient"})
    rules = {desc: rule for desc, _, rule in report.rows}
    layer0 = [r for d, r in rules.items() if "layers.0/mlp/act_fn" in d]
    layer1 = [r for d, r in rules.items() if "layers.1/mlp/act_fn" in d]
    assert layer0 and set(layer0) == {"gradient"}   # the SiLU region dissolved into plain-gradient nodes
    assert layer1 == ["identity"]


def test_rule_set_as_mapping_equals_named_rule_set(tiny_model, tmp_path):
    _, path = tiny_model("bert")
    mapping = dict(lrp_onnx.RULE_SETS["attnlrp"])
    a = explain(lrp_onnx.convert(path, rules=mapping), "bert", tmp_path, "mapping", target=[1, 2])
    b = explain(lrp_onnx.convert(path, rules="attnlrp"), "bert", tmp_path, "named", target=[1, 2])
    np.testing.assert_array_equal(a.relevance, b.relevance)


def test_latent_relevance_is_conserved_in_bias_free_cp_lrp(tiny_model, tmp_path):
    """LLaMA has no biases and cp-lrp is conservative: every residual-stream tensor carries the logit."""
    _, path = tiny_model("llama")
    latent = "/model/model/layers.1/Add_output_0"
    model = lrp_onnx.convert(path, rules="cp-lrp", latent=[latent])
    names = [o.name for o in model.graph.output]
    latent_out = [n for n in names if n.startswith("lrp_relevance_") and n != "lrp_relevance"]
    assert len(latent_out) == 1
    result = explain(model, "llama", tmp_path, "latent", position=[-1, 4])
    r_latent = result.outputs[latent_out[0]]
    assert r_latent.shape == result.relevance.shape
    np.testing.assert_allclose(r_latent.sum(axis=(1, 2)), result.logit, rtol=1e-4)
    np.testing.assert_allclose(result.relevance.sum(axis=(1, 2)), result.logit, rtol=1e-4)


def test_contrastive_seed_equals_difference_of_targets(tiny_model, tmp_path):
    _, path = tiny_model("gpt2")
    seeded = lrp_onnx.convert(path, rules="attnlrp", seed_input=True)
    names = [i.name for i in seeded.graph.input]
    assert "lrp_seed" in names and "lrp_target" not in names
    logits_shape = (2, 7, 100)
    seed = np.zeros(logits_shape, np.float32)
    seed[:, -1, 7] = 1.0
    seed[:, -1, 9] = -1.0
    contrast = explain(seeded, "gpt2", tmp_path, "seeded", seed=seed).relevance
    targeted = lrp_onnx.convert(path, rules="attnlrp")
    r7 = explain(targeted, "gpt2", tmp_path, "t7", target=[7, 7], position=[-1, -1]).relevance
    r9 = explain(targeted, "gpt2", tmp_path, "t9", target=[9, 9], position=[-1, -1]).relevance
    np.testing.assert_allclose(contrast, r7 - r9, rtol=1e-4, atol=1e-6)


def test_rows_are_independent_and_batch_is_dynamic(tiny_model, tmp_path):
    _, path = tiny_model("llama", "dynamo")
    model = lrp_onnx.convert(path, rules="attnlrp")
    onnx.save(model, tmp_path / "m.onnx")
    explainer = lrp_onnx.Explainer(tmp_path / "m.onnx", providers=["CPUExecutionProvider"])
    both = explainer.run(target=[7, 42], position=[-1, 4], **feed_of("llama"))
    row1 = explainer.run(target=[42], position=[4], **feed_of("llama", slice(1, 2)))
    np.testing.assert_allclose(both.relevance[1], row1.relevance[0], rtol=1e-4, atol=1e-6)
    # row 1 cut to its real length (5 tokens) explains the same
    feed = {k: v[:, :5] for k, v in feed_of("llama", slice(1, 2)).items()}
    short = explainer.run(target=[42], **feed)
    np.testing.assert_allclose(short.relevance[0], both.relevance[1, :5], rtol=1e-4, atol=1e-6)


def test_external_data_is_referenced_not_loaded_or_copied(tiny_model, tmp_path):
    _, path = tiny_model("bert")
    src = tmp_path / "src"
    src.mkdir()
    model = onnx.load(path)
    onnx.save_model(model, src / "model.onnx", save_as_external_data=True, all_tensors_to_one_file=True,
                    location="weights.bin", size_threshold=0)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    # conversion never parses the weights: a model whose weight file is absent converts in memory
    os.rename(src / "weights.bin", tmp_path / "hidden.bin")
    lrp_onnx.convert(src / "model.onnx", rules="attnlrp")
    os.rename(tmp_path / "hidden.bin", src / "weights.bin")
    lrp_onnx.convert(src / "model.onnx", out_dir / "model.lrp.onnx", rules="attnlrp")
    assert sorted(os.listdir(out_dir)) == ["model.lrp.onnx", "weights.bin"]  # weights placed once, a copy
    assert filecmp.cmp(out_dir / "weights.bin", src / "weights.bin", shallow=False)
    # never a hard link: onnx.load refuses a weight file with several links, the user's original included
    assert not os.path.samefile(out_dir / "weights.bin", src / "weights.bin")
    assert os.stat(src / "weights.bin").st_nlink == os.stat(out_dir / "weights.bin").st_nlink == 1
    onnx.load(src / "model.onnx")
    onnx.load(out_dir / "model.lrp.onnx")
    converted = onnx.load(out_dir / "model.lrp.onnx", load_external_data=False)
    external = [t for t in converted.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert len(external) == len(model.graph.initializer)
    assert {e.value for t in external for e in t.external_data if e.key == "location"} == {"weights.bin"}
    inline_bytes = sum(len(t.raw_data) for t in converted.graph.initializer if t not in external)
    assert inline_bytes < 4096  # only the backward's small constants: no weight copies
    inline = lrp_onnx.convert(path, rules="attnlrp")
    a = lrp_onnx.Explainer(out_dir / "model.lrp.onnx", providers=["CPUExecutionProvider"]).run(
        target=[1, 2], **feed_of("bert"))
    b = explain(inline, "bert", tmp_path, "inline", target=[1, 2])
    np.testing.assert_array_equal(a.relevance, b.relevance)


def test_inference_works_without_torch(tiny_model, tmp_path):
    _, path = tiny_model("gpt2")
    code = f"""
import sys
sys.modules['torch'] = None  # any import of torch now fails
import numpy as np, lrp_onnx, lrp_onnx.cli
lrp_onnx.convert({str(path)!r}, {str(tmp_path / 'x.onnx')!r})
r = lrp_onnx.Explainer({str(tmp_path / 'x.onnx')!r}).run(input_ids=np.array([[5, 6, 7]]),
                                                        attention_mask=np.ones((1, 3), np.int64))
assert r.relevance.shape == (1, 3, 32) and np.isfinite(r.relevance).all()
assert not any(m.startswith('torch') and sys.modules[m] is not None for m in sys.modules)
print('ok')
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            cwd=os.path.dirname(os.path.dirname(__file__)))
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


def test_output_not_written_when_conversion_fails(tmp_path, tiny_model):
    _, path = tiny_model("bert")
    out = tmp_path / "o.onnx"
    with pytest.raises(lrp_onnx.LRPError):
        lrp_onnx.convert(path, out, source="no_such_tensor")
    assert not out.exists() and not [f for f in os.listdir(tmp_path) if f.startswith(".lrp-")]


@pytest.mark.parametrize("family,exporter", [("llama", "torchscript"), ("llama", "dynamo"), ("gpt2", "torchscript"),
                                             ("bert", "torchscript")])
def test_relevance_only_mode_equals_full_conversion(family, exporter, tiny_model, tmp_path):
    _, path = tiny_model(family, exporter)
    full = lrp_onnx.convert(path, rules="attnlrp")
    lean = lrp_onnx.convert(path, rules="attnlrp", relevance_only=True)
    meta = json.loads({p.key: p.value for p in lean.metadata_props}["lrp_onnx"])
    assert meta["head_at_position"] == (family != "bert")  # classifiers have no sequence axis to select
    expected = ["lrp_selected_target", "lrp_selected_logit", "lrp_relevance"]
    if family != "bert":
        expected.insert(0, "lrp_logits_at_position")  # [batch, 1, vocab]: the head's output at the position
    assert [o.name for o in lean.graph.output] == expected
    if family == "llama":  # the whole last MLP and the vocabulary head run at one position
        ops = [n.op_type for n in lean.graph.node if n.name.startswith("lrp/at_position/")]
        assert ops.count("MatMul") == 4  # gate, up, down projections and lm_head
    kwargs = {"target": [7, 42], "position": [-1, 4]} if family != "bert" else {"target": [1, 2]}
    a = explain(full, family, tmp_path, "full", **kwargs)
    b = explain(lean, family, tmp_path, "lean", **kwargs)
    np.testing.assert_allclose(b.relevance, a.relevance, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(b.logit, a.logit, rtol=1e-5)
    np.testing.assert_array_equal(b.target, a.target)
    if family != "bert":
        rows = np.arange(2), np.array([6, 4])
        np.testing.assert_allclose(b.outputs["lrp_logits_at_position"][:, 0], a.outputs["logits"][rows], rtol=1e-5)
    default = explain(lean, family, tmp_path, "lean_default")
    reference = explain(full, family, tmp_path, "full_default")
    np.testing.assert_array_equal(default.target, reference.target)
