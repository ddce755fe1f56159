"""Reference relevances computed in PyTorch (plain gradient, or LXT's AttnLRP / CP-LRP).

LXT works by monkey-patching transformers classes process-wide, so every reference runs
in a fresh subprocess:

    python tests/reference.py --family llama --hf-dir DIR --mode attnlrp \\
        --inputs in.npz --out out.npz

``in.npz`` holds ``input_ids`` and ``attention_mask`` (int64 [B, S]), ``target`` (int64 [B];
-1 means the argmax of the explained logits row; all -1 if absent) and, for the language
model families, ``position`` (int64 [B]; negative counts from the end as in Python; all -1
if absent).

The explained scalar of row b is ``logits[b, position[b], target[b]]`` for the language
models (gpt2, llama, qwen2, qwen3, gemma3, mixtral, qwen3_moe, qwen2_moe, t5) and
``logits[b, target[b]]`` for bert. Their sum over rows is backpropagated to ``inputs_embeds``
(the word-embedding output, fed to the model with the same attention mask), and relevance =
inputs_embeds * inputs_embeds.grad.

The encoder-decoder t5 also needs ``decoder_input_ids`` (int64 [B, T]) in ``in.npz``;
``position`` indexes the decoder sequence. The shared embedding table is looked up twice, and
the sum is backpropagated to both ``inputs_embeds`` (encoder) and ``decoder_inputs_embeds``.

``out.npz`` holds ``relevance`` (float64 [B, S, H]), ``logits`` (float32, the model's
output), ``explained`` (float32 [B]), and the resolved ``target`` and, for language models,
``position`` (int64 [B], position in 0..S-1, or 0..T-1 for t5); for t5 also
``decoder_relevance`` (float64 [B, T, H]).

Modes:

* ``gradient``: plain autograd (gradient x input), nothing patched.
* ``attnlrp``: LXT's ``attnLRP`` map for the family's transformers module.
* ``cp-lrp``: LXT's ``cp_LRP`` map for gpt2, llama, qwen2, qwen3 and gemma3. LXT has none
  for BERT; see ``patch_bert_cp_lrp`` for the equivalent used here.

LXT 2.1 has no Mixtral map at all: ``mixtral_patch_map`` builds one from LXT's parts (llama's
attention, RMSNorm and dropout patches; LXT's gated-MLP rules on each SwiGLU expert) and patches the
MoE block the way LXT's Qwen3-MoE patch (on GitHub; not in the 2.1 release) does: the routing weights carry
relevance, with plain gradient through softmax, top-k and renormalisation, and the product
routing weight x expert output gets ``divide_gradient(.., 2)``. For cp-lrp (LXT's Qwen3-MoE
``cp_LRP`` is commented out) the routing weights are detached, like the gate and the attention.

Qwen3-MoE and Qwen2-MoE (no map in LXT 2.1 either): ``qwen_moe_patch_map`` is LXT's Qwen3-MoE map
from GitHub, adapted to transformers 4.52's classes (there the experts are ``Qwen3MoeMLP`` /
``Qwen2MoeMLP`` modules, so LXT's own ``gated_mlp_forward`` / ``cp_gated_mlp_forward`` patch them),
with the same MoE block forward as Mixtral's (``moe_block_forward``; without renormalisation when
``norm_topk_prob=False``). Qwen3-MoE's attention and RMSNorm (incl. qk-norm) get LXT's
``patch_attention`` / ``rms_norm_forward`` as in LXT's qwen3 map. Qwen2-MoE's attention in 4.52 is
still the old inline ``Qwen2MoeAttention`` (no ``eager_attention_forward`` for LXT's
``patch_attention`` to wrap), so ``divide_attention_gradients`` applies LXT's wrapper's rules at its
q, k, v projections (q, k gradients /4, v /2; or q, k detached), which is the same since RoPE,
``repeat_kv`` and the head reshapes between them and the attention are linear. Its shared expert
(LXT's gated-MLP rules) is scaled by ``sigmoid(shared_expert_gate(x))``: a gate, treated as the
gated MLP's (attnlrp: identity rule on the sigmoid and ``divide_gradient(.., 2)`` on the product,
both factors carrying relevance; cp-lrp: the gate logit detached, so the shared expert gets all).

LXT 2.1 ships both maps (``lxt.efficient.models.<family>.attnLRP`` / ``.cp_LRP``) for qwen2,
qwen3 and gemma3. What they patch (and, by omission, leave to the plain gradient):

* qwen2 / qwen3: exactly llama's map (RMSNorm incl. Qwen3's per-head q_norm/k_norm -> rms held
  constant; gated MLP -> identity on the SiLU and 1/2 on the product, or for cp_LRP the gate
  branch detached; attention -> q, k gradients /4 and v /2, or q, k detached).
* gemma3: the same MLP and attention patches; ``Gemma3RMSNorm._norm`` -> ``x * stop_gradient(
  rsqrt(mean(x^2) + eps))`` (the ``(1 + weight)`` scale stays a plain linear factor). NOT patched,
  hence plain gradient: the embedding scale sqrt(hidden) (linear), the query_pre_attn_scalar
  scaling (linear) and the final-logit softcapping ``c * tanh(logits / c)`` in
  ``Gemma3ForCausalLM.forward`` (a Tanh that lrp-onnx's rule sets treat as an activation).
  ``inputs_embeds`` here is the output of ``Gemma3TextScaledWordEmbedding``, i.e. already
  multiplied by sqrt(hidden); relevance (x * dy/dx) is invariant under that constant scale, so it
  equals the relevance at the ONNX graph's unscaled word-embedding Gather.

* t5: LXT 2.1 has no T5 map; ``patch_t5`` applies the same rules the LXT way from LXT's own
  parts (T5LayerNorm -> LXT's ``rms_norm_forward``: rms held constant; the gated-GELU MLP ->
  identity rule on the GELU and 1/2 on the product, or for cp-lrp the gate branch detached; no
  LXT attention function exists to wrap, so ``divide_t5_attention_gradients`` hooks the q, k, v
  projections of every T5Attention (self- and cross-attention) after loading: q, k gradients /4
  and v /2, or q, k detached). NOT patched, hence plain gradient: the relative position bias
  (a lookup by integer positions, it carries no relevance) and the untied LM head.

vit (``transformers``' ViTForImageClassification): ``in.npz`` holds ``pixel_values`` (float32
[B, 3, H, W]) and ``target``; the explained scalar of row b is ``logits[b, target[b]]``, relevance
is ``pixel_values * pixel_values.grad`` (float64 [B, 3, H, W]). LXT's ViT map
(``lxt.efficient.models.vit_torch``) patches torchvision's ViT, not transformers', so ``patch_vit``
applies the same LXT building blocks to transformers' classes: ``layer_norm_forward`` on every
LayerNorm (std held constant), ``identity_rule_implicit`` on the MLP's GELU, and in attention
LXT's ``wrap_attention_forward`` (``attnlrp``: q, k gradients /4, v /2) or ``cp_wrap_attention_forward``
(``cp-lrp``: q, k detached). Mode ``vit-gamma`` is LXT's ViT recipe: the ``cp-lrp`` patches plus
Zennit's ``Gamma`` rule on every ``Conv2d`` and ``Linear`` (a ``LayerMapComposite``; gammas from
``--gamma-conv`` / ``--gamma-linear``), turned into Gradient×Input by LXT's ``monkey_patch_zennit``.

conv (one ``torch.nn.Conv2d``, for the gamma rule's unit test): ``in.npz`` holds ``x``, ``weight``,
``bias`` (optional), ``stride``, ``padding`` and ``seed`` (the gradient fed to the output); mode ``gamma:G``
runs plain Zennit ``Gamma(G)`` (its own LRP convention: the output gradient *is* the output
relevance ``y * seed``) and writes ``relevance`` (Zennit's input relevance) and ``output``.

From pytest use ``run_reference(family, hf_dir, mode, inputs, tmpdir)``.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np

TESTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = TESTS_DIR.parent
STUBS_DIR = TESTS_DIR / "stubs"  # stand-in torchvision, imported by lxt

MOE_FAMILIES = ("mixtral", "qwen3_moe", "qwen2_moe")
TEXT_FAMILIES = ("bert", "gpt2", "llama", "qwen2", "qwen3", "gemma3", *MOE_FAMILIES, "t5")
FAMILIES = TEXT_FAMILIES + ("vit", "conv")
LANGUAGE_MODEL_FAMILIES = ("gpt2", "llama", "qwen2", "qwen3", "gemma3", *MOE_FAMILIES, "t5")
ENCODER_DECODER_FAMILIES = ("t5",)
MODES = ("gradient", "attnlrp", "cp-lrp", "vit-gamma")
TRANSFORMERS_MODULES = {family: f"transformers.models.{family}.modeling_{family}"
                        for family in TEXT_FAMILIES + ("vit",)}


LOADERS = ("tiny", "smollm2", "minilm")  # models.tiny, or the real pretrained recipes


def run_reference(
    family: str, hf_dir: str | Path | None, mode: str, inputs: dict, tmpdir: str | Path, loader: str = "tiny",
    extra_args: tuple = (),
) -> dict[str, np.ndarray]:
    """Run this script in a subprocess and return the arrays of its ``out.npz``.

    ``inputs`` maps ``input_ids``, ``attention_mask`` and optionally ``target`` and
    ``position`` (or, for vit, ``pixel_values`` and ``target``) to arrays (or tensors); float
    arrays stay float32, the others become int64. ``tmpdir`` receives the npz files.
    """
    tmpdir = Path(tmpdir)
    tmpdir.mkdir(parents=True, exist_ok=True)
    tag = f"{loader}_{family}_{mode}{'_'.join(('',) + tuple(extra_args))}".replace(":", "_")
    inputs_path = tmpdir / f"reference_{tag}_in.npz"
    out_path = tmpdir / f"reference_{tag}_out.npz"
    arrays = {name: np.asarray(value) for name, value in inputs.items()}
    np.savez(inputs_path, **{name: value.astype(np.float32 if value.dtype.kind == "f" else np.int64)
                             for name, value in arrays.items()})
    command = [
        sys.executable, str(Path(__file__).resolve()), "--family", family, "--mode", mode,
        "--inputs", str(inputs_path), "--out", str(out_path), "--loader", loader, *extra_args,
    ] + (["--hf-dir", str(hf_dir)] if hf_dir is not None else [])
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    completed = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    if completed.returncode != 0:
        raise RuntimeError(f"reference.py failed ({completed.returncode}):\n{completed.stderr}")
    with np.load(out_path) as arrays:
        return {name: arrays[name] for name in arrays.files}


# --------------------------------------------------------------------------- patching


def patch_bert_cp_lrp() -> None:
    """Patch transformers' BERT classes for CP-LRP, the way LXT patches other models.

    LXT 2.1 ships no ``cp_LRP`` map for BERT, so this is its equivalent, built from LXT's
    own parts and mirroring what LXT's BERT ``attnLRP`` does outside attention:

    * ``torch.nn.LayerNorm.forward`` -> LXT's ``layer_norm_forward`` (identity rule: no
      gradient through the standard deviation);
    * ``torch.nn.Dropout.forward`` -> LXT's ``dropout_forward`` (a no-op in eval anyway);
    * ``BertIntermediate`` GELU and ``BertPooler`` tanh wrapped in LXT's
      ``identity_rule_implicit``;
    * attention is the original ``BertSelfAttention`` with NO ``divide_gradient`` anywhere;
      the gradient is stopped at query and key instead (``stop_bert_query_key_gradient``,
      applied to the model instance after loading), so relevance flows through the values
      only and the attention weights act as constants, as in LXT's ``cp_LRP`` for llama.
    """
    import torch
    import transformers.models.bert.modeling_bert as modeling_bert
    from lxt.efficient.patches import dropout_forward, layer_norm_forward, patch_method
    from lxt.efficient.rules import identity_rule_implicit

    def intermediate_forward(self, hidden_states):
        return identity_rule_implicit(self.intermediate_act_fn, self.dense(hidden_states))

    def pooler_forward(self, hidden_states):
        return identity_rule_implicit(self.activation, self.dense(hidden_states[:, 0]))

    for forward, target in [
        (layer_norm_forward, torch.nn.LayerNorm),
        (dropout_forward, torch.nn.Dropout),
        (intermediate_forward, modeling_bert.BertIntermediate),
        (pooler_forward, modeling_bert.BertPooler),
    ]:
        if not patch_method(forward, target):
            raise RuntimeError(f"could not patch {target.__name__}")


def stop_bert_query_key_gradient(model) -> None:
    """Detach the outputs of every BertSelfAttention's ``query`` and ``key`` projections."""
    from transformers.models.bert.modeling_bert import BertSelfAttention

    def detach_output(module, inputs, output):
        return output.detach()

    for module in model.modules():
        if isinstance(module, BertSelfAttention):
            module.query.register_forward_hook(detach_output)
            module.key.register_forward_hook(detach_output)


