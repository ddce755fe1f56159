"""Sparse mixture of experts: tiny random-weight Mixtral, Qwen3-MoE and Qwen2-MoE (4 SwiGLU experts,
top-2 routing, both layers sparse).

Same protocol as test_families.py (fp32, batch 2 with a right-padded row, a different target and
position per row, both exporters): ``gradient`` equals torch.autograd, ``attnlrp`` / ``cp-lrp``
equal the LXT-style reference of tests/reference.py (LXT 2.1 has no MoE map; the reference
patches the MoE block the way LXT's Qwen3-MoE patch on GitHub does).

Rules checked here: under attnlrp the router softmax, top-k and renormalisation get the plain
gradient and routing weight x expert output the uniform rule (both operands carry relevance, as in
LXT); under cp-lrp the router is a constant (category ``router``), like attention probabilities and
gates, so the bias-free models (mixtral, qwen3_moe) are linear in the embeddings and relevance sums
to the logit. qwen3_moe renormalises the top-k weights (``norm_topk_prob=True``), qwen2_moe does not
(its default, False). qwen2_moe's shared expert is scaled by ``sigmoid(shared_expert_gate(x))``, a
``gate``: identity rule on the sigmoid and uniform on the product under attnlrp, constant under cp-lrp.
"""
import numpy as np
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import lrp_onnx
from models import tiny
from models._common import LogitsOnly, export_onnx
from tests.conftest import CONSERVATION, TOLERANCE, explain_inputs, exports, rel_l2
from tests.conftest import run_explainer as run
from tests.reference import compute_relevance
from tests.test_families import check_parity

FAMILIES = list(tiny.MOE_FAMILIES)  # mixtral, qwen3_moe, qwen2_moe
RULES = ["gradient", "attnlrp", "cp-lrp"]
MOE_LAYERS = tiny.NUM_LAYERS * tiny.MOE_NUM_EXPERTS  # (layer, expert) pairs
BIAS_FREE = {"mixtral", "qwen3_moe"}  # qwen2_moe has q/k/v biases: not linear even under cp-lrp
SHARED_EXPERT = {"qwen2_moe"}


@pytest.mark.parametrize("rules", RULES)
@pytest.mark.parametrize("family,exporter", exports(FAMILIES))
def test_relevance_equals_reference(family, exporter, rules, tiny_model, converted, reference):
    _, path = tiny_model(family, exporter)
    assert lrp_onnx.inspect_model(path, rules=rules).supported
    result = run(converted(family, exporter, rules), family)
    ref = reference(family, rules)
    ratio = result.relevance.sum(axis=(1, 2)) / result.logit
    CONSERVATION[(family, exporter, rules)] = ratio
    check_parity(result, ref, family, rules)
    # the converted graph's original output equals the exported graph's
    inputs = explain_inputs(family)
    original = tiny.onnx_logits(path, {k: inputs[k] for k in ("input_ids", "attention_mask")})
    np.testing.assert_allclose(result.outputs["logits"], original, rtol=0, atol=1e-5)
    if rules == "cp-lrp" and family in BIAS_FREE:  # router, gates and attention constant: a linear model
        np.testing.assert_allclose(ratio, 1.0, atol=1e-4)


@pytest.mark.parametrize("family,exporter", exports(FAMILIES))
def test_router_and_expert_products_are_classified(family, exporter, tiny_model):
    _, path = tiny_model(family, exporter)
    shared = tiny.NUM_LAYERS if family in SHARED_EXPERT else 0  # shared experts (one per layer)
    attn = lrp_onnx.inspect_model(path, rules="attnlrp").rows
    routers = [rule for _, cats, rule in attn if cats[0] == "router"]
    assert routers == ["gradient"] * tiny.NUM_LAYERS
    # per (layer, expert): the gate product act(w1 x) * w3 x and routing weight * expert output;
    # per shared expert: its gate product and sigmoid(shared_expert_gate(x)) * its output
    uniform_muls = [desc for desc, cats, rule in attn if cats == ["product", "Mul"] and rule == "uniform"]
    assert len(uniform_muls) == 2 * MOE_LAYERS + 2 * shared
    # gates: each expert's (and shared expert's) SiLU, and the shared expert's sigmoid gate
    gates = [rule for _, cats, rule in attn if cats[0] == "gate"]
    assert gates == ["identity"] * (MOE_LAYERS + 2 * shared)
    sigmoid_gates = [rule for _, cats, rule in attn if cats == ["gate", "activation", "Sigmoid"]]
    assert sigmoid_gates == ["identity"] * shared
    cp = lrp_onnx.inspect_model(path, rules="cp-lrp").rows
    assert [rule for _, cats, rule in cp if cats[0] == "router"] == ["constant"] * tiny.NUM_LAYERS
    assert [rule for _, cats, rule in cp if cats[0] == "gate"] == ["constant"] * (MOE_LAYERS + 2 * shared)
    # with router and gates constant, no Mul in the MoE block has two relevance-carrying operands
    assert not [desc for desc, cats, rule in cp if cats == ["product", "Mul"] and rule == "uniform"]


