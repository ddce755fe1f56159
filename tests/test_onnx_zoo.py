"""Graphs exported by others: the ONNX model-zoo classics that the onnx package ships as backend test data
(onnx/backend/test/data/light: AlexNet, DenseNet-121, Inception v1/v2, ResNet-50, ShuffleNet, SqueezeNet,
VGG-19, ZFNet-512; Caffe2-era exports at opset 9, upgraded to 13 in memory). Their weights are
ConstantOfShape fills of one value (every class gets the same score); the test puts random weights of
the same shapes in their place, explains the logits (the final Softmax cut: random weights saturate it)
and keeps everything else as exported.

Reference: the same graph run by a small PyTorch interpreter (tests/onnx_torch.py) in float64 under
torch.autograd: gradient × input for `gradient`, and for `attnlrp` the same with LRN's statistic
detached (ReLU's identity rule relu(x)/x is its derivative; pools, BatchNormalization, Concat take the
gradient). These random networks are ill-conditioned (ReLU pre-activations near 0 flip with the
rounding), so the bound is relative to how far PyTorch's own float32 gradient lies from float64:
at most twice that, or 1e-4 (seen: ours 7e-7 .. 6.8e-3, PyTorch float32 5e-7 .. 1.5e-2).
A [1, 1000, 1, 1] output (DenseNet) is explained as [1, 1000].
"""
import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper

import lrp_onnx
from tests import onnx_torch
from tests.conftest import CPU, rel_l2

LIGHT = os.path.join(os.path.dirname(onnx.__file__), "backend", "test", "data", "light")
# vgg19 (light_vgg19) is left out: the ops of alexnet and zfnet512 at 5x their run time
MODELS = ["bvlc_alexnet", "densenet121", "inception_v1", "inception_v2", "resnet50", "shufflenet", "squeezenet",
          "zfnet512"]


def randomized(name: str, seed: int = 0) -> onnx.ModelProto:
    """The zoo graph with each ConstantOfShape weight replaced by a random initializer of its shape
    (He-scaled; 1-D parameters such as BatchNormalization's scale and variance in [0.5, 1.5])."""
    model = onnx.load(os.path.join(LIGHT, f"light_{name}.onnx"))
    rng = np.random.default_rng(seed)
    consts = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    consts.update({n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in model.graph.node
                   if n.op_type == "Constant"})
    kept = []
    for n in model.graph.node:
        if n.op_type != "ConstantOfShape":
            kept.append(n)
            continue
        shape = consts[n.input[0]].astype(int)
        if len(shape) == 1:
            w = rng.uniform(0.5, 1.5, shape)
        else:
            w = rng.standard_normal(shape) * np.sqrt(2.0 / max(int(np.prod(shape[1:])), 1))
        model.graph.initializer.append(numpy_helper.from_array(w.astype(np.float32), n.output[0]))
    del model.graph.node[:]
    model.graph.node.extend(kept)
    softmax = [n for n in model.graph.node if n.op_type == "Softmax"]
    if softmax:  # explain the logits (random weights saturate the softmax: its gradient would be ~0)
        del model.graph.output[:]
        model.graph.output.append(onnx.helper.make_tensor_value_info(softmax[-1].input[0], onnx.TensorProto.FLOAT,
                                                                     None))
        model.graph.node.remove(softmax[-1])
    return model


@pytest.mark.parametrize("name", MODELS)
def test_zoo_classic_equals_autograd(name):
    model = randomized(name)
    inits = {t.name for t in model.graph.initializer}
    source = next(i.name for i in model.graph.input if i.name not in inits)
    output = model.graph.output[0].name
    x = np.random.default_rng(1).uniform(-1, 1, (1, 3, 224, 224)).astype(np.float32)
    scores = ort.InferenceSession(model.SerializeToString(), providers=CPU).run(None, {source: x})[0].reshape(1, -1)
    for rules in ("gradient", "attnlrp"):
        explainer = lrp_onnx.Explainer.from_model(lrp_onnx.convert(model, rules=rules), providers=CPU)
        assert explainer.meta["sources"] == [source]
        result = explainer.run(**{source: x})
        target = int(result.target[0])
        assert target == int(np.argmax(scores)) and np.isclose(result.logit[0], scores[0, target], rtol=1e-5)
        assert result.relevance.shape == x.shape and np.isfinite(result.relevance).all()
        references = []
        for dtype in (torch.float64, torch.float32):
            xt = torch.from_numpy(x).to(dtype).requires_grad_()
            y = onnx_torch.run(model, {source: xt}, [output], constant_statistics=rules == "attnlrp")[output]
            y.reshape(1, -1)[0, target].backward()
            references.append((xt * xt.grad).detach().double().numpy())
        float32_error = rel_l2(references[1], references[0])
        assert rel_l2(result.relevance, references[0]) <= max(2 * float32_error, 1e-4), (rules, float32_error)