def patch_t5(mode: str) -> None:
    """Patch transformers' T5 classes for AttnLRP / CP-LRP the way LXT patches llama, from LXT's parts.

    * ``T5LayerNorm.forward`` -> LXT's ``rms_norm_forward`` (T5LayerNorm is an RMSNorm with the
      same ``weight`` and ``variance_epsilon`` attributes): the rms is held constant;
    * ``T5DenseGatedActDense.forward``: GELU under ``identity_rule_implicit`` and the product
      ``act(wi_0 x) * wi_1 x`` under ``divide_gradient(., 2)`` (as LXT's ``gated_mlp_forward``);
      for cp-lrp ``stop_gradient(wi_0 x)`` instead (as LXT's ``cp_gated_mlp_forward``);
    * ``torch.nn.Dropout.forward`` -> LXT's ``dropout_forward``.
    Attention is handled per instance by ``divide_t5_attention_gradients``.
    """
    import torch
    import transformers.models.t5.modeling_t5 as modeling_t5
    from lxt.efficient.patches import dropout_forward, patch_method, rms_norm_forward
    from lxt.efficient.rules import divide_gradient, identity_rule_implicit, stop_gradient

    def gated_act_dense_forward(self, hidden_states):
        gate = identity_rule_implicit(self.act, self.wi_0(hidden_states))
        return self.wo(divide_gradient(gate * self.wi_1(hidden_states), 2))

    def cp_gated_act_dense_forward(self, hidden_states):
        gate = self.act(stop_gradient(self.wi_0(hidden_states)))
        return self.wo(gate * self.wi_1(hidden_states))

    mlp_forward = gated_act_dense_forward if mode == "attnlrp" else cp_gated_act_dense_forward
    for forward, target in [
        (rms_norm_forward, modeling_t5.T5LayerNorm),
        (mlp_forward, modeling_t5.T5DenseGatedActDense),
        (dropout_forward, torch.nn.Dropout),
    ]:
        if not patch_method(forward, target):
            raise RuntimeError(f"could not patch {target.__name__}")


