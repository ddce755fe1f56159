"""memory="lean" (lrp_onnx/passes/lean.py): the backward recomputes each attention's scores and probabilities
from Q and K. Relevance still equals the PyTorch references (torch.autograd / LXT, tests/reference.py),
no backward node reads the forward's [L, L] attention tensors any more, and onnxruntime keeps the
recomputation (no common-subexpression elimination folds it back into the forward)."""
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import lrp_onnx
from lrp_onnx.passes.lean import PREFIX
from tests.conftest import TOLERANCE, explain_inputs, rel_l2
from tests.conftest import run_explainer as run


def _lean(tiny_model, workdir, family, rules, exporter="torchscript", relevance_only=False):
    _, path = tiny_model(family, exporter)
    out = workdir / f"{family}-{exporter}" / f"model.{rules}.lean.{int(relevance_only)}.onnx"
    model = lrp_onnx.convert(path, out, rules=rules, memory="lean", relevance_only=relevance_only)
    return model, out


@pytest.mark.parametrize("family,rules,exporter", [("llama", "attnlrp", "torchscript"), ("bert", "cp-lrp", "torchscript"),
                                                   ("gpt2", "gradient", "dynamo"), ("t5", "attnlrp", "torchscript")])
def test_lean_relevance_equals_reference(family, rules, exporter, tiny_model, workdir, reference):
    model, out = _lean(tiny_model, workdir, family, rules, exporter)
    meta = json.loads(next(p.value for p in model.metadata_props if p.key == "lrp_onnx"))
    chains = 6 if family == "t5" else 2  # T5: encoder self, decoder self and cross attention, 2 blocks each
    assert meta["memory"] == {"mode": "lean", "attention_recomputed": chains, "attention_chains": chains}
    result = run(lrp_onnx.Explainer(out, providers=["CPUExecutionProvider"]), family)
    ref = reference(family, rules)
    assert rel_l2(result.relevance, ref["relevance"]) <= TOLERANCE[rules]
    np.testing.assert_array_equal(result.target, ref["target"])


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_lean_backward_reads_no_forward_attention_tensor(family, tiny_model, workdir):
    model, out = _lean(tiny_model, workdir, family, "attnlrp", relevance_only=family == "llama")
    nodes = list(model.graph.node)
    softmax = [n for n in nodes if n.op_type == "Softmax" and not n.name.startswith("lrp/")]
    forward_attention = {o for n in softmax for o in list(n.output) + list(n.input)}
    assert len(softmax) == 2
    readers = [n.name for n in nodes if n.name.startswith("lrp/") and set(n.input) & forward_attention]
    assert readers == []
    recomputed = [n for n in nodes if n.name.startswith(PREFIX) and n.op_type == "Softmax"]
    assert len(recomputed) == 2
    # onnxruntime's optimizer keeps the recomputed softmaxes (4 in all, not 2)
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(workdir / f"{family}-lean-optimized.onnx")
    options.log_severity_level = 3
    ort.InferenceSession(str(out), options, providers=["CPUExecutionProvider"])
    optimized = onnx.load(options.optimized_model_filepath)
    assert sum(n.op_type == "Softmax" for n in optimized.graph.node) == 4
    # same relevance as the default conversion, bit for bit (same kernels on the same inputs)
    fast = workdir / f"{family}-fast-for-lean.onnx"
    lrp_onnx.convert(tiny_model(family)[1], fast, rules="attnlrp", relevance_only=family == "llama")
    a, b = (run(lrp_onnx.Explainer(p, providers=["CPUExecutionProvider"]), family).relevance for p in (out, fast))
    np.testing.assert_array_equal(a, b)


def test_memory_option_is_checked(tiny_model, workdir):
    with pytest.raises(lrp_onnx.LRPError, match="memory 'small'"):
        lrp_onnx.convert(tiny_model("bert")[1], workdir / "never.onnx", memory="small")
    assert not (workdir / "never.onnx").exists()


def test_cli_convert_memory_lean(tiny_model, workdir):
    from lrp_onnx.cli import main

    out = workdir / "bert-cli-lean.onnx"
    assert main(["convert", str(tiny_model("bert")[1]), "-o", str(out), "--memory", "lean"]) == 0
    meta = json.loads(next(p.value for p in onnx.load(str(out)).metadata_props if p.key == "lrp_onnx"))
    assert meta["memory"]["attention_recomputed"] == 2


@pytest.mark.parametrize("forward", ["fused", "written"])
def test_lean_recomputes_the_unfused_attention(forward, tmp_path):
    """A fused GroupQueryAttention (models.llama_int4's tiny builder-layout graph) is written out as
    lrp/unfused/ nodes that belong to the forward: lean finds and recomputes their score chains (it used
    to take them for backward nodes and find none), and the backward reads no forward probability. With
    the fused node kept in the forward, the original logits are the original's bit for bit (pre-packed, as a
    default session; lean's default, not pre-packed, as a session without pre-packing)."""
    from models import llama_int4

    path = llama_int4.write(tmp_path / "tiny", "tiny")
    layers = [n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node].count("GroupQueryAttention")
    ids = np.array([[5, 17, 42, 8, 33, 23, 61, 3, 57, 12]], np.int64)
    feed = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    results = {}
    for memory in ("fast", "lean"):
        out = tmp_path / f"model.{forward}.{memory}.lrp.onnx"
        model = lrp_onnx.convert(str(path), str(out), memory=memory, forward=forward)
        results[memory] = lrp_onnx.Explainer(str(out), providers=["CPUExecutionProvider"], prepack=True).run(**feed)
    lean_default = lrp_onnx.Explainer(str(out), providers=["CPUExecutionProvider"])  # lean: no pre-packing
    meta = json.loads(next(p.value for p in model.metadata_props if p.key == "lrp_onnx"))
    assert meta["memory"]["attention_chains"] == meta["memory"]["attention_recomputed"] == layers > 0
    probabilities = {o for n in model.graph.node if n.op_type == "Softmax" and n.name.startswith("lrp/unfused/")
                     for o in n.output}
    readers = [n.name for n in model.graph.node if set(n.input) & probabilities]
    assert readers and all(name.startswith("lrp/unfused/") for name in readers)  # the forward's own A·V only
    np.testing.assert_array_equal(results["lean"].relevance, results["fast"].relevance)
    if forward == "fused":
        for prepack, result in ((True, results["lean"]), (False, lean_default.run(**feed))):
            options = ort.SessionOptions()
            if not prepack:
                options.add_session_config_entry("session.disable_prepacking", "1")
            session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            original = session.run(["logits"], {**feed, **llama_int4.past_inputs("tiny")})[0]
            np.testing.assert_array_equal(result.outputs["logits"], original)
