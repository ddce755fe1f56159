"""onnxruntime-genai's model builder in int4 (issue 21): MatMulNBits weights (accuracy levels 1 and 4)
and a GatherBlockQuantized embedding, on SmolLM2-135M's real weights (first 2 layers) and on the tiny
random LLaMA of models/genai.py.

* The builder's file converts without --source: the GatherBlockQuantized lookup is the default source,
  its token-id input and id limit are recorded.
* Its relevance agrees with the fp32 export's (models.smollm2, the same weights dequantized): cosine
  and top-k tokens.
* Quantized weights stay quantized under onnxruntime's default session options: the optimized model
  (every graph optimization, constant folding included) holds less float initializer data than the
  4-bit weights themselves (a constant-folded dequantization would hold 8x their size), and each
  MatMulNBits' backward DequantizeLinear is still there.
"""
import numpy as np
import onnx
import onnxruntime as ort
import pytest

import lrp_onnx
from lrp_onnx.run.session import input_defaults
from models import genai
from tests.conftest import CPU, cosine

TEXT = "The capital of France is Paris, and the capital of Germany is"
# SmolLM2 (2 layers, 13 tokens), int4 vs fp32 export: seen token cosine 0.9998, per-dimension cosine 0.984,
# the same top-5 tokens; the bounds leave room for kernel differences across CPUs
MIN_TOKEN_COSINE, MIN_COSINE = 0.99, 0.95


@pytest.fixture(scope="module")
def smollm2_int4(smollm2_2layers, workdir):
    """The builder's int4 CPU model of the 2-layer SmolLM2 and its conversion (a file beside it)."""
    path = genai.run_builder(smollm2_2layers["hf_dir"], workdir / "smollm2-2layers-int4", "int4")
    converted = path.with_name("model.lrp.onnx")
    lrp_onnx.convert(str(path), str(converted))
    return path, converted


@pytest.fixture(scope="module")
def feed(smollm2_2layers):
    from tokenizers import Tokenizer

    ids = np.array([Tokenizer.from_file(str(smollm2_2layers["tokenizer"])).encode(TEXT).ids], np.int64)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids)}


def test_builder_int4_has_quantized_weights_and_embedding(smollm2_int4):
    ops = {n.op_type for n in onnx.load(str(smollm2_int4[0]), load_external_data=False).graph.node}
    assert {"MatMulNBits", "GatherBlockQuantized"} <= ops and "MatMul" not in ops


def test_gather_block_quantized_is_the_default_source(smollm2_int4):
    meta = lrp_onnx.Explainer(str(smollm2_int4[1]), providers=CPU).meta
    model = onnx.load(str(smollm2_int4[0]), load_external_data=False)
    lookup = next(n for n in model.graph.node if n.op_type == "GatherBlockQuantized")
    assert meta["sources"] == [lookup.output[0]]
    assert meta["source_inputs"] == {"lrp_relevance": "input_ids"}
    assert meta["input_limits"]["inputs"] == {"input_ids": 49152}


def test_out_of_range_ids_are_refused(smollm2_int4, feed):
    explainer = lrp_onnx.Explainer(str(smollm2_int4[1]), providers=CPU)
    bad = dict(feed, input_ids=np.where(np.arange(feed["input_ids"].shape[1]) == 2, 49152, feed["input_ids"]))
    with pytest.raises(lrp_onnx.LRPError, match="input 'input_ids': id 49152"):
        explainer.run(**bad)


def test_int4_relevance_agrees_with_the_fp32_export(smollm2_2layers, smollm2_int4, feed):
    fp32 = lrp_onnx.Explainer.from_model(lrp_onnx.convert(str(smollm2_2layers["onnx"])), providers=CPU).run(**feed)
    int4 = lrp_onnx.Explainer(str(smollm2_int4[1]), providers=CPU).run(target=fp32.target, **feed)
    assert int4.outputs["logits"][0, -1].argmax() == fp32.target[0]  # the int4 model predicts the same token
    a, b = fp32.token_relevance()[0], int4.token_relevance()[0]
    assert cosine(a, b) >= MIN_TOKEN_COSINE
    assert cosine(fp32.relevance, int4.relevance) >= MIN_COSINE
    assert set(np.argsort(-a)[:5]) == set(np.argsort(-b)[:5])
    assert np.argmax(a) == np.argmax(b)