def divide_t5_attention_gradients(model, mode: str) -> None:
    """The attention part of ``patch_t5``, on the loaded model: ``divide_attention_gradients`` on the
    q, k, v projections of every T5Attention (self- and cross-attention). In cross-attention k and v
    are projections of the encoder output, so they carry encoder relevance."""
    from transformers.models.t5.modeling_t5 import T5Attention

    divide_attention_gradients(model, mode, T5Attention, ("q", "k", "v"))


def mixtral_expert_forward_attnlrp(self, hidden_states):
    """``MixtralBlockSparseTop2MLP`` (SwiGLU expert) as LXT's ``gated_mlp_forward``: identity rule
    on the SiLU, 1/2 on the gate product."""
    from lxt.efficient.rules import divide_gradient, identity_rule_implicit

    gated = identity_rule_implicit(self.act_fn, self.w1(hidden_states)) * self.w3(hidden_states)
    return self.w2(divide_gradient(gated, 2))


def mixtral_expert_forward_cp_lrp(self, hidden_states):
    """The expert as LXT's ``cp_gated_mlp_forward``: the gate branch is a constant."""
    from lxt.efficient.rules import stop_gradient

    gated = self.act_fn(stop_gradient(self.w1(hidden_states))) * self.w3(hidden_states)
    return self.w2(gated)


