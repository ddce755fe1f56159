"""Session creation time, run time and peak memory of a quantized model's forward against its converted
model's explanation (issue 21), each measured in a fresh process of its own, the two alternating.

    python tools/bench_quant.py --model int4/model.onnx --converted int4/model.lrp.onnx [--tokens 128]
        [--threads 2] [--rounds 2] [--prepack both|on|off] [--reference other.lrp.onnx]
        [--save-relevance DIR]

Rows (every figure: median over rounds; peak = the child's ru_maxrss, the whole process):
  forward            onnxruntime default session of --model (all optimizations, pre-packing on),
                     the model's own inputs (a builder KV-cache graph gets empty past tensors)
  forward/no-prepack the same with session.disable_prepacking=1
  explain            lrp_onnx.Explainer(--converted, prepack=...) and one explain run
  explain/ort        a plain onnxruntime default session of --converted (what any consumer gets)
  reference          --reference (e.g. the converted model of an older lrp-onnx), for its relevance only,
                     opened with constant folding off unless --reference-default
Relevance of every explain row is compared with the first's (max abs difference, relative L2), and the
logits of the explain rows with the forward's. Timings are indicative on a shared machine; the CPU is
printed with the table (lscpu's model name).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except Exception:  # noqa: BLE001
        return "unknown CPU"


def feeds(model_path: str, tokens: int, seed: int = 0) -> dict:
    """input_ids (random ids below the smallest vocabulary bound of 32000), attention_mask of ones, and
    every other float input with a symbolic axis fed empty along it (a KV cache's past tensors)."""
    import onnx

    model = onnx.load(model_path, load_external_data=False)
    inits = {t.name for t in model.graph.initializer}
    rng = np.random.default_rng(seed)
    feed = {}
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type if vi.type.HasField("tensor_type") else vi.type.optional_type.elem_type.tensor_type
        if vi.name == "input_ids":
            feed[vi.name] = rng.integers(0, 32000, size=(1, tokens)).astype(np.int64)
        elif vi.name == "attention_mask":
            feed[vi.name] = np.ones((1, tokens), np.int64)
        elif vi.name == "position_ids":
            feed[vi.name] = np.arange(tokens, dtype=np.int64)[None]
        elif tt.elem_type == onnx.TensorProto.FLOAT and vi.name.startswith("past"):
            # batch 1, past sequence 0, other symbolic sizes (the builder's kv_cache_dim) from genai_config
            config = Path(model_path).with_name("genai_config.json")
            head = json.loads(config.read_text())["model"]["decoder"]["head_size"] if config.exists() else None
            dims = [d.dim_value if d.HasField("dim_value") else 1 if k == 0 else 0 if "sequence" in d.dim_param
                    else head for k, d in enumerate(tt.shape.dim)]
            feed[vi.name] = np.zeros(dims, np.float32)
    return feed


# -- children ---------------------------------------------------------------------------------------
def child(args) -> None:
    import onnxruntime as ort

    result = {}
    if args.child in ("forward", "forward/no-prepack", "explain/ort", "reference"):
        options = ort.SessionOptions()
        options.intra_op_num_threads = args.threads
        options.log_severity_level = 3
        if args.child == "forward/no-prepack":
            options.add_session_config_entry("session.disable_prepacking", "1")
        if args.child == "reference" and not args.reference_default:
            options.add_session_config_entry("optimization.disable_specified_optimizers", "ConstantFolding")
        path = args.model if args.child.startswith("forward") else args.path
        start = time.perf_counter()
        session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        result["create_s"] = time.perf_counter() - start
        names = {i.name for i in session.get_inputs()}
        feed = {k: v for k, v in feeds(args.model, args.tokens).items() if k in names}
        outputs = [o.name for o in session.get_outputs()]
        times = []
        for _ in range(args.runs):
            start = time.perf_counter()
            values = session.run(None, feed)
            times.append(time.perf_counter() - start)
        got = dict(zip(outputs, values))
        logits = got["logits"]
        relevance = got.get("lrp_relevance")
    else:  # explain: lrp_onnx.Explainer
        sys.path.insert(0, str(REPO))
        import lrp_onnx

        start = time.perf_counter()
        explainer = lrp_onnx.Explainer(args.path, providers=["CPUExecutionProvider"], threads=args.threads,
                                       prepack=args.child == "explain")
        result["create_s"] = time.perf_counter() - start
        feed = {k: v for k, v in feeds(args.model, args.tokens).items() if k in ("input_ids", "attention_mask")}
        times = []
        for _ in range(args.runs):
            start = time.perf_counter()
            explanation = explainer.run(**feed)
            times.append(time.perf_counter() - start)
        logits, relevance = explanation.outputs["logits"], explanation.outputs["lrp_relevance"]
    result["run_s"] = min(times)
    result["peak_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result["logit"] = float(logits[0, -1].max())
    if args.save:
        np.save(args.save + ".logits.npy", logits[0, -1])
        if relevance is not None:
            np.save(args.save + ".relevance.npy", relevance)
    print("RESULT " + json.dumps(result))


def run_child(kind: str, args, path: str | None, save: str) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, "--model", args.model, "--tokens", str(args.tokens),
           "--threads", str(args.threads), "--runs", str(args.runs), "--save", save]
    if path:
        cmd += ["--path", path]
    if args.reference_default:
        cmd.append("--reference-default")
    done = subprocess.run(cmd, capture_output=True, text=True)
    line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        raise SystemExit(f"{kind} failed:\n{done.stderr[-2000:]}")
    return json.loads(line[7:])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--converted")
    p.add_argument("--reference", help="another converted model: relevance compared, constant folding off")
    p.add_argument("--reference-default", action="store_true", help="open --reference with default options")
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--runs", type=int, default=3, help="runs per session; the fastest is reported")
    p.add_argument("--prepack", choices=("both", "on", "off"), default="both",
                   help="Explainer's pre-packing in the explain rows")
    p.add_argument("--save-relevance", default="/tmp/bench_quant", help="folder for the children's arrays")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--path", help=argparse.SUPPRESS)
    p.add_argument("--save", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return child(args)
    os.makedirs(args.save_relevance, exist_ok=True)
    kinds = [("forward", None), ("forward/no-prepack", None)]
    if args.converted:
        if args.prepack in ("both", "on"):
            kinds.append(("explain", args.converted))
        if args.prepack in ("both", "off"):
            kinds.append(("explain/no-prepack", args.converted))
        kinds.append(("explain/ort", args.converted))
    rows: dict[str, list] = {}
    for r in range(args.rounds):  # alternate: every kind once per round, in a rotated order
        order = kinds[r % len(kinds):] + kinds[:r % len(kinds)]
        for kind, path in order:
            save = os.path.join(args.save_relevance, kind.replace("/", "_"))
            rows.setdefault(kind, []).append(run_child(kind, args, path, save))
            print(f"  round {r + 1} {kind}: {rows[kind][-1]}", file=sys.stderr)
    if args.reference:
        save = os.path.join(args.save_relevance, "reference")
        rows["reference"] = [run_child("reference", args, args.reference, save)]
    print(f"\n{Path(args.model).name}, {args.tokens} tokens, batch 1, {args.threads} threads, {cpu_name()} "
          f"(shared machine: indicative), median of {args.rounds} processes")
    print(f"{'row':22s} {'create s':>9s} {'run s':>8s} {'peak MB':>9s} {'logit':>9s}")
    med = {k: {f: float(np.median([x[f] for x in v])) for f in v[0]} for k, v in rows.items()}
    for kind, m in med.items():
        print(f"{kind:22s} {m['create_s']:9.2f} {m['run_s']:8.3f} {m['peak_mb']:9.0f} {m['logit']:9.4f}")
    base = os.path.join(args.save_relevance, "forward.logits.npy")
    first = None
    for kind in med:
        rel_path = os.path.join(args.save_relevance, kind.replace("/", "_") + ".relevance.npy")
        if not os.path.exists(rel_path):
            continue
        rel = np.load(rel_path).astype(np.float64)
        logits = np.load(os.path.join(args.save_relevance, kind.replace("/", "_") + ".logits.npy"))
        line = f"{kind:22s} logits vs forward max|d| {np.abs(logits - np.load(base)).max():.3g}"
        if first is None:
            first = (kind, rel)
        else:
            d = rel - first[1]
            line += (f"; relevance vs {first[0]}: max|d| {np.abs(d).max():.3g}, "
                     f"rel L2 {np.linalg.norm(d) / np.linalg.norm(first[1]):.3g}")
        print(line)


if __name__ == "__main__":
    main()
