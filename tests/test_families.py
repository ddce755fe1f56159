"""Parity for more decoder families LXT 2.1 supports: Qwen2, Qwen3 and (text-only) Gemma3.

Same protocol as test_parity.py (tiny random-weight models from models/tiny.py, fp32, batch 2
with a right-padded row and a different target and position per row, both exporters):
``gradient`` equals torch.autograd, ``attnlrp`` / ``cp-lrp`` equal LXT's ``attnLRP`` / ``cp_LRP``
maps (tests/reference.py).

Gemma3 with the default rule sets does NOT equal LXT yet; those cases (KNOWN_DIFFERENCES) check
everything else, assert that the relevance still differs, and xfail; and
``test_gemma3_equals_lxt_with_overrides`` shows which per-unit rules make them equal:

* final-logit softcapping ``30 * tanh(logits / 30)``: LXT leaves it unpatched (plain gradient,
  local Jacobian 1 - tanh(u)^2 with u = logits / 30); our rule sets classify the lone Tanh as an
  ``activation`` and apply the identity rule (tanh(u) / u). Both are linear in the seed, so each
  row's relevance differs from LXT's by the scalar factor (tanh(u)/u) / (1 - tanh(u)^2)
  (``test_gemma3_softcap_is_the_only_attnlrp_difference``).
* cp-lrp, TorchScript export only: TorchScript writes gelu(approximate="tanh") with the 0.5 as a
  final ``Mul`` by a scalar constant after the fused region ``x * (1 + tanh(...))``, so the
  region is not recognised as a ``gate`` (its consumer is the scalar Mul, not the gating Mul):
  it gets ``identity`` and the gating Mul ``uniform`` (1/2 to each branch) instead of LXT's
  detached gate branch with full relevance to ``up_proj``. The dynamo export puts the 0.5 inside
  the region and is classified correctly.
"""
import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import lrp_onnx
from tests.conftest import CONSERVATION, explain_inputs

FAMILIES = ["qwen2", "qwen3", "gemma3"]
EXPORTERS = ["torchscript", "dynamo"]
RULES = ["gradient", "attnlrp", "cp-lrp"]
TOLERANCE = {"gradient": 1e-4, "attnlrp": 1e-3, "cp-lrp": 1e-3}

SOFTCAP_REASON = ("gemma3 final-logit softcap tanh: identity rule here, plain gradient in LXT "
                  "(needs an engine rule mapping; see test_gemma3_equals_lxt_with_overrides)")
GATE_REASON = ("TorchScript's gelu_pytorch_tanh ends in Mul(0.5): the gated MLP's activation region is "
               "not classified 'gate', so cp-lrp does not detach the gate branch")
KNOWN_DIFFERENCES = {
    ("gemma3", "torchscript", "attnlrp"): SOFTCAP_REASON,
    ("gemma3", "dynamo", "attnlrp"): SOFTCAP_REASON,
    ("gemma3", "torchscript", "cp-lrp"): SOFTCAP_REASON + "; " + GATE_REASON,
    ("gemma3", "dynamo", "cp-lrp"): SOFTCAP_REASON,
}


def rel_l2(a, b):
    return float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b))


def _constant_values(graph):
    values = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for n in graph.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    values[n.output[0]] = numpy_helper.to_array(a.t)
    return values


def softcap_tanh_nodes(path):
    """Names of the Tanh nodes of a softcap ``c * tanh(x / c)``: Div by a scalar constant c
    in front, Mul by the same c after."""
    graph = onnx.load(str(path)).graph
    constants = _constant_values(graph)
    producer = {o: n for n in graph.node for o in n.output}
    consumers = {}
    for n in graph.node:
        for t in n.input:
            consumers.setdefault(t, []).append(n)

    def scalar(t):
        v = constants.get(t)
        return float(v.reshape(-1)[0]) if v is not None and v.size == 1 else None

    names = []
    for n in graph.node:
        if n.op_type != "Tanh":
            continue
        before = producer.get(n.input[0])
        after = consumers.get(n.output[0], [])
        if before is None or before.op_type != "Div" or len(after) != 1 or after[0].op_type != "Mul":
            continue
        c = scalar(before.input[1])
        c_after = [scalar(t) for t in after[0].input if t != n.output[0]]
        if c is not None and c_after and c_after[0] == c:
            names.append(n.name)
    return names


def lxt_overrides(family, exporter, rules, path):
    """Per-unit rules that make our rule sets reproduce LXT's map for ``family`` (empty if none needed)."""
    if family != "gemma3" or rules == "gradient":
        return {}
    overrides = {name: "gradient" for name in softcap_tanh_nodes(path)}
    assert overrides, "no softcap Tanh found in the gemma3 graph"
    if rules == "cp-lrp" and exporter == "torchscript":
        # LXT's cp_gated_mlp_forward: stop_gradient(gate_proj(x)); TorchScript keeps module paths in names
        overrides["*/mlp/gate_proj/*"] = "constant"
    return overrides