def moe_block_forward(self, hidden_states, cp_lrp: bool = False):
    """The sparse MoE block's forward (Mixtral, Qwen3-MoE, Qwen2-MoE) with LRP rules, the way LXT's
    Qwen3-MoE patch does it.

    AttnLRP: plain gradient through the router softmax, top-k and renormalisation (none when the
    block has ``norm_topk_prob=False``); the product routing weight x expert output gets the uniform
    rule (``divide_gradient(.., 2)``: both carry relevance). CP-LRP: the routing weights are a
    constant, like attention probabilities and the gated MLP's gate under LXT's ``cp_LRP``; the
    product is then linear in the expert output, which gets all of it. The loop runs over every
    expert (equal to transformers' loop over the experts that got tokens). A Qwen2-MoE shared expert
    is gated like a gated MLP: identity rule on the sigmoid and 1/2 on the product, or (cp-lrp) the
    gate logit detached."""
    import torch
    from lxt.efficient.rules import divide_gradient, identity_rule_implicit, stop_gradient

    batch_size, sequence_length, hidden_dim = hidden_states.shape
    hidden_states = hidden_states.view(-1, hidden_dim)
    router_logits = self.gate(hidden_states)
    routing_weights = torch.nn.functional.softmax(
        stop_gradient(router_logits) if cp_lrp else router_logits, dim=1, dtype=torch.float)
    routing_weights, selected_experts = torch.topk(routing_weights, self.top_k, dim=-1)
    if getattr(self, "norm_topk_prob", True):  # Mixtral always renormalises
        routing_weights = routing_weights / routing_weights.sum(dim=-1, keepdim=True)
    final_hidden_states = torch.zeros_like(hidden_states)
    expert_mask = torch.nn.functional.one_hot(selected_experts, num_classes=self.num_experts).permute(2, 1, 0)
    for expert_idx in range(self.num_experts):
        top_k_pos, token_idx = torch.where(expert_mask[expert_idx])
        weighted = self.experts[expert_idx](hidden_states[token_idx]) * routing_weights[token_idx, top_k_pos, None]
        if not cp_lrp:
            weighted = divide_gradient(weighted, 2)
        final_hidden_states.index_add_(0, token_idx, weighted)
    if hasattr(self, "shared_expert"):
        gate_logit = self.shared_expert_gate(hidden_states)
        if cp_lrp:
            shared = torch.sigmoid(stop_gradient(gate_logit)) * self.shared_expert(hidden_states)
        else:
            shared = divide_gradient(identity_rule_implicit(torch.sigmoid, gate_logit)
                                     * self.shared_expert(hidden_states), 2)
        final_hidden_states = final_hidden_states + shared
    return final_hidden_states.reshape(batch_size, sequence_length, hidden_dim), router_logits