@pytest.mark.parametrize("rules, override", [("attnlrp", "gradient"), ("cp-lrp", "identity")])
def test_shared_expert_gate_rule_is_what_the_reference_checks(rules, override, converted, reference, tiny_model,
                                                               workdir):
    """qwen2_moe's sigmoid(shared_expert_gate(x)): the reference pins its rule down. Another rule on
    the Sigmoid (plain gradient under attnlrp, identity instead of constant under cp-lrp) moves the
    relevance far outside the tolerance (~0.1 and ~0.26 rel L2 seen)."""
    _, path = tiny_model("qwen2_moe", "torchscript")
    out = workdir / "qwen2_moe-torchscript" / f"model.{rules}.sigmoid-{override}.onnx"
    lrp_onnx.convert(path, out, rules=rules, overrides={"Sigmoid": override})
    result = run(lrp_onnx.Explainer(out, providers=["CPUExecutionProvider"]), "qwen2_moe")
    assert rel_l2(result.relevance, reference("qwen2_moe", rules)["relevance"]) > 0.05


@pytest.mark.parametrize("family", FAMILIES)
def test_export_routes_at_run_time(family, tmp_path):
    """Exported from ONE token (2 of 4 experts hit per layer), the graph still computes every expert
    for other inputs: models.tiny exports a forward that loops over all experts. (The Mixtral and
    Qwen2-MoE forwards of transformers loop over the experts hit by the example, so such an export
    would lose two.)"""
    model = tiny.build(family, seed=0)
    with tiny._moe_loops_over_all_experts(model):
        path = export_onnx(LogitsOnly(model), tmp_path / "one_token.onnx", tiny.example_inputs(1, 1), ["logits"])
    assert tiny.verify_export(model, path) < 1e-4  # batch 2 x 7, row 1 padded
    assert tiny.verify_export(model, path, tiny.example_inputs(3, 9, seed=5)) < 1e-4


@pytest.mark.parametrize("family,exporter", exports(FAMILIES))
def test_experts_without_tokens(family, exporter, tiny_model, converted):
    """One token: top-2 of 4, so two experts per layer gather an empty batch, forward and backward."""
    hf_dir, _ = tiny_model(family, exporter)
    ids = np.array([[17]], dtype=np.int64)
    mask = np.ones_like(ids)
    result = converted(family, exporter, "gradient").run(target=np.array([5]), position=np.array([-1]),
                                                          input_ids=ids, attention_mask=mask)
    with torch.enable_grad():
        ref = compute_relevance(tiny.load(family, hf_dir), family, ids, mask, np.array([5]), np.array([-1]))
    np.testing.assert_allclose(result.logit, ref["explained"], rtol=1e-4, atol=1e-5)
    assert rel_l2(result.relevance, ref["relevance"]) <= TOLERANCE["gradient"]


# -- the routing ops' VJPs on one-node graphs: gradient x input against numpy -----------------------
RNG = np.random.default_rng(0)


@pytest.fixture(autouse=True)
def _per_test_rng(request):
    """The helpers below draw from RNG: reseed it from each test's name, so a test's inputs do not
    depend on which tests ran before it."""
    global RNG
    from tests.conftest import seeded_rng

    RNG = seeded_rng(request.node.nodeid)


