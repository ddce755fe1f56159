"""Conservation audit: run a model with the relevance entering and leaving every unit.

For each unit on the relevance path the converted graph gets extra outputs (in float64):
  R_out = sum over the unit's outputs y of y ⊙ grad(y)      (grad(y): the total, over all consumers)
  R_in  = for each relevance-carrying input x, x ⊙ g         (g: THIS unit's contribution to grad(x))
and the audit compares sum(R_in) with sum(R_out). A rule that should conserve (identity, uniform,
constant-std norm without bias, the gradient of a bias-free linear or routing op) and does not is
flagged; units that legitimately do not conserve (softmax, biases, the gradient of nonlinear ops
under a rule set that wants it) are reported with the reason.

    report = lrp_onnx.audit("model.onnx", rules="attnlrp")      # random feeds, seed 0
    print(report.format()); report.flagged                      # [] when nothing is unexpected
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper

from ..lrp.analysis import Unit
from ..ir.builder import Builder
from ..errors import LRPError
from ..ir.graph import GraphView, constant_table_lookup
from ..lrp.rules import IDENTITY_EPSILON, RULE_SETS, rule_base
from ..vjp.contrib import BIASED_ACTIVATIONS

AUDIT_OUTPUT = "lrp_audit"
DEFAULT_RTOL = 1e-4

# -- what each unit is expected to do ------------------------------------------------------------
# Under the gradient rule, an op conserves relevance when its output is homogeneous of degree 1 in
# its relevance-carrying inputs (Euler: sum x ⊙ dy/dx = y) with no offset. Per op: the inputs that
# enter additively (an off-path, non-zero one is a bias) and those that enter as factors (an
# off-path one is a constant scale; two on the path make a product: degree 2). "*" = all inputs.
# An op missing here is not expected to conserve under the gradient rule (reported, not flagged),
# unless it is an elementwise nonlinearity (NONLINEAR_ELEMENTWISE) in a rule set that gives
# activations the identity rule.
LINEAR_OPS: dict[str, tuple] = {
    # routing (each output element is one input element), linear maps of one input (sums, means,
    # interpolation), and positively homogeneous ones (relu(x) = x relu'(x))
    **{op: ((0,), ()) for op in (
        "Identity", "Dropout", "Cast", "CastLike", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose",
        "Expand", "Slice", "Gather", "GatherElements", "GatherND", "Split", "TopK", "Tile", "DepthToSpace",
        "SpaceToDepth", "Compress", "ReverseSequence", "MaxPool", "GlobalMaxPool", "ReduceMax", "ReduceMin",
        "Neg", "ReduceSum", "ReduceMean", "CumSum", "AveragePool", "GlobalAveragePool", "Resize", "Upsample",
        "Relu", "LeakyRelu", "PRelu")},
    "Pad": ((0, 2), ()),                      # constant_value: an offset where padded
    "Concat": ("*", ()), "Add": ("*", ()), "Sub": ("*", ()), "Sum": ("*", ()), "Mean": ("*", ()),
    "Max": ("*", ()), "Min": ("*", ()),       # a constant operand is an offset where it is selected
    "Where": ((1, 2), ()),
    "ScatterElements": ((0, 2), ()), "ScatterND": ((0, 2), ()),
    "Mul": ((), "*"), "MatMul": ((), "*"), "Einsum": ((), "*"), "FusedMatMul": ((), (0, 1)),
    "Div": ((), (0,)),                        # a divisor on the path makes it nonlinear (see below)
    "Gemm": ((2,), (0, 1)), "Conv": ((2,), (0, 1)), "ConvTranspose": ((2,), (0, 1)),
}
NONLINEAR_ELEMENTWISE = {
    "Tanh", "Sigmoid", "Exp", "Log", "Pow", "Sqrt", "Reciprocal", "Erf", "Abs", "Sin", "Cos", "Softplus",
    "Softsign", "Gelu", "Clip", "HardSigmoid", "HardSwish", "Elu", "Selu", "Celu", "Mish", "ThresholdedRelu",
    "FastGelu", "BiasGelu", "QuickGelu", "Atan", "Asin", "Acos", "Sinh", "Cosh", "Tan", "Asinh", "Acosh",
    "Atanh", "Floor", "Ceil", "Round", "Sign",
}
# norms: the inputs that add an offset (bias/beta) to the output
NORM_OFFSETS = {
    "LayerNormalization": (2,), "SimplifiedLayerNormalization": (), "RMSNormalization": (),
    "SkipLayerNormalization": (3, 4), "SkipSimplifiedLayerNormalization": (3,),
    "GroupNormalization": (2,), "InstanceNormalization": (2,), "BatchNormalization": (2, 3),
}


@dataclass
class Expectation:
    conserves: bool          # flag the unit when sum(R_in) != sum(R_out)
    reason: str              # why it should (or need not) conserve
    split: int = 0           # uniform rule: each of this many operands gets 1/split of R_out


def _nonzero_offset(view: GraphView, t: str) -> bool:
    """An off-path tensor added to the output: a bias unless it is a constant zero."""
    if not t:
        return False
    v = view.value(t)
    return v is None or bool(np.any(np.asarray(v) != 0))


def expectation(view: GraphView, unit: Unit, on_path: list[bool], rule_set: dict) -> Expectation:
    """What the unit's rule should do with relevance, from what the unit computes."""
    rule = rule_base(unit.rule)
    node = view.nodes[unit.nodes[0]] if unit.region is None else None
    op = unit.op_type
    n_path = sum(on_path)
    if rule == "identity":
        if node is not None and op in BIASED_ACTIVATIONS and len(node.input) > 1 and node.input[1]:
            return Expectation(False, "activation of x + bias: the bias takes its share")
        return Expectation(True, "identity rule: relevance passes unchanged")
    if rule == "uniform":
        if op == "Gemm" and len(node.input) > 2 and node.input[2]:
            return Expectation(False, "uniform rule on a Gemm with a bias")
        return Expectation(True, f"uniform rule: each of {n_path} operands gets 1/{n_path}", split=n_path)
    if rule == "constant_std":
        offsets = [node.input[k] for k in NORM_OFFSETS.get(op, ()) if k < len(node.input)]
        if any(_nonzero_offset(view, t) for t in offsets):
            return Expectation(False, "norm with a bias (beta): the bias takes its share")
        return Expectation(True, "constant-std norm without bias")
    if rule == "straight_through":
        return Expectation(False, "quantize-dequantize: conserves up to the rounding")
    if rule == "dequantized":
        return Expectation(False, "quantized MatMul: conserves up to the activation's rounding")
    if rule == "gamma":
        return Expectation(False, "gamma rule: conserves only without bias, up to its stabilizer")
    if rule != "gradient":
        return Expectation(False, f"rule {unit.rule}")
    # the gradient rule: conservation follows from what the op computes
    wants_identity = rule_set.get("activation") == "identity"
    wants_uniform = rule_set.get("product") == "uniform"
    if "softcap" in unit.categories:
        return Expectation(False, "logit soft-capping: plain gradient, as LXT leaves it")
    if op in ("Softmax", "LogSoftmax"):
        return Expectation(False, "softmax: plain gradient (does not conserve)")
    if op == "Pow" and n_path == 1 and on_path[0] and view.value(node.input[1]) is not None \
            and np.all(np.asarray(view.value(node.input[1])) == 1):
        return Expectation(True, "x ** 1")
    if op in NONLINEAR_ELEMENTWISE or (op == "Div" and len(on_path) > 1 and on_path[1]):
        if wants_identity:
            return Expectation(True, f"nonlinear {op} gets the plain gradient, but the rule set gives "
                                     f"activations the identity rule")
        return Expectation(False, f"plain gradient of nonlinear {op}")
    if op not in LINEAR_OPS:
        return Expectation(False, f"plain gradient of {op}: no conservation expected")
    additive, factors = LINEAR_OPS[op]
    inputs = list(node.input)
    additive = range(len(inputs)) if additive == "*" else [k for k in additive if k < len(inputs)]
    factors = range(len(inputs)) if factors == "*" else [k for k in factors if k < len(inputs)]
    path_factors = [k for k in factors if on_path[k]]
    if len(path_factors) >= 2:
        if wants_uniform:
            return Expectation(True, f"product of {len(path_factors)} relevance-carrying tensors gets the "
                                     f"plain gradient, but the rule set gives products the uniform rule")
        return Expectation(False, f"plain gradient of a product of {len(path_factors)} tensors")
    biases = [inputs[k] for k in additive if not on_path[k] and _nonzero_offset(view, inputs[k])]
    if biases:
        return Expectation(False, f"{op} with an offset not on the relevance path ('{biases[0]}')")
    return Expectation(True, f"linear {op} without offset")


