"""Run a converted model in onnxruntime: CUDA when present, else CPU. No PyTorch."""
from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field

import numpy as np

from ..errors import first_line, LRPError
from .session import input_defaults, model_metadata, open_session, text_inputs  # noqa: F401 (part of the runner's API)
from ..contract import POSITION_INPUT, SEED_INPUT, SELECTED_LOGIT, SELECTED_TARGET, TARGET_INPUT


@dataclass
class Explanation:
    outputs: dict          # every graph output by name
    relevance: np.ndarray  # at the (first) relevance source
    target: np.ndarray | None
    logit: np.ndarray | None
    relevances: dict = field(default_factory=dict)     # every source's relevance output, in source order
    source_inputs: dict = field(default_factory=dict)  # relevance output -> graph input behind its source

    def relevance_of(self, input_name: str) -> np.ndarray:
        """Relevance at the source fed by graph input `input_name`: for an encoder-decoder,
        relevance_of("input_ids") (encoder tokens) and relevance_of("decoder_input_ids")."""
        names = [name for name, i in self.source_inputs.items() if i == input_name]
        if not names:
            known = ", ".join(i for i in self.source_inputs.values() if i) or "none"
            raise LRPError(f"no relevance source is fed by input '{input_name}'; sources are fed by: {known}")
        return self.relevances[names[0]]

    def token_relevance(self, input_name: str | None = None) -> np.ndarray:
        """Relevance per token: summed over the hidden axis (the last one). Of the first source, or
        of the source fed by graph input `input_name`."""
        relevance = self.relevance if input_name is None else self.relevance_of(input_name)
        return relevance.sum(axis=-1) if relevance.ndim >= 3 else relevance

    def word_relevance(self, encoding, text: str, row: int = 0, input_name: str | None = None,
                       by: str = "whitespace", tokenizer=None):
        """Relevance per word of row `row`: `text` tokenized as `encoding` (a tokenizers Encoding, e.g.
        tokenizer.encode(text)); its len(encoding) first tokens (right padding) summed by word ->
        lrp_onnx.run.text.Words (words, relevance [W], spans, tokens). by="tokenizer": the tokenizer's own
        words (encoding.word_ids) instead of whitespace-separated ones; `tokenizer`: also set apart the
        special tokens written in the text. See also text.span_relevance."""
        from .text import word_relevance

        per_token = self.token_relevance(input_name)
        if per_token.ndim != 2:
            raise LRPError(f"word relevance takes a token relevance [batch, tokens]; this one has shape "
                           f"{list(per_token.shape)} (a multi-target run: use text.word_relevance per target)")
        return word_relevance(encoding, per_token[row], text, by=by, tokenizer=tokenizer)


