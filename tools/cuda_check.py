"""The GPU path in one go: CUDA relevance equals CPU relevance, no node falls back to the CPU, and timings.

    python -m tools.cuda_check [--seq 128,512] [--batch 1,8] [--runs 20] [--no-real] [--no-lxt] [--json out.json]

Needs onnxruntime-gpu (CUDAExecutionProvider); exits with status 3 and one line when it is missing.
For a few minutes of GPU time it

1. exports tiny random-weight BERT and LLaMA (models/tiny.py, fp32 and fp16) and, when their packages are
   installed, the real all-MiniLM-L6-v2 and SmolLM2-135M (tools/bench.py's export cache, build/bench);
2. converts each (attnlrp; language models relevance-only) and checks, statically, that every node has a
   CUDA kernel (tools/cuda_kernels.py) and, at run time, which provider onnxruntime ran each node on
   (its profiler's per-node "provider");
3. runs the converted graph on CUDA and on the CPU: fp32 max |R_cuda - R_cpu| / max |R_cpu| <= 1e-4;
   fp16 cosine >= 0.999 and relative L2 <= 1e-2 (TF32 off: use_tf32=0, so fp32 matmuls are fp32);
4. times on CUDA, with IO binding (inputs copied to the device once, outputs left there), after warm-up,
   median of --runs: the original graph's forward, the converted graph's explain, and LXT's AttnLRP in
   PyTorch on the same GPU (forward + backward; TF32 off there too), for the real models at every
   --seq x --batch;

5. TensorRT: checks, statically, which nodes of each converted graph TensorRT's ONNX parser does not
   support (tools/tensorrt_ops.py, from onnx-tensorrt's operator matrix; informative, not a failure), and
   where onnxruntime has its TensorrtExecutionProvider (onnxruntime-gpu with TensorRT's libraries),
   runs the converted graph under [TensorRT, CUDA, CPU] and compares its relevance with the CPU's:
   cosine >= 0.999 and relative L2 <= 1e-2 (TensorRT may run fp32 matmuls in TF32, which onnxruntime's
   TensorRT options do not switch off), and counts the nodes per provider. Without the provider the
   row says "not available"; nothing about TensorRT is claimed from the static check alone.

and prints one table (and --json with every number). Exit status: 0 when every check passes, 1 otherwise.
This script has not yet run against a real TensorRT (no machine with one was at hand when step 5 was
added); step 5's run is written to fail loudly rather than pass silently.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from lrp_onnx.run.session import input_defaults  # noqa: E402 (after the path set-up)

FP32_MAX_REL = 1e-4
FP16_MIN_COSINE = 0.999
FP16_MAX_REL_L2 = 1e-2
CUDA = ("CUDAExecutionProvider", {"use_tf32": "0"})
TENSORRT = "TensorrtExecutionProvider"
TRT_MIN_COSINE = 0.999
TRT_MAX_REL_L2 = 1e-2
DEVICE = {"ort": "cuda", "torch": "cuda"}  # --dry-run-on-cpu: every "CUDA" step on the CPU (tests this script)


def cuda_available() -> bool:
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers()


def tensorrt_available() -> bool:
    import onnxruntime as ort

    return TENSORRT in ort.get_available_providers() and DEVICE["ort"] == "cuda"


def providers(device: str):
    if device == "tensorrt" and DEVICE["ort"] == "cuda":
        return [TENSORRT, CUDA, "CPUExecutionProvider"]
    if device == "cuda" and DEVICE["ort"] == "cuda":
        return [CUDA, "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def rel_l2(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def cosine(a, b) -> float:
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-30))


# --------------------------------------------------------------------------- models


def tiny_models(workdir: Path, log) -> list[dict]:
    from models import tiny

    out = []
    for family in ("bert", "llama"):
        for half in (False, True):
            path = workdir / f"tiny-{family}{'-fp16' if half else ''}" / "model.onnx"
            if not path.exists():
                model = tiny.build(family, seed=0)
                tiny.export(model.half() if half else model, path)
            out.append({"name": f"tiny {family}{' fp16' if half else ''}", "onnx": path, "fp16": half,
                        "lm": family != "bert", "kind": "tiny"})
    log(f"tiny models ready in {workdir}")
    return out


def real_models(cache: Path, log) -> list[dict]:
    from tools import bench

    out = []
    for name in ("minilm", "smollm2"):
        spec = bench.MODELS[name]
        try:
            paths = bench.ensure_export(spec, None, cache, log=log)
        except Exception as exc:  # noqa: BLE001 -- the package holding the weights may be missing here
            log(f"{spec.title}: not exported ({type(exc).__name__}: {str(exc)[:120]}); skipped")
            continue
        out.append({"name": spec.title, "onnx": paths["onnx"], "fp16": False, "lm": spec.language_model,
                    "kind": "real", "spec": spec, "paths": paths})
    return out


def example_feed(entry: dict, batch: int, seq: int) -> dict:
    if entry["kind"] == "real":
        from tools import bench

        return bench.make_inputs(entry["spec"], entry["paths"]["tokenizer"], seq, batch)
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 90, size=(batch, seq)).astype(np.int64)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids)}


# --------------------------------------------------------------------------- checks


def providers_used(path: Path, feed: dict, device: str = "cuda") -> dict:
    """{provider: [node names]} as onnxruntime's profiler reports them for one run on `device`'s providers
    (TensorRT reports its fused engines as nodes of its own)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.enable_profiling = True
    options.log_severity_level = 3
    with tempfile.TemporaryDirectory() as tmp:
        options.profile_file_prefix = str(Path(tmp) / "prof")
        session = ort.InferenceSession(str(path), options, providers=providers(device))
        names = {i.name for i in session.get_inputs()}
        session.run(None, {**input_defaults(session), **{k: v for k, v in feed.items() if k in names}})
        events = json.loads(Path(session.end_profiling()).read_text())
    used: dict = {}
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            used.setdefault(e["args"].get("provider", "?"), set()).add(e["name"][: -len("_kernel_time")])
    return {k: sorted(v) for k, v in used.items()}


