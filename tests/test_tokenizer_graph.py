"""A graph that tokenizes inside: a string input, onnxruntime-extensions' SentencepieceTokenizer (a tiny
SentencePiece model trained here from a few sentences), the ids cast and looked up in the embedding table,
then a small attention block. The ids a tokenizer makes from a string input are token ids: the lookup
is the default source (no --source), its relevance is recorded as the string input's, and the ids come
out as `lrp_token_ids` so that relevance maps to tokens. Gradient relevance equals central differences
of a numpy reimplementation of the same block."""
import io
import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import sentencepiece as spm  # requirements-test.txt; onnxruntime_extensions too (lrp_onnx registers its ops)

import lrp_onnx

TEXTS = ["the cat sat on the mat", "a dog ran in the park", "the bird sang a song", "cats and dogs play",
         "the sun is bright today", "a small model for tests"]
HID, VOCAB_OUT, TARGET = 8, 5, 3


@pytest.fixture(scope="module")
def sentencepiece_model():
    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(TEXTS * 4), model_writer=buffer, vocab_size=40,
                                   hard_vocab_limit=False, model_type="unigram", minloglevel=2)
    return buffer.getvalue()


def _weights(rng):
    return {"table": rng.standard_normal((40, HID)) * 0.5, "wq": rng.standard_normal((HID, HID)) * 0.5,
            "wk": rng.standard_normal((HID, HID)) * 0.5, "wv": rng.standard_normal((HID, HID)) * 0.5,
            "wo": rng.standard_normal((HID, VOCAB_OUT)) * 0.5}


def tokenizing_model(proto, w):
    nodes = [
        helper.make_node("SentencepieceTokenizer", ["text", "nbest", "alpha", "bos", "eos", "rev"], ["tokens", "rows"],
                         domain="ai.onnx.contrib", model=proto),
        helper.make_node("Cast", ["tokens"], ["ids"], to=TensorProto.INT64),
        helper.make_node("Gather", ["table", "ids"], ["emb"]),                     # [T, HID]
        helper.make_node("Unsqueeze", ["emb", "zero"], ["h"]),                     # [1, T, HID]
        helper.make_node("MatMul", ["h", "wq"], ["q"]), helper.make_node("MatMul", ["h", "wk"], ["k"]),
        helper.make_node("MatMul", ["h", "wv"], ["v"]),
        helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 2, 1]),
        helper.make_node("MatMul", ["q", "kt"], ["scores"]),
        helper.make_node("Softmax", ["scores"], ["probs"], axis=-1),
        helper.make_node("MatMul", ["probs", "v"], ["ctx"]),
        helper.make_node("Tanh", ["ctx"], ["act"]),
        helper.make_node("MatMul", ["act", "wo"], ["logits"]),
    ]
    consts = {"nbest": np.array(0, np.int64), "alpha": np.array(0.0, np.float32), "bos": np.array(False),
              "eos": np.array(False), "rev": np.array(False), "zero": np.array([0], np.int64)}
    consts.update({k: v.astype(np.float32) for k, v in w.items()})
    graph = helper.make_graph(nodes, "tokenizing", [helper.make_tensor_value_info("text", TensorProto.STRING, [1])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, None, VOCAB_OUT])],
                              [onnx.numpy_helper.from_array(v, k) for k, v in consts.items()])
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("ai.onnx.contrib", 1)]
    return helper.make_model(graph, opset_imports=opsets)


def numpy_logit(emb, w):
    q, k, v = emb @ w["wq"], emb @ w["wk"], emb @ w["wv"]
    s = q @ k.T
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return (np.tanh(p @ v) @ w["wo"])[-1, TARGET]


def test_in_graph_tokenizer_is_the_default_source(sentencepiece_model):
    w = _weights(np.random.default_rng(0))
    model = tokenizing_model(sentencepiece_model, w)
    converted = lrp_onnx.convert(model, rules="gradient")   # no source named
    meta = json.loads(next(p.value for p in converted.metadata_props if p.key == "lrp_onnx"))
    assert meta["source_inputs"] == {"lrp_relevance": "text"}
    assert meta["token_ids"] == {"lrp_relevance": "lrp_token_ids"}
    text = "the cat ran in the sun"
    result = lrp_onnx.Explainer.from_model(converted, providers=["CPUExecutionProvider"]).run(
        text=np.array([text]), target=[TARGET])
    ids = spm.SentencePieceProcessor(model_proto=sentencepiece_model).encode(text)
    assert result.outputs["lrp_token_ids"].tolist() == ids
    relevance = result.relevance_of("text")
    emb = w["table"][ids]
    assert relevance.shape == emb.shape
    eps, grad = 1e-6, np.zeros_like(emb)
    for i in np.ndindex(emb.shape):
        up, down = emb.copy(), emb.copy()
        up[i] += eps
        down[i] -= eps
        grad[i] = (numpy_logit(up, w) - numpy_logit(down, w)) / (2 * eps)
    expected = emb * grad
    assert np.linalg.norm(relevance - expected) / np.linalg.norm(expected) < 1e-4
    assert np.isclose(result.logit[0], numpy_logit(emb, w), rtol=1e-5)


def test_attnlrp_converts_the_tokenizing_graph(sentencepiece_model):
    model = tokenizing_model(sentencepiece_model, _weights(np.random.default_rng(1)))
    converted = lrp_onnx.convert(model, rules="attnlrp")
    result = lrp_onnx.Explainer.from_model(converted, providers=["CPUExecutionProvider"]).run(
        text=np.array(["a dog sat"]), target=[1])
    relevance = result.relevance_of("text")
    assert relevance.shape[0] == len(result.outputs["lrp_token_ids"]) and np.isfinite(relevance).all()
