"""Graphs exported by others: every ONNX file optimum's exporter writes for tiny models of the architectures
it supports, converted and run.

    python -m tools.optimum_sweep [--arch a,b] [--out build/optimum_sweep.jsonl] [--timeout 300]

For each architecture that both tools.sweep (tiny random-weight models of every transformers
architecture) and optimum-onnx's exporter support: build the tiny model (tools.sweep.build), export it
with optimum (`main_export`, the task of tools.sweep's head: text-generation-with-past for decoders,
text2text-generation-with-past for encoder-decoders, text-classification, fill-mask,
image-classification), and for every file it writes (model.onnx; encoder_model, decoder_model,
decoder_with_past_model, decoder_model_merged) run `lrp_onnx.convert` (attnlrp) and one explanation
on a small random feed. A file's status:

    ok          converted and explained, relevance finite (the number of KV-cache inputs bound is shown)
    refused     lrp_onnx.LRPError, one line naming the node or input (an encoder-decoder's decoder with
                past is refused by design: its cross-attention cache is read as data)
    crash       any other exception: a bug
    original    onnxruntime cannot run the original file on the feed either (an export that fixed a
                length, e.g. Longformer's attention window): not lrp_onnx's

What it does not check is relevance against a reference: tools/sweep.py does that (autograd, LXT) for
the same architectures through torch.onnx.export; here the point is the graph forms optimum writes
(its model patchers, merged decoders, caches). Each architecture runs in its own process under
--timeout. One record per architecture (JSON lines) in --out; a tally at the end.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import subprocess
import sys
import warnings
from collections import Counter
from pathlib import Path

TASKS = {"causal": "text-generation-with-past", "seq2seq": "text2text-generation-with-past",
         "classification": "text-classification", "masked": "fill-mask", "image": "image-classification"}


def architectures() -> list[str]:
    import optimum.exporters.onnx.model_configs  # noqa: F401 (registers the ONNX configs)
    from optimum.exporters.tasks import TasksManager

    from tools import sweep

    supported = set(TasksManager._SUPPORTED_MODEL_TYPE)
    return sorted(a for a in sweep.architectures() if a in supported or a.replace("_", "-") in supported)


def feed_for(session, config, rng):
    """A small random feed: batch 2, sequence 6, ids in [3, 50), masks of ones, positions 0..5, token types
    0, images of the config's size and channels."""
    import numpy as np

    feed = {}
    for i in session.get_inputs():
        if i.name.startswith("lrp_"):
            continue
        if "float" in i.type and len(i.shape) == 4:  # images
            size = getattr(config, "image_size", 32)
            size = size[0] if isinstance(size, (list, tuple)) else size
            channels = getattr(config, "num_channels", 3)
            feed[i.name] = rng.standard_normal((2, channels, size, size)).astype(np.float32)
            continue
        shape = [d if isinstance(d, int) else (2 if k == 0 else 6) for k, d in enumerate(i.shape)]
        if "int" in i.type:
            if "token_type" in i.name:
                value = np.zeros(shape, np.int64)
            elif "mask" in i.name:
                value = np.ones(shape, np.int64)
            elif "position" in i.name:
                value = np.broadcast_to(np.arange(shape[-1]), shape).copy()
            else:
                value = rng.integers(3, 50, shape)
            feed[i.name] = value.astype(np.int32) if i.type == "tensor(int32)" else value
        else:
            feed[i.name] = rng.standard_normal(shape).astype(np.float32)
    return feed


def run_architecture(arch: str, workdir: Path) -> dict:
    import numpy as np
    import onnxruntime as ort

    import lrp_onnx
    from tools import sweep

    record = {"arch": arch, "files": {}}
    try:
        task, model = sweep.build(arch)
        model.save_pretrained(workdir / "hf")
        from optimum.exporters.onnx import main_export

        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            main_export(str(workdir / "hf"), output=workdir / "onnx", task=TASKS[task], do_validation=False)
    except Exception as exc:  # building or exporting: not lrp_onnx's
        record["export"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
        return record
    options = ort.SessionOptions()
    options.log_severity_level = 4
    for path in sorted((workdir / "onnx").glob("*.onnx")):
        try:
            converted = lrp_onnx.convert(str(path), rules="attnlrp")
        except lrp_onnx.LRPError as exc:
            record["files"][path.name] = f"refused: {str(exc)[:300]}"
            continue
        except Exception as exc:
            record["files"][path.name] = f"crash: {type(exc).__name__}: {str(exc)[:300]}"
            continue
        try:
            explainer = lrp_onnx.Explainer.from_model(converted, providers=["CPUExecutionProvider"])
            feed = feed_for(explainer.session, model.config, np.random.default_rng(0))
            result = explainer.run(**feed)
            bound = len(explainer.meta.get("bound_inputs", {}))
            status = "ok" if np.isfinite(result.relevance).all() else "crash: non-finite relevance"
            record["files"][path.name] = f"{status} (KV-cache inputs bound: {bound})" if status == "ok" else status
        except lrp_onnx.LRPError as exc:  # the converted model did not run: does the original?
            original = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            try:
                original.run(None, feed_for(original, model.config, np.random.default_rng(0)))
                record["files"][path.name] = f"crash: the original runs, the converted one not: {str(exc)[:300]}"
            except Exception as orig:
                record["files"][path.name] = f"original: {str(orig).splitlines()[0][:200]}"
        except Exception as exc:
            record["files"][path.name] = f"crash: {type(exc).__name__}: {str(exc)[:300]}"
    return record


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", help="comma-separated model types (default: all that optimum exports)")
    p.add_argument("--out", default="build/optimum_sweep.jsonl")
    p.add_argument("--timeout", type=int, default=300)
    p.add_argument("--workdir", default="build/optimum_sweep")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        warnings.simplefilter("ignore")
        print(json.dumps(run_architecture(args.worker, Path(args.workdir) / args.worker)))
        return 0
    archs = args.arch.split(",") if args.arch else architectures()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tally = Counter()
    with open(out, "w") as f:
        for arch in archs:
            try:
                proc = subprocess.run([sys.executable, "-m", "tools.optimum_sweep", "--worker", arch, "--workdir",
                                       args.workdir], capture_output=True, text=True, timeout=args.timeout,
                                      env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
                lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
                record = json.loads(lines[-1]) if lines else {"arch": arch, "export": f"worker crash: {proc.stderr[-200:]}"}
            except subprocess.TimeoutExpired:
                record = {"arch": arch, "export": "timeout"}
            f.write(json.dumps(record) + "\n")
            f.flush()
            if "export" in record:
                tally["export failed"] += 1
            for status in record.get("files", {}).values():
                tally[status.split(" ")[0].rstrip(":")] += 1
            print(arch, record.get("export", "") or {k: v[:120] for k, v in record["files"].items()}, flush=True)
    print("files:", dict(tally))
    return 1 if tally["crash"] else 0


if __name__ == "__main__":
    sys.exit(main())
