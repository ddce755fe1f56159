"""Exact VJPs of the ops real exporters emit, each checked on a one-node (or few-node) hand-built graph:
the converted graph's relevance in `gradient` mode (x * Jᵀ seed for a random seed) against central
finite differences of the ORIGINAL graph, both run in onnxruntime. float64 where onnxruntime's CPU kernel
runs double (tolerance 1e-6), else float32 (1e-3 relative)."""
from __future__ import annotations

import zlib

import numpy as np
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

import lrp_onnx
from lrp_onnx.errors import LRPError

F32, F64 = np.float32, np.float64


def _session(model):
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def make_model(nodes, inputs: dict, output="y", consts=None, opset=18, dynamic=None):
    """inputs: name -> array (graph inputs); consts: name -> array (initializers); dynamic: name -> dims
    (symbolic names allowed) replacing an input's static shape."""
    consts = consts or {}
    dynamic = dynamic or {}
    vis = [helper.make_tensor_value_info(k, helper.np_dtype_to_tensor_dtype(v.dtype), dynamic.get(k, list(v.shape)))
           for k, v in inputs.items()]
    out_dtype = helper.np_dtype_to_tensor_dtype(next(iter(inputs.values())).dtype)
    graph = helper.make_graph(nodes, "g", vis, [helper.make_tensor_value_info(output, out_dtype, None)],
                              [numpy_helper.from_array(np.asarray(v), k) for k, v in consts.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=10)


def relevance_and_reference(model, inputs: dict, sources, step):
    converted = lrp_onnx.convert(model, rules="gradient", source=list(sources), seed_input=True)
    run = _session(converted)
    original = _session(model)
    y = original.run(None, inputs)[0]
    seed = np.random.default_rng(1).standard_normal(y.shape).astype(y.dtype)
    names = [o.name for o in run.get_outputs()]
    values = dict(zip(names, run.run(None, {**inputs, "lrp_seed": seed})))
    assert np.allclose(values[original.get_outputs()[0].name], y), "the original output changed"
    results = []
    for k, s in enumerate(sources):
        rel = values["lrp_relevance" + ("" if k == 0 else f"_{k}")]
        x = inputs[s]
        grad = np.zeros(x.size, dtype=np.float64)
        flat = x.reshape(-1)
        for i in range(x.size):
            plus, minus = flat.copy(), flat.copy()
            plus[i] += step
            minus[i] -= step
            fp = original.run(None, {**inputs, s: plus.reshape(x.shape)})[0]
            fm = original.run(None, {**inputs, s: minus.reshape(x.shape)})[0]
            grad[i] = (np.sum(fp.astype(np.float64) * seed) - np.sum(fm.astype(np.float64) * seed)) / (2 * step)
        results.append((rel.astype(np.float64), x.astype(np.float64) * grad.reshape(x.shape)))
    return results


def rel_err(a, b):
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-12))


def check(nodes, inputs, consts=None, sources=None, opset=18, dynamic=None, step=None, tol=None, output="y"):
    sources = sources or [next(iter(inputs))]
    dtype = next(iter(inputs.values())).dtype
    step = step or (1e-6 if dtype == F64 else 1e-2)
    tol = tol or (1e-6 if dtype == F64 else 1e-3)
    model = make_model(nodes, inputs, output, consts, opset, dynamic)
    for rel, ref in relevance_and_reference(model, inputs, sources, step):
        assert rel.shape == ref.shape
        assert rel_err(rel, ref) <= tol, (rel_err(rel, ref), rel, ref)


RNG = np.random.default_rng(0)


@pytest.fixture(autouse=True)
def _fixed_random_inputs(request):
    """Each test draws the same inputs whatever else runs (no order-dependent kinks or ties)."""
    global RNG
    RNG = np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))


def rand(*shape, dtype=F64, low=-2.0, high=2.0):
    return RNG.uniform(low, high, size=shape).astype(dtype)


_NAMES = iter(range(10 ** 9))


def node(op, inputs, outputs=("y",), **attrs):
    return helper.make_node(op, list(inputs), list(outputs), name=f"n{next(_NAMES)}_{op}", **attrs)


# -- elementwise functions of one tensor ------------------------------------------------------------
UNARY = [
    ("Abs", {}, F64, -2, 2), ("Sin", {}, F64, -3, 3), ("Cos", {}, F64, -3, 3), ("Tan", {}, F32, -1.2, 1.2),
    ("Asin", {}, F32, -0.9, 0.9), ("Acos", {}, F32, -0.9, 0.9), ("Atan", {}, F32, -3, 3),
    ("Sinh", {}, F32, -2, 2), ("Cosh", {}, F32, -2, 2), ("Asinh", {}, F32, -3, 3), ("Acosh", {}, F32, 1.2, 3),
    ("Atanh", {}, F32, -0.8, 0.8), ("Softplus", {}, F64, -3, 3), ("Softsign", {}, F64, -3, 3),
    ("HardSigmoid", {}, F64, -4, 4), ("HardSigmoid", {"alpha": 0.5, "beta": 0.3}, F64, -3, 3),
    ("HardSwish", {}, F64, -5, 5), ("LeakyRelu", {"alpha": 0.1}, F64, -2, 2), ("Elu", {"alpha": 0.7}, F64, -2, 2),
    ("Selu", {}, F64, -2, 2), ("Celu", {"alpha": 0.8}, F32, -2, 2), ("Mish", {}, F64, -3, 3),
    ("ThresholdedRelu", {"alpha": 0.5}, F64, -2, 2), ("Relu", {}, F64, -2, 2), ("Exp", {}, F64, -2, 2),
    ("Log", {}, F64, 0.2, 3), ("Sqrt", {}, F64, 0.2, 3), ("Reciprocal", {}, F64, 0.3, 3), ("Tanh", {}, F64, -2, 2),
    ("Sigmoid", {}, F64, -3, 3), ("Erf", {}, F32, -2, 2), ("Neg", {}, F64, -2, 2),
    ("Sign", {}, F64, -2, 2), ("Floor", {}, F64, -2, 2), ("Ceil", {}, F64, -2, 2), ("Round", {}, F64, -2, 2),
]