# -- the probe: extra outputs in the backward --------------------------------------------------
@dataclass
class _Record:
    unit: Unit
    on_path: list            # per unit input: carries relevance
    outputs: list            # names of the outputs whose relevance is summed
    inputs: list             # (input index, name) whose relevance is summed
    offset: int = 0          # first position in the audit vector
    at_zero: bool = False    # identity rule: one more pair, sum of y ⊙ grad(y) ⊙ eps / (x + eps)


class _Probe:
    """Called by pipeline.emit_backward for every unit; appends [sum, sum|.|] of y ⊙ grad(y) per
    output and of x ⊙ g per input (in float64) to one vector output."""

    def __init__(self):
        self.records: list[_Record] = []
        self.pieces: list[str] = []
        self.length = 0

    def __call__(self, b: Builder, unit: Unit, gy: list, grads: list, wants: list):
        outs = [(y, g) for y, g in zip(unit.outputs, gy) if y and g is not None]
        ins = [(k, x, g) for k, (x, g, w) in enumerate(zip(unit.inputs, grads, wants)) if w and g is not None]
        rec = _Record(unit, list(wants), [y for y, _ in outs], [(k, x) for k, x, _ in ins], self.length)
        for t, g in [(y, g) for y, g in outs] + [(x, g) for _, x, g in ins]:
            self.pieces.append(self._sums(b, t, g))
            self.length += 2
        if rule_base(unit.rule) == "identity" and len(outs) == 1 and unit.inputs and unit.inputs[0]:
            # the identity rule hands on y * x / (x + eps): it keeps y * eps / (x + eps), all of it
            # where x == 0 (whatever f(0) is)
            y, g = outs[0]
            x = b.op("Cast", [unit.inputs[0]], to=TensorProto.DOUBLE)
            eps = b.const(np.array(IDENTITY_EPSILON))
            kept = b.op("Div", [eps, b.op("Add", [x, eps])])
            self.pieces.append(self._sums(b, y, b.op("Mul", [b.op("Cast", [g], to=TensorProto.DOUBLE), kept])))
            self.length += 2
            rec.at_zero = True
        self.records.append(rec)

    @staticmethod
    def _sums(b: Builder, t: str, g: str) -> str:
        g = b.op("Cast", [g], to=TensorProto.DOUBLE)
        zero = b.const(np.array(0.0))
        # 0 * inf := 0: a masked logit (-inf) with no gradient carries no relevance
        r = b.op("Where", [b.op("Equal", [g, zero]), zero, b.op("Mul", [b.op("Cast", [t], to=TensorProto.DOUBLE), g])])
        total = b.op("ReduceSum", [r], keepdims=0)
        mass = b.op("ReduceSum", [b.op("Abs", [r])], keepdims=0)
        return b.op("Concat", [b.op("Reshape", [s, b.ints([1])]) for s in (total, mass)], axis=0)