def _one_node_gradients(node, float_inputs: dict, int_inputs: dict, output_shape):
    """d sum(y * seed) / d input for each float input, from the converted graph (gradient rule)."""
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info(k, TensorProto.FLOAT, v.shape) for k, v in float_inputs.items()],
        [helper.make_tensor_value_info(node.output[0], TensorProto.FLOAT, output_shape)],
        initializer=[numpy_helper.from_array(v, k) for k, v in int_inputs.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    converted = lrp_onnx.convert(model, rules="gradient", seed_input=True)
    seed = RNG.normal(size=output_shape).astype(np.float32)
    session = ort.InferenceSession(converted.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    values = dict(zip(names, session.run(None, {**float_inputs, "lrp_seed": seed})))
    relevance = [values["lrp_relevance" + ("" if k == 0 else f"_{k}")] for k in range(len(float_inputs))]
    return seed, [r / x for r, x in zip(relevance, float_inputs.values())]


def _floats(*shape):
    return (RNG.uniform(0.5, 2.0, size=shape) * RNG.choice([-1, 1], size=shape)).astype(np.float32)


def test_scatter_elements_vjp():
    data, updates = _floats(3, 4), _floats(3, 2)
    indices = np.array([[3, 0], [1, 2], [0, 3]], dtype=np.int64)
    node = helper.make_node("ScatterElements", ["data", "indices", "updates"], ["y"], axis=1)
    seed, (g_data, g_updates) = _one_node_gradients(node, {"data": data, "updates": updates},
                                                    {"indices": indices}, [3, 4])
    expected_data = seed.copy()
    np.put_along_axis(expected_data, indices, 0.0, axis=1)  # overwritten: no gradient to the data
    np.testing.assert_allclose(g_data, expected_data, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(g_updates, np.take_along_axis(seed, indices, axis=1), rtol=1e-6)


@pytest.mark.parametrize("reduction", ["none", "add"])
def test_scatter_nd_vjp(reduction):
    data, updates = _floats(4, 3), _floats(2, 3)
    indices = np.array([[2], [0]], dtype=np.int64)
    node = helper.make_node("ScatterND", ["data", "indices", "updates"], ["y"], reduction=reduction)
    seed, (g_data, g_updates) = _one_node_gradients(node, {"data": data, "updates": updates},
                                                    {"indices": indices}, [4, 3])
    expected_data = seed.copy()
    if reduction == "none":
        expected_data[[2, 0]] = 0.0
    np.testing.assert_allclose(g_data, expected_data, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(g_updates, seed[[2, 0]], rtol=1e-6)


def test_gather_nd_vjp_adds_repeated_indices():
    data = _floats(4, 3)
    indices = np.array([[1], [1], [3]], dtype=np.int64)
    node = helper.make_node("GatherND", ["data", "indices"], ["y"])
    seed, (g_data,) = _one_node_gradients(node, {"data": data}, {"indices": indices}, [3, 3])
    expected = np.zeros_like(data)
    np.add.at(expected, [1, 1, 3], seed)
    np.testing.assert_allclose(g_data, expected, rtol=1e-6, atol=1e-6)


def test_top_k_vjp_scatters_back_to_the_selected():
    x = _floats(2, 5)
    node = helper.make_node("TopK", ["x", "k"], ["y", "selected"], axis=-1)
    seed, (g_x,) = _one_node_gradients(node, {"x": x}, {"k": np.array([2], dtype=np.int64)}, [2, 2])
    expected = np.zeros_like(x)
    np.put_along_axis(expected, np.argsort(-x, axis=-1)[:, :2], seed, axis=-1)
    np.testing.assert_allclose(g_x, expected, rtol=1e-6, atol=1e-6)


def test_scatter_with_a_multiplying_reduction_is_refused_by_name():
    graph = helper.make_graph(
        [helper.make_node("ScatterElements", ["data", "indices", "updates"], ["y"], axis=0, reduction="mul",
                          name="expert_combine")], "g",
        [helper.make_tensor_value_info("updates", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])],
        initializer=[numpy_helper.from_array(np.ones(4, np.float32), "data"),
                     numpy_helper.from_array(np.array([0, 2], np.int64), "indices")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    with pytest.raises(lrp_onnx.LRPError, match=r"'expert_combine' \(ai.onnx::ScatterElements\).*reduction 'mul'"):
        lrp_onnx.convert(model, rules="gradient")
    report = lrp_onnx.inspect_model(model, rules="gradient")  # inspect finds it too, without converting
    assert not report.supported and "reduction 'mul'" in report.problems[0] and "expert_combine" in report.problems[0]
