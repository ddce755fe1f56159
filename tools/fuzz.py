"""Property-based test of the engine on random graphs.

    python -m tools.fuzz --n 2000 [--seed S] [--dump DIR]     # tally; exit 1 on any failure
    python -m tools.fuzz --graph S:I --dump DIR                # one graph (as a failure names it)

Each graph is a random chain of steps drawn from VOCABULARY (elementwise nonlinearities, products
of two relevance-carrying tensors, norms, softmax, routing ops, convs, pools, resizes), applied to
one float input `x`. Checks:
  gradient mode: x ⊙ (Jᵀ seed) from the converted graph equals x ⊙ the central finite differences
                 of the ORIGINAL graph, in float64 (onnxruntime; the ONNX reference evaluator for
                 ops onnxruntime has no float64 kernel for, e.g. Conv);
  attnlrp:       the conservation audit's invariants: identity units pass relevance unchanged,
                 uniform units give each operand 1/N, constant-std norms without bias and linear
                 units under the gradient rule conserve (lrp_onnx.check.conservation).
A step whose ops do not convert today in gradient mode is left out automatically (see available());
adding an op is one entry in VOCABULARY.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
MAX_NUMEL = 192
FD_STEP = 1e-4                  # central differences in float64, extrapolated (Richardson)
KINK_MARGIN = 1e-2              # redraw x when a kink (Relu at 0, Max tie) is closer than this
TOL = {np.float64: 1e-6, np.float32: 1e-3}  # relative L2 error of the relevance vs finite differences
AUDIT_RTOL = {np.float64: 1e-7, np.float32: 1e-4}  # the identity rule's 1e-10 stabilizer


@dataclass
class T:
    name: str
    shape: tuple


class Gen:
    """A graph under construction; every builder adds nodes and returns the new path tensor."""

    def __init__(self, rng: np.random.Generator, dtype):
        self.rng, self.dtype = rng, dtype
        self.nodes, self.inits, self.k = [], [], 0
        self.path: list[T] = []            # relevance-carrying tensors so far
        self.kinks: list[tuple] = []       # (a, b or None): |a - b| (or |a|) must stay away from 0
        self.ops: Counter = Counter()      # op types written

    def const(self, value, dtype=None) -> str:
        self.k += 1
        name = f"c{self.k}"
        self.inits.append(numpy_helper.from_array(np.asarray(value, dtype or self.dtype), name))
        return name

    def ints(self, values) -> str:
        return self.const(np.asarray(values, np.int64), np.int64)

    def weight(self, *shape, scale=None) -> str:
        scale = scale if scale is not None else 1.0 / math.sqrt(max(1, shape[-1] if len(shape) else 1))
        return self.const(self.rng.standard_normal(shape) * scale)

    def op(self, op_type, inputs, shape, n_out=1, **attrs):
        self.k += 1
        outs = [f"t{self.k}_{i}" for i in range(n_out)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, name=f"n{self.k}_{op_type}", **attrs))
        self.ops[op_type] += 1
        if n_out > 1:
            return [T(o, s) for o, s in zip(outs, shape)]
        t = T(outs[0], tuple(shape))
        return t

    def branch(self, x: T) -> T:
        """A second relevance-carrying operand of x's shape: an elementwise function of x."""
        kind = self.rng.integers(4)
        if kind == 0:
            return self.op("Tanh", [x.name], x.shape)
        if kind == 1:
            return self.op("Sigmoid", [x.name], x.shape)
        if kind == 2:
            return self.op("Mul", [x.name, self.const(self.rng.uniform(0.5, 1.5))], x.shape)
        return self.op("Add", [x.name, self.weight(x.shape[-1], scale=0.5)], x.shape)

    def partner(self, x: T) -> T:
        """An earlier path tensor of x's shape, or a fresh branch of x."""
        same = [t for t in self.path if t.shape == x.shape and t.name != x.name]
        if same and self.rng.random() < 0.5:
            return same[self.rng.integers(len(same))]
        return self.branch(x)

    def positive(self, x: T) -> T:
        """x*x + c > 0, or sigmoid(x) + c."""
        if self.rng.random() < 0.5:
            sq = self.op("Mul", [x.name, x.name], x.shape)
        else:
            sq = self.op("Sigmoid", [x.name], x.shape)
        return self.op("Add", [sq.name, self.const(self.rng.uniform(0.3, 1.0))], x.shape)


def numel(shape) -> int:
    return int(np.prod(shape, dtype=np.int64)) if shape else 1


# -- the vocabulary ------------------------------------------------------------------------------
def _unary(op):
    return lambda g, x: g.op(op, [x.name], x.shape)


def _relu(g, x):
    g.kinks.append((x.name, None))
    return g.op("Relu", [x.name], x.shape)


def _exp(g, x):
    return g.op("Exp", [g.op("Mul", [x.name, g.const(0.5)], x.shape).name], x.shape)


def _log(g, x):
    return g.op("Log", [g.positive(x).name], x.shape)


def _pow(g, x):
    if g.rng.random() < 0.5:
        return g.op("Pow", [x.name, g.const(float(g.rng.choice([2.0, 3.0])))], x.shape)
    return g.op("Pow", [g.positive(x).name, g.const(float(g.rng.choice([0.5, -0.5, 1.5])))], x.shape)


def _sqrt(g, x):
    return g.op("Sqrt", [g.positive(x).name], x.shape)