def _optimized(path, out):
    """The model onnxruntime runs under default session options (all optimizations), written to `out`."""
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(out)
    options.log_severity_level = 3
    ort.InferenceSession(str(path), options, providers=CPU)
    return onnx.load(str(out), load_external_data=False)


def _bytes(tensor) -> int:
    bits = {onnx.TensorProto.UINT4: 4, onnx.TensorProto.INT4: 4}.get(
        tensor.data_type, 8 * onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize)
    return int(np.prod(tensor.dims, dtype=np.int64)) * bits // 8


def test_weights_stay_4_bit_under_default_session_options(smollm2_int4, tmp_path):
    source = onnx.load(str(smollm2_int4[0]), load_external_data=False)
    by_name = {t.name: t for t in source.graph.initializer}
    packed = sum(_bytes(by_name[n.input[1]]) for n in source.graph.node if n.op_type == "MatMulNBits")
    forward = _optimized(smollm2_int4[0], tmp_path / "forward.onnx")
    forward_ints = sum(_bytes(t) for t in forward.graph.initializer if t.data_type in INTEGER_WEIGHTS)
    optimized = _optimized(smollm2_int4[1], tmp_path / "optimized.onnx")
    floats = sum(_bytes(t) for t in optimized.graph.initializer
                 if t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16))
    assert floats < packed  # folded dequantized weights: >= 8 * packed
    # the backward reads the forward's packed bytes: no second copy (a view, unpacked or folded bytes,
    # folded zero points)
    ints = sum(_bytes(t) for t in optimized.graph.initializer if t.data_type in INTEGER_WEIGHTS)
    assert ints <= forward_ints + 1024  # + the masks and shifts (a few bytes)
    ops = [n.op_type for n in optimized.graph.node]
    assert ops.count("DequantizeLinear") == 2 * ops.count("MatMulNBits") > 0  # the even and odd columns


INTEGER_WEIGHTS = (onnx.TensorProto.UINT8, onnx.TensorProto.INT8, onnx.TensorProto.UINT4, onnx.TensorProto.INT4)


@pytest.mark.parametrize("accuracy_level", [1, 4])
def test_tiny_builder_int4_relevance_close_to_fp32(workdir, accuracy_level):
    """The tiny random LLaMA in the builder's int4 form, against the builder's fp32 form of the same weights."""
    out = workdir / "genai-llama"
    fp32_path = genai.export_genai(out)
    int4_path = genai.run_builder(genai.hf_dir(out), out / f"genai-int4-acc{accuracy_level}", "int4",
                                  {"int4_accuracy_level": accuracy_level})
    ids = np.array([[5, 17, 42, 8, 99, 23, 61, 3, 77, 12]], np.int64)
    feed = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    runs = {}
    for name, path in (("fp32", fp32_path), ("int4", int4_path)):
        converted = path.with_name("model.lrp.onnx")
        lrp_onnx.convert(str(path), str(converted))
        runs[name] = lrp_onnx.Explainer(str(converted), providers=CPU).run(target=[7], **feed)
    assert "MatMulNBits" in {n.op_type for n in onnx.load(str(int4_path), load_external_data=False).graph.node}
    a, b = runs["fp32"].token_relevance()[0], runs["int4"].token_relevance()[0]
    assert cosine(a, b) >= TINY_MIN_TOKEN_COSINE
    assert cosine(runs["fp32"].relevance, runs["int4"].relevance) >= TINY_MIN_COSINE
    assert set(np.argsort(-a)[:3]) == set(np.argsort(-b)[:3])


# tiny random LLaMA, int4 vs fp32 (attnlrp, both accuracy levels): seen token cosine 0.983, per-dimension
# cosine 0.920, the same top-3 tokens; a relevance unrelated to the fp32 one stays far below
TINY_MIN_TOKEN_COSINE, TINY_MIN_COSINE = 0.95, 0.85