# -- feeds ---------------------------------------------------------------------------------------
def _index_bounds(view: GraphView) -> dict[str, int]:
    """Integer graph input -> the smallest number of rows of a constant table it indexes (Gather)."""
    from ..pipeline import _integer_input_origins

    origin = _integer_input_origins(view)
    bounds: dict[str, int] = {}
    for n in view.nodes:
        lookup = constant_table_lookup(view, n)  # a Gather or GatherBlockQuantized on a constant table
        if lookup is not None and lookup[1] in origin and lookup[2] is not None:
            key = origin[lookup[1]]
            bounds[key] = min(lookup[2], bounds.get(key, lookup[2]))
    return bounds


def default_feeds(model: onnx.ModelProto, seed: int = 0, dims: dict | None = None,
                  view: GraphView | None = None, given: dict | None = None) -> dict[str, np.ndarray]:
    """Inputs for a run: token ids uniform over the embedding table, masks of ones, position ids
    0..n-1, other integers zero, floats N(0, 1). A symbolic dimension takes its size from the
    `given` arrays, else `dims[name]`, else 2 on the first axis and 8 elsewhere."""
    if view is None:
        from ..ir.shapes import infer_shapes
        view = GraphView.build(model, infer_shapes(model))
    rng = np.random.default_rng(seed)
    dims = dict(dims or {})
    for vi in model.graph.input:
        if vi.name in (given or {}):
            for d, size in zip(vi.type.tensor_type.shape.dim, np.shape(given[vi.name])):
                if d.dim_param:
                    dims[d.dim_param] = size
    bounds = _index_bounds(view)
    initializers = {t.name for t in model.graph.initializer}
    feeds = {}
    for vi in model.graph.input:
        if vi.name in initializers:
            continue
        tt = vi.type.tensor_type
        shape = []
        for axis, d in enumerate(tt.shape.dim):
            if d.HasField("dim_value"):
                shape.append(d.dim_value)
            else:
                name = d.dim_param or f"{vi.name}[{axis}]"
                shape.append(dims.setdefault(name, 2 if axis == 0 else 8))
        np_dtype = helper.tensor_dtype_to_np_dtype(tt.elem_type)
        lower = vi.name.lower()
        if np.issubdtype(np_dtype, np.floating):
            feeds[vi.name] = rng.standard_normal(shape).astype(np_dtype)
        elif np_dtype == np.bool_ or "mask" in lower:
            feeds[vi.name] = np.ones(shape, np_dtype)
        elif vi.name in bounds and "position" not in lower:
            feeds[vi.name] = rng.integers(0, bounds[vi.name], size=shape).astype(np_dtype)
        elif "position" in lower and shape:
            feeds[vi.name] = np.broadcast_to(np.arange(shape[-1]), shape).astype(np_dtype).copy()
        else:
            feeds[vi.name] = np.zeros(shape, np_dtype)
    return feeds


