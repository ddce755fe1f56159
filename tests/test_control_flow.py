"""Control flow (If/Loop), opset upgrades, and `inspect` = `convert`'s check path.

References: torch.autograd (gradient mode) and LXT's rule functions applied in a PyTorch forward
(attnlrp) for torch exports; finite differences on the original graph in float64 (onnxruntime) and
a numpy/torch forward written with LXT's rules for hand-built If graphs."""
import contextlib
import io
import os
import re
import sys
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import lrp_onnx
from lrp_onnx import cli

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "stubs"))  # a stand-in torchvision, imported by lxt
from lxt.efficient.rules import divide_gradient, identity_rule_implicit  # noqa: E402

RNG = np.random.default_rng(0)


def rel(a, b):
    return float(np.linalg.norm(np.asarray(a, np.float64) - b) / max(np.linalg.norm(b), 1e-12))


def run(model, feeds):
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, feeds)))


# -- torch exports: squeeze(dim) becomes an If ------------------------------------------------------
class Squeezer(torch.nn.Module):
    """squeeze(1) of a size-1 axis, then an MLP with a tanh and a product of two relevance-carrying
    tensors. `ids`: an embedding first, with the size-1 axis sliced out (static: a constant If)."""

    def __init__(self, ids: bool, lxt_rules: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.ids, self.lxt_rules = ids, lxt_rules
        self.emb = torch.nn.Embedding(11, 6)
        self.a, self.b, self.out = torch.nn.Linear(6, 8), torch.nn.Linear(6, 8), torch.nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.emb(x)) if self.ids else self.head(x)

    def head(self, h):
        s = (h[:, :1] if self.ids else h).squeeze(1)
        if self.lxt_rules:
            return self.out(divide_gradient(identity_rule_implicit(torch.tanh, self.a(s)) * self.b(s), 2))
        return self.out(torch.tanh(self.a(s)) * self.b(s))


def export_squeezer(ids: bool, path):
    module = Squeezer(ids)
    if ids:
        args, names, axes = (torch.zeros(2, 5, dtype=torch.long),), ["ids"], {"ids": {0: "batch", 1: "seq"}}
    else:
        args, names, axes = (torch.zeros(2, 1, 6),), ["x"], {"x": {0: "batch", 1: "one"}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, args, str(path), opset_version=17, dynamo=False, input_names=names,
                          output_names=["y"], dynamic_axes=axes)
    return module, onnx.load(str(path))


def torch_relevance(module, feed, seed, lxt_rules):
    module.lxt_rules = lxt_rules
    if module.ids:
        ids = torch.from_numpy(feed["ids"])
        leaf = module.emb(ids).detach().requires_grad_(True)
        y = module.head(leaf)
    else:
        leaf = torch.from_numpy(feed["x"]).requires_grad_(True)
        y = module(leaf)
    (y * torch.from_numpy(seed)).sum().backward()
    return (leaf * leaf.grad).detach().numpy()


@pytest.mark.parametrize("ids", [True, False], ids=["constant-if", "dynamic-if"])
@pytest.mark.parametrize("rules", ["gradient", "attnlrp"])
def test_torch_squeeze_export(ids, rules, tmp_path):
    module, model = export_squeezer(ids, tmp_path / "squeeze.onnx")
    assert any(n.op_type == "If" for n in model.graph.node)
    converted = lrp_onnx.convert(model, rules=rules, seed_input=True)
    forward_ops = [n.op_type for n in converted.graph.node if not n.name.startswith("lrp/")]
    backward_ops = [n.op_type for n in converted.graph.node if n.name.startswith("lrp/")]
    if ids:  # Slice keeps one position: the condition is known from the static dim, the If is inlined
        assert "If" not in forward_ops and "If" not in backward_ops
        feed = {"ids": RNG.integers(0, 11, (2, 4)).astype(np.int64)}
    else:  # a dynamic dim: the If stays and its backward is an If
        assert "If" in forward_ops and "If" in backward_ops
        feed = {"x": RNG.standard_normal((2, 1, 6)).astype(np.float32)}
    seed = RNG.standard_normal((2, 3)).astype(np.float32)
    out = run(converted, {**feed, "lrp_seed": seed})
    np.testing.assert_allclose(out["y"], run(model, feed)["y"], rtol=0, atol=0)  # the forward is untouched
    reference = torch_relevance(module, feed, seed, lxt_rules=rules == "attnlrp")
    assert reference.shape == out["lrp_relevance"].shape
    assert rel(out["lrp_relevance"], reference) < 1e-5
    report = lrp_onnx.inspect_model(model, rules=rules)
    assert report.supported and any("If" in desc for desc, _, _ in report.rows) == (not ids)