def check_model(entry: dict, workdir: Path, log) -> dict:
    import lrp_onnx
    from tools.cuda_kernels import EXPECTED_ON_CPU, check_model as static_check

    out = Path(workdir) / f"{entry['name'].replace(' ', '_')}.lrp.onnx"
    t0 = time.perf_counter()
    lrp_onnx.convert(entry["onnx"], out, rules="attnlrp", relevance_only=entry["lm"])
    entry["converted"] = out
    result = {"model": entry["name"], "convert_s": time.perf_counter() - t0}
    fallbacks, checked = static_check(out)
    fallbacks = [f for f in fallbacks if f.op not in EXPECTED_ON_CPU]
    result["static_nodes"] = checked
    result["static_fallbacks"] = [str(f) for f in fallbacks]
    feed = example_feed(entry, 2, 16 if entry["kind"] == "tiny" else 64)
    rel = {}
    for device in ("cpu", "cuda"):
        explainer = lrp_onnx.Explainer(out, providers=providers(device))
        rel[device] = explainer.run(**{k: v for k, v in feed.items() if k in explainer.input_names}).relevance
    diff = float(np.abs(rel["cuda"] - rel["cpu"]).max() / max(np.abs(rel["cpu"]).max(), 1e-30))
    result.update({"max_rel_diff": diff, "rel_l2": rel_l2(rel["cuda"], rel["cpu"]),
                   "cosine": cosine(rel["cuda"], rel["cpu"])})
    if entry["fp16"]:
        result["ok_relevance"] = result["cosine"] >= FP16_MIN_COSINE and result["rel_l2"] <= FP16_MAX_REL_L2
    else:
        result["ok_relevance"] = diff <= FP32_MAX_REL
    used = providers_used(out, feed)
    on_cpu = used.get("CPUExecutionProvider", [])
    result["nodes_per_provider"] = {k: len(v) for k, v in used.items()}
    result["ran_on_cpu"] = on_cpu
    result.update(check_tensorrt(out, feed, rel["cpu"], entry["name"], log))
    log(f"{entry['name']}: static {len(fallbacks)} of {checked} nodes without a CUDA kernel; ran on the CPU: "
        f"{len(on_cpu)} {on_cpu[:6]}; CUDA vs CPU relevance: max rel {diff:.1e}, rel L2 {result['rel_l2']:.1e}, "
        f"cosine {result['cosine']:.6f} -> {'ok' if result['ok_relevance'] else 'FAIL'}")
    return result