def _avoid_integers(x):
    return np.where(np.abs(x - np.round(x)) < 0.05, x + 0.1, x)


@pytest.mark.parametrize("op,attrs,dtype,low,high", UNARY, ids=[u[0] + str(i) for i, u in enumerate(UNARY)])
def test_unary(op, attrs, dtype, low, high):
    x = rand(3, 4, dtype=dtype, low=low, high=high)
    if op in ("Round", "Floor", "Ceil"):
        x = _avoid_integers(x)
    check([node(op, ["x"], **attrs)], {"x": x})


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu(approximate):
    check([node("Gelu", ["x"], approximate=approximate)], {"x": rand(3, 4, dtype=F32)}, opset=20)


def test_prelu_with_slope_input():
    """The slope is constant (broadcast per channel); and as a second relevance-carrying input."""
    x = rand(2, 3, 4)
    check([node("PRelu", ["x", "s"])], {"x": x}, consts={"s": rand(3, 1, low=0.1, high=0.5)})
    check([node("PRelu", ["x", "s"])], {"x": x, "s": rand(3, 1, low=0.1, high=0.5)}, sources=["x", "s"])


@pytest.mark.parametrize("case", ["const_exponent", "path_exponent", "const_base", "square", "f32_int_exponent"])
def test_pow(case):
    x, p = rand(3, 4, low=0.3, high=2), rand(3, 4, low=-1.5, high=2.5)
    if case == "const_exponent":
        check([node("Pow", ["x", "p"])], {"x": x}, consts={"p": np.array(1.7)})
    elif case == "path_exponent":
        check([node("Pow", ["x", "p"])], {"x": x, "p": p}, sources=["x", "p"])
    elif case == "const_base":
        check([node("Pow", ["c", "p"])], {"p": p}, consts={"c": np.array(2.5)})
    elif case == "square":
        check([node("Pow", ["x", "p"])], {"x": rand(3, 4)}, consts={"p": np.array(2.0)})
    else:
        check([node("Pow", ["x", "p"])], {"x": rand(3, 4, dtype=F32)}, consts={"p": np.array(3, np.int64)})


# -- variadic and bounded -----------------------------------------------------------------------------
@pytest.mark.parametrize("op", ["Max", "Min", "Mean", "Sum"])
def test_variadic_broadcasting(op):
    dtype = F32 if op == "Mean" else F64  # onnxruntime's Mean has no double kernel
    a, c, d = rand(2, 3, 4, dtype=dtype), rand(3, 1, dtype=dtype), rand(4, dtype=dtype)
    check([node(op, ["a", "c", "d"])], {"a": a, "c": c, "d": d}, sources=["a", "c", "d"])
    check([node(op, ["a", "k"])], {"a": a}, consts={"k": rand(1, 4, dtype=dtype)})


@pytest.mark.parametrize("op,reference", [("Max", "maximum"), ("Min", "minimum")])
def test_max_min_ties_split_evenly_as_torch(op, reference):
    """Tied inputs share the gradient evenly, as torch.maximum / torch.minimum do."""
    torch = pytest.importorskip("torch")
    a = np.array([[1.0, 2.0, -1.0], [0.5, 0.5, 3.0]])
    c = np.array([[1.0, 1.0, -1.0], [0.5, 0.25, 3.0]])
    model = make_model([node(op, ["a", "c"])], {"a": a, "c": c})
    converted = lrp_onnx.convert(model, rules="gradient", source=["a", "c"], seed_input=True)
    seed = RNG.standard_normal(a.shape)
    out = dict(zip([o.name for o in _session(converted).get_outputs()],
                   _session(converted).run(None, {"a": a, "c": c, "lrp_seed": seed})))
    ta, tc = torch.tensor(a, requires_grad=True), torch.tensor(c, requires_grad=True)
    (getattr(torch, reference)(ta, tc) * torch.tensor(seed)).sum().backward()
    assert np.allclose(out["lrp_relevance"], a * ta.grad.numpy())
    assert np.allclose(out["lrp_relevance_1"], c * tc.grad.numpy())


@pytest.mark.parametrize("bounds", ["both", "min_only", "max_only", "none", "path_bounds"])
def test_clip(bounds):
    x = rand(3, 5)
    lo, hi = np.array(-0.7), np.array(0.9)
    if bounds == "both":
        check([node("Clip", ["x", "lo", "hi"])], {"x": x}, consts={"lo": lo, "hi": hi})
    elif bounds == "min_only":
        check([node("Clip", ["x", "lo"])], {"x": x}, consts={"lo": lo})
    elif bounds == "max_only":
        check([node("Clip", ["x", "", "hi"])], {"x": x}, consts={"hi": hi})
    elif bounds == "none":
        check([node("Clip", ["x"])], {"x": x})
    else:
        check([node("Clip", ["x", "lo", "hi"])], {"x": x, "lo": lo, "hi": hi}, sources=["x", "lo", "hi"])


# -- reductions ---------------------------------------------------------------------------------------
REDUCE_OPS = ["ReduceMax", "ReduceMin", "ReduceLogSumExp", "ReduceL2", "ReduceL1", "ReduceSumSquare",
              "ReduceLogSum", "ReduceSum", "ReduceMean"]