# -- hand-built If graphs with outer-scope references ----------------------------------------------
W1, W2, W3 = (RNG.standard_normal(s) * 0.5 for s in ((4, 5), (4, 5), (5, 3)))


def if_graph(dtype=np.float32, nested=False, then_op="Tanh", cond_value=None):
    """y = (flag ? Tanh(h) * g : h + Sigmoid(g)) @ W3, h = x @ W1, g = x @ W2; the branches read h and g
    from the main graph. `nested`: the then-branch is itself an If on a second flag, reading h and g
    two scopes up. `cond_value`: a constant condition (an initializer) instead of the input flag."""
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))

    def out(name):
        return helper.make_tensor_value_info(name, elem, None)

    then_nodes = [helper.make_node(then_op, ["h"], ["t_act"], name="then_act"),
                  helper.make_node("Mul", ["t_act", "g"], ["t_out"], name="then_product")]
    then_branch = helper.make_graph(then_nodes, "then", [], [out("t_out")])
    if nested:
        inner_else = helper.make_graph([helper.make_node("Sub", ["h", "g"], ["ie_out"], name="inner_sub")],
                                       "inner_else", [], [out("ie_out")])
        inner = helper.make_node("If", ["flag2"], ["n_out"], name="inner_if", then_branch=then_branch,
                                 else_branch=inner_else)
        then_branch = helper.make_graph([inner, helper.make_node("Identity", ["n_out"], ["nt_out"], name="nid")],
                                        "then_outer", [], [out("nt_out")])
    else_nodes = [helper.make_node("Sigmoid", ["g"], ["e_sig"], name="else_sigmoid"),
                  helper.make_node("Add", ["h", "e_sig"], ["e_out"], name="else_add")]
    else_branch = helper.make_graph(else_nodes, "else", [], [out("e_out")])
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="proj_h"),
             helper.make_node("MatMul", ["x", "w2"], ["g"], name="proj_g"),
             helper.make_node("If", ["flag"], ["p"], name="branching", then_branch=then_branch,
                              else_branch=else_branch),
             helper.make_node("MatMul", ["p", "w3"], ["y"], name="head")]
    inits = [numpy_helper.from_array(w.astype(dtype), n) for w, n in ((W1, "w1"), (W2, "w2"), (W3, "w3"))]
    inputs = [helper.make_tensor_value_info("x", elem, ["batch", 4])]
    if cond_value is None:
        inputs.append(helper.make_tensor_value_info("flag", TensorProto.BOOL, []))
    else:
        inits.append(numpy_helper.from_array(np.array(cond_value), "flag"))
    if nested:
        inputs.append(helper.make_tensor_value_info("flag2", TensorProto.BOOL, []))
    graph = helper.make_graph(nodes, "if_graph", inputs, [helper.make_tensor_value_info("y", elem, ["batch", 3])],
                              inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def finite_difference_relevance(model64, feed, seed, eps=1e-6):
    x = feed["x"].astype(np.float64)
    grad = np.zeros_like(x)
    for idx in np.ndindex(x.shape):
        plus, minus = x.copy(), x.copy()
        plus[idx] += eps
        minus[idx] -= eps
        f = [float((run(model64, {**feed, "x": v})["y"] * seed).sum()) for v in (plus, minus)]
        grad[idx] = (f[0] - f[1]) / (2 * eps)
    return x * grad


FLAGS = [(True, True), (True, False), (False, True)]


@pytest.mark.parametrize("nested", [False, True], ids=["flat", "nested"])
@pytest.mark.parametrize("flags", FLAGS, ids=["then-then", "then-else", "else"])
def test_if_with_outer_references_gradient_equals_finite_differences(nested, flags):
    converted = lrp_onnx.convert(if_graph(nested=nested), rules="gradient", seed_input=True)
    assert [n.op_type for n in converted.graph.node if n.name.startswith("lrp/")].count("If") == 1
    onnx.checker.check_model(converted)  # names stay unique across the graph and its branches
    feed = {"x": RNG.standard_normal((2, 4)).astype(np.float32), "flag": np.array(flags[0])}
    if nested:
        feed["flag2"] = np.array(flags[1])
    seed = RNG.standard_normal((2, 3)).astype(np.float32)
    got = run(converted, {**feed, "lrp_seed": seed})["lrp_relevance"]
    reference = finite_difference_relevance(if_graph(np.float64, nested=nested), feed, seed.astype(np.float64))
    assert rel(got, reference) < 1e-4


@pytest.mark.parametrize("flag", [True, False])
def test_if_with_outer_references_attnlrp_equals_lxt_rules(flag):
    converted = lrp_onnx.convert(if_graph(), rules="attnlrp", seed_input=True)
    feed = {"x": RNG.standard_normal((2, 4)).astype(np.float32), "flag": np.array(flag)}
    seed = RNG.standard_normal((2, 3)).astype(np.float32)
    got = run(converted, {**feed, "lrp_seed": seed})["lrp_relevance"]
    x = torch.tensor(feed["x"], dtype=torch.float64, requires_grad=True)
    h, g = x @ torch.tensor(W1), x @ torch.tensor(W2)
    if flag:  # tanh: identity rule; the product of two relevance-carrying tensors: uniform (each gets 1/2)
        p = divide_gradient(identity_rule_implicit(torch.tanh, h) * g, 2)
    else:  # sigmoid: identity rule; the sum: gradient
        p = h + identity_rule_implicit(torch.sigmoid, g)
    ((p @ torch.tensor(W3)) * torch.tensor(seed, dtype=torch.float64)).sum().backward()
    reference = (x * x.grad).detach().numpy()
    assert rel(got, reference) < 1e-5


@pytest.mark.parametrize("cond", [True, False])
def test_constant_condition_is_inlined(cond):
    model = if_graph(cond_value=cond)
    converted = lrp_onnx.convert(model, rules="gradient", seed_input=True)
    assert not any(n.op_type == "If" for n in converted.graph.node)
    assert "p" in {o for n in converted.graph.node for o in n.output}  # the If's output keeps its name
    feed = {"x": RNG.standard_normal((3, 4)).astype(np.float32)}
    seed = RNG.standard_normal((3, 3)).astype(np.float32)
    out = run(converted, {**feed, "lrp_seed": seed})
    np.testing.assert_allclose(out["y"], run(model, feed)["y"], rtol=1e-6, atol=1e-6)
    reference = finite_difference_relevance(if_graph(np.float64, cond_value=cond), feed, seed.astype(np.float64))
    assert rel(out["lrp_relevance"], reference) < 1e-4


def test_unsupported_op_in_a_branch_is_refused_naming_the_if_and_the_node():
    with pytest.raises(lrp_onnx.UnsupportedOpsError) as info:
        lrp_onnx.convert(if_graph(then_op="Bernoulli"), rules="gradient")
    assert len(info.value.problems) == 1
    problem = info.value.problems[0]
    assert problem.startswith("'branching' (ai.onnx::If)") and "'then_act' (ai.onnx::Bernoulli)" in problem


def loop_graph():
    """y = Loop(2 times: acc = acc * 2 + h) @ W3: the loop body reads h from the main graph."""
    body = helper.make_graph(
        [helper.make_node("Mul", ["acc_in", "two"], ["doubled"]), helper.make_node("Add", ["doubled", "h"], ["acc_out"]),
         helper.make_node("Identity", ["cond_in"], ["cond_out"])], "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("acc_in", TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("acc_out", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.array(2.0, np.float32), "two")])
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="proj_h"),
             helper.make_node("Loop", ["trips", "", "zeros"], ["acc"], name="repeat", body=body),
             helper.make_node("MatMul", ["acc", "w3"], ["y"], name="head")]
    inits = [numpy_helper.from_array(W1.astype(np.float32), "w1"), numpy_helper.from_array(W3.astype(np.float32), "w3"),
             numpy_helper.from_array(np.array(2, np.int64), "trips"),
             numpy_helper.from_array(np.zeros((2, 5), np.float32), "zeros")]
    graph = helper.make_graph(nodes, "loop", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_loop_on_the_path_is_refused_naming_it():
    with pytest.raises(lrp_onnx.UnsupportedOpsError) as info:
        lrp_onnx.convert(loop_graph(), rules="gradient")
    assert info.value.problems[0].startswith("'repeat' (ai.onnx::Loop)")


def rank_changing_if_graph():
    """If(flag) squeezes or not (the branches differ in rank), then an Add with a broadcast bias: the
    backward of the Add needs a rank that no one knows."""
    then_branch = helper.make_graph([helper.make_node("Squeeze", ["h", "axis"], ["s"], name="sq")], "then", [],
                                    [helper.make_tensor_value_info("s", TensorProto.FLOAT, None)],
                                    [numpy_helper.from_array(np.array([1], np.int64), "axis")])
    else_branch = helper.make_graph([helper.make_node("Identity", ["h"], ["i"], name="id")], "else", [],
                                    [helper.make_tensor_value_info("i", TensorProto.FLOAT, None)])
    nodes = [helper.make_node("Mul", ["x", "x"], ["h"], name="square"),
             helper.make_node("If", ["flag"], ["p"], name="maybe_squeeze", then_branch=then_branch,
                              else_branch=else_branch),
             helper.make_node("Add", ["p", "z"], ["q"], name="add_z"),
             helper.make_node("Mul", ["q", "half"], ["y"], name="scale")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "one", 4]),
                                           helper.make_tensor_value_info("z", TensorProto.FLOAT, ["b", 4]),
                                           helper.make_tensor_value_info("flag", TensorProto.BOOL, [])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(np.array(0.5, np.float32), "half")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_backward_tensor_names_do_not_leak_into_errors():
    with pytest.raises(lrp_onnx.UnsupportedOpsError) as info:
        lrp_onnx.convert(rank_changing_if_graph(), rules="gradient", source="x", seed_input=True)
    assert info.value.problems and all(LABEL.match(p) for p in info.value.problems)
    assert "lrp/" not in str(info.value), str(info.value)
    assert any(p.startswith("'scale' (ai.onnx::Mul)") for p in info.value.problems), info.value.problems