def check_tensorrt(path: Path, feed: dict, reference: np.ndarray, name: str, log) -> dict:
    """The static parser check, and a run under TensorRT where onnxruntime has the provider."""
    import lrp_onnx
    from tools.tensorrt_ops import check_model as parser_check

    flagged, _ = parser_check(path)
    result = {"tensorrt_static_unsupported": [str(f) for f in flagged]}
    if not tensorrt_available():
        result["tensorrt"] = {"status": "not available"}
        return result
    try:
        explainer = lrp_onnx.Explainer(path, providers=providers("tensorrt"))
        got = explainer.run(**{k: v for k, v in feed.items() if k in explainer.input_names}).relevance
        used = providers_used(path, feed, "tensorrt")
    except Exception as exc:  # noqa: BLE001 -- reported, and counted as a failure
        result["tensorrt"] = {"status": "error", "error": str(exc).strip().splitlines()[0][:300] if str(exc) else repr(exc)}
        log(f"{name}: TensorRT run failed: {result['tensorrt']['error']}")
        return result
    trt = {"status": "ran", "rel_l2": rel_l2(got, reference), "cosine": cosine(got, reference),
           "nodes_per_provider": {k: len(v) for k, v in used.items()}}
    trt["ok"] = trt["cosine"] >= TRT_MIN_COSINE and trt["rel_l2"] <= TRT_MAX_REL_L2
    result["tensorrt"] = trt
    log(f"{name}: TensorRT vs CPU relevance: rel L2 {trt['rel_l2']:.1e}, cosine {trt['cosine']:.6f}; nodes per "
        f"provider {trt['nodes_per_provider']} -> {'ok' if trt['ok'] else 'FAIL'}")
    return result


# --------------------------------------------------------------------------- timing


