"""The scale ladder (issue 21, goals 4 and 7): random-weight LLaMA models in onnxruntime-genai's int4 CPU
layout (models/llama_int4.py) at 1B, 3B and 7B, converted and explained on this machine.

    python -m tools.bench_ladder --sizes 1b --seqs 128,512                 # the default grid of one size
    python -m tools.bench_ladder --cells forward:7b:512 explain:7b:512:relevance_only+lean
    python -m tools.bench_ladder --table                                   # markdown from the results file

Every cell runs in its OWN process (``python -m tools.bench_ladder --child CELL``); the parent reads the
child's peak RSS twice: the child's own VmHWM (reported in its JSON) and ``os.wait4``'s ru_maxrss (the
same figure /usr/bin/time prints). A watchdog polls the child's VmRSS and kills it above --max-rss-gb
(default 14) so that a cell that would not fit never drives the shared machine into swap / OOM: such a
cell is recorded as "killed above N GB". Results are appended, one JSON line a cell, to --results
(default build/ladder/results.jsonl); --table prints the markdown table of the latest line of each cell.

Cells (``kind:size[:arg[:variant]]``):

  write:SIZE                    models.llama_int4 writes SIZE (time, peak): skipped if the file exists
  convert:SIZE:VARIANT          lrp_onnx.convert (attnlrp) to build/ladder/SIZE/model.VARIANT.lrp.onnx
  forward:SIZE:SEQ[:prepack]    onnxruntime session of the original model (default session options, 2
                                threads; `noprepack` turns weight pre-packing off as Explainer does),
                                batch 1, SEQ random ids, empty past_key_values: session time, run time
  explain:SIZE:SEQ:VARIANT[:prepack]
                                lrp_onnx.Explainer(converted model, threads=2).run(input_ids, mask):
                                session time, run time, relevance finite / shape / sum; the explained
                                logit and, for `full`, the largest last-position logit, to compare with the
                                forward cell's (Explainer's default pre-packing: on for MatMulNBits models;
                                `prepack` / `noprepack` force it)
  multi:SIZE:SEQ                the multi_target conversion explaining 16 targets at the last 16 positions
                                in one run
  generate:SIZE:N               lrp_onnx.explain_generation(multi_target Explainer, 32-token prompt, N tokens):
                                what `lrp-onnx explain --generate N` runs (greedy decoding with the
                                converted model's forward, no cache; then one multi-target explanation),
                                without the tokenizer. (--decoder model.onnx, decoding with the builder's
                                KV cache, is refused: the builder declares the cache's head axis as the
                                symbolic 'kv_cache_dim', so no empty cache can be made.)
  lxt:SIZE:SEQ[:bf16]           LXT 2.1 attnLRP in PyTorch (fp32, or bf16 parameters and activations;
                                random LlamaForCausalLM of the same shape, parameters frozen): forward +
                                backward to the embeddings

VARIANT: `full` (relevance and the original outputs), `relevance_only`, `lean` (--memory lean),
`relevance_only+lean`, `multi_target`. The tied (LLaMA-3.2) layouts embed with GatherBlockQuantized;
where the converter finds no source by default, that node's output (the one reading input_ids) is given
as the source (recorded in the cell's "source").

Timing: wall and process CPU seconds (all threads, time.process_time) of each run. On a machine shared
with other jobs (this one ran at a load average of 11-17 on 2 cores) the wall figures measure the
contention as much as the work; the CPU seconds are the steadier figure for explain/forward (onnxruntime's
spinning worker threads count in both). --runs timed runs after --warmup (defaults 3 and 1 at 1B, 1 and 0 above: a 7B explain at 512
tokens takes minutes on 2 cores); the median is reported. explain/forward in the table is the run-time
ratio against the `forward:SIZE:SEQ` cell (default session options).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

BUILD = REPO_ROOT / "build" / "ladder"
VARIANTS = {"full": {}, "relevance_only": {"relevance_only": True}, "lean": {"memory": "lean"},
            "relevance_only+lean": {"relevance_only": True, "memory": "lean"}, "multi_target": {"multi_target": True}}
THREADS = 2
GEN_PROMPT = 32
MULTI_K = 16


# --------------------------------------------------------------------------- child side

def _status(key: str) -> float | None:
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024.0
    return None


def model_path(size: str) -> Path:
    return BUILD / size / "model.onnx"


def converted_path(size: str, variant: str) -> Path:
    return BUILD / size / f"model.{variant}.lrp.onnx"


def _ids(size: str, seq: int) -> np.ndarray:
    from models.llama_int4 import SHAPES

    return np.random.default_rng(seq).integers(0, SHAPES[size].vocab, (1, seq), dtype=np.int64)


def _source(size: str) -> list[str] | None:
    """The output of a GatherBlockQuantized that reads input_ids (the tied int4 embedding), if any."""
    import onnx

    model = onnx.load(str(model_path(size)), load_external_data=False)
    found = [n.output[0] for n in model.graph.node if n.op_type == "GatherBlockQuantized" and n.input[1] == "input_ids"]
    return found or None


CPU_TIMES: list[float] = []  # process CPU seconds (all threads) of each timed run


def _timed(fn, runs: int, warmup: int) -> tuple[list[float], object]:
    result = None
    for _ in range(warmup):
        result = fn()
    times = []
    for _ in range(runs):
        start, cpu = time.perf_counter(), time.process_time()
        result = fn()
        times.append(time.perf_counter() - start)
        CPU_TIMES.append(time.process_time() - cpu)
    return times, result


def child(cell: str, runs: int, warmup: int) -> dict:
    kind, size, *rest = cell.split(":")
    out: dict = {}
    if kind == "write":
        from models import llama_int4

        path = model_path(size)
        start = time.perf_counter()
        if not path.exists():
            llama_int4.write(path.parent, size)
            out["write_s"] = time.perf_counter() - start
        out["file_gb"] = (path.stat().st_size + Path(f"{path}.data").stat().st_size) / 1e9
    elif kind == "convert":
        import lrp_onnx

        variant = rest[0]
        kwargs = dict(VARIANTS[variant])
        dst = converted_path(size, variant)
        start = time.perf_counter()
        try:
            lrp_onnx.convert(str(model_path(size)), str(dst), rules="attnlrp", **kwargs)
        except lrp_onnx.LRPError as exc:  # a converter that does not take GatherBlockQuantized as a source
            if "no relevance source" not in str(exc) or not _source(size):
                raise
            out["source"] = kwargs["source"] = _source(size)
            start = time.perf_counter()
            lrp_onnx.convert(str(model_path(size)), str(dst), rules="attnlrp", **kwargs)
        out["convert_s"] = time.perf_counter() - start
        out["written_mb"] = sum(p.stat().st_size for p in dst.parent.glob(dst.name + "*")) / 1e6
    elif kind == "forward":
        import onnxruntime as ort

        from models.llama_int4 import past_inputs

        seq = int(rest[0])
        options = ort.SessionOptions()
        options.intra_op_num_threads = THREADS
        if rest[1:] == ["noprepack"]:
            options.add_session_config_entry("session.disable_prepacking", "1")
        start, cpu = time.perf_counter(), time.process_time()
        session = ort.InferenceSession(str(model_path(size)), options, providers=["CPUExecutionProvider"])
        out["session_s"], out["session_cpu_s"] = time.perf_counter() - start, time.process_time() - cpu
        out["session_rss_mb"] = _status("VmRSS")
        ids = _ids(size, seq)
        feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), **past_inputs(size)}
        times, result = _timed(lambda: session.run(["logits"], feeds)[0], runs, warmup)
        out.update(run_s=statistics.median(times), runs_s=times, logit_last_max=float(result[0, -1].max()),
                   finite=bool(np.isfinite(result).all()))
    elif kind in ("explain", "multi"):
        import lrp_onnx

        seq = int(rest[0])
        variant = rest[1] if kind == "explain" else "multi_target"
        start, cpu = time.perf_counter(), time.process_time()
        explainer = lrp_onnx.Explainer(str(converted_path(size, variant)), threads=THREADS,
                                       providers=["CPUExecutionProvider"],
                                       prepack=True if "prepack" in rest[2:] else False if "noprepack" in rest[2:] else None)
        out["session_s"], out["session_cpu_s"] = time.perf_counter() - start, time.process_time() - cpu
        out["session_rss_mb"] = _status("VmRSS")
        ids = _ids(size, seq)
        kwargs = {}
        if kind == "multi":
            positions = np.arange(seq - MULTI_K, seq, dtype=np.int64)[None]
            kwargs = dict(position=positions, target=ids[:, -MULTI_K:])  # next-token-like targets
        times, result = _timed(lambda: explainer.run(input_ids=ids, attention_mask=np.ones_like(ids), **kwargs),
                               runs, warmup)
        rel = np.asarray(result.relevance)
        out.update(run_s=statistics.median(times), runs_s=times, relevance_shape=list(rel.shape),
                   finite=bool(np.isfinite(rel).all()), relevance_sum=float(rel.sum()),
                   logit=np.asarray(result.logit).ravel()[:4].tolist())
        if "logits" in result.outputs:  # the original output (`full`): the forward cell's logit_last_max
            out["logit_last_max"] = float(np.asarray(result.outputs["logits"])[0, -1].max())
    elif kind == "generate":
        import lrp_onnx
        from lrp_onnx.run.generation import explain_generation

        n = int(rest[0])
        start = time.perf_counter()
        explainer = lrp_onnx.Explainer(str(converted_path(size, "multi_target")), threads=THREADS,
                                       providers=["CPUExecutionProvider"])
        out["session_s"] = time.perf_counter() - start
        prompt = _ids(size, GEN_PROMPT)[0]
        start, cpu = time.perf_counter(), time.process_time()
        g = explain_generation(explainer, prompt, n, eos_token_id=[])  # decodes with the converted model's forward
        CPU_TIMES.append(time.process_time() - cpu)
        out.update(run_s=time.perf_counter() - start, generated=len(g.generated_ids),
                   relevance_shape=list(g.relevance.shape), finite=bool(np.isfinite(g.relevance).all()))
    elif kind == "lxt":
        out.update(_lxt(size, int(rest[0]), runs, warmup, dtype=rest[1] if len(rest) > 1 else "fp32"))
    else:
        raise SystemExit(f"unknown cell kind {kind!r}")
    out["vmhwm_mb"] = _status("VmHWM")
    if CPU_TIMES:
        out["run_cpu_s"] = statistics.median(CPU_TIMES)
    return out


def _lxt(size: str, seq: int, runs: int, warmup: int, dtype: str = "fp32") -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from models.llama_int4 import SHAPES
    from tests import reference

    torch.set_num_threads(THREADS)
    s = SHAPES[size]
    reference.patch_classes("llama", "attnlrp")
    config = LlamaConfig(vocab_size=s.vocab, hidden_size=s.hidden, num_hidden_layers=s.layers,
                         num_attention_heads=s.heads, num_key_value_heads=s.kv_heads, intermediate_size=s.intermediate,
                         max_position_embeddings=s.max_positions, rope_theta=s.rope_theta, rms_norm_eps=s.eps,
                         tie_word_embeddings=s.tied, use_cache=False)
    config._attn_implementation = "eager"
    if dtype not in ("fp32", "bf16"):
        raise SystemExit(f"lxt cell: dtype {dtype!r} (fp32 or bf16)")
    start = time.perf_counter()
    # bf16: the parameters are created in bf16 (a 7B model initialised in fp32 first would not fit)
    torch.set_default_dtype(torch.bfloat16 if dtype == "bf16" else torch.float32)
    with torch.no_grad():
        model = LlamaForCausalLM(config).eval()
    torch.set_default_dtype(torch.float32)
    load_s = time.perf_counter() - start
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    ids = torch.from_numpy(_ids(size, seq))
    mask = torch.ones_like(ids)

    def explain():
        embeds = model.get_input_embeddings()(ids).detach().requires_grad_()
        logits = model(inputs_embeds=embeds, attention_mask=mask, return_dict=False)[0]
        explained = logits[0, -1].max()
        explained.backward()
        return (embeds * embeds.grad).detach()

    times, rel = _timed(explain, runs, warmup)
    return dict(session_s=load_s, run_s=statistics.median(times), runs_s=times, relevance_shape=list(rel.shape),
                finite=bool(torch.isfinite(rel).all()))


# --------------------------------------------------------------------------- parent side

def run_cell(cell: str, runs: int, warmup: int, max_rss_gb: float, timeout: float, log=print) -> dict:
    with tempfile.NamedTemporaryFile("r", suffix=".json", delete=False) as handle:
        result_path = handle.name
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS=str(THREADS))
    cmd = [sys.executable, "-m", "tools.bench_ladder", "--child", cell, "--runs", str(runs), "--warmup", str(warmup),
           "--child-out", result_path]
    load_before = os.getloadavg()[0]  # the shared machine's 1-minute load average (2 cores)
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=str(REPO_ROOT), env=env)
    killed: dict = {}

    def watch():
        limit = max_rss_gb * 1024
        while proc.poll() is None:
            with contextlib.suppress(OSError, ValueError):
                for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:") and int(line.split()[1]) / 1024 > limit:
                        killed["rss_mb"] = int(line.split()[1]) / 1024
                        proc.kill()
            if time.perf_counter() - start > timeout:
                killed["timeout_s"] = timeout
                proc.kill()
            time.sleep(0.2)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    watcher.join()
    row = {"cell": cell, "wall_s": time.perf_counter() - start, "rc": proc.returncode, "load_before": load_before,
           "load_after": os.getloadavg()[0],
           "maxrss_mb": usage.ru_maxrss / 1024, "child_cpu_s": usage.ru_utime + usage.ru_stime, "time": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())}
    with contextlib.suppress(OSError, ValueError):
        row.update(json.loads(Path(result_path).read_text() or "{}"))
    os.unlink(result_path)
    if killed:
        row["killed"] = killed
    log(json.dumps(row))
    return row


def default_cells(sizes: list[str], seqs: list[int], lxt: bool) -> list[str]:
    cells = []
    for size in sizes:
        cells.append(f"write:{size}")
        variants = ["full", "relevance_only", "lean", "relevance_only+lean"] + (["multi_target"] if size == "1b" else [])
        cells += [f"convert:{size}:{v}" for v in variants]
        for seq in seqs:
            cells.append(f"forward:{size}:{seq}")
            if size == "1b":
                cells.append(f"forward:{size}:{seq}:noprepack")
            cells += [f"explain:{size}:{seq}:{v}" for v in variants if v != "multi_target"]
            if lxt and size == "1b":
                cells.append(f"lxt:{size}:{seq}")
        if size == "1b":
            cells += [f"multi:{size}:128", f"generate:{size}:16"]
    return cells


def _fmt(row: dict | None, key: str, scale: float = 1.0, digits: int = 1) -> str:
    if row is None:
        return "–"
    if row.get("killed"):
        k = row["killed"]
        return f"killed > {k['rss_mb'] / 1024:.0f} GB" if "rss_mb" in k else f"> {k['timeout_s']:.0f} s"
    if row.get("rc"):
        return f"failed (rc {row['rc']})"
    value = row.get(key)
    return "–" if value is None else f"{value * scale:.{digits}f}"


def table(results: list[Path]) -> str:
    """Markdown: the latest row of each cell across the results files, in order of first appearance."""
    rows: dict[str, dict] = {}
    for path in results:
        for line in path.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                rows[row["cell"]] = row
    lines = ["| model | cell | session or convert s | run s (wall) | run CPU s | peak GB (VmHWM) | load | "
             "explain/forward wall | explain/forward CPU |", "|---|---|---|---|---|---|---|---|---|"]
    for cell, row in rows.items():
        kind, size, *rest = cell.split(":")
        wall = cpu = "–"
        if kind in ("explain", "multi", "lxt") and not row.get("rc") and not row.get("killed"):
            fwd = rows.get(f"forward:{size}:{rest[0]}")
            if fwd and fwd.get("run_s") and row.get("run_s"):
                wall = f"{row['run_s'] / fwd['run_s']:.2f}"
            if fwd and fwd.get("run_cpu_s") and row.get("run_cpu_s"):
                cpu = f"{row['run_cpu_s'] / fwd['run_cpu_s']:.2f}"
        first = {"convert": "convert_s", "write": "write_s"}.get(kind, "session_s")
        peak = None if row.get("vmhwm_mb") is None else {**row, "peak": row["vmhwm_mb"] / 1024}
        peak_text = _fmt(peak, "peak", digits=2) if peak else _fmt(row, "none")
        load = f"{row.get('load_before', 0):.0f}–{row.get('load_after', 0):.0f}" if "load_before" in row else "–"
        lines.append(f"| {size} | {':'.join([kind, *rest])} | {_fmt(row, first)} | {_fmt(row, 'run_s', digits=1)} | "
                     f"{_fmt(row, 'run_cpu_s', digits=1)} | {peak_text} | {load} | {wall} | {cpu} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1b")
    parser.add_argument("--seqs", default="128,512")
    parser.add_argument("--cells", nargs="*", help="explicit cells (see the module docstring)")
    parser.add_argument("--lxt", action="store_true", help="add the LXT cells to the default grid (1B)")
    parser.add_argument("--runs", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--max-rss-gb", type=float, default=14.0)
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per cell")
    parser.add_argument("--results", default=str(BUILD / "results.jsonl"), help="results file (--table: several, comma-separated)")
    parser.add_argument("--table", action="store_true")
    parser.add_argument("--child")
    parser.add_argument("--child-out")
    args = parser.parse_args(argv)
    if args.child:
        result = child(args.child, args.runs, args.warmup)
        Path(args.child_out).write_text(json.dumps(result))
        return
    results = Path(args.results)
    if args.table:
        print(table([Path(p) for p in args.results.split(",")]))
        return
    from tools.bench import cpu_line

    import onnxruntime

    print(f"{cpu_line()}; onnxruntime {onnxruntime.__version__}; {THREADS} threads", flush=True)
    cells = args.cells or default_cells(args.sizes.split(","), [int(s) for s in args.seqs.split(",")], args.lxt)
    results.parent.mkdir(parents=True, exist_ok=True)
    for cell in cells:
        big = cell.split(":")[1] != "1b"
        runs = args.runs if args.runs is not None else (1 if big else 3)
        warmup = args.warmup if args.warmup is not None else (0 if big else 1)
        if cell.startswith(("write", "convert", "generate")):
            runs, warmup = 1, 0
        row = run_cell(cell, runs, warmup, args.max_rss_gb, args.timeout)
        with results.open("a") as handle:
            handle.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