@pytest.mark.parametrize("op", REDUCE_OPS)
@pytest.mark.parametrize("form", ["axes_input_keep", "axes_input_drop", "all_axes", "attr_axes_opset13", "noop"])
def test_reduce(op, form):
    x = rand(2, 3, 4, low=0.2, high=2.0) if op == "ReduceLogSum" else rand(2, 3, 4)
    if op == "ReduceL1":
        x = np.where(np.abs(x) < 0.05, 0.3, x)
    if form == "axes_input_keep":
        check([node(op, ["x", "ax"], keepdims=1)], {"x": x}, consts={"ax": np.array([1, -1])})
    elif form == "axes_input_drop":
        check([node(op, ["x", "ax"], keepdims=0)], {"x": x}, consts={"ax": np.array([0, 2])})
    elif form == "all_axes":
        check([node(op, ["x"], keepdims=0)], {"x": x})
    elif form == "noop":
        check([node(op, ["x", "ax"], keepdims=0, noop_with_empty_axes=1)], {"x": x},
              consts={"ax": np.zeros(0, np.int64)})
    elif op in ("ReduceSum",):  # opset 13 ReduceSum takes axes as an input already
        check([node(op, ["x", "ax"], keepdims=0)], {"x": x}, consts={"ax": np.array([1])}, opset=13)
    else:
        check([node(op, ["x"], axes=[1], keepdims=0)], {"x": x}, opset=13)


@pytest.mark.parametrize("op,reference", [("ReduceMax", "amax"), ("ReduceMin", "amin")])
def test_reduce_max_ties_split_evenly_as_torch_amax(op, reference):
    torch = pytest.importorskip("torch")
    x = np.array([[1.0, 3.0, 3.0, -2.0], [-2.0, -2.0, 0.5, -2.0]])
    model = make_model([node(op, ["x", "ax"], keepdims=0)], {"x": x}, consts={"ax": np.array([1])})
    converted = lrp_onnx.convert(model, rules="gradient", source="x", seed_input=True)
    seed = np.array([0.7, -1.3])
    got = _session(converted).run(["lrp_relevance"], {"x": x, "lrp_seed": seed})[0]
    tx = torch.tensor(x, requires_grad=True)
    (getattr(torch, reference)(tx, dim=1) * torch.tensor(seed)).sum().backward()
    assert np.allclose(got, x * tx.grad.numpy())


def test_reduce_l2_at_zero_is_zero():
    x = np.zeros((2, 3))
    x[1] = [1.0, -2.0, 0.5]
    model = make_model([node("ReduceL2", ["x", "ax"], keepdims=1)], {"x": x}, consts={"ax": np.array([1])})
    converted = lrp_onnx.convert(model, rules="gradient", source="x", seed_input=True)
    run = _session(converted)
    names = [o.name for o in run.get_outputs()]
    values = dict(zip(names, run.run(None, {"x": x, "lrp_seed": np.ones((2, 1))})))
    rel = values["lrp_relevance"]
    assert np.all(np.isfinite(rel)) and np.all(rel[0] == 0)
    assert np.allclose(rel[1], x[1] ** 2 / np.linalg.norm(x[1]))


# -- normalizations -----------------------------------------------------------------------------------
def test_batch_norm_inference():
    c = 3
    consts = {"s": rand(c), "b": rand(c), "m": rand(c), "v": rand(c, low=0.5, high=2)}
    check([node("BatchNormalization", ["x", "s", "b", "m", "v"], epsilon=1e-3)], {"x": rand(2, c, 4, 3)},
          consts=consts, opset=15)
    check([node("BatchNormalization", ["x", "s", "b", "m", "v"])], {"x": rand(4, c)}, consts=consts)


def test_batch_norm_training_mode_is_refused():
    c = 3
    consts = {"s": rand(c), "b": rand(c), "m": rand(c), "v": rand(c, low=0.5, high=2)}
    model = make_model([node("BatchNormalization", ["x", "s", "b", "m", "v"], training_mode=1)],
                       {"x": rand(2, c, 4)}, consts=consts, opset=15)
    with pytest.raises(LRPError, match="(?i)training_mode"):
        lrp_onnx.convert(model, rules="gradient", source="x", seed_input=True)


def test_instance_norm():
    c = 3
    check([node("InstanceNormalization", ["x", "s", "b"], epsilon=1e-4)], {"x": rand(2, c, 4, 3, dtype=F32)},
          consts={"s": rand(c, dtype=F32), "b": rand(c, dtype=F32)}, step=1e-3)


@pytest.mark.parametrize("opset", [18, 21])
def test_group_norm(opset):
    """Opset 18: scale and bias per group; opset 21: per channel."""
    c, groups = 4, 2
    width = groups if opset == 18 else c
    check([node("GroupNormalization", ["x", "s", "b"], num_groups=groups)], {"x": rand(2, c, 3, 2, dtype=F32)},
          consts={"s": rand(width, dtype=F32), "b": rand(width, dtype=F32)}, opset=opset, step=1e-3)


def _torch_group_norm_constant_std(x, groups, scale, eps, seed):
    """x * Jᵀ seed of GroupNorm with the std detached (LXT's norm rule), in PyTorch."""
    import torch
    tx = torch.tensor(x, requires_grad=True)
    n, c = x.shape[:2]
    xr = tx.reshape(n, groups, -1)
    centred = xr - xr.mean(-1, keepdim=True)
    std = torch.sqrt(centred.pow(2).mean(-1, keepdim=True) + eps).detach()
    y = (centred / std).reshape(x.shape) * torch.tensor(scale).reshape(1, c, *([1] * (x.ndim - 2)))
    (y * torch.tensor(seed)).sum().backward()
    return x * tx.grad.numpy()


