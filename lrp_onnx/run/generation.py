"""Explain what a language model generates: every generated token, in one run of the converted model.

`Explainer.explain_generation(input_ids, max_new_tokens=N)` decodes greedily (stopping at an end token),
then explains every generated token at once: generated token i was predicted at position P + i - 1 of the
sequence prompt + generated[:-1] (P prompt tokens), so one run of a multi-target model (convert(...,
multi_target=True)) with lrp_position [[P-1 .. P+N-2]] and lrp_target [[g0 .. g_{N-1}]] gives every row.
A causal model's relevance at a position after the explained one is zero, so row i equals the explanation
of token i on the sequence that existed when it was generated. A single-target model gives the same rows
in one batched run (N copies of the sequence, one target each: the forward runs N times).

Decoding: by default a forward-only copy of the converted model (its backward pruned), re-running the
whole sequence at each step; or `decoder=` an ONNX model with input_ids (the original export; a KV-cache
export decodes with its cache: the prompt once, then one token a step), or a
callable ids [1, L] -> next-token logits [vocab] (a KV-cache decoder, a PyTorch model...); or
`generated_ids=` a continuation produced elsewhere (sampled, from any generator), explained as given.
No PyTorch here.
"""
from __future__ import annotations

import html
import os
from dataclasses import dataclass, field

import numpy as np
import onnx

from ..errors import LRPError
from ..ir.files import write_atomically

