"""Rematerialization: the backward reads only forward tensors that onnxruntime's optimized forward
still computes as they are; the others it recomputes from those.

onnxruntime fuses chains of cheap ops into one kernel when a session starts with its default
(all) graph optimizations: a written-out LayerNorm/RMSNorm becomes LayerNormalization /
SimplifiedLayerNormalization (fp32 statistics inside), a residual Add before it SkipLayerNormalization,
an erf/tanh GELU (with its bias Add) Gelu/BiasGelu/FastGelu, DynamicQuantizeLinear -> MatMulInteger ->
Cast -> Mul a DynamicQuantizeMatMul / MatMulIntegerToFloat, Gemm -> activation a FusedGemm. A fusion
fires only if the chain's inner tensors have no reader outside it. If the backward read one of them
(a norm's std, a GELU's input, a quantization scale) the converted model's forward would run unfused:
other round-off in fp32 (amplified by int8 re-quantization), overflow in fp16. For half-precision
models the CPU provider goes further: it runs fp16 chains in fp32 and keeps an fp16 node in fp16 once
any other node reads its fp16 output, so reading any half-precision intermediate changes the forward.

So after the backward is emitted, every forward tensor it reads that a fusion may hide is replaced by
a recomputation in the backward (`lrp/remat/...`): a renamed copy of the ops that produce it, back to
tensors no fusion hides (graph inputs, constants, outputs of heavy ops and fused kernels: MatMul,
Gemm, Conv, Softmax, Gather, LayerNormalization...). Only cheap ops are copied (elementwise,
reductions, reshapes), so the cost is a few memory-bound passes. The float result of an integer
kernel (Cast, scale Mul, bias Add after MatMulInteger: MatMulIntegerToFloat's output) is read as is.
For half-precision models every half-precision intermediate is recomputed, in fp32
(precision.promote_backward_to_fp32 turns the copies to fp32 afterwards): the backward reads only
graph inputs, constants, and lookups in the model's own tables (an embedding Gather, repeated in half
precision and cast, so the table is never cast to fp32); relevance is that of the fp32 forward, which
on CPU is the forward onnxruntime runs. One fusion is still given up: Gemm -> activation (FusedGemm),
whose Gemm output the identity rule reads (recomputing it would repeat the Gemm); the activation is
applied to the Gemm's result either way (outputs bit-identical on the tiny bert's pooler).

A copy must not be merged back into the forward by onnxruntime's common-subexpression elimination
(which would make the forward tensor read again): each recomputation reads its forward inputs as
Reshape(t, Shape(t)), a tensor equal to t that no forward node reads and that onnxruntime's CPU
Reshape aliases instead of copying (fp32 models: onnxruntime removes a Cast to the same type or an
Identity before it looks for common subexpressions; the earlier Max(t, t) copied every read tensor;
in half models the fp32 casts of precision.py play that role). A DynamicQuantizeLinear scale is recomputed as the operator
defines it, (max(0, max x) - min(0, min x)) / 255, so no quantization op is copied.
"""
from __future__ import annotations

import onnx
from onnx import TensorProto, helper

from ..ir.builder import Builder
from ..ir.graph import TensorInfo
from .precision import HALF

PREFIX = "lrp/remat/"

# ops whose outputs onnxruntime may fuse away, cheap to recompute (elementwise, reductions, norms,
# data movement); the outputs of any other op are read from the forward as they are
ELEMENTWISE = {
    "Abs", "Neg", "Exp", "Log", "Sqrt", "Reciprocal", "Erf", "Tanh", "Sigmoid", "Relu", "LeakyRelu", "Elu",
    "Selu", "Celu", "Softplus", "Softsign", "HardSigmoid", "HardSwish", "Mish", "Gelu", "Sin", "Cos",
    "Floor", "Ceil", "Round", "Sign", "Clip", "Cast", "CastLike", "Identity", "Add", "Sub", "Mul", "Div",
    "Pow", "Max", "Min", "Mean", "Sum", "Where", "PRelu", "Mod", "Dropout",
}
REDUCTIONS = {"ReduceMean", "ReduceSum", "ReduceSumSquare", "ReduceMax", "ReduceMin", "ReduceL1", "ReduceL2",
              "ReduceProd", "ReduceLogSumExp", "ReduceLogSum"}
MOVEMENT = {"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Expand", "Slice", "Concat", "Split",
            "Tile"}