# -- the audit -----------------------------------------------------------------------------------
@dataclass
class UnitAudit:
    unit: str                # description (node name and op, or the fused pattern)
    op: str
    rule: str
    category: str
    r_out: float             # sum over outputs of y ⊙ grad(y)
    r_in: float              # sum over relevance-carrying inputs of x ⊙ (this unit's gradient)
    ratio: float             # r_in / r_out
    shares: dict             # input name -> its sum(R_in)
    mass: float              # sum of |terms| on both sides: the scale of the rounding error
    expected: bool           # should conserve
    reason: str
    flagged: bool
    problem: str = ""        # why it is flagged
    kept: float = 0.0        # identity rule: the part of r_out its stabilizer keeps, sum y*grad(y)*eps/(x+eps)


@dataclass
class AuditReport:
    rules: str
    output: str
    sources: list
    rtol: float
    units: list = field(default_factory=list)
    logit: float | None = None         # the explained logit (sum over the batch)
    source_relevance: float = 0.0      # sum of the relevance at the sources

    @property
    def flagged(self) -> list:
        return [u for u in self.units if u.flagged]

    def to_dict(self) -> dict:
        return {"rules": self.rules, "output": self.output, "sources": self.sources, "rtol": self.rtol,
                "logit": self.logit, "source_relevance": self.source_relevance,
                "flagged": len(self.flagged), "units": [asdict(u) for u in self.units]}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, default=float)

    def format(self) -> str:
        lines = [f"rules: {self.rules}   explained output: {self.output}   sources: {', '.join(self.sources)}",
                 f"sum of relevance at the sources {self.source_relevance:+.6g}"
                 + (f", explained logit {self.logit:+.6g}" if self.logit is not None else ""),
                 "(R_in: relevance a unit hands to its inputs, R_out: relevance entering it; "
                 "!! flagged, ~ need not conserve)",
                 f"{'':2}{'R_in/R_out':>12} {'R_out':>12}  {'rule':<13} {'category':<16} unit"]
        for u in self.units:
            mark = "!!" if u.flagged else ("  " if u.expected else " ~")
            lines.append(f"{mark}{u.ratio:>12.6f} {u.r_out:>+12.4e}  {u.rule:<13} {u.category:<16} {u.unit}")
        n_legit = sum(1 for u in self.units if not u.expected)
        lines.append(f"{len(self.units)} units; {n_legit} (~) need not conserve (biases, softmax, ...)")
        if self.flagged:
            lines.append(f"FLAGGED ({len(self.flagged)}): relevance not conserved where the rule should "
                         f"conserve it (rtol {self.rtol:g}):")
            lines.extend(f"  {u.unit}: {u.problem} ({u.reason})" for u in self.flagged)
        else:
            lines.append(f"nothing unexpected: every unit that should conserve relevance does (rtol {self.rtol:g})")
        return "\n".join(lines)