@pytest.mark.parametrize("op", ["GroupNormalization", "InstanceNormalization"])
def test_norm_constant_std_rule(op):
    """Registered as norms: the constant_std rule holds their std constant, as LXT does."""
    pytest.importorskip("torch")
    c, groups = 4, (2 if op == "GroupNormalization" else 4)
    x, scale = rand(2, c, 3, 2, dtype=F32), rand(c, dtype=F32)
    attrs = {"num_groups": groups} if op == "GroupNormalization" else {}
    model = make_model([node(op, ["x", "s", "b"], epsilon=1e-5, **attrs)], {"x": x},
                       consts={"s": scale, "b": rand(c, dtype=F32)}, opset=21)
    converted = lrp_onnx.convert(model, rules="gradient", source="x", seed_input=True,
                                 overrides={op: "constant_std"})
    seed = RNG.standard_normal(x.shape).astype(F32)
    got = _session(converted).run(["lrp_relevance"], {"x": x, "lrp_seed": seed})[0]
    ref = _torch_group_norm_constant_std(x, groups, scale, 1e-5, seed)
    assert rel_err(got, ref) < 1e-5


# -- layout, padding, indexing -------------------------------------------------------------------------
@pytest.mark.parametrize("runtime", [False, True])
def test_tile(runtime):
    x = rand(2, 3)
    reps = np.array([2, 3])
    if runtime:  # repeats computed in the graph from a shape
        nodes = [node("Shape", ["x"], ["sh"]), node("Add", ["sh", "one"], ["reps"]), node("Tile", ["x", "reps"])]
        check(nodes, {"x": x}, consts={"one": np.array([0, 1])})
    else:
        check([node("Tile", ["x", "r"])], {"x": x}, consts={"r": reps})


@pytest.mark.parametrize("mode", ["constant", "reflect", "edge", "wrap"])
@pytest.mark.parametrize("pads", ["positive", "negative", "axes", "runtime"])
def test_pad(mode, pads):
    x = rand(2, 4, 5)
    opset = 19 if mode == "wrap" else 18
    if pads == "positive":
        check([node("Pad", ["x", "p"], mode=mode)], {"x": x}, consts={"p": np.array([0, 1, 2, 1, 3, 0])}, opset=opset)
    elif pads == "negative":
        check([node("Pad", ["x", "p"], mode=mode)], {"x": x}, consts={"p": np.array([0, -1, 2, 0, 2, -2])},
              opset=opset)
    elif pads == "axes":
        check([node("Pad", ["x", "p", "", "ax"], mode=mode)], {"x": x},
              consts={"p": np.array([2, 1, 1, 3]), "ax": np.array([-1, 1])}, opset=opset)
    else:
        nodes = [node("Shape", ["x"], ["sh"]), node("Div", ["sh", "two"], ["half"]),
                 node("Concat", ["half", "zero"], ["p"], axis=0), node("Pad", ["x", "p"], mode=mode)]
        check(nodes, {"x": x}, consts={"two": np.array([4, 2, 2]), "zero": np.zeros(3, np.int64)}, opset=opset)


def test_pad_constant_value_on_path():
    check([node("Pad", ["x", "p", "v"])], {"x": rand(2, 3), "v": np.array(0.7)},
          consts={"p": np.array([1, 0, 0, 2])}, sources=["x", "v"])


@pytest.mark.parametrize("exclusive", [0, 1])
@pytest.mark.parametrize("reverse", [0, 1])
def test_cumsum(exclusive, reverse):
    check([node("CumSum", ["x", "ax"], exclusive=exclusive, reverse=reverse)], {"x": rand(2, 5, 3)},
          consts={"ax": np.array(1)})


@pytest.mark.parametrize("op,mode", [("DepthToSpace", "DCR"), ("DepthToSpace", "CRD"), ("SpaceToDepth", None)])
@pytest.mark.parametrize("dynamic", [False, True])
def test_depth_space(op, mode, dynamic):
    attrs = {"blocksize": 2} if mode is None else {"blocksize": 2, "mode": mode}
    x = rand(2, 8, 2, 3) if op == "DepthToSpace" else rand(2, 2, 4, 6)
    check([node(op, ["x"], **attrs)], {"x": x}, dynamic={"x": ["N", "C", "H", "W"]} if dynamic else None)


SLICES = {
    "step2": ([1], [7], [1], [2]),
    "negative_step": ([-1], [-100], [1], [-1]),
    "negative_step3": ([6], [0], [-1], [-3]),
    "two_axes": ([0, 5], [2, 1], [0, 1], [1, -2]),
    "steps_one": ([1, 1], [3, -1], [0, 2], [1, 1]),
}


@pytest.mark.parametrize("case", list(SLICES))
@pytest.mark.parametrize("dynamic", [False, True])
def test_slice_steps(case, dynamic):
    starts, ends, axes, steps = (np.array(v) for v in SLICES[case])
    check([node("Slice", ["x", "s", "e", "a", "st"])], {"x": rand(3, 8, 4)},
          consts={"s": starts, "e": ends, "a": axes, "st": steps},
          dynamic={"x": ["A", "B", "C"]} if dynamic else None)


@pytest.mark.parametrize("indices", [np.array([[0, 2], [2, -1], [1, 1]]), np.array([[[1]], [[0]]]), np.array(2),
                                     np.array([3, 0, 3])], ids=["rank2", "rank3", "scalar", "rank1_repeats"])
