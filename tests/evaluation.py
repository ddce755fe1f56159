"""What test_evaluate.py (language models) and test_evaluate_classifiers.py (sequence classifiers) share:
PyTorch's logits with each token's inputs_embeds scaled, integrated gradients by autograd, and the check that
an evaluation's relevance equals the converted original model's."""
import numpy as np
import torch

import lrp_onnx


def torch_logits(model, ids, scales):
    """The logits of `ids` repeated once per row of `scales` [rows, sequence], each token's inputs_embeds
    multiplied by its scale."""
    embeds = model.get_input_embeddings()(torch.as_tensor(ids)[None].repeat(len(scales), 1))
    embeds = embeds * torch.as_tensor(scales, dtype=torch.float32)[:, :, None]
    with torch.no_grad():
        return model(inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2], dtype=torch.int64)).logits


def integrated_gradients(model, input_ids, steps, explained):
    """Integrated gradients from the zero embedding (`steps` midpoints) by torch.autograd, per token (summed
    over the hidden axis): explained(logits) is the scalar differentiated (the batch's explained logits summed)."""
    ids = torch.as_tensor(input_ids)[None]
    x = model.get_input_embeddings()(ids).detach()
    alphas = (torch.arange(steps, dtype=torch.float32) + 0.5) / steps
    scaled = (alphas[:, None, None] * x).requires_grad_()
    logits = model(inputs_embeds=scaled, attention_mask=torch.ones(steps, ids.shape[1], dtype=torch.int64)).logits
    explained(logits).backward()
    return (x[0] * scaled.grad.mean(0)).sum(-1).double().numpy()


def assert_relevance_equals_converted_original(evaluation, method, path, out):
    """Each example's relevance under `method` in `evaluation` equals the original model `path`, converted
    (to `out`, without the perturbation input) with rules=method, run on that example for its target."""
    lrp_onnx.convert(path, out, rules=method)
    explainer = lrp_onnx.Explainer(out, providers=["CPUExecutionProvider"])
    for k, example in enumerate(evaluation.examples):
        ids = example.input_ids[None]
        result = explainer.run(target=[example.target], input_ids=ids, attention_mask=np.ones_like(ids))
        np.testing.assert_allclose(evaluation.methods[method].relevance[k], result.token_relevance()[0],
                                   rtol=1e-4, atol=1e-6)