def _reciprocal(g, x):
    return g.op("Reciprocal", [g.positive(x).name], x.shape)


def _div_path(g, x):
    return g.op("Div", [x.name, g.positive(g.partner(x)).name], x.shape)


def _mul_const(g, x):
    c = g.const(g.rng.uniform(0.5, 1.5)) if g.rng.random() < 0.5 else g.weight(x.shape[-1], scale=1.0)
    return g.op("Mul", [x.name, c], x.shape)


def _add_const(g, x):
    return g.op("Add", [x.name, g.weight(*x.shape[-min(len(x.shape), 2):], scale=0.5)], x.shape)


def _sub(g, x):
    return g.op("Sub", [x.name, g.partner(x).name], x.shape)


def _mul2(g, x):
    other = g.partner(x)
    if len(x.shape) >= 2 and g.rng.random() < 0.4:  # a broadcast operand: reduced over one axis
        axis = int(g.rng.integers(len(x.shape)))
        shape = tuple(1 if a == axis else d for a, d in enumerate(x.shape))
        other = g.op("ReduceMean", [other.name], shape, axes=[axis], keepdims=1)
    return g.op("Mul", [x.name, other.name], x.shape)


def _matmul2(g, x):
    if len(x.shape) < 2:
        return None
    *lead, m, n = x.shape
    other = g.partner(x)
    perm = list(range(len(lead))) + [len(lead) + 1, len(lead)]
    t = g.op("Transpose", [other.name], (*lead, n, m), perm=perm)
    y = g.op("MatMul", [x.name, t.name], (*lead, m, m))
    return g.op("Mul", [y.name, g.const(1.0 / math.sqrt(n))], y.shape)


def _matmul_w(g, x):
    k = int(g.rng.integers(2, 6))
    return g.op("MatMul", [x.name, g.weight(x.shape[-1], k)], (*x.shape[:-1], k))


def _gemm(g, x):
    if len(x.shape) != 2:
        return None
    m, n = x.shape
    k = int(g.rng.integers(2, 6))
    trans_b = int(g.rng.integers(2))
    w = g.weight(*((k, n) if trans_b else (n, k)))
    inputs = [x.name, w] + ([g.weight(k, scale=0.5)] if g.rng.random() < 0.5 else [])
    return g.op("Gemm", inputs, (m, k), transB=trans_b, alpha=float(g.rng.uniform(0.5, 1.5)), beta=1.0)


def _layernorm(g, x):
    axis = -1 if len(x.shape) < 2 or g.rng.random() < 0.7 else -2
    dims = x.shape[axis:]
    if numel(dims) < 3:
        return None
    inputs = [x.name, g.const(1 + 0.2 * g.rng.standard_normal(dims))]
    if g.rng.random() < 0.5:
        inputs.append(g.const(0.3 * g.rng.standard_normal(dims)))
    return g.op("LayerNormalization", inputs, x.shape, axis=axis, epsilon=1e-3)


def _layernorm_written(g, x):
    if x.shape[-1] < 3:
        return None
    reduced = (*x.shape[:-1], 1)
    mean = g.op("ReduceMean", [x.name], reduced, axes=[-1], keepdims=1)
    a = g.op("Sub", [x.name, mean.name], x.shape)
    if g.rng.random() < 0.5:
        sq = g.op("Pow", [a.name, g.const(2.0)], x.shape)
    else:
        sq = g.op("Mul", [a.name, a.name], x.shape)
    var = g.op("ReduceMean", [sq.name], reduced, axes=[-1], keepdims=1)
    std = g.op("Sqrt", [g.op("Add", [var.name, g.const(1e-3)], reduced).name], reduced)
    y = g.op("Div", [a.name, std.name], x.shape)
    y = g.op("Mul", [y.name, g.const(1 + 0.2 * g.rng.standard_normal(x.shape[-1]))], x.shape)
    if g.rng.random() < 0.5:
        y = g.op("Add", [y.name, g.weight(x.shape[-1], scale=0.3)], x.shape)
    return y


def _rmsnorm_written(g, x):
    if x.shape[-1] < 3:
        return None
    reduced = (*x.shape[:-1], 1)
    ms = g.op("ReduceMean", [g.op("Pow", [x.name, g.const(2.0)], x.shape).name], reduced, axes=[-1], keepdims=1)
    rms = g.op("Sqrt", [g.op("Add", [ms.name, g.const(1e-3)], reduced).name], reduced)
    y = g.op("Mul", [x.name, g.op("Reciprocal", [rms.name], reduced).name], x.shape)
    return g.op("Mul", [y.name, g.const(1 + 0.2 * g.rng.standard_normal(x.shape[-1]))], x.shape)


def _softmax(g, x):
    axis = int(g.rng.integers(-len(x.shape), len(x.shape)))
    return g.op("Softmax", [x.name], x.shape, axis=axis)


def _factor_shape(rng, n, rank):
    primes, m, p = [], n, 2
    while m > 1:
        while m % p == 0:
            primes.append(p)
            m //= p
        p += 1
    dims = [1] * rank
    for q in primes:
        dims[int(rng.integers(rank))] *= q
    return tuple(dims)


def _reshape(g, x):
    shape = _factor_shape(g.rng, numel(x.shape), int(g.rng.integers(1, 5)))
    spec = list(shape)
    if g.rng.random() < 0.3:
        spec[int(g.rng.integers(len(spec)))] = -1
    return g.op("Reshape", [x.name, g.ints(spec)], shape)


