"""The faithfulness table of docs/faithfulness.md, plot and heatmaps, from a clean checkout:

    python -m tools.faithfulness --out build/faithfulness

1. exports SmolLM2-135M and all-MiniLM-L6-v2 to ONNX (models/; skipped when already there);
2. `lrp_onnx.evaluate` on each (what `lrp-onnx evaluate` runs): SmolLM2 explains its own next-token
   prediction after the first sentence of each pair in tools/data/sentence_pairs.tsv minus its last
   word; MiniLM explains the similarity of each sentence to its paraphrase, both ways round;
3. LXT's AttnLRP in PyTorch on the same examples (tools/lxt_perturbation.py, a fresh process);
4. a sensitivity run: SmolLM2 again with the explained token's log-probability as the score;
5. writes table.md (ABPC mean ± standard error per method and model, next to LXT's; where each method
   puts its top token; the sensitivity table), faithfulness.png (the mean MoRF/LeRF curves) and a
   token heatmap per model (heatmap_<model>.png / .html).

A text classifier (the AttnLRP paper's sentiment protocol) on the project's reviews instead:

    python -m tools.faithfulness --classifier DIR --out build/faithfulness-classifier

DIR holds model.onnx ([batch, classes] logits), tokenizer.json and, for the LXT column, hf/ (the
Hugging Face model, a model_type LXT 2.1 patches: bert) or lxt.json naming a loader of
tools/lxt_perturbation.py (models/classifier_nanoguard.py writes {"loader": "nanoguard"}). The texts are tools/data/reviews.tsv (120
reviews written for the project, CC0); each explains its predicted class (`--explain label`: the
review's sentiment, with --labels naming the classes in index order); score = that class's logit,
plus a log-probability run. Writes table.md and the evaluate outputs under OUT/classifier{,-logprob}.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
TEXTS = REPO / "tools" / "data" / "sentence_pairs.tsv"
MODELS = {
    # name: (recipe module, task, default number of examples: None = all)
    "SmolLM2-135M": ("smollm2", "next-token", None),      # the first sentence of each pair (119)
    "all-MiniLM-L6-v2": ("minilm", "similarity", None),   # each pair both ways (238)
}
METHOD_LABELS = {"attnlrp": "AttnLRP", "cp-lrp": "CP-LRP", "gradient": "G×I", "ig": "IG", "random": "random"}


def log(msg: str) -> None:
    print(f"[faithfulness] {msg}", file=sys.stderr, flush=True)


def ensure_export(recipe: str, cache: Path) -> Path:
    directory = cache / recipe
    if not (directory / "model.onnx").exists():
        log(f"exporting {recipe} to {directory}")
        subprocess.run([sys.executable, "-m", f"models.{recipe}", "--out", str(directory)], check=True, cwd=REPO)
    return directory


def run_lxt(recipe: str, directory: Path, results: Path, out: Path) -> dict:
    """recipe: smollm2, minilm, classifier (a Hugging Face sequence classifier in directory/hf) or
    nanoguard (the installed metatronnanoguard package's model)."""
    subprocess.run([sys.executable, str(REPO / "tools" / "lxt_perturbation.py"), "--loader", recipe,
                    "--hf-dir", str(directory / "hf"), "--results", str(results), "--out", str(out)],
                   check=True, cwd=REPO)
    return json.loads(out.read_text())


def write_heatmap(evaluation, tokenizer: Path, out_dir: Path, name: str, rows: int = 4) -> None:
    from lrp_onnx.run.text import load_tokenizer
    from lrp_onnx.run.heatmap import token_pieces, write_tokens_html, write_tokens_png

    tok = load_tokenizer(str(tokenizer))
    entries = []
    for k, example in enumerate(evaluation.examples[:rows]):
        e = tok.encode(example.text)
        what = (f"next token {tok.decode([example.target])!r}" if evaluation.task == "next-token"
                else "similarity to its paraphrase")
        entries.append({"pieces": token_pieces(example.text, e.offsets, e.tokens),
                        "relevance": evaluation.methods["attnlrp"].relevance[k],
                        "title": f"{name}, AttnLRP, explained: {what}"})
    write_tokens_html(entries, str(out_dir / f"heatmap_{name}.html"))
    write_tokens_png(entries, str(out_dir / f"heatmap_{name}.png"))


def plot(evaluations: dict, lxt: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lrp_onnx.check.faithfulness import Evaluation

    colors = {"attnlrp": "tab:red", "cp-lrp": "tab:orange", "gradient": "tab:blue", "ig": "tab:green",
              "random": "tab:gray"}
    fig, axes = plt.subplots(1, len(evaluations), figsize=(6 * len(evaluations), 4.2), dpi=100)
    for ax, (name, ev) in zip(np.atleast_1d(axes), evaluations.items()):
        for m, r in ev.methods.items():
            s = r.summary()
            ax.plot(ev.GRID, ev.mean_curve(m, "morf"), color=colors[m],
                    label=f"{METHOD_LABELS[m]} {s['abpc_mean']:.2f}")
            ax.plot(ev.GRID, ev.mean_curve(m, "lerf"), color=colors[m], linestyle="--")
        if name in lxt:
            curves = lxt[name]["examples"]
            morf = np.mean([np.interp(Evaluation.GRID, np.linspace(0, 1, len(c["morf"])), c["morf"]) for c in curves], 0)
            lerf = np.mean([np.interp(Evaluation.GRID, np.linspace(0, 1, len(c["lerf"])), c["lerf"]) for c in curves], 0)
            ax.plot(ev.GRID, morf, color="black", linestyle=":", label=f"LXT AttnLRP {lxt[name]['summary']['abpc_mean']:.2f}")
            ax.plot(ev.GRID, lerf, color="black", linestyle=":")
        ax.set_title(f"{name} ({ev.task}, n={len(ev.examples)})")
        ax.set_xlabel("fraction of tokens removed (solid MoRF, dashed LeRF)")
        ax.set_ylabel("explained score")
        ax.legend(fontsize=8, title="ABPC", title_fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def table(evaluations: dict, lxt: dict, seconds: dict) -> str:
    methods = list(next(iter(evaluations.values())).methods)
    head = "| model (task, texts) | " + " | ".join(METHOD_LABELS[m] for m in methods) + " | LXT AttnLRP (PyTorch) |"
    lines = [head, "|" + "---|" * (len(methods) + 2)]
    for name, ev in evaluations.items():
        cells = []
        for m in methods:
            s = ev.methods[m].summary()
            cells.append(f"{s['abpc_mean']:.3f} ± {s['abpc_sem']:.3f}")
        if name in lxt:
            s = lxt[name]["summary"]
            cells.append(f"{s['abpc_mean']:.3f} ± {s['abpc_sem']:.3f}")
        else:
            cells.append("–")
        lines.append(f"| {name} ({ev.task}, {len(ev.examples)}) | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("ABPC = area between the LeRF and MoRF curves of the explained score over the removed fraction "
                 "(mean ± standard error over texts; larger is more faithful).")
    for name in lxt:
        ours = np.asarray(evaluations[name].methods["attnlrp"].abpc)
        theirs = np.asarray([e["abpc"] for e in lxt[name]["examples"]])
        distances = [e["relevance_rel_l2_vs_lrp_onnx"] for e in lxt[name]["examples"]]
        lines.append(f"{name}: per-text |ABPC(ours) − ABPC(LXT)| median {np.median(np.abs(ours - theirs)):.2g}, "
                     f"max {np.abs(ours - theirs).max():.2g}; token relevance relative L2 distance to LXT median "
                     f"{np.median(distances):.2g}, max {np.max(distances):.2g}.")
    lines.append("")
    lines.append("Where each method puts its most relevant token, and what removing it first (MoRF step 1) does "
                 "to the explained score:")
    lines.append("")
    lines.append("| model | method | top token is the first | top token is the last | score change at MoRF step 1 "
                 "(mean) | texts where it rises |")
    lines.append("|---|---|---|---|---|---|")
    for name, ev in evaluations.items():
        for m, r in ev.methods.items():
            first = np.mean([np.argmax(rel) == 0 for rel in r.relevance])
            last = np.mean([np.argmax(rel) == len(rel) - 1 for rel in r.relevance])
            step = np.asarray([c[1] - c[0] for c in r.morf])
            lines.append(f"| {name} | {METHOD_LABELS[m]} | {first:.0%} | {last:.0%} | {step.mean():+.3f} | "
                         f"{np.mean(step > 0):.0%} |")
    lines.append("")
    lines.append("Wall time: " + ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items()) + ".")
    return "\n".join(lines) + "\n"


def sensitivity_table(evaluation) -> str:
    methods = list(evaluation.methods)
    lines = ["Sensitivity: SmolLM2-135M with the explained token's log-probability as the score "
             "(same texts, targets and relevance; only the tracked score differs):", "",
             "| score | " + " | ".join(METHOD_LABELS[m] for m in methods) + " |",
             "|" + "---|" * (len(methods) + 1)]
    cells = []
    for m in methods:
        s = evaluation.methods[m].summary()
        cells.append(f"{s['abpc_mean']:.3f} ± {s['abpc_sem']:.3f}")
    lines.append("| log-probability | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


REVIEWS = REPO / "tools" / "data" / "reviews.tsv"


def classifier_table(name: str, evaluations: dict, lxt: dict | None, seconds: dict) -> str:
    methods = list(next(iter(evaluations.values())).methods)
    lines = ["| model (score, texts) | " + " | ".join(METHOD_LABELS[m] for m in methods) + " | LXT AttnLRP (PyTorch) |",
             "|" + "---|" * (len(methods) + 2)]
    for score, ev in evaluations.items():
        cells = [f"{ev.methods[m].summary()['abpc_mean']:.3f} ± {ev.methods[m].summary()['abpc_sem']:.3f}"
                 for m in methods]
        s = (lxt or {}).get(score, {}).get("summary")
        cells.append(f"{s['abpc_mean']:.3f} ± {s['abpc_sem']:.3f}" if s else "–")
        lines.append(f"| {name} ({score}, {len(ev.examples)}) | " + " | ".join(cells) + " |")
    lines += ["", "ABPC = area between the LeRF and MoRF curves of the explained class's score over the removed "
              "fraction of tokens ([CLS]/[SEP] never removed); mean ± standard error over texts."]
    for score, data in (lxt or {}).items():
        ours = np.asarray(evaluations[score].methods["attnlrp"].abpc)
        theirs = np.asarray([e["abpc"] for e in data["examples"]])
        distances = [e["relevance_rel_l2_vs_lrp_onnx"] for e in data["examples"]]
        lines.append(f"{score}: per-text |ABPC(ours) − ABPC(LXT)| median {np.median(np.abs(ours - theirs)):.2g}, max "
                     f"{np.abs(ours - theirs).max():.2g}; token relevance relative L2 distance to LXT median "
                     f"{np.median(distances):.2g}, max {np.max(distances):.2g}.")
    lines += ["", "Wall time: " + ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items()) + "."]
    return "\n".join(lines) + "\n"


def run_classifier(args) -> int:
    from lrp_onnx.check.faithfulness import evaluate

    directory, out = Path(args.classifier), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    hf = directory / "hf"
    labels = args.labels.split(",") if args.labels else None
    evaluations, lxt, seconds = {}, {}, {}
    for score in ("logit", "logprob"):
        start = time.time()
        log(f"classifier: lrp_onnx.evaluate (classification, score = {score})")
        # = lrp-onnx evaluate DIR/model.onnx --tokenizer DIR/tokenizer.json --texts tools/data/reviews.tsv
        #       --task classification --score SCORE [--target-column 2 --labels ...] --out OUT/classifier[-logprob]
        ev = evaluate(directory / "model.onnx", directory / "tokenizer.json", args.texts, task="classification",
                      workdir=out / "graphs", limit=args.limit, score=score, labels=labels,
                      target_column=2 if args.explain == "label" else None)
        seconds[f"evaluate ({score})"] = time.time() - start
        sub = out / ("classifier" if score == "logit" else "classifier-logprob")
        ev.write(sub, title=f"{args.name} (classification, {score})")
        evaluations[score] = ev
        loader = ("classifier" if (hf / "config.json").exists() else
                  json.loads((directory / "lxt.json").read_text())["loader"] if (directory / "lxt.json").exists()
                  else None)
        if not args.no_lxt and loader:
            start = time.time()
            log(f"classifier: LXT AttnLRP in PyTorch on the same examples ({score})")
            lxt[score] = run_lxt(loader, directory, sub / "results.json", sub / "lxt.json")
            seconds[f"LXT ({score})"] = time.time() - start
    text = classifier_table(args.name, evaluations, lxt, seconds)
    (out / "table.md").write_text(text)
    print(text)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="faithfulness table, plot and heatmaps for docs/faithfulness.md")
    parser.add_argument("--classifier", metavar="DIR", help="measure a text classifier instead (DIR: model.onnx, "
                        "tokenizer.json, hf/ for LXT) on --texts")
    parser.add_argument("--name", default="classifier", help="--classifier: the model's name in the table")
    parser.add_argument("--texts", default=str(REVIEWS), help="--classifier: TAB-separated text, label lines")
    parser.add_argument("--explain", choices=["predicted", "label"], default="predicted",
                        help="--classifier: the predicted class, or the label of column 2 (default predicted)")
    parser.add_argument("--labels", help="--classifier: class names in index order (for --explain label)")
    parser.add_argument("--limit", type=int, help="--classifier: the first N texts")
    parser.add_argument("--out", default="build/faithfulness")
    parser.add_argument("--cache", default="build", help="where the exported models are (default build/)")
    parser.add_argument("--smollm2-limit", type=int, default=MODELS["SmolLM2-135M"][2])
    parser.add_argument("--minilm-limit", type=int, default=MODELS["all-MiniLM-L6-v2"][2])
    parser.add_argument("--no-lxt", action="store_true", help="skip the PyTorch LXT comparison")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(REPO))
    if args.classifier:
        return run_classifier(args)
    from lrp_onnx.check.faithfulness import evaluate

    out, cache = Path(args.out), Path(args.cache)
    out.mkdir(parents=True, exist_ok=True)
    limits = {"SmolLM2-135M": args.smollm2_limit, "all-MiniLM-L6-v2": args.minilm_limit}
    evaluations, lxt, seconds = {}, {}, {}
    for name, (recipe, task, _) in MODELS.items():
        directory = ensure_export(recipe, cache)
        start = time.time()
        log(f"{name}: lrp_onnx.evaluate ({task})")
        # = lrp-onnx evaluate MODEL --tokenizer TOK --texts TEXTS --task TASK [--both-ways] --out DIR
        ev = evaluate(directory / "model.onnx", directory / "tokenizer.json", TEXTS, task=task,
                      workdir=out / recipe / "graphs", limit=limits[name], both_ways=task == "similarity")
        seconds[f"{name} evaluate"] = time.time() - start
        ev.write(out / recipe, title=f"{name} ({task})")
        evaluations[name] = ev
        write_heatmap(ev, directory / "tokenizer.json", out, recipe)
        if not args.no_lxt:
            start = time.time()
            log(f"{name}: LXT AttnLRP in PyTorch on the same examples")
            lxt[name] = run_lxt(recipe, directory, out / recipe / "results.json", out / recipe / "lxt.json")
            seconds[f"{name} LXT"] = time.time() - start
    # sensitivity of the SmolLM2 result to the score the curves track (the relevance is the same)
    directory = ensure_export("smollm2", cache)
    start = time.time()
    log("SmolLM2-135M: lrp_onnx.evaluate (next-token, score = log-probability)")
    logprob = evaluate(directory / "model.onnx", directory / "tokenizer.json", TEXTS, task="next-token",
                       workdir=out / "smollm2" / "graphs", limit=limits["SmolLM2-135M"], score="logprob")
    logprob.write(out / "smollm2-logprob", title="SmolLM2-135M (next-token, score = log-probability)")
    seconds["SmolLM2-135M logprob evaluate"] = time.time() - start
    plot(evaluations, lxt, out / "faithfulness.png")
    text = table(evaluations, lxt, seconds)
    text += "\n" + sensitivity_table(logprob)
    (out / "table.md").write_text(text)
    print(text)
    log(f"wrote {out / 'table.md'}, {out / 'faithfulness.png'}, heatmaps in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
