"""VJPs of elementwise ops: one-input functions y = f(x) (gradient g * f'(x)), the variadic
broadcasting Max / Min / Mean, Clip, PRelu and Pow with a relevance-carrying exponent or base.

Conventions at points where the derivative is not defined (measure zero for continuous inputs), as
PyTorch's autograd takes them: Abs' = sign(x) (0 at 0); Relu-like kinks take the side the op's
formula names with a strict comparison (LeakyRelu/Elu/Celu/Selu: the x > 0 branch only for x > 0,
ThresholdedRelu: x > alpha, HardSigmoid: alpha inside the open interval, HardSwish: x/3 + 1/2 on
[-3, 3], Clip: the gradient passes for min <= x <= max); Max/Min: tied inputs share the gradient evenly
(as torch.maximum / torch.minimum do); Sign/Floor/Ceil/Round: zero gradient."""
from __future__ import annotations

from ..ir.graph import attr
from .registry import register


def _unary(op_types, local):
    """Register y = f(x) with gradient g * local(b, node, x, y)."""
    def fn(b, node, gy, wants):
        x, y = node.input[0], node.output[0]
        out = [None] * len(node.input)
        out[0] = b.mul(gy[0], local(b, node, x, y), like=x)
        return out
    register(*op_types)(fn)
    return fn


def _c(b, value, like):
    return b.scalar_like(value, like)


def _where(b, cond, a, c, like):
    return b.op("Where", [cond, a, c], like=like)


def _inv(b, t):
    return b.op("Reciprocal", [t], like=t)


def _sq(b, t):
    return b.mul(t, t, like=t)


def _sub(b, a, c, like):
    return b.op("Sub", [a, c], like=like)


_unary(["Abs"], lambda b, n, x, y: b.op("Sign", [x], like=x))
_unary(["Sin"], lambda b, n, x, y: b.op("Cos", [x], like=x))
_unary(["Cos"], lambda b, n, x, y: b.neg(b.op("Sin", [x], like=x)))
_unary(["Tan"], lambda b, n, x, y: b.add(_c(b, 1.0, y), _sq(b, y), like=x))
_unary(["Asin"], lambda b, n, x, y: _inv(b, b.op("Sqrt", [_sub(b, _c(b, 1.0, x), _sq(b, x), x)], like=x)))
_unary(["Acos"], lambda b, n, x, y: b.neg(_inv(b, b.op("Sqrt", [_sub(b, _c(b, 1.0, x), _sq(b, x), x)], like=x))))
_unary(["Atan"], lambda b, n, x, y: _inv(b, b.add(_c(b, 1.0, x), _sq(b, x), like=x)))
_unary(["Sinh"], lambda b, n, x, y: b.op("Cosh", [x], like=x))
_unary(["Cosh"], lambda b, n, x, y: b.op("Sinh", [x], like=x))
_unary(["Asinh"], lambda b, n, x, y: _inv(b, b.op("Sqrt", [b.add(_sq(b, x), _c(b, 1.0, x), like=x)], like=x)))
_unary(["Acosh"], lambda b, n, x, y: _inv(b, b.op("Sqrt", [_sub(b, _sq(b, x), _c(b, 1.0, x), x)], like=x)))
_unary(["Atanh"], lambda b, n, x, y: _inv(b, _sub(b, _c(b, 1.0, x), _sq(b, x), x)))
_unary(["Softplus"], lambda b, n, x, y: b.op("Sigmoid", [x], like=x))
_unary(["Softsign"], lambda b, n, x, y: _inv(b, _sq(b, b.add(_c(b, 1.0, x), b.op("Abs", [x], like=x), like=x))))


@register("Sign", "Floor", "Ceil", "Round")
def _zero_gradient(b, node, gy, wants):
    """Piecewise constant: the gradient is zero (where it exists)."""
    return [b.zeros_like(node.input[0])]


def _hard_sigmoid_local(b, node, x, y):
    alpha, beta = attr(node, "alpha", 0.2), attr(node, "beta", 0.5)
    z = b.add(b.mul(x, _c(b, alpha, x), like=x), _c(b, beta, x), like=x)
    inside = b.op("And", [b.op("Greater", [z, _c(b, 0.0, x)]), b.op("Less", [z, _c(b, 1.0, x)])])
    return _where(b, inside, _c(b, alpha, x), _c(b, 0.0, x), x)


_unary(["HardSigmoid"], _hard_sigmoid_local)


