"""Backward precision: for fp16/bf16 models the backward runs in fp32.

Relevance passes through dozens of layers, is divided by small activations (identity rule) and is
summed over long sequences: half precision overflows or loses it. After emission, this pass turns
the backward nodes to fp32: each half-precision forward tensor they read is cast once, their own
half-precision constants and casts become fp32. The forward stays as exported.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..ir.builder import Builder

HALF = {TensorProto.FLOAT16, TensorProto.BFLOAT16}
KEEP_HALF = "lrp/remat/half/"  # backward nodes left in half precision (exact: they only select values)


def promote_backward_to_fp32(b: Builder, backward: list[onnx.NodeProto]) -> None:
    view = b.view
    produced = {o for n in backward for o in n.output}
    own_constants = {t.name for t in b.initializers}
    casts: dict[str, str] = {}
    promoted: list[onnx.NodeProto] = []
    for t in b.initializers:
        if t.data_type in HALF:
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float32), t.name))
    for n in backward:
        if n.name.startswith(KEEP_HALF):  # a lookup in the model's own half-precision table (remat.py)
            promoted.append(n)
            continue
        for k, name in enumerate(n.input):
            if name and name not in produced and name not in own_constants and view.dtype(name) in HALF:
                if name not in casts:
                    casts[name] = f"lrp/fp32/{name}"
                    promoted.append(helper.make_node("Cast", [name], [casts[name]], name=f"lrp/fp32_cast/{name}",
                                                     to=TensorProto.FLOAT))
                n.input[k] = casts[name]
        for a in n.attribute:
            if a.name == "to" and a.i in HALF:
                a.i = TensorProto.FLOAT
            if a.type == onnx.AttributeProto.TENSOR and a.t.data_type in HALF:
                a.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(a.t).astype(np.float32), a.t.name))
        promoted.append(n)
    backward[:] = promoted


def is_half(view, tensor: str) -> bool:
    return view.dtype(tensor) in HALF