# -- inspect and convert: one check path ------------------------------------------------------------
def hardmax_graph():
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="proj"),
             helper.make_node("Bernoulli", ["h"], ["u"], name="strange"),
             helper.make_node("MatMul", ["u", "w"], ["y"], name="head")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])],
                              initializer=[numpy_helper.from_array(np.eye(4, dtype=np.float32), "w")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def unreachable_graph():
    """The output does not depend on the float input: convert refuses ("does not reach")."""
    model = hardmax_graph()
    model.graph.node[2].input[0] = "w"
    return model


REFUSING = {"hardmax": (hardmax_graph, []), "if-branch": (lambda: if_graph(then_op="Bernoulli"), []),
            "loop": (loop_graph, []), "unreachable": (unreachable_graph, []),
            "rank-unknown": (rank_changing_if_graph, ["--source", "x", "--seed-input"]),
            "unknown-latent": (lambda: if_graph(nested=True), ["--output", "y", "--latent", "nope"])}
LABEL = re.compile(r"'([^']*)' \(([\w.]+)::(\w+)\)")


def cli_run(*args):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main([str(a) for a in args])
    return code, out.getvalue(), err.getvalue()


@pytest.mark.parametrize("name", sorted(REFUSING))
def test_inspect_refuses_exactly_when_convert_does_naming_the_same_nodes(name, tmp_path):
    build, options = REFUSING[name]
    path = tmp_path / f"{name}.onnx"
    onnx.save(build(), path)
    code, _, err = cli_run("convert", path, "-o", tmp_path / "out.onnx", "--rules", "gradient", *options)
    assert code == 2 and not (tmp_path / "out.onnx").exists()
    assert len(err.strip().splitlines()) == 1, err
    i_code, i_out, i_err = cli_run("inspect", path, "--rules", "gradient", *options)
    assert i_code != 0
    if i_code == 2:  # a bad argument or an unusable graph: the same one line
        assert i_err == err
    else:
        unsupported = i_out.split("UNSUPPORTED", 1)[1]
        assert set(LABEL.findall(unsupported)) == set(LABEL.findall(err)) != set()


def test_inspect_passes_exactly_when_convert_does(tmp_path):
    path = tmp_path / "if.onnx"
    onnx.save(if_graph(), path)
    code, out, _ = cli_run("inspect", path, "--rules", "attnlrp")
    assert code == 0 and "coverage: every unit" in out and "::If" in out
    assert cli_run("convert", path, "-o", tmp_path / "o.onnx")[0] == 0


# -- opset < 13 --------------------------------------------------------------------------------------
class Old(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.emb, self.norm, self.out = torch.nn.Embedding(13, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 3)

    def forward(self, ids):
        return self.body(self.emb(ids))

    def body(self, e):
        h = self.norm(e)
        a, b = h.split(4, dim=-1)
        h = torch.cat([a * torch.sigmoid(b), b], -1).unsqueeze(1).squeeze(1)
        return self.out(h.sum(1))


def test_opset_11_is_upgraded_in_memory(tmp_path, capsys):
    module = Old()
    path = tmp_path / "old.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (torch.zeros(2, 5, dtype=torch.long),), str(path), opset_version=11, dynamo=False,
                          input_names=["ids"], output_names=["y"], dynamic_axes={"ids": {0: "b", 1: "t"}},
                          external_data=False)
    original = onnx.load(str(path))
    assert original.opset_import[0].version == 11
    capsys.readouterr()
    converted = lrp_onnx.convert(str(path), rules="gradient", seed_input=True)
    assert "upgraded from opset 11 to 13 in memory" in capsys.readouterr().err
    ids = RNG.integers(0, 13, (2, 5)).astype(np.int64)
    seed = RNG.standard_normal((2, 3)).astype(np.float32)
    out = run(converted, {"ids": ids, "lrp_seed": seed})
    np.testing.assert_allclose(out["y"], run(original, {"ids": ids})["y"], rtol=1e-6, atol=1e-6)
    e = module.emb(torch.from_numpy(ids)).detach().requires_grad_(True)
    (module.body(e) * torch.from_numpy(seed)).sum().backward()
    assert rel(out["lrp_relevance"], (e * e.grad).detach().numpy()) < 1e-5


def test_opset_upgrade_reads_no_weights(tmp_path):
    """The weights live in an external file that is then removed: upgrading and inspecting still work."""
    model = if_graph(cond_value=True)
    model.opset_import[0].version = 11
    path = tmp_path / "ext.onnx"
    onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
              location="weights.bin", size_threshold=0)
    os.remove(tmp_path / "weights.bin")
    assert lrp_onnx.inspect_model(str(path), rules="gradient").supported


