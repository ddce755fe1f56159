"""LXT's AttnLRP relevance and its MoRF/LeRF curves, in PyTorch, for the examples of an
`lrp-onnx evaluate` results.json (same token ids, same explained target or reference sentence).

    python tools/lxt_perturbation.py --loader smollm2|minilm|classifier|nanoguard --hf-dir DIR --results results.json --out lxt.json

`--loader classifier`: a Hugging Face sequence classifier saved in DIR (config.json + weights, e.g. a
BertForSequenceClassification; its model_type must be one LXT 2.1 patches: bert) for the results of
`lrp-onnx evaluate --task classification`: the score is the explained class's logit (or its
log-softmax, when the results were computed with --score logprob).

`--loader nanoguard`: the installed metatronnanoguard package's prompt-injection classifier (not a
transformers model; --hf-dir is ignored), run with LXT 2.1's rule functions placed as LXT's patches
place them (tests/reference_nanoguard.py), for `lrp-onnx evaluate --task classification` results
computed on models/classifier_nanoguard.py's export.

Runs in its own process: LXT's monkey_patch changes transformers classes process-wide. The curves
zero the removed tokens' `inputs_embeds` (LXT patches change gradients only, not forward values).
Writes per example: LXT's token relevance, its curves and ABPC, and the relative L2 distance between
LXT's token relevance and lrp-onnx's attnlrp token relevance from results.json.

The perturbation protocol (token order, curves, ABPC) is written here again (`removal_scales`,
`area_between`) and lrp_onnx is never imported, so "lrp-onnx's ABPC equals LXT's" compares two
separate implementations, not one function with itself.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent


def removal_scales(relevance, removable, length):
    """Per-token input scales, one row per perturbation step: MoRF (zero the most relevant removable
    token, then the two most relevant, ... all of them; the first row removes nothing), then LeRF
    (least relevant first). Ties keep token order."""
    relevance, removable = np.asarray(relevance, np.float64), np.asarray(removable, np.int64)
    most_first = sorted(removable.tolist(), key=lambda t: (-relevance[t], t))
    least_first = sorted(removable.tolist(), key=lambda t: (relevance[t], t))
    rows = []
    for order in (most_first, least_first):
        for step in range(len(order) + 1):
            row = [1.0] * length
            for t in order[:step]:
                row[t] = 0.0
            rows.append(row)
    return np.asarray(rows, np.float32)


def area_between(morf, lerf):
    """ABPC: area under LeRF minus area under MoRF over the removed fraction 0..1, trapezoid rule."""
    n = len(morf)
    if n < 2:
        return 0.0
    area = 0.0
    for k in range(n - 1):
        area += ((lerf[k] - morf[k]) + (lerf[k + 1] - morf[k + 1])) / 2.0 / (n - 1)
    return float(area)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--loader", choices=["smollm2", "minilm", "classifier", "nanoguard"], required=True)
    parser.add_argument("--hf-dir", required=True)
    parser.add_argument("--results", required=True, help="results.json written by lrp-onnx evaluate")
    parser.add_argument("--out", required=True)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.path.insert(0, str(REPO))
    import torch

    from tests.reference import patch_classes

    if args.loader == "nanoguard":
        family = None
    elif args.loader == "classifier":
        config = json.loads((Path(args.hf_dir) / "config.json").read_text())
        family = config.get("model_type")
        if family != "bert":
            raise SystemExit(f"LXT 2.1's AttnLRP classifier comparison supports bert here, not {family!r}")
    else:
        family = "llama" if args.loader == "smollm2" else "bert"
    if family:
        patch_classes(family, "attnlrp")  # before loading: LXT may replace classes
    if args.loader == "nanoguard":
        from models import classifier_nanoguard
        from tests.reference_nanoguard import NanoGuardLXT

        model = NanoGuardLXT(classifier_nanoguard.load_model(), "attnlrp")
    elif args.loader == "classifier":
        from transformers import AutoModelForSequenceClassification

        model = AutoModelForSequenceClassification.from_pretrained(args.hf_dir)
    elif args.loader == "smollm2":
        from models import smollm2

        model = smollm2.load(args.hf_dir)
    else:
        from models import minilm

        model = minilm.load(args.hf_dir, detach_norm=True)  # the L2 norm held constant, as in lrp-onnx
    model.eval()
    torch.set_grad_enabled(True)
    results = json.loads(Path(args.results).read_text())
    task = results["task"]
    embed = model.get_input_embeddings()

    def run(embeds):
        mask = torch.ones(embeds.shape[:2], dtype=torch.int64)
        out = model(inputs_embeds=embeds, attention_mask=mask, return_dict=False)[0]
        return out[:, -1] if task == "next-token" else out

    out = {"examples": []}
    logprob = results["settings"].get("score") == "logprob"
    for example in results["examples"]:
        ids = torch.tensor([example["input_ids"]])
        if task == "classification":
            def score(o, target=example["target"]):
                return torch.log_softmax(o.double(), -1)[:, target] if logprob else o[:, target]

            def logit(o, target=example["target"]):  # the relevance explains the logit
                return o[:, target]
        elif task == "next-token":
            def score(o, target=example["target"]):
                return o[:, target]
        else:
            with torch.no_grad():
                reference = run(embed(torch.tensor([example["reference_ids"]])))[0]

            def score(o, reference=reference):
                return o @ reference
        if task != "classification":
            logit = score
        x = embed(ids).detach().requires_grad_()
        explained = logit(run(x))
        explained.sum().backward()
        relevance = (x * x.grad).detach().sum(-1)[0].double().numpy()
        length = ids.shape[1]
        scales = torch.from_numpy(removal_scales(relevance, example["removable"], length))
        scores = []
        with torch.no_grad():
            base = embed(ids).detach()
            for start in range(0, len(scales), args.batch_size):
                chunk = scales[start:start + args.batch_size]
                scores.append(score(run(base * chunk[:, :, None])).double().numpy())
        curve = np.concatenate(scores)
        half = len(curve) // 2
        ours = np.asarray(example["relevance"]["attnlrp"]) if "attnlrp" in example["relevance"] else None
        out["examples"].append({
            "relevance": relevance.tolist(), "morf": curve[:half].tolist(), "lerf": curve[half:].tolist(),
            "abpc": area_between(curve[:half], curve[half:]),
            "relevance_rel_l2_vs_lrp_onnx": None if ours is None else
            float(np.linalg.norm(ours - relevance) / np.linalg.norm(relevance)),
        })
    a = np.asarray([e["abpc"] for e in out["examples"]])
    out["summary"] = {"abpc_mean": float(a.mean()), "abpc_std": float(a.std(ddof=1)),
                      "abpc_sem": float(a.std(ddof=1) / np.sqrt(len(a))), "n": len(a)}
    Path(args.out).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
