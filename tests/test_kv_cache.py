"""KV-cache exports (lrp_onnx/passes/cache.py): the cache is bound to an empty tensor inside the graph, and the
converted model explains full sequences with the relevance of the export without a cache.

* optimum's decoder with past (past_key_values.N.key/value inputs, present.* outputs) and optimum's
  merged decoder (use_cache_branch, an If over the decoders without and with past) of the tiny LLaMA:
  relevance equals the no-cache TorchScript export's of the same weights in three rule sets; the
  original outputs (logits, present.*) equal onnxruntime's run of the export with an empty cache fed.
* a hand-built com.microsoft MultiHeadAttention with past_key/past_value inputs: equals the same graph
  without a past (the op's "no past" slot), forward equal to onnxruntime's kernel fed an empty past.
* a cache input whose axes cannot be told is refused, naming it.
"""
import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import lrp_onnx
from lrp_onnx.errors import LRPError
from tests import handbuilt as hb
from tests.conftest import CPU, TOLERANCE, explain_inputs, explainer_for, rel_l2

RULES = ["attnlrp", "cp-lrp", "gradient"]


@pytest.fixture(scope="module")
def optimum_exports(tiny_model, workdir):
    from models import kvcache

    hf_dir, nocache = tiny_model("llama")
    out = workdir / "kvcache"
    return nocache, {"with_past": kvcache.with_past(hf_dir, out / "with_past.onnx"),
                     "merged": kvcache.merged(hf_dir, out / "merged.onnx")}


def _feed():
    inputs = explain_inputs("llama")
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    # the no-cache export numbers positions 0..S-1 whatever the mask (transformers' default without a cache)
    return {"input_ids": ids, "attention_mask": mask, "position_ids": np.broadcast_to(np.arange(ids.shape[1]), ids.shape)}


def _empty_cache(model, batch):
    feed = {}
    for i in onnx.load(model, load_external_data=False).graph.input:
        if i.name.startswith("past_key_values"):
            dims = [d.dim_value or 0 for d in i.type.tensor_type.shape.dim]
            feed[i.name] = np.zeros([batch] + dims[1:], np.float32)
        elif i.name == "use_cache_branch":
            feed[i.name] = np.array([False])
    return feed


@pytest.mark.parametrize("form", ["with_past", "merged"])
def test_optimum_cache_exports_explain_like_the_no_cache_export(optimum_exports, form):
    import onnxruntime as ort

    nocache, exports = optimum_exports
    feed = _feed()
    explainer = explainer_for(exports[form])
    names = [i.name for i in explainer.session.get_inputs()]
    assert names == ["input_ids", "attention_mask", "position_ids", "lrp_target", "lrp_position"]
    bound = explainer.meta["bound_inputs"]
    assert sorted(n for n in bound if n.startswith("past_key_values")) == sorted(
        f"past_key_values.{k}.{kv}" for k in range(2) for kv in ("key", "value"))
    assert ("use_cache_branch" in bound) == (form == "merged")
    # the original outputs: onnxruntime's run of the export, fed an empty cache
    original = ort.InferenceSession(str(exports[form]), providers=CPU)
    want = dict(zip([o.name for o in original.get_outputs()],
                    original.run(None, {**feed, **_empty_cache(exports[form], len(feed["input_ids"]))})))
    got = explainer.run(**feed).outputs
    assert len(want) == 5
    for name, value in want.items():
        np.testing.assert_allclose(got[name], value, rtol=1e-5, atol=1e-6, err_msg=name)
    for rules in RULES:
        cached = explainer_for(exports[form], rules).run(**feed)
        plain = explainer_for(nocache, rules).run(input_ids=feed["input_ids"], attention_mask=feed["attention_mask"])
        np.testing.assert_array_equal(cached.target, plain.target)
        np.testing.assert_allclose(cached.logit, plain.logit, rtol=1e-5)
        assert rel_l2(cached.relevance, plain.relevance) <= TOLERANCE[rules], rules


@pytest.mark.parametrize("family", ["gpt2", "qwen3"])
def test_optimum_with_past_of_other_families(tiny_model, workdir, family):
    """GPT-2 (learned positions, Conv1D) and Qwen3 (q/k norms) through optimum's with-past export."""
    from models import kvcache

    hf_dir, nocache = tiny_model(family)
    cached = kvcache.with_past(hf_dir, workdir / "kvcache" / f"{family}.onnx")
    feed = _feed()
    explainer = explainer_for(cached)
    got = explainer.run(**{k: v for k, v in feed.items() if k in explainer.input_names})
    want = explainer_for(nocache).run(input_ids=feed["input_ids"], attention_mask=feed["attention_mask"])
    assert len(explainer.meta["bound_inputs"]) == 4
    np.testing.assert_allclose(got.logit, want.logit, rtol=1e-5)
    assert rel_l2(got.relevance, want.relevance) <= TOLERANCE["attnlrp"]


