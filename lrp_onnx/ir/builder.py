"""Emits the nodes of the backward graph: fresh names, small constants, and the few tensor idioms
(un-broadcasting, transposes, reshapes) that many VJP rules share."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .graph import GraphView, TensorInfo

PREFIX = "lrp/"


class Builder:
    def __init__(self, view: GraphView):
        self.view = view
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._count = 0
        self._const_cache: dict = {}
        used = set(view.producer) | set(view.initializers) | set(view.graph_inputs)
        self._used = used
        self.scope = "bwd"
        self.opset = next((o.version for o in view.model.opset_import if o.domain in ("", "ai.onnx")), 0)

    # -- naming -----------------------------------------------------------------------------
    def fresh(self, hint: str) -> str:
        while True:
            self._count += 1
            name = f"{PREFIX}{self.scope}/{hint}_{self._count}"
            if name not in self._used:
                self._used.add(name)
                return name

    # -- nodes ------------------------------------------------------------------------------
    def op(self, op_type: str, inputs: list, n_out: int = 1, domain: str = "", like: str | None = None,
           dtype: int | None = None, shape=None, **attrs):
        """Add a node; return its output name (or list of names if n_out > 1).

        `like`/`dtype`/`shape` record what the output looks like, so later rules can ask for ranks."""
        outs = [self.fresh(op_type) for _ in range(n_out)]
        node = helper.make_node(op_type, [i if i is not None else "" for i in inputs], outs,
                                name=self.fresh(op_type + "_node"), domain=domain, **attrs)
        self.nodes.append(node)
        if like is not None:
            self.view.info[outs[0]] = TensorInfo(self.view.dtype(like), self.view.shape(like))
        elif dtype is not None or shape is not None:
            self.view.info[outs[0]] = TensorInfo(dtype, shape)
        return outs[0] if n_out == 1 else outs

    def const(self, value, dtype=None) -> str:
        arr = np.asarray(value, dtype=dtype)
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        if key in self._const_cache:
            return self._const_cache[key]
        name = self.fresh("const")
        self.initializers.append(numpy_helper.from_array(arr, name))
        self.view.info[name] = TensorInfo(helper.np_dtype_to_tensor_dtype(arr.dtype), list(arr.shape))
        self.view.constant_values[name] = arr
        self._const_cache[key] = name
        return name

    def scalar_like(self, value: float, like: str) -> str:
        """A scalar constant of `like`'s element type."""
        dt = self.view.dtype(like) or onnx.TensorProto.FLOAT
        return self.const(np.array(value, dtype=helper.tensor_dtype_to_np_dtype(dt)))

    def ints(self, values) -> str:
        return self.const(np.asarray(values, dtype=np.int64))

    # -- idioms -----------------------------------------------------------------------------
    def mul(self, a, b, like=None):
        return self.op("Mul", [a, b], like=like or a)

    def add(self, a, b, like=None):
        return self.op("Add", [a, b], like=like or a)

    def neg(self, a):
        return self.op("Neg", [a], like=a)

    def scale(self, g: str, factor: float) -> str:
        if factor == 1.0:
            return g
        return self.mul(g, self.scalar_like(factor, g), like=g)

    def sum(self, terms: list[str]) -> str:
        if len(terms) == 1:
            return terms[0]
        if len(terms) == 2:
            return self.add(terms[0], terms[1])
        return self.op("Sum", terms, like=terms[0])

    def shape_of(self, t: str) -> str:
        return self.op("Shape", [t], dtype=onnx.TensorProto.INT64, shape=[self.view.rank(t)])

    def zeros_like(self, t: str) -> str:
        dt = self.view.dtype(t) or onnx.TensorProto.FLOAT
        zero = helper.make_tensor("value", dt, [1], [0])
        return self.op("ConstantOfShape", [self.shape_of(t)], like=t, value=zero)

    def reshape_like(self, g: str, t: str) -> str:
        # allowzero: a 0 in t's shape is a size (an MoE expert that got no tokens), not "copy this dim"
        zero_is_size = {"allowzero": 1} if self.opset >= 14 else {}
        return self.op("Reshape", [g, self.shape_of(t)], dtype=self.view.dtype(g), shape=self.view.shape(t),
                       **zero_is_size)

    def reshape_leading(self, t: str, g: str, last, shape=None) -> str:
        """`t` reshaped to g's shape with its last axis replaced by `last` (an int): a gradient shaped
        from another backward tensor, never by a Shape of a forward tensor (that would keep it alive until
        the backward). allowzero as in reshape_like."""
        zero_is_size = {"allowzero": 1} if self.opset >= 14 else {}
        leading = self.op("Slice", [self.shape_of(g), self.ints([0]), self.ints([-1])])
        return self.op("Reshape", [t, self.op("Concat", [leading, self.ints([last])], axis=0)],
                       dtype=self.view.dtype(t), shape=shape, **zero_is_size)

    def cast_like(self, g: str, t: str) -> str:
        dt_g, dt_t = self.view.dtype(g), self.view.dtype(t)
        if dt_g is None or dt_t is None or dt_g == dt_t:
            return g
        return self.op("Cast", [g], to=dt_t, dtype=dt_t, shape=self.view.shape(g))

    def transpose_last2(self, t: str) -> str:
        r = self.view.rank(t)
        if r is None or r < 2:
            raise ValueError(f"need a known rank >= 2 for {t}")
        perm = list(range(r - 2)) + [r - 1, r - 2]
        s = self.view.shape(t)
        return self.op("Transpose", [t], perm=perm, dtype=self.view.dtype(t),
                       shape=s[:-2] + [s[-1], s[-2]])

    def reduce_sum(self, g: str, axes: list[int], keepdims: int) -> str:
        s = self.view.shape(g)
        if s is not None:
            r = len(s)
            norm = {a % r for a in axes}
            new = [d if i not in norm else 1 for i, d in enumerate(s)] if keepdims else \
                [d for i, d in enumerate(s) if i not in norm]
        else:
            new = None
        return self.op("ReduceSum", [g, self.ints(axes)], keepdims=keepdims,
                       dtype=self.view.dtype(g), shape=new)

    def unbroadcast(self, g: str, target: str) -> str:
        """Sum `g` (the gradient of a broadcast result) down to the shape of `target`."""
        gs, ts = self.view.shape(g), self.view.shape(target)
        if gs is None or ts is None:
            return self._unbroadcast_dynamic(g, target)
        lead = len(gs) - len(ts)
        if lead < 0:
            raise ValueError(f"cannot unbroadcast {g} to higher-rank {target}")
        if lead:
            g = self.reduce_sum(g, list(range(lead)), keepdims=0)
            gs = self.view.shape(g)
        axes = []
        for i, (gd, td) in enumerate(zip(gs, ts)):
            if td == 1 and gd != 1:
                axes.append(i)
            elif td == gd and td is not None:
                continue
            elif isinstance(td, int) and isinstance(gd, int):
                continue  # equal static sizes handled above; differing non-1 sizes cannot broadcast
            elif isinstance(td, int) and td != 1:
                continue  # target has a static size > 1: no broadcast along it
            else:
                return self._unbroadcast_dynamic(g, target)
        if axes:
            g = self.reduce_sum(g, axes, keepdims=1)
        return g

    def _unbroadcast_dynamic(self, g: str, target: str) -> str:
        """Runtime un-broadcast: sum over the axes where the target has size 1 and g does not."""
        rg, rt = self.view.rank(g), self.view.rank(target)
        if rg is None or rt is None:
            raise ValueError(f"the rank of '{g}' or '{target}' is unknown")
        if rg > rt:
            g = self.reduce_sum(g, list(range(rg - rt)), keepdims=0)
        if rt == 0:
            return g
        shape_g, shape_t = self.shape_of(g), self.shape_of(target)
        differs = self.op("Not", [self.op("Equal", [shape_g, shape_t])])
        # axes of a static length (OpenVINO and TensorRT need one): axis i where the sizes differ, else
        # a size-1 axis rt + i appended for the purpose (summing over it changes nothing), then dropped
        extra = self.ints(list(range(rt, 2 * rt)))
        padded = self.op("Unsqueeze", [g, extra], dtype=self.view.dtype(g))
        axes = self.op("Where", [differs, self.ints(list(range(rt))), extra], dtype=onnx.TensorProto.INT64, shape=[rt])
        summed = self.op("ReduceSum", [padded, axes], keepdims=1, dtype=self.view.dtype(g))
        return self.op("Squeeze", [summed, extra], dtype=self.view.dtype(g), shape=self.view.shape(target))