@pytest.mark.parametrize("axis", [0, 1, -1])
@pytest.mark.parametrize("opset", [13, 18])  # below 16 no scatter-add: a one-hot product instead
def test_gather_any_rank(indices, axis, opset):
    check([node("Gather", ["x", "i"], axis=axis)], {"x": rand(4, 4, 4)}, consts={"i": indices}, opset=opset)


@pytest.mark.parametrize("dtype", [np.int64, np.int32])
def test_gather_below_opset_16_with_dynamic_indices(dtype):
    check([node("Gather", ["x", "i"], axis=1)], {"x": rand(2, 5, 3), "i": np.array([4, -1, 0, 4], dtype)},
          opset=14, dynamic={"x": ["A", "B", 3], "i": ["M"]})


@pytest.mark.parametrize("op", ["GatherElements", "GatherND"])
def test_scatter_add_gradients_below_opset_16_are_refused_by_name(op):
    model = make_model([node(op, ["x", "i"])], {"x": rand(3, 4)}, consts={"i": np.array([[0, 1], [1, 0]])},
                       opset=13)
    name = model.graph.node[0].name
    with pytest.raises(LRPError, match=f"'{name}'.*{op} on the relevance path below opset 16"):
        lrp_onnx.convert(model, rules="gradient", source="x", seed_input=True)


def test_gather_elements():
    check([node("GatherElements", ["x", "i"], axis=1)], {"x": rand(3, 4)},
          consts={"i": np.array([[0, 0, 3], [1, 2, 1], [3, 3, 3]])})


# -- convolution ----------------------------------------------------------------------------------------
CONVS = {
    "plain": dict(),
    "strided_padded": dict(strides=[2, 2], pads=[1, 0, 0, 1]),
    "stride3_dilated": dict(strides=[3, 2], dilations=[2, 1], pads=[0, 1, 1, 1]),
    "same_upper": dict(strides=[2, 2], auto_pad="SAME_UPPER"),
    "same_lower": dict(strides=[2, 3], auto_pad="SAME_LOWER"),
    "valid": dict(strides=[2, 1], auto_pad="VALID"),
}


@pytest.mark.parametrize("case", list(CONVS))
@pytest.mark.parametrize("dynamic", [False, True])
def test_conv(case, dynamic):
    x = rand(1, 4, 7, 6, dtype=F32)
    w = rand(6, 2, 3, 2, dtype=F32)
    check([node("Conv", ["x", "w", "bias"], group=2, **CONVS[case])], {"x": x},
          consts={"w": w, "bias": rand(6, dtype=F32)}, dynamic={"x": ["N", 4, "H", "W"]} if dynamic else None)


CONV_TRANSPOSES = {
    "plain": dict(),
    "strided_padded": dict(strides=[2, 2], pads=[1, 0, 0, 1]),
    "output_padding": dict(strides=[3, 2], pads=[1, 1, 0, 0], output_padding=[2, 1], dilations=[1, 2]),
    "same_upper": dict(strides=[2, 2], auto_pad="SAME_UPPER"),
    "same_lower": dict(strides=[2, 2], auto_pad="SAME_LOWER"),
    "output_shape_odd": dict(strides=[2, 2], output_shape=[8, 6]),
    "output_shape_larger": dict(strides=[2, 2], output_shape=[10, 8]),
    "output_shape_same_upper": dict(strides=[2, 1], output_shape=[8, 4], auto_pad="SAME_UPPER"),
}


@pytest.mark.parametrize("case", list(CONV_TRANSPOSES))
@pytest.mark.parametrize("dynamic", [False, True])
def test_conv_transpose(case, dynamic):
    x = rand(1, 4, 4, 3, dtype=F32)
    w = rand(4, 3, 3, 3, dtype=F32)  # [C_in, C_out / group, k, k]
    model_args = dict(consts={"w": w, "bias": rand(6, dtype=F32)},
                      dynamic={"x": ["N", 4, "H", "W"]} if dynamic else None)
    nodes = [node("ConvTranspose", ["x", "w", "bias"], group=2, **CONV_TRANSPOSES[case])]
    if case.startswith("output_shape") and dynamic:
        model = make_model(nodes, {"x": x}, **model_args)
        with pytest.raises(LRPError, match="output_shape and a dynamic spatial size"):
            lrp_onnx.convert(model, rules="gradient", source="x", seed_input=True)
        return
    check(nodes, {"x": x}, **model_args)


def test_conv1d_and_3d_strided_dynamic():
    check([node("Conv", ["x", "w"], strides=[2], pads=[1, 0])], {"x": rand(2, 3, 9, dtype=F32)},
          consts={"w": rand(2, 3, 3, dtype=F32)}, dynamic={"x": ["N", 3, "L"]})
    check([node("Conv", ["x", "w"], strides=[2, 1, 2])], {"x": rand(1, 2, 5, 3, 4, dtype=F32)},
          consts={"w": rand(2, 2, 2, 2, 3, dtype=F32)}, dynamic={"x": ["N", 2, "D", "H", "W"]})


# -- pooling --------------------------------------------------------------------------------------------
POOLS = {
    "plain": dict(kernel_shape=[2, 2]),
    "strided_padded": dict(kernel_shape=[3, 2], strides=[2, 1], pads=[1, 0, 1, 1]),
    "ceil": dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 0, 0], ceil_mode=1),
    "dilated": dict(kernel_shape=[2, 2], strides=[1, 2], dilations=[2, 1], pads=[0, 1, 1, 0]),
    "same_upper": dict(kernel_shape=[3, 2], strides=[2, 2], auto_pad="SAME_UPPER"),
    "same_lower": dict(kernel_shape=[3, 2], strides=[2, 2], auto_pad="SAME_LOWER"),
    "overlapping": dict(kernel_shape=[3, 3], strides=[1, 1]),
}


