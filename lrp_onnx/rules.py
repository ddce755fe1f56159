"""LRP rules in Gradient×Input form, and the rule sets that say which rule each unit gets.

A rule set is data: a mapping from a unit category (or an ONNX op type) to a rule name, the way
Zennit composites map layer types to rules. Categories come from analysis.classify:
  activation      elementwise nonlinearity, single op or written-out pattern (GELU, SiLU, tanh...)
  gate            an activation whose output gates another branch by a product (gated MLPs)
  product         Mul/MatMul/Einsum/Gemm of two or more relevance-carrying tensors
  norm            LayerNormalization / RMSNormalization ops
  norm_scale      the std/rms factor of a written-out LayerNorm/RMSNorm
  attention_probs a Softmax whose output weights a relevance-carrying value tensor
  router          a Softmax whose (top-k) weights scale the experts' outputs of an MoE block
  softmax         any other Softmax
  fake_quantization  QuantizeLinear->DequantizeLinear on activations (QDQ models)
  softcap         c*tanh(x/c) logit soft-capping (Gemma): plain gradient, as LXT leaves it
Unlisted categories get "gradient".
"""
from __future__ import annotations

import fnmatch

from .analysis import Unit
from .builder import Builder
from .vjp import NORM_VJPS, lookup
from .vjp_contrib import activation_input

RULE_SETS: dict[str, dict[str, str]] = {
    "gradient": {"fake_quantization": "straight_through"},
    "attnlrp": {
        "fake_quantization": "straight_through",
        "activation": "identity",
        "product": "uniform",
        "norm": "constant_std",
        "norm_scale": "constant",
    },
    "cp-lrp": {
        "fake_quantization": "straight_through",
        "gate": "constant",
        "activation": "identity",
        "product": "uniform",
        "norm": "constant_std",
        "norm_scale": "constant",
        "attention_probs": "constant",
        "router": "constant",
    },
}

RULE_DOCS = {
    "gradient": "exact local Jacobian (plain Gradient×Input)",
    "identity": "local Jacobian f(x)/(x+1e-10): relevance passes through unchanged",
    "uniform": "gradient divided by the number N of relevance-carrying operands (each gets 1/N)",
    "constant": "no relevance flows into the unit's input (its output is a constant)",
    "straight_through": "gradient passed unchanged (rounding of quantize-dequantize pairs)",
    "constant_std": "normalization with std/rms held constant: only the centring is differentiated",
}

IDENTITY_EPSILON = 1e-10


class RuleError(ValueError):
    pass


def resolve_rule(unit: Unit, rule_set: dict[str, str], overrides: dict[str, str] | None = None) -> str:
    """Name-pattern overrides first, then the unit's categories (most specific first)."""
    overrides = overrides or {}
    for key, rule in overrides.items():
        if any(ch in key for ch in "*?[") and fnmatch.fnmatchcase(unit.name or "", key) or key == unit.name:
            return rule
    for cat in unit.categories:  # a user's override of any category or op type wins over the rule set
        if cat in overrides:
            return overrides[cat]
    for cat in unit.categories:
        if cat in rule_set:
            return rule_set[cat]
    return "gradient"


# -- rule implementations --------------------------------------------------------------------
RULES: dict = {}


def rule(name):
    def deco(fn):
        RULES[name] = fn
        return fn
    return deco


@rule("gradient")
def gradient_rule(b: Builder, unit: Unit, gy: list, wants: list):
    node = b.view.nodes[unit.nodes[0]]
    vjp = lookup(node)
    if vjp is None:
        raise NotImplementedError(f"no gradient rule for op {node.op_type}")
    return vjp(b, node, gy, wants)


@rule("uniform")
def uniform_rule(b: Builder, unit: Unit, gy: list, wants: list):
    n = max(1, unit.n_relevant_inputs)
    scaled = [b.scale(g, 1.0 / n) if g is not None else None for g in gy]
    return gradient_rule(b, unit, scaled, wants)


@rule("identity")
def identity_rule(b: Builder, unit: Unit, gy: list, wants: list):
    x, y = unit.inputs[0], unit.outputs[0]
    if unit.region is None:  # a single op; fused forms apply f to x + bias
        x = activation_input(b, b.view.nodes[unit.nodes[0]])
    ratio = b.op("Div", [y, b.add(x, b.scalar_like(IDENTITY_EPSILON, x))], like=x)
    grads = [None] * len(unit.inputs)
    grads[0] = b.mul(gy[0], ratio, like=x)
    return grads


@rule("straight_through")
def straight_through_rule(b: Builder, unit: Unit, gy: list, wants: list):
    return [b.cast_like(gy[0], unit.inputs[0])]


@rule("constant")
def constant_rule(b: Builder, unit: Unit, gy: list, wants: list):
    return [None] * len(unit.inputs)


@rule("constant_std")
def constant_std_rule(b: Builder, unit: Unit, gy: list, wants: list):
    node = b.view.nodes[unit.nodes[0]]
    if node.op_type not in NORM_VJPS:
        raise NotImplementedError(f"rule constant_std for op {node.op_type}")
    return NORM_VJPS[node.op_type](b, node, gy, wants, constant_std=True)


def check_rule_name(name: str, where: str):
    if name not in RULES:
        raise RuleError(f"unknown rule '{name}' in {where}; known rules: {', '.join(sorted(RULES))}")