def _hard_swish_local(b, node, x, y):
    """y = x * clip(x/6 + 1/2, 0, 1): 0 below -3, 1 above 3, x/3 + 1/2 on [-3, 3] (PyTorch's choice)."""
    middle = b.add(b.mul(x, _c(b, 1.0 / 3.0, x), like=x), _c(b, 0.5, x), like=x)
    below = b.op("Less", [x, _c(b, -3.0, x)])
    above = b.op("Greater", [x, _c(b, 3.0, x)])
    return _where(b, below, _c(b, 0.0, x), _where(b, above, _c(b, 1.0, x), middle, x), x)


_unary(["HardSwish"], _hard_swish_local)


def _positive(b, x):
    return b.op("Greater", [x, _c(b, 0.0, x)])


_unary(["LeakyRelu"], lambda b, n, x, y: _where(b, _positive(b, x), _c(b, 1.0, x),
                                                _c(b, attr(n, "alpha", 0.01), x), x))
# Elu: alpha (exp(x) - 1) for x <= 0, derivative alpha exp(x) = y + alpha
_unary(["Elu"], lambda b, n, x, y: _where(b, _positive(b, x), _c(b, 1.0, x), b.add(y, _c(b, attr(n, "alpha", 1.0), x)), x))
_unary(["ThresholdedRelu"], lambda b, n, x, y: _where(
    b, b.op("Greater", [x, _c(b, attr(n, "alpha", 1.0), x)]), _c(b, 1.0, x), _c(b, 0.0, x), x))


def _selu_local(b, node, x, y):
    alpha = attr(node, "alpha", 1.67326319217681884765625)
    gamma = attr(node, "gamma", 1.05070102214813232421875)
    negative = b.mul(b.op("Exp", [x], like=x), _c(b, alpha * gamma, x), like=x)
    return _where(b, _positive(b, x), _c(b, gamma, x), negative, x)


_unary(["Selu"], _selu_local)


def _celu_local(b, node, x, y):
    """max(0, x) + min(0, alpha (exp(x / alpha) - 1)): 1 for x > 0, exp(x / alpha) otherwise."""
    alpha = attr(node, "alpha", 1.0)
    negative = b.op("Exp", [b.mul(x, _c(b, 1.0 / alpha, x), like=x)], like=x)
    return _where(b, _positive(b, x), _c(b, 1.0, x), negative, x)


_unary(["Celu"], _celu_local)


def _mish_local(b, node, x, y):
    """y = x tanh(softplus(x)): tanh(sp) + x (1 - tanh(sp)^2) sigmoid(x)."""
    t = b.op("Tanh", [b.op("Softplus", [x], like=x)], like=x)
    rest = b.mul(b.mul(x, _sub(b, _c(b, 1.0, x), _sq(b, t), x), like=x), b.op("Sigmoid", [x], like=x), like=x)
    return b.add(t, rest, like=x)


_unary(["Mish"], _mish_local)


@register("PRelu")
def _prelu(b, node, gy, wants):
    """y = x for x >= 0, slope * x for x < 0 (slope broadcast to x)."""
    x, slope = node.input
    g = gy[0]
    negative = b.op("Less", [x, _c(b, 0.0, x)])
    out = [None, None]
    if wants[0]:
        out[0] = b.mul(g, _where(b, negative, slope, _c(b, 1.0, x), x), like=x)
    if wants[1]:
        out[1] = b.unbroadcast(_where(b, negative, b.mul(g, x, like=x), _c(b, 0.0, x), x), slope)
    return out


# -- variadic -------------------------------------------------------------------------------------
@register("Mean")
def _mean(b, node, gy, wants):
    g = b.scale(gy[0], 1.0 / len(node.input))
    return [b.unbroadcast(g, t) if w else None for t, w in zip(node.input, wants)]


@register("Max", "Min")
def _max_min(b, node, gy, wants):
    """The gradient goes to the input(s) equal to the result; k tied inputs get 1/k of it each (as
    torch.maximum / torch.minimum split it), constant inputs included in the count."""
    y, g = node.output[0], gy[0]
    if len(node.input) == 1:
        return [g]
    masks = [b.op("Cast", [b.op("Equal", [t, y])], to=b.view.dtype(y), like=y) for t in node.input]
    count = b.sum(masks)
    share = b.op("Div", [g, count], like=y)
    return [b.unbroadcast(b.mul(share, m, like=y), t) if w else None
            for t, m, w in zip(node.input, masks, wants)]