def _transpose(g, x):
    if len(x.shape) < 2:
        return None
    perm = [int(p) for p in g.rng.permutation(len(x.shape))]
    return g.op("Transpose", [x.name], tuple(x.shape[p] for p in perm), perm=perm)


def _slice(g, x, step=1):
    axes = [a for a, d in enumerate(x.shape) if d >= 2]
    if not axes:
        return None
    axis = int(g.rng.choice(axes))
    d = x.shape[axis]
    start = int(g.rng.integers(0, d - 1))
    end = int(g.rng.integers(start + 1, d + 1))
    if step < 0:
        start, end = end - 1, start - 1 if start > 0 else -d - 1
    size = len(range(*slice(start, end, step).indices(d)))
    shape = tuple(size if a == axis else s for a, s in enumerate(x.shape))
    neg = g.rng.random() < 0.3 and step > 0
    starts = start - d if neg else start
    ends = end - d - (1 if end == d else 0) if neg and end < d else end
    inputs = [x.name, g.ints([starts]), g.ints([ends]), g.ints([axis])]
    if step != 1 or g.rng.random() < 0.3:
        inputs.append(g.ints([step]))
    return g.op("Slice", inputs, shape)


def _gather(g, x, index_rank=1):
    axis = int(g.rng.integers(len(x.shape)))
    d = x.shape[axis]
    if index_rank == 0:
        idx = g.const(np.array(int(g.rng.integers(-d, d))), np.int64)
        shape = x.shape[:axis] + x.shape[axis + 1:]
        if not shape:
            return None
    else:
        ishape = (int(g.rng.integers(1, d + 2)),) if index_rank == 1 else (2, int(g.rng.integers(1, d + 1)))
        idx = g.const(g.rng.integers(-d, d, size=ishape), np.int64)
        shape = x.shape[:axis] + ishape + x.shape[axis + 1:]
    return g.op("Gather", [x.name, idx], shape, axis=axis)


def _if_rank(g, x):
    """DeBERTa's form: indices from an If whose branches differ in rank (r and r + 1), squeezed and
    expanded back to x's shape (rank r either way: shape inference gives up, lrp_onnx/ir/ranks.py does
    not), gathered from x and added to it."""
    r, last = len(x.shape), x.shape[-1]
    if r < 2:
        return None
    idx = g.rng.integers(0, last, size=(1,) + tuple(x.shape[1:]))

    def branch(name, value):
        out = f"{name}_{g.k}"
        node = helper.make_node("Constant", [], [out], value=numpy_helper.from_array(value.astype(np.int64)))
        info = helper.make_tensor_value_info(out, TensorProto.INT64, list(value.shape))
        return helper.make_graph([node], name, [], [info])

    size = g.op("Shape", [x.name], (r,), start=0, end=1)
    cond = g.op("Equal", [size.name, g.ints([x.shape[0]])], (1,))
    flag = g.op("Squeeze", [cond.name, g.ints([0])], ())
    picked = g.op("If", [flag.name], (), then_branch=branch("then", idx), else_branch=branch("else", idx[None]))
    squeezed = g.op("Squeeze", [picked.name, g.ints([0])], ())
    index = g.op("Expand", [squeezed.name, g.op("Shape", [x.name], (r,)).name], x.shape)
    gathered = g.op("GatherElements", [x.name, index.name], x.shape, axis=r - 1)
    return g.op("Add", [x.name, gathered.name], x.shape)


def _concat(g, x):
    axis = int(g.rng.integers(len(x.shape)))
    other = g.partner(x)
    shape = tuple(d * 2 if a == axis else d for a, d in enumerate(x.shape))
    inputs = [x.name, other.name] if g.rng.random() < 0.5 else [other.name, x.name]
    return g.op("Concat", inputs, shape, axis=axis)


def _split(g, x):
    axes = [a for a, d in enumerate(x.shape) if d >= 2]
    if not axes:
        return None
    axis = int(g.rng.choice(axes))
    d = x.shape[axis]
    first = int(g.rng.integers(1, d))
    shapes = [tuple(s if a == axis else v for a, v in enumerate(x.shape)) for s in (first, d - first)]
    p0, p1 = g.op("Split", [x.name, g.ints([first, d - first])], shapes, n_out=2, axis=axis)
    if g.rng.random() < 0.5:
        return p0
    return g.op("Concat", [p1.name, p0.name], x.shape, axis=axis)


def _reduce(g, x):
    if len(x.shape) < 2:
        return None
    op = "ReduceSum" if g.rng.random() < 0.5 else "ReduceMean"
    axis = int(g.rng.integers(len(x.shape)))
    keep = int(g.rng.integers(2))
    shape = tuple(1 if a == axis else d for a, d in enumerate(x.shape)) if keep else \
        x.shape[:axis] + x.shape[axis + 1:]
    if op == "ReduceSum":
        return g.op(op, [x.name, g.ints([axis])], shape, keepdims=keep)
    return g.op(op, [x.name], shape, axes=[axis], keepdims=keep)


def _expand(g, x):
    axis = int(g.rng.integers(len(x.shape) + 1))
    shape = x.shape[:axis] + (1,) + x.shape[axis:]
    u = g.op("Unsqueeze", [x.name, g.ints([axis])], shape)
    big = tuple(3 if a == axis else d for a, d in enumerate(shape))
    return g.op("Expand", [u.name, g.ints(list(big))], big)


