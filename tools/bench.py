"""Benchmark: explaining a real model with the converted ONNX graph (onnxruntime) vs LXT (PyTorch).

    python -m tools.bench --model smollm2|minilm --seq 128 --batch 1 [--layers N] [--runs 20]
                          [--threads 2] [--rules attnlrp] [--json out.json] [--profile N]
    python -m tools.bench --all [--layers N] [--runs R] ...   # smollm2, minilm x seq 128, 512 x batch 1, 8
    python -m tools.bench --scaling                           # conversion time of SmolLM2 at 2, 8, 30 layers

For one model / sequence length / batch it times, each method in its OWN fresh process (so that no
other session's spinning thread pool competes for the cores: on a small machine an idle onnxruntime
or OpenMP pool in the same process distorts both figures), --rounds rounds (default 3) with the order
rotating from round to round, --warmup runs then --runs timed runs per process:

  ort_forward            onnxruntime, the original exported graph (forward only)
  ort_explain_full       onnxruntime, the converted graph, relevance_only=False (outputs + relevance)
  ort_explain_relevance  onnxruntime, the converted graph, relevance_only=True (relevance only; an LM's
                         head runs at the explained position only)
  lxt                    LXT 2.1 in PyTorch: word embeddings (requires_grad) -> forward -> explained
                         logit -> backward -> inputs_embeds * grad (parameters frozen, as LXT's
                         quickstart does, so no weight gradients are computed: the same work as ORT)
  torch_forward          plain (unpatched) PyTorch forward under torch.no_grad, for reference

All ORT sessions share the same options: CPUExecutionProvider, intra_op_num_threads=--threads,
ORT_ENABLE_ALL, weight pre-packing off (as lrp_onnx.Explainer), onnxruntime's defaults otherwise
(spinning on) unless --ort-options says otherwise. PyTorch runs with torch.set_num_threads(--threads).
Peak memory is the VmHWM of each timing process (one method each), median over the rounds. Every
table names the CPU model and its AVX-512 / AMX flags: the ratio to LXT depends on the CPU. On a
machine shared with other jobs the absolute figures are noisy; the ratios of one round (measured
back to back) are indicative, and the per-round ratios are printed.

Inputs: a fixed English passage, tokenized with the exported tokenizer.json (no truncation) and
repeated to exactly --seq tokens (MiniLM: [CLS] ... [SEP] included); batch rows start at different
offsets of the passage (no padding). Target: the argmax logit at the last position (SmolLM2) / the
argmax embedding dimension (MiniLM), per row -- the converted graph's defaults
(lrp_target = lrp_position = -1). Before timing, the ORT relevances are checked against LXT's (and
LXT's timed function against tests/reference.py's compute_relevance) so that the table compares
equal work.

Models are exported once into --cache (default build/bench/<model>-<full|LN>/) and reused; the
converted graphs are re-converted on every run (that is the conversion time reported).

Time on 2 cores (quiet machine, older one-process timing: 20 runs, 3 memory children per method): a smollm2 (30
layers) 128x1 cell takes ~ 3 min, 512x1 and 128x8 ~ 6-8 min each, 512x8 ~ 25-30 min (one
interleaved iteration of the five methods ~ 45 s); minilm cells take 1-5 min. The full --all grid
is about 1 h; ``--all --layers 2 --runs 3 --no-memory`` took 9 min. Add --no-memory or lower
--runs to shorten it.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import platform
import resource
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@dataclass(frozen=True)
class ModelSpec:
    name: str
    title: str
    family: str        # tests/reference.py family (LXT patch map)
    module: str        # export recipe
    full_layers: int
    language_model: bool


MODELS = {
    "smollm2": ModelSpec("smollm2", "SmolLM2-135M", "llama", "models.smollm2", 30, True),
    "minilm": ModelSpec("minilm", "all-MiniLM-L6-v2", "bert", "models.minilm", 6, False),
}
METHODS = ("ort_forward", "ort_explain_full", "ort_explain_relevance", "lxt", "torch_forward")
LABELS = {
    "ort_forward": "ORT forward (original graph)",
    "ort_explain_full": "ORT explain, full (outputs + relevance)",
    "ort_explain_relevance": "ORT explain, relevance-only",
    "lxt": "LXT attnLRP (PyTorch fwd + bwd)",
    "torch_forward": "PyTorch forward (no_grad)",
}
CONVERTED = {"ort_explain_full": False, "ort_explain_relevance": True}  # method -> relevance_only
RULES = ("attnlrp", "cp-lrp", "gradient")
GRID = [(model, seq, batch) for model in ("smollm2", "minilm") for seq in (128, 512) for batch in (1, 8)]
MEMORY_TAG = "BENCH_MEMORY_JSON "

PASSAGE = (
    "The river rises in the hills to the east of the city and winds through a broad valley of farms, "
    "orchards and small villages before it reaches the old harbour. For centuries the town lived from "
    "the water: boats carried grain, wool and timber downstream, and the mills along the banks ground "
    "flour for the whole region. When the railway arrived in the nineteenth century, the harbour lost "
    "much of its trade, and many of the warehouses stood empty for decades. Today the quays are lined "
    "with cafes, a market is held every Saturday, and a museum in the former customs house tells the "
    "story of the people who built, sailed and repaired the boats. Visitors can walk along the towpath "
    "to the lock, where a keeper still opens the gates by hand, or take a ferry to the island in the "
    "middle of the stream, famous for its birds and its ancient oak trees. In spring the meadows flood, "
    "and in winter fog often hides the bridges until noon. Scientists at the nearby university measure "
    "the level, temperature and clarity of the water every day, and their records, which go back more "
    "than one hundred years, show how the climate of the valley has slowly changed. "
)


# --------------------------------------------------------------------------- files


def layers_key(spec: ModelSpec, layers: int | None) -> int | None:
    """None for the full depth (also when --layers is the full depth or more)."""
    return None if layers is None or layers >= spec.full_layers else int(layers)


def model_dir(cache: Path, spec: ModelSpec, layers: int | None) -> Path:
    key = layers_key(spec, layers)
    return Path(cache) / f"{spec.name}-{'full' if key is None else f'L{key}'}"


def ensure_export(spec: ModelSpec, layers: int | None, cache: Path, log=print) -> dict[str, Path]:
    """Export the model once into the cache (``.export-ok`` marks a complete export); reuse it after."""
    out = model_dir(cache, spec, layers)
    marker = out / ".export-ok"
    paths = {"out_dir": out, "onnx": out / "model.onnx", "tokenizer": out / "tokenizer.json", "hf_dir": out / "hf"}
    if marker.exists() and all(p.exists() for p in paths.values()):
        return paths
    log(f"exporting {spec.title} ({'all' if layers_key(spec, layers) is None else layers} layers) to {out} ...")
    start = time.perf_counter()
    recipe = importlib.import_module(spec.module)
    recipe.export(out, num_layers=layers_key(spec, layers), log=log)
    marker.write_text(json.dumps({"model": spec.name, "layers": layers_key(spec, layers),
                                  "seconds": time.perf_counter() - start}))
    return paths


MEMORY_MODE = {"mode": "fast"}  # --memory: the conversion option memory="fast" | "lean"


def converted_path(paths: dict, rules: str, method: str) -> Path:
    mode = "relevance" if CONVERTED[method] else "full"
    lean = ".lean" if MEMORY_MODE["mode"] == "lean" else ""
    return Path(paths["out_dir"]) / f"model.lrp.{rules}.{mode}{lean}.onnx"


def convert_all(paths: dict, rules: str, log=print) -> dict[str, float]:
    """Convert the original graph in both modes; return the wall-clock seconds of each."""
    import lrp_onnx

    seconds = {}
    for method, relevance_only in CONVERTED.items():
        out = converted_path(paths, rules, method)
        start = time.perf_counter()
        lrp_onnx.convert(paths["onnx"], out, rules=rules, relevance_only=relevance_only, memory=MEMORY_MODE["mode"])
        seconds[method] = time.perf_counter() - start
        log(f"  converted ({'relevance-only' if relevance_only else 'full'}) in {seconds[method]:.1f} s -> {out}")
    return seconds


def graph_path(paths: dict, rules: str, method: str) -> Path:
    return Path(paths["onnx"]) if method == "ort_forward" else converted_path(paths, rules, method)


# --------------------------------------------------------------------------- inputs


def make_inputs(spec: ModelSpec, tokenizer_path: Path, seq: int, batch: int) -> dict[str, np.ndarray]:
    """Real text repeated / truncated to exactly ``seq`` tokens; row b starts 37*b tokens further on."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_path))
    tokenizer.no_truncation()
    tokenizer.no_padding()
    body = tokenizer.encode(PASSAGE, add_special_tokens=False).ids
    prefix, suffix = [], []
    if not spec.language_model:  # BERT: [CLS] text [SEP], as the tokenizer's template adds them
        prefix, suffix = [tokenizer.token_to_id("[CLS]")], [tokenizer.token_to_id("[SEP]")]
    need = seq - len(prefix) - len(suffix)
    if need < 1:
        raise SystemExit(f"--seq {seq} is too short")
    rows = []
    for b in range(batch):
        start = (37 * b) % len(body)
        stream = (body * (2 + (start + need) // len(body)))[start:start + need]
        rows.append(prefix + stream + suffix)
    input_ids = np.asarray(rows, dtype=np.int64)
    return {"input_ids": input_ids, "attention_mask": np.ones_like(input_ids)}


# --------------------------------------------------------------------------- onnxruntime


PREPACK_ENV = "LRP_BENCH_PREPACK"  # set by --prepack; inherited by the memory child processes
ORT_OPTIONS_ENV = "LRP_BENCH_ORT_OPTIONS"  # set by --ort-options; inherited by the child processes


_ENV_ARENA: list = []


def _register_env_arena(strategy: int) -> None:
    import onnxruntime as ort

    if _ENV_ARENA:
        return
    info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
    ort.create_and_register_allocator(info, ort.OrtArenaCfg(0, strategy, -1, -1))
    _ENV_ARENA.append(strategy)


def apply_ort_options(options, spec: str | None) -> None:
    """--ort-options: comma-separated settings for every ORT session alike, e.g.
    ``mem_pattern=0,cpu_arena=0,arena_strategy=same,spin=0``."""
    for item in filter(None, (spec or "").split(",")):
        key, _, value = item.partition("=")
        if key == "mem_pattern":
            options.enable_mem_pattern = value == "1"
        elif key == "cpu_arena":
            options.enable_cpu_mem_arena = value == "1"
        elif key == "arena_strategy":  # a shared CPU arena growing by what is asked (kSameAsRequested=1)
            _register_env_arena(1 if value == "same" else 0)
            options.add_session_config_entry("session.use_env_allocators", "1")
        elif key == "spin":
            options.add_session_config_entry("session.intra_op.allow_spinning", value)
        elif key == "mem_reuse":
            options.enable_mem_reuse = value == "1"
        else:
            raise SystemExit(f"--ort-options: unknown setting '{key}'")


def session_options(threads: int, profile_prefix: str | None = None, optimized_path: str | None = None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    if os.environ.get(PREPACK_ENV) != "1":
        # as lrp_onnx.Explainer does by default: weight pre-packing keeps a second copy of every weight
        # that both a forward MatMul and a backward Gemm read (~+650 MB on SmolLM2) for ~7% speed
        options.add_session_config_entry("session.disable_prepacking", "1")
    apply_ort_options(options, os.environ.get(ORT_OPTIONS_ENV))
    if profile_prefix:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    if optimized_path:
        options.optimized_model_filepath = optimized_path
    return options


def ort_session(path: Path, threads: int, **kwargs):
    import onnxruntime as ort

    return ort.InferenceSession(str(path), session_options(threads, **kwargs), providers=["CPUExecutionProvider"])


def ort_runner(session, inputs):
    from lrp_onnx.run.session import input_defaults

    # lrp_target / lrp_position (plain int64 inputs of a converted model): -1, the argmax at the last position
    feeds = {**input_defaults(session), **{name: inputs[name] for name in ("input_ids", "attention_mask")}}
    names = [o.name for o in session.get_outputs()]

    def run():
        return dict(zip(names, session.run(None, feeds)))
    return run


# --------------------------------------------------------------------------- PyTorch / LXT


_MISSING = object()


def _patchable(family: str) -> list:
    """Everything LXT's patch maps (and tests/reference.py's BERT cp-LRP patch) may modify."""
    import torch

    from tests.reference import TRANSFORMERS_MODULES

    module = importlib.import_module(TRANSFORMERS_MODULES[family])
    classes = [v for v in vars(module).values() if isinstance(v, type) and v.__module__ == module.__name__]
    return [module, torch.nn.LayerNorm, torch.nn.Dropout, *classes]


class TorchSide:
    """The plain model (loaded before LXT patches anything) and the LXT model (loaded after).

    LXT patches classes and modules process-wide; the plain forward runs inside ``unpatched()``,
    which puts the original attributes back for the duration of the call (a few setattr)."""

    def __init__(self, spec: ModelSpec, hf_dir: Path, rules: str, threads: int, plain=True, lxt=True):
        import torch

        from tests import reference

        torch.set_num_threads(threads)
        self.torch, self.spec = torch, spec
        self.plain = self._load(hf_dir, detach_norm=False) if plain else None
        self._swaps: list = []
        self.lxt = None
        if lxt:
            objects = _patchable(spec.family)
            before = [dict(vars(obj)) for obj in objects]
            reference.patch_classes(spec.family, rules)  # puts tests/stubs (torchvision) on sys.path
            for obj, old in zip(objects, before):
                new = dict(vars(obj))
                for key in set(old) | set(new):
                    if key.startswith("__"):
                        continue
                    if old.get(key, _MISSING) is not new.get(key, _MISSING):
                        self._swaps.append((obj, key, old.get(key, _MISSING), new.get(key, _MISSING)))
            self.lxt = self._load(hf_dir, detach_norm=rules != "gradient")
            if spec.family == "bert" and rules == "cp-lrp":
                reference.stop_bert_query_key_gradient(self.lxt)
            for parameter in self.lxt.parameters():  # LXT's quickstart: no weight gradients
                parameter.requires_grad_(False)

    def _load(self, hf_dir, detach_norm):
        recipe = importlib.import_module(self.spec.module)
        if self.spec.name == "minilm":
            return recipe.load(hf_dir, detach_norm=detach_norm)
        return recipe.load(hf_dir)

    @contextlib.contextmanager
    def unpatched(self):
        def put(obj, key, value):
            if value is _MISSING:
                if key in vars(obj):
                    delattr(obj, key)
            else:
                setattr(obj, key, value)
        for obj, key, old, _ in self._swaps:
            put(obj, key, old)
        try:
            yield
        finally:
            for obj, key, _, new in self._swaps:
                put(obj, key, new)

    def tensors(self, inputs):
        return {k: self.torch.from_numpy(np.ascontiguousarray(v)) for k, v in inputs.items()}

    def forward(self, t):
        with self.torch.no_grad(), self.unpatched():
            return self.plain(input_ids=t["input_ids"], attention_mask=t["attention_mask"], return_dict=False)[0]

    def explain(self, t):
        """LXT: returns (relevance [B, S, H], target [B], explained logit [B])."""
        torch, model = self.torch, self.lxt
        embeds = model.get_input_embeddings()(t["input_ids"]).detach().requires_grad_()
        out = model(inputs_embeds=embeds, attention_mask=t["attention_mask"], return_dict=False)[0]
        scores = out[:, -1] if self.spec.language_model else out  # no padding: last position = -1
        target = scores.argmax(-1)
        explained = scores.gather(1, target[:, None])[:, 0]
        explained.sum().backward()
        with torch.no_grad():
            relevance = embeds * embeds.grad
        return relevance, target, explained.detach()


# --------------------------------------------------------------------------- one method (memory child)


def build_method(method: str, args, spec: ModelSpec, paths: dict, inputs: dict, torch_side: TorchSide | None):
    """A zero-argument callable running ``method`` once."""
    if method.startswith("ort_"):
        return ort_runner(ort_session(graph_path(paths, args.rules, method), args.threads), inputs)
    tensors = torch_side.tensors(inputs)
    if method == "lxt":
        return lambda: torch_side.explain(tensors)
    return lambda: torch_side.forward(tensors)


def current_rss_mb() -> float | None:
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return None


def max_rss_mb() -> float:
    """Peak RSS of this process in MiB: VmHWM (the high-water mark of this process image).

    ``getrusage(RUSAGE_SELF).ru_maxrss`` is not used for the figure: a child started by
    posix_spawn/vfork inherits the PARENT's peak through exec (Linux keeps it in the signal
    struct), so every child would report at least the benchmark parent's RSS."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def measure_memory(args) -> None:
    """Child process: import, load and run ONE method; print its peak RSS."""
    spec = MODELS[args.model]
    method = args.measure_memory
    paths = ensure_export(spec, args.layers, Path(args.cache), log=lambda *_: None)
    if method != "ort_forward" and method.startswith("ort_") and not graph_path(paths, args.rules, method).exists():
        raise SystemExit(f"{graph_path(paths, args.rules, method)} missing: run the benchmark (it converts) first")
    inputs = make_inputs(spec, paths["tokenizer"], args.seq, args.batch)
    if method.startswith("ort_"):
        import onnxruntime  # noqa: F401
        torch_side = None
        baseline = max_rss_mb()
        fn = build_method(method, args, spec, paths, inputs, None)
    else:
        import torch  # noqa: F401
        import transformers  # noqa: F401
        baseline = max_rss_mb()
        torch_side = TorchSide(spec, paths["hf_dir"], args.rules, args.threads,
                               plain=method == "torch_forward", lxt=method == "lxt")
        fn = build_method(method, args, spec, paths, inputs, torch_side)
    loaded = max_rss_mb()
    for _ in range(max(1, args.memory_runs)):
        fn()
    print(MEMORY_TAG + json.dumps({"method": method, "peak_rss_mb": max_rss_mb(), "baseline_rss_mb": baseline,
                                   "after_load_rss_mb": loaded, "runs": max(1, args.memory_runs),
                                   "rss_after_runs_mb": current_rss_mb(),
                                   "ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0}),
          flush=True)


TIME_TAG = "BENCH_TIME_JSON "


def time_method(args) -> None:
    """Child process: load ONE method, warm up, time --runs runs; print the times and its peak RSS."""
    spec = MODELS[args.model]
    method = args.time_method
    paths = ensure_export(spec, args.layers, Path(args.cache), log=lambda *_: None)
    inputs = make_inputs(spec, paths["tokenizer"], args.seq, args.batch)
    torch_side = None
    if not method.startswith("ort_"):
        torch_side = TorchSide(spec, paths["hf_dir"], args.rules, args.threads,
                               plain=method == "torch_forward", lxt=method == "lxt")
    fn = build_method(method, args, spec, paths, inputs, torch_side)
    loaded = max_rss_mb()
    for _ in range(args.warmup):
        fn()
    times = []
    for _ in range(args.runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    print(TIME_TAG + json.dumps({"method": method, "times_s": times, "peak_rss_mb": max_rss_mb(),
                                 "after_load_rss_mb": loaded, "rss_after_runs_mb": current_rss_mb()}), flush=True)


def parity_child(args) -> None:
    """Child process: every method once on the cell's input (at most 128 x 1, so that the big cells
    need not hold all methods at once); print the parity figures."""
    spec = MODELS[args.model]
    paths = ensure_export(spec, args.layers, Path(args.cache), log=lambda *_: None)
    inputs = make_inputs(spec, paths["tokenizer"], min(args.seq, 128), 1)
    runners = {m: build_method(m, args, spec, paths, inputs, None) for m in METHODS if m.startswith("ort_")}
    torch_side = TorchSide(spec, paths["hf_dir"], args.rules, args.threads)
    print(TIME_TAG + json.dumps(parity_check(spec, runners, torch_side, inputs)), flush=True)


def run_child(args, extra: list[str]) -> dict:
    command = [sys.executable, "-m", "tools.bench", *extra, *child_args(args)]
    done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith(TIME_TAG)]
    if done.returncode != 0 or not lines:
        raise SystemExit(f"child {' '.join(extra)} failed ({done.returncode}): {done.stderr.strip()[-1500:]}")
    return json.loads(lines[-1][len(TIME_TAG):])


def cpu_info() -> dict:
    """The CPU model and the ISA extensions that matter for onnxruntime's and PyTorch's kernels."""
    flags: set = set()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    wanted = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_tile", "amx_bf16",
              "amx_int8")
    return {"model": _cpu_name(), "isa": [f for f in wanted if f in flags], "cores": os.cpu_count()}


def cpu_line(info: dict | None = None) -> str:
    info = info or cpu_info()
    return f"CPU: {info['model']}, {info['cores']} cores, ISA {' '.join(info['isa']) or '-'}"


def child_args(args, **override) -> list[str]:
    """The command-line options that define a benchmark cell, for child processes."""
    values = {"model": args.model, "seq": args.seq, "batch": args.batch, "layers": args.layers,
              "runs": args.runs, "warmup": args.warmup, "threads": args.threads, "rules": args.rules,
              "cache": args.cache, "memory_runs": args.memory_runs, "memory_repeats": args.memory_repeats,
              "gap_ms": args.gap_ms, "memory": args.memory,
              "wait_quiet": args.wait_quiet, "wait_timeout": args.wait_timeout, "omp_passive": args.omp_passive,
              **override}
    out = []
    for key, value in values.items():
        if value is None or value is False:
            continue
        flag = "--" + key.replace("_", "-")
        out += [flag] if value is True else [flag, str(value)]
    return out


def memory_children(args, methods, log=print) -> dict:
    """``--memory-repeats`` fresh children per method (round-robin); the median of their peaks.

    The peak is often reached while onnxruntime builds the session (file bytes, parsed proto and
    tensors briefly coexist) and varies by a few hundred MB from one process to the next, hence
    the repeats; ``rss_after_runs_mb`` (VmRSS after the runs) is the steady state."""
    samples: dict[str, list] = {m: [] for m in methods}
    errors: dict[str, str] = {}
    for _ in range(max(1, args.memory_repeats)):
        for method in methods:
            if method in errors:
                continue
            command = [sys.executable, "-m", "tools.bench", "--measure-memory", method, *child_args(args)]
            done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True)
            lines = [line for line in done.stdout.splitlines() if line.startswith(MEMORY_TAG)]
            if done.returncode != 0 or not lines:
                errors[method] = f"{done.returncode}: {done.stderr.strip()[-800:]}"
                log(f"  memory child for {method} failed ({errors[method]})")
                continue
            samples[method].append(json.loads(lines[-1][len(MEMORY_TAG):]))
    results = {}
    for method in methods:
        if not samples[method]:
            results[method] = None
            continue
        peaks = [x["peak_rss_mb"] for x in samples[method]]
        results[method] = {
            "peak_rss_mb": float(np.median(peaks)), "peak_rss_mb_min": min(peaks), "peak_rss_mb_max": max(peaks),
            "baseline_rss_mb": float(np.median([x["baseline_rss_mb"] for x in samples[method]])),
            "after_load_rss_mb": float(np.median([x["after_load_rss_mb"] for x in samples[method]])),
            "rss_after_runs_mb": float(np.median([x["rss_after_runs_mb"] or 0 for x in samples[method]])),
            "children": len(peaks), "runs_per_child": samples[method][0]["runs"],
        }
        r = results[method]
        log(f"  peak RSS {method}: {r['peak_rss_mb']:.0f} MB (children {r['peak_rss_mb_min']:.0f}..."
            f"{r['peak_rss_mb_max']:.0f}; after imports {r['baseline_rss_mb']:.0f}, after load "
            f"{r['after_load_rss_mb']:.0f}, after runs {r['rss_after_runs_mb']:.0f} MB)")
    return results


# --------------------------------------------------------------------------- machine load


class LoadMonitor:
    """CPU time used by OTHER processes while we measure (shared machines): from /proc/stat's busy
    ticks minus this process's own CPU time, as a fraction of all cores over the wall time."""

    def __init__(self):
        self.tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self.cores = os.cpu_count() or 1

    def sample(self):
        busy = steal = 0.0
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = [float(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
            # user nice system idle iowait irq softirq steal ...
            busy = (fields[0] + fields[1] + fields[2] + fields[5] + fields[6]) / self.tick
            steal = fields[7] / self.tick if len(fields) > 7 else 0.0
        return time.perf_counter(), busy, steal, time.process_time()

    def foreign(self, a, b) -> float:
        wall = b[0] - a[0]
        if wall <= 0:
            return 0.0
        other = (b[1] - a[1]) - (b[3] - a[3]) + (b[2] - a[2])  # others' busy time + hypervisor steal
        return max(0.0, other / (wall * self.cores))

    def wait_quiet(self, threshold: float, timeout: float, window: float = 2.0, log=print) -> float:
        """Wait until other processes use less than ``threshold`` of the machine; return the last load."""
        start = time.perf_counter()
        announced = False
        while True:
            a = self.sample()
            time.sleep(window)
            load = self.foreign(a, self.sample())
            if load < threshold or time.perf_counter() - start > timeout:
                if announced:
                    log(f"  ... other load now {load:.0%} after {time.perf_counter() - start:.0f} s")
                return load
            if not announced:
                log(f"  other processes use {load:.0%} of the {self.cores} cores; waiting up to {timeout:.0f} s "
                    f"for < {threshold:.0%} (--wait-quiet)")
                announced = True


# --------------------------------------------------------------------------- statistics and checks


def rel_l2(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def summarize(times_s: list[float]) -> dict:
    ms = np.asarray(times_s) * 1e3
    return {"median_ms": float(np.median(ms)), "p10_ms": float(np.percentile(ms, 10)),
            "p90_ms": float(np.percentile(ms, 90)), "mean_ms": float(ms.mean()), "min_ms": float(ms.min()),
            "max_ms": float(ms.max()), "runs": len(ms), "runs_ms": [round(float(v), 3) for v in ms]}


def parity_check(spec: ModelSpec, runners: dict, torch_side: TorchSide, inputs: dict) -> dict:
    """Run every method once and compare: ORT relevance vs LXT, plain logits vs ORT forward."""
    from tests.reference import compute_relevance

    t = torch_side.tensors(inputs)
    forward = runners["ort_forward"]()
    full = runners["ort_explain_full"]()
    rel_only = runners["ort_explain_relevance"]()
    relevance, target, explained = (x.detach().numpy() for x in torch_side.explain(t))
    plain = torch_side.forward(t).numpy()
    batch, seq = inputs["input_ids"].shape
    reference = compute_relevance(torch_side.lxt, spec.family, inputs["input_ids"], inputs["attention_mask"],
                                  np.full(batch, -1), np.full(batch, -1) if spec.language_model else None)
    first_output = next(iter(forward))
    result = {
        "rel_l2_ort_full_vs_lxt": rel_l2(full["lrp_relevance"], relevance),
        "rel_l2_ort_relevance_only_vs_lxt": rel_l2(rel_only["lrp_relevance"], relevance),
        "rel_l2_ort_full_vs_ort_relevance_only": rel_l2(rel_only["lrp_relevance"], full["lrp_relevance"]),
        "rel_l2_token_relevance_ort_relevance_only_vs_lxt": rel_l2(rel_only["lrp_relevance"].sum(-1),
                                                                   relevance.sum(-1)),
        "rel_l2_lxt_timed_vs_tests_reference": rel_l2(relevance, reference["relevance"]),
        "targets_equal": bool(np.array_equal(full["lrp_selected_target"], target)
                              and np.array_equal(rel_only["lrp_selected_target"], target)),
        "target": target.tolist(),
        "explained_logit_lxt": explained.tolist(),
        "explained_logit_ort": rel_only["lrp_selected_logit"].tolist(),
        "max_abs_logits_ort_forward_vs_torch": float(np.abs(forward[first_output] - plain).max()),
        "max_abs_logits_ort_full_vs_ort_forward": float(np.abs(full[first_output] - forward[first_output]).max()),
        "relevance_sum_over_logit": (rel_only["lrp_relevance"].sum(axis=(1, 2)) /
                                     rel_only["lrp_selected_logit"]).tolist(),
        "shape": [int(batch), int(seq)],
    }
    return result


# --------------------------------------------------------------------------- profiling


def profile_category(name: str) -> str:
    if name.startswith("lrp/at_position/"):
        return "head@pos"  # relevance-only mode: forward head recomputed at the explained position
    return "bwd" if name.startswith("lrp/") else "fwd"


def profile_graphs(paths: dict[str, Path], inputs: dict, threads: int, runs: int, warmup: int, prefix: Path,
                   monitor: "LoadMonitor | None" = None) -> dict:
    """Profile the graphs in ``paths`` (method -> path) with ORT's enable_profiling, their runs
    interleaved (round-robin, like the timing loop), ``warmup`` runs each first; totals per
    (part, op type). Part: ``bwd`` = node name starts with ``lrp/`` (or, for nodes that ORT's
    fusions renamed, an output tensor does), ``head@pos`` = ``lrp/at_position/`` (relevance-only
    mode: the forward head recomputed at the explained position), ``fwd`` = everything else."""
    import onnx

    sessions, runners, optimized = {}, {}, {}
    for method, path in paths.items():
        optimized[method] = Path(f"{prefix}_{method}.optimized.onnx")
        sessions[method] = ort_session(path, threads, profile_prefix=f"{prefix}_{method}",
                                       optimized_path=str(optimized[method]))
        runners[method] = ort_runner(sessions[method], inputs)
    for _ in range(warmup):
        for run in runners.values():
            run()
    a = monitor.sample() if monitor else None
    for _ in range(runs):
        for run in runners.values():
            run()
    other_load = monitor.foreign(a, monitor.sample()) if monitor else None
    results = {}
    for method, session in sessions.items():
        events = json.loads(Path(session.end_profiling()).read_text())
        # node names ORT generated for fused nodes: classify by their output tensors (lrp/... = backward)
        by_name = {n.name: n for n in onnx.load(str(optimized[method]), load_external_data=False).graph.node}
        model_runs = sorted((e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"),
                            key=lambda e: e["ts"])
        start = model_runs[warmup]["ts"]
        wall = [e["dur"] / 1e3 for e in model_runs[warmup:]]
        groups: dict = {}
        fused_reclassified = set()
        for e in events:
            if e.get("cat") != "Node" or not e["name"].endswith("_kernel_time") or e["ts"] < start:
                continue
            node = e["name"][: -len("_kernel_time")]
            part = profile_category(node)
            n = by_name.get(node)
            if part == "fwd" and n is not None and any(
                    o.startswith("lrp/") and not o.startswith("lrp/at_position/") for o in n.output):
                part = "bwd"
                fused_reclassified.add(node)
            key = (part, e["args"].get("op_name", "?"))
            g = groups.setdefault(key, {"us": 0.0, "calls": 0, "nodes": set()})
            g["us"] += e["dur"]
            g["calls"] += 1
            g["nodes"].add(node)
        total_us = sum(g["us"] for g in groups.values())
        rows = sorted(({"part": k[0], "op": k[1], "ms_per_run": g["us"] / 1e3 / runs, "share": g["us"] / total_us,
                        "nodes": len(g["nodes"]), "calls_per_run": g["calls"] / runs} for k, g in groups.items()),
                      key=lambda r: -r["ms_per_run"])
        parts: dict = {}
        for r in rows:
            parts[r["part"]] = parts.get(r["part"], 0.0) + r["ms_per_run"]
        with contextlib.suppress(OSError):
            optimized[method].unlink()
        results[method] = {"graph": str(paths[method]), "runs": runs, "wall_ms_median": float(np.median(wall)),
                           "kernel_ms_per_run": total_us / 1e3 / runs, "parts_ms_per_run": parts, "rows": rows,
                           "optimized_nodes": len(by_name), "fused_nodes_reclassified_bwd": len(fused_reclassified),
                           "other_load": other_load}
    return results


def print_profile(title: str, prof: dict, top: int = 15) -> None:
    print(f"\n{title}: {Path(prof['graph']).name}, {prof['runs']} runs, wall {prof['wall_ms_median']:.1f} ms/run "
          f"(median, profiling on), kernels {prof['kernel_ms_per_run']:.1f} ms/run, {prof['optimized_nodes']} nodes "
          f"after ORT optimization" + (f"; other processes {prof['other_load']:.0%}" if prof.get("other_load")
                                       is not None else ""))
    parts = ", ".join(f"{k} {v:.1f} ms ({v / prof['kernel_ms_per_run']:.0%})"
                      for k, v in sorted(prof["parts_ms_per_run"].items(), key=lambda kv: -kv[1]))
    print(f"  by part: {parts}" + (f"; {prof['fused_nodes_reclassified_bwd']} ORT-fused nodes with lrp/ outputs "
                                    f"counted as bwd" if prof["fused_nodes_reclassified_bwd"] else ""))
    print(f"  {'part':<9}{'op type':<26}{'ms/run':>9}{'share':>8}{'nodes':>7}{'calls/run':>11}")
    for r in prof["rows"][:top]:
        print(f"  {r['part']:<9}{r['op']:<26}{r['ms_per_run']:>9.2f}{r['share']:>8.1%}{r['nodes']:>7}"
              f"{r['calls_per_run']:>11.0f}")


# --------------------------------------------------------------------------- one benchmark cell


def file_mb(path: Path) -> float:
    return Path(path).stat().st_size / 2**20


def bench(args) -> dict:
    spec = MODELS[args.model]
    cache = Path(args.cache)
    started = time.perf_counter()
    paths = ensure_export(spec, args.layers, cache)
    print(f"== {spec.title} ({layers_key(spec, args.layers) or spec.full_layers}"
          f" layers) | seq {args.seq} | batch {args.batch} | threads {args.threads} | rules {args.rules}", flush=True)
    conversion = convert_all(paths, args.rules)
    sizes = {"original_mb": file_mb(paths["onnx"])}
    for method in CONVERTED:
        sizes[f"{method}_mb"] = file_mb(converted_path(paths, args.rules, method))

    cpu = cpu_info()
    print(cpu_line(cpu), flush=True)
    parity = {}
    if not args.no_parity:
        parity = run_child(args, ["--parity-child"])
        print(f"parity (at {min(args.seq, 128)} x 1): rel. L2 of relevance, ORT full vs LXT "
              f"{parity['rel_l2_ort_full_vs_lxt']:.2e}, ORT relevance-only vs LXT "
              f"{parity['rel_l2_ort_relevance_only_vs_lxt']:.2e}; LXT timed fn vs tests/reference.py "
              f"{parity['rel_l2_lxt_timed_vs_tests_reference']:.1e}; targets equal: {parity['targets_equal']}",
              flush=True)

    # every method in its own fresh process (no other session's thread pool can spin on the cores),
    # --rounds rounds, the order rotating from round to round
    monitor = LoadMonitor()
    load_before = monitor.wait_quiet(args.wait_quiet, args.wait_timeout) if args.wait_quiet < 1 else None
    methods = [m for m in METHODS if m not in args.skip]
    samples: dict[str, list] = {m: [] for m in methods}
    foreign: dict[str, list[float]] = {m: [] for m in methods}
    print(f"timing: {args.rounds} rounds x {len(methods)} methods, each in its own process, {args.warmup} warm-up "
          f"+ {args.runs} timed runs ...", flush=True)
    loop_start = monitor.sample()
    for r in range(args.rounds):
        order = methods[r % len(methods):] + methods[:r % len(methods)]
        for m in order:
            a = monitor.sample()
            sample = run_child(args, ["--time-method", m])
            foreign[m].append(monitor.foreign(a, monitor.sample()))
            samples[m].append(sample)
            print(f"  round {r + 1} {m}: median {np.median(sample['times_s']) * 1e3:.1f} ms, peak RSS "
                  f"{sample['peak_rss_mb']:.0f} MB", flush=True)
    other_load = monitor.foreign(loop_start, monitor.sample())
    timings, memory = {}, {}
    for m in methods:
        timings[m] = summarize([t for x in samples[m] for t in x["times_s"]])
        timings[m]["round_medians_ms"] = [float(np.median(x["times_s"]) * 1e3) for x in samples[m]]
        timings[m]["other_load_mean"] = float(np.mean(foreign[m]))
        timings[m]["other_load_max"] = float(np.max(foreign[m]))
        peaks = [x["peak_rss_mb"] for x in samples[m]]
        memory[m] = {"peak_rss_mb": float(np.median(peaks)), "peak_rss_mb_min": min(peaks),
                     "peak_rss_mb_max": max(peaks), "baseline_rss_mb": 0.0,
                     "after_load_rss_mb": float(np.median([x["after_load_rss_mb"] for x in samples[m]])),
                     "rss_after_runs_mb": float(np.median([x["rss_after_runs_mb"] or 0 for x in samples[m]])),
                     "children": len(peaks)}
    for m in METHODS:  # skipped methods: NaN, so that the ratios print as nan
        if m not in timings:
            timings[m] = {"median_ms": float("nan"), "p10_ms": float("nan"), "p90_ms": float("nan"),
                          "round_medians_ms": []}
    print(f"other processes used {other_load:.0%} of the machine during the timing rounds", flush=True)

    med = {m: timings[m]["median_ms"] for m in METHODS}
    ratios = {
        "explain_full_over_forward": med["ort_explain_full"] / med["ort_forward"],
        "explain_relevance_over_forward": med["ort_explain_relevance"] / med["ort_forward"],
        "explain_full_over_lxt": med["ort_explain_full"] / med["lxt"],
        "explain_relevance_over_lxt": med["ort_explain_relevance"] / med["lxt"],
        "lxt_over_torch_forward": med["lxt"] / med["torch_forward"],
        "ort_forward_over_torch_forward": med["ort_forward"] / med["torch_forward"],
        "file_full_over_original": sizes["ort_explain_full_mb"] / sizes["original_mb"],
        "file_relevance_over_original": sizes["ort_explain_relevance_mb"] / sizes["original_mb"],
    }
    # the same ratios per round (the methods of one round ran back to back: less exposed to slow drifts
    # of the machine's load), and their median
    per_round = {}
    for key, (num, den) in {"explain_full_over_forward": ("ort_explain_full", "ort_forward"),
                            "explain_relevance_over_forward": ("ort_explain_relevance", "ort_forward"),
                            "explain_full_over_lxt": ("ort_explain_full", "lxt"),
                            "explain_relevance_over_lxt": ("ort_explain_relevance", "lxt")}.items():
        a, b = timings[num]["round_medians_ms"], timings[den]["round_medians_ms"]
        if a and b:
            per_round[key] = [x / y for x, y in zip(a, b)]
    ratios["per_round"] = per_round

    profile = {}
    if args.profile:
        inputs = make_inputs(spec, paths["tokenizer"], args.seq, args.batch)
        if args.wait_quiet < 1:
            monitor.wait_quiet(args.wait_quiet, args.wait_timeout)
        print(f"profiling {args.profile} interleaved runs of the original and the relevance-only graph ...",
              flush=True)
        profile = profile_graphs({m: graph_path(paths, args.rules, m) for m in ("ort_forward", "ort_explain_relevance")},
                                 inputs, args.threads, args.profile, 2, cache / f"profile_{spec.name}", monitor)

    import importlib.metadata

    import onnxruntime
    result = {
        "config": {"model": spec.name, "title": spec.title, "layers": layers_key(spec, args.layers) or spec.full_layers,
                   "seq": args.seq, "batch": args.batch, "threads": args.threads, "rules": args.rules,
                   "runs": args.runs, "warmup": args.warmup, "rounds": args.rounds,
                   "ort_options": os.environ.get(ORT_OPTIONS_ENV, ""), "memory": args.memory, "prepack": os.environ.get(PREPACK_ENV) == "1",
                   "timing": "each method in its own fresh process, rounds alternating the order"},
        "env": {"onnxruntime": onnxruntime.__version__, "torch": importlib.metadata.version("torch"),
                "python": platform.python_version(), "cpu": cpu["model"], "isa": cpu["isa"], "cores": os.cpu_count()},
        "timings": timings, "memory": memory, "conversion_s": conversion, "file_sizes": sizes,
        "ratios": ratios, "parity": parity, "profile": profile,
        "machine_load": {"other_during_timing": other_load, "other_before_timing": load_before,
                         "loadavg_after": _loadavg(), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")},
        "elapsed_s": time.perf_counter() - started,
    }
    print_table(result)
    for method, title in (("ort_forward", "original graph, forward"),
                          ("ort_explain_relevance", "converted graph, relevance-only")):
        if method in profile:
            print_profile(f"ORT profile, {title}", profile[method])
    return result


def _loadavg() -> list[float] | None:
    with contextlib.suppress(OSError, ValueError):
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    return None


def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor()


def print_table(r: dict) -> None:
    c, e = r["config"], r["env"]
    print(f"\n{c['title']} ({c['layers']} layers) | seq {c['seq']} | batch {c['batch']} | {c['threads']} threads | "
          f"{c['rules']} | {c.get('rounds', 1)} rounds x {c['runs']} runs after {c['warmup']} warm-up, each method in "
          f"its own process" + (f" | ORT options {c['ort_options']}" if c.get("ort_options") else ""))
    print(f"CPU: {e['cpu']}, {e['cores']} cores, ISA {' '.join(e.get('isa', [])) or '-'} | onnxruntime "
          f"{e['onnxruntime']}, torch {e['torch']}")
    print(f"{'method':<42}{'median ms':>11}{'p10':>10}{'p90':>10}{'peak RSS MB':>13}{'RSS end':>10}")
    for m in METHODS:
        t = r["timings"][m]
        mem = r["memory"].get(m) if r["memory"] else None
        print(f"{LABELS[m]:<42}{t['median_ms']:>11.1f}{t['p10_ms']:>10.1f}{t['p90_ms']:>10.1f}"
              f"{(format(mem['peak_rss_mb'], '.0f') if mem else '-'):>13}"
              f"{(format(mem['rss_after_runs_mb'], '.0f') if mem else '-'):>10}")
    q = r["ratios"]
    for key, values in q.get("per_round", {}).items():
        print(f"  {key} per round: {', '.join(f'{v:.2f}' for v in values)} (median {np.median(values):.2f})")
    print(f"explain / forward (ORT converted / ORT original): full {q['explain_full_over_forward']:.2f}x, "
          f"relevance-only {q['explain_relevance_over_forward']:.2f}x")
    print(f"explain / LXT: full {q['explain_full_over_lxt']:.2f}x, relevance-only {q['explain_relevance_over_lxt']:.2f}x"
          f"   (LXT / PyTorch forward {q['lxt_over_torch_forward']:.2f}x; ORT fwd / PyTorch fwd "
          f"{q['ort_forward_over_torch_forward']:.2f}x)")
    s = r["conversion_s"]
    print(f"conversion: full {s['ort_explain_full']:.1f} s, relevance-only {s['ort_explain_relevance']:.1f} s")
    f = r["file_sizes"]
    print(f"file size: original {f['original_mb']:.1f} MB, full {f['ort_explain_full_mb']:.1f} MB "
          f"({q['file_full_over_original']:.3f}x), relevance-only {f['ort_explain_relevance_mb']:.1f} MB "
          f"({q['file_relevance_over_original']:.3f}x)")
    load = r.get("machine_load", {})
    if load.get("other_during_timing") is not None:
        worst = max(r["timings"].items(), key=lambda kv: kv[1].get("other_load_mean", 0))
        print(f"other processes on the machine during timing: {load['other_during_timing']:.0%} of all cores "
              f"(highest during {worst[0]}: {worst[1].get('other_load_mean', 0):.0%})")
    if r["memory"]:
        print("peak RSS: VmHWM of the timing process of each method (imports included), median over the rounds; "
              "'RSS end' = VmRSS after the runs")


# --------------------------------------------------------------------------- grid and scaling


def run_all(args) -> dict:
    """Each grid cell in its own process (LXT's patches are process-wide)."""
    cache = Path(args.cache)
    out_dir = cache / "grid"
    out_dir.mkdir(parents=True, exist_ok=True)
    cells, started = [], time.perf_counter()
    for model, seq, batch in GRID:
        cell_json = out_dir / f"{model}-L{args.layers or 'full'}-s{seq}-b{batch}-{args.rules}.json"
        command = [sys.executable, "-m", "tools.bench",
                   *child_args(args, model=model, seq=seq, batch=batch, json=str(cell_json))]
        if args.no_memory:
            command.append("--no-memory")
        print(f"\n### {' '.join(command[1:])}", flush=True)
        t0 = time.perf_counter()
        done = subprocess.run(command, cwd=REPO_ROOT)
        elapsed = time.perf_counter() - t0
        print(f"### cell took {elapsed:.0f} s (total so far {time.perf_counter() - started:.0f} s)", flush=True)
        if done.returncode != 0:
            cells.append({"config": {"model": model, "seq": seq, "batch": batch}, "error": done.returncode})
            continue
        cells.append(json.loads(cell_json.read_text()))
    total = time.perf_counter() - started
    print(f"\nGRID ({args.threads} threads, {args.rules}, {args.runs} runs, layers {args.layers or 'all'}; "
          f"took {total / 60:.1f} min) -- medians in ms; peak RSS MB")
    print(f"{'model':<9}{'seq':>5}{'batch':>6}{'ORT fwd':>10}{'ORT full':>10}{'ORT rel':>10}{'LXT':>10}"
          f"{'torch fwd':>10}{'full/fwd':>9}{'rel/fwd':>9}{'rel/LXT':>9}{'RSS rel':>9}{'RSS LXT':>9}{'relL2':>9}")
    for cell in cells:
        c = cell["config"]
        if "error" in cell:
            print(f"{c['model']:<9}{c['seq']:>5}{c['batch']:>6}  failed ({cell['error']})")
            continue
        t, q, mem = cell["timings"], cell["ratios"], cell["memory"] or {}

        def rss(m):
            return f"{mem[m]['peak_rss_mb']:.0f}" if mem.get(m) else "-"
        print(f"{c['model']:<9}{c['seq']:>5}{c['batch']:>6}" + "".join(
            f"{t[m]['median_ms']:>10.1f}" for m in METHODS)
            + f"{q['explain_full_over_forward']:>9.2f}{q['explain_relevance_over_forward']:>9.2f}"
            f"{q['explain_relevance_over_lxt']:>9.2f}{rss('ort_explain_relevance'):>9}{rss('lxt'):>9}"
            f"{cell['parity'].get('rel_l2_ort_relevance_only_vs_lxt', float('nan')):>9.1e}")
    return {"grid": cells, "elapsed_s": total}


def run_scaling(args) -> dict:
    """Conversion time of SmolLM2 truncated to 2, 8, 30 layers (both modes; best of --scaling-repeats)."""
    import onnx

    import lrp_onnx

    spec = MODELS["smollm2"]
    cache = Path(args.cache)
    rows = []
    for layers in args.scaling_layers:
        paths = ensure_export(spec, layers, cache)
        original_nodes = len(onnx.load(str(paths["onnx"]), load_external_data=False).graph.node)
        row = {"layers": layers, "original_nodes": original_nodes}
        for method, relevance_only in CONVERTED.items():
            out = converted_path(paths, args.rules, method)
            best = None
            for _ in range(args.scaling_repeats):
                t0 = time.perf_counter()
                model = lrp_onnx.convert(paths["onnx"], out, rules=args.rules, relevance_only=relevance_only)
                seconds = time.perf_counter() - t0
                best = seconds if best is None else min(best, seconds)
            row[f"{method}_s"] = best
            row[f"{method}_nodes"] = len(model.graph.node)
            del model
        rows.append(row)
        print(f"  {layers:>2} layers: full {row['ort_explain_full_s']:.2f} s, relevance-only "
              f"{row['ort_explain_relevance_s']:.2f} s ({original_nodes} -> {row['ort_explain_full_nodes']} / "
              f"{row['ort_explain_relevance_nodes']} nodes)", flush=True)
    layers = np.array([r["layers"] for r in rows], dtype=float)
    fits = {}
    print(f"\nconversion time vs layers (SmolLM2, {args.rules}, best of {args.scaling_repeats})")
    print(f"{'layers':>7}{'nodes':>8}{'full s':>9}{'s/layer':>9}{'rel-only s':>12}{'s/layer':>9}")
    for r in rows:
        print(f"{r['layers']:>7}{r['original_nodes']:>8}{r['ort_explain_full_s']:>9.2f}"
              f"{r['ort_explain_full_s'] / r['layers']:>9.3f}{r['ort_explain_relevance_s']:>12.2f}"
              f"{r['ort_explain_relevance_s'] / r['layers']:>9.3f}")
    for method in CONVERTED:
        seconds = np.array([r[f"{method}_s"] for r in rows])
        slope, intercept = np.polyfit(layers, seconds, 1)
        predicted = slope * layers + intercept
        worst = float(np.max(np.abs(predicted - seconds) / seconds))
        # linear through the two smallest, extrapolated to the largest: > 1 means super-linear
        extrapolated = seconds[0] + (seconds[1] - seconds[0]) / (layers[1] - layers[0]) * (layers[-1] - layers[0]) \
            if len(rows) >= 3 else float("nan")
        fits[method] = {"slope_s_per_layer": float(slope), "intercept_s": float(intercept),
                        "max_rel_residual": worst, "largest_over_extrapolated": float(seconds[-1] / extrapolated)}
        print(f"{method}: linear fit {slope:.3f} s/layer + {intercept:.2f} s, max relative residual {worst:.1%}; "
              f"{int(layers[-1])} layers measured / extrapolated from the two smallest = "
              f"{fits[method]['largest_over_extrapolated']:.2f}")
    return {"scaling": rows, "fits": fits, "rules": args.rules}


# --------------------------------------------------------------------------- CLI


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tools.bench", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.splitlines()[1:]))
    p.add_argument("--model", choices=sorted(MODELS), help="required unless --all or --scaling")
    p.add_argument("--seq", type=int, default=128, help="tokens per row (default 128)")
    p.add_argument("--batch", type=int, default=1, help="rows (default 1)")
    p.add_argument("--layers", type=int, default=None, help="truncate the model to its first N layers")
    p.add_argument("--runs", type=int, default=10, help="timed runs per method and round (default 10)")
    p.add_argument("--warmup", type=int, default=2, help="warm-up runs per method (default 2)")
    p.add_argument("--threads", type=int, default=2, help="ORT intra-op threads and torch threads (default 2)")
    p.add_argument("--rules", choices=RULES, default="attnlrp")
    p.add_argument("--json", help="write every number to this file")
    p.add_argument("--cache", default=str(REPO_ROOT / "build" / "bench"), help="export cache (default build/bench)")
    p.add_argument("--gap-ms", type=float, default=20.0,
                   help="pause before each timed call, so thread pools of the previous method stop spinning")
    p.add_argument("--wait-quiet", type=float, default=0.25, metavar="FRACTION",
                   help="before timing, wait until other processes use less than this fraction of the cores "
                        "(default 0.25; 1 = never wait)")
    p.add_argument("--wait-timeout", type=float, default=300.0, help="longest wait for --wait-quiet, s (300)")
    p.add_argument("--prepack", action="store_true",
                   help="keep onnxruntime's weight pre-packing on (faster, ~1 weight copy more memory); "
                        "default: off for every ORT session, as in lrp_onnx.Explainer")
    p.add_argument("--omp-passive", action="store_true",
                   help="OMP_WAIT_POLICY=PASSIVE for PyTorch (libgomp's spinning collapses when another process "
                        "holds a core of a small machine); default: PyTorch's own defaults")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-RSS child processes")
    p.add_argument("--memory-runs", type=int, default=2, help="runs in each peak-RSS child (default 2)")
    p.add_argument("--memory-repeats", type=int, default=3,
                   help="peak-RSS children per method; the median is reported (default 3)")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="also profile N runs of the original and the relevance-only graph (ORT enable_profiling)")
    p.add_argument("--all", action="store_true", help="the grid: smollm2, minilm x seq 128, 512 x batch 1, 8")
    p.add_argument("--scaling", action="store_true", help="conversion time of SmolLM2 at --scaling-layers")
    p.add_argument("--scaling-layers", type=lambda s: [int(x) for x in s.split(",")], default=[2, 8, 30])
    p.add_argument("--scaling-repeats", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3, help="timing rounds, each method in its own process (default 3)")
    p.add_argument("--skip", type=lambda x: x.split(","), default=[],
                   help="methods not to time, comma-separated (e.g. torch_forward,ort_explain_full)")
    p.add_argument("--no-parity", action="store_true", help="skip the relevance check against LXT")
    p.add_argument("--ort-options", default=None,
                   help="settings for every ORT session alike: mem_pattern=0|1, cpu_arena=0|1, arena_strategy=same|pow2, "
                        "mem_reuse=0|1, spin=0|1 (comma-separated)")
    p.add_argument("--memory", choices=["fast", "lean"], default="fast",
                   help="conversion option memory= (lean: attention probabilities recomputed in the backward)")
    p.add_argument("--measure-memory", choices=METHODS, help=argparse.SUPPRESS)
    p.add_argument("--time-method", choices=METHODS, help=argparse.SUPPRESS)
    p.add_argument("--parity-child", action="store_true", help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.prepack:
        os.environ[PREPACK_ENV] = "1"
    if args.omp_passive:
        if "torch" in sys.modules:
            raise SystemExit("--omp-passive must be set before torch is imported")
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"  # read by libgomp when torch loads; children inherit it
    if args.ort_options is not None:
        os.environ[ORT_OPTIONS_ENV] = args.ort_options
    MEMORY_MODE["mode"] = args.memory
    if args.measure_memory:
        measure_memory(args)
        return 0
    if args.time_method:
        time_method(args)
        return 0
    if args.parity_child:
        parity_child(args)
        return 0
    if args.scaling:
        result = run_scaling(args)
    elif args.all:
        result = run_all(args)
    else:
        if not args.model:
            parser().error("--model is required (or --all / --scaling)")
        result = bench(args)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
