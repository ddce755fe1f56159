"""Faithfulness by input perturbation, computed entirely in onnxruntime (no PyTorch).

The AttnLRP paper's protocol: order a text's tokens by relevance, remove them (zero their source
embeddings) most-relevant-first (MoRF) and least-relevant-first (LeRF), track the explained score,
and take the area between the two curves (ABPC = area(LeRF) - area(MoRF), over the removed fraction
0..1; larger is better).

    prepare_graphs: the model with its source tensor scaled per token by a new input
                    `lrp_source_scale` [batch, sequence] (1 keeps a token, 0 removes it, alpha scales
                    it for Integrated Gradients) -> perturbable.onnx
                    -> forward.onnx (the explained score only; an LM head at one position)
                    -> <method>.onnx, converted by lrp_onnx.convert (relevance-only)
    evaluate:       relevance per token for each method -> MoRF/LeRF orders -> perturbed forwards
                    (batched) -> curves -> ABPC per example -> summary (mean, std, standard error)

Methods: attnlrp, cp-lrp, gradient (Gradient×Input), ig (Integrated Gradients, zero baseline,
midpoint rule; its steps run as one batch through the gradient graph) and random.
Tasks: "next-token" (a causal LM's logit of its own argmax next token at the last position) and
"similarity" (a sentence-embedding model's dot product with a reference sentence's embedding,
explained through the seed input).
"""
from __future__ import annotations

import io
import json
import os
import sys
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .errors import LRPError
from .files import write_atomically
from .runner import text_inputs

METHODS = ("attnlrp", "cp-lrp", "gradient", "ig", "random")
CONVERTED_METHODS = {"attnlrp": "attnlrp", "cp-lrp": "cp-lrp", "gradient": "gradient", "ig": "gradient"}
TASKS = ("next-token", "similarity")
SCORES = {"next-token": ("logit", "logprob"), "similarity": ("dot",)}
SCALE_INPUT = "lrp_source_scale"
WEIGHTS_FILE = "weights.data"


# -- graphs --------------------------------------------------------------------------------------
def add_source_scale(model: onnx.ModelProto, source: str) -> None:
    """Multiply `source` [batch, sequence, ...] by the new input lrp_source_scale [batch, sequence]
    (default 1: the model is unchanged) before any node reads it."""
    g = model.graph
    scaled = f"{source}/lrp_scaled"
    for n in g.node:
        for k, t in enumerate(n.input):
            if t == source:
                n.input[k] = scaled
    for o in g.output:
        if o.name == source:
            raise LRPError(f"source '{source}' is a graph output; it cannot be perturbed")
    g.initializer.append(numpy_helper.from_array(np.ones((1, 1), np.float32), SCALE_INPUT))
    g.initializer.append(numpy_helper.from_array(np.array([-1], np.int64), "lrp/scale/last_axis"))
    g.input.append(helper.make_tensor_value_info(SCALE_INPUT, TensorProto.FLOAT, ["lrp_batch", "lrp_sequence"]))
    nodes = [
        helper.make_node("Unsqueeze", [SCALE_INPUT, "lrp/scale/last_axis"], ["lrp/scale/column"],
                         name="lrp/scale/unsqueeze"),
        helper.make_node("CastLike", ["lrp/scale/column", source], ["lrp/scale/typed"], name="lrp/scale/cast"),  # type only
        helper.make_node("Mul", [source, "lrp/scale/typed"], [scaled], name="lrp/scale/mul"),
    ]
    producer = next((k for k, n in enumerate(g.node) if source in n.output), None)
    at = 0 if producer is None else producer + 1
    for k, node in enumerate(nodes):
        g.node.insert(at + k, node)


