"""LRP rules in Gradient×Input form, and the rule sets that say which rule each unit gets.

A rule set is data: a mapping from a unit category (or an ONNX op type) to a rule name, the way
Zennit composites map layer types to rules. Categories come from analysis.classify:
  activation      elementwise nonlinearity, single op or written-out pattern (GELU, SiLU, tanh...)
  gate            an activation whose output gates another branch by a product (gated MLPs)
  product         Mul/MatMul/Einsum/Gemm of two or more relevance-carrying tensors
  norm            LayerNormalization / RMSNormalization ops
  norm_scale      the std/rms factor of a written-out LayerNorm/RMSNorm
  attention_probs a Softmax whose output weights a relevance-carrying value tensor
  softmax         any other Softmax
  fake_quantization  QuantizeLinear->DequantizeLinear on activations (QDQ models)
  softcap         c*tanh(x/c) logit soft-capping (Gemma): plain gradient, as LXT leaves it
  quantized_matmul  DynamicQuantizeLinear -> MatMulInteger (-> Cast -> Mul) / MatMulIntegerToFloat:
                  the float gradient with the dequantized weight (the rounding passes straight through)
Unlisted categories get "gradient".
"""
from __future__ import annotations

import fnmatch

from .analysis import Unit
from .builder import Builder
from .vjp import NORM_VJPS, lookup
from .vjp_contrib import activation_input, dequantized_input_gradient

RULE_SETS: dict[str, dict[str, str]] = {
    "gradient": {"fake_quantization": "straight_through", "quantized_matmul": "dequantized"},
    "attnlrp": {
        "fake_quantization": "straight_through",
        "quantized_matmul": "dequantized",
        "activation": "identity",
        "product": "uniform",
        "norm": "constant_std",
        "norm_scale": "constant",
    },
    "cp-lrp": {
        "fake_quantization": "straight_through",
        "quantized_matmul": "dequantized",
        "gate": "constant",
        "activation": "identity",
        "product": "uniform",
        "norm": "constant_std",
        "norm_scale": "constant",
        "attention_probs": "constant",
    },
}

RULE_DOCS = {
    "gradient": "exact local Jacobian (plain Gradient×Input)",
    "identity": "local Jacobian f(x)/(x+1e-10): relevance passes through unchanged",
    "uniform": "gradient divided by the number N of relevance-carrying operands (each gets 1/N)",
    "constant": "no relevance flows into the unit's input (its output is a constant)",
    "straight_through": "gradient passed unchanged (rounding of quantize-dequantize pairs)",
    "dequantized": "gradient of a quantized MatMul in float, with the dequantized weight",
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


@rule("dequantized")
def dequantized_rule(b: Builder, unit: Unit, gy: list, wants: list):
    """A quantized MatMul region (patterns.find_quantized_matmul): x -> y, linear in x up to rounding."""
    view = b.view
    matmul = view.nodes[unit.nodes[0]]
    quantize = view.nodes[view.producer[matmul.input[0]]]
    a_scale = quantize.output[1]
    if matmul.op_type == "MatMulIntegerToFloat":
        inputs = list(matmul.input) + [""] * (6 - len(matmul.input))
        weight, b_scale, b_zero = inputs[1], inputs[3], inputs[5]
        g = gy[0]
    else:  # MatMulInteger -> Cast -> Mul(cast, a_scale * b_scale)
        weight = matmul.input[1]
        b_zero = matmul.input[3] if len(matmul.input) > 3 else ""
        final = view.nodes[unit.nodes[-1]]
        scale = next(t for t in final.input if t != view.nodes[unit.nodes[1]].output[0])
        p = view.producer.get(scale)
        pair = view.nodes[p] if p is not None else None
        if pair is not None and pair.op_type == "Mul" and a_scale in pair.input:
            b_scale, g = next(t for t in pair.input if t != a_scale), gy[0]
        else:  # the product of the scales, divided by the activation's
            b_scale, g = None, b.op("Div", [b.mul(gy[0], scale), a_scale], like=gy[0])
    return [dequantized_input_gradient(b, g, weight, b_scale, b_zero, like=unit.inputs[0])]


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
