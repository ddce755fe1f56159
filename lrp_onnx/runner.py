"""Run a converted model in onnxruntime: CUDA when present, else CPU. No PyTorch."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import numpy as np

from .errors import LRPError
from .seed import POSITION_INPUT, SEED_INPUT, SELECTED_LOGIT, SELECTED_TARGET, TARGET_INPUT


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


def open_session(model, providers=None, threads: int | None = None, prepack: bool = False, label: str | None = None):
    """An onnxruntime session (CUDA when present, else CPU) and the names it can be fed: its inputs
    and the inputs backed by initializers (lrp_target, lrp_position, ... have defaults).

    prepack: let onnxruntime pre-pack weights. Off by default: a converted graph reads most weights
    twice (forward MatMul, backward Gemm) and pre-packing keeps a copy for each, about one model size
    more memory for ~7% speed on CPU."""
    import onnxruntime as ort

    if providers is None:
        available = ort.get_available_providers()
        providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
    options = ort.SessionOptions()
    options.log_severity_level = 3  # the lrp_target/lrp_position defaults are meant to be overridable
    if threads:
        options.intra_op_num_threads = threads
    if not prepack:
        options.add_session_config_entry("session.disable_prepacking", "1")
    try:
        session = ort.InferenceSession(model, options, providers=providers)
    except Exception as exc:
        raise LRPError(f"{label or model}: onnxruntime cannot open it ({str(exc).splitlines()[0][:300]})") from None
    names = [i.name for i in session.get_inputs()] + [i.name for i in session.get_overridable_initializers()]
    return session, names


def text_inputs(input_names, input_ids: np.ndarray, attention_mask: np.ndarray | None = None) -> dict:
    """The inputs of a text model among `input_names` from token ids [batch, sequence] and a mask
    (default: no padding): input_ids, attention_mask, token_type_ids (zeros), position_ids."""
    mask = np.ones_like(input_ids) if attention_mask is None else attention_mask
    feed = {}
    for name in input_names:
        if name == "input_ids":
            feed[name] = input_ids
        elif name == "attention_mask":
            feed[name] = mask
        elif name == "token_type_ids":
            feed[name] = np.zeros_like(input_ids)
        elif name == "position_ids":
            feed[name] = np.cumsum(mask, axis=1) - 1
    return feed


class Explainer:
    """Holds an onnxruntime session of a converted model."""

    def __init__(self, model_path, providers=None, threads: int | None = None, prepack: bool = False,
                 _model_bytes: bytes | None = None):
        """providers, threads, prepack: see open_session."""
        path = os.fspath(model_path)
        if _model_bytes is None and not os.path.isfile(path):
            raise LRPError(f"{path}: no such file")
        self.session, self.input_names = open_session(_model_bytes if _model_bytes is not None else path,
                                                      providers, threads, prepack, label=path)
        meta = self.session.get_modelmeta().custom_metadata_map.get("lrp_onnx")
        if meta is None:
            raise LRPError(f"{path}: not converted by lrp-onnx (no lrp_onnx metadata); run `lrp-onnx convert` first")
        self.meta = json.loads(meta)
        self.output_names = [o.name for o in self.session.get_outputs()]

    @classmethod
    def from_model(cls, model, providers=None, threads: int | None = None, prepack: bool = False) -> "Explainer":
        """A session of an in-memory converted onnx.ModelProto (weights inline)."""
        return cls("<in-memory model>", providers, threads, prepack, _model_bytes=model.SerializeToString())

    def run(self, target=None, position=None, seed=None, **inputs) -> Explanation:
        feed = {}
        for name, value in inputs.items():
            if name not in self.input_names:
                raise LRPError(f"the model has no input '{name}'; inputs are: {', '.join(self.input_names)}")
            feed[name] = np.asarray(value)
        if target is not None:
            feed[TARGET_INPUT] = np.atleast_1d(np.asarray(target, dtype=np.int64))
        if position is not None:
            if POSITION_INPUT not in self.input_names:
                raise LRPError("the explained output has no sequence axis: position does not apply")
            feed[POSITION_INPUT] = np.atleast_1d(np.asarray(position, dtype=np.int64))
        if seed is not None:
            if SEED_INPUT not in self.input_names:
                raise LRPError("this model was converted without --seed-input")
            feed[SEED_INPUT] = np.asarray(seed)
        values = self.session.run(None, feed)
        outputs = dict(zip(self.output_names, values))
        source_inputs = self.meta.get("source_inputs", {})  # absent in models converted by earlier versions
        names = [n for n in self.meta["relevance_outputs"] if n not in self.meta.get("latent", {})]
        return Explanation(outputs, outputs[self.meta["relevance_outputs"][0]],
                           outputs.get(SELECTED_TARGET), outputs.get(SELECTED_LOGIT),
                           relevances={n: outputs[n] for n in names},
                           source_inputs={n: source_inputs.get(n) for n in names})