def _save_with_shared_weights(model: onnx.ModelProto, path: str, base_dir: str | None) -> None:
    """Weights that are inline go to one external file beside `path` (so that every graph written
    later to that directory references the same file); external ones stay where they are."""
    from .pipeline import _all_tensors, save_model

    tensors = list(_all_tensors(model))
    if not any(t.data_location == TensorProto.EXTERNAL for t in tensors):
        from onnx.external_data_helper import convert_model_to_external_data

        convert_model_to_external_data(model, all_tensors_to_one_file=True, location=WEIGHTS_FILE,
                                       size_threshold=1024)
        if os.path.exists(os.path.join(os.path.dirname(path), WEIGHTS_FILE)):
            os.unlink(os.path.join(os.path.dirname(path), WEIGHTS_FILE))
        onnx.save_model(model, path)
        return
    save_model(model, path, base_dir)


@dataclass
class Graphs:
    forward: str               # inputs of the model + lrp_source_scale (+ lrp_position); one output
    score_output: str          # that output: [batch, 1, vocab] (next-token) or [batch, dim] (similarity)
    explain: dict              # method -> converted model path
    source: str
    task: str


def prepare_graphs(model_path, workdir, methods=METHODS, task: str = "next-token", output: str | None = None,
                   source: str | None = None, log=None) -> Graphs:
    """Write perturbable.onnx, forward.onnx and one converted model per relevance method into workdir."""
    from .canonicalize import drop_outputs, select_position_before_head
    from .graph import GraphView
    from .pipeline import convert, default_sources, load_model
    from .shapes import infer_shapes

    if task not in TASKS:
        raise LRPError(f"unknown task '{task}'; choose one of: {', '.join(TASKS)}")
    os.makedirs(workdir, exist_ok=True)
    model, base_dir = load_model(model_path)
    view = GraphView.build(model, infer_shapes(model))
    output = output or view.graph_outputs[0]
    if output not in view.graph_outputs:
        raise LRPError(f"--output '{output}' is not a graph output; outputs are: {', '.join(view.graph_outputs)}")
    rank = view.rank(output)
    if task == "next-token" and rank != 3:
        raise LRPError(f"task next-token needs logits [batch, sequence, vocab]; '{output}' has rank {rank}")
    if task == "similarity" and rank != 2:
        raise LRPError(f"task similarity needs an embedding [batch, dim]; '{output}' has rank {rank}")
    source = source or default_sources(view, output)[0]
    if view.rank(source) != 3:
        raise LRPError(f"source '{source}' must be [batch, sequence, hidden] to remove tokens from it")
    add_source_scale(model, source)
    drop_outputs(model, keep={output})
    perturbable = os.path.join(workdir, "perturbable.onnx")
    _save_with_shared_weights(model, perturbable, base_dir)
    if log:
        log(f"wrote {perturbable}")

    forward_model, _ = load_model(perturbable)
    score_output = output
    if task == "next-token":
        fview = GraphView.build(forward_model, infer_shapes(forward_model))
        selected = select_position_before_head(forward_model, fview, output)
        if selected is None:
            raise LRPError(f"could not find the position-wise head of '{output}'")
        score_output = selected
        drop_outputs(forward_model, keep={selected})
    forward = os.path.join(workdir, "forward.onnx")
    from .pipeline import save_model

    save_model(forward_model, forward, workdir)
    explain = {}
    for method in methods:
        rules = CONVERTED_METHODS.get(method)
        if rules is None:  # random needs no graph
            continue
        path = os.path.join(workdir, f"{rules}.onnx")
        if path not in explain.values():
            convert(perturbable, path, rules=rules, source=source, output=output,
                    seed_input=task == "similarity", relevance_only=True)
            if log:
                log(f"wrote {path}")
        explain[method] = path
    return Graphs(forward, score_output, explain, source, task)


# -- examples ------------------------------------------------------------------------------------
@dataclass
class Example:
    """One explained text: its token ids, which tokens may be removed, what is explained."""
    text: str
    tokens: list
    input_ids: np.ndarray               # int64 [sequence]
    removable: np.ndarray               # indices of the tokens that perturbation may remove
    reference_ids: np.ndarray | None = None  # similarity: the reference sentence
    target: int | None = None           # next-token: the explained vocabulary index (filled in)
    seed: np.ndarray | None = None      # similarity: the reference embedding (filled in)


