"""Vision transformers and the gamma rule.

A tiny random-weight ViT (transformers' ViTForImageClassification, models/tiny.py family "vit":
16x16 RGB images, 8x8 patches by a strided Conv, 2 layers) exported by both exporters; the
relevance source is the pixel input and the relevance has its shape. References (tests/reference.py,
fresh subprocesses): torch.autograd for ``gradient``; LXT's LayerNorm / GELU / attention building
blocks applied to transformers' ViT for ``attnlrp`` and ``cp-lrp``; the same ``cp-lrp`` patches plus
Zennit's Gamma rule on every Conv2d and Linear, made Gradient×Input by LXT's ``monkey_patch_zennit``,
for ``vit-gamma`` (LXT's ViT recipe). The gamma rule alone is checked against plain Zennit on one
strided, padded Conv2d, and for conservation on a bias-free one.
"""
import numpy as np
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import lrp_onnx
from tests.conftest import TOLERANCE, rel_l2
from tests.reference import run_reference

EXPORTERS = ["torchscript", "dynamo"]
LRP_RULES = ["attnlrp", "cp-lrp", "vit-gamma"]
TARGETS = np.array([0, 2, -1], dtype=np.int64)  # -1: the argmax of the row


@pytest.fixture(scope="module")
def pixels():
    from models import tiny

    return tiny.example_pixels(batch=3, seed=3)["pixel_values"].numpy()


@pytest.fixture(scope="module")
def vit_reference(tiny_model, workdir, pixels):
    cache = {}

    def get(rules):
        if rules not in cache:
            hf_dir, _ = tiny_model("vit")
            cache[rules] = run_reference("vit", hf_dir, rules, {"pixel_values": pixels, "target": TARGETS},
                                         workdir / "ref")
        return cache[rules]

    return get


def explain(converted, exporter, rules, pixels):
    return converted("vit", exporter, rules).run(target=TARGETS, pixel_values=pixels)


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_gradient_equals_autograd(exporter, tiny_model, converted, pixels):
    from models import tiny

    hf_dir, path = tiny_model("vit", exporter)
    model = tiny.load("vit", hf_dir)
    x = torch.tensor(pixels, requires_grad=True)
    logits = model(pixel_values=x).logits
    target = torch.where(torch.tensor(TARGETS) < 0, logits.argmax(-1), torch.tensor(TARGETS))
    logits[torch.arange(len(x)), target].sum().backward()
    expected = (x * x.grad).detach().double().numpy()

    assert lrp_onnx.inspect_model(path, rules="gradient").supported
    result = explain(converted, exporter, "gradient", pixels)
    assert result.relevance.shape == pixels.shape == (3, 3, 16, 16)
    np.testing.assert_array_equal(result.target, target.numpy())
    np.testing.assert_allclose(result.outputs["logits"], logits.detach().numpy(), rtol=1e-4, atol=1e-5)
    assert rel_l2(result.relevance, expected) <= TOLERANCE["gradient"]