class Explainer:
    """Holds an onnxruntime session of a converted model."""

    def __init__(self, model_path, providers=None, threads: int | None = None, prepack: bool | None = None,
                 _model_bytes: bytes | None = None):
        """providers, threads, prepack: see open_session; prepack None: as the model's metadata asks (on
        for MatMulNBits weights, off otherwise)."""
        path = os.fspath(model_path)
        if _model_bytes is None and not os.path.isfile(path):
            raise LRPError(f"{path}: no such file")
        self.source = _model_bytes if _model_bytes is not None else path
        if prepack is None:
            try:
                prepack = bool(json.loads(model_metadata(self.source).get("lrp_onnx", "{}")).get("prepack"))
            except ValueError:
                prepack = False
        self.session, self.input_names = open_session(self.source,
                                                      providers, threads, prepack, label=path)
        meta = self.session.get_modelmeta().custom_metadata_map.get("lrp_onnx")
        if meta is None:
            raise LRPError(f"{path}: not converted by lrp-onnx (no lrp_onnx metadata); run `lrp-onnx convert` first")
        self.meta = json.loads(meta)
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.multi_target = bool(self.meta.get("multi_target"))  # lrp_target/lrp_position [batch, K]
        self.defaults = input_defaults(self.session)  # -1 for the plain lrp_target / lrp_position inputs

    @classmethod
    def from_model(cls, model, providers=None, threads: int | None = None, prepack: bool | None = None) -> "Explainer":
        """A session of an in-memory converted onnx.ModelProto (weights inline)."""
        return cls("<in-memory model>", providers, threads, prepack, _model_bytes=model.SerializeToString())

    def run(self, target=None, position=None, seed=None, **inputs) -> Explanation:
        """Explain `target` (default: the argmax) at `position` (default: the last; Python-style
        negative indices, in [-L, L-1]) for the inputs given by name. Bad values (ids outside the
        vocabulary, sequences longer than the model's position table, positions or targets out of
        range) raise LRPError naming the argument; so does a non-finite explained logit.

        A model converted with multi_target takes K targets/positions per row: [batch, K] (or [K], the
        same for every row), broadcast together; the relevance then has a target axis, [batch, K, ...],
        and target/logit are [batch, K]."""
        feed = {}
        for name, value in inputs.items():
            if name not in self.input_names:
                raise LRPError(f"the model has no input '{name}'; inputs are: {', '.join(self.input_names)}")
            try:
                feed[name] = np.asarray(value)
            except (TypeError, ValueError) as exc:
                raise LRPError(f"input '{name}': not an array ({exc})") from None
        self._check_inputs(feed)
        if target is not None:
            feed[TARGET_INPUT] = _int_vector(target, "target", self.multi_target)
        if position is not None:
            if POSITION_INPUT not in self.input_names:
                raise LRPError("the explained output has no sequence axis: position does not apply")
            feed[POSITION_INPUT] = _int_vector(position, "position", self.multi_target)
        if seed is not None:
            if SEED_INPUT not in self.input_names:
                raise LRPError("this model was converted without --seed-input")
            feed[SEED_INPUT] = np.asarray(seed)
        for name, value in self.defaults.items():
            feed.setdefault(name, value)
        try:
            values = self.session.run(None, feed)
        except Exception as exc:
            if type(exc).__module__.startswith("onnxruntime"):
                message = first_line(exc)
                raise LRPError(f"onnxruntime could not run the model: {message[:400]}") from None
            raise
        outputs = dict(zip(self.output_names, values))
        source_inputs = self.meta.get("source_inputs", {})  # absent in models converted by earlier versions
        names = [n for n in self.meta["relevance_outputs"] if n not in self.meta.get("latent", {})]
        result = Explanation(outputs, outputs[self.meta["relevance_outputs"][0]],
                             outputs.get(SELECTED_TARGET), outputs.get(SELECTED_LOGIT),
                             relevances={n: outputs[n] for n in names},
                             source_inputs={n: source_inputs.get(n) for n in names})
        self._check_result(result, feed)
        return result

    def explain_generation(self, input_ids, max_new_tokens: int = 16, *, tokenizer=None, eos_token_id=None,
                           decoder=None, generated_ids=None, **inputs):
        """Decode greedily from one prompt (stopping at an end token) and explain every generated token:
        a GenerationExplanation whose relevance [N, T] has one row per generated token over the tokens
        before it. One run of a multi-target model (see lrp_onnx/run/generation.py)."""
        from .generation import explain_generation

        return explain_generation(self, input_ids, max_new_tokens, tokenizer=tokenizer, eos_token_id=eos_token_id,
                                  decoder=decoder, generated_ids=generated_ids, **inputs)

    def _check_inputs(self, feed: dict) -> None:
        """Token ids inside the tables they index, no empty sequence, no sequence longer than a constant
        position table (limits recorded at conversion; models converted earlier have none)."""
        limits = self.meta.get("input_limits") or {}
        for name, rows in (limits.get("inputs") or {}).items():
            if name not in feed:
                continue
            ids = feed[name]
            if ids.dtype.kind not in "iu":
                raise LRPError(f"input '{name}': integer ids expected, got {ids.dtype}")
            if ids.size == 0:
                raise LRPError(f"input '{name}' is empty (shape {list(ids.shape)}): nothing to explain")
            bad = np.argwhere((ids < 0) | (ids >= rows))
            if len(bad):
                where = tuple(int(k) for k in bad[0])
                raise LRPError(f"input '{name}': id {int(ids[where])} at {list(where)} is outside the model's "
                               f"table of {rows} rows (valid ids 0..{rows - 1})")
        max_length = limits.get("max_length")
        for name, value in feed.items():
            if value.ndim >= 2 and value.dtype.kind in "iu" and value.shape[1] == 0:
                raise LRPError(f"input '{name}' has an empty sequence (shape {list(value.shape)})")
            if max_length and name in (limits.get("inputs") or {}) and value.ndim >= 2 \
                    and value.shape[1] > max_length:
                raise LRPError(f"input '{name}': {value.shape[1]} tokens, longer than the model's "
                               f"{max_length} positions")

    def _check_result(self, result: Explanation, feed: dict) -> None:
        """Rows the graph flagged (lrp_selected_target -1: position or target out of range, see seed.py)
        and non-finite explained logits become errors that name the argument."""
        if result.target is None:
            return
        if self.multi_target:
            return self._check_multi_result(result, feed)
        bad = np.flatnonzero(np.asarray(result.target) < 0)
        if len(bad):
            row = int(bad[0])
            scores = self._explained_scores(result, feed)
            target = _row_value(feed.get(TARGET_INPUT), row)
            if scores is not None and target is not None and target >= scores.shape[-1]:
                raise LRPError(f"target {target} (row {row}) is out of range: the explained output has "
                               f"{scores.shape[-1]} classes (valid 0..{scores.shape[-1] - 1}, or negative for "
                               f"the argmax)")
            position = _row_value(feed.get(POSITION_INPUT), row)
            length = self._sequence_length(result, feed)
            span = f" [-{length}, {length - 1}]" if length else " (-L..L-1 for a sequence of L)"
            raise LRPError(f"position {position} (row {row}) is out of range{span}, or target {target} is")
        logit = np.asarray(result.logit, dtype=np.float64) if result.logit is not None else None
        if logit is not None and not np.all(np.isfinite(logit)):
            row = int(np.flatnonzero(~np.isfinite(logit))[0])
            raise LRPError(f"the explained output '{self.meta.get('explained_output')}' is not finite at row "
                           f"{row} (logit {logit[row]}): no target can be explained from NaN/inf outputs")
        scores = self._explained_scores(result, feed)
        if scores is not None and scores.ndim == 2:
            rows = np.flatnonzero(~np.all(np.isfinite(scores.astype(np.float64)), axis=-1))
            if len(rows):
                raise LRPError(f"the explained output '{self.meta.get('explained_output')}' holds NaN/inf at "
                               f"row {int(rows[0])}: its argmax and logit are meaningless")
        for name, value in result.relevances.items():
            if not np.all(np.isfinite(value)):
                warnings.warn(f"relevance output '{name}' holds NaN/inf values", RuntimeWarning, stacklevel=3)

    def _check_multi_result(self, result: Explanation, feed: dict) -> None:
        """_check_result for [batch, K] targets: the first flagged (row, k) names its target or position."""
        chosen = np.asarray(result.target)
        bad = np.argwhere(chosen < 0)
        if len(bad):
            row, k = (int(v) for v in bad[0])
            target = _cell(feed.get(TARGET_INPUT), row, k)
            position = _cell(feed.get(POSITION_INPUT), row, k)
            explained = result.outputs.get(self.meta.get("explained_output"))
            if explained is None:
                explained = result.outputs.get("lrp_logits_at_position")
            classes = np.shape(explained)[-1] if explained is not None else None
            if target is not None and classes is not None and target >= classes:
                raise LRPError(f"target {target} (row {row}, target {k}) is out of range: the explained output "
                               f"has {classes} classes (valid 0..{classes - 1}, or negative for the argmax)")
            length = self._sequence_length(result, feed)
            span = f" [-{length}, {length - 1}]" if length else ""
            raise LRPError(f"position {position} (row {row}, target {k}) is out of range{span}, or target {target} is")
        logit = np.asarray(result.logit, dtype=np.float64)
        if not np.all(np.isfinite(logit)):
            row, k = (int(v) for v in np.argwhere(~np.isfinite(logit))[0])
            raise LRPError(f"the explained output '{self.meta.get('explained_output')}' is not finite at row "
                           f"{row}, target {k} (logit {logit[row, k]}): no target can be explained from NaN/inf")
        for name, value in result.relevances.items():
            if not np.all(np.isfinite(value)):
                warnings.warn(f"relevance output '{name}' holds NaN/inf values", RuntimeWarning, stacklevel=3)

    def _explained_scores(self, result: Explanation, feed: dict | None = None):
        """The explained output's scores per row ([batch, classes]) at the explained position, when
        they can be read from the outputs."""
        explained = self.meta.get("explained_output")
        scores = result.outputs.get(explained)
        if scores is None:
            scores = result.outputs.get("lrp_logits_at_position")
        if scores is None:
            return None
        scores = np.asarray(scores)
        if scores.ndim == 3 and scores.shape[1] == 1:
            return scores[:, 0]
        if scores.ndim == 3 and feed is not None:  # at the explained position (valid rows: in range)
            length = scores.shape[1]
            position = np.broadcast_to(np.atleast_1d(feed.get(POSITION_INPUT, np.array([-1]))), scores.shape[:1])
            position = np.where(position < 0, position + length, position).clip(0, length - 1)
            return scores[np.arange(scores.shape[0]), position]
        return scores if scores.ndim == 2 else None

    def _sequence_length(self, result: Explanation, feed: dict) -> int | None:
        scores = result.outputs.get(self.meta.get("explained_output"))
        if scores is not None and np.ndim(scores) == 3 and not self.meta.get("head_at_position"):
            return int(np.shape(scores)[1])
        ids = next((v for v in feed.values() if v.ndim == 2 and v.dtype.kind in "iu"), None)
        return int(ids.shape[1]) if ids is not None else None