def read_sentence_pairs(path, limit: int | None = None) -> list[tuple[str, str | None]]:
    """Lines of `text` or `text<TAB>reference`; blank lines and lines starting with # are skipped."""
    if not os.path.isfile(path):
        raise LRPError(f"{path}: no such text file")
    pairs = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.rstrip("\n")
            if not line.strip() or line.startswith("#"):
                continue
            text, _, reference = line.partition("\t")
            pairs.append((text.strip(), reference.strip() or None))
    if not pairs:
        raise LRPError(f"{path}: holds no text lines")
    return pairs[:limit] if limit else pairs


def make_examples(tokenizer_path, pairs, task: str) -> list[Example]:
    """next-token: the text without its last word is the prompt (the model predicts what follows);
    similarity: the text, explained against its reference (pairs without one are an error)."""
    from .cli import load_tokenizer

    tok = load_tokenizer(tokenizer_path)
    examples = []
    for text, reference in pairs:
        if task == "next-token":
            prompt = text.rsplit(" ", 1)[0] if " " in text else text
            e = tok.encode(prompt)
            ref = None
        else:
            if reference is None:
                raise LRPError(f"task similarity needs 'text<TAB>reference' lines; no reference for {text!r}")
            prompt, e = text, tok.encode(text)
            ref = np.asarray(tok.encode(reference).ids, np.int64)
        special = np.asarray(e.special_tokens_mask, bool)
        removable = np.flatnonzero(~special)
        if len(removable) == 0:
            continue
        examples.append(Example(prompt, list(e.tokens), np.asarray(e.ids, np.int64), removable, ref))
    return examples


# -- running -------------------------------------------------------------------------------------
class _Sessions:
    """The forward graph's session and one Explainer per converted graph (ig shares gradient's)."""

    def __init__(self, graphs: Graphs, threads: int | None):
        from .runner import Explainer, open_session

        self.forward, self.forward_inputs = open_session(graphs.forward, threads=threads, label=graphs.forward)
        by_path = {path: Explainer(path, threads=threads) for path in set(graphs.explain.values())}
        self.explainers = {method: by_path[path] for method, path in graphs.explain.items()}


def _forward_scores(sessions: _Sessions, graphs: Graphs, ids: np.ndarray, scales: np.ndarray,
                    example: Example, batch_size: int, score: str = "logit") -> np.ndarray:
    """The explained score of each row of `scales` [rows, sequence] (token ids shared by all rows):
    the target's logit or log-probability (next-token), the dot product with the seed (similarity)."""
    scores = []
    for start in range(0, len(scales), batch_size):
        chunk = scales[start:start + batch_size].astype(np.float32)
        feed = text_inputs(sessions.forward_inputs, np.repeat(ids[None], len(chunk), axis=0))
        feed[SCALE_INPUT] = chunk
        if "lrp_position" in sessions.forward_inputs:
            feed["lrp_position"] = np.full(len(chunk), -1, np.int64)
        out = sessions.forward.run([graphs.score_output], feed)[0]
        if graphs.task == "next-token" and score == "logprob":
            logits = out[:, 0].astype(np.float64)
            peak = logits.max(axis=1)
            log_norm = peak + np.log(np.exp(logits - peak[:, None]).sum(axis=1))
            scores.append(logits[:, example.target] - log_norm)
        elif graphs.task == "next-token":
            scores.append(out[:, 0, example.target])
        else:
            scores.append(out @ example.seed)
    return np.concatenate(scores).astype(np.float64)


