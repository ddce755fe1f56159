"""A tiny transformer written here, not by Hugging Face: the kind of graph a user brings.

Causal self-attention, then two MLPs whose nonlinearities no exporter writes as one op: squared
ReLU (`Relu -> Pow(2)`) and a composite of `Exp`, `Log`, `Abs` and a fractional `Pow`
(log(1 + exp(u)) + 0.1 |u|^1.5), a global response normalisation as ConvNeXt-V2 writes it (GRN:
h + gamma * h * ||h||_seq / mean_d ||h||_seq + beta, a ratio of two statistics of h), then an
l2-normalised state (`F.normalize`: ReduceL2 -> Clip -> Expand -> Div) read by the LM head.

`relevance(model, ids, position, target, mode)` is the PyTorch reference: the same forward with
LXT's own rule functions (lxt/efficient/rules.py, loaded by path so that nothing of LXT is patched)
applied the LXT way — identity rule on each elementwise nonlinearity as a whole, uniform rule
(divide_gradient by 2) on the two attention products, LayerNorm's std and the l2 norm held
constant (stop_gradient), GRN's ratio too, plain gradient elsewhere; `cp-lrp` also detaches the attention
probabilities (LXT's cp_wrap_attention_forward detaches q and k; the value then carries all of the
product's relevance); `gradient` patches nothing.
"""
from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F


def lxt_rules():
    """LXT's rule functions, read from the installed package's rules.py alone."""
    spec = importlib.util.find_spec("lxt")
    path = Path(spec.submodule_search_locations[0]) / "efficient" / "rules.py"
    module_spec = importlib.util.spec_from_file_location("_lxt_rules", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def squared_relu(u):
    return torch.relu(u) ** 2


def log_exp_pow(u):
    return torch.log(1 + torch.exp(u)) + 0.1 * torch.abs(u) ** 1.5


class Custom(nn.Module):
    def __init__(self, vocab=40, d=16, heads=2, ff=24):
        super().__init__()
        self.heads = heads
        self.emb = nn.Embedding(vocab, d)
        self.ln1, self.ln2, self.ln3 = nn.LayerNorm(d), nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)
        self.up1, self.down1 = nn.Linear(d, ff), nn.Linear(ff, d)
        self.up2, self.down2 = nn.Linear(d, ff), nn.Linear(ff, d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.grn_gamma, self.grn_beta = nn.Parameter(torch.zeros(d)), nn.Parameter(torch.zeros(d))
        self.mode = "plain"    # "plain" (export), "gradient", "attnlrp", "cp-lrp" (references)
        self._rules = None

    # the places where the rules differ from the plain forward
    def _identity(self, fn, u):
        return self._rules.identity_rule_implicit(fn, u) if self.mode in ("attnlrp", "cp-lrp") else fn(u)

    def _uniform(self, t):
        return self._rules.divide_gradient(t, 2) if self.mode in ("attnlrp", "cp-lrp") else t

    def _constant(self, t):
        return t.detach() if self.mode in ("attnlrp", "cp-lrp") else t

    def _layer_norm(self, ln, x):
        if self.mode not in ("attnlrp", "cp-lrp"):
            return ln(x)
        mean = x.mean(-1, keepdim=True)
        std = (((x - mean) ** 2).mean(-1, keepdim=True) + ln.eps).sqrt()
        return (x - mean) / self._constant(std) * ln.weight + ln.bias

    def forward(self, input_ids=None, inputs_embeds=None):
        h = self.emb(input_ids) if inputs_embeds is None else inputs_embeds
        b, s, d = h.shape
        q, k, v = self.qkv(self._layer_norm(self.ln1, h)).split(d, dim=-1)
        q, k, v = (t.view(b, s, self.heads, d // self.heads).transpose(1, 2) for t in (q, k, v))
        if self.mode == "cp-lrp":  # LXT's cp_wrap_attention_forward: no relevance through the probabilities
            q, k = q.detach(), k.detach()
        scores = self._uniform(q @ k.transpose(-1, -2)) / math.sqrt(d // self.heads)
        causal = torch.ones(s, s, dtype=torch.bool, device=h.device).tril()
        probs = torch.softmax(scores.masked_fill(~causal, -1e4), dim=-1)
        attended = probs @ v if self.mode == "cp-lrp" else self._uniform(probs @ v)
        attended = attended.transpose(1, 2).reshape(b, s, d)
        h = h + self.out(attended)
        h = h + self.down1(self._identity(squared_relu, self.up1(self._layer_norm(self.ln2, h))))
        h = h + self.down2(self._identity(log_exp_pow, self.up2(self._layer_norm(self.ln3, h))))
        g = torch.norm(h, p=2, dim=1, keepdim=True)  # GRN: ||h|| over the sequence, per channel
        h = h + self.grn_gamma * (h * self._constant(g / (g.mean(dim=-1, keepdim=True) + 1e-6))) + self.grn_beta
        norm = self._constant(h.norm(dim=-1, keepdim=True).clamp_min(1e-6))
        unit = F.normalize(h, dim=-1) if self.mode == "plain" else h / norm
        return self.head(unit * 4.0)


def build(seed=0) -> Custom:
    torch.manual_seed(seed)
    model = Custom()
    with torch.no_grad():  # non-trivial norms so that every rule shows
        for ln in (model.ln1, model.ln2, model.ln3):
            ln.weight.uniform_(0.5, 1.5)
            ln.bias.uniform_(-0.2, 0.2)
        model.grn_gamma.uniform_(0.5, 1.5)
        model.grn_beta.uniform_(-0.2, 0.2)
    return model.eval()


def export(model: Custom, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ids = torch.randint(0, 40, (2, 6))
    model.mode = "plain"
    torch.onnx.export(model, (ids,), str(path), input_names=["input_ids"], output_names=["logits"],
                      dynamic_axes={"input_ids": {0: "batch", 1: "seq"}, "logits": {0: "batch", 1: "seq"}},
                      opset_version=17, dynamo=False)
    return path


def relevance(model: Custom, ids, position, target, mode: str):
    """Relevance at the word embeddings of logits[b, position[b], target[b]], summed over rows."""
    model.mode = mode
    model._rules = lxt_rules()
    embeds = model.emb(torch.as_tensor(ids)).detach().double().requires_grad_(True)
    logits = model.double()(inputs_embeds=embeds)
    rows = torch.arange(len(position))
    logits[rows, torch.as_tensor(position), torch.as_tensor(target)].sum().backward()
    model.float()
    model.mode = "plain"
    return (embeds * embeds.grad).detach().numpy()