@pytest.mark.parametrize("case", list(POOLS))
@pytest.mark.parametrize("count_include_pad", [0, 1])
@pytest.mark.parametrize("dynamic", [False, True])
def test_average_pool(case, count_include_pad, dynamic):
    check([node("AveragePool", ["x"], count_include_pad=count_include_pad, **POOLS[case])],
          {"x": rand(2, 2, 7, 6, dtype=F32)}, opset=19, dynamic={"x": ["N", 2, "H", "W"]} if dynamic else None)


@pytest.mark.parametrize("case", list(POOLS))
@pytest.mark.parametrize("dynamic,opset", [(False, 18), (True, 18), (True, 13)])
def test_max_pool(case, dynamic, opset):
    """opset 13: no scatter-add; groups of disjoint windows scatter in turn."""
    x = RNG.permutation(2 * 2 * 7 * 6).reshape(2, 2, 7, 6).astype(F64) / 10  # no ties
    check([node("MaxPool", ["x"], storage_order=0, **POOLS[case])], {"x": x}, step=1e-3, opset=opset,
          dynamic={"x": ["N", 2, "H", "W"]} if dynamic else None)


def test_max_pool_with_indices_output_and_column_major():
    x = RNG.permutation(60).reshape(1, 3, 4, 5).astype(F64) / 10
    check([node("MaxPool", ["x"], ["y", "i"], kernel_shape=[2, 2], storage_order=1)], {"x": x}, step=1e-3)


def test_pools_1d_3d():
    check([node("AveragePool", ["x"], kernel_shape=[3], strides=[2], pads=[1, 1])], {"x": rand(2, 3, 8, dtype=F32)})
    check([node("AveragePool", ["x"], kernel_shape=[2, 2, 3], strides=[2, 1, 2])], {"x": rand(1, 2, 4, 3, 5, dtype=F32)})
    x = RNG.permutation(120).reshape(1, 2, 4, 3, 5).astype(F64)
    check([node("MaxPool", ["x"], kernel_shape=[2, 2, 3], strides=[2, 1, 2])], {"x": x}, step=1e-3)
    check([node("MaxPool", ["x"], kernel_shape=[2, 2, 3], strides=[1, 1, 2])], {"x": x}, step=1e-3, opset=13)


@pytest.mark.parametrize("op", ["GlobalAveragePool", "GlobalMaxPool"])
@pytest.mark.parametrize("dynamic", [False, True])
def test_global_pools(op, dynamic):
    x = (RNG.permutation(2 * 3 * 4 * 5).reshape(2, 3, 4, 5) / 10).astype(F32)
    check([node(op, ["x"])], {"x": x}, dynamic={"x": ["N", "C", "H", "W"]} if dynamic else None)


def test_global_max_pool_ties_go_to_the_first_as_torch():
    torch = pytest.importorskip("torch")
    x = np.array([[[[1.0, 3.0], [3.0, 0.0]]]], F32)
    model = make_model([node("GlobalMaxPool", ["x"])], {"x": x})
    converted = lrp_onnx.convert(model, rules="gradient", source="x", seed_input=True)
    got = _session(converted).run(["lrp_relevance"], {"x": x, "lrp_seed": np.ones((1, 1, 1, 1), F32)})[0]
    tx = torch.tensor(x, requires_grad=True)
    torch.nn.functional.adaptive_max_pool2d(tx, 1).sum().backward()
    assert np.allclose(got, x * tx.grad.numpy())


# -- Resize ---------------------------------------------------------------------------------------------
CTMS = ["half_pixel", "half_pixel_symmetric", "pytorch_half_pixel", "align_corners", "asymmetric", "tf_crop_and_resize"]
ROI = np.array([0, 0, 0.1, 0.2, 1, 1, 0.8, 0.9], F32)


def _resize_check(attrs, scales=None, sizes=None, x=None, dynamic=None, axes_roi=None, opset=19):
    x = rand(1, 2, 4, 5, dtype=F32) if x is None else x.astype(F32)  # no double Resize in onnxruntime
    consts = {"roi": ROI if axes_roi is None else axes_roi}
    inputs = ["x", "roi" if attrs.get("coordinate_transformation_mode") == "tf_crop_and_resize" else ""]
    if scales is not None:
        consts["sc"] = np.asarray(scales, F32)
        inputs.append("sc")
    else:
        consts["sz"] = np.asarray(sizes, np.int64)
        inputs += ["", "sz"]
    check([node("Resize", inputs, **attrs)], {"x": x}, consts=consts, opset=opset, dynamic=dynamic)


@pytest.mark.parametrize("mode", ["nearest", "linear", "cubic"])
@pytest.mark.parametrize("ctm", CTMS)
@pytest.mark.parametrize("scales", [[1, 1, 1.6, 2.0], [1, 1, 0.6, 0.7]], ids=["up", "down"])
def test_resize_modes(mode, ctm, scales):
    _resize_check({"mode": mode, "coordinate_transformation_mode": ctm}, scales=scales)


@pytest.mark.parametrize("nearest_mode", ["round_prefer_floor", "round_prefer_ceil", "floor", "ceil"])
@pytest.mark.parametrize("ctm", ["half_pixel", "asymmetric", "align_corners"])
def test_resize_nearest_modes(nearest_mode, ctm):
    _resize_check({"mode": "nearest", "nearest_mode": nearest_mode, "coordinate_transformation_mode": ctm},
                  scales=[1, 1, 1.5, 2.5])