def test_inspect_names_the_bound_cache_inputs(optimum_exports):
    _, exports = optimum_exports
    report = lrp_onnx.inspect_model(str(exports["merged"]))
    assert report.supported
    assert len(report.bound_inputs) == 5 and report.bound_inputs["use_cache_branch"].startswith("false")
    assert "KV cache: 5 inputs bound" in report.format().splitlines()[1]


# -- a fused attention op with a past --------------------------------------------------------------------
HEADS, D, PAST = 4, 4, "past_sequence_length"


def _mha_graph(with_past: bool):
    g = hb.Graph([hb.float_input()], opset=17)
    q, k, v = (g.op("MatMul", "x", g.init(hb.weights(s, hb.HID, HEADS * D))) for s in (1, 2, 3))
    past = []
    if with_past:
        for name in ("past_key", "past_value"):
            g.inputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, [hb.B, HEADS, PAST, D]))
        past = ["", "", "", "past_key", "past_value"]  # bias, key_padding_mask, attention_bias, past_key/value
    y = g.op("MultiHeadAttention", q, k, v, *past, domain="com.microsoft", num_heads=HEADS)
    return g.model(g.op("MatMul", y, g.init(hb.weights(4, HEADS * D, hb.VOCAB))))


def test_fused_attention_past_slots_are_emptied():
    x = np.random.default_rng(2).standard_normal((hb.B, hb.S, hb.HID)).astype(np.float32)
    cached, plain = _mha_graph(True), _mha_graph(False)
    empty = np.zeros((hb.B, HEADS, 0, D), np.float32)
    kernel = hb.ort_run(cached, {"x": x, "past_key": empty, "past_value": empty})
    np.testing.assert_allclose(kernel, hb.ort_run(plain, {"x": x}), rtol=1e-5, atol=1e-6)
    for rules in RULES:
        got, forward = hb.relevance(cached, rules, {"x": x})
        want, _ = hb.relevance(plain, rules, {"x": x})
        np.testing.assert_allclose(forward, kernel, rtol=1e-5, atol=1e-6)
        assert rel_l2(got.relevance, want.relevance) <= TOLERANCE[rules], rules


def _reading_graph(reader, with_cache=False):
    """x -> MatMul -> logits, plus a term read from an input past_key [B, heads, past, head_dim]:
    reader "data" (its ReduceMean: read as data, as a cross-attention cache or a time series' past values
    are), "shape" (its last axis's size, as a float). with_cache: also an input past_value that is a
    cache (concatenated along its past axis with the projected x, then reduced into the output)."""
    inputs = [hb.float_input(), helper.make_tensor_value_info("past_key", TensorProto.FLOAT,
                                                              [hb.B, HEADS, PAST, "head_dim"])]
    if with_cache:
        inputs.append(helper.make_tensor_value_info("past_value", TensorProto.FLOAT, [hb.B, HEADS, PAST, D]))
    g = hb.Graph(inputs, opset=17)
    y = g.op("MatMul", "x", g.init(hb.weights(1, hb.HID, hb.HID)))
    if reader == "data":
        term = g.op("ReduceMean", "past_key", keepdims=0)
    else:
        term = g.op("Cast", g.op("Gather", g.op("Shape", "past_key"), g.init(3, np.int64)), to=TensorProto.FLOAT)
    y = g.op("Add", y, term)
    if with_cache:  # [B, S, HID] -> [B, heads, S, D], appended to the past, summed over heads and D
        v = g.op("Transpose", g.op("Reshape", y, g.init([hb.B, hb.S, HEADS, D], np.int64)), perm=[0, 2, 1, 3])
        full = g.op("Concat", "past_value", v, axis=2)
        summed = g.op("ReduceSum", full, g.init([1, 3], np.int64), keepdims=0)  # [B, S]
        y = g.op("Add", y, g.op("Unsqueeze", summed, g.init([2], np.int64)))  # + [B, S, 1]
    return g.model(g.op("MatMul", y, g.init(hb.weights(2, hb.HID, hb.VOCAB))))


def test_input_named_past_but_read_as_data_is_an_ordinary_input():
    """A time series' past_values (or any past-named input that is not extended along an axis) is no cache:
    it stays an input, and relevance equals the same graph's with the input renamed."""
    model = _reading_graph("data")
    renamed = onnx.ModelProto.FromString(model.SerializeToString())
    for n in renamed.graph.node:
        n.input[:] = ["series" if i == "past_key" else i for i in n.input]
    renamed.graph.input[1].name = "series"
    renamed.graph.input[1].type.tensor_type.shape.dim[3].dim_value = D
    model.graph.input[1].type.tensor_type.shape.dim[3].dim_value = D
    x = np.random.default_rng(3).standard_normal((hb.B, hb.S, hb.HID)).astype(np.float32)
    past = np.random.default_rng(4).standard_normal((hb.B, HEADS, 3, D)).astype(np.float32)
    got, _ = hb.relevance(model, "attnlrp", {"x": x, "past_key": past})
    want, _ = hb.relevance(renamed, "attnlrp", {"x": x, "series": past})
    np.testing.assert_array_equal(got.relevance, want.relevance)
    assert "bound_inputs" not in json.loads(lrp_onnx.convert(model, source="x").metadata_props[0].value)