STOP_TOKENS = ("</s>", "<|endoftext|>", "<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "<eos>", "<|end|>")


@dataclass
class GenerationExplanation:
    prompt_ids: np.ndarray      # int64 [P]
    generated_ids: np.ndarray   # int64 [N]: generated token i is the target of row i
    relevance: np.ndarray       # [N, T], T = P + N - 1: row i over the tokens before generated token i
    logits: np.ndarray          # [N]: the logit of each generated token where it was predicted
    positions: np.ndarray       # [N]: the position of each prediction, P - 1 + i
    stopped: bool = False       # decoding ended at a stop token (the last generated one)
    tokens: list | None = None  # what each of the P + N tokens reads as, ' Paris' (with a tokenizer)
    text: str | None = None     # the generated text (with a tokenizer)
    hidden: np.ndarray | None = field(default=None, repr=False)  # [N, T, hidden]: before summing
    raw_tokens: list | None = None  # the vocabulary's token strings, 'ĠParis' (with a tokenizer)
    pieces: list | None = field(default=None, repr=False)    # the text each token adds (text.decoded_pieces)
    special: list | None = field(default=None, repr=False)   # whether each token is a special token

    @property
    def targets(self) -> np.ndarray:
        return self.generated_ids

    def word_relevance(self):
        """The matrix with its columns summed by word: text.Words with relevance [N, W], the words of
        the prompt and the generated text before the last token (whitespace-separated; a token of
        whitespace only, or a special token, is a unit of its own). Needs the tokenizer's texts."""
        from .text import Words, _sum_units, group_words

        if self.pieces is None or self.special is None:
            raise LRPError("word relevance needs the token texts: pass tokenizer= to explain_generation")
        t = self.relevance.shape[1]
        text, offsets = "", []
        for piece, special in zip(self.pieces[:t], self.special[:t]):
            piece = " " if special else piece  # a special token's text is no part of a word
            offsets.append((len(text), len(text) + (0 if special else len(piece))))
            text += piece
        words, spans, tokens, flags = group_words(text, offsets, self.special[:t], self.tokens[:t])
        return Words(words, _sum_units(self.relevance, tokens, t), spans, tokens, flags)

    def to_dict(self) -> dict:
        return {"prompt_ids": self.prompt_ids.tolist(), "generated_ids": self.generated_ids.tolist(),
                "tokens": self.tokens, "raw_tokens": self.raw_tokens, "text": self.text, "stopped": self.stopped,
                "positions": self.positions.tolist(), "logits": [float(v) for v in self.logits],
                "relevance": [[float(v) for v in row] for row in self.relevance]}


def explain_generation(explainer, input_ids, max_new_tokens: int = 16, *, tokenizer=None, eos_token_id=None,
                       decoder=None, generated_ids=None, **inputs) -> GenerationExplanation:
    """See the module docstring. `input_ids`: one prompt ([P] or [1, P]); `eos_token_id`: an id or ids
    that stop decoding (default: the tokenizer's usual end tokens, see STOP_TOKENS); `tokenizer`: a
    tokenizers.Tokenizer or a tokenizer.json path, for the token texts; `inputs`: other constant inputs."""
    prompt = np.asarray(input_ids)
    if prompt.ndim == 2 and prompt.shape[0] == 1:
        prompt = prompt[0]
    if prompt.ndim != 1 or prompt.dtype.kind not in "iu":
        raise LRPError(f"input_ids: one prompt of integer ids ([P] or [1, P]) expected, got shape "
                       f"{list(np.shape(input_ids))} ({prompt.dtype})")
    if prompt.size == 0:
        raise LRPError("input_ids is empty: nothing to generate from")
    prompt = prompt.astype(np.int64)
    if "input_ids" not in explainer.input_names:
        raise LRPError("explain_generation needs a model with an input_ids input (a causal language model)")
    if "lrp_position" not in explainer.input_names:
        raise LRPError("explain_generation needs a model whose explained output has a sequence axis "
                       "([batch, sequence, vocab]): this one explains one output per row")
    tok = _tokenizer(tokenizer)
    stops = _stop_ids(eos_token_id, tok)
    stopped = False
    if generated_ids is not None:
        generated = np.atleast_1d(np.asarray(generated_ids)).astype(np.int64)
        if generated.ndim != 1 or generated.size == 0:
            raise LRPError(f"generated_ids: a non-empty list of token ids expected, got shape {list(generated.shape)}")
    else:
        if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
            raise LRPError(f"max_new_tokens: a positive integer expected, got {max_new_tokens!r}")
        next_logits = _decoder(explainer, decoder, inputs)
        sequence = list(prompt)
        generated = []
        for _ in range(int(max_new_tokens)):
            logits = np.asarray(next_logits(np.asarray([sequence], np.int64)), np.float64).reshape(-1)
            if not np.all(np.isfinite(logits)):
                raise LRPError(f"the decoder's logits are not finite after {len(generated)} generated tokens")
            token = int(np.argmax(logits))
            generated.append(token)
            sequence.append(token)
            if token in stops:
                stopped = True
                break
        generated = np.asarray(generated, np.int64)
    n, p = len(generated), len(prompt)
    ids = np.concatenate([prompt, generated[:-1]])[None]
    positions = np.arange(p - 1, p - 1 + n, dtype=np.int64)
    from .session import text_inputs

    feed = {**text_inputs(explainer.input_names, ids), **inputs}
    if explainer.multi_target:
        result = explainer.run(target=generated[None], position=positions[None], **feed)
        hidden = result.relevance[0]
        logits = np.asarray(result.logit)[0]
        chosen = np.asarray(result.target)[0]
    else:  # one row per generated token: the forward runs n times
        batched = {k: np.repeat(v, n, axis=0) if np.ndim(v) >= 1 and np.shape(v)[0] == 1 else v
                   for k, v in feed.items()}
        result = explainer.run(target=generated, position=positions, **batched)
        hidden, logits, chosen = result.relevance, np.asarray(result.logit), np.asarray(result.target)
    if not np.array_equal(chosen, generated):  # the model's own check that it explained what was asked
        raise LRPError(f"explained targets {chosen.tolist()} differ from the generated tokens {generated.tolist()}")
    relevance = hidden.sum(axis=-1) if hidden.ndim == 3 else hidden
    texts = text = raw = pieces = special = None
    if tok is not None:
        texts, raw, pieces, special = token_info(tok, np.concatenate([prompt, generated]))
        text = tok.decode([int(i) for i in generated], skip_special_tokens=False)
    return GenerationExplanation(prompt, generated, relevance, logits, positions, stopped, texts, text,
                                 hidden if hidden.ndim == 3 else None, raw, pieces, special)


def token_info(tok, ids) -> tuple[list, list, list, list]:
    """(what each token reads as, its vocabulary string, the text it adds to the decoded sequence,
    whether it is a special token) of a tokenizers.Tokenizer's ids; see text.token_texts."""
    from .text import decoded_pieces, token_texts

    ids = [int(i) for i in ids]
    decoded = decoded_pieces(tok, ids)
    special = [tok.decode([i], skip_special_tokens=True) == "" and piece != "" for i, piece in zip(ids, decoded[0])]
    return token_texts(tok, ids, pieces=decoded), [tok.id_to_token(i) for i in ids], decoded[0], special


def _tokenizer(tokenizer):
    if tokenizer is None or not isinstance(tokenizer, (str, os.PathLike)):
        return tokenizer
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(os.fspath(tokenizer))
    except Exception as exc:
        raise LRPError(f"{tokenizer}: not a tokenizers JSON file ({exc.__class__.__name__})") from None


def _stop_ids(eos_token_id, tok) -> set:
    if eos_token_id is not None:
        return {int(i) for i in np.atleast_1d(eos_token_id)}
    if tok is None:
        return set()
    return {i for i in (tok.token_to_id(t) for t in STOP_TOKENS) if i is not None}


def _decoder(explainer, decoder, inputs):
    """ids [1, L] -> next-token logits [vocab]."""
    if callable(decoder):
        return decoder
    from .session import open_session, text_inputs

    if decoder is not None:
        session, names = open_session(os.fspath(decoder), label=os.fspath(decoder))
        output = session.get_outputs()[0].name
        cached = _cached_decoder(session, names, output, inputs, os.fspath(decoder))
        if cached is not None:
            return cached
    else:
        session, names, output = _forward_only(explainer)

    def run(ids):
        feed = {**text_inputs(names, ids), **{k: v for k, v in inputs.items() if k in names}}
        return _run_step(session, feed, [output], output)[output][0, -1]

    return run


def _run_step(session, feed: dict, fetch: list, output: str) -> dict:
    """One decoding step: `fetch` -> values, after checking that `feed` holds every input the decoder
    needs and that `output` has the shape of next-token logits, [1, sequence, vocab]."""
    from .session import input_defaults, unfed_inputs

    missing = unfed_inputs(session, feed)
    feed = {**input_defaults(session), **feed}
    if missing:
        raise LRPError(f"the decoder needs input(s) {', '.join(missing)}, which cannot be made from token ids; "
                       f"pass decoder= (an ONNX model or a callable) or generated_ids=")
    values = dict(zip(fetch, session.run(fetch, feed)))
    if np.ndim(values[output]) != 3:
        raise LRPError(f"the decoder's output '{output}' has shape {list(np.shape(values[output]))}; "
                       f"[1, sequence, vocab] expected")
    return values


def _cache_head_sizes(path) -> dict:
    """{cache input: head size} for the caches a fused attention op reads, from its attributes and its
    query's static width (shape inference on the weight-free graph): GroupQueryAttention (packed QKV:
    width / (num_heads + 2 kv_num_heads), else width / num_heads), MultiHeadAttention, opset-23
    Attention. What cannot be told is left out."""
    from ..ir.graph import GraphView, attr
    from ..ir.shapes import infer_shapes

    try:
        model = onnx.load(path, load_external_data=False)
    except Exception:  # an in-memory decoder or an unreadable file: nothing to tell
        return {}
    view = GraphView.build(model, infer_shapes(model))
    past_slots = {"GroupQueryAttention": (3, 4), "MultiHeadAttention": (6, 7), "Attention": (4, 5)}
    sizes = {}
    for n in view.nodes:
        slots = past_slots.get(n.op_type)
        if slots is None or (n.op_type == "Attention") != (n.domain in ("", "ai.onnx")):
            continue
        shape = view.shape(n.input[0]) or []
        width = shape[-1] if shape and isinstance(shape[-1], int) else None
        heads = attr(n, "num_heads") or attr(n, "q_num_heads")
        if width is None or not heads:
            continue
        if len(shape) == 4:  # opset-23 Attention with [batch, heads, seq, head_size] queries
            head = width
        elif n.op_type == "GroupQueryAttention" and (len(n.input) < 2 or not n.input[1]):
            head = width // (heads + 2 * (attr(n, "kv_num_heads") or heads))
        else:
            head = width // heads
        for slot in slots:
            if len(n.input) > slot and n.input[slot] in view.graph_inputs:
                sizes[n.input[slot]] = head
    return sizes


def _cached_decoder(session, names, output, inputs, label):
    """A KV-cache export as the decoder (past_key_values.* inputs, present.* outputs, optionally a merged
    decoder's use_cache_branch): the prompt runs once with an empty cache, then each step feeds only the
    new token and the cache the previous step returned. None when the model has no cache inputs."""
    from ..passes.cache import is_cache_name
    from .session import text_inputs

    float_types = ("tensor(float)", "tensor(float16)", "tensor(double)", "tensor(bfloat16)")
    past = [i for i in session.get_inputs() if is_cache_name(i.name) and i.type in float_types]
    if not past:
        return None
    outputs = [o.name for o in session.get_outputs()]
    present = {}
    for i in past:
        match = [c for c in (i.name.replace("past_key_values", "present"), i.name.replace("past", "present"))
                 if c in outputs]
        if not match:
            raise LRPError(f"{label}: cache input '{i.name}' has no matching present output; "
                           f"pass decoder= a callable or generated_ids=")
        present[i.name] = match[0]
    empty = {}
    numpy_types = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}
    batch = next((i.shape[0] for i in session.get_inputs() if i.name == "input_ids"), None)
    for i in past:
        if i.type not in numpy_types:
            raise LRPError(f"{label}: cache input '{i.name}' is {i.type}, which numpy cannot feed; "
                           f"pass decoder= a callable")
        axis = next((k for k, d in enumerate(i.shape) if isinstance(d, str) and "past" in d.lower()), None)
        dims = [0 if k == axis else d if isinstance(d, int) else 1 if d == batch else None
                for k, d in enumerate(i.shape)]
        if dims and dims[-1] is None and axis != len(dims) - 1:  # a symbolic head size (the builder's kv_cache_dim)
            dims[-1] = _cache_head_sizes(label).get(i.name)
        if axis is None or None in dims:
            raise LRPError(f"{label}: cache input '{i.name}' has shape {i.shape}: cannot make an empty cache "
                           f"(static axes but the batch and a 'past...' axis are needed); pass decoder= a callable")
        empty[i.name] = np.zeros(dims, numpy_types[i.type])
    flags = {i.name: len(i.shape) for i in session.get_inputs() if i.type == "tensor(bool)"}
    if any("cache" not in f for f in flags):
        raise LRPError(f"{label}: boolean input(s) {', '.join(f for f in flags if 'cache' not in f)}: cannot tell "
                       f"what to feed when decoding with the cache; pass decoder= a callable")
    state = {"ids": None, "cache": None}

    def run(ids):
        ids = np.asarray(ids, np.int64)
        seen = state["ids"]
        if seen is not None and ids.shape[1] > seen.shape[1] and np.array_equal(ids[:, :seen.shape[1]], seen):
            new, cache, start = ids[:, seen.shape[1]:], state["cache"], seen.shape[1]
        else:
            new, cache, start = ids, empty, 0
        feed = text_inputs(names, new, np.ones((1, ids.shape[1]), np.int64))
        if "position_ids" in feed:
            feed["position_ids"] = np.arange(start, ids.shape[1], dtype=np.int64)[None]
        feed.update({k: v for k, v in inputs.items() if k in names})
        feed.update(cache)
        feed.update({f: np.full([1] * rank, start > 0) for f, rank in flags.items()})  # use_cache_branch
        values = _run_step(session, feed, [output] + list(present.values()), output)
        run.fed.append(new.shape[1])
        state["ids"], state["cache"] = ids, {k: values[v] for k, v in present.items()}
        return np.asarray(values[output])[0, -1]

    run.fed = []  # tokens fed at each call: the prompt, then 1 a step
    return run