@pytest.mark.parametrize("exclude_outside", [0, 1])
@pytest.mark.parametrize("a", [-0.75, -0.5])
def test_resize_cubic_options(exclude_outside, a):
    _resize_check({"mode": "cubic", "cubic_coeff_a": a, "exclude_outside": exclude_outside}, scales=[1, 1, 1.7, 0.8])


@pytest.mark.parametrize("mode", ["linear", "cubic"])
def test_resize_antialias(mode):
    _resize_check({"mode": mode, "antialias": 1}, sizes=[1, 2, 3, 2], x=rand(1, 2, 7, 6))


@pytest.mark.parametrize("mode", ["nearest", "linear", "cubic"])
@pytest.mark.parametrize("dynamic", [False, True])
def test_resize_sizes(mode, dynamic):
    _resize_check({"mode": mode}, sizes=[1, 2, 7, 3], dynamic={"x": ["N", "C", "H", "W"]} if dynamic else None)


@pytest.mark.parametrize("mode", ["nearest", "linear"])
def test_resize_dynamic_scales_from_shape(mode):
    """Sizes computed in the graph (as torch exports interpolate(size=other.shape[2:]))."""
    x, other = rand(1, 2, 3, 4, dtype=F32), rand(1, 1, 5, 7, dtype=F32)
    nodes = [node("Shape", ["other"], ["osh"]), node("Slice", ["osh", "two", "four"], ["hw"]),
             node("Shape", ["x"], ["xsh"]), node("Slice", ["xsh", "zero", "two"], ["nc"]),
             node("Concat", ["nc", "hw"], ["sz"], axis=0), node("Resize", ["x", "", "", "sz"], mode=mode)]
    check(nodes, {"x": x, "other": other}, consts={"two": np.array([2]), "four": np.array([4]), "zero": np.array([0])},
          dynamic={"x": ["N", "C", "H", "W"], "other": ["N", 1, "H2", "W2"]})


def test_resize_axes_attribute_and_other_ranks():
    _resize_check({"mode": "linear", "axes": [3, 2]}, scales=[2.0, 1.5], opset=19)
    _resize_check({"mode": "nearest"}, scales=[1, 2.0, 1.5], x=rand(2, 3, 4))
    _resize_check({"mode": "linear"}, scales=[1, 1, 1.5, 2.0, 0.5], x=rand(1, 1, 3, 2, 4))
    _resize_check({"mode": "linear", "coordinate_transformation_mode": "tf_crop_and_resize", "axes": [2, 3],
                   "extrapolation_value": 3.0}, scales=[1.5, 2.0], axes_roi=np.array([-0.2, 0.1, 1.1, 0.7], F32))


# -- more ops exporters emit ----------------------------------------------------------------------------
def test_shrink_hardmax_trilu():
    x = rand(3, 4, dtype=F32)
    x = np.where(np.abs(np.abs(x) - 0.4) < 0.05, 1.5 * x, x).astype(F32)  # away from the kinks at +-lambd
    check([node("Shrink", ["x"], lambd=0.4, bias=0.1)], {"x": x})
    separated = (RNG.permutation(12).reshape(3, 4) / 4 - 1.4).astype(F32)  # FD steps never flip the arg-max
    check([node("Hardmax", ["x"], ["h"]), node("Mul", ["h", "x"])], {"x": separated})
    check([node("Trilu", ["x", "k"], upper=0)], {"x": rand(2, 4, 5)}, consts={"k": np.array(1)})
    check([node("Trilu", ["x"])], {"x": rand(4, 3)})


def test_swish():
    try:
        check([node("Swish", ["x"], alpha=0.8)], {"x": rand(3, 4, dtype=F32)}, opset=24)
    except ort.capi.onnxruntime_pybind11_state.NotImplemented:
        pytest.skip("onnxruntime has no Swish kernel")


@pytest.mark.parametrize("zeros", [0, 1, 2])
def test_reduce_prod_exact_with_zeros(zeros):
    x = rand(2, 3, 4)
    if zeros:
        x[0, 1, :zeros] = 0.0  # FD across a zero is still exact: the product is linear in each element
        x[1, 2, 3] = 0.0
    check([node("ReduceProd", ["x", "ax"], keepdims=0)], {"x": x}, consts={"ax": np.array([2])})


@pytest.mark.parametrize("case", ["plain", "strided_padded", "ceil", "p1"])
def test_lp_pool(case):
    attrs = {"plain": dict(kernel_shape=[2, 2]),
             "strided_padded": dict(kernel_shape=[3, 2], strides=[2, 1], pads=[1, 0, 1, 1]),
             "ceil": dict(kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1), "p1": dict(kernel_shape=[2, 3], p=1)}[case]
    x = rand(1, 2, 5, 6, dtype=F32)
    x = np.where(np.abs(x) < 0.1, 0.3, x).astype(F32)
    check([node("LpPool", ["x"], **attrs)], {"x": x}, opset=18, step=1e-3)


@pytest.mark.parametrize("p", [1, 2])
def test_lp_normalization(p):
    x = rand(2, 3, 4)
    x = np.where(np.abs(x) < 0.05, 0.3, x)
    check([node("LpNormalization", ["x"], axis=1, p=p)], {"x": x})


def test_lp_normalization_constant_std_holds_the_norm():
    torch = pytest.importorskip("torch")
    x = rand(2, 5)
    model = make_model([node("LpNormalization", ["x"], axis=-1, p=2)], {"x": x})
    converted = lrp_onnx.convert(model, rules="gradient", source="x", seed_input=True,
                                 overrides={"LpNormalization": "constant_std"})
    seed = RNG.standard_normal(x.shape)
    got = _session(converted).run(["lrp_relevance"], {"x": x, "lrp_seed": seed})[0]
    tx = torch.tensor(x, requires_grad=True)
    ((tx / tx.norm(dim=-1, keepdim=True).detach()) * torch.tensor(seed)).sum().backward()
    assert np.allclose(got, x * tx.grad.numpy())