def test_cache_read_as_data_next_to_a_cache_is_refused_naming_the_reader():
    model = _reading_graph("data", with_cache=True)
    reader = next(n for n in model.graph.node if n.op_type == "ReduceMean")
    for call in (lrp_onnx.convert, lrp_onnx.inspect_model):
        with pytest.raises(LRPError, match=f"cache input 'past_key': read as data by '{reader.name}'.*past_value"):
            call(model, source="x")


def test_cache_axis_of_unknown_size_is_refused_when_its_shape_is_read():
    with pytest.raises(LRPError, match="cache input 'past_key': axis 3 \\('head_dim'\\) is neither static.*reads its shape"):
        lrp_onnx.convert(_reading_graph("shape", with_cache=True), source="x")
    # unread (a fused attention op's emptied past slot), the same unknown axis is no obstacle
    model = _mha_graph(True)
    model.graph.input[1].type.tensor_type.shape.dim[3].dim_param = "head_dim"
    assert "lrp_relevance" in [o.name for o in lrp_onnx.convert(model, source="x").graph.output]


# -- decoding with the cache ---------------------------------------------------------------------------
@pytest.mark.parametrize("form", ["with_past", "merged"])
def test_generation_decodes_with_the_cache(optimum_exports, form):
    """decoder= a KV-cache export: the prompt is fed once, then one token a step with the cache the step
    before returned; each step's next-token logits equal the no-cache export's over the whole sequence,
    and the explained generation equals the one decoded without a cache."""
    import onnxruntime as ort

    from lrp_onnx.run.generation import _decoder

    nocache, exports = optimum_exports
    explainer = explainer_for(exports[form], multi_target=True)
    prompt = explain_inputs("llama")["input_ids"][:1]
    step = _decoder(explainer, exports[form], {})
    plain = ort.InferenceSession(str(nocache), providers=CPU)
    ids = prompt
    for _ in range(5):
        got = step(ids)
        want = plain.run(None, {"input_ids": ids, "attention_mask": np.ones_like(ids)})[0][0, -1]
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
        ids = np.concatenate([ids, [[int(np.argmax(got))]]], axis=1)
    assert step.fed == [prompt.shape[1], 1, 1, 1, 1]
    cached = explainer.explain_generation(prompt, 6, decoder=exports[form])
    uncached = explainer.explain_generation(prompt, 6)
    np.testing.assert_array_equal(cached.generated_ids, uncached.generated_ids)
    np.testing.assert_array_equal(cached.relevance, uncached.relevance)


def test_cache_concatenated_and_measured_gives_the_empty_cache_run():
    """past_value concatenated along its past axis and past_key's shape read (a past length): bound empty,
    the converted forward equals onnxruntime's run fed empty caches, and gradient-mode relevance equals
    float64 finite differences of that run."""
    model = _reading_graph("shape", with_cache=True)
    model.graph.input[1].type.tensor_type.shape.dim[3].dim_value = D
    assert sorted(lrp_onnx.inspect_model(model, source="x").bound_inputs) == ["past_key", "past_value"]
    x = np.random.default_rng(5).standard_normal((hb.B, hb.S, hb.HID)).astype(np.float32)
    empty = {"past_key": np.zeros((hb.B, HEADS, 0, D), np.float32), "past_value": np.zeros((hb.B, HEADS, 0, D), np.float32)}
    got, forward = hb.relevance(model, "gradient", {"x": x})
    np.testing.assert_allclose(forward, hb.ort_run(model, {"x": x, **empty}), rtol=1e-6, atol=1e-6)
    reference = hb.finite_difference_relevance(model, {"x": x, **empty})
    assert rel_l2(got.relevance, reference) <= 1e-5