def mixtral_patch_map(mode: str) -> dict:
    """LXT 2.1 has no Mixtral map: LXT's llama map for attention, RMSNorm and dropout (Mixtral uses
    the same attention and RMSNorm), plus the MoE block and its SwiGLU experts patched here."""
    from functools import partial

    import torch
    import transformers.models.mixtral.modeling_mixtral as modeling_mixtral
    from lxt.efficient.patches import (dropout_forward, patch_attention, patch_cp_attention, patch_method,
                                       rms_norm_forward)

    cp_lrp = mode == "cp-lrp"
    expert_forward = mixtral_expert_forward_cp_lrp if cp_lrp else mixtral_expert_forward_attnlrp

    def moe_forward(self, hidden_states):
        return moe_block_forward(self, hidden_states, cp_lrp=cp_lrp)

    return {
        modeling_mixtral.MixtralRMSNorm: partial(patch_method, rms_norm_forward),
        torch.nn.Dropout: partial(patch_method, dropout_forward),
        modeling_mixtral: patch_cp_attention if cp_lrp else patch_attention,
        modeling_mixtral.MixtralBlockSparseTop2MLP: partial(patch_method, expert_forward),
        modeling_mixtral.MixtralSparseMoeBlock: partial(patch_method, moe_forward),
    }


def qwen_moe_patch_map(family: str, mode: str) -> dict:
    """LXT's Qwen3-MoE map (GitHub) for transformers 4.52's qwen3_moe / qwen2_moe classes: LXT's
    gated-MLP patch on every expert and on the shared expert (all ``Qwen*MoeMLP``), LXT's RMSNorm
    and dropout patches, the MoE block as ``moe_block_forward``, and for qwen3_moe LXT's attention
    patch (qwen2_moe's attention: ``divide_attention_gradients`` after loading)."""
    from functools import partial

    import torch
    from lxt.efficient.patches import (cp_gated_mlp_forward, dropout_forward, gated_mlp_forward, patch_attention,
                                       patch_cp_attention, patch_method, rms_norm_forward)

    module = importlib.import_module(TRANSFORMERS_MODULES[family])
    prefix = {"qwen3_moe": "Qwen3Moe", "qwen2_moe": "Qwen2Moe"}[family]
    cp_lrp = mode == "cp-lrp"

    def moe_forward(self, hidden_states):
        return moe_block_forward(self, hidden_states, cp_lrp=cp_lrp)

    patch_map = {
        getattr(module, f"{prefix}MLP"): partial(patch_method, cp_gated_mlp_forward if cp_lrp else gated_mlp_forward),
        getattr(module, f"{prefix}RMSNorm"): partial(patch_method, rms_norm_forward),
        torch.nn.Dropout: partial(patch_method, dropout_forward),
        getattr(module, f"{prefix}SparseMoeBlock"): partial(patch_method, moe_forward),
    }
    if family == "qwen3_moe":
        patch_map[module] = patch_cp_attention if cp_lrp else patch_attention
    return patch_map