@pytest.fixture(scope="module")
def converted(tiny_model, workdir):
    """converted(family, exporter, rules, overrides=None) -> Explainer, converted once per module."""
    cache = {}

    def get(family, exporter, rules, overrides=None):
        key = (family, exporter, rules, tuple(sorted((overrides or {}).items())))
        if key not in cache:
            _, path = tiny_model(family, exporter)
            suffix = ".lxt" if overrides else ""
            out = workdir / f"{family}-{exporter}" / f"model.{rules}{suffix}.onnx"
            lrp_onnx.convert(path, out, rules=rules, overrides=overrides)
            cache[key] = lrp_onnx.Explainer(out, providers=["CPUExecutionProvider"])
        return cache[key]

    return get


def run(explainer, family):
    inputs = explain_inputs(family)
    feed = {k: inputs[k] for k in ("input_ids", "attention_mask")}
    return explainer.run(target=inputs["target"], position=inputs["position"], **feed)


def check_outputs(result, ref, family):
    """Everything but the relevance values: explained logit, target, original output, padding."""
    assert result.relevance.shape == ref["relevance"].shape
    np.testing.assert_allclose(result.logit, ref["explained"], rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(result.target, ref["target"])
    # the original output is unchanged and equals PyTorch's logits
    np.testing.assert_allclose(result.outputs["logits"], ref["logits"], rtol=1e-4, atol=1e-4)
    # padded positions of row 1 get no relevance
    mask = explain_inputs(family)["attention_mask"]
    assert np.abs(result.relevance[mask == 0]).max(initial=0) <= 1e-6 * np.abs(result.relevance).max()


def check_parity(result, ref, family, rules):
    check_outputs(result, ref, family)
    assert rel_l2(result.relevance, ref["relevance"]) <= TOLERANCE[rules]
    assert rel_l2(result.relevance.sum(-1), ref["relevance"].sum(-1)) <= TOLERANCE[rules]


@pytest.mark.parametrize("rules", RULES)
@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("family", FAMILIES)
def test_relevance_equals_reference(family, exporter, rules, tiny_model, converted, reference):
    _, path = tiny_model(family, exporter)
    assert lrp_onnx.inspect_model(path, rules=rules).supported
    result = run(converted(family, exporter, rules), family)
    ref = reference(family, rules)
    CONSERVATION[(family, exporter, rules)] = result.relevance.sum(axis=(1, 2)) / result.logit
    known = KNOWN_DIFFERENCES.get((family, exporter, rules))
    if known is None:
        check_parity(result, ref, family, rules)
        return
    # a known difference: all else must hold, and the relevance must still differ (else: fixed)
    check_outputs(result, ref, family)
    error = rel_l2(result.relevance, ref["relevance"])
    assert error > TOLERANCE[rules], f"now equals LXT (rel. L2 {error:.1e}): remove it from KNOWN_DIFFERENCES"
    pytest.xfail(f"{known} (rel. L2 error {error:.1e})")


@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("rules", ["attnlrp", "cp-lrp"])
def test_gemma3_equals_lxt_with_overrides(exporter, rules, tiny_model, converted, reference):
    """The rule mapping that reproduces LXT's gemma3 maps: softcap Tanh -> gradient; for cp-lrp on
    the TorchScript export also the gate projection -> constant."""
    _, path = tiny_model("gemma3", exporter)
    overrides = lxt_overrides("gemma3", exporter, rules, path)
    assert lrp_onnx.inspect_model(path, rules=rules, overrides=overrides).supported
    result = run(converted("gemma3", exporter, rules, overrides), "gemma3")
    check_parity(result, reference("gemma3", rules), "gemma3", rules)


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_gemma3_softcap_is_the_only_attnlrp_difference(exporter, converted, reference):
    """Default attnlrp = LXT's relevance times, per row, (tanh(u)/u) / (1 - tanh(u)^2), u = z / c:
    the identity rule vs the gradient at the softcap, nothing else. (Update this test if the
    engine ever maps the softcap to the gradient: then the factor is 1.)"""
    from models.tiny import GEMMA3_FINAL_LOGIT_SOFTCAPPING as cap

    ref = reference("gemma3", "attnlrp")
    result = run(converted("gemma3", exporter, "attnlrp"), "gemma3")
    u = np.arctanh(np.asarray(ref["explained"], np.float64) / cap)  # pre-softcap logit / cap
    factor = (np.tanh(u) / u) / (1.0 - np.tanh(u) ** 2)
    assert np.abs(factor - 1).max() > 1e-3  # the difference is real at these logits
    expected = ref["relevance"] * factor[:, None, None]
    assert rel_l2(result.relevance, expected) <= 1e-4
