"""The command line: conversion and inspection work, bad input fails cleanly (exit 2, one line, nothing written)."""
import collections
import hashlib
import json
import re

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import lrp_onnx
from tests import handbuilt as hb
from tests.conftest import lrp_cli as lrp


def digest(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def assert_clean_failure(result, *words):
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    for w in words:
        assert w in lines[0], lines[0]


def test_convert_and_inspect_from_the_command_line(tiny_model, tmp_path):
    _, path = tiny_model("llama")
    before = digest(path)
    out = tmp_path / "llama.lrp.onnx"
    result = lrp("convert", path, "-o", out, "--rules", "cp-lrp")
    assert result.returncode == 0, result.stderr
    assert digest(path) == before  # the input model is never modified
    meta = json.loads({p.key: p.value for p in onnx.load(out).metadata_props}["lrp_onnx"])
    assert meta["rules"] == "cp-lrp" and meta["relevance_outputs"] == ["lrp_relevance"]
    report = lrp("inspect", path)
    assert report.returncode == 0
    text = report.stdout
    assert "SiLU" in text and "identity" in text and "uniform" in text and "RMSNorm rms" in text
    assert "coverage: every unit on the relevance path has a rule" in text
    lines = text.splitlines()
    summary = next(line for line in lines if "units on the relevance path" in line)
    match = re.fullmatch(r"(\d+) units on the relevance path \((.*)\); (\d+) nodes off the path need no rule", summary)
    assert match, summary
    units, off_path = int(match[1]), int(match[3])
    counts = {rule: int(n) for n, rule in (part.split() for part in match[2].split(", "))}
    # the printed table has one row per unit, and the summary counts its rules
    rows = lines[lines.index(next(line for line in lines if line.startswith("rule "))) + 1:lines.index(summary)]
    assert len(rows) == units == sum(counts.values())
    assert collections.Counter(row.split()[0] for row in rows) == counts
    # what the tiny LLaMA's architecture implies (2 layers): one SiLU per layer (identity), Q·Kᵀ, A·V and
    # gate·up per layer (uniform), two RMSNorms per layer plus the final one (rms constant)
    assert (counts["identity"], counts["uniform"], counts["constant"]) == (2, 6, 5)
    # nodes off the path, counted from the graph alone: not on a float path from the embedding to the logits
    model = onnx.load(path)
    source = next(n.output[0] for n in model.graph.node if n.op_type == "Gather" and "embed_tokens" in n.name)
    assert off_path == len(model.graph.node) - len(hb.relevance_path_nodes(model, source, "logits"))


def test_missing_file(tmp_path):
    out = tmp_path / "o.onnx"
    assert_clean_failure(lrp("convert", tmp_path / "nope.onnx", "-o", out), "nope.onnx", "no such file")
    assert not out.exists()


def test_truncated_file(tiny_model, tmp_path):
    _, path = tiny_model("gpt2")
    broken = tmp_path / "truncated.onnx"
    broken.write_bytes(open(path, "rb").read()[:5000])
    out = tmp_path / "o.onnx"
    assert_clean_failure(lrp("convert", broken, "-o", out), "truncated.onnx", "not a readable ONNX model")
    assert not out.exists()


def test_non_onnx_file(tmp_path):
    text = tmp_path / "notes.onnx"
    text.write_text("this is not a model\n")
    out = tmp_path / "o.onnx"
    assert_clean_failure(lrp("convert", text, "-o", out), "notes.onnx")
    assert_clean_failure(lrp("inspect", text), "notes.onnx")
    assert not out.exists()


@pytest.mark.parametrize("option", ["--source", "--output", "--latent"])
def test_unknown_tensor_names(option, tiny_model, tmp_path):
    _, path = tiny_model("bert")
    out = tmp_path / "o.onnx"
    assert_clean_failure(lrp("convert", path, "-o", out, option, "no_such_tensor"), "no_such_tensor")
    assert not out.exists()


def test_unknown_rule_in_override(tiny_model, tmp_path):
    _, path = tiny_model("bert")
    assert_clean_failure(lrp("convert", path, "-o", tmp_path / "o.onnx", "--override", "Softmax=bogus"), "bogus")


def _graph_with(op_type, domain=""):
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="proj"),
             helper.make_node(op_type, ["h"], ["u"], name="strange", domain=domain),
             helper.make_node("MatMul", ["u", "w"], ["y"], name="head")]
    return hb.simple_model(nodes, [("x", [2, 4])], [("y", [2, 4])], [("w", np.eye(4))],
                           domains=[domain] if domain else [])


def test_unsupported_op_on_the_path_is_named(tmp_path):
    model = _graph_with("Hardmax")
    path = tmp_path / "hardmax.onnx"
    onnx.save(model, path)
    out = tmp_path / "o.onnx"
    assert_clean_failure(lrp("convert", path, "-o", out), "'strange'", "Hardmax", "ai.onnx")
    assert not out.exists()
    report = lrp("inspect", path)
    assert report.returncode == 1 and "UNSUPPORTED" in report.stdout and "'strange'" in report.stdout
    with pytest.raises(lrp_onnx.UnsupportedOpsError) as info:
        lrp_onnx.convert(model)
    assert len(info.value.problems) == 1


def test_every_unsupported_node_is_listed(tmp_path):
    model = _graph_with("MyOp", domain="custom.domain")
    model.graph.node.insert(2, helper.make_node("Hardmax", ["u"], ["u2"], name="second"))
    model.graph.node[3].input[0] = "u2"
    with pytest.raises(lrp_onnx.UnsupportedOpsError) as info:
        lrp_onnx.convert(model)
    text = str(info.value)
    assert "'strange' (custom.domain::MyOp)" in text and "'second' (ai.onnx::Hardmax)" in text


def test_unsupported_op_off_the_path_needs_no_rule():
    model = _graph_with("Hardmax")
    # the odd op now only feeds an extra output: it is not on the path to y
    model.graph.node[2].input[0] = "h"
    model.graph.output.append(helper.make_tensor_value_info("u", TensorProto.FLOAT, [2, 4]))
    converted = lrp_onnx.convert(model, output="y")
    assert any(o.name == "lrp_relevance" for o in converted.graph.output)


@pytest.mark.parametrize("fmt", ["json", "yaml"])
def test_rule_map_file(fmt, tiny_model, tmp_path):
    _, path = tiny_model("gpt2")
    rule_map = tmp_path / f"rules.{fmt}"
    rule_map.write_text('{"Softmax": "constant"}' if fmt == "json" else "Softmax: constant\n")
    report = lrp("inspect", path, "--rule-map", rule_map)
    assert report.returncode == 0
    softmax_rules = {line.split()[0] for line in report.stdout.splitlines() if "::Softmax" in line}
    assert softmax_rules == {"constant"}
    plain = lrp("inspect", path)
    assert {line.split()[0] for line in plain.stdout.splitlines() if "::Softmax" in line} == {"gradient"}
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2]")
    assert_clean_failure(lrp("inspect", path, "--rule-map", bad), "bad.json", "mapping")