def divide_attention_gradients(model, mode: str, attention_class, projections=("q_proj", "k_proj", "v_proj")) -> None:
    """LXT's attention rules at the q, k, v projections of every ``attention_class`` module, for
    attention written inline (no ``eager_attention_forward`` for LXT's ``patch_attention`` to wrap):
    the projections' outputs pass LXT's ``divide_gradient`` (q, k by 4: 1/2 at Q.K^T times 1/2 at
    A.V; v by 2), or for cp-lrp q and k are detached (attention weights constant). Equal to LXT's
    wrapper where only linear maps (RoPE, head reshapes, ``repeat_kv``) lie between the two."""
    from lxt.efficient.rules import divide_gradient, stop_gradient

    def hook(rule):
        return lambda module, inputs, output: rule(output)

    q, k, v = projections
    if mode == "attnlrp":
        rules = {q: lambda t: divide_gradient(t, 4), k: lambda t: divide_gradient(t, 4),
                 v: lambda t: divide_gradient(t, 2)}
    else:
        rules = {q: stop_gradient, k: stop_gradient}
    for module in model.modules():
        if isinstance(module, attention_class):
            for projection, rule in rules.items():
                getattr(module, projection).register_forward_hook(hook(rule))


def patch_vit(mode: str) -> None:
    """Patch transformers' ViT classes with LXT's building blocks (see the module docstring).

    LXT's own ViT map (``lxt.efficient.models.vit_torch.cp_LRP``) targets torchvision's
    ``nn.GELU`` / ``nn.LayerNorm`` / ``nn.MultiheadAttention``; transformers' ViT has the same
    parts in other classes: ``ViTIntermediate`` applies the GELU, and attention is the module-level
    ``eager_attention_forward`` of ``modeling_vit``, which LXT's ``patch_attention`` /
    ``patch_cp_attention`` wrap as they do for the decoders."""
    import torch
    import transformers.models.vit.modeling_vit as modeling_vit
    from lxt.efficient import monkey_patch
    from lxt.efficient.patches import layer_norm_forward, patch_attention, patch_cp_attention, patch_method
    from lxt.efficient.rules import identity_rule_implicit

    def intermediate_forward(self, hidden_states):
        return identity_rule_implicit(self.intermediate_act_fn, self.dense(hidden_states))

    patch_map = {
        torch.nn.LayerNorm: functools.partial(patch_method, layer_norm_forward),
        modeling_vit.ViTIntermediate: functools.partial(patch_method, intermediate_forward),
        modeling_vit: patch_attention if mode == "attnlrp" else patch_cp_attention,
    }
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="Failed to patch")
        monkey_patch(modeling_vit, patch_map)


def register_zennit_gamma(model, gamma_conv: float, gamma_linear: float):
    """LXT's ViT recipe: Zennit's Gamma rule on every Conv2d and Linear, in Gradient×Input form."""
    import torch
    import zennit.rules
    from lxt.efficient import monkey_patch_zennit
    from zennit.composites import LayerMapComposite

    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="Failed to patch")
        monkey_patch_zennit()
    composite = LayerMapComposite([
        (torch.nn.Conv2d, zennit.rules.Gamma(gamma_conv)),
        (torch.nn.Linear, zennit.rules.Gamma(gamma_linear)),
    ])
    composite.register(model)
    return composite


def patch_classes(family: str, mode: str) -> None:
    """Apply LXT's patches for ``mode`` to ``family``'s transformers module (before loading)."""
    if mode == "gradient" or family == "conv":
        return
    sys.path.insert(0, str(STUBS_DIR))
    from lxt.efficient import monkey_patch

    if family == "vit":
        patch_vit(mode)
        return
    if family == "bert" and mode == "cp-lrp":
        patch_bert_cp_lrp()
        return
    if family == "t5":
        patch_t5(mode)
        return
    if family == "mixtral":
        patch_map = mixtral_patch_map(mode)
    elif family in ("qwen3_moe", "qwen2_moe"):
        patch_map = qwen_moe_patch_map(family, mode)
    else:
        lxt_family = importlib.import_module(f"lxt.efficient.models.{family}")
        patch_map = lxt_family.attnLRP if mode == "attnlrp" else lxt_family.cp_LRP
    with warnings.catch_warnings():  # LXT only warns when a patch fails; make that fatal
        warnings.filterwarnings("error", message="Failed to patch")
        monkey_patch(importlib.import_module(TRANSFORMERS_MODULES[family]), patch_map)


