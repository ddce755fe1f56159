"""The VJP registry: which function computes the vector-Jacobian product of which op.

A tiny module of its own so that the VJP modules (vjp/ops.py, vjp/elementwise.py, vjp/nn.py,
vjp/contrib.py) can all register without importing one another; importing `lrp_onnx.vjp`
imports them all, so every registration is in place once `lookup` is reachable."""
from __future__ import annotations

import functools

import onnx

VJPS: dict = {}
NORM_VJPS: dict = {}  # op type -> fn(b, node, gy, wants, constant_std)


def register(*op_types: str, domain: str = ""):
    def deco(fn):
        for op in op_types:
            VJPS[(domain, op)] = fn
        return fn
    return deco


def lookup(node: onnx.NodeProto):
    domain = "" if node.domain in ("", "ai.onnx") else node.domain
    return VJPS.get((domain, node.op_type))


def register_norm(*op_types: str):
    """Register a norm's VJP both as its exact gradient and for the constant_std rule (the norm's
    statistic, std or rms of its own input, held constant)."""
    def deco(fn):
        for op in op_types:
            NORM_VJPS[op] = fn
            for domain in ("", "com.microsoft"):  # onnxruntime registers some of these in both
                VJPS[(domain, op)] = functools.partial(fn, constant_std=False)
        return fn
    return deco