def _int_vector(value, what: str, per_row_list: bool = False) -> np.ndarray:
    """int64 [batch] (per_row_list: [batch, K]; a flat list is one row of K, for every row)."""
    try:
        array = np.atleast_1d(np.asarray(value))
    except (TypeError, ValueError) as exc:
        raise LRPError(f"{what}: not a list of integers ({exc})") from None
    if array.dtype.kind not in "iub" and not (array.dtype.kind == "f" and np.all(np.isfinite(array))
                                              and np.all(array == np.round(array))):
        raise LRPError(f"{what}: integers expected, got {array.tolist()!r:.80}")
    if per_row_list:
        array = array[None] if array.ndim == 1 else array
        if array.ndim != 2 or array.shape[1] == 0:
            raise LRPError(f"{what}: a list of integers per row ([batch, K], K >= 1) expected, got shape "
                           f"{list(array.shape)}")
    elif array.ndim != 1:
        raise LRPError(f"{what}: one integer per row expected, got shape {list(array.shape)}")
    if array.dtype.kind == "u" and np.any(array > np.iinfo(np.int64).max) or \
            array.dtype.kind == "f" and np.any(np.abs(array) > 2 ** 62):
        raise LRPError(f"{what}: value out of the int64 range")
    return array.astype(np.int64)


def _cell(array, row: int, column: int):
    if array is None:
        return None
    array = np.atleast_2d(array)
    return int(array[row if array.shape[0] > row else 0, column if array.shape[1] > column else 0])


def _row_value(array, row: int):
    if array is None:
        return None
    array = np.atleast_1d(array)
    return int(array[row if len(array) > row else 0])