def test_generation_decodes_with_the_builders_int4_cache(workdir):
    """The builder declares the cache's head axis symbolic (kv_cache_dim): decoding with the original file
    and its cache takes the head size from the GroupQueryAttention reading it (query width / heads), and
    gives the same tokens and relevance as decoding with the converted model's forward."""
    out = workdir / "genai-llama"
    path = genai.run_builder(genai.hf_dir(out), out / "genai-int4-decoder", "int4")
    past = next(i for i in onnx.load(str(path), load_external_data=False).graph.input if i.name.startswith("past"))
    assert past.type.tensor_type.shape.dim[-1].dim_param  # symbolic: nothing to read it from but the graph
    converted = path.with_name("model.lrp.onnx")
    lrp_onnx.convert(str(path), str(converted))
    explainer = lrp_onnx.Explainer(str(converted), providers=CPU)
    ids = np.array([[5, 17, 42, 8, 99]], np.int64)
    cached = explainer.explain_generation(ids, max_new_tokens=4, decoder=str(path))
    plain = explainer.explain_generation(ids, max_new_tokens=4)
    np.testing.assert_array_equal(cached.generated_ids, plain.generated_ids)
    np.testing.assert_allclose(cached.relevance, plain.relevance, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("precision", ["fp32", "int4"])
def test_original_outputs_are_the_default_sessions_bit_for_bit(workdir, precision):
    """The converted builder model's logits equal a default onnxruntime session of the original, bit for bit,
    in a default session (pre-packing on) and through Explainer: the forward keeps the fused
    GroupQueryAttention (unfuse.refuse; a written-out attention rounds differently, and accuracy level 4
    quantizes each MatMulNBits input to int8, which amplifies that); forward="written" has none left and
    gives the same relevance."""
    out = workdir / "genai-llama"
    path = (genai.export_genai(out) if precision == "fp32" else
            genai.run_builder(genai.hf_dir(out), out / "genai-int4-acc4", "int4", {"int4_accuracy_level": 4}))
    ids = np.array([[5, 17, 42, 8, 99, 23, 61, 3, 77, 12]], np.int64)
    feed = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    options = ort.SessionOptions()
    options.log_severity_level = 3
    original = ort.InferenceSession(str(path), options, providers=CPU).run(
        ["logits"], {**feed, **genai.empty_past(path, 1)})[0]
    relevance = {}
    for forward in ("fused", "written"):
        converted = path.with_name(f"model.{forward}.lrp.onnx")
        lrp_onnx.convert(str(path), str(converted), forward=forward)
        ops = [n.op_type for n in onnx.load(str(converted), load_external_data=False).graph.node]
        layers = [n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node].count("GroupQueryAttention")
        assert ops.count("GroupQueryAttention") == (layers if forward == "fused" else 0) and layers > 0
        explainer = lrp_onnx.Explainer(str(converted), providers=CPU)
        result = explainer.run(target=[7], **feed)
        relevance[forward] = result.relevance
        if forward == "fused":
            session = ort.InferenceSession(str(converted), options, providers=CPU)
            got = session.run(["logits"], {**input_defaults(session), **feed})[0]
            np.testing.assert_array_equal(got, original)
            np.testing.assert_array_equal(result.outputs["logits"], original)
    a, b = relevance["fused"], relevance["written"]
    assert np.linalg.norm(a - b) <= 1e-5 * np.linalg.norm(a)


def test_shapes_stay_symbolic_after_the_quantized_embedding(smollm2_int4):
    """onnxruntime's symbolic inference types GatherBlockQuantized's output with the packed width (288 for a
    4-bit 576-wide table) and then fails at the next MatMulNBits; lrp_onnx's shape proxy gives the unpacked
    width, so the symbolic dims survive and the backward un-broadcasts nothing at run time (before: 21
    shape-comparing un-broadcasts per layer in the unfused attention's backward)."""
    from lrp_onnx.ir.shapes import infer_shapes

    path, converted = smollm2_int4
    model = onnx.load(str(path), load_external_data=False)
    lookup = next(n for n in model.graph.node if n.op_type == "GatherBlockQuantized")
    inferred = {vi.name: vi for vi in infer_shapes(model).graph.value_info}
    dims = [d.dim_param or d.dim_value for d in inferred[lookup.output[0]].type.tensor_type.shape.dim]
    assert dims[:2] == ["batch_size", "sequence_length"] and dims[2] == 576  # SmolLM2's hidden size
    ops = [n.op_type for n in onnx.load(str(converted), load_external_data=False).graph.node]
    assert ops.count("Not") == 0  # Where(Not(Equal(Shape(g), Shape(t)))): a run-time un-broadcast
