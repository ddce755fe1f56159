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
  conv            Conv with constant weights (and bias)
  linear          a fully-connected layer: Gemm, or MatMul by a constant matrix (+ constant bias Add)
  quantized_matmul  DynamicQuantizeLinear -> MatMulInteger (-> Cast -> Mul) / MatMulIntegerToFloat:
                  the float gradient with the dequantized weight (the rounding passes straight through)
  affine          linear (or affine) in every relevance-carrying input: reshapes, routing, additions,
                  reductions by sum/mean, pooling by average, Resize, BatchNormalization (inference),
                  a product with one relevance-carrying operand
  homogeneous     positively homogeneous of degree 1 (max, min, top-k, max-pooling, L1/L2 norms):
                  Gradient x Input conserves exactly
  renormalization a / sum(a) or a / ||a||_p along an axis: weights renormalised to sum, or to have norm,
                  one (an MoE block's top-k routing weights; DBRX: p-norm): plain gradient, as through
                  the softmax before it
  unclassified    what the op computes in its relevance-carrying inputs is not known (a division or
                  power of two relevance-carrying tensors, an op outside the tables of analysis.py)
Other categories not listed in a rule set get "gradient"; `unclassified` gets no rule unless the
rule set (or an override of the node, op type or category) gives one: the unit is refused.

A rule name may carry a parameter after a colon: "gamma:0.25" is the gamma rule with gamma 0.25
("gamma" alone: Zennit's default, 0.25).
"""
from __future__ import annotations

import fnmatch
import functools
import math

from .affine import affine_layer
from .analysis import UNCLASSIFIED, Unit
from ..ir.builder import Builder
from ..errors import LRPError
from ..vjp import NORM_VJPS, lookup
from ..vjp.contrib import activation_input, dequantized_input_gradient

RULE_SETS: dict[str, dict[str, str]] = {
    # the exact derivative of every op that has one, whatever it computes
    "gradient": {"fake_quantization": "straight_through", "quantized_matmul": "dequantized", UNCLASSIFIED: "gradient"},
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
        "router": "constant",
    },
}
# LXT's ViT recipe (lxt/efficient/models/vit_torch.py with Zennit, as in LXT's ViT example): CP-LRP
# inside attention, AttnLRP's identity / constant-std rules outside it, and Zennit's Gamma rule on
# Conv2d and Linear layers. LXT leaves the two gammas to be tuned (its example sweeps conv gamma
# over 0.1, 0.25, 100 and linear gamma over 0, 0.01, 0.05, 0.1, 1); these defaults are Zennit's
# gamma=0.25 on the patch-embedding Conv and 0.05 on every linear layer. Override per op type:
# overrides={"conv": "gamma:100", "linear": "gamma:0.1"}.
RULE_SETS["vit-gamma"] = dict(RULE_SETS["cp-lrp"], conv="gamma:0.25", linear="gamma:0.05")

RULE_DOCS = {
    "gradient": "exact local Jacobian (plain Gradient×Input)",
    "identity": "local Jacobian f(x)/(x+1e-10): relevance passes through unchanged",
    "uniform": "gradient divided by the number N of relevance-carrying operands (each gets 1/N)",
    "constant": "no relevance flows into the unit's input (its output is a constant)",
    "straight_through": "gradient passed unchanged (rounding of quantize-dequantize pairs)",
    "dequantized": "gradient of a quantized MatMul in float, with the dequantized weight",
    "constant_std": "normalization with std/rms held constant: only the centring is differentiated",
    "gamma": "Zennit's generalized LRP-gamma rule on a Conv or linear layer (`gamma:G`, default G=0.25): "
             "weights w + G·w⁺ for positive and w + G·w⁻ for negative contributions, stabilizer 1e-6",
}

IDENTITY_EPSILON = 1e-10


class RuleError(ValueError):
    pass


def resolve_rule(unit: Unit, rule_set: dict[str, str], overrides: dict[str, str] | None = None) -> str | None:
    """Name-pattern overrides first, then the unit's categories (most specific first). None: the
    unit is unclassified and nothing gives it a rule (the caller refuses it)."""
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
    return None if UNCLASSIFIED in unit.categories else "gradient"


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
    """y = f(x) elementwise, x the one relevance-carrying input: local Jacobian f(x)/x."""
    k = next((i for i, w in enumerate(wants) if w), 0)
    x, y = unit.inputs[k], unit.outputs[0]
    if unit.region is None and k == 0:  # a single op; fused forms apply f to x + bias
        x = activation_input(b, b.view.nodes[unit.nodes[0]])
    ratio = b.op("Div", [y, b.add(x, b.scalar_like(IDENTITY_EPSILON, x))], like=y)
    grads = [None] * len(unit.inputs)
    grads[k] = b.unbroadcast(b.mul(gy[0], ratio, like=y), unit.inputs[k])
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


def rule_function(name: str):
    """The implementation of rule `name`, its parameter bound ("gamma:0.1")."""
    base, _, param = name.partition(":")
    if base in PARAMETRIZED_RULES:
        fn, parse = PARAMETRIZED_RULES[base]
        return functools.partial(fn, **parse(param))
    if param or name not in RULES:
        raise RuleError(f"unknown rule '{name}'")
    return RULES[name]


def known_rules() -> list[str]:
    return sorted(RULES) + [f"{base}[:PARAM]" for base in PARAMETRIZED_RULES]


def check_rule_name(name: str, where: str):
    try:
        rule_function(name)
    except RuleError as exc:
        raise RuleError(f"{exc} in {where}; known rules: {', '.join(known_rules())}") from None


def rule_base(name: str) -> str:
    """The rule without its parameter: "gamma:0.1" -> "gamma"."""
    return name.partition(":")[0]


# -- the gamma rule --------------------------------------------------------------------------
GAMMA_DEFAULT = 0.25        # zennit.rules.Gamma's default
GAMMA_STABILIZER = 1e-6     # zennit.rules.Gamma's default: z + 1e-6 * sign(z), sign(0) = +1


def _parse_gamma(param: str) -> dict:
    if not param:
        return {"gamma": GAMMA_DEFAULT}
    try:
        gamma = float(param)
    except ValueError:
        raise RuleError(f"unknown rule 'gamma:{param}' (gamma must be a number, e.g. gamma:0.25)") from None
    if not math.isfinite(gamma) or gamma < 0:
        raise RuleError(f"unknown rule 'gamma:{param}' (gamma must be finite and >= 0)")
    return {"gamma": gamma}


def gamma_rule(b: Builder, unit: Unit, gy: list, wants: list, gamma: float = GAMMA_DEFAULT):
    """Zennit's generalized Gamma rule (zennit.rules.Gamma) in Gradient×Input form.

    For y = layer(x, w, b) and output relevance R = y ⊙ gy, with w↑ = w + γw⁺, w↓ = w + γw⁻,
    b↑ = b + γb⁺, b↓ = b + γb⁻:
      z↑ = layer(x⁺, w↑, b↑) + layer(x⁻, w↓)     (the positive contributions, where y > 0)
      z↓ = layer(x⁺, w↓, b↓) + layer(x⁻, w↑)     (the negative ones, where y < 0)
      s↑ = [y > 0] R / stab(z↑),  s↓ = [y < 0] R / stab(z↓)
      R_in = x⁺ ⊙ (w↑ᵀ s↑ + w↓ᵀ s↓) + x⁻ ⊙ (w↓ᵀ s↑ + w↑ᵀ s↓)
    The gradient handed on is R_in / x: w↑ᵀ s↑ + w↓ᵀ s↓ where x > 0, w↓ᵀ s↑ + w↑ᵀ s↓ where
    x < 0, 0 where x = 0 (LXT divides Zennit's R_in by x + 1e-10·sign(x) instead: equal up to 1e-10/|x|)."""
    layer = affine_layer(b, unit)
    x, y, w = layer.x, layer.y, layer.weight

    def positive(t):
        return b.op("Relu", [t], like=t)

    def negative(t):
        return b.op("Min", [t, b.scalar_like(0.0, t)], like=t)

    def plus_gamma(t, part):
        return b.add(t, b.mul(part(t), b.scalar_like(gamma, t)), like=t)

    w_up, w_down = plus_gamma(w, positive), plus_gamma(w, negative)
    b_up = plus_gamma(layer.bias, positive) if layer.bias else None
    b_down = plus_gamma(layer.bias, negative) if layer.bias else None
    x_pos, x_neg = positive(x), negative(x)
    z_up = b.add(layer.apply(x_pos, w_up, b_up), layer.apply(x_neg, w_down, None), like=y)
    z_down = b.add(layer.apply(x_pos, w_down, b_down), layer.apply(x_neg, w_up, None), like=y)

    relevance = b.mul(gy[0], y, like=y)
    zero, one = b.scalar_like(0.0, y), b.scalar_like(1.0, y)

    def share(z, where):  # [where] R / (z + eps * sign(z)), sign(0) = +1
        sign = b.op("Where", [b.op("GreaterOrEqual", [z, zero]), one, b.neg(one)], like=z)
        stabilized = b.add(z, b.mul(sign, b.scalar_like(GAMMA_STABILIZER, y), like=z), like=z)
        return b.op("Where", [where, b.op("Div", [relevance, stabilized], like=y), zero], like=y)

    s_up = share(z_up, b.op("Greater", [y, zero]))
    s_down = share(z_down, b.op("Less", [y, zero]))
    grad_pos = b.add(layer.transpose(s_up, w_up), layer.transpose(s_down, w_down), like=x)
    grad_neg = b.add(layer.transpose(s_up, w_down), layer.transpose(s_down, w_up), like=x)
    x_zero = b.scalar_like(0.0, x)
    grad = b.op("Where", [b.op("Greater", [x, x_zero]), grad_pos,
                          b.op("Where", [b.op("Less", [x, x_zero]), grad_neg, x_zero], like=x)], like=x)
    return [grad] + [None] * (len(unit.inputs) - 1)


PARAMETRIZED_RULES = {"gamma": (gamma_rule, _parse_gamma)}  # name -> (implementation, parameter parser)
GAMMA_CATEGORIES = ("conv", "linear")


# -- checks of a rule against the unit it was given (overrides included) -------------------------------
def rule_misfit(view, unit: Unit) -> str | None:
    """Why `unit.rule` cannot apply to this unit, or None: identity needs an elementwise function of
    one relevance-carrying tensor (analysis.classify's `activation`, a single op or a region)."""
    if rule_base(unit.rule) != "identity" or "activation" in unit.categories:
        return None
    if unit.region is None and "affine" in unit.categories and len([t for t in unit.inputs if t]) == 1:
        return None  # a unary linear op (Cast, Neg, Identity): f(x)/x is its gradient
    what = f"a {unit.region.kind} region" if unit.region is not None else f"{unit.op_type} ({unit.categories[0]})"
    return (f"{unit.describe(view)}: rule identity applies to elementwise functions of one relevance-carrying "
            f"tensor (x -> f(x)), not to {what}")


class UnmatchedOverride(LRPError, UserWarning):
    """An override key that names no op type, category or node of the model (a typo?). A warning;
    an error under `warnings.simplefilter("error", UnmatchedOverride)` (the CLI's --strict)."""


def warn_unmatched_overrides(units: list, overrides: dict | None) -> None:
    import warnings

    for key in overrides or {}:
        pattern = any(ch in key for ch in "*?[")
        if any(key in u.categories or key == u.name or pattern and fnmatch.fnmatchcase(u.name or "", key)
               for u in units):
            continue
        warnings.warn(UnmatchedOverride(
            f"override '{key}' matches no op type, category or node name of this model; ignored"), stacklevel=3)
