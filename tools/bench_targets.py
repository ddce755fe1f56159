"""Benchmark: K targets of one sequence in one run (convert --multi-target) vs K single-target runs vs LXT.

    python -m tools.bench_targets [--model-dir build/smollm2] [--seq 128] [--targets 16] [--runs 3]
                                  [--threads 2] [--rules attnlrp]

SmolLM2-135M (all 30 layers; exported with `python -m models.smollm2 --out build/smollm2` if the folder
is missing), one --seq-token sequence (tools/bench.py's passage), the argmax at each of the last K positions:

  multi        onnxruntime, the model converted with multi_target=True, relevance_only=True: ONE run with
               lrp_position [[S-K .. S-1]] (forward once, K backward passes in the graph's Loop)
  single       onnxruntime, the model converted with relevance_only=True: K runs, one position each
  single_batch the same single-target model, ONE run of a batch of K copies (the forward runs K times)
  lxt          LXT (attnLRP patches) in PyTorch: ONE forward, K backward passes with retain_graph=True

Every method runs in its own process (one at a time, so no thread pool spins while another method is
timed), with --threads threads (ORT intra-op threads, torch.set_num_threads), 1 warm-up then --runs
timed repetitions (the median is reported). Before timing, each child's K token-relevance rows are
written out and compared with the multi run's (relative L2). Figures are indicative on a shared machine.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

METHODS = ("multi", "single", "single_batch", "lxt")
TAG = "BENCH_TARGETS_JSON "


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def ensure_model(model_dir: Path) -> dict:
    paths = {"onnx": model_dir / "model.onnx", "tokenizer": model_dir / "tokenizer.json", "hf_dir": model_dir / "hf"}
    if not all(p.exists() for p in paths.values()):
        from models import smollm2
        smollm2.export(model_dir, log=print)
    return paths


def converted(paths: dict, rules: str, multi: bool) -> Path:
    import lrp_onnx

    out = paths["onnx"].parent / f"model.{rules}.ro{'.multi' if multi else ''}.onnx"
    if not out.exists():
        start = time.perf_counter()
        lrp_onnx.convert(paths["onnx"], out, rules=rules, relevance_only=True, multi_target=multi)
        print(f"converted {out.name} in {time.perf_counter() - start:.1f} s", flush=True)
    return out


def child(args) -> None:
    from tools.bench import MODELS, TorchSide, make_inputs, session_options

    paths = ensure_model(Path(args.model_dir))
    inputs = make_inputs(MODELS["smollm2"], paths["tokenizer"], args.seq, 1)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    k, s = args.targets, args.seq
    positions = np.arange(s - k, s, dtype=np.int64)
    if args.child in ("multi", "single", "single_batch"):
        import onnxruntime as ort

        path = converted(paths, args.rules, args.child == "multi")
        session = ort.InferenceSession(str(path), session_options(args.threads), providers=["CPUExecutionProvider"])
        names = [o.name for o in session.get_outputs()]
        if args.child == "multi":
            def run():
                out = dict(zip(names, session.run(None, {"input_ids": ids, "attention_mask": mask,
                                                        "lrp_position": positions[None]})))
                return out["lrp_relevance"][0].sum(-1)
        elif args.child == "single":
            def run():
                rows = []
                for p in positions:
                    out = dict(zip(names, session.run(None, {"input_ids": ids, "attention_mask": mask,
                                                            "lrp_position": np.array([p])})))
                    rows.append(out["lrp_relevance"][0].sum(-1))
                return np.stack(rows)
        else:
            def run():
                out = dict(zip(names, session.run(None, {"input_ids": np.repeat(ids, k, 0),
                                                        "attention_mask": np.repeat(mask, k, 0),
                                                        "lrp_position": positions})))
                return out["lrp_relevance"].sum(-1)
    else:
        from tools.bench import MODELS as SPECS

        side = TorchSide(SPECS["smollm2"], paths["hf_dir"], args.rules, args.threads, plain=False, lxt=True)
        torch, model = side.torch, side.lxt
        t_ids, t_mask = torch.from_numpy(ids), torch.from_numpy(mask)

        def run():
            embeds = model.get_input_embeddings()(t_ids).detach().requires_grad_()
            logits = model(inputs_embeds=embeds, attention_mask=t_mask, return_dict=False)[0]
            rows = []
            for j, p in enumerate(positions):
                explained = logits[0, p].max()
                explained.backward(retain_graph=j < k - 1)
                with torch.no_grad():
                    rows.append((embeds * embeds.grad)[0].sum(-1).numpy().copy())
                embeds.grad = None
            return np.stack(rows)
    relevance = run()  # warm-up, and the rows compared across methods
    np.save(args.rows, relevance)
    times = []
    for _ in range(args.runs):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    print(TAG + json.dumps({"method": args.child, "times_s": times}), flush=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", default=str(REPO_ROOT / "build" / "smollm2"))
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--targets", type=int, default=16)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rules", default="attnlrp")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--child", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--rows", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child(args)
    paths = ensure_model(Path(args.model_dir))
    for multi in (False, True):  # convert before timing anything
        converted(paths, args.rules, multi)
    results, rows = {}, {}
    out_dir = Path(args.model_dir)
    for method in args.methods.split(","):
        rows_path = out_dir / f"bench_targets.{method}.npy"
        cmd = [sys.executable, "-m", "tools.bench_targets", "--child", method, "--rows", str(rows_path),
               "--model-dir", args.model_dir, "--seq", str(args.seq), "--targets", str(args.targets),
               "--runs", str(args.runs), "--threads", str(args.threads), "--rules", args.rules]
        done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO_ROOT)
        line = next((x for x in done.stdout.splitlines() if x.startswith(TAG)), None)
        if done.returncode != 0 or line is None:
            sys.exit(f"{method} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
        results[method] = statistics.median(json.loads(line[len(TAG):])["times_s"])
        rows[method] = np.load(rows_path)
        print(f"{method:<13} median {results[method]:8.2f} s", flush=True)
    summary = {"cpu": cpu_model(), "cores": os.cpu_count(), "threads": args.threads, "seq": args.seq,
               "targets": args.targets, "rules": args.rules, "runs": args.runs, "median_s": results}
    if "multi" in rows:
        summary["rel_l2_vs_multi"] = {m: float(np.linalg.norm(r - rows["multi"]) / np.linalg.norm(r))
                                      for m, r in rows.items() if m != "multi"}
    if "multi" in results:
        summary["multi_over"] = {m: results["multi"] / t for m, t in results.items() if m != "multi"}
    print(f"CPU: {summary['cpu']} ({summary['cores']} cores visible, {args.threads} threads per method)")
    print(f"SmolLM2-135M (30 layers), {args.seq} tokens, K = {args.targets} targets, {args.rules}, "
          f"relevance-only; median of {args.runs} runs")
    for m, t in results.items():
        ratio = f"  multi / {m} = {summary['multi_over'][m]:.2f}" if m != "multi" and "multi_over" in summary else ""
        print(f"  {m:<13} {t:8.2f} s{ratio}")
    for m, e in summary.get("rel_l2_vs_multi", {}).items():
        print(f"  token relevance, rel. L2 of {m} vs multi: {e:.1e}")
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