def _relevance(sessions: _Sessions, graphs: Graphs, method: str, example: Example, ig_steps: int,
               rng: np.random.Generator) -> np.ndarray:
    """Relevance per token [sequence] of one method."""
    length = len(example.input_ids)
    if method == "random":
        return rng.standard_normal(length)
    explainer = sessions.explainers[method]
    rows = ig_steps if method == "ig" else 1
    alphas = (np.arange(rows) + 0.5) / rows if method == "ig" else np.ones(1)
    ids = np.repeat(example.input_ids[None], rows, axis=0)
    feed = text_inputs(explainer.input_names, ids)
    feed[SCALE_INPUT] = np.repeat(alphas[:, None], length, axis=1).astype(np.float32)
    if graphs.task == "next-token":
        kwargs = dict(target=np.full(rows, example.target), position=np.full(rows, -1))
    else:
        kwargs = dict(seed=np.repeat(example.seed[None].astype(np.float32), rows, axis=0))
    result = explainer.run(**kwargs, **feed)
    per_token = result.relevance.astype(np.float64).sum(axis=-1)  # [rows, sequence]
    if method == "ig":  # relevance at alpha*x is x * alpha * grad(alpha*x): divide alpha out, average
        return (per_token / alphas[:, None]).mean(axis=0)
    return per_token[0]


def perturbation_curves(relevance: np.ndarray, removable: np.ndarray, length: int):
    """Scales for MoRF and LeRF: row k removes the k most (least) relevant removable tokens."""
    r = relevance[removable]
    morf = removable[np.argsort(-r, kind="stable")]
    lerf = removable[np.argsort(r, kind="stable")]
    rows = []
    for order in (morf, lerf):
        for k in range(len(order) + 1):
            s = np.ones(length, np.float32)
            s[order[:k]] = 0.0
            rows.append(s)
    return np.stack(rows)


def abpc(morf: np.ndarray, lerf: np.ndarray) -> float:
    """Area between the LeRF and MoRF curves over the removed fraction 0..1 (trapezoid rule)."""
    x = np.linspace(0.0, 1.0, len(morf))
    d = lerf - morf
    return float(np.sum((d[1:] + d[:-1]) * np.diff(x)) / 2)


@dataclass
class MethodResult:
    abpc: list = field(default_factory=list)   # one per example
    morf: list = field(default_factory=list)   # curves (explained score after k removals)
    lerf: list = field(default_factory=list)
    relevance: list = field(default_factory=list)  # per-token relevance per example

    def summary(self) -> dict:
        a = np.asarray(self.abpc)
        return {"abpc_mean": float(a.mean()), "abpc_std": float(a.std(ddof=1)) if len(a) > 1 else 0.0,
                "abpc_sem": float(a.std(ddof=1) / np.sqrt(len(a))) if len(a) > 1 else 0.0, "n": int(len(a))}


