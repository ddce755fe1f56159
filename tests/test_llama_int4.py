"""models/llama_int4.py (issue 21, goal 4): the streamed random-weight LLaMA in onnxruntime-genai's int4 CPU
layout.

* At the tiny shape its graph equals, node for node (op types, names, inputs, outputs, attributes), the
  graph onnxruntime-genai 0.18's builder itself writes with ``-p int4 -e cpu`` for a tiny LLaMA, untied
  (float Gather embedding, as LLaMA-2) and tied (GatherBlockQuantized on the LM head's packed weight, as
  LLaMA-3.2), with the same inputs, outputs, initializer names / types / shapes, value infos and opsets.
* It converts and explains: the `gradient` relevance at the embedding output equals Gradient x Input by
  central finite differences of onnxruntime's forward of the same graph cut at the embedding (MatMulNBits
  with accuracy_level 1, i.e. float compute, so the forward is smooth), for both embeddings; and the
  builder's default accuracy_level 4 (int8 activations in the forward) gives a finite relevance of the
  right shape close to it.
"""
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper

import lrp_onnx
from models import llama_int4
from tests.conftest import CPU

IDS = np.array([[5, 17, 42, 3, 9, 60, 11]], dtype=np.int64)
MASK = np.ones_like(IDS)
TARGET = 42
SOURCE = {False: "/model/embed_tokens/Gather/output_0", True: "/model/embed_tokens/GatherBlockQuantized/output_0"}


def _signature(path):
    model = onnx.load(str(path), load_external_data=False)
    nodes = [(n.op_type, n.domain, n.name, list(n.input), list(n.output),
              sorted((a.name, str(helper.get_attribute_value(a))) for a in n.attribute if a.name != "value"))
             for n in model.graph.node]
    return {"nodes": nodes,
            "io": [helper.printable_value_info(v) for v in [*model.graph.input, *model.graph.output]],
            "initializers": [(t.name, t.data_type, list(t.dims)) for t in model.graph.initializer],
            "value_info": sorted(helper.printable_value_info(v) for v in model.graph.value_info),
            "opsets": sorted((o.domain, o.version) for o in model.opset_import)}


@pytest.fixture(scope="module")
def builder(workdir):
    return llama_int4.builder_reference(workdir / "llama-int4-builder")


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_recipe_writes_the_builders_int4_graph(builder, workdir, tied):
    ours = llama_int4.write(workdir / f"llama-int4-{tied}", "tiny", tied=tied)
    theirs = builder["tied" if tied else "untied"]
    got, want = _signature(ours), _signature(theirs)
    for key in want:
        assert got[key] == want[key], key
    ops = {n[0] for n in got["nodes"]}
    assert {"MatMulNBits", "GroupQueryAttention", "SkipSimplifiedLayerNormalization"} <= ops
    assert ("GatherBlockQuantized" in ops) == tied


def _with_output(path, name):
    model = onnx.load(str(path))
    model.graph.output.append(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    return model


def _cut_at_source(path, source):
    """The graph with the embedding lookup removed and its output made a float input."""
    model = onnx.load(str(path))
    keep = [n for n in model.graph.node if source not in n.output]
    del model.graph.node[:]
    model.graph.node.extend(keep)
    model.graph.input.append(helper.make_tensor_value_info(source, onnx.TensorProto.FLOAT, None))
    return model.SerializeToString()


def _feeds():
    return {"input_ids": IDS, "attention_mask": MASK, **llama_int4.past_inputs("tiny")}


def _finite_difference_relevance(path, source, embeds, eps=1e-2):
    session = ort.InferenceSession(_cut_at_source(path, source), providers=CPU)
    feeds = {k: v for k, v in _feeds().items() if k in {i.name for i in session.get_inputs()}}

    def logit(x):
        return float(session.run(["logits"], {**feeds, source: x.astype(np.float32)})[0][0, -1, TARGET])

    base = embeds.astype(np.float64).ravel()
    grad = np.zeros_like(base)
    for i in range(base.size):
        step = np.zeros_like(base)
        step[i] = eps
        grad[i] = (logit((base + step).reshape(embeds.shape)) - logit((base - step).reshape(embeds.shape))) / (2 * eps)
    return (base * grad).reshape(embeds.shape)


def _explain(path, tied, rules="gradient"):
    out = path.with_name(f"model.{rules}.lrp.onnx")
    lrp_onnx.convert(str(path), str(out), rules=rules, source=[SOURCE[tied]])
    explainer = lrp_onnx.Explainer(str(out), providers=CPU)
    return explainer.run(target=[TARGET], position=[-1], input_ids=IDS, attention_mask=MASK)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_gradient_relevance_equals_finite_differences(workdir, tied):
    path = llama_int4.write(workdir / f"llama-int4-fd-{tied}", "tiny", tied=tied, accuracy_level=1, seed=3)
    got = _explain(path, tied)
    assert got.relevance.shape == (1, 7, 64) and np.isfinite(got.relevance).all()
    session = ort.InferenceSession(_with_output(path, SOURCE[tied]).SerializeToString(), providers=CPU)
    embeds = session.run([SOURCE[tied]], _feeds())[0]
    want = _finite_difference_relevance(path, SOURCE[tied], embeds)
    err = np.linalg.norm(got.relevance - want) / np.linalg.norm(want)
    assert err < 2e-3, err
    assert abs(got.relevance.sum() - want.sum()) < 2e-3 * np.abs(want).sum()


def test_accuracy_level_4_explains_close_to_float_compute(workdir):
    """The builder's default (int8 activations inside MatMulNBits) converts and explains; its relevance
    stays close to the float-compute graph's with the same weights."""
    level4 = _explain(llama_int4.write(workdir / "llama-int4-al4", "tiny", tied=True, seed=3), True)
    level1 = _explain(llama_int4.write(workdir / "llama-int4-al1", "tiny", tied=True, accuracy_level=1, seed=3), True)
    assert level4.relevance.shape == (1, 7, 64) and np.isfinite(level4.relevance).all()
    a, b = level4.relevance.ravel(), level1.relevance.ravel()
    assert a @ b / np.linalg.norm(a) / np.linalg.norm(b) > 0.99


@pytest.mark.parametrize("memory", ["fast", "lean"])
def test_backward_keeps_no_layer_input_alive(workdir, memory):
    """What the backward reads from the forward is what stays alive until it runs. The gradient of a
    MatMulNBits needs its weight and the incoming gradient, never its input A (the norm's output): no
    backward node reads A, not even its shape. The norms' backward reads their sum (SkipSimplified-
    LayerNormalization's output 3), not both of its inputs (the residual and the projection's output)."""
    from lrp_onnx.passes.lean import _is_backward

    path = llama_int4.write(workdir / "llama-int4-saved", "tiny", tied=False)
    model = lrp_onnx.convert(str(path), memory=memory, relevance_only=True)
    nodes = list(model.graph.node)
    read = {t for n in nodes if _is_backward(n) for t in n.input}
    layer_inputs = {n.input[0] for n in nodes if n.op_type == "MatMulNBits" and not _is_backward(n)}
    assert layer_inputs and not layer_inputs & read
    norms = [n for n in nodes if n.op_type == "SkipSimplifiedLayerNormalization" and not _is_backward(n)]
    with_sum = [n for n in norms if len(n.output) > 3 and n.output[3]]
    assert with_sum and all(n.output[3] in read and n.input[1] not in read for n in with_sum)
