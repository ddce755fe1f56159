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
Tasks: "next-token" (a causal LM's logit of its own argmax next token at the last position),
"similarity" (a sentence-embedding model's dot product with a reference sentence's embedding,
explained through the seed input) and "classification" (a sequence classifier's [batch, classes]
logit of its predicted class, or of a given label). Image classifiers (evaluate_images): patches of
the pixel input are removed (set to 0, the normalised image's mean) by their summed relevance.
"""
from __future__ import annotations

import io
import contextlib
import json
import os
import sys
import tempfile
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..errors import LRPError
from ..ir.files import write_atomically
from ..run.session import text_inputs

METHODS = ("attnlrp", "cp-lrp", "gradient", "ig", "random")
CONVERTED_METHODS = {"attnlrp": "attnlrp", "cp-lrp": "cp-lrp", "gradient": "gradient", "ig": "gradient"}
TASKS = ("next-token", "similarity", "classification")
SCORES = {"next-token": ("logit", "logprob"), "similarity": ("dot",), "classification": ("logit", "logprob"),
          "image-classification": ("logit", "logprob")}
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
    from ..pipeline import _all_tensors, save_model

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
    score_output: str          # that output: [batch, 1, vocab] (next-token), [batch, dim] (similarity),
                               # [batch, classes] (classification)
    explain: dict              # method -> converted model path
    source: str
    task: str


def prepare_graphs(model_path, workdir, methods=METHODS, task: str = "next-token", output: str | None = None,
                   source: str | None = None, log=None) -> Graphs:
    """Write perturbable.onnx, forward.onnx and one converted model per relevance method into workdir."""
    from ..passes.canonicalize import drop_outputs, select_position_before_head
    from ..ir.graph import GraphView
    from ..pipeline import convert, default_sources, load_model
    from ..ir.shapes import infer_shapes

    if task not in TASKS:
        raise LRPError(f"unknown task '{task}'; choose one of: {', '.join(TASKS)}")
    model, base_dir, view, output = _load_for_evaluation(model_path, workdir, output)
    rank = view.rank(output)
    if task == "next-token" and rank != 3:
        raise LRPError(f"task next-token needs logits [batch, sequence, vocab]; '{output}' has rank {rank}")
    if task == "similarity" and rank != 2:
        raise LRPError(f"task similarity needs an embedding [batch, dim]; '{output}' has rank {rank}")
    if task == "classification" and rank != 2:
        raise LRPError(f"task classification needs class logits [batch, classes]; '{output}' has rank {rank}")
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
    from ..pipeline import save_model

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
    target: int | None = None           # next-token, classification: the explained index (filled in)
    seed: np.ndarray | None = None      # similarity: the reference embedding (filled in)
    label: int | None = None            # classification: the class to explain (None: the predicted one)

    def to_dict(self) -> dict:
        return {"text": self.text, "tokens": self.tokens, "input_ids": self.input_ids.tolist(),
                "removable": self.removable.tolist(), "target": self.target,
                "reference_ids": None if self.reference_ids is None else self.reference_ids.tolist()}


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


def read_labeled_texts(path, target_column: int | None, limit: int | None = None) -> list[tuple[str, str | None]]:
    """classification: TAB-separated lines, the text in column 1 and (with target_column, 1-based) the
    label to explain in that column; blank lines and lines starting with # are skipped."""
    if not os.path.isfile(path):
        raise LRPError(f"{path}: no such text file")
    rows = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            line = line.rstrip("\n")
            if not line.strip() or line.startswith("#"):
                continue
            columns = line.split("\t")
            label = None
            if target_column is not None:
                if target_column > len(columns):
                    raise LRPError(f"{path}, line {number}: no column {target_column} (--target-column); "
                                   f"the line has {len(columns)}")
                label = columns[target_column - 1].strip()
            rows.append((columns[0].strip(), label))
    if not rows:
        raise LRPError(f"{path}: holds no text lines")
    return rows[:limit] if limit else rows


def class_index(label, labels: list[str] | None, classes: int | None = None) -> int:
    """A class index from a label: an integer, or one of `labels` (the class names in index order)."""
    if isinstance(label, (int, np.integer)):
        index = int(label)
    elif labels and str(label) in labels:
        index = labels.index(str(label))
    else:
        try:
            index = int(str(label))
        except ValueError:
            known = f"; class names are: {', '.join(labels)}" if labels else " (give class names with --labels)"
            raise LRPError(f"label {label!r} is neither a class index nor a class name{known}") from None
    if index < 0 or (classes is not None and index >= classes):
        raise LRPError(f"label {label!r}: class index {index} is out of range for {classes} classes")
    return index


def make_examples(tokenizer_path, pairs, task: str) -> list[Example]:
    """next-token: the text without its last word is the prompt (the model predicts what follows);
    similarity: the text, explained against its reference (pairs without one are an error);
    classification: the text, its label (second element, or None: the predicted class) kept as is."""
    from ..run.text import load_tokenizer

    tok = load_tokenizer(tokenizer_path)
    examples = []
    for text, reference in pairs:
        if task == "next-token":
            prompt = text.rsplit(" ", 1)[0] if " " in text else text
            e = tok.encode(prompt)
            ref = None
        elif task == "classification":
            prompt, e, ref = text, tok.encode(text), None
        else:
            if reference is None:
                raise LRPError(f"task similarity needs 'text<TAB>reference' lines; no reference for {text!r}")
            prompt, e = text, tok.encode(text)
            ref = np.asarray(tok.encode(reference).ids, np.int64)
        special = np.asarray(e.special_tokens_mask, bool)
        removable = np.flatnonzero(~special)
        if len(removable) == 0:
            continue
        example = Example(prompt, list(e.tokens), np.asarray(e.ids, np.int64), removable, ref)
        if task == "classification":
            example.label = reference
        examples.append(example)
    return examples


# -- running -------------------------------------------------------------------------------------
class _Sessions:
    """The forward graph's session and one Explainer per converted graph (ig shares gradient's)."""

    def __init__(self, graphs: Graphs | ImageGraphs, threads: int | None):
        from ..run.runner import Explainer, open_session

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
        if graphs.task == "similarity":
            scores.append(out @ example.seed)
        else:
            scores.append(class_score(out[:, 0] if graphs.task == "next-token" else out, example.target, score))
    return np.concatenate(scores).astype(np.float64)


def class_score(logits: np.ndarray, target: int, score: str) -> np.ndarray:
    """The target's logit, or its log-softmax over the last axis (float64), of logits [rows, classes]."""
    if score == "logprob":
        logits = logits.astype(np.float64)
        peak = logits.max(axis=1)
        log_norm = peak + np.log(np.exp(logits - peak[:, None]).sum(axis=1))
        return logits[:, target] - log_norm
    return logits[:, target].astype(np.float64)


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
    elif graphs.task == "classification":
        kwargs = dict(target=np.full(rows, example.target))
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


def record_curves(results: dict, relevance: dict, removable: np.ndarray, length: int, score_rows) -> None:
    """For each method's relevance [length]: its MoRF/LeRF removal rows, scored once per distinct row
    by score_rows(scales [rows, length]) -> [rows]; appends relevance, curves and ABPC to results."""
    rows, spans = [], {}
    for m, rel in relevance.items():
        results[m].relevance.append(rel)
        scales = perturbation_curves(rel, removable, length)
        spans[m] = (len(rows), len(scales))
        rows.extend(scales)
    unique, inverse = np.unique(np.stack(rows), axis=0, return_inverse=True)
    scores = np.asarray(score_rows(unique))[np.asarray(inverse).reshape(-1)]
    for m in relevance:
        start, n = spans[m]
        curve = scores[start:start + n]
        morf, lerf = curve[: n // 2], curve[n // 2:]
        results[m].morf.append(morf)
        results[m].lerf.append(lerf)
        results[m].abpc.append(abpc(morf, lerf))


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
                {**e.to_dict(),
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
    unit = "patches" if evaluation.task == "image-classification" else "tokens"
    ax.set_xlabel(f"fraction of {unit} removed (solid: MoRF, dashed: LeRF)")
    ax.set_ylabel("explained score")
    ax.set_title(title or f"perturbation curves, {evaluation.task}, n={len(evaluation.examples)}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


@contextlib.contextmanager
def _scratch(workdir):
    """`workdir`, or a temporary folder removed afterwards: where the converted graphs go."""
    if workdir is not None:
        yield workdir
        return
    with tempfile.TemporaryDirectory(prefix="lrp-evaluate-") as tmp:
        yield tmp


def evaluate(model_path, tokenizer_path, texts, *, task: str = "next-token", methods=METHODS,
             workdir=None, output: str | None = None, source: str | None = None, limit: int | None = None,
             ig_steps: int = 16, batch_size: int = 64, threads: int | None = None, seed: int = 0,
             progress: bool = True, both_ways: bool = False, score: str | None = None,
             target_column: int | None = None, labels: list[str] | None = None) -> Evaluation:
    """MoRF/LeRF curves and ABPC of each method on the texts (a file of lines, or a list of strings or
    (text, reference) pairs), computed in onnxruntime. `workdir` receives the graphs (default: a
    temporary directory). both_ways: each (text, reference) pair also as (reference, text), after
    `limit` is applied. score (next-token, classification): what the curves track, "logit" (the
    explained logit, the paper's protocol) or "logprob" (its log-probability); the relevance always
    explains the logit. classification: the explained class is the predicted one, or the label in
    column `target_column` (1-based) of the text file (or the second element of a (text, label)
    pair): a class index, or a name in `labels` (the class names in index order)."""
    if task not in TASKS:
        raise LRPError(f"unknown task '{task}'; choose one of: {', '.join(TASKS)}")
    score = score or SCORES[task][0]
    if score not in SCORES[task]:
        raise LRPError(f"score '{score}' does not apply to task {task}; choose one of: {', '.join(SCORES[task])}")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise LRPError(f"unknown method(s) {', '.join(unknown)}; choose from: {', '.join(METHODS)}")
    if target_column is not None and (task != "classification" or target_column < 2):
        raise LRPError("--target-column applies to task classification and is a column number >= 2 "
                       "(column 1 is the text)")
    if task == "classification" and isinstance(texts, (str, os.PathLike)):
        pairs = read_labeled_texts(texts, target_column, limit)
    elif isinstance(texts, (str, os.PathLike)):
        pairs = read_sentence_pairs(texts, limit)
    else:
        pairs = [(t, None) if isinstance(t, str) else tuple(t) for t in texts][:limit]
    if both_ways:
        missing = [a for a, b in pairs if b is None]
        if missing:
            raise LRPError(f"both ways needs 'text<TAB>reference' lines; no reference for {missing[0]!r}")
        pairs = [p for a, b in pairs for p in ((a, b), (b, a))]
    examples = make_examples(tokenizer_path, pairs, task)
    with _scratch(workdir) as workdir:
        log = (lambda msg: print(msg, file=sys.stderr)) if progress else None
        graphs = prepare_graphs(model_path, workdir, methods, task, output, source, log)
        sessions = _Sessions(graphs, threads)

        def explained(example):
            _fill_explained(sessions, graphs, example, labels)
            return example

        results = _evaluation_loop(
            examples, methods, seed, progress, explained,
            lambda m, example, rng: _relevance(sessions, graphs, m, example, ig_steps, rng),
            lambda example: (len(example.input_ids), lambda scales: _forward_scores(
                sessions, graphs, example.input_ids, scales, example, batch_size, score)))
    settings = {"model": os.fspath(model_path), "methods": list(methods), "ig_steps": ig_steps,
                "examples": len(examples), "both_ways": both_ways, "score": score, "source": graphs.source, "random_seed": seed,
                "target": "predicted class" if task == "classification" and target_column is None else
                (f"the label in column {target_column}" if task == "classification" else None),
                "removal": "the token's source embedding is multiplied by 0",
                "abpc": "trapezoid area of (LeRF - MoRF) over the removed fraction 0..1"}
    return Evaluation(task, results, examples, settings)


def _evaluation_loop(items, methods, seed: int, progress: bool, explained, method_relevance, curve_scores) -> dict:
    """The loop of evaluate and evaluate_images: for each item, its example with the explained target
    (`explained(item)`), each method's relevance (`method_relevance(method, example, rng)`, methods in
    order, one random generator seeded with `seed`), then the curves: `curve_scores(example)` -> (units,
    score_rows). Returns {method: MethodResult}."""
    rng = np.random.default_rng(seed)
    results = {m: MethodResult() for m in methods}
    bar = _progress(len(items), "evaluate") if progress else None
    for item in items:
        example = explained(item)
        relevance = {m: method_relevance(m, example, rng) for m in methods}
        units, score_rows = curve_scores(example)
        record_curves(results, relevance, example.removable, units, score_rows)
        if bar:
            bar.update()
    if bar:
        bar.close()
    return results


def _fill_explained(sessions: _Sessions, graphs: Graphs, example: Example, labels=None) -> None:
    """next-token: the model's own argmax at the last position; similarity: the reference embedding;
    classification: the label's class, or the predicted one."""
    if graphs.task == "classification":
        feed = text_inputs(sessions.forward_inputs, example.input_ids[None])
        feed[SCALE_INPUT] = np.ones((1, len(example.input_ids)), np.float32)
        logits = sessions.forward.run([graphs.score_output], feed)[0][0]
        example.target = (int(logits.argmax()) if example.label is None
                          else class_index(example.label, labels, len(logits)))
    elif graphs.task == "next-token":
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


# -- images --------------------------------------------------------------------------------------
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


@dataclass
class ImageExample:
    """One explained image: its normalised pixels and the grid of patches that perturbation removes."""
    text: str                      # the file name
    pixels: np.ndarray             # [channels, height, width], normalised
    patch_of_pixel: np.ndarray     # int [height, width]: the patch index of each pixel (row-major grid)
    grid: tuple                    # (patch rows, patch columns)
    patch: int
    target: int | None = None      # the explained class (filled in)

    @property
    def removable(self) -> np.ndarray:
        return np.arange(self.grid[0] * self.grid[1])

    def to_dict(self) -> dict:
        return {"image": self.text, "grid": list(self.grid), "patch": self.patch, "target": self.target}


def patch_grid(height: int, width: int, patch: int) -> tuple[np.ndarray, tuple[int, int]]:
    """The patch index of each pixel [height, width] for square patches of `patch` pixels, row-major;
    when a side is not a multiple of `patch`, the last row/column of patches is narrower."""
    if patch < 1:
        raise LRPError(f"--patch must be a positive number of pixels, not {patch}")
    rows, cols = -(-height // patch), -(-width // patch)
    r = np.arange(height) // patch
    c = np.arange(width) // patch
    return (r[:, None] * cols + c[None, :]).astype(np.int64), (rows, cols)


def patch_relevance(relevance: np.ndarray, patch_of_pixel: np.ndarray, patches: int) -> np.ndarray:
    """Relevance [channels, height, width] summed over channels and over the pixels of each patch."""
    per_pixel = np.asarray(relevance, np.float64).reshape(-1, *patch_of_pixel.shape).sum(axis=0)
    return np.bincount(patch_of_pixel.ravel(), weights=per_pixel.ravel(), minlength=patches)


def blank_patches(pixels: np.ndarray, patch_of_pixel: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """Images [rows, channels, height, width]: `pixels` with the patches where keep [rows, patches] is 0
    set to 0 (in normalised units: the normalisation mean)."""
    mask = np.asarray(keep, pixels.dtype)[:, patch_of_pixel]       # [rows, height, width]
    return pixels[None] * mask[:, None]


@dataclass
class ImageGraphs:
    forward: str
    score_output: str
    explain: dict
    source: str                # the pixel input
    shape: tuple               # (channels, height, width) of the pixel input, None where dynamic
    dtype: type
    task: str = "image-classification"


def _load_for_evaluation(model_path, workdir, output: str | None):
    """The model (weights by reference), its folder, a view with shapes, and the explained output."""
    from ..ir.graph import GraphView
    from ..pipeline import load_model
    from ..ir.shapes import infer_shapes

    os.makedirs(workdir, exist_ok=True)
    model, base_dir = load_model(model_path)
    view = GraphView.build(model, infer_shapes(model))
    output = output or view.graph_outputs[0]
    if output not in view.graph_outputs:
        raise LRPError(f"--output '{output}' is not a graph output; outputs are: {', '.join(view.graph_outputs)}")
    return model, base_dir, view, output


def prepare_image_graphs(model_path, workdir, methods=METHODS, output: str | None = None, log=None) -> ImageGraphs:
    """forward.onnx (the model with its class logits only) and one converted model per relevance
    method, explaining the class logits from the pixel input."""
    from ..passes.canonicalize import drop_outputs
    from ..pipeline import convert

    model, base_dir, view, output = _load_for_evaluation(model_path, workdir, output)
    if view.rank(output) != 2:
        raise LRPError(f"--images needs class logits [batch, classes]; '{output}' has rank {view.rank(output)}")
    pixel_inputs = [i for i in model.graph.input if i.name in view.graph_inputs and view.is_float(i.name)
                    and view.rank(i.name) == 4]
    if len(pixel_inputs) != 1 or len(view.graph_inputs) != 1:
        raise LRPError(f"{model_path}: --images needs a model whose one input is float pixels [batch, channels, "
                       f"height, width]; its inputs are: {', '.join(view.graph_inputs)}")
    pixel = pixel_inputs[0]
    dims = [d.dim_value if d.HasField("dim_value") else None for d in pixel.type.tensor_type.shape.dim][1:]
    dtype = np.float16 if pixel.type.tensor_type.elem_type == TensorProto.FLOAT16 else np.float32
    drop_outputs(model, keep={output})
    forward = os.path.join(workdir, "forward.onnx")
    _save_with_shared_weights(model, forward, base_dir)
    if log:
        log(f"wrote {forward}")
    explain = {}
    for method in methods:
        rules = CONVERTED_METHODS.get(method)
        if rules is None:
            continue
        path = os.path.join(workdir, f"{rules}.onnx")
        if path not in explain.values():
            convert(forward, path, rules=rules, source=pixel.name, output=output, relevance_only=True)
            if log:
                log(f"wrote {path}")
        explain[method] = path
    return ImageGraphs(forward, output, explain, pixel.name, tuple(dims), dtype)


def image_files(directory, limit: int | None = None) -> list[str]:
    """The names of the image files in `directory`, sorted (refused when there are none)."""
    if not os.path.isdir(directory):
        raise LRPError(f"{directory}: --images is not a directory")
    names = sorted(n for n in os.listdir(directory) if n.lower().endswith(IMAGE_EXTENSIONS)
                   and os.path.isfile(os.path.join(directory, n)))
    if not names:
        raise LRPError(f"{directory}: holds no image files ({', '.join(IMAGE_EXTENSIONS)})")
    return names[:limit] if limit else names


def load_images(directory, shape, dtype=np.float32, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
                image_size: int | None = None, limit: int | None = None) -> list[tuple[str, np.ndarray]]:
    """(file name, pixels [channels, height, width]) for the image files of `directory` in name order:
    RGB (or grayscale for one channel), resized to the model's input size (or image_size, square),
    scaled to 0..1 and normalised by mean/std (per channel)."""
    try:
        from PIL import Image
    except ImportError:
        raise LRPError("--images needs Pillow: pip install pillow") from None
    names = image_files(directory, limit)
    channels, height, width = shape
    if image_size:
        height = width = image_size
    if not all(isinstance(d, int) and d > 0 for d in (channels, height, width)):
        raise LRPError(f"the pixel input has dynamic size {shape}; give --image-size")
    mean = np.asarray(mean, np.float32).reshape(-1, 1, 1)
    std = np.asarray(std, np.float32).reshape(-1, 1, 1)
    if mean.size not in (1, channels) or std.size not in (1, channels):
        raise LRPError(f"--mean/--std need 1 or {channels} values")
    images = []
    for name in names:
        path = os.path.join(directory, name)
        try:
            image = Image.open(path).convert("RGB" if channels == 3 else "L").resize((width, height))
        except Exception as exc:
            raise LRPError(f"{path}: not a readable image ({exc.__class__.__name__})") from None
        pixels = np.asarray(image, np.float32).reshape(height, width, channels).transpose(2, 0, 1) / 255.0
        images.append((name, ((pixels - mean) / std).astype(dtype)))
    return images


def _image_relevance(explainers: dict, graphs: ImageGraphs, method: str, example: ImageExample, ig_steps: int,
                     rng: np.random.Generator) -> np.ndarray:
    """Relevance per patch of one method."""
    patches = example.grid[0] * example.grid[1]
    if method == "random":
        return rng.standard_normal(patches)
    rows = ig_steps if method == "ig" else 1
    alphas = (np.arange(rows) + 0.5) / rows if method == "ig" else np.ones(1)
    batch = (alphas[:, None, None, None] * example.pixels[None]).astype(graphs.dtype)
    result = explainers[method].run(target=np.full(rows, example.target), **{graphs.source: batch})
    relevance = np.asarray(result.relevance, np.float64)     # [rows, channels, height, width]
    if method == "ig":
        relevance = (relevance / alphas[:, None, None, None]).mean(axis=0)
    else:
        relevance = relevance[0]
    return patch_relevance(relevance, example.patch_of_pixel, patches)


def evaluate_images(model_path, images, *, methods=METHODS, workdir=None, output: str | None = None,
                    patch: int = 16, image_size: int | None = None, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
                    limit: int | None = None, ig_steps: int = 16, batch_size: int = 64,
                    threads: int | None = None, seed: int = 0, progress: bool = True,
                    score: str | None = None) -> Evaluation:
    """MoRF/LeRF curves and ABPC of each method on an image classifier, the AttnLRP paper's ViT
    protocol: each image (a directory of files, or a list of (name, pixels [C, H, W]) already
    normalised) is cut into square patches of `patch` pixels; the patches are ordered by the
    method's relevance summed over each patch and set to 0 (the normalised image's mean)
    most-relevant-first and least-relevant-first, one patch per step, all steps run as batches of
    perturbed images; the score is the predicted class's logit (or log-probability)."""
    score = score or "logit"
    if score not in SCORES["image-classification"]:
        raise LRPError(f"score '{score}' does not apply to image classification; choose one of: logit, logprob")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise LRPError(f"unknown method(s) {', '.join(unknown)}; choose from: {', '.join(METHODS)}")
    if patch < 1:
        raise LRPError(f"--patch must be a positive number of pixels, not {patch}")
    if isinstance(images, (str, os.PathLike)):
        image_files(images, limit)  # before any conversion: a folder without images is refused at once
    with _scratch(workdir) as workdir:
        log = (lambda msg: print(msg, file=sys.stderr)) if progress else None
        graphs = prepare_image_graphs(model_path, workdir, methods, output, log)
        if isinstance(images, (str, os.PathLike)):
            loaded = load_images(images, graphs.shape, graphs.dtype, mean, std, image_size, limit)
        else:
            loaded = [(name, np.asarray(p, graphs.dtype)) for name, p in images][:limit]
        sessions = _Sessions(graphs, threads)
        forward = sessions.forward
        examples = []

        def explained(item):
            name, pixels = item
            grid_of_pixel, grid = patch_grid(pixels.shape[1], pixels.shape[2], patch)
            example = ImageExample(name, pixels, grid_of_pixel, grid, patch)
            logits = forward.run([graphs.score_output], {graphs.source: pixels[None]})[0]
            example.target = int(logits[0].argmax())
            examples.append(example)
            return example

        def curve_scores(example):
            def score_rows(keep):
                out = []
                for start in range(0, len(keep), batch_size):
                    batch = blank_patches(example.pixels, example.patch_of_pixel, keep[start:start + batch_size])
                    logits = forward.run([graphs.score_output], {graphs.source: batch})[0]
                    out.append(class_score(logits, example.target, score))
                return np.concatenate(out)
            return example.grid[0] * example.grid[1], score_rows

        results = _evaluation_loop(
            loaded, methods, seed, progress, explained,
            lambda m, example, rng: _image_relevance(sessions.explainers, graphs, m, example, ig_steps, rng),
            curve_scores)
    settings = {"model": os.fspath(model_path), "methods": list(methods), "ig_steps": ig_steps,
                "examples": len(examples), "score": score, "source": graphs.source, "random_seed": seed,
                "patch": patch, "target": "predicted class",
                "removal": "the patch's pixels are set to 0 (the normalised image's mean)",
                "abpc": "trapezoid area of (LeRF - MoRF) over the removed fraction 0..1"}
    return Evaluation("image-classification", results, examples, settings)