@register("Clip")
def _clip(b, node, gy, wants):
    """y = min(max(x, lo), hi). The gradient passes to x where lo <= x <= hi (PyTorch's clamp); a
    relevance-carrying bound gets it where it is the result."""
    x, g = node.input[0], gy[0]
    lo = node.input[1] if len(node.input) > 1 else ""
    hi = node.input[2] if len(node.input) > 2 else ""
    if b.opset < 11:  # bounds as attributes
        lo_v, hi_v = attr(node, "min"), attr(node, "max")
        lo = _c(b, lo_v, x) if lo_v is not None else ""
        hi = _c(b, hi_v, x) if hi_v is not None else ""
    zero = _c(b, 0.0, x)
    out = [None] * len(node.input)
    conditions = []
    if lo:
        conditions.append(b.op("GreaterOrEqual", [x, lo]))
    if hi:
        conditions.append(b.op("LessOrEqual", [x, hi]))
    inside = conditions[0] if len(conditions) == 1 else b.op("And", conditions) if conditions else None
    out[0] = g if inside is None else _where(b, inside, g, zero, x)
    raised = b.op("Max", [x, lo], like=x) if lo else x
    if lo and len(wants) > 1 and wants[1]:
        chosen = b.op("Less", [x, lo])
        if hi:
            chosen = b.op("And", [chosen, b.op("LessOrEqual", [lo, hi])])
        out[1] = b.unbroadcast(_where(b, chosen, g, zero, x), lo)
    if hi and len(wants) > 2 and wants[2]:
        out[2] = b.unbroadcast(_where(b, b.op("Greater", [raised, hi]), g, zero, x), hi)
    return out


@register("Pow")
def _pow(b, node, gy, wants):
    """y = x^p: dy/dx = p x^(p-1), dy/dp = y ln(x) (either may carry relevance: Pow(x, 2), Pow(2, x))."""
    x, p = node.input
    g = gy[0]
    out = [None, None]
    if wants[0]:
        if b.view.scalar(p) == 2:
            local = b.mul(x, _c(b, 2.0, x), like=x)
        else:
            p_x = b.cast_like(p, x) if b.view.dtype(p) != b.view.dtype(x) else p
            local = b.mul(p_x, b.op("Pow", [x, _sub(b, p_x, _c(b, 1.0, x), p_x)], like=x), like=x)
        out[0] = b.unbroadcast(b.mul(g, local, like=g), x)
    if wants[1]:
        y = node.output[0]
        local = b.mul(y, b.op("Log", [x], like=x), like=y)
        p_x = b.cast_like(p, x) if b.view.dtype(p) != b.view.dtype(x) else p
        zero = _c(b, 0.0, y)
        at_zero = b.op("And", [b.op("Equal", [x, _c(b, 0.0, x)]), b.op("GreaterOrEqual", [p_x, _c(b, 0.0, x)])])
        local = _where(b, at_zero, zero, local, y)  # 0^p ln 0 taken as 0 (PyTorch's choice)
        gp = b.mul(g, local, like=g)
        if b.view.dtype(p) != b.view.dtype(y):
            gp = b.op("Cast", [gp], to=b.view.dtype(p), dtype=b.view.dtype(p), shape=b.view.shape(g))
        out[1] = b.unbroadcast(gp, p)
    return out



_unary(["Shrink"], lambda b, n, x, y: _where(
    b, b.op("Greater", [b.op("Abs", [x], like=x), _c(b, attr(n, "lambd", 0.5), x)]), _c(b, 1.0, x), _c(b, 0.0, x), x))


def _swish_local(b, node, x, y):
    """y = x sigmoid(alpha x): sigmoid(alpha x) (1 + alpha x (1 - sigmoid(alpha x)))."""
    alpha = attr(node, "alpha", 1.0)
    ax = b.mul(x, _c(b, alpha, x), like=x)
    s = b.op("Sigmoid", [ax], like=x)
    return b.mul(s, b.add(_c(b, 1.0, x), b.mul(ax, _sub(b, _c(b, 1.0, x), s, x), like=x), like=x), like=x)


_unary(["Swish"], _swish_local)


@register("Hardmax")
def _hardmax(b, node, gy, wants):
    """A one-hot of the arg-max: piecewise constant, zero gradient."""
    return [b.zeros_like(node.input[0])]


@register("Trilu")
def _trilu(b, node, gy, wants):
    """A mask: the gradient is masked the same way."""
    out = [None] * len(node.input)
    out[0] = b.op("Trilu", [gy[0]] + list(node.input[1:]), upper=attr(node, "upper", 1), like=node.input[0])
    return out