def _forward_only(explainer):
    """A session of the converted model with its backward pruned: the explained output (or, for a
    relevance-only model, the head at lrp_position, whose default is the last token)."""
    import onnx

    from ..passes.canonicalize import drop_outputs
    from ..contract import SELECTED_OUTPUT
    from .session import open_session

    cached = getattr(explainer, "_forward_only", None)
    if cached is not None:
        return cached
    source = explainer.source
    model = onnx.load_from_string(source) if isinstance(source, bytes) else onnx.load(source, load_external_data=False)
    outputs = [o.name for o in model.graph.output]
    keep = explainer.meta.get("explained_output")
    keep = keep if keep in outputs else SELECTED_OUTPUT
    if keep not in outputs:
        raise LRPError("this converted model has no logits output to decode with; pass decoder= or generated_ids=")
    drop_outputs(model, {keep})
    import onnxruntime as ort

    folder = None if isinstance(source, bytes) else os.path.dirname(os.path.abspath(source))
    threads = explainer.session.get_session_options().intra_op_num_threads or None  # as the explainer's
    session, names = open_session(model.SerializeToString(), providers=explainer.session.get_providers(),
                                  threads=threads, label="the converted model's forward", external_folder=folder)
    del ort
    explainer._forward_only = (session, names, keep)
    return explainer._forward_only


