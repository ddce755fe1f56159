"""LXT's AttnLRP / CP-LRP rules on NanoGuard (PyPI ``metatronnanoguard``), in PyTorch.

NanoGuard is not a transformers architecture, so LXT's monkey patches do not apply; this module
writes its forward (``nanoguard.model.Classifier.forward`` without a mask) once more with LXT 2.1's
own rule functions placed where LXT's patches place them on the corresponding transformers parts:

* every RMS norm (``F.rms_norm`` without weight, on the residual stream and on q and k): LXT's
  ``rms_norm_forward``: ``x * stop_gradient(rsqrt(mean(x²) + eps))``;
* attention: LXT's ``wrap_attention_forward`` (attnlrp: ``divide_gradient`` q, k by 4, v by 2 at
  the attention's inputs, after RoPE and the q/k norm) or ``cp_wrap_attention_forward`` (cp-lrp:
  q, k ``stop_gradient``); the softmax keeps its plain gradient, as in LXT;
* the MLP's element-wise ReLU² (``relu(x).square()``): ``identity_rule_implicit``, as LXT's
  ``mlp_forward`` (both modes, as in LXT's GPT-2 maps);
* the head's LayerNorm: LXT's ``layer_norm_forward`` (std held constant);
* everything else (embedding, RoPE with constant cos/sin, the residual and x0 mixing, mean pooling,
  linears) is linear and keeps its gradient.

Relevance = inputs_embeds * inputs_embeds.grad of the explained logit. With mode "gradient" the
rules are left out (plain autograd). Forward values equal the package's model: the rules change
gradients only.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

STUBS_DIR = Path(__file__).resolve().parent / "stubs"  # lxt.efficient imports torchvision (not installed)
MODES = ("attnlrp", "cp-lrp", "gradient")


def _rules():
    if str(STUBS_DIR) not in sys.path:
        sys.path.insert(0, str(STUBS_DIR))
    from lxt.efficient import rules

    return rules


class NanoGuardLXT(nn.Module):
    """A NanoGuard Classifier's weights, run with LXT's rules; call with inputs_embeds [B, T, C]."""

    def __init__(self, model: nn.Module, mode: str = "attnlrp"):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode {mode!r}; expected one of {MODES}")
        self.model, self.mode = model, mode

    def get_input_embeddings(self) -> nn.Module:
        return self.model.transformer.wte

    def _norm(self, x):
        stop_gradient = _rules().stop_gradient

        if self.mode == "gradient":
            return F.rms_norm(x, (x.size(-1),))
        eps = torch.finfo(x.dtype).eps  # F.rms_norm's default
        return x * stop_gradient(torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))

    def _attention(self, attn, x, cos_sin):
        divide_gradient, stop_gradient = _rules().divide_gradient, _rules().stop_gradient
        from nanoguard.model import apply_rotary_emb

        B, T, _ = x.size()
        q = attn.c_q(x).view(B, T, attn.n_head, attn.head_dim)
        k = attn.c_k(x).view(B, T, attn.n_kv_head, attn.head_dim)
        v = attn.c_v(x).view(B, T, attn.n_kv_head, attn.head_dim)
        cos, sin = cos_sin
        q, k = apply_rotary_emb(q, cos, sin), apply_rotary_emb(k, cos, sin)
        q, k = self._norm(q), self._norm(k)
        if self.mode == "attnlrp":
            q, k, v = divide_gradient(q, 4), divide_gradient(k, 4), divide_gradient(v, 2)
        elif self.mode == "cp-lrp":
            q, k = stop_gradient(q), stop_gradient(k)
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=False)
        return attn.c_proj(y.transpose(1, 2).contiguous().view(B, T, -1))

    def _mlp(self, mlp, x):
        identity_rule_implicit = _rules().identity_rule_implicit

        h = mlp.c_fc(x)
        act = lambda t: F.relu(t).square()  # noqa: E731
        h = act(h) if self.mode == "gradient" else identity_rule_implicit(act, h)
        return mlp.c_proj(h)

    def _layer_norm(self, ln, x):
        stop_gradient = _rules().stop_gradient

        if self.mode == "gradient":
            return ln(x)
        mean = x.mean(dim=-1, keepdim=True)
        std = (((x - mean) ** 2).mean(dim=-1, keepdim=True) + ln.eps).sqrt()
        return (x - mean) / stop_gradient(std) * ln.weight + ln.bias

    def forward(self, inputs_embeds: torch.Tensor, attention_mask=None, return_dict=False):
        m = self.model
        T = inputs_embeds.shape[1]
        cos_sin = m.cos[:, :T], m.sin[:, :T]
        x = self._norm(inputs_embeds)
        x0 = x
        for i, block in enumerate(m.transformer.h):
            x = m.resid_lambdas[i] * x + m.x0_lambdas[i] * x0
            x = x + self._attention(block.attn, self._norm(x), cos_sin)
            x = x + self._mlp(block.mlp, self._norm(x))
        pooled = self._norm(x).mean(dim=1)
        return (m.cls_head(self._layer_norm(m.cls_norm, pooled).float()),)


def relevance(model: nn.Module, input_ids, target: int, mode: str = "attnlrp") -> tuple:
    """(token relevance [T] float64, logits [2]) of the class `target` for one text's ids [T]."""
    lxt = NanoGuardLXT(model, mode)
    with torch.enable_grad():
        x = lxt.get_input_embeddings()(torch.as_tensor([list(input_ids)])).detach().requires_grad_()
        logits = lxt(x)[0]
        logits[0, target].backward()
    return (x * x.grad).detach().sum(-1)[0].double().numpy(), logits[0].detach().numpy()