RECOMPUTABLE = ELEMENTWISE | REDUCTIONS | MOVEMENT
SELECTIONS = {"Gather", "GatherElements", "GatherND", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten",
              "Slice", "Expand", "Tile", "Identity"}  # outputs are values of their first input
ANCHOR_TYPES = {TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.INT32, TensorProto.INT64}


def recomputable(node: onnx.NodeProto) -> bool:
    """An op whose output a fusion may hide and that is cheap to recompute. Fused ops themselves
    (LayerNormalization, Gelu, SkipLayerNormalization ...) are kernels whose outputs stay."""
    return node.domain in ("", "ai.onnx") and node.op_type in RECOMPUTABLE


def rematerialize(b: Builder, backward: list[onnx.NodeProto], half: bool) -> int:
    """Rewrite `backward` (in place) so that it reads only forward tensors that no onnxruntime fusion
    hides; prepend the recomputations. Returns the number of forward tensors recomputed."""
    view = b.view
    outputs = set(view.graph_outputs)
    own = {o for n in backward for o in n.output if o}
    copies: dict[str, str] = {}
    anchors: dict[str, str] = {}
    added: list[onnx.NodeProto] = []

    kinds: dict[str, str] = {}

    def hidden(t: str) -> bool:
        """Whether a fusion may hide forward tensor t (so the backward must not read it)."""
        return bool(t) and _kind(t) in ("recompute", "scale", "select")

    def _kind(t: str) -> str:
        """exposed: read as is; recompute: copy its producers; scale: a DynamicQuantizeLinear scale;
        epilogue: the float result of an integer kernel (Cast, scale Mul, bias Add after MatMulInteger),
        fused into it (MatMulIntegerToFloat), read as is."""
        if t not in kinds:
            kinds[t] = _classify(t)
        return kinds[t]

    def _classify(t: str) -> str:
        if t in own or t in outputs or t not in view.producer or view.is_constant(t):
            return "exposed"
        node = view.nodes[view.producer[t]]
        if node.op_type == "DynamicQuantizeLinear" and node.domain in ("", "ai.onnx"):
            return "scale" if t == node.output[1] else "exposed"
        if not view.is_float(t):
            return "exposed"
        if half and view.dtype(t) in HALF:
            # a lookup or view of half-precision data the model holds (an embedding table) is exact in any
            # precision: read it as is rather than cast the whole table to fp32
            data = node.input[0] if node.input else ""
            if node.op_type in SELECTIONS and data and (view.is_constant(data) or data in view.graph_inputs):
                return "select" if _index_input(view, node) is not None else "exposed"
            return "recompute"
        if not recomputable(node):
            return "exposed"
        # an op applying parameters (a scale, a bias) to an integer kernel's single-use output is its
        # epilogue: Cast, Mul by the scales, Add of a bias after MatMulInteger
        inputs = [i for i in node.input if i]
        for i in inputs:
            if len(view.consumers.get(i, [])) == 1 and i in view.producer and (
                    _integer_kernel_output(view, i) or _kind(i) == "epilogue") \
                    and all(j == i or _parameter_like(view, j) for j in inputs):
                return "epilogue"
        return "recompute"

    def anchor(t: str, force: bool = False) -> str:
        """Forward tensor t as a recomputation reads it: in fp32 models as Reshape(t, Shape(t)) (an alias,
        no copy), equal to t and read by no forward node, so common-subexpression elimination cannot merge the copy back into the
        forward (onnxruntime removes a Cast to the same type or an Identity first); in half models
        precision.py's fp32 casts do that."""
        if not force and (half and view.dtype(t) in HALF or not view.is_float(t) or view.is_constant(t)):
            return t
        if t not in anchors:
            anchors[t] = f"{PREFIX}read/{t}"
            shape = f"{PREFIX}read_shape/{t}"
            added.append(helper.make_node("Shape", [t], [shape], name=f"{PREFIX}read_shape_node/{t}"))
            added.append(helper.make_node("Reshape", [t, shape], [anchors[t]], name=f"{PREFIX}read_node/{t}"))
            view.info[anchors[t]] = view.info.get(t)
        return anchors[t]

    def copy_of(t: str) -> str:
        """The recomputed name of hidden forward tensor t (post-order: inputs first)."""
        stack = [t]
        while stack:
            top = stack[-1]
            if top in copies:
                stack.pop()
                continue
            node = view.nodes[view.producer[top]]
            if _kind(top) == "scale":
                x = node.input[0]
                if hidden(x) and x not in copies:
                    stack.append(x)
                    continue
                copies[top] = _quantization_scale(b, copies.get(x) or x, top, added)
                stack.pop()
                continue
            if _kind(top) == "select":  # Gather(table, Max(ids, ids)) in half precision, then cast
                k = _index_input(view, node)
                clone = _clone(node, [anchor(i, force=True) if j == k else i for j, i in enumerate(node.input)],
                               f"{PREFIX}half/")
                added.append(clone)
                for o, r in zip(node.output, clone.output):
                    if o:
                        cast = f"{PREFIX}fp32/{o}"
                        added.append(helper.make_node("Cast", [r], [cast], name=f"{PREFIX}fp32_node/{o}",
                                                      to=TensorProto.FLOAT))
                        copies[o] = cast
                        view.info[r] = view.info.get(o)
                        view.info[cast] = TensorInfo(TensorProto.FLOAT, view.shape(o))
                stack.pop()
                continue
            pending = [i for i in node.input if i and hidden(i) and i not in copies]
            if pending:
                stack.extend(pending)
                continue
            inputs = [copies[i] if i in copies else (anchor(i) if i else "") for i in node.input]
            if not any(i in copies or i in anchors for i in node.input if i):
                # only integer or constant inputs: anchor one, else the copy would merge with the forward node
                k = next((k for k, i in enumerate(node.input) if i and not view.is_constant(i)
                          and view.dtype(i) in ANCHOR_TYPES), None)
                if k is not None:
                    inputs[k] = anchor(node.input[k], force=True)
            clone = _clone(node, inputs, PREFIX)
            added.append(clone)
            for o, r in zip(node.output, clone.output):
                if o:
                    copies[o] = r
                    view.info[r] = view.info.get(o)
            stack.pop()
        return copies[t]

    for n in list(backward):
        for k, t in enumerate(n.input):
            if hidden(t):
                n.input[k] = copy_of(t)
    backward[:0] = added
    return sum(1 for t in copies if not t.startswith(PREFIX))