def test_failed_upgrade_is_refused_naming_the_failure():
    model = hardmax_graph()
    model.opset_import[0].version = 11
    model.graph.node[1].op_type = "NotAnOnnxOp"
    with pytest.raises(lrp_onnx.LRPError, match=r"opset 11.*could not upgrade.*NotAnOnnxOp"):
        lrp_onnx.convert(model)


# -- sources behind index-routing ops ----------------------------------------------------------------
class TransposedIds(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(2)
        self.emb, self.types, self.out = torch.nn.Embedding(17, 6), torch.nn.Embedding(2, 6), torch.nn.Linear(6, 3)

    def forward(self, ids):  # ids: [seq, batch] (time-major), transposed and sliced before the lookup
        ids = torch.cat([ids.t()[:, :3], ids.t()[:, 3:]], dim=1)
        return self.out(torch.tanh(self.emb(ids) + self.types(torch.zeros_like(ids))).mean(1))


def test_default_source_behind_transposed_ids(tmp_path):
    path = tmp_path / "tids.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(TransposedIds(), (torch.zeros(6, 2, dtype=torch.long),), str(path), opset_version=17,
                          dynamo=False, input_names=["ids"], output_names=["y"], dynamic_axes={"ids": {0: "s", 1: "b"}})
    model = onnx.load(str(path))
    assert [n.op_type for n in model.graph.node].count("Gather") >= 1
    report = lrp_onnx.inspect_model(model, rules="gradient")
    lookup = [n for n in model.graph.node if n.op_type == "Gather" and n.input[0] == "emb.weight"][0]
    assert report.sources == [lookup.output[0]]


# -- refusals print one line ---------------------------------------------------------------------------
def test_refusal_prints_only_its_error_line(tmp_path):
    """A Slice to a size taken from another input's symbolic dim makes onnxruntime's symbolic shape
    inference talk ("Unable to determine if ... <= ..."); the refusal still prints one line."""
    nodes = [helper.make_node("Shape", ["m"], ["ms"]), helper.make_node("Gather", ["ms", "one"], ["n"], axis=0),
             helper.make_node("Slice", ["x", "zero", "n", "one"], ["xs"], name="cut"),
             helper.make_node("Bernoulli", ["xs"], ["y"], name="strange")]
    inits = [numpy_helper.from_array(np.array([1], np.int64), "one"),
             numpy_helper.from_array(np.array([0], np.int64), "zero")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "seq", 4]),
                                           helper.make_tensor_value_info("m", TensorProto.INT64, ["b", "other"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    path = tmp_path / "chatty.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    import subprocess
    done = subprocess.run([sys.executable, "-m", "lrp_onnx", "convert", str(path), "-o", str(tmp_path / "o.onnx")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "'strange'" in done.stderr and not done.stdout