@pytest.mark.parametrize("rules", LRP_RULES)
@pytest.mark.parametrize("exporter", EXPORTERS)
def test_relevance_equals_reference(exporter, rules, tiny_model, converted, vit_reference, pixels):
    _, path = tiny_model("vit", exporter)
    assert lrp_onnx.inspect_model(path, rules=rules).supported
    result = explain(converted, exporter, rules, pixels)
    ref = vit_reference(rules)
    assert result.relevance.shape == ref["relevance"].shape == pixels.shape
    np.testing.assert_array_equal(result.target, ref["target"])
    np.testing.assert_allclose(result.logit, ref["explained"], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(result.outputs["logits"], ref["logits"], rtol=1e-4, atol=1e-5)  # unchanged
    assert rel_l2(result.relevance, ref["relevance"]) <= TOLERANCE[rules]
    assert rel_l2(result.relevance.sum(1), ref["relevance"].sum(1)) <= TOLERANCE[rules]  # heatmap


def test_vit_gamma_rules_per_layer_type(tiny_model):
    rows = lrp_onnx.inspect_model(tiny_model("vit")[1], rules="vit-gamma").rows
    rules = {}
    for _, cats, rule in rows:
        rules.setdefault(cats[0], set()).add(rule)
    assert rules["conv"] == {"gamma:0.25"} and rules["linear"] == {"gamma:0.05"}
    assert rules["attention_probs"] == {"constant"} and rules["norm"] == {"constant_std"}
    # v, attention output, two MLP layers per block, and the classifier Gemm; q and k are off the path
    assert sum(1 for _, cats, _ in rows if cats[0] == "linear") == 2 * 4 + 1


def test_gamma_zero_is_the_plain_layer(tiny_model, pixels):
    """With gamma 0 the rule reduces to LRP-0, i.e. the gradient (up to the 1e-6 stabilizer)."""
    _, path = tiny_model("vit")
    zero = {"conv": "gamma:0", "linear": "gamma:0"}
    cp = lrp_onnx.Explainer.from_model(lrp_onnx.convert(path, rules="cp-lrp"), providers=["CPUExecutionProvider"])
    gamma0 = lrp_onnx.Explainer.from_model(lrp_onnx.convert(path, rules="vit-gamma", overrides=zero),
                                           providers=["CPUExecutionProvider"])
    default = lrp_onnx.Explainer.from_model(lrp_onnx.convert(path, rules="vit-gamma"),
                                            providers=["CPUExecutionProvider"])
    r_cp, r0, r_default = (e.run(target=TARGETS, pixel_values=pixels).relevance for e in (cp, gamma0, default))
    assert rel_l2(r0, r_cp) <= 1e-3  # ~2e-4 seen: the stabilizer where |y| is small
    assert rel_l2(r_default, r_cp) >= 1e-2  # the default gammas do change the explanation


def test_unknown_gamma_parameter_is_named(tiny_model):
    with pytest.raises(ValueError, match="gamma:abc"):
        lrp_onnx.convert(tiny_model("vit")[1], rules="vit-gamma", overrides={"linear": "gamma:abc"})
    report = lrp_onnx.inspect_model(tiny_model("vit")[1], rules="cp-lrp", overrides={"LayerNormalization": "gamma"})
    assert not report.supported and "LayerNormalization" in report.problems[0] and "gamma" in report.problems[0]


# -- one Conv --------------------------------------------------------------------------------------
CONV = dict(stride=2, padding=1)  # 10x10 input, kernel 3: the last input row is left over (output_padding 1)


def conv_model(weight, bias):
    """An ONNX model y = Conv(x, weight, bias) with batch-dynamic x [N, 3, 10, 10]."""
    s, p = CONV["stride"], CONV["padding"]
    params = {"weight": weight} if bias is None else {"weight": weight, "bias": bias}
    inits = [numpy_helper.from_array(value, name) for name, value in params.items()]
    node = helper.make_node("Conv", ["x"] + list(params), ["y"], name="conv",
                            kernel_shape=list(weight.shape[2:]), strides=[s, s], pads=[p] * 4)
    graph = helper.make_graph([node], "conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 10, 10])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 5, 5])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def conv_case(with_bias: bool, seed=0):
    rng = np.random.default_rng(seed)
    weight = rng.normal(0, 0.3, (4, 3, 3, 3)).astype(np.float32)
    bias = rng.normal(0, 0.5, 4).astype(np.float32) if with_bias else None
    x = rng.normal(0, 1, (2, 3, 10, 10)).astype(np.float32)
    seed_grad = rng.normal(0, 1, (2, 4, 5, 5)).astype(np.float32)
    return conv_model(weight, bias), weight, bias, x, seed_grad


def conv_relevance(model, rules, x, seed_grad):
    converted = lrp_onnx.convert(model, rules=rules, seed_input=True)
    result = lrp_onnx.Explainer.from_model(converted, providers=["CPUExecutionProvider"]).run(seed=seed_grad, x=x)
    return result.relevance, result.outputs["y"]


def test_conv_gradient_equals_autograd():
    model, weight, bias, x, seed_grad = conv_case(with_bias=True)
    xt = torch.tensor(x, requires_grad=True)
    y = torch.nn.functional.conv2d(xt, torch.tensor(weight), torch.tensor(bias), **CONV)
    y.backward(torch.tensor(seed_grad))
    relevance, out = conv_relevance(model, "gradient", x, seed_grad)
    np.testing.assert_allclose(out, y.detach().numpy(), rtol=1e-5, atol=1e-5)
    assert rel_l2(relevance, (xt * xt.grad).detach().numpy()) <= 1e-5


@pytest.mark.parametrize("gamma", [0.25, 100.0])
def test_conv_gamma_equals_zennit(gamma, workdir):
    model, weight, bias, x, seed_grad = conv_case(with_bias=True, seed=1)
    inputs = dict(x=x, weight=weight, bias=bias, seed=seed_grad, **CONV)
    ref = run_reference("conv", None, f"gamma:{gamma}", inputs, workdir / "ref")
    relevance, out = conv_relevance(model, {"conv": f"gamma:{gamma}"}, x, seed_grad)
    np.testing.assert_allclose(out, ref["output"], rtol=1e-5, atol=1e-5)
    assert rel_l2(relevance, ref["relevance"]) <= 1e-5


def test_conv_gamma_conserves_relevance_without_bias():
    model, _, _, x, seed_grad = conv_case(with_bias=False, seed=2)
    relevance, y = conv_relevance(model, {"conv": "gamma:0.25"}, x, seed_grad)
    r_out = (y * seed_grad).sum(axis=(1, 2, 3))
    r_in = relevance.sum(axis=(1, 2, 3), dtype=np.float64)
    np.testing.assert_allclose(r_in, r_out, rtol=1e-5)
    assert not np.allclose(relevance, conv_relevance(model, "gradient", x, seed_grad)[0], rtol=1e-2)  # not the gradient