INTEGER_KERNELS = {"MatMulInteger", "ConvInteger", "DynamicQuantizeLinear", "QuantizeLinear", "QLinearMatMul",
                   "QLinearConv"}


def _integer_kernel_output(view, t: str) -> bool:
    node = view.nodes[view.producer[t]]
    return not view.is_float(t) and node.op_type in INTEGER_KERNELS


def _clone(node: onnx.NodeProto, inputs: list, prefix: str) -> onnx.NodeProto:
    clone = onnx.NodeProto()
    clone.CopyFrom(node)
    clone.name = f"{prefix}{node.name or node.op_type + '/' + node.output[0]}"  # unnamed nodes: by their output
    del clone.input[:]
    clone.input.extend(inputs)
    del clone.output[:]
    clone.output.extend(f"{prefix}{o}" if o else "" for o in node.output)
    return clone


def _index_input(view, node: onnx.NodeProto):
    """The position of a selection's non-constant integer input (Gather's indices), or None."""
    return next((k for k, i in enumerate(node.input[1:], 1) if i and not view.is_constant(i)
                 and view.dtype(i) in ANCHOR_TYPES), None)


def _parameter_like(view, t: str) -> bool:
    """A constant, or a scalar / vector (a quantization scale, a bias)."""
    rank = view.rank(t)
    return view.is_constant(t) or rank is not None and rank <= 1


def _quantization_scale(b: Builder, x: str, scale: str, added: list) -> str:
    """DynamicQuantizeLinear's y_scale of x: (max(0, max x) - min(0, min x)) / 255, over all of x."""
    dt = b.view.dtype(scale) or TensorProto.FLOAT
    zero, levels = b.scalar_like(0.0, scale), b.scalar_like(255.0, scale)
    start, scope = len(b.nodes), b.scope
    b.scope = "remat/quantization_scale"
    high = b.op("Max", [b.op("ReduceMax", [x], keepdims=0), zero])
    low = b.op("Min", [b.op("ReduceMin", [x], keepdims=0), zero])
    out = b.op("Div", [b.op("Sub", [high, low]), levels], dtype=dt, shape=[])
    added.extend(b.nodes[start:])  # built with the builder, moved to the recomputations
    del b.nodes[start:]
    b.scope = scope
    b.view.info[out] = TensorInfo(dt, [])
    return out
