"""onnxruntime sessions and text feeds: what the runner, generation, evaluate and explain-dataset share."""
from __future__ import annotations

import contextlib

import numpy as np

from ..errors import LRPError


def open_session(model, providers=None, threads: int | None = None, prepack: bool = False, label: str | None = None,
                 external_folder: str | None = None):
    """An onnxruntime session (CUDA when present, else CPU) and the names it can be fed: its inputs
    and the inputs backed by initializers (lrp_target / lrp_position of a model converted with
    inputs="optional" below opset 15; plain inputs get their -1 from input_defaults).

    prepack: let onnxruntime pre-pack weights. Off by default: a converted float graph reads most
    weights twice (forward MatMul, backward Gemm) and pre-packing keeps a copy for each, about one model
    size more memory for no measured speed on CPU. Explainer turns it on for models whose metadata asks
    for it (n-bit MatMulNBits weights: pre-packed they run faster and in less memory, docs/quantized.md).
    external_folder: where the external data of a model given as bytes lies."""
    import onnxruntime as ort

    if providers is None:
        available = ort.get_available_providers()
        providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
    options = ort.SessionOptions()
    options.log_severity_level = 3  # initializer-backed lrp_target/lrp_position (opset < 15) are meant to be overridable
    if threads:
        options.intra_op_num_threads = threads
    if not prepack:
        options.add_session_config_entry("session.disable_prepacking", "1")
    if external_folder:
        options.add_session_config_entry("session.model_external_initializers_file_folder_path", external_folder)
    try:
        try:
            session = ort.InferenceSession(model, options, providers=providers)
        except Exception as exc:
            if not _register_extensions(options, exc):
                raise
            session = ort.InferenceSession(model, options, providers=providers)
    except Exception as exc:
        raise LRPError(f"{label or model}: onnxruntime cannot open it ({str(exc).splitlines()[0][:300]})") from None
    names = [i.name for i in session.get_inputs()] + [i.name for i in session.get_overridable_initializers()]
    return session, names


def model_metadata(source) -> dict:
    """The metadata_props of an ONNX model file (a path) or bytes, read without parsing its graph: the
    top-level protobuf fields are walked and every one but ModelProto.metadata_props (field 14) skipped,
    so a model of gigabytes of inline weights costs a few seeks. {} where the file cannot be read."""
    import io

    stream = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else None
    try:
        with (contextlib.nullcontext(stream) if stream is not None else open(source, "rb")) as f:
            props = {}
            while True:
                key = _varint(f)
                if key is None:
                    return props
                field, wire = key >> 3, key & 7
                if wire == 0:
                    _varint(f)
                elif wire in (1, 5):
                    f.seek(8 if wire == 1 else 4, 1)
                elif wire == 2:
                    length = _varint(f)
                    if field != 14:
                        f.seek(length, 1)
                        continue
                    entry, pair = f.read(length), {}
                    sub = io.BytesIO(entry)
                    while (k := _varint(sub)) is not None:
                        n = _varint(sub)
                        pair[k >> 3] = sub.read(n).decode("utf-8", "replace")
                    props[pair.get(1, "")] = pair.get(2, "")
                else:
                    return props
    except (OSError, TypeError, ValueError):
        return {}


def _varint(f):
    """One protobuf varint from `f`, or None at its end."""
    shift = result = 0
    while True:
        byte = f.read(1)
        if not byte:
            return None
        result |= (byte[0] & 0x7F) << shift
        if byte[0] < 0x80:
            return result
        shift += 7


def _register_extensions(options, exc: Exception) -> bool:
    """A graph with onnxruntime-extensions' ops (an in-graph tokenizer, domain ai.onnx.contrib): register
    their library when the package is installed (it is not a dependency). True if registered."""
    if "ai.onnx.contrib" not in str(exc):
        return False
    try:
        import onnxruntime_extensions
    except ImportError:
        return False
    options.register_custom_ops_library(onnxruntime_extensions.get_library_path())
    return True


def input_defaults(session) -> dict:
    """{name: value} for the plain lrp_target / lrp_position inputs of a converted model's session: the
    value that asks for the default (-1: the argmax, the last position), fed when the caller gives none."""
    from ..contract import DEFAULTED_INPUTS, default_value

    return {i.name: default_value(i.name, len(i.shape)) for i in session.get_inputs()
            if i.name in DEFAULTED_INPUTS and i.type == "tensor(int64)"}


def unfed_inputs(session, feed) -> list:
    """Inputs of `session` that `feed` lacks and that have no default (neither optional nor lrp_target /
    lrp_position, which input_defaults fills)."""
    from ..contract import DEFAULTED_INPUTS

    return [i.name for i in session.get_inputs()
            if i.name not in feed and i.name not in DEFAULTED_INPUTS and not i.type.startswith("optional")]


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