def _session(model: onnx.ModelProto, base_dir: str | None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if base_dir:
        options.add_session_config_entry("session.model_external_initializers_file_folder_path", base_dir)
    try:
        return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise LRPError(f"onnxruntime cannot run the audited model ({str(exc).splitlines()[0][:300]})") from None


def instrument(model, *, rules="attnlrp", source=None, output=None, overrides=None, seed_input=None):
    """Convert `model` in memory with the audit's extra output; returns (converted model, probe,
    base directory of external weights, rule set mapping, GraphView of the conversion)."""
    from ..pipeline import convert, load_model

    original, base_dir = load_model(model)
    rule_set = RULE_SETS[rules] if isinstance(rules, str) and rules in RULE_SETS else \
        (dict(rules) if isinstance(rules, dict) else {})
    probe = _Probe()
    views = []
    if seed_input is None:
        seed_input = _needs_seed_input(original, output)
    converted = convert(original, rules=rules, source=source, output=output, overrides=overrides,
                        seed_input=seed_input, _probe=_Capture(probe, views))
    if probe.pieces:
        converted.graph.node.append(helper.make_node("Concat", probe.pieces, [AUDIT_OUTPUT], axis=0,
                                                     name=f"lrp/{AUDIT_OUTPUT}"))
        converted.graph.output.append(helper.make_tensor_value_info(AUDIT_OUTPUT, TensorProto.DOUBLE,
                                                                    [probe.length]))
    return converted, probe, base_dir, rule_set, views[0] if views else None, original


class _Capture:
    """The probe, remembering the conversion's GraphView (for constant values and shapes)."""

    def __init__(self, probe, views):
        self.probe, self.views = probe, views

    def __call__(self, b, unit, gy, grads, wants):
        if not self.views:
            self.views.append(b.view)
        self.probe(b, unit, gy, grads, wants)


def _needs_seed_input(model: onnx.ModelProto, output: str | None) -> bool:
    """An explained output of rank other than 1-3 has no target/position seed: use a random one."""
    outs = {o.name: o for o in model.graph.output}
    vi = outs.get(output) if output else (model.graph.output[0] if model.graph.output else None)
    if vi is None or not vi.type.tensor_type.HasField("shape"):
        return False
    return len(vi.type.tensor_type.shape.dim) not in (1, 2, 3)


def audit(model, rules: str | dict = "attnlrp", feeds: dict | None = None, *, overrides: dict | None = None,
          source=None, output: str | None = None, seed: int = 0, rtol: float = DEFAULT_RTOL,
          dims: dict | None = None) -> AuditReport:
    """Run `model` converted under `rules` and compare, unit by unit, the relevance entering each
    unit with the relevance it hands to its inputs. `feeds`: input name -> array; inputs not given
    get default_feeds(seed, dims). Returns an AuditReport (report.flagged: the unexpected units)."""
    if not (isinstance(rtol, (int, float)) and rtol >= 0 and np.isfinite(rtol)):
        raise LRPError(f"rtol must be a finite number >= 0, got {rtol!r}")
    converted, probe, base_dir, rule_set, view, original = instrument(
        model, rules=rules, source=source, output=output, overrides=overrides)
    meta = json.loads(next(p.value for p in converted.metadata_props if p.key == "lrp_onnx"))
    session = _session(converted, base_dir)
    input_names = {i.name for i in session.get_inputs()}
    given = {}
    for name, value in (feeds or {}).items():
        if name not in input_names:
            raise LRPError(f"feed '{name}': the model has no input of that name; inputs are: "
                           f"{', '.join(i.name for i in original.graph.input)}")
        given[name] = np.asarray(value)
    run_feeds = {**default_feeds(original, seed, dims, given=given), **given}
    if "lrp_seed" in input_names:
        out_name = meta["explained_output"]
        shape = _run_shape(original, base_dir, run_feeds, out_name)
        run_feeds["lrp_seed"] = np.random.default_rng(seed + 1).standard_normal(shape).astype(
            next(helper.tensor_dtype_to_np_dtype(o.type.tensor_type.elem_type)
                 for o in converted.graph.output if o.name == out_name))
    run_feeds = {k: v for k, v in run_feeds.items() if k in input_names}
    from ..run.session import input_defaults

    run_feeds = {**input_defaults(session), **run_feeds}  # the argmax at the last position
    names = [o.name for o in session.get_outputs()]
    try:
        values = dict(zip(names, session.run(None, run_feeds)))
    except Exception as exc:
        raise LRPError(f"onnxruntime failed to run the audited model ({str(exc).splitlines()[0][:300]})") from None
    report = AuditReport(meta["rules"], meta["explained_output"], list(meta["sources"]), float(rtol))
    logit = values.get("lrp_selected_logit")
    report.logit = float(np.asarray(logit, np.float64).sum()) if logit is not None else None
    report.source_relevance = float(sum(np.asarray(values[n], np.float64).sum()
                                        for n in meta["relevance_outputs"] if n not in meta.get("latent", {})))
    vector = values.get(AUDIT_OUTPUT, np.zeros(0))
    report.units = [_unit_audit(view, rec, vector, rule_set, rtol) for rec in probe.records]
    return report


def _run_shape(model, base_dir, feeds, output) -> tuple:
    session = _session(model, base_dir)
    names = {i.name for i in session.get_inputs()}
    return session.run([output], {k: v for k, v in feeds.items() if k in names})[0].shape


def _unit_audit(view: GraphView, rec: _Record, vector: np.ndarray, rule_set: dict, rtol: float) -> UnitAudit:
    u = rec.unit
    pos = rec.offset
    r_out = mass = 0.0
    for _ in rec.outputs:
        r_out += float(vector[pos])
        mass += float(vector[pos + 1])
        pos += 2
    shares = {}
    for _, x in rec.inputs:
        shares[x] = shares.get(x, 0.0) + float(vector[pos])
        mass += float(vector[pos + 1])
        pos += 2
    r_in = float(sum(shares.values()))
    lost = float(vector[pos]) if rec.at_zero else 0.0
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = float(np.float64(r_in) / np.float64(r_out)) if r_out != 0 else (1.0 if r_in == 0 else float("inf"))
    exp = expectation(view, u, rec.on_path, rule_set)
    tol = rtol * mass
    problem = ""
    if exp.conserves and not abs(r_in - (r_out - lost)) <= tol:
        problem = f"sum(R_in) {r_in:+.6g} != sum(R_out) {r_out:+.6g} (ratio {ratio:.6g})"
        if lost:
            problem += f", of which the identity rule's stabilizer keeps {lost:+.6g}"
    elif exp.split >= 2:
        values = [float(vector[rec.offset + 2 * len(rec.outputs) + 2 * j]) for j in range(len(rec.inputs))]
        if len(values) == exp.split and any(not abs(v - r_out / exp.split) <= tol for v in values):
            problem = f"operands get {', '.join(f'{v:+.6g}' for v in values)}, not 1/{exp.split} of {r_out:+.6g} each"
    category = u.categories[0] if u.categories else u.op_type
    reason = exp.reason
    if abs(lost) > tol:
        reason += (f"; its stabilizer keeps {lost:+.6g} of R_out (y*eps/(x+eps): all of f(0)*grad where the "
                   f"input is exactly 0, as in LXT)")
    return UnitAudit(u.describe(view), u.op_type, u.rule, category, r_out, r_in, ratio, shares, mass,
                     exp.conserves, reason, bool(problem), problem, lost)


def parse_feed_args(items: list[str] | None) -> dict:
    """--feed name=file.npy (repeatable) -> {name: array}."""
    feeds = {}
    for item in items or []:
        if "=" not in item:
            raise LRPError(f"--feed '{item}': expected NAME=FILE.npy")
        name, path = item.split("=", 1)
        if not os.path.isfile(path):
            raise LRPError(f"--feed {name}: {path}: no such file")
        try:
            feeds[name] = np.load(path, allow_pickle=False)
        except Exception as exc:
            raise LRPError(f"--feed {name}: {path}: not a .npy array ({exc.__class__.__name__})") from None
    return feeds
