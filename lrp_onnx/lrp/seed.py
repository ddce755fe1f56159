"""Seed targets: which logit is explained, as graph inputs.

Inputs added to the converted model (a public contract, docs/contract.md; their names are in contract.py):
  lrp_target   int64 [batch] (feed [-1] for the default): class/vocab index per row; negative = the argmax
  lrp_position int64 [batch] (feed [-1] for the default): sequence position per row when the explained
               output has a sequence axis; Python-style negative indices count from the end
  Plain required inputs by default; `inputs="optional"` makes them optional(tensor(int64)) that
  onnxruntime's core may omit (finish_target_inputs).
  lrp_seed     float, the explained output's shape: replaces both (option seed_input)
Outputs: lrp_selected_target (int64 [batch]) and lrp_selected_logit ([batch]) say what was explained.

Out-of-range values are never wrapped twice or clamped: a row whose lrp_position lies outside
[-L, L-1] (L the sequence length) or whose lrp_target is >= the number of classes gets
lrp_selected_target = -1, lrp_selected_logit = NaN and NaN relevance (its seed is NaN), whatever the
execution provider (a failing Gather would not fail on every provider). The other rows are unaffected.
A consumer feeding these inputs directly checks lrp_selected_target >= 0; Explainer.run refuses such
values before running.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..ir.builder import Builder
from ..contract import DEFAULTED_INPUTS, INPUT_FORMS, POSITION_INPUT, SEED_INPUT, SELECTED_LOGIT, SELECTED_TARGET, \
    TARGET_INPUT
from ..ir.graph import TensorInfo

SELECTED_LENGTH = "lrp/at_position/length"  # the sequence length, in canonicalize.select_position_before_head


@dataclass
class Seed:
    gradient: str                                  # the gradient fed into the explained output
    inputs: list = field(default_factory=list)     # ValueInfoProto to add to the graph inputs
    defaults: list = field(default_factory=list)   # TensorProto initializers backing optional inputs
    outputs: dict = field(default_factory=dict)    # output name -> (tensor, ValueInfoProto)
    loop: object = None                            # multitarget.TargetLoop: several targets per row


def build_seed(b: Builder, output: str, seed_input: bool, position_selected: bool = False,
               target: str = TARGET_INPUT, position: str = POSITION_INPUT, slot: str | None = None) -> Seed:
    """`position_selected`: the output was already taken at lrp_position (relevance-only mode), so its
    sequence axis has length 1 and lrp_position is an input of the graph already.
    `target`, `position`: the int64 [batch] tensors to read instead of the graph inputs (multitarget.py
    passes one column of the [batch, K] inputs; the inputs are then declared there, not here);
    `slot`: with position_selected, the index along the selected axis (default 0)."""
    declare = target == TARGET_INPUT
    view = b.view
    dtype = view.dtype(output) or TensorProto.FLOAT
    shape = view.shape(output)
    if seed_input:
        dims = shape if shape is not None else None
        vi = helper.make_tensor_value_info(SEED_INPUT, dtype, dims)
        view.info[SEED_INPUT] = TensorInfo(dtype, shape)
        return Seed(SEED_INPUT, inputs=[vi])
    rank = len(shape) if shape is not None else None
    if rank not in (1, 2, 3):
        raise ValueError(f"the explained output '{output}' has rank {rank}; targets work for rank 1-3 "
                         f"([batch], [batch, classes], [batch, sequence, vocab]); use seed_input")
    if rank == 1:
        ones = b.op("ConstantOfShape", [b.shape_of(output)], like=output,
                    value=helper.make_tensor("value", dtype, [1], [1]))
        return Seed(ones)
    seed = Seed("")
    batch = b.op("Slice", [b.shape_of(output), b.ints([0]), b.ints([1])])
    requested_position = position
    target = b.op("Expand", [target, batch])
    if declare:
        seed.inputs.append(helper.make_tensor_value_info(TARGET_INPUT, TensorProto.INT64, ["lrp_batch"]))
        seed.defaults.append(numpy_helper.from_array(np.array([-1], dtype=np.int64), TARGET_INPUT))
    scores = output
    np_dtype = helper.tensor_dtype_to_np_dtype(dtype)
    zero = b.ints([0])
    valid = None  # bool [batch]: the row's position and target are in range (see the module docstring)
    if rank == 3:
        length = b.op("Slice", [b.shape_of(output), b.ints([1]), b.ints([2])])
        if position_selected:
            # the head already ran at lrp_position (canonicalize.select_position_before_head): check
            # the requested position against the full sequence length there
            if SELECTED_LENGTH in view.producer:
                valid = _position_in_range(b, b.op("Expand", [requested_position, batch]), SELECTED_LENGTH)[1]
            position = b.op("Expand", [zero if slot is None else b.op("Reshape", [slot, b.ints([1])]), batch])
        else:
            if declare:
                seed.inputs.append(helper.make_tensor_value_info(POSITION_INPUT, TensorProto.INT64, ["lrp_batch"]))
                seed.defaults.append(numpy_helper.from_array(np.array([-1], dtype=np.int64), POSITION_INPUT))
            position, valid = _position_in_range(b, b.op("Expand", [requested_position, batch]), length)
            position = b.op("Where", [valid, position, zero])  # an in-range index whatever was fed
        vocab = b.op("Slice", [b.shape_of(output), b.ints([2]), b.ints([3])])
        index = b.op("Expand", [b.op("Reshape", [position, b.ints([-1, 1, 1])]),
                                b.op("Concat", [batch, b.ints([1]), vocab], axis=0)])
        scores = b.op("Squeeze", [b.op("GatherElements", [output, index], axis=1), b.ints([1])])
        position_mask = b.op("Unsqueeze", [_one_hot(b, position, length, dtype), b.ints([2])])
    classes = b.op("Slice", [b.shape_of(scores), b.ints([1]), b.ints([2])])
    target_ok = b.op("Less", [target, classes])  # negative: the argmax
    valid = target_ok if valid is None else b.op("And", [valid, target_ok])
    argmax = b.op("ArgMax", [scores], axis=-1, keepdims=0)
    chosen = b.op("Where", [b.op("Less", [target, zero]), argmax, target])
    chosen = b.op("Where", [valid, chosen, zero])
    target_mask = _one_hot(b, chosen, classes, dtype)
    if rank == 3:
        gradient = b.op("Mul", [position_mask, b.op("Unsqueeze", [target_mask, b.ints([1])])])
    else:
        gradient = target_mask
    nan = b.const(np.array(np.nan, dtype=np_dtype))
    row_shape = b.ints([-1, 1, 1] if rank == 3 else [-1, 1])
    gradient = b.op("Where", [b.op("Reshape", [valid, row_shape]), gradient, nan], dtype=dtype, shape=shape)
    logit = b.op("Squeeze", [b.op("GatherElements", [scores, b.op("Unsqueeze", [chosen, b.ints([1])])],
                                  axis=1), b.ints([1])])
    logit = b.op("Where", [valid, logit, nan])
    chosen = b.op("Where", [valid, chosen, b.ints([-1])])
    seed.gradient = gradient
    seed.outputs[SELECTED_TARGET] = (chosen, helper.make_tensor_value_info(
        SELECTED_TARGET, TensorProto.INT64, [shape[0]]))
    seed.outputs[SELECTED_LOGIT] = (logit, helper.make_tensor_value_info(SELECTED_LOGIT, dtype, [shape[0]]))
    return seed


def _one_hot(b: Builder, index: str, depth: str, dtype: int) -> str:
    """OneHot(index, depth) along a new last axis in `dtype`, written Cast(Equal(index[..., None],
    Range(0, depth))): `depth` is a shape (the classes, the sequence length), and TensorRT's ONNX parser
    takes OneHot only with a build-time constant depth."""
    columns = b.op("Range", [b.const(np.array(0, np.int64)), b.op("Squeeze", [depth, b.ints([0])]),
                             b.const(np.array(1, np.int64))])
    return b.op("Cast", [b.op("Equal", [b.op("Unsqueeze", [index, b.ints([-1])]), columns])], to=dtype)


def _position_in_range(b: Builder, position: str, length: str) -> tuple[str, str]:
    """(position counted from the start, whether it lies in [0, length)): a negative position counts
    from the end once (Python's rule), so only [-length, length - 1] is valid."""
    zero = b.ints([0])
    position = b.op("Where", [b.op("Less", [position, zero]), b.op("Add", [position, length]), position])
    valid = b.op("And", [b.op("GreaterOrEqual", [position, zero]), b.op("Less", [position, length])])
    return position, valid


def rename_output(nodes: list[onnx.NodeProto], old: str, new: str) -> None:
    for n in nodes:
        for k, o in enumerate(n.output):
            if o == old:
                n.output[k] = new


def finish_target_inputs(model: onnx.ModelProto, form: str = "plain") -> dict:
    """Give the inputs lrp_target / lrp_position, declared during conversion as inputs backed by an
    initializer of the same name, their final form; returns {name: default value as a list}.

    plain (default): ordinary required int64 inputs; the caller feeds -1 for the default. Every runtime
      runs this form and lets the caller choose: onnxruntime (Python, C/C++, Node.js, WASM), OpenVINO,
      TensorRT. (OpenVINO and onnxruntime-node treat an input backed by an initializer as the constant.)
    optional: inputs of type optional(tensor(int64)) resolved in the graph by
      If(OptionalHasElement(x), OptionalGetElement(x), default): onnxruntime's core (Python, C/C++) may
      omit them. Needs opset >= 15 (older graphs keep the initializer form); OpenVINO cannot read it."""
    if form not in INPUT_FORMS:
        raise ValueError(f"inputs '{form}': choose one of {', '.join(INPUT_FORMS)}")
    g = model.graph
    inputs = {vi.name for vi in g.input if vi.name in DEFAULTED_INPUTS}
    defaults = {t.name: numpy_helper.to_array(t).tolist() for t in g.initializer if t.name in inputs}
    if form == "optional":
        optional_defaults(model)
    else:
        for k in reversed([k for k, t in enumerate(g.initializer) if t.name in defaults]):
            del g.initializer[k]  # in place: rebuilding the list would copy every weight
    return defaults


def optional_defaults(model: onnx.ModelProto, names=DEFAULTED_INPUTS) -> None:
    """Turn the initializer-backed inputs `names` into inputs of type optional(tensor(int64)) resolved
    in the graph: If(OptionalHasElement(x), OptionalGetElement(x), default). Feeding nothing still
    gives the default, and onnxruntime no longer warns "Initializer ... appears in graph inputs".
    Needs opset >= 15 (the Optional ops); older graphs keep the initializer form."""
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < 15:
        return
    g = model.graph
    defaults = {t.name: t for t in g.initializer if t.name in names}
    inputs = {vi.name: vi for vi in g.input if vi.name in defaults}
    new_nodes = []
    for name, vi in inputs.items():
        default = defaults[name]
        resolved = f"{name}/resolved"
        for n in g.node:
            for k, i in enumerate(n.input):
                if i == name:
                    n.input[k] = resolved
        tensor_type = onnx.TypeProto()
        tensor_type.CopyFrom(vi.type)
        vi.type.ClearField("tensor_type")
        vi.type.optional_type.elem_type.CopyFrom(tensor_type)
        given = helper.make_graph(
            [helper.make_node("OptionalGetElement", [name], [f"{name}/given"])], f"{name}_given", [],
            [helper.make_tensor_value_info(f"{name}/given", default.data_type, [None])])
        fallback = helper.make_graph(
            [helper.make_node("Constant", [], [f"{name}/default"], value=default)], f"{name}_default", [],
            [helper.make_tensor_value_info(f"{name}/default", default.data_type, [None])])
        new_nodes += [helper.make_node("OptionalHasElement", [name], [f"{name}/fed"], name=f"lrp/{name}/fed"),
                      helper.make_node("If", [f"{name}/fed"], [resolved], name=f"lrp/{name}/default",
                                       then_branch=given, else_branch=fallback)]
    if not inputs:
        return
    for k in reversed([k for k, t in enumerate(g.initializer) if t.name in inputs]):
        del g.initializer[k]  # in place: rebuilding the list would copy every weight
    nodes = new_nodes + list(g.node)
    del g.node[:]
    g.node.extend(nodes)
    model.ir_version = max(model.ir_version, 8)  # optional types: IR version 8
