"""A small PyTorch interpreter for the ONNX ops of the model-zoo classics (tests/test_onnx_zoo.py): their
graphs run in float64 under torch.autograd, an independent reference for gradient-mode relevance.
Only the ops and attributes those graphs use; anything else raises."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from onnx import helper, numpy_helper


def _attrs(node):
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _pad(x, pads, value=0.0):
    """ONNX pads [h_begin, w_begin, h_end, w_end] applied explicitly (F.pad takes the last axis first)."""
    k = len(pads) // 2
    order = []
    for axis in reversed(range(k)):
        order += [pads[axis], pads[axis + k]]
    return F.pad(x, order, value=value) if any(pads) else x


def run(model, feeds: dict, outputs: list[str], constant_statistics: bool = False) -> dict:
    """Values of `outputs` for `feeds` (name -> torch tensor; the first float feed's dtype is used
    throughout). constant_statistics: LRN's window statistic is detached (AttnLRP's norm rule, the
    way LXT detaches a norm's statistic)."""
    env = {t.name: torch.from_numpy(numpy_helper.to_array(t).copy()) for t in model.graph.initializer}
    dtype = next((v.dtype for v in feeds.values() if v.is_floating_point()), torch.float64)
    env = {k: v.to(dtype) if v.is_floating_point() else v for k, v in env.items()}
    env.update(feeds)
    for n in model.graph.node:
        a, x = _attrs(n), [env[i] if i else None for i in n.input]
        op = n.op_type
        if op == "Constant":
            y = torch.from_numpy(numpy_helper.to_array(a["value"]).copy())
            y = y.to(dtype) if y.is_floating_point() else y
        elif op == "Conv":
            k = len(a.get("kernel_shape", x[1].shape[2:]))
            y = F.conv2d(_pad(x[0], a.get("pads", [0] * 2 * k)), x[1], x[2] if len(x) > 2 else None,
                         a.get("strides", [1] * k), 0, a.get("dilations", [1] * k), a.get("group", 1))
        elif op in ("MaxPool", "AveragePool"):
            k = len(a["kernel_shape"])
            pads = a.get("pads", [0] * 2 * k)
            if a.get("ceil_mode", 0) or a.get("auto_pad", "NOTSET") not in ("NOTSET", b"NOTSET"):
                raise NotImplementedError("ceil_mode / auto_pad")
            common = dict(kernel_size=a["kernel_shape"], stride=a.get("strides", [1] * k))
            if op == "MaxPool":
                y = F.max_pool2d(_pad(x[0], pads, float("-inf")), **common)
            else:
                total = F.avg_pool2d(_pad(x[0], pads), **common)
                if not a.get("count_include_pad", 0) and any(pads):
                    ones = torch.ones_like(x[0][:1, :1])
                    total = total / F.avg_pool2d(_pad(ones, pads), **common)
                y = total
        elif op == "GlobalAveragePool":
            y = x[0].mean(dim=(2, 3), keepdim=True)
        elif op == "BatchNormalization":
            shape = [1, -1] + [1] * (x[0].dim() - 2)
            y = (x[0] - x[3].reshape(shape)) / torch.sqrt(x[4].reshape(shape) + a.get("epsilon", 1e-5)) \
                * x[1].reshape(shape) + x[2].reshape(shape)
        elif op == "LRN":
            size, alpha, beta, bias = a["size"], a.get("alpha", 1e-4), a.get("beta", 0.75), a.get("bias", 1.0)
            squares = F.pad((x[0] * x[0]).unsqueeze(1), (0, 0, 0, 0, (size - 1) // 2, size - 1 - (size - 1) // 2))
            d = bias + alpha / size * size * F.avg_pool3d(squares, (size, 1, 1), stride=1).squeeze(1)
            y = x[0] / (d.detach() if constant_statistics else d) ** beta
        elif op == "Relu":
            y = torch.relu(x[0])
        elif op in ("Dropout", "Identity"):
            y = x[0]
        elif op == "Concat":
            y = torch.cat(x, dim=a["axis"])
        elif op in ("Sum", "Add"):
            y = x[0]
            for t in x[1:]:
                y = y + t
        elif op == "Mul":
            y = x[0] * x[1]
        elif op == "Gemm":
            p = x[0].t() if a.get("transA", 0) else x[0]
            q = x[1].t() if a.get("transB", 0) else x[1]
            y = a.get("alpha", 1.0) * (p @ q)
            if len(x) > 2 and x[2] is not None:
                y = y + a.get("beta", 1.0) * x[2]
        elif op == "Reshape":
            shape = [int(s) for s in x[1].tolist()]
            shape = [x[0].shape[i] if s == 0 else s for i, s in enumerate(shape)]
            y = x[0].reshape(shape)
        elif op == "Flatten":
            axis = a.get("axis", 1)
            y = x[0].reshape(int(np.prod(x[0].shape[:axis])), -1)
        elif op == "Transpose":
            y = x[0].permute(a["perm"])
        elif op == "Unsqueeze":
            y = x[0]
            for axis in sorted(a["axes"]):
                y = y.unsqueeze(axis)
        elif op == "Softmax":
            axis = a.get("axis", 1)
            flat = x[0].reshape(int(np.prod(x[0].shape[:axis])), -1)  # opset < 13: coerced to 2-D
            y = torch.softmax(flat, dim=1).reshape(x[0].shape)
        else:
            raise NotImplementedError(op)
        env[n.output[0]] = y
    return {o: env[o] for o in outputs}