# -- heatmaps ------------------------------------------------------------------------------------
def _matrix(g: GenerationExplanation, words: bool = False):
    """(column labels, row labels, values [N, C], boundary of each row: its first column not yet
    generated). Columns: the T tokens before the last generated one, or with words=True their words;
    rows: the N generated tokens. Labels show whitespace (⏎ · →)."""
    from .text import visible

    ids = [int(i) for i in np.concatenate([g.prompt_ids, g.generated_ids])]
    texts = g.tokens if g.tokens is not None else [str(i) for i in ids]
    p, (n, t) = len(g.prompt_ids), g.relevance.shape
    rows = [visible(s) for s in texts[p:p + n]]
    if not words:
        return [visible(s) for s in texts[:t]], rows, g.relevance, [p + i for i in range(n)]
    w = g.word_relevance()
    bounds = [sum(1 for ks in w.tokens if ks[0] < p + i) for i in range(n)]  # units in token order
    return [visible(s) for s in w.words], rows, w.relevance, bounds


def generation_html(g: GenerationExplanation, title: str = "", words: bool = False) -> str:
    """Rows: generated tokens; columns: the tokens before them (prompt, then generated), or their words
    (words=True); cells from the diagonal boundary on (not yet generated) are grey, the boundary drawn
    as a line; the last column is each row's logit. Each row is normalized by its largest |relevance|."""
    from .heatmap import relevance_color

    columns, rows, matrix, bounds = _matrix(g, words)
    css = ("body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;font-size:85%}"
           "td,th{padding:2px 4px;white-space:pre;text-align:center}th{font-weight:normal;color:#333}"
           "th.c{writing-mode:vertical-rl;transform:rotate(180deg);max-height:10em}td.f{background:#e8e8e8}"
           "td.b{border-left:2px solid #000}th.r{text-align:right}td.l{text-align:right}p.h{color:#555;font-size:90%}")
    parts = ["<!DOCTYPE html><html><head><meta charset='utf-8'><title>lrp-onnx generation</title>",
             f"<style>{css}</style></head><body>"]
    if title:
        parts.append(f"<p class='h'>{html.escape(title)}</p>")
    parts.append("<table><tr><th></th>" + "".join(
        f"<th class='c'>{html.escape(c)}</th>" for c in columns) + "<th class='c'>logit</th></tr>")
    for i, label in enumerate(rows):
        values = matrix[i]
        peak = float(np.abs(values[:bounds[i]]).max()) if bounds[i] else 0.0
        cells = []
        for j, value in enumerate(values):
            if j >= bounds[i]:
                cells.append(f"<td class='f{' b' if j == bounds[i] else ''}'></td>")
            else:
                r, gr, b = relevance_color(value, peak)
                cells.append(f"<td style='background:rgb({r},{gr},{b})' title='{value:+.4g}'>&nbsp;&nbsp;</td>")
        logit_class = "l b" if bounds[i] >= len(values) else "l"  # the boundary is the logit column's edge
        parts.append(f"<tr><th class='r'>{html.escape(label)}</th>{''.join(cells)}"
                     f"<td class='{logit_class}'>{g.logits[i]:.2f}</td></tr>")
    what = "words" if words else "tokens"
    parts.append(f"</table><p class='h'>rows: generated tokens; columns: the {what} before them (grey: not yet "
                 "generated); last column: the generated token's logit. Red: positive relevance, blue: negative; "
                 "each row normalized by its largest |relevance|. ⏎ newline, · space, → tab.</p></body></html>\n")
    return "".join(parts)