def _where(g, x):
    mask = g.const(g.rng.random(x.shape) < 0.5, np.bool_)
    other = g.partner(x) if g.rng.random() < 0.5 else T(g.const(0.0), ())
    return g.op("Where", [mask, x.name, other.name], x.shape)


def _spatial(x):
    return len(x.shape) == 4


def _conv(g, x):
    if not _spatial(x):
        return None
    n, c, h, w = x.shape
    k = int(g.rng.integers(1, 4))
    stride, pad, dil = int(g.rng.integers(1, 3)), int(g.rng.integers(0, 2)), int(g.rng.integers(1, 3))
    span = dil * (k - 1) + 1
    if span > min(h, w) + 2 * pad:
        return None
    group = c if c > 1 and g.rng.random() < 0.3 else 1
    m = group * int(g.rng.integers(1, 3))
    out = [(s + 2 * pad - span) // stride + 1 for s in (h, w)]
    inputs = [x.name, g.const(g.rng.standard_normal((m, c // group, k, k)) / math.sqrt(c // group * k * k))]
    if g.rng.random() < 0.5:
        inputs.append(g.weight(m, scale=0.3))
    return g.op("Conv", inputs, (n, m, *out), kernel_shape=[k, k], strides=[stride] * 2, pads=[pad] * 4,
                dilations=[dil] * 2, group=group)


def _pool(op):
    def build(g, x):
        if not _spatial(x):
            return None
        n, c, h, w = x.shape
        k = int(g.rng.integers(2, 4))
        stride, pad = int(g.rng.integers(1, 3)), int(g.rng.integers(0, 2)) if k > 1 else 0
        if k > min(h, w) + 2 * pad or pad >= k:
            return None
        out = [(s + 2 * pad - k) // stride + 1 for s in (h, w)]
        return g.op(op, [x.name], (n, c, *out), kernel_shape=[k, k], strides=[stride] * 2, pads=[pad] * 4)
    return build


def _global_pool(op):
    def build(g, x):
        if not _spatial(x):
            return None
        return g.op(op, [x.name], (*x.shape[:2], 1, 1))
    return build


def _resize(g, x):
    if not _spatial(x):
        return None
    mode = str(g.rng.choice(["nearest", "linear", "cubic"]))
    ctm = str(g.rng.choice(["half_pixel", "asymmetric", "align_corners", "pytorch_half_pixel"]))
    scale = float(g.rng.choice([2.0, 1.5]))
    out = [int(math.floor(s * scale)) for s in x.shape[2:]]
    return g.op("Resize", [x.name, "", g.const(np.array([1, 1, scale, scale]), np.float32)], (*x.shape[:2], *out),
                mode=mode, coordinate_transformation_mode=ctm)


def _pad(g, x):
    pads = [int(v) for v in g.rng.integers(0, 2, size=2 * len(x.shape))]
    shape = tuple(d + pads[a] + pads[a + len(x.shape)] for a, d in enumerate(x.shape))
    return g.op("Pad", [x.name, g.ints(pads)], shape)


def _tile(g, x):
    reps = [int(v) for v in g.rng.integers(1, 3, size=len(x.shape))]
    return g.op("Tile", [x.name, g.ints(reps)], tuple(d * r for d, r in zip(x.shape, reps)))


def _max2(g, x):
    other = g.partner(x)
    g.kinks.append((x.name, other.name))
    return g.op("Max", [x.name, other.name], x.shape)


def _clip(g, x):
    g.kinks.append((x.name, g.const(-1.0)))
    g.kinks.append((x.name, g.const(1.0)))
    return g.op("Clip", [x.name, g.const(-1.0), g.const(1.0)], x.shape)


@dataclass
class Step:
    build: Callable            # (Gen, T) -> T, or None where it does not apply to x
    double: bool = True        # onnxruntime has float64 kernels for every op it writes
    weight: float = 1.0


# name -> step. A step whose ops do not convert today in gradient mode is skipped (available()).
VOCABULARY: dict[str, Step] = {
    "tanh": Step(_unary("Tanh")),
    "sigmoid": Step(_unary("Sigmoid")),
    "relu": Step(_relu),
    "exp": Step(_exp),
    "log": Step(_log),
    "pow": Step(_pow),
    "sqrt": Step(_sqrt),
    "reciprocal": Step(_reciprocal),
    "erf": Step(_unary("Erf"), double=False),
    "neg": Step(_unary("Neg"), weight=0.3),
    "mul_const": Step(_mul_const),
    "add_const": Step(_add_const),
    "sub": Step(_sub),
    "div": Step(_div_path),
    "mul": Step(_mul2, weight=2.0),
    "matmul": Step(_matmul2, weight=2.0),
    "matmul_weight": Step(_matmul_w),
    "gemm": Step(_gemm),
    "layernorm": Step(_layernorm),
    "layernorm_written": Step(_layernorm_written),
    "rmsnorm_written": Step(_rmsnorm_written),
    "softmax": Step(_softmax, weight=1.5),
    "reshape": Step(_reshape),
    "transpose": Step(_transpose),
    "slice": Step(_slice),
    "slice_step2": Step(lambda g, x: _slice(g, x, step=2)),
    "slice_reverse": Step(lambda g, x: _slice(g, x, step=-1)),
    "gather": Step(_gather),
    "gather_scalar": Step(lambda g, x: _gather(g, x, index_rank=0)),
    "gather_2d": Step(lambda g, x: _gather(g, x, index_rank=2)),
    "if_rank": Step(_if_rank, weight=0.5),
    "concat": Step(_concat),
    "split": Step(_split),
    "reduce": Step(_reduce),
    "expand": Step(_expand, weight=0.5),
    "where": Step(_where),
    "conv": Step(_conv, double=False, weight=2.0),
    "maxpool": Step(_pool("MaxPool")),
    "averagepool": Step(_pool("AveragePool"), double=False),
    "globalaveragepool": Step(_global_pool("GlobalAveragePool"), double=False),
    "globalmaxpool": Step(_global_pool("GlobalMaxPool"), double=False),  # onnxruntime: no float64 kernel
    "resize": Step(_resize, double=False),
    "pad": Step(_pad),
    "tile": Step(_tile),
    "max": Step(_max2),
    "clip": Step(_clip),
}


# -- building a graph from a plan ----------------------------------------------------------------
@dataclass
class Plan:
    input_shape: tuple
    steps: list                # (vocabulary name, seed)
    double: bool
    symbolic: bool = False     # the engine's graph declares x and y with named dims only (sizes unknown
                               # to shape inference, ranks kept) and the path's tensors without a shape


@dataclass
class Graph:
    model: onnx.ModelProto      # the graph as the engine gets it (float64 or float32)
    reference: onnx.ModelProto  # the same in float64, for finite differences
    steps: list                 # the vocabulary names that applied
    ops: Counter
    kinks: list
    dtype: type


def build(plan: Plan) -> Graph | None:
    dtype = np.float64 if plan.double else np.float32
    g = Gen(np.random.default_rng(0), dtype)
    x = T("x", tuple(plan.input_shape))
    g.path.append(x)
    applied = []
    for name, seed in plan.steps:
        g.rng = np.random.default_rng(seed)
        y = VOCABULARY[name].build(g, x)
        if y is None or numel(y.shape) > MAX_NUMEL or numel(y.shape) == 0 or not y.shape:
            continue
        applied.append(name)
        g.path.append(y)
        x = y
    if not applied:
        return None
    models = []
    for dt in (dtype, np.float64):
        elem = helper.np_dtype_to_tensor_dtype(np.dtype(dt))
        inits = [numpy_helper.from_array(numpy_helper.to_array(t).astype(dt), t.name)
                 if t.data_type in (TensorProto.FLOAT, TensorProto.DOUBLE) and t.name not in _float32_only(g) else t
                 for t in g.inits]
        symbolic = plan.symbolic and dt is dtype and not models
        in_shape = [f"x{a}" for a in range(len(plan.input_shape))] if symbolic else list(plan.input_shape)
        out_shape = [f"y{a}" for a in range(len(x.shape))] if symbolic else list(x.shape)
        graph = helper.make_graph(list(g.nodes) + [helper.make_node("Identity", [x.name], ["y"], name="out")], "fuzz",
                                  [helper.make_tensor_value_info("x", elem, in_shape)],
                                  [helper.make_tensor_value_info("y", elem, out_shape)], inits)
        if symbolic:  # the path's value infos typed without a shape, as some exporters write them
            graph.value_info.extend(helper.make_tensor_value_info(t.name, elem, None) for t in g.path if t.name != "x")
        models.append(helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=8))
    return Graph(models[0], models[1], applied, g.ops, g.kinks, dtype)


def _float32_only(g: Gen) -> set:
    """Constants that must stay float32 whatever the graph's type (Resize scales)."""
    return {n.input[2] for n in g.nodes if n.op_type == "Resize" and len(n.input) > 2 and n.input[2]}


def random_plan(rng: np.random.Generator, names: list[str], weights: np.ndarray) -> Plan:
    rank = int(rng.choice([2, 3, 4, 4]))
    shape = {2: lambda: (int(rng.integers(2, 6)), int(rng.integers(3, 7))),
             3: lambda: (int(rng.integers(1, 3)), int(rng.integers(2, 5)), int(rng.integers(3, 6))),
             4: lambda: (1, int(rng.integers(1, 4)), int(rng.integers(3, 6)), int(rng.integers(3, 6)))}[rank]()
    n_steps = int(rng.integers(2, 8))
    picks = rng.choice(len(names), size=n_steps, p=weights)
    steps = [(names[k], int(rng.integers(2 ** 31))) for k in picks]
    double = all(VOCABULARY[n].double for n, _ in steps)
    return Plan(shape, steps, double, symbolic=bool(rng.random() < 0.3))


# -- running -------------------------------------------------------------------------------------
_OPTIONS = None


def session(model: onnx.ModelProto):
    import onnxruntime as ort

    global _OPTIONS
    if _OPTIONS is None:
        _OPTIONS = ort.SessionOptions()
        _OPTIONS.log_severity_level = 4
        _OPTIONS.intra_op_num_threads = 1
        _OPTIONS.inter_op_num_threads = 1
        _OPTIONS.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        _OPTIONS.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(model.SerializeToString(), _OPTIONS, providers=["CPUExecutionProvider"])


class Reference:
    """The original graph in float64: onnxruntime where it has the kernels, else the ONNX reference
    evaluator. f(x) -> every output named in `outputs`."""

    def __init__(self, graph: Graph, outputs: list[str]):
        model = onnx.ModelProto()
        model.CopyFrom(graph.reference)
        for name in outputs[1:]:
            model.graph.output.append(onnx.ValueInfoProto(name=name))
        self.outputs = outputs
        if graph.dtype == np.float64:
            self.sess = session(model)
            self.run = lambda x: self.sess.run(outputs, {"x": x})
        elif any(n.op_type == "Resize" and any(a.name == "coordinate_transformation_mode" and a.s == b"align_corners"
                                                for a in n.attribute) for n in model.graph.node):
            # the ONNX reference evaluator's Resize disagrees with the spec (align_corners with scales:
            # 3 -> 4 samples at 0, 0.57, 1.14, 1.71 instead of 0, 0.67, 1.33, 2); onnxruntime follows it,
            # in float32 (it has no float64 Resize)
            own = onnx.ModelProto()
            own.CopyFrom(graph.model)
            for name in outputs[1:]:
                own.graph.output.append(onnx.ValueInfoProto(name=name))
            self.sess = session(own)
            self.run = lambda x: [o.astype(np.float64) for o in self.sess.run(outputs, {"x": np.asarray(x, np.float32)})]
        else:
            from onnx.reference import ReferenceEvaluator

            evaluator = ReferenceEvaluator(model, new_ops=[_erf64()])
            self.run = lambda x: evaluator.run(outputs, {"x": x})


def _erf64():
    """The reference evaluator's Erf rounds to float32 (np.vectorize(erf, otypes=["f"])): exact here."""
    from onnx.reference.ops._op import OpRunUnaryNum

    class Erf(OpRunUnaryNum):
        def _run(self, x):
            return (np.vectorize(math.erf, otypes=[np.float64])(x).astype(x.dtype),)
    return Erf


@dataclass
class Result:
    index: int
    seed: int
    graph: Graph | None = None
    status: str = "ok"          # ok | failed | refused (clean refusal naming the node) | rejected (overflow)
    kind: str = ""              # what failed
    detail: str = ""
    error: float = 0.0          # gradient-mode relative L2 error vs finite differences
    known: list = field(default_factory=list)   # audit flags of a known engine gap


def _kink_distance(values: dict, kinks: list, consts: dict) -> float:
    d = np.inf
    for a, b in kinks:
        va = values.get(a, consts.get(a))
        vb = 0.0 if b is None else values.get(b, consts.get(b))
        if va is None or vb is None:
            continue
        d = min(d, float(np.min(np.abs(np.asarray(va, np.float64) - vb))))
    return d


def check(graph: Graph, rng: np.random.Generator) -> tuple[str, str, float, list]:
    """(status, detail, gradient error, known audit flags) of one graph."""
    import lrp_onnx
    from lrp_onnx.check.conservation import AUDIT_OUTPUT, _unit_audit, instrument

    dtype = graph.dtype
    kink_names = sorted({t for pair in graph.kinks for t in pair if t and t != "x" and not t.startswith("c")})
    ref = Reference(graph, ["y"] + kink_names)
    consts = {t.name: numpy_helper.to_array(t) for t in graph.reference.graph.initializer}
    shape = tuple(d.dim_value for d in graph.reference.graph.input[0].type.tensor_type.shape.dim)
    for _ in range(10):  # a base point away from every kink
        x64 = rng.standard_normal(shape)
        values = dict(zip(ref.outputs, ref.run(x64)), x=x64)
        if not np.all(np.isfinite(values["y"])) or np.max(np.abs(values["y"])) > 1e4:
            return "rejected", "output not finite or > 1e4", 0.0, []
        if _kink_distance(values, graph.kinks, consts) > KINK_MARGIN:
            break
    else:
        return "rejected", "always near a kink", 0.0, []
    seed = rng.standard_normal(values["y"].shape)
    x = x64.astype(dtype)
    x64 = x.astype(np.float64)
    # gradient mode: x ⊙ Jᵀ seed against central differences of the original graph in float64
    try:
        converted = lrp_onnx.convert(graph.model, rules="gradient", seed_input=True)
    except lrp_onnx.UnsupportedOpsError as exc:  # a clean refusal that names the node: not a wrong result
        ranks = [p for p in exc.problems if "rank" in p and "unknown" in p]
        if ranks:  # every fuzz graph determines its ranks (shapes are static or named): refusing is a bug
            return "failed", "unknown rank: " + _refusal(ranks[0]), 0.0, []
        return "refused", "; ".join(_refusal(p) for p in exc.problems), 0.0, []
    except lrp_onnx.LRPError as exc:
        return "failed", f"gradient convert: {exc}", 0.0, []
    invalid = _invalid_index_accepted(graph.model)
    if invalid:
        return "failed", invalid, 0.0, []
    try:
        relevance = session(converted).run(["lrp_relevance"], {"x": x, "lrp_seed": seed.astype(dtype)})[0]
    except Exception as exc:
        return "failed", f"gradient run: {str(exc).splitlines()[0][:300]}", 0.0, []
    flat = x64.reshape(-1)
    fd = np.empty_like(flat)

    def central(i, h):
        step = np.zeros_like(flat)
        step[i] = h
        up, down = ref.run((flat + step).reshape(shape))[0], ref.run((flat - step).reshape(shape))[0]
        return float(np.sum(seed * (up - down))) / (2 * h)

    fd_coarse = np.empty_like(flat)
    for i in range(flat.size):  # Richardson: error O(h^4) from steps h and h/2; at two scales of h
        fd[i] = (4 * central(i, FD_STEP / 2) - central(i, FD_STEP)) / 3
        fd_coarse[i] = (4 * central(i, 5 * FD_STEP) - central(i, 10 * FD_STEP)) / 3
    expected = (flat * fd).reshape(shape)
    # relative to the relevance, or to a floor where it cancels to ~0 (a graph constant in x)
    scale = max(np.linalg.norm(expected) + 1e-4 * np.linalg.norm(flat) * np.linalg.norm(seed), 1e-30)
    error = float(np.linalg.norm(relevance.astype(np.float64) - expected) / scale)
    uncertainty = float(np.linalg.norm(flat * (fd - fd_coarse)) / scale)  # rounding noise of ill-conditioned graphs
    if not error <= TOL[dtype] + 2 * uncertainty:
        return "failed", (f"gradient mode: relative L2 error {error:.3g} vs finite differences "
                          f"(their own uncertainty {uncertainty:.2g})"), error, []
    # attnlrp: the conservation audit's invariants
    try:
        model, probe, _, rule_set, view, _ = instrument(graph.model, rules="attnlrp", seed_input=True)
    except lrp_onnx.UnsupportedOpsError as exc:  # e.g. a / b of two relevance-carrying tensors: no AttnLRP rule
        return "refused", "attnlrp: " + "; ".join(_refusal(p) for p in exc.problems), error, []
    except lrp_onnx.LRPError as exc:
        return "failed", f"attnlrp convert: {exc}", error, []
    try:
        vector = session(model).run([AUDIT_OUTPUT], {"x": x, "lrp_seed": seed.astype(dtype)})[0]
    except Exception as exc:
        return "failed", f"attnlrp run: {str(exc).splitlines()[0][:300]}", error, []
    units = [_unit_audit(view, rec, vector, rule_set, AUDIT_RTOL[dtype]) for rec in probe.records]
    known = [u for u in units if u.flagged and u.reason.startswith("nonlinear ")]
    wrong = [u for u in units if u.flagged and u not in known]
    if wrong:
        return "failed", "attnlrp audit: " + "; ".join(f"{u.unit} [{u.rule}]: {u.problem}" for u in wrong), error, \
            [u.op for u in known]
    return "ok", "", error, [u.op for u in known]


INDEX_INPUTS = {"Gather": 1, "GatherElements": 1, "GatherND": 1, "ScatterElements": 1, "ScatterND": 1}


def _invalid_index_accepted(model: onnx.ModelProto) -> str:
    """The graph made invalid: the constant indices of its first gather/scatter declared float (ONNX's
    schemas allow int32/int64 only; onnxruntime refuses such a model). The conversion must refuse it
    with an LRPError, not convert it. Returns what went wrong, or ""."""
    import lrp_onnx

    node = next((n for n in model.graph.node if n.op_type in INDEX_INPUTS and n.domain in ("", "ai.onnx")), None)
    if node is None:
        return ""
    name = node.input[INDEX_INPUTS[node.op_type]]
    bad = onnx.ModelProto()
    bad.CopyFrom(model)
    for k, t in enumerate(bad.graph.initializer):
        if t.name == name:
            bad.graph.initializer[k].CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float32), name))
            break
    else:
        return ""
    try:
        lrp_onnx.convert(bad, rules="gradient", seed_input=True)
    except lrp_onnx.LRPError:
        return ""
    except Exception as exc:  # noqa: BLE001
        return f"invalid graph: {node.op_type} with float indices crashed the conversion: {type(exc).__name__}: {exc}"[:300]
    return f"invalid graph accepted: {node.op_type} with float indices converted without an error"


def _refusal(problem: str) -> str:
    """A refusal without the node's name: "(ai.onnx::MatMul): MatMul on the relevance path ..." """
    return problem[problem.find("("):] if "(" in problem else problem


_AVAILABLE = None


def available() -> dict[str, str]:
    """name -> "" for steps that convert today in gradient mode, else why not (once per process)."""
    global _AVAILABLE
    if _AVAILABLE is None:
        import lrp_onnx

        _AVAILABLE = {}
        for name, step in VOCABULARY.items():
            why = "does not apply to the probe shapes"
            for k, shape in enumerate([(1, 2, 4, 4), (2, 3, 4), (3, 5)]):
                graph = build(Plan(shape, [(name, 1000 + k)], step.double))
                if graph is None:
                    continue
                try:
                    lrp_onnx.convert(graph.model, rules="gradient", seed_input=True)
                    why = ""
                except lrp_onnx.LRPError as exc:
                    why = str(exc).splitlines()[-1].strip()[:160]
                break
            _AVAILABLE[name] = why
    return _AVAILABLE


def plan_for(seed: int, index: int) -> Plan:
    names = [n for n, why in available().items() if not why]
    weights = np.array([VOCABULARY[n].weight for n in names])
    return random_plan(np.random.default_rng([seed, index]), names, weights / weights.sum())


def run_one(seed: int, index: int, plan: Plan | None = None) -> Result:
    plan = plan or plan_for(seed, index)
    graph = build(plan)
    result = Result(index, seed, graph)
    if graph is None:
        result.status = "rejected"
        return result
    try:
        status, detail, error, known = check(graph, np.random.default_rng([seed, index, 1]))
    except Exception as exc:  # an unexpected crash of the engine is a failure too
        status, detail, error, known = "failed", f"crash: {type(exc).__name__}: {str(exc)[:300]}", 0.0, []
    result.status, result.detail, result.error, result.known = status, detail, error, known
    result.kind = detail.split(":")[0] if status == "failed" else ""
    return result


def shrink(seed: int, index: int) -> Plan:
    """The shortest plan (steps removed one at a time) that still fails the same way."""
    plan = plan_for(seed, index)
    first = run_one(seed, index, plan)
    if first.status != "failed":
        return plan
    changed = True
    while changed and len(plan.steps) > 1:
        changed = False
        for k in range(len(plan.steps)):
            steps = plan.steps[:k] + plan.steps[k + 1:]
            trial = Plan(plan.input_shape, steps, all(VOCABULARY[n].double for n, _ in steps) and plan.double,
                         plan.symbolic)
            r = run_one(seed, index, trial)
            if r.status == "failed" and r.kind == first.kind:
                plan, changed = trial, True
                break
    return plan


def fuzz(n: int, seed: int = 0, progress=None) -> list[Result]:
    results = []
    for i in range(n):
        results.append(run_one(seed, i))
        if progress:
            progress(i, results[-1])
    return results


def tally(results: list[Result], elapsed: float | None = None) -> str:
    ok = [r for r in results if r.status == "ok"]
    failed = [r for r in results if r.status == "failed"]
    rejected = [r for r in results if r.status == "rejected"]
    refused = [r for r in results if r.status == "refused"]
    checked = ok + failed
    ops = Counter()
    steps = Counter()
    for r in checked:
        ops.update(r.graph.ops)
        steps.update(set(r.graph.steps))
    n64 = sum(1 for r in checked if r.graph.dtype == np.float64)
    named = sum(1 for r in checked if r.graph.model.graph.input[0].type.tensor_type.shape.dim[0].dim_param)
    lines = [f"graphs: {len(results)} ({len(checked)} checked: {n64} float64, {len(checked) - n64} float32, "
             f"{named} with named dims and shapeless value infos; "
             f"{len(refused)} refused; {len(rejected)} rejected: overflow or always near a kink)"
             + (f" in {elapsed:.0f} s" if elapsed is not None else ""),
             f"passed: {len(ok)}   failed: {len(failed)}   refused cleanly (node named): {len(refused)}"]
    errs = {dt: [r.error for r in ok if r.graph.dtype == dt] for dt in (np.float64, np.float32)}
    for dt, e in errs.items():
        if e:
            lines.append(f"gradient vs finite differences ({np.dtype(dt).name}): max relative L2 error "
                         f"{max(e):.2e}, median {np.median(e):.2e} (tolerance {TOL[dt]:g})")
    lines.append("ops covered (graphs): " + ", ".join(f"{k} {v}" for k, v in sorted(ops.items())))
    lines.append("steps covered (graphs): " + ", ".join(f"{k} {v}" for k, v in sorted(steps.items())))
    off = {k: v for k, v in available().items() if v}
    if off:
        lines.append("steps left out (do not convert today in gradient mode):")
        lines.extend(f"  {k}: {v}" for k, v in sorted(off.items()))
    known = Counter(op for r in results for op in r.known)
    if known:
        lines.append("attnlrp audit, known gap (issue 9 item 1; not counted as failures): nonlinear ops that get the "
                     "plain gradient although attnlrp gives activations the identity rule: "
                     + ", ".join(f"{k} in {sum(1 for r in results if k in r.known)} graphs" for k in sorted(known)))
    if refused:
        lines.append("refusals (a gap, not a wrong result):")
        lines.extend(f"  {n} graphs: {why}" for why, n in Counter(r.detail for r in refused).most_common())
    if failed:
        lines.append("FAILURES (reproduce: python -m tools.fuzz --graph SEED:INDEX --dump DIR):")
        for r in failed:
            lines.append(f"  {r.seed}:{r.index} [{' '.join(r.graph.steps)}] {r.detail}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.fuzz", description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=200, help="number of random graphs (default 200)")
    p.add_argument("--seed", type=int, default=0, help="seed of the run (default 0)")
    p.add_argument("--graph", metavar="SEED:INDEX", help="run only this graph (as a failure names it)")
    p.add_argument("--dump", metavar="DIR", help="write each failing graph, shrunk, as DIR/fuzz-SEED-INDEX.onnx")
    args = p.parse_args(argv)
    start = time.time()
    if args.graph:
        s, i = (int(v) for v in args.graph.split(":"))
        results = [run_one(s, i)]
    else:
        def progress(i, r):
            if r.status == "failed":
                print(f"  fail {r.seed}:{r.index}: {r.detail[:200]}", file=sys.stderr)
            if (i + 1) % 100 == 0:
                print(f"  {i + 1}/{args.n} graphs, {time.time() - start:.0f} s", file=sys.stderr)
        results = fuzz(args.n, args.seed, progress)
    print(tally(results, time.time() - start))
    failed = [r for r in results if r.status == "failed"]
    if args.dump and failed:
        os.makedirs(args.dump, exist_ok=True)
        for r in failed:
            plan = shrink(r.seed, r.index)
            graph = build(plan)
            path = os.path.join(args.dump, f"fuzz-{r.seed}-{r.index}.onnx")
            onnx.save(graph.model, path)
            print(f"wrote {path}: steps {' '.join(graph.steps)}, ops {dict(graph.ops)}, input {plan.input_shape}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