def test_refusals_name_the_reason():
    x = rand(1, 2, 4, 5, dtype=F32)
    resize = make_model([node("Resize", ["x", "", "", "sz"], mode="linear", keep_aspect_ratio_policy="not_larger")],
                        {"x": x}, consts={"sz": np.array([1, 2, 7, 3])}, opset=19)
    with pytest.raises(LRPError, match="keep_aspect_ratio_policy=not_larger"):
        lrp_onnx.convert(resize, rules="gradient", source="x", seed_input=True)
    conv = make_model([node("Conv", ["x", "w"])], {"x": x, "w": rand(3, 2, 1, 1, dtype=F32)})
    with pytest.raises(LRPError, match="relevance-carrying weight"):
        lrp_onnx.convert(conv, rules="gradient", source=["x", "w"], seed_input=True)


def test_pow_exponent_gradient_at_zero_base_is_zero_as_torch():
    torch = pytest.importorskip("torch")
    x, p = np.array([0.0, 2.0, 0.0]), np.array([1.5, 0.5, 2.0])
    model = make_model([node("Pow", ["x", "p"])], {"x": x, "p": p})
    converted = lrp_onnx.convert(model, rules="gradient", source=["x", "p"], seed_input=True)
    got = _session(converted).run(["lrp_relevance_1"], {"x": x, "p": p, "lrp_seed": np.ones(3)})[0]
    tx, tp = torch.tensor(x), torch.tensor(p, requires_grad=True)
    torch.pow(tx, tp).sum().backward()
    assert np.allclose(got, p * tp.grad.numpy()) and np.all(np.isfinite(got))


DFTS = {
    "complex": dict(shape=(2, 6, 2)),
    "real": dict(shape=(2, 6, 1)),
    "real_onesided": dict(shape=(2, 6, 1), onesided=1),
    "inverse": dict(shape=(2, 5, 2), inverse=1),
    "longer": dict(shape=(2, 5, 1), length=8),
    "shorter_onesided": dict(shape=(2, 7, 1), length=5, onesided=1),
}


@pytest.mark.parametrize("case", list(DFTS))
@pytest.mark.parametrize("opset", [17, 20])
def test_dft(case, opset):
    """FNet-style Fourier mixing: DFT is linear; its adjoint is a scaled inverse DFT."""
    cfg = DFTS[case]
    x = rand(*cfg["shape"], dtype=F32)
    attrs = {k: cfg[k] for k in ("inverse", "onesided") if k in cfg}
    consts = {}
    inputs = ["x", ""]
    if "length" in cfg:
        consts["L"] = np.array(cfg["length"])
        inputs[1] = "L"
    if opset >= 20:
        consts["ax"] = np.array(1)
        inputs.append("ax")
    else:
        attrs["axis"] = 1
    check([node("DFT", inputs, **attrs)], {"x": x}, consts=consts, opset=opset)


@pytest.mark.parametrize("axes", [None, [1], [2, 3]])
def test_mean_variance_normalization(axes):
    attrs = {} if axes is None else {"axes": axes}
    check([node("MeanVarianceNormalization", ["x"], **attrs)], {"x": rand(2, 3, 4, 2, dtype=F32)}, step=1e-3)


# -- LRN (local response normalization: AlexNet, Inception v1, ZFNet) --------------------------------------
def _lrn_denominator(x, size, alpha, bias):
    """numpy: bias + alpha / size * sum of x^2 over channels [c - floor((size-1)/2), c + ceil((size-1)/2)]."""
    lo, hi = (size - 1) // 2, size - 1 - (size - 1) // 2
    sq = x.astype(np.float64) ** 2
    s = np.zeros_like(sq)
    for c in range(x.shape[1]):
        s[:, c] = sq[:, max(0, c - lo):min(x.shape[1], c + hi + 1)].sum(axis=1)
    return bias + alpha / size * s


@pytest.mark.parametrize("size", [1, 3, 5])
def test_lrn(size):
    """alpha 0.5 (not the default 1e-4) so that the statistic's own gradient term matters. (onnxruntime's
    kernel takes odd sizes only.)"""
    check([node("LRN", ["x"], size=size, alpha=0.5, beta=0.75, bias=1.5)], {"x": rand(2, 6, 3, 2, dtype=F32)},
          step=1e-3, tol=2e-3)


@pytest.mark.parametrize("size", [3, 5])
def test_lrn_attnlrp_holds_the_statistic_constant(size):
    """AttnLRP's norm rule: relevance = x * seed / d^beta with d the window statistic, in numpy."""
    x = rand(2, 6, 3, 2, dtype=F32)
    model = make_model([node("LRN", ["x"], size=size, alpha=0.5, beta=0.75, bias=1.5)], {"x": x})
    converted = lrp_onnx.convert(model, rules="attnlrp", source="x", seed_input=True)
    seed = np.random.default_rng(2).standard_normal(x.shape).astype(F32)
    values = dict(zip([o.name for o in _session(converted).get_outputs()],
                      _session(converted).run(None, {"x": x, "lrp_seed": seed})))
    expected = x * seed / _lrn_denominator(x, size, 0.5, 1.5) ** 0.75
    assert rel_err(values["lrp_relevance"].astype(np.float64), expected) <= 1e-5
    np.testing.assert_allclose(values["y"], x / _lrn_denominator(x, size, 0.5, 1.5) ** 0.75, rtol=1e-5)
