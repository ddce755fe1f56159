"""Matrix-multiply FLOPs of a model's run, counted from onnxruntime's profile: the floor of explain/forward.

Explaining needs the input gradients of every matrix product the forward computes: one product per
linear layer (its transposed weight) and two per attention product (Q·Kᵀ and A·V each have two
relevance-carrying operands). So the converted model's matrix FLOPs over the original's bound the
explain/forward time ratio of any exact method from below, whatever the rest costs; this tool prints
that bound for one input shape, measured from what onnxruntime actually ran (its per-node profile
records every kernel's input and output shapes).

    python -m tools.flops --model minilm --seq 128 --batch 1    # the benchmark's export and conversion
    python -m tools.flops ORIGINAL.onnx CONVERTED.onnx --seq 512

Counted: MatMul, Gemm, FusedMatMul, MatMulInteger, MatMulIntegerToFloat, DynamicQuantizeMatMul
(2·M·N·K each); everything else (softmax, norms, elementwise) is not, so the bound is a floor."""
from __future__ import annotations

import argparse
import json
import os
import tempfile

import numpy as np

MATMUL_OPS = {"MatMul", "Gemm", "FusedMatMul", "MatMulInteger", "MatMulIntegerToFloat", "DynamicQuantizeMatMul"}


def _numel(shape) -> int:
    return int(np.prod(shape, dtype=np.int64)) if shape else 1


def matmul_flops_of_node(inputs: list, output: list) -> int:
    """2·(elements of the output)·K, K the contracted size, from the input and output shapes alone
    (transposes and broadcasting included): an operand that is not broadcast over the output's batch
    holds (batch·rows·K) elements."""
    a, b = inputs[0], inputs[1]
    out = _numel(output)
    if out == 0:
        return 0
    n, m = output[-1], (output[-2] if len(output) >= 2 else 1)
    batch = out // (n * m) if n * m else 0
    if len(a) == len(output) and _numel(a[:-2]) == batch and m:
        k = _numel(a) // (batch * m)
    elif len(b) == len(output) and _numel(b[:-2]) == batch and n:
        k = _numel(b) // (batch * n)
    else:  # 2-D operands (Gemm) or broadcast batches: A is [M, K] or [K, M]
        k = _numel(a) // m if len(a) == 2 and m else _numel(b) // n
    return 2 * out * k


def profiled_flops(model_path, feeds: dict, threads: int = 2) -> dict:
    """{"matmul_flops", "nodes"}: one profiled onnxruntime run of the model on `feeds`."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.enable_profiling = True
    with tempfile.TemporaryDirectory() as tmp:
        options.profile_file_prefix = os.path.join(tmp, "profile")
        options.add_session_config_entry("session.disable_prepacking", "1")
        session = ort.InferenceSession(os.fspath(model_path), options, providers=["CPUExecutionProvider"])
        names = {i.name for i in session.get_inputs()}
        session.run(None, {k: v for k, v in feeds.items() if k in names})
        with open(session.end_profiling()) as f:
            events = json.load(f)
    flops = nodes = 0
    for e in events:
        args = e.get("args", {})
        if e.get("cat") != "Node" or not e["name"].endswith("_kernel_time") or args.get("op_name") not in MATMUL_OPS:
            continue
        shapes = [next(iter(s.values())) for s in args.get("input_type_shape", [])]
        output = next(iter(args["output_type_shape"][0].values()))
        flops += matmul_flops_of_node(shapes, output)
        nodes += 1
    return {"matmul_flops": flops, "nodes": nodes}


def text_feeds(seq: int, batch: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    ids = rng.integers(1000, 20000, (batch, seq)).astype(np.int64)
    ones = np.ones_like(ids)
    return {"input_ids": ids, "attention_mask": ones, "token_type_ids": np.zeros_like(ids),
            "position_ids": np.broadcast_to(np.arange(seq), ids.shape).copy()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("original", nargs="?")
    p.add_argument("converted", nargs="?")
    p.add_argument("--model", help="the benchmark's model (tools.bench MODELS): export and convert as it does")
    p.add_argument("--rules", default="attnlrp")
    p.add_argument("--full", action="store_true", help="with --model: the full conversion (default relevance-only)")
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=1)
    args = p.parse_args(argv)
    if args.model:
        from pathlib import Path

        import lrp_onnx
        from tools.bench import MODELS, ensure_export

        paths = ensure_export(MODELS[args.model], None, Path("build/bench"))
        original = paths["onnx"]
        converted = Path(paths["out_dir"]) / f"model.flops.{args.rules}.{'full' if args.full else 'relevance'}.onnx"
        lrp_onnx.convert(original, converted, rules=args.rules, relevance_only=not args.full)
    elif args.original and args.converted:
        original, converted = args.original, args.converted
    else:
        p.error("give --model, or ORIGINAL and CONVERTED")
    feeds = text_feeds(args.seq, args.batch)
    forward = profiled_flops(original, feeds)
    explain = profiled_flops(converted, feeds)
    ratio = explain["matmul_flops"] / forward["matmul_flops"]
    print(f"{args.seq} x {args.batch}: matrix GFLOP forward {forward['matmul_flops'] / 1e9:.3f} "
          f"({forward['nodes']} products), explain {explain['matmul_flops'] / 1e9:.3f} ({explain['nodes']}): "
          f"explain/forward floor {ratio:.2f}")
    return ratio


if __name__ == "__main__":
    main()