@dataclass
class Evaluation:
    task: str
    methods: dict            # method -> MethodResult
    examples: list           # Example
    settings: dict

    GRID = np.linspace(0.0, 1.0, 21)

    def mean_curve(self, method: str, which: str) -> np.ndarray:
        """The curve averaged over examples, each interpolated onto GRID (removed fraction)."""
        curves = getattr(self.methods[method], which)
        return np.mean([np.interp(self.GRID, np.linspace(0, 1, len(c)), c) for c in curves], axis=0)

    def to_dict(self) -> dict:
        return {
            "task": self.task, "settings": self.settings,
            "summary": {m: r.summary() for m, r in self.methods.items()},
            "mean_curves": {m: {"fraction_removed": self.GRID.tolist(), "morf": self.mean_curve(m, "morf").tolist(),
                                "lerf": self.mean_curve(m, "lerf").tolist()} for m in self.methods},
            "examples": [
                {"text": e.text, "tokens": e.tokens, "input_ids": e.input_ids.tolist(),
                 "removable": e.removable.tolist(), "target": e.target,
                 "reference_ids": None if e.reference_ids is None else e.reference_ids.tolist(),
                 "abpc": {m: r.abpc[k] for m, r in self.methods.items()},
                 "relevance": {m: np.asarray(r.relevance[k]).tolist() for m, r in self.methods.items()},
                 "morf": {m: np.asarray(r.morf[k]).tolist() for m, r in self.methods.items()},
                 "lerf": {m: np.asarray(r.lerf[k]).tolist() for m, r in self.methods.items()}}
                for k, e in enumerate(self.examples)],
        }

    def write(self, out_dir, title: str | None = None) -> list[str]:
        """results.json, abpc.csv (per example), curves.csv (mean curves) and curves.png: all are
        rendered first, then written (a missing matplotlib or a bad folder writes none of them)."""
        contents = {"results.json": json.dumps(self.to_dict(), indent=1).encode("utf-8")}
        methods = list(self.methods)
        lines = ["example," + ",".join(methods)]
        lines += [f"{k}," + ",".join(f"{self.methods[m].abpc[k]:.6g}" for m in methods)
                  for k in range(len(self.examples))]
        contents["abpc.csv"] = ("\n".join(lines) + "\n").encode("utf-8")
        lines = ["method,curve," + ",".join(f"{x:.2f}" for x in self.GRID)]
        for m in methods:
            for which in ("morf", "lerf"):
                lines.append(f"{m},{which}," + ",".join(f"{v:.6g}" for v in self.mean_curve(m, which)))
        contents["curves.csv"] = ("\n".join(lines) + "\n").encode("utf-8")
        contents["curves.png"] = render_curves(self, title)
        if os.path.lexists(out_dir) and not os.path.isdir(out_dir):
            raise LRPError(f"{out_dir}: exists and is not a directory")
        os.makedirs(out_dir, exist_ok=True)
        written = []
        for name, data in contents.items():
            path = os.path.join(out_dir, name)
            write_atomically(path, data)
            written.append(path)
        return written


def plot_curves(evaluation: Evaluation, path: str, title: str | None = None) -> str:
    write_atomically(path, render_curves(evaluation, title))
    return path