# --------------------------------------------------------------------------- relevance


def compute_relevance(model, family: str, input_ids, attention_mask, target, position=None) -> dict[str, np.ndarray]:
    """Backpropagate the summed explained logits to the word embeddings (gradient x input)."""
    import torch

    input_ids = torch.as_tensor(input_ids, dtype=torch.int64)
    attention_mask = torch.as_tensor(attention_mask, dtype=torch.int64)
    target = torch.as_tensor(target, dtype=torch.int64).clone()
    rows = torch.arange(input_ids.shape[0])

    inputs_embeds = model.get_input_embeddings()(input_ids).detach().requires_grad_()
    logits = model(inputs_embeds=inputs_embeds, attention_mask=attention_mask, return_dict=False)[0]

    result = {}
    explained_rows = logits
    if family in LANGUAGE_MODEL_FAMILIES:
        position = torch.as_tensor(position, dtype=torch.int64) % input_ids.shape[1]
        explained_rows = logits[rows, position]
        result["position"] = position.numpy()
    target = torch.where(target < 0, explained_rows.argmax(-1), target)
    explained = explained_rows[rows, target]
    explained.sum().backward()

    relevance = inputs_embeds.detach().double() * inputs_embeds.grad.double()
    result.update(
        relevance=relevance.numpy(),
        logits=logits.detach().numpy(),
        explained=explained.detach().numpy(),
        target=target.numpy(),
    )
    return result


def compute_seq2seq_relevance(model, input_ids, attention_mask, decoder_input_ids, target,
                              position) -> dict[str, np.ndarray]:
    """Backpropagate the summed explained decoder logits to both embedding lookups of the shared
    table: ``inputs_embeds`` (encoder, ``relevance``) and ``decoder_inputs_embeds`` (``decoder_relevance``)."""
    import torch

    input_ids = torch.as_tensor(input_ids, dtype=torch.int64)
    decoder_input_ids = torch.as_tensor(decoder_input_ids, dtype=torch.int64)
    target = torch.as_tensor(target, dtype=torch.int64).clone()
    rows = torch.arange(input_ids.shape[0])
    embedding = model.get_input_embeddings()
    inputs_embeds = embedding(input_ids).detach().requires_grad_()
    decoder_inputs_embeds = embedding(decoder_input_ids).detach().requires_grad_()
    logits = model(inputs_embeds=inputs_embeds, attention_mask=torch.as_tensor(attention_mask, dtype=torch.int64),
                   decoder_inputs_embeds=decoder_inputs_embeds, use_cache=False, return_dict=False)[0]

    position = torch.as_tensor(position, dtype=torch.int64) % decoder_input_ids.shape[1]
    explained_rows = logits[rows, position]
    target = torch.where(target < 0, explained_rows.argmax(-1), target)
    explained = explained_rows[rows, target]
    explained.sum().backward()
    return dict(
        relevance=(inputs_embeds.detach().double() * inputs_embeds.grad.double()).numpy(),
        decoder_relevance=(decoder_inputs_embeds.detach().double() * decoder_inputs_embeds.grad.double()).numpy(),
        logits=logits.detach().numpy(), explained=explained.detach().numpy(), target=target.numpy(),
        position=position.numpy(),
    )


def compute_pixel_relevance(model, pixel_values, target) -> dict[str, np.ndarray]:
    """Backpropagate the summed explained logits to the pixels (gradient x input)."""
    import torch

    pixel_values = torch.as_tensor(pixel_values, dtype=torch.float32).clone().requires_grad_()
    target = torch.as_tensor(target, dtype=torch.int64).clone()
    logits = model(pixel_values=pixel_values, return_dict=False)[0]
    rows = torch.arange(pixel_values.shape[0])
    target = torch.where(target < 0, logits.argmax(-1), target)
    explained = logits[rows, target]
    explained.sum().backward()
    relevance = pixel_values.detach().double() * pixel_values.grad.double()
    return dict(relevance=relevance.numpy(), logits=logits.detach().numpy(),
                explained=explained.detach().numpy(), target=target.numpy())


