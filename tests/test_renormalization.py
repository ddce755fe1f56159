"""Top-k routing weights renormalised by a statistic of themselves: a / sum(a) (Mixtral, Qwen3-MoE) and
a / ||a||_p (DBRX's ``moe_normalize_expert_weights``: p = 1 by default, exported as ReduceL1) are one
category, ``renormalization``, with the plain gradient in every rule set (LXT gives the router weights
the plain gradient). A division by a statistic of *another* tensor is not a renormalisation and stays
refused under attnlrp."""
import numpy as np
import pytest
from onnx import helper

import lrp_onnx
from lrp_onnx.errors import LRPError
from tests.handbuilt import CPU, HID, S, TARGET, VOCAB, finite_difference_relevance, rel_l2, simple_model, weights

POSITION = np.array([-1, 2])
EXPERTS, TOP = 4, 2


def _norm_nodes(kind, a):
    """Nodes computing the statistic `stat` of `a` along the last axis (keepdims)."""
    if kind == "sum":
        return [helper.make_node("ReduceSum", [a, "last"], ["stat"], keepdims=1)]
    if kind == "l1":
        return [helper.make_node("ReduceL1", [a], ["stat"], axes=[-1], keepdims=1)]
    if kind == "l2":
        return [helper.make_node("ReduceL2", [a], ["stat"], axes=[-1], keepdims=1)]
    if kind == "p3":  # torch.norm(p=3) written out: (sum |a|^3)^(1/3), clamped by an epsilon
        return [helper.make_node("Abs", [a], ["abs"]), helper.make_node("Pow", ["abs", "three"], ["cube"]),
                helper.make_node("ReduceSum", ["cube", "last"], ["cubes"], keepdims=1),
                helper.make_node("Pow", ["cubes", "third"], ["root"]),
                helper.make_node("Max", ["root", "eps"], ["stat"])]
    if kind == "other":  # a / sum(b) of another tensor b: not a renormalisation
        return [helper.make_node("ReduceSum", ["logits_r", "last"], ["stat"], keepdims=1)]
    raise ValueError(kind)


def routed_model(kind):
    """x [B, S, HID] -> router softmax -> top-2 weights w, renormalised w / s(w) -> sum over the chosen
    experts of w * expert(x) (each expert a Tanh MLP) -> logits."""
    nodes = [helper.make_node("MatMul", ["x", "wr"], ["logits_r"]),
             helper.make_node("Softmax", ["logits_r"], ["probs"], axis=-1),
             helper.make_node("TopK", ["probs", "k"], ["top", "idx"], axis=-1)]
    nodes += _norm_nodes(kind, "top")
    nodes += [helper.make_node("Div", ["top", "stat"], ["w"]),
              # dense dispatch: scatter the renormalised weights back to all experts
              helper.make_node("ScatterElements", ["zeros", "idx", "w"], ["gates"], axis=-1),
              helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Tanh", ["h"], ["ha"]),
              helper.make_node("Reshape", ["ha", "split"], ["per_expert"]),          # [B, S, E, HID]
              helper.make_node("Unsqueeze", ["gates", "last"], ["g4"]),
              helper.make_node("Mul", ["per_expert", "g4"], ["weighted"]),
              helper.make_node("ReduceSum", ["weighted", "two"], ["mixed"], keepdims=0),
              helper.make_node("MatMul", ["mixed", "wo"], ["logits"])]
    inits = [("wr", weights(1, HID, EXPERTS) * 3), ("w1", weights(2, HID, EXPERTS * HID)),
             ("wo", weights(3, HID, VOCAB)),
             ("k", np.array([TOP], np.int64)), ("last", np.array([-1], np.int64)), ("two", np.array([2], np.int64)),
             ("split", np.array([0, 0, EXPERTS, HID], np.int64)), ("zeros", np.zeros((2, S, EXPERTS), np.float32)),
             ("three", np.array(3.0, np.float32)), ("third", np.array(1 / 3, np.float32)),
             ("eps", np.array(1e-6, np.float32))]
    return simple_model(nodes, [("x", (2, S, HID))], [("logits", (2, S, VOCAB))], inits, opset=17)


def _run(model, rules, **kwargs):
    x = np.random.default_rng(0).standard_normal((2, S, HID)).astype(np.float32)
    converted = lrp_onnx.convert(model, rules=rules, source="x", **kwargs)
    result = lrp_onnx.Explainer.from_model(converted, providers=CPU).run(x=x, target=TARGET, position=POSITION)
    return x, result.relevances["lrp_relevance"]


@pytest.mark.parametrize("kind", ["sum", "l1", "l2", "p3"])
def test_renormalisation_by_a_norm_gets_the_gradient(kind):
    model = routed_model(kind)
    rows = lrp_onnx.inspect_model(model, rules="attnlrp", source="x").rows
    (div,) = [(cats, rule) for desc, cats, rule in rows if "Div" in desc]
    assert div == (["renormalization", "Div"], "gradient")
    x, attn = _run(model, "attnlrp")
    # the category's rule is the plain gradient: the same relevance as overriding the Div by hand
    _, by_hand = _run(model, "attnlrp", overrides={"Div": "gradient"})
    assert rel_l2(attn, by_hand) < 1e-6 and np.abs(attn).sum() > 0
    _, grad = _run(model, "gradient")
    assert rel_l2(grad, finite_difference_relevance(model, {"x": x}, target=TARGET, position=POSITION)) < 1e-5


def test_division_by_a_statistic_of_another_tensor_stays_refused():
    with pytest.raises(LRPError, match="Div"):
        lrp_onnx.convert(routed_model("other"), rules="attnlrp", source="x")


def test_dbrx_router_converts_under_attnlrp(tmp_path):
    """The tiny DBRX of the sweep (transformers 4.52, TorchScript): its router's w / ||w||_1 is a
    renormalisation (one per layer), and the attnlrp conversion runs with finite relevance."""
    from tools import sweep

    task, model = sweep.build("dbrx")
    path, names = sweep.export(model, task, tmp_path / "dbrx.onnx", "torchscript")
    rows = lrp_onnx.inspect_model(path, rules="attnlrp").rows
    renorm = [(cats[1], rule) for _, cats, rule in rows if cats[0] == "renormalization"]
    assert renorm == [("Div", "gradient")] * model.config.n_layers
    out = tmp_path / "dbrx.attnlrp.onnx"
    lrp_onnx.convert(path, out, rules="attnlrp")
    inputs = sweep.explain_setup(task, names)
    target, position = sweep.targets_for((2, 7, sweep.VOCAB), task)
    result = lrp_onnx.Explainer(out, providers=CPU).run(target=target, position=position, **inputs)
    relevance = result.relevance_of("input_ids")
    assert relevance.shape == (2, 7, sweep.HIDDEN) and np.isfinite(relevance).all() and np.abs(relevance).sum() > 0