def write_generation_html(g: GenerationExplanation, path: str, title: str = "", words: bool = False) -> None:
    write_atomically(path, generation_html(g, title, words).encode("utf-8"))


def write_generation_png(g: GenerationExplanation, path: str, cell: int = 22, size: int = 14,
                         words: bool = False) -> None:
    """The same matrix as generation_html, as a PNG."""
    try:
        from PIL import Image, ImageDraw
    except ImportError:
        raise LRPError("PNG heatmaps need Pillow: pip install pillow") from None
    from .heatmap import _font, _save_png, drawable, relevance_color

    columns, rows, matrix, bounds = _matrix(g, words)
    font = _font(size)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    columns = [drawable(font, s) for s in columns]
    rows = [drawable(font, s) for s in rows]
    left = int(max([probe.textlength(s, font=font) for s in rows] + [10])) + 12
    top = int(max([probe.textlength(s, font=font) for s in columns] + [10])) + 12
    logits = [f"{v:.2f}" for v in g.logits]
    logit_w = int(max([probe.textlength(s, font=font) for s in logits + ["logit"]])) + 12
    width, height = left + cell * len(columns) + logit_w + 12, top + cell * len(rows) + 12
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    for j, label in enumerate(columns + ["logit"]):  # column labels, rotated
        w = int(probe.textlength(label, font=font)) + 4
        text = Image.new("RGB", (w, cell), "white")
        ImageDraw.Draw(text).text((2, 3), label, fill="black", font=font)
        text = text.rotate(90, expand=True)
        shift = (logit_w - cell) // 2 if j == len(columns) else 0  # "logit": over the logit column's middle
        image.paste(text, (left + j * cell + shift, top - w - 4))
    for i, label in enumerate(rows):
        values = matrix[i]
        peak = float(np.abs(values[:bounds[i]]).max()) if bounds[i] else 0.0
        y = top + i * cell
        draw.text((left - 6 - probe.textlength(label, font=font), y + 3), label, fill="black", font=font)
        for j, value in enumerate(values):
            color = (232, 232, 232) if j >= bounds[i] else relevance_color(value, peak)
            draw.rectangle([left + j * cell, y, left + (j + 1) * cell - 1, y + cell - 1], fill=color)
        x = left + bounds[i] * cell  # the diagonal boundary: the prediction's own position ends here
        draw.line([x, y, x, y + cell - 1], fill="black", width=2)
        draw.text((left + len(columns) * cell + logit_w - 6 - probe.textlength(logits[i], font=font), y + 3),
                  logits[i], fill="black", font=font)  # the logit column, right-aligned
    _save_png(image, path)