def conv_gamma_relevance(inputs, gamma: float) -> dict[str, np.ndarray]:
    """Plain Zennit Gamma(gamma) on one Conv2d: the input relevance for output relevance y * seed."""
    import torch

    sys.path.insert(0, str(STUBS_DIR))  # zennit imports torchvision's ResNet blocks
    import zennit.rules

    weight = torch.as_tensor(inputs["weight"])
    bias = torch.as_tensor(inputs["bias"]) if "bias" in inputs.files else None
    conv = torch.nn.Conv2d(weight.shape[1], weight.shape[0], tuple(weight.shape[2:]), stride=int(inputs["stride"]),
                           padding=int(inputs["padding"]), bias=bias is not None)
    with torch.no_grad():
        conv.weight.copy_(weight)
        if bias is not None:
            conv.bias.copy_(bias)
    handles = zennit.rules.Gamma(gamma).register(conv)
    x = torch.as_tensor(inputs["x"]).clone().requires_grad_()
    y = conv(x)
    output_relevance = y.detach() * torch.as_tensor(inputs["seed"])
    (relevance,) = torch.autograd.grad(y, x, output_relevance)
    handles.remove()
    return dict(relevance=relevance.double().numpy(), output=y.detach().numpy())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Compute reference relevances in PyTorch.")
    parser.add_argument("--family", choices=FAMILIES, required=True)
    parser.add_argument("--hf-dir", help="directory written by models.tiny.save (all families but conv)")
    parser.add_argument("--mode", required=True, help=f"one of {', '.join(MODES)}; for conv: gamma:G")
    parser.add_argument("--gamma-conv", type=float, default=0.25, help="vit-gamma: Zennit Gamma on Conv2d")
    parser.add_argument("--gamma-linear", type=float, default=0.05, help="vit-gamma: Zennit Gamma on Linear")
    parser.add_argument("--inputs", required=True, help="npz with input_ids, attention_mask, target, position")
    parser.add_argument("--out", required=True, help="npz to write")
    parser.add_argument("--loader", choices=LOADERS, default="tiny",
                        help="tiny: models.tiny.load; smollm2 (llama family) / minilm (bert family, sentence "
                             "embedding; its L2 norm is held constant under LRP rules, as AttnLRP treats norms)")
    args = parser.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.path.insert(0, str(REPO_ROOT))
    if args.family == "conv":
        if not args.mode.startswith("gamma:"):
            parser.error("family conv takes --mode gamma:G")
        with np.load(args.inputs) as inputs:
            np.savez(args.out, **conv_gamma_relevance(inputs, float(args.mode.split(":", 1)[1])))
        return
    if args.mode not in MODES or (args.mode == "vit-gamma" and args.family != "vit"):
        parser.error(f"--mode {args.mode} does not apply to family {args.family}")
    if args.hf_dir is None:
        parser.error(f"family {args.family} needs --hf-dir")
    patch_classes(args.family, args.mode)  # must precede loading: LXT may replace classes
    if args.loader == "smollm2":
        from models import smollm2

        model = smollm2.load(args.hf_dir)
    elif args.loader == "minilm":
        from models import minilm

        model = minilm.load(args.hf_dir, detach_norm=args.mode != "gradient")
    else:
        from models import tiny

        model = tiny.load(args.family, args.hf_dir)
    if args.family == "bert" and args.mode == "cp-lrp":
        stop_bert_query_key_gradient(model)
    if args.family == "t5" and args.mode != "gradient":
        divide_t5_attention_gradients(model, args.mode)
    if args.family == "qwen2_moe" and args.mode != "gradient":
        from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeAttention

        divide_attention_gradients(model, args.mode, Qwen2MoeAttention)
    if args.family == "vit":
        if args.mode == "vit-gamma":
            register_zennit_gamma(model, args.gamma_conv, args.gamma_linear)
        with np.load(args.inputs) as inputs:
            target = inputs["target"] if "target" in inputs.files else np.full(len(inputs["pixel_values"]), -1)
            np.savez(args.out, **compute_pixel_relevance(model, inputs["pixel_values"], target))
        return

    with np.load(args.inputs) as inputs:
        input_ids = inputs["input_ids"]
        batch = input_ids.shape[0]
        default = np.full(batch, -1, dtype=np.int64)
        target = inputs["target"] if "target" in inputs.files else default
        position = inputs["position"] if "position" in inputs.files else default
        if args.family in ENCODER_DECODER_FAMILIES:
            result = compute_seq2seq_relevance(model, input_ids, inputs["attention_mask"],
                                               inputs["decoder_input_ids"], target, position)
        else:
            result = compute_relevance(model, args.family, input_ids, inputs["attention_mask"], target, position)
    np.savez(args.out, **result)


if __name__ == "__main__":
    main()
