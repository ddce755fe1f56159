"""Runtimes side by side: does the converted model run, does its relevance equal onnxruntime's, how long
do explain and forward take -- onnxruntime CPU and OpenVINO CPU (f32 and its default precision).

    python -m tools.bench_runtimes --model minilm|smollm2 [--seq 128] [--runs 10] [--threads 2]
                                   [--runtimes ort,ov-f32,ov-default] [--layers N] [--json out.json]

The model is exported once (tools/bench.py's cache, build/bench/<model>-full) and converted here with
the default options (plain lrp_target / lrp_position inputs; SmolLM2 --relevance-only, MiniLM as is).
Each (runtime, graph) pair is timed in its OWN fresh process (the original graph's forward, the
converted graph's explain): load/compile, --warmup runs, then the median of --runs. Input: tools/bench.py's
passage at exactly --seq tokens, batch 1, target the argmax at the last position (-1, -1). Besides wall
time, the CPU time of the process per run (time.process_time: all threads) is reported: on a machine
shared with other jobs it moves far less than wall time. Relevance of
every runtime is compared with onnxruntime CPU's (relative L2, cosine) and the explained target with
its. Every table names the CPU, and OpenVINO's resolved inference precision (f32 where the CPU has no
bf16: then "default" equals f32).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

RUNTIMES = ("ort", "ov-f32", "ov-default")
LABELS = {"ort": "onnxruntime CPU", "ov-f32": "OpenVINO CPU, f32", "ov-default": "OpenVINO CPU, default precision"}


def cpu_name() -> str:
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


# --------------------------------------------------------------------------- child: one runtime, one graph
def child(args) -> dict:
    feed = dict(np.load(args.child_inputs))
    if args.runtime == "ort":
        from tools.bench import session_options
        import onnxruntime as ort

        from lrp_onnx.run.session import input_defaults

        start = time.perf_counter()
        session = ort.InferenceSession(args.child_model, session_options(args.threads), providers=["CPUExecutionProvider"])
        load = time.perf_counter() - start
        names = [i.name for i in session.get_inputs()]
        feeds = {**input_defaults(session), **{k: v for k, v in feed.items() if k in names}}
        outputs = [o.name for o in session.get_outputs()]
        precision = "f32"

        def run():
            return dict(zip(outputs, session.run(None, feeds)))
    else:
        import openvino as ov

        core = ov.Core()
        config = {"INFERENCE_NUM_THREADS": args.threads}
        if args.runtime == "ov-f32":
            config["INFERENCE_PRECISION_HINT"] = "f32"
        start = time.perf_counter()
        compiled = core.compile_model(core.read_model(args.child_model), "CPU", config)
        load = time.perf_counter() - start
        precision = compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()
        names = {n for p in compiled.inputs for n in p.get_names()}
        feeds = {k: v for k, v in feed.items() if k in names}
        for name in ("lrp_target", "lrp_position"):
            if name in names:
                feeds[name] = np.array([-1], np.int64)
        request = compiled.create_infer_request()

        def run():
            values = request.infer(feeds)
            return {n: values[o] for o in compiled.outputs for n in o.get_names()}
    for _ in range(args.warmup):
        out = run()
    times, cpu = [], []
    for _ in range(args.runs):
        start, start_cpu = time.perf_counter(), time.process_time()
        out = run()
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    result = {"median_s": float(np.median(times)), "cpu_s": float(np.median(cpu)), "load_s": load,
              "precision": precision, "runs": args.runs}
    if "lrp_relevance" in out:
        np.save(args.child_out + ".npy", np.asarray(out["lrp_relevance"], np.float32))
        result["target"] = int(np.asarray(out["lrp_selected_target"]).ravel()[0])
    return result


def run_child(args, runtime: str, model: Path, inputs: Path, out: Path) -> dict:
    command = [sys.executable, "-m", "tools.bench_runtimes", "--child", "--runtime", runtime,
               "--child-model", str(model), "--child-inputs", str(inputs), "--child-out", str(out),
               "--threads", str(args.threads), "--runs", str(args.runs), "--warmup", str(args.warmup)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO_ROOT, timeout=3600)
    if done.returncode != 0:
        lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
        return {"error": lines[-1][:300] if lines else f"exit {done.returncode}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- parent
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", choices=["minilm", "smollm2"], default="minilm")
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--layers", type=int, default=None, help="first N layers only (default: all)")
    p.add_argument("--runs", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--runtimes", default=",".join(RUNTIMES))
    p.add_argument("--cache", default=str(REPO_ROOT / "build" / "bench"))
    p.add_argument("--json")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--runtime", help=argparse.SUPPRESS)
    p.add_argument("--child-model", help=argparse.SUPPRESS)
    p.add_argument("--child-inputs", help=argparse.SUPPRESS)
    p.add_argument("--child-out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return 0

    import lrp_onnx
    from tools import bench

    spec = bench.MODELS[args.model]
    paths = bench.ensure_export(spec, args.layers, Path(args.cache))
    converted = paths["out_dir"] / f"model.runtimes.{'relevance' if spec.language_model else 'full'}.onnx"
    start = time.perf_counter()
    lrp_onnx.convert(paths["onnx"], converted, relevance_only=spec.language_model)
    convert_s = time.perf_counter() - start
    feed = bench.make_inputs(spec, paths["tokenizer"], args.seq, 1)
    runtimes = [r for r in args.runtimes.split(",") if r]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        inputs = Path(tmp) / "inputs.npz"
        np.savez(inputs, **feed)
        for runtime in runtimes:
            row = {"runtime": runtime}
            for kind, model in (("forward", paths["onnx"]), ("explain", converted)):
                row[kind] = run_child(args, runtime, model, inputs, Path(tmp) / f"{runtime}-{kind}")
                relevance = Path(tmp) / f"{runtime}-{kind}.npy"
                if relevance.exists():
                    row["relevance"] = np.load(relevance)
            rows.append(row)
    reference = next((r.get("relevance") for r in rows if r["runtime"] == "ort"), None)
    ref_target = next((r["explain"].get("target") for r in rows if r["runtime"] == "ort"), None)
    table = []
    for row in rows:
        entry = {"runtime": row["runtime"], "label": LABELS.get(row["runtime"], row["runtime"])}
        for kind in ("forward", "explain"):
            entry[kind] = row[kind]
        relevance = row.pop("relevance", None)
        if relevance is not None and reference is not None:
            a, b = relevance.astype(np.float64).ravel(), reference.astype(np.float64).ravel()
            entry["rel_l2"] = float(np.linalg.norm(a - b) / np.linalg.norm(b))
            entry["cosine"] = float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
            entry["same_target"] = row["explain"].get("target") == ref_target
        table.append(entry)
    header = (f"{spec.title}, {args.seq} tokens, batch 1, {args.threads} threads, {cpu_name()}; "
              f"median of {args.runs} runs per process (warm-up {args.warmup}); converted in {convert_s:.1f} s")
    print(header)
    print(f"{'runtime':<34} {'precision':>9} {'forward ms':>11} {'explain ms':>11} {'ratio':>6} "
          f"{'fwd CPU ms':>11} {'expl CPU ms':>11} {'rel L2 vs ORT':>14} {'cosine':>10}")
    for e in table:
        fw, ex = e["forward"], e["explain"]
        if "error" in ex:
            print(f"{e['label']:<34} does not run: {ex['error']}")
            continue
        fms = fw.get("median_s", float("nan")) * 1e3
        ems = ex["median_s"] * 1e3
        print(f"{e['label']:<34} {ex['precision']:>9} {fms:>11.1f} {ems:>11.1f} {ems / fms:>6.2f} "
              f"{fw.get('cpu_s', float('nan')) * 1e3:>11.1f} {ex['cpu_s'] * 1e3:>11.1f} "
              f"{e.get('rel_l2', float('nan')):>14.2e} {e.get('cosine', float('nan')):>10.7f}"
              + ("" if e.get("same_target", True) else "  (other target)"))
    if args.json:
        Path(args.json).write_text(json.dumps({"header": header, "model": args.model, "seq": args.seq,
                                               "threads": args.threads, "cpu": cpu_name(), "rows": table},
                                              indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