def test_cli_generate_with_a_cache_decoder(optimum_exports, word_tokenizer, tmp_path):
    """explain --generate N --decoder with_past.onnx: the same generation and matrix as the API."""
    import subprocess
    import sys

    _, exports = optimum_exports
    converted = tmp_path / "multi.onnx"
    lrp_onnx.convert(exports["with_past"], converted, multi_target=True)
    proc = subprocess.run([sys.executable, "-m", "lrp_onnx", "explain", str(converted), "--tokenizer",
                           str(word_tokenizer), "--text", "w5 w17 w3 w44", "--generate", "3", "--decoder",
                           str(exports["with_past"]), "--json"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    api = lrp_onnx.Explainer(converted, providers=CPU).explain_generation([5, 17, 3, 44], 3)
    assert report["generated_ids"] == api.generated_ids.tolist()
    np.testing.assert_allclose(np.array(report["relevance"]), api.relevance, rtol=1e-6, atol=1e-7)
    bad = subprocess.run([sys.executable, "-m", "lrp_onnx", "explain", str(converted), "--tokenizer",
                          str(word_tokenizer), "--text", "w5", "--decoder", str(exports["with_past"])],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and bad.stderr.strip() == "lrp-onnx: error: --decoder decodes for --generate: give --generate N"


def test_optimum_seq2seq_decoders(tiny_model, workdir):
    """T5 through optimum's text2text-generation-with-past: the merged decoder explains like the decoder
    without past (its self- and cross-attention caches are unread once use_cache_branch is false); the
    decoder with past reads its cross-attention cache as data and is refused, naming the reader."""
    import onnxruntime as ort

    from models import kvcache

    hf_dir, _ = tiny_model("t5")
    paths = kvcache.seq2seq(hf_dir, workdir / "kvcache" / "t5")
    inputs = explain_inputs("t5")
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    hidden = ort.InferenceSession(str(paths["encoder"]), providers=CPU).run(
        None, {"input_ids": ids, "attention_mask": mask})[0]
    feed = {"input_ids": inputs["decoder_input_ids"], "encoder_hidden_states": hidden, "encoder_attention_mask": mask}
    for rules in RULES:
        merged = explainer_for(paths["decoder_merged"], rules)
        plain = explainer_for(paths["decoder"], rules)
        got = merged.run(**{k: v for k, v in feed.items() if k in merged.input_names})
        want = plain.run(**{k: v for k, v in feed.items() if k in plain.input_names})
        np.testing.assert_array_equal(got.target, want.target)
        assert rel_l2(got.relevance, want.relevance) <= TOLERANCE[rules], rules
    assert merged.meta["bound_inputs"]["use_cache_branch"].startswith("false")
    with pytest.raises(LRPError, match="cache input 'past_key_values.0.encoder.key': read as data by "
                                       "'/decoder/block.0/layer.1/EncDecAttention/MatMul'"):
        lrp_onnx.convert(str(paths["decoder_with_past"]))


def test_a_flag_unrelated_to_the_cache_stays_an_input():
    """Next to a real cache, a boolean that chooses between branches neither of which reads the cache
    (a sampling switch) is left alone: an input, its If a dynamic one; only the cache is bound."""
    g = hb.Graph([hb.float_input(), helper.make_tensor_value_info("past_value", TensorProto.FLOAT,
                                                                  [hb.B, HEADS, PAST, D]),
                  helper.make_tensor_value_info("use_sampling", TensorProto.BOOL, [1])], opset=17)
    y = g.op("MatMul", "x", g.init(hb.weights(1, hb.HID, HEADS * D)))
    v = g.op("Transpose", g.op("Reshape", y, g.init([hb.B, hb.S, HEADS, D], np.int64)), perm=[0, 2, 1, 3])
    g.op("Concat", "past_value", v, axis=2)  # the cache, extended (its present output unused here)
    branch = {}
    for name, factor in (("then_branch", 2.0), ("else_branch", 3.0)):
        out = f"{name}_out"
        branch[name] = helper.make_graph([helper.make_node("Mul", [y, g.init(np.float32(factor))], [out])], name, [],
                                         [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)])
    z = g.op("If", "use_sampling", **branch)
    model = g.model(g.op("MatMul", z, g.init(hb.weights(2, HEADS * D, hb.VOCAB))))
    report = lrp_onnx.inspect_model(model, source="x")
    assert report.supported and report.bound_inputs == {"past_value": "empty (axis 2 of length 0)"}
    x = np.random.default_rng(6).standard_normal((hb.B, hb.S, hb.HID)).astype(np.float32)
    w1, w2 = hb.weights(1, hb.HID, HEADS * D).astype(np.float64), hb.weights(2, HEADS * D, hb.VOCAB).astype(np.float64)
    for flag, factor in ((True, 2.0), (False, 3.0)):  # the model is linear: relevance = x * (factor w1 w2[:, t])
        got, _ = hb.relevance(model, "gradient", {"x": x, "use_sampling": np.array([flag])})
        want = np.zeros(x.shape)
        for row, (t, p) in enumerate(zip(np.broadcast_to(hb.TARGET, (hb.B,)), np.broadcast_to(hb.POSITION, (hb.B,)))):
            want[row, p % hb.S] = x[row, p % hb.S] * factor * (w1 @ w2[:, t])
        assert rel_l2(got.relevance, want) <= 1e-5
