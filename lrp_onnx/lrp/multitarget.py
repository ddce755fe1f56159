"""Several targets per row with one forward pass: `convert(..., multi_target=True)` (`--multi-target`).

Inputs of the converted model (a public contract, extending seed.py's):
  lrp_target   int64 [batch, K] (default [[-1]]): K targets per row; negative = the argmax
  lrp_position int64 [batch, K] (default [[-1]]): the position of each target (sequence outputs only)
               lrp_target and lrp_position broadcast together: [[-1]] with a [batch, K] partner is K argmaxes
               or K targets at the last position
  lrp_seed     float [batch, K, *explained output shape[1:]] (seed_input): K seeds per row
Outputs: every relevance output gets a target axis, [batch, K, *source shape[1:]], and
lrp_selected_target / lrp_selected_logit are [batch, K]. A (row, target) whose position or target is out of
range is flagged as in seed.py (-1, NaN), the others are unaffected.

How: the forward runs once, in the main graph. The backward -- exactly the single-target backward, node
for node -- runs once per target inside an ONNX Loop over the K columns, reading the forward's tensors
from the enclosing graph; each iteration's seed is the single-target seed of column k. Each of the K
relevances is therefore the single-target relevance, computed by the same nodes. With relevance_only the
head runs at the K positions only (canonicalize.select_position_before_head), once.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from ..ir.builder import Builder
from ..ir.graph import TensorInfo
from ..contract import POSITION_INPUT, SEED_INPUT, TARGET_INPUT
from .seed import Seed, build_seed, rename_output

LOOP_INDEX = "lrp/targets/k"
LOOP_CONDITION = "lrp/targets/condition"
TARGET_AXIS = "lrp_targets"


@dataclass
class TargetLoop:
    trip_count: str   # int64 scalar: K
    outer_nodes: int  # b.nodes[:outer_nodes] belong to the main graph, the rest to the loop body


def build_multi_seed(b: Builder, output: str, seed_input: bool, position_selected: bool = False) -> Seed:
    """The seed of target column LOOP_INDEX (nodes from seed.loop.outer_nodes on go into the loop body)."""
    view = b.view
    dtype = view.dtype(output) or TensorProto.FLOAT
    shape = view.shape(output)
    rank = len(shape) if shape is not None else None
    if seed_input:
        if shape is None:
            raise ValueError(f"multi-target seed input: the rank of the explained output '{output}' is unknown")
        dims = [shape[0], TARGET_AXIS] + list(shape[1:])
        seed = Seed("", inputs=[helper.make_tensor_value_info(SEED_INPUT, dtype, dims)])
        view.info[SEED_INPUT] = TensorInfo(dtype, dims)
        count = b.op("Slice", [b.shape_of(SEED_INPUT), b.ints([1]), b.ints([2])])
    else:
        if rank not in (2, 3):
            raise ValueError(f"the explained output '{output}' has rank {rank}; several targets per row work "
                             f"for rank 2-3 ([batch, classes], [batch, sequence, vocab]); use seed_input")
        seed = Seed("")
        seed.inputs.append(helper.make_tensor_value_info(TARGET_INPUT, TensorProto.INT64, ["lrp_batch", TARGET_AXIS]))
        seed.defaults.append(numpy_helper.from_array(np.array([[-1]], dtype=np.int64), TARGET_INPUT))
        given = [TARGET_INPUT]
        if rank == 3:
            given.append(POSITION_INPUT)
            if not position_selected:  # else declared by select_position_before_head
                seed.inputs.append(helper.make_tensor_value_info(POSITION_INPUT, TensorProto.INT64,
                                                                 ["lrp_batch", TARGET_AXIS]))
                seed.defaults.append(numpy_helper.from_array(np.array([[-1]], dtype=np.int64), POSITION_INPUT))
        columns = [b.op("Slice", [b.shape_of(t), b.ints([1]), b.ints([2])]) for t in given]
        count = columns[0] if len(columns) == 1 else b.op("Max", columns)
        batch = b.op("Slice", [b.shape_of(output), b.ints([0]), b.ints([1])])
        extent = b.op("Concat", [batch, count], axis=0)
        expanded = [b.op("Expand", [t, extent]) for t in given]
    trip_count = b.op("Squeeze", [count, b.ints([0])])
    outer = len(b.nodes)
    view.info[LOOP_INDEX] = TensorInfo(TensorProto.INT64, [])
    if seed_input:
        seed.gradient = b.op("Gather", [SEED_INPUT, LOOP_INDEX], axis=1, like=output)
    else:
        target = b.op("Gather", [expanded[0], LOOP_INDEX], axis=1)
        position = b.op("Gather", [expanded[1], LOOP_INDEX], axis=1) if rank == 3 else POSITION_INPUT
        single = build_seed(b, output, False, position_selected, target=target, position=position,
                            slot=LOOP_INDEX)
        seed.gradient, seed.outputs = single.gradient, single.outputs
    seed.loop = TargetLoop(trip_count, outer)
    return seed


def close_loop(b: Builder, seed: Seed, relevance: list[tuple]) -> dict:
    """Move the loop body (the seed of column k, the backward, the relevance products named
    `relevance_names`) into a Loop over the K targets; the stacked results come out as
    `relevance_names` [batch, K, ...] and seed.outputs [batch, K]. Returns the new seed.outputs.
    `relevance`: (output name, element type, rank of the source) of each relevance output."""
    loop = seed.loop
    body = b.nodes[loop.outer_nodes:]
    del b.nodes[loop.outer_nodes:]
    per_target, finals = [], []
    for name, elem_type, rank in relevance:
        if rank is None:
            raise ValueError(f"several targets per row: the rank of relevance output '{name}' is unknown")
        rename_output(body, name, f"{name}/per_target")
        per_target.append((f"{name}/per_target", elem_type, rank + 1))
        finals.append(name)
    outputs = {}
    for name, (tensor, vi) in seed.outputs.items():
        per_target.append((tensor, vi.type.tensor_type.elem_type, 2))
        finals.append(f"{name}/by_row")
        dims = [d.dim_param or d.dim_value or None for d in vi.type.tensor_type.shape.dim][:1] + [TARGET_AXIS]
        outputs[name] = (f"{name}/by_row", helper.make_tensor_value_info(name, vi.type.tensor_type.elem_type, dims))
    condition = f"{LOOP_CONDITION}/out"
    body.append(helper.make_node("Identity", [LOOP_CONDITION], [condition], name=f"{LOOP_CONDITION}/pass"))
    graph = helper.make_graph(
        body, "lrp_targets_backward",
        [helper.make_tensor_value_info(LOOP_INDEX, TensorProto.INT64, []),
         helper.make_tensor_value_info(LOOP_CONDITION, TensorProto.BOOL, [])],
        [helper.make_tensor_value_info(condition, TensorProto.BOOL, [])]
        + [helper.make_tensor_value_info(t, elem_type, None) for t, elem_type, _ in per_target])
    stacked = [b.fresh("stacked") for _ in per_target]
    b.nodes.append(helper.make_node("Loop", [loop.trip_count, ""], stacked, name=b.fresh("Loop_node"), body=graph))
    for (tensor, _, rank), s, final in zip(per_target, stacked, finals):
        perm = [1, 0] + list(range(2, rank))
        b.nodes.append(helper.make_node("Transpose", [s], [final], name=b.fresh("Transpose_node"), perm=perm))
    return outputs

