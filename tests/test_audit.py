"""`lrp-onnx audit` / lrp_onnx.audit: per-unit conservation of relevance.

The tiny families must show nothing unexpected; a deliberately wrong rule (override or rule map) must
be flagged, and only it; the per-unit sums equal a hand computation in numpy on a hand-built graph."""
import json

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

import lrp_onnx
from lrp_onnx.cli import main
from lrp_onnx.lrp.rules import IDENTITY_EPSILON

RNG = np.random.default_rng(7)


@pytest.mark.parametrize("family", ["llama", "bert", "gpt2"])
def test_tiny_families_flag_nothing(tiny_model, family):
    _, path = tiny_model(family)
    report = lrp_onnx.audit(path, rules="attnlrp")
    assert report.flagged == [], report.format()
    conserving = [u for u in report.units if u.expected]
    rules = {u.rule for u in conserving}
    assert len(conserving) >= 30 and {"identity", "uniform", "gradient"} <= rules, rules
    # the numbers are real: conserving units carry relevance, and their sums agree
    for u in conserving:
        assert abs(u.r_in - u.r_out) <= 1e-6 * u.mass, u
    assert max(abs(u.r_out) for u in conserving) > 0.1
    assert abs(report.logit) > 0.1


def test_cli_exit_codes_and_json(tiny_model, capsys, tmp_path):
    _, path = tiny_model("llama")
    assert main(["audit", str(path)]) == 0
    text = capsys.readouterr().out
    assert "nothing unexpected" in text and "uniform" in text
    # a residual Add forced to `uniform`: it hands on half of its relevance, and only it is flagged
    residual = "/model/model/layers.1/Add_1"
    assert main(["audit", str(path), "--override", f"{residual}=uniform", "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    flagged = [u for u in report["units"] if u["flagged"]]
    assert [u["unit"] for u in flagged] == [f"'{residual}' (ai.onnx::Add)"]
    assert flagged[0]["ratio"] == pytest.approx(0.5, rel=1e-6)
    assert report["flagged"] == 1
    # a rule map that gives the gate's product (x * sigmoid(x)) the plain gradient: ratio 2, only it
    gate = "/model/model/layers.0/mlp/act_fn/Mul"
    rule_map = tmp_path / "rules.json"
    rule_map.write_text(json.dumps({gate: "gradient"}))
    assert main(["audit", str(path), "--rule-map", str(rule_map), "--json"]) == 1
    flagged = [u for u in json.loads(capsys.readouterr().out)["units"] if u["flagged"]]
    assert [u["unit"] for u in flagged] == [f"'{gate}' (ai.onnx::Mul)"]
    assert flagged[0]["ratio"] == pytest.approx(2.0, rel=1e-6)


def test_bad_input_exit_2(tiny_model, capsys, tmp_path):
    _, path = tiny_model("llama")
    assert main(["audit", str(path), "--feed", f"nope={tmp_path / 'x.npy'}"]) == 2
    assert "nope" in capsys.readouterr().err
    np.save(tmp_path / "ids.npy", np.zeros((1, 4), np.int64))
    assert main(["audit", str(path), "--feed", f"no_such_input={tmp_path / 'ids.npy'}"]) == 2
    assert "no_such_input" in capsys.readouterr().err
    assert main(["audit", str(path), "--rtol", "-1"]) == 2
    assert main(["audit", str(tmp_path / "missing.onnx")]) == 2
    # a given feed is used: all-zero ids give a different logit than the random ones
    assert main(["audit", str(path), "--feed", f"input_ids={tmp_path / 'ids.npy'}", "--json"]) == 0
    given = json.loads(capsys.readouterr().out)
    assert main(["audit", str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["logit"] != pytest.approx(given["logit"])


# -- a hand-built graph, computed by hand ---------------------------------------------------------
B, H, O = 2, 4, 3
W1, W3, BIAS, W2 = RNG.normal(size=(H, H)), RNG.normal(size=(H, H)), RNG.normal(size=H), RNG.normal(size=(H, O))


def _hand_model():
    """a = x @ W1, c = x @ W3, p = tanh(a) * c, z = p + bias, y = z @ W2, out = y ** 2."""
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["a"], name="mm1"),
             helper.make_node("MatMul", ["x", "W3"], ["c"], name="mm3"),
             helper.make_node("Tanh", ["a"], ["t"], name="tanh"),
             helper.make_node("Mul", ["t", "c"], ["p"], name="prod"),
             helper.make_node("Add", ["p", "bias"], ["z"], name="bias_add"),
             helper.make_node("MatMul", ["z", "W2"], ["y"], name="mm2"),
             helper.make_node("Pow", ["y", "two"], ["out"], name="square")]
    inits = [numpy_helper.from_array(np.asarray(v, np.float32), k)
             for k, v in (("W1", W1), ("W3", W3), ("bias", BIAS), ("W2", W2), ("two", np.array(2.0)))]
    graph = helper.make_graph(nodes, "hand", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [B, H])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [B, O])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_hand_built_numbers():
    x = RNG.normal(size=(B, H)).astype(np.float32)
    # overrides: Pow gets the plain gradient (wrong under attnlrp: a nonlinearity), the Mul is a
    # product of tanh(a) and c (uniform), the Tanh takes the identity rule (an activation)
    report = lrp_onnx.audit(_hand_model(), rules="attnlrp", feeds={"x": x}, overrides={"Pow": "gradient"})
    units = {u.unit.split("'")[1]: u for u in report.units}
    assert set(units) == {"mm1", "mm3", "tanh", "prod", "bias_add", "mm2", "square"}
    # the same in float64 numpy, by hand
    xd = x.astype(np.float64)
    a, c = xd @ W1.astype(np.float32), xd @ W3.astype(np.float32)
    t = np.tanh(a)
    p = t * c
    z = p + BIAS.astype(np.float32)
    y = z @ W2.astype(np.float32)
    out = y ** 2
    seed = np.eye(O)[out.argmax(axis=1)]                  # default target: the argmax per row
    g_y = seed * 2 * y                                     # Pow: plain gradient
    g_z = g_y @ W2.astype(np.float32).T
    g_t, g_c = g_z * c / 2, g_z * t / 2                    # uniform: half the gradient to each factor
    g_a = g_t * t / (a + IDENTITY_EPSILON)                 # identity: y / x
    g_x = g_a @ W1.astype(np.float32).T + g_c @ W3.astype(np.float32).T
    expected = {  # unit: (R_out, {input: R_in})
        "square": ((out * seed).sum(), {"y": (y * g_y).sum()}),
        "mm2": ((y * g_y).sum(), {"z": (z * g_z).sum()}),
        "bias_add": ((z * g_z).sum(), {"p": (p * g_z).sum()}),
        "prod": ((p * g_z).sum(), {"t": (t * g_t).sum(), "c": (c * g_c).sum()}),
        "tanh": ((t * g_t).sum(), {"a": (a * g_a).sum()}),
        "mm1": ((a * g_a).sum(), {"x": (xd * (g_a @ W1.astype(np.float32).T)).sum()}),
        "mm3": ((c * g_c).sum(), {"x": (xd * (g_c @ W3.astype(np.float32).T)).sum()}),
    }
    for name, (r_out, shares) in expected.items():
        u = units[name]
        assert u.r_out == pytest.approx(r_out, rel=1e-5), name
        assert u.shares.keys() == shares.keys(), name
        for k, v in shares.items():
            assert u.shares[k] == pytest.approx(v, rel=1e-5, abs=1e-6), (name, k)
    assert units["prod"].shares["t"] == pytest.approx(units["prod"].r_out / 2, rel=1e-6)
    assert units["square"].ratio == pytest.approx(2.0, rel=1e-6)  # x * 2x / x^2
    # flagged: exactly the Pow; the bias Add does not conserve and is reported, not flagged
    assert [u.unit for u in report.flagged] == ["'square' (ai.onnx::Pow)"]
    assert not units["bias_add"].expected and not units["bias_add"].flagged
    assert abs(units["bias_add"].ratio - 1) > 1e-2
    assert report.source_relevance == pytest.approx((xd * g_x).sum(), rel=1e-5)
    # without the wrong override, nothing is flagged in the gradient rule set either
    assert lrp_onnx.audit(_hand_model(), rules="gradient", feeds={"x": x}).flagged == []