def render_curves(evaluation: Evaluation, title: str | None = None) -> bytes:
    """The MoRF/LeRF curves plot as PNG bytes."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise LRPError("the curves plot needs matplotlib: pip install matplotlib") from None
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    colors = {"attnlrp": "tab:red", "cp-lrp": "tab:orange", "gradient": "tab:blue", "ig": "tab:green",
              "random": "tab:gray"}
    x = evaluation.GRID
    for m, r in evaluation.methods.items():
        s = r.summary()
        c = colors.get(m)
        ax.plot(x, evaluation.mean_curve(m, "morf"), color=c, label=f"{m} (ABPC {s['abpc_mean']:.2f})")
        ax.plot(x, evaluation.mean_curve(m, "lerf"), color=c, linestyle="--")
    ax.set_xlabel("fraction of tokens removed (solid: MoRF, dashed: LeRF)")
    ax.set_ylabel("explained score")
    ax.set_title(title or f"perturbation curves, {evaluation.task}, n={len(evaluation.examples)}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


def evaluate(model_path, tokenizer_path, texts, *, task: str = "next-token", methods=METHODS,
             workdir=None, output: str | None = None, source: str | None = None, limit: int | None = None,
             ig_steps: int = 16, batch_size: int = 64, threads: int | None = None, seed: int = 0,
             progress: bool = True, both_ways: bool = False, score: str | None = None) -> Evaluation:
    """MoRF/LeRF curves and ABPC of each method on the texts (a file of lines, or a list of strings or
    (text, reference) pairs), computed in onnxruntime. `workdir` receives the graphs (default: a
    temporary directory). both_ways: each (text, reference) pair also as (reference, text), after
    `limit` is applied. score (next-token): what the curves track, "logit" (the explained logit, the
    paper's protocol) or "logprob" (its log-probability); the relevance always explains the logit."""
    import tempfile

    if task not in TASKS:
        raise LRPError(f"unknown task '{task}'; choose one of: {', '.join(TASKS)}")
    score = score or SCORES[task][0]
    if score not in SCORES[task]:
        raise LRPError(f"score '{score}' does not apply to task {task}; choose one of: {', '.join(SCORES[task])}")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise LRPError(f"unknown method(s) {', '.join(unknown)}; choose from: {', '.join(METHODS)}")
    if isinstance(texts, (str, os.PathLike)):
        pairs = read_sentence_pairs(texts, limit)
    else:
        pairs = [(t, None) if isinstance(t, str) else tuple(t) for t in texts][:limit]
    if both_ways:
        missing = [a for a, b in pairs if b is None]
        if missing:
            raise LRPError(f"both ways needs 'text<TAB>reference' lines; no reference for {missing[0]!r}")
        pairs = [p for a, b in pairs for p in ((a, b), (b, a))]
    examples = make_examples(tokenizer_path, pairs, task)
    tmp = None
    if workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="lrp-evaluate-")
        workdir = tmp.name
    try:
        log = (lambda msg: print(msg, file=sys.stderr)) if progress else None
        graphs = prepare_graphs(model_path, workdir, methods, task, output, source, log)
        sessions = _Sessions(graphs, threads)
        rng = np.random.default_rng(seed)
        results = {m: MethodResult() for m in methods}
        bar = _progress(len(examples), "evaluate") if progress else None
        for example in examples:
            _fill_explained(sessions, graphs, example)
            length = len(example.input_ids)
            rows, spans = [], {}
            for m in methods:
                rel = _relevance(sessions, graphs, m, example, ig_steps, rng)
                results[m].relevance.append(rel)
                scales = perturbation_curves(rel, example.removable, length)
                spans[m] = (len(rows), len(scales))
                rows.extend(scales)
            unique, inverse = np.unique(np.stack(rows), axis=0, return_inverse=True)
            scores = _forward_scores(sessions, graphs, example.input_ids, unique, example, batch_size, score)
            scores = scores[np.asarray(inverse).reshape(-1)]
            for m in methods:
                start, n = spans[m]
                curve = scores[start:start + n]
                morf, lerf = curve[: n // 2], curve[n // 2:]
                results[m].morf.append(morf)
                results[m].lerf.append(lerf)
                results[m].abpc.append(abpc(morf, lerf))
            if bar:
                bar.update()
        if bar:
            bar.close()
    finally:
        if tmp is not None:
            tmp.cleanup()
    settings = {"model": os.fspath(model_path), "methods": list(methods), "ig_steps": ig_steps,
                "examples": len(examples), "both_ways": both_ways, "score": score, "source": graphs.source, "random_seed": seed,
                "removal": "the token's source embedding is multiplied by 0",
                "abpc": "trapezoid area of (LeRF - MoRF) over the removed fraction 0..1"}
    return Evaluation(task, results, examples, settings)


def _fill_explained(sessions: _Sessions, graphs: Graphs, example: Example) -> None:
    """next-token: the model's own argmax at the last position; similarity: the reference embedding."""
    if graphs.task == "next-token":
        feed = text_inputs(sessions.forward_inputs, example.input_ids[None])
        feed[SCALE_INPUT] = np.ones((1, len(example.input_ids)), np.float32)
        feed["lrp_position"] = np.array([-1], np.int64)
        logits = sessions.forward.run([graphs.score_output], feed)[0]
        example.target = int(logits[0, 0].argmax())
    else:
        feed = text_inputs(sessions.forward_inputs, example.reference_ids[None])
        feed[SCALE_INPUT] = np.ones((1, len(example.reference_ids)), np.float32)
        example.seed = sessions.forward.run([graphs.score_output], feed)[0][0].astype(np.float64)


def _progress(total: int, desc: str):
    try:
        from tqdm import tqdm
    except ImportError:
        return _PlainProgress(total, desc)
    return tqdm(total=total, desc=desc, file=sys.stderr, unit="text")


class _PlainProgress:
    def __init__(self, total, desc):
        self.total, self.desc, self.done = total, desc, 0

    def update(self):
        self.done += 1
        print(f"\r{self.desc}: {self.done}/{self.total}", end="", file=sys.stderr, flush=True)

    def close(self):
        print(file=sys.stderr)