def ort_cuda_runner(path: Path, feed: dict):
    """A zero-argument callable: one run with IO binding (inputs on the device, outputs left there)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=providers("cuda"))
    names = {i.name for i in session.get_inputs()}
    binding = session.io_binding()
    for name, value in {**input_defaults(session), **feed}.items():
        if name in names:
            binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(value),
                                                                            DEVICE["ort"], 0))
    for o in session.get_outputs():
        binding.bind_output(o.name, DEVICE["ort"])

    def run():
        session.run_with_iobinding(binding)
        binding.synchronize_outputs()
    return run


def median_ms(fn, runs: int, warmup: int = 3, sync=None) -> float:
    for _ in range(warmup):
        fn()
    if sync:
        sync()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        if sync:
            sync()
        times.append(time.perf_counter() - t0)
    return float(np.median(times) * 1e3)


def time_model(entry: dict, seqs, batches, runs: int, lxt: bool, log) -> list[dict]:
    torch_side = None
    if lxt:
        import torch

        from tools import bench

        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        torch_side = bench.TorchSide(entry["spec"], entry["paths"]["hf_dir"], "attnlrp", threads=os.cpu_count() or 1,
                                     plain=False, lxt=True)
        torch_side.lxt.to(DEVICE["torch"])
    rows = []
    for seq in seqs:
        for batch in batches:
            feed = example_feed(entry, batch, seq)
            row = {"model": entry["name"], "seq": seq, "batch": batch}
            row["ort_forward_ms"] = median_ms(ort_cuda_runner(entry["onnx"], feed), runs)
            row["ort_explain_ms"] = median_ms(ort_cuda_runner(entry["converted"], feed), runs)
            if torch_side is not None:
                import torch

                tensors = {k: torch.from_numpy(v).to(DEVICE["torch"]) for k, v in feed.items()}
                sync = torch.cuda.synchronize if DEVICE["torch"] == "cuda" else None
                row["lxt_ms"] = median_ms(lambda: torch_side.explain(tensors), runs, sync=sync)
            row["explain_over_forward"] = row["ort_explain_ms"] / row["ort_forward_ms"]
            if "lxt_ms" in row:
                row["throughput_over_lxt"] = row["lxt_ms"] / row["ort_explain_ms"]
            log(f"  {entry['name']} {seq}x{batch}: forward {row['ort_forward_ms']:.2f} ms, explain "
                f"{row['ort_explain_ms']:.2f} ms" + (f", LXT {row['lxt_ms']:.2f} ms" if "lxt_ms" in row else ""))
            rows.append(row)
    return rows


# --------------------------------------------------------------------------- main


def gpu_name() -> str:
    try:
        import subprocess

        return subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=20).stdout.strip() or "?"
    except Exception:  # noqa: BLE001
        return "?"


def print_table(checks: list[dict], timings: list[dict], env: dict) -> None:
    print(f"\nCUDA check | GPU {env['gpu']} | onnxruntime {env['onnxruntime']} | torch {env.get('torch', '-')} | TF32 off")
    print(f"{'model':<22}{'static':>9}{'on CPU':>8}{'max rel':>10}{'rel L2':>10}{'cosine':>10}  ok")
    for c in checks:
        print(f"{c['model']:<22}{len(c['static_fallbacks']):>9}{len(c['ran_on_cpu']):>8}{c['max_rel_diff']:>10.1e}"
              f"{c['rel_l2']:>10.1e}{c['cosine']:>10.6f}  {'yes' if c['ok_relevance'] else 'NO'}")
    print(f"\n{'model':<22}{'TRT parser: unsupported nodes':>31}  TensorRT run (onnxruntime's TensorrtExecutionProvider)")
    for c in checks:
        trt = c.get("tensorrt", {})
        run = (f"rel L2 {trt['rel_l2']:.1e}, cosine {trt['cosine']:.6f} {'ok' if trt['ok'] else 'FAIL'}"
               if trt.get("status") == "ran" else trt.get("error", trt.get("status", "-")))
        print(f"{c['model']:<22}{len(c.get('tensorrt_static_unsupported', [])):>31}  {run}")
    if timings:
        print(f"\n{'model':<22}{'seq x batch':>12}{'ORT fwd ms':>12}{'explain ms':>12}{'LXT ms':>10}"
              f"{'expl/fwd':>10}{'LXT/expl':>10}")
        for r in timings:
            lxt = f"{r['lxt_ms']:.2f}" if "lxt_ms" in r else "-"
            thr = f"{r['throughput_over_lxt']:.2f}x" if "throughput_over_lxt" in r else "-"
            print(f"{r['model']:<22}{str(r['seq']) + ' x ' + str(r['batch']):>12}{r['ort_forward_ms']:>12.2f}"
                  f"{r['ort_explain_ms']:>12.2f}{lxt:>10}{r['explain_over_forward']:>9.2f}x{thr:>10}")
        print("(medians with IO binding; LXT/expl = LXT time / explain time = explain's throughput relative to LXT)")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.cuda_check", description=__doc__.splitlines()[0])
    p.add_argument("--seq", default="128,512", help="sequence lengths to time (default 128,512)")
    p.add_argument("--batch", default="1,8", help="batch sizes to time (default 1,8)")
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--no-real", action="store_true", help="tiny models only (no MiniLM / SmolLM2)")
    p.add_argument("--no-lxt", action="store_true", help="do not time LXT")
    p.add_argument("--cache", default=str(REPO_ROOT / "build" / "bench"), help="real-model export cache")
    p.add_argument("--workdir", default=str(REPO_ROOT / "build" / "cuda_check"))
    p.add_argument("--json", help="write every number here")
    p.add_argument("--dry-run-on-cpu", action="store_true", help=argparse.SUPPRESS)  # exercises this script
    args = p.parse_args(argv)

    import onnxruntime as ort

    if args.dry_run_on_cpu:
        DEVICE.update(ort="cpu", torch="cpu")
    elif not cuda_available():
        print(f"cuda_check: onnxruntime {ort.__version__} has no CUDAExecutionProvider (available: "
              f"{', '.join(ort.get_available_providers())}); install onnxruntime-gpu on a machine with an NVIDIA GPU",
              file=sys.stderr)
        return 3

    def log(msg):
        print(msg, flush=True)

    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    entries = tiny_models(workdir, log) + ([] if args.no_real else real_models(Path(args.cache), log))
    checks = [check_model(e, workdir, log) for e in entries]
    timings = []
    lxt = not args.no_lxt
    if lxt:
        try:
            import torch

            lxt = torch.cuda.is_available() or args.dry_run_on_cpu
            if not lxt:
                log("PyTorch has no CUDA: LXT not timed")
        except ImportError:
            lxt = False
    for e in entries:
        if e["kind"] == "real":
            timings += time_model(e, [int(s) for s in args.seq.split(",")], [int(b) for b in args.batch.split(",")],
                                  args.runs, lxt, log)
    env = {"gpu": gpu_name(), "onnxruntime": ort.__version__, "python": platform.python_version()}
    if "torch" in sys.modules:
        env["torch"] = sys.modules["torch"].__version__
    print_table(checks, timings, env)
    ok = all(c["ok_relevance"] and not c["static_fallbacks"] for c in checks)
    ok = ok and all(c["tensorrt"].get("ok", False) for c in checks if c["tensorrt"]["status"] in ("ran", "error"))
    unexpected_cpu = [(c["model"], n) for c in checks for n in c["ran_on_cpu"] if not n.startswith("lrp/lrp_")]
    if unexpected_cpu and DEVICE["ort"] == "cuda":
        print(f"{len(unexpected_cpu)} nodes ran on the CPU (onnxruntime's CUDA provider places small int64 shape "
              f"computations there on purpose; a float node here is worth a look): {unexpected_cpu[:12]}")
    if args.json:
        Path(args.json).write_text(json.dumps({"env": env, "checks": checks, "timings": timings}, indent=1, default=str))
    print("all checks passed" if ok else "SOME CHECKS FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
