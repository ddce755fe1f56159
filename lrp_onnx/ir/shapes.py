"""Shapes and types of every tensor, for the analysis and the rewrites.

onnxruntime's symbolic shape inference first (it knows contrib ops and resolves symbolic dims
through Reshape/Expand), onnx's inference as fallback, always on a weight-free copy of the graph.
"""
from __future__ import annotations

import contextlib
import io
import logging
import warnings

import numpy as np
import onnx
from onnx import TensorProto, helper

from .graph import has_subgraph
from .ranks import fill_ranks


# contrib ops whose first output has the shape and type of (input 0 op input 1): for shape inference
SHAPE_PROXIES = {"BiasGelu": "Add", "FastGelu": "Identity", "Gelu": "Identity", "QuickGelu": "Identity",
                 "SkipLayerNormalization": "Add", "SkipSimplifiedLayerNormalization": "Add",
                 "SimplifiedLayerNormalization": "Identity", "FusedMatMul": "MatMul", "BiasAdd": "Add"}


def _shape_proxy(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy in which onnxruntime's fused ops are replaced by standard ops of the same output
    shape, so onnx's shape inference runs through them. Used for shapes only, never run."""
    proxy = onnx.ModelProto()
    proxy.CopyFrom(model)
    for n in proxy.graph.node:
        if _is_ort_fused(n):
            op = SHAPE_PROXIES[n.op_type]
            inputs = list(n.input[:2]) if op in ("Add", "MatMul") else [n.input[0]]
            outputs = list(n.output)
            if n.op_type.startswith("Skip") and len(outputs) > 3 and outputs[3]:
                extra = helper.make_node("Add", inputs, [outputs[3]])
                proxy.graph.node.append(extra)  # appended out of order: inference only needs types
            n.CopyFrom(helper.make_node(op, inputs, [outputs[0]], name=n.name))
    onnx_nodes = list(proxy.graph.node)
    del proxy.graph.node[:]
    proxy.graph.node.extend(_topological(onnx_nodes, proxy))
    return proxy


def _topological(nodes, model):
    available = {i.name for i in model.graph.input} | {t.name for t in model.graph.initializer}
    ordered, pending = [], list(nodes)
    while pending:
        rest = []
        for n in pending:
            if all((not t) or t in available for t in n.input):
                ordered.append(n)
                available.update(n.output)
            else:
                rest.append(n)
        if len(rest) == len(pending):
            ordered.extend(rest)
            break
        pending = rest
    return ordered


def _is_ort_fused(node) -> bool:
    # onnxruntime registers SimplifiedLayerNormalization in the ONNX domain, unknown to onnx itself
    return node.op_type in SHAPE_PROXIES and (node.domain == "com.microsoft" or
                                              node.op_type == "SimplifiedLayerNormalization")


def _without_weight_data(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy whose large initializers are typed graph inputs instead: shape inference needs their
    type and dims only, and serializing hundreds of MB of weights for it dominated conversion time."""
    graph = model.graph
    light = onnx.ModelProto(ir_version=model.ir_version)
    light.opset_import.extend(model.opset_import)
    light.functions.extend(model.functions)
    light.graph.name = graph.name
    for part in ("node", "input", "output", "value_info", "sparse_initializer"):
        getattr(light.graph, part).extend(getattr(graph, part))
    input_names = {i.name for i in graph.input}
    for init in graph.initializer:
        if int(np.prod(init.dims, dtype=np.int64)) <= 64 and init.data_location != TensorProto.EXTERNAL:
            light.graph.initializer.append(init)
        elif init.name not in input_names:
            light.graph.input.append(helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
    return light


def _element_type(model: onnx.ModelProto, name: str):
    """The element type of an initializer or graph input, or of one reached back through layout ops."""
    producers = {o: n for n in model.graph.node for o in n.output}
    declared = {t.name: t.data_type for t in model.graph.initializer}
    declared.update({i.name: i.type.tensor_type.elem_type for i in model.graph.input})
    while name not in declared and name in producers and producers[name].op_type in (
            "Reshape", "Transpose", "Identity", "Squeeze", "Unsqueeze", "Flatten"):
        name = producers[name].input[0]
    return declared.get(name)


def _gather_block_quantized_proxy(model: onnx.ModelProto) -> None:
    """onnxruntime's symbolic inference types GatherBlockQuantized as a Gather of its data: a uint8 table
    packs 8 // bits values per byte along the quantize axis, so the width comes out halved (4-bit), the
    next MatMulNBits' check fails and the whole graph falls back to onnx's inference, which loses the
    symbolic dims of everything after (Range, Expand, Reshape: un-broadcasting at run time). Here, for
    shapes only: Gather(Concat of 8 // bits copies of Cast(data) along the quantize axis) in the scales' type."""
    nodes = []
    for n in model.graph.node:
        if n.domain != "com.microsoft" or n.op_type != "GatherBlockQuantized":
            nodes.append(n)
            continue
        a = {x.name: helper.get_attribute_value(x) for x in n.attribute}
        bits, gather_axis, quantize_axis = a.get("bits", 4), a.get("gather_axis", 0), a.get("quantize_axis", 1)
        data, out = n.input[0], n.output[0]
        scale_type = _element_type(model, n.input[2]) or TensorProto.FLOAT
        table = f"{out}/lrp_proxy_table"
        nodes.append(helper.make_node("Cast", [data], [table], to=scale_type))
        if _element_type(model, data) in (TensorProto.UINT8, None) and bits < 8:
            packed = table
            table = f"{out}/lrp_proxy_unpacked"
            nodes.append(helper.make_node("Concat", [packed] * (8 // bits), [table], axis=quantize_axis))
        nodes.append(helper.make_node("Gather", [table, n.input[1]], [out], axis=gather_axis, name=n.name))
    del model.graph.node[:]
    model.graph.node.extend(nodes)


def _quantized_matmul_proxy(model: onnx.ModelProto) -> onnx.ModelProto:
    """Standard ops of the same output type and shape for onnxruntime's quantized MatMuls, whose float
    output the symbolic inference types as its integer operand (and propagates that type on)."""
    nodes = []
    for n in model.graph.node:
        if n.domain == "com.microsoft" and n.op_type in ("MatMulIntegerToFloat", "DynamicQuantizeMatMul"):
            cast = [f"{n.output[0]}/lrp_proxy_{i}" for i in range(2)]
            to = helper.make_node("Cast", [n.input[0]], [cast[0]], to=TensorProto.FLOAT)  # scales: float32
            tw = helper.make_node("Cast", [n.input[1]], [cast[1]], to=TensorProto.FLOAT)
            nodes += [to, tw, helper.make_node("MatMul", cast, [n.output[0]], name=n.name)]
        else:
            nodes.append(n)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return model


def infer_shapes(model: onnx.ModelProto) -> onnx.ModelProto | None:
    """Shapes and types of every tensor. onnxruntime's symbolic inference first: it resolves the
    symbolic dims through Reshape/Expand (heads, batch, sequence), so un-broadcasting is decided
    at conversion time instead of by shape arithmetic at run time; onnx's inference as fallback."""
    model = _without_weight_data(model)
    if any(n.op_type in ("MatMulIntegerToFloat", "DynamicQuantizeMatMul") for n in model.graph.node):
        model = _quantized_matmul_proxy(model)
    if any(n.op_type == "GatherBlockQuantized" for n in model.graph.node):
        _gather_block_quantized_proxy(model)
    return _infer_shapes(model)


@contextlib.contextmanager
def _quiet():
    """Shape inference talks ("Unable to determine if seq <= ...") on stdout, stderr and through logging;
    a refusal must print its one error line only."""
    loggers = [logging.getLogger(name) for name in ("onnxruntime.tools.symbolic_shape_infer", "_lrp_symbolic_shape_infer", "onnxruntime",
                                                     "onnx")]
    saved = [(lg, lg.level, lg.propagate) for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL + 1)
        lg.propagate = False
    previous_disable = logging.root.manager.disable
    logging.disable(logging.CRITICAL)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()), \
                warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(previous_disable)
        for lg, level, propagate in saved:
            lg.setLevel(level)
            lg.propagate = propagate


def _symbolic_inference_unreliable(model: onnx.ModelProto) -> bool:
    """onnxruntime's symbolic inference gets the length of a Slice with a negative step wrong (x[::-1]
    of length 8 comes out as 7) and the rank of a Resize with an `axes` attribute: such graphs take
    onnx's inference."""
    if any(n.op_type == "Resize" and any(a.name == "axes" for a in n.attribute) for n in model.graph.node):
        return True
    consts = {i.name: i for i in model.graph.initializer}
    consts.update({n.output[0]: a.t for n in model.graph.node if n.op_type == "Constant"
                   for a in n.attribute if a.name == "value"})
    for n in model.graph.node:
        if n.op_type == "Slice" and len(n.input) > 4 and n.input[4]:
            steps = consts.get(n.input[4])
            if steps is None or steps.data_location == onnx.TensorProto.EXTERNAL \
                    or (onnx.numpy_helper.to_array(steps) < 0).any():
                return True
    return False


def _infer_shapes(model: onnx.ModelProto) -> onnx.ModelProto | None:
    with _quiet():
        inferred = _infer_shapes_loud(model)
    if inferred is not None and any(has_subgraph(n) for n in model.graph.node):
        with _quiet():
            inferred = _reconcile_control_flow(model, inferred)
    if inferred is not None:
        fill_ranks(model, inferred)  # ranks the graph determines where the sizes are not known
    return inferred


def _reconcile_control_flow(model: onnx.ModelProto, inferred: onnx.ModelProto) -> onnx.ModelProto:
    """onnxruntime's symbolic inference types an If's output like one of its branches, even where
    the branches disagree in rank (squeeze of a dynamic dim); everything downstream of a node with
    subgraphs takes onnx's inference instead (which leaves such a shape unknown)."""
    downstream = set()
    for n in model.graph.node:
        if has_subgraph(n) or any(t in downstream for t in n.input):
            downstream.update(o for o in n.output if o)
    try:
        checked = onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception:
        checked = model
    known = {vi.name: vi for vi in list(checked.graph.value_info) + list(checked.graph.output)}
    for container in (inferred.graph.value_info, inferred.graph.output):
        for vi in container:
            if vi.name not in downstream:
                continue
            if vi.name in known:
                vi.type.CopyFrom(known[vi.name].type)
            elif vi.type.HasField("tensor_type"):
                vi.type.tensor_type.ClearField("shape")
    return inferred


def _symbolic_shape_inference():
    """onnxruntime's SymbolicShapeInference class, loaded from its file: importing it as
    onnxruntime.tools.symbolic_shape_infer runs onnxruntime/tools/__init__.py, which imports PyTorch
    when it is installed (1.6 s of a 30-layer conversion, and no conversion needs PyTorch)."""
    import sys

    name = "onnxruntime.tools.symbolic_shape_infer"
    module = sys.modules.get(name) or sys.modules.get("_lrp_symbolic_shape_infer")
    if module is None:
        import importlib.util
        import os

        import onnxruntime

        path = os.path.join(os.path.dirname(onnxruntime.__file__), "tools", "symbolic_shape_infer.py")
        spec = importlib.util.spec_from_file_location("_lrp_symbolic_shape_infer", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    return module.SymbolicShapeInference


def _infer_shapes_loud(model: onnx.ModelProto) -> onnx.ModelProto | None:
    try:
        if _symbolic_inference_unreliable(model):
            raise ValueError("onnx's shape inference instead")
        inferred = _symbolic_shape_inference().infer_shapes(model, auto_merge=True, guess_output_rank=True)
        if inferred is not None:
            return inferred
    except Exception:
        pass
    if any(_is_ort_fused(n) for n in model.graph.node):
        model = _shape_proxy(model)
    try:
        return onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception:
        try:
            return onnx.shape_inference.infer_shapes(model)
        except Exception:
            return None
