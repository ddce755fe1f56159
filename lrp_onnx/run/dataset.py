"""Attribution over a whole dataset: `lrp-onnx explain-dataset` and `lrp_onnx.explain_dataset`.

    import lrp_onnx
    result = lrp_onnx.explain_dataset("model.lrp.onnx", "tokenizer.json", "data.jsonl", "out.parquet",
                                      text_column="text", batch_size=32)
    print(result.rows, result.errors, f"{result.rows_per_second:.1f} rows/s")

The input (JSONL, CSV or Parquet, read with pyarrow) is cut into shards of consecutive rows. Each
shard is tokenized, sorted by length, explained in batches of rows of similar length (little
padding), put back in input order and written as a Parquet file under OUT.shards/. When every shard
is there they are joined into OUT (one row group per shard) and OUT.shards/ is removed. A run that
was interrupted resumes: rerun with the same arguments and the finished shards are kept, giving the
same file as an uninterrupted run. A bad row (no text, no tokens, too long, a target or position out
of range) gets its reason in the `error` column; it never stops the run. With `generate` (an LM)
each row's greedy continuation is explained as Explainer.explain_generation does (see explain_dataset).

Execution: locally one onnxruntime session (intra-op threads = the cores) or `workers` processes
with one session each; with `ray` the shards become Ray Data blocks explained by `map_batches` on a
pool of actors, each holding one session (CUDA when the node has a GPU), and the driver writes the
same shards and file. pyarrow is imported only here; Ray only with `ray`.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import time
from dataclasses import dataclass

import numpy as np

from ..errors import first_line, LRPError

FORMAT = 1
SHARD_ROWS = 1024
MANIFEST = "manifest.json"
OUTPUT_COLUMNS = ("row", "token_ids", "tokens", "relevance", "target", "logit", "position", "relevance_full",
                  "error", "generated_ids", "generated_tokens", "generated_text", "stopped")
SHARD_KEY = "__lrp_shard"
INDEX_KEY = "__lrp_index"


@dataclass
class DatasetResult:
    path: str               # the Parquet file written
    rows: int               # rows in it
    errors: int             # rows with an error (no relevance)
    computed_rows: int      # rows explained by this run (the others came from finished shards)
    shards: int
    resumed_shards: int     # shards found finished and kept
    seconds: float

    @property
    def rows_per_second(self) -> float:
        return self.computed_rows / self.seconds if self.seconds > 0 else float("nan")


def _pyarrow():
    try:
        import pyarrow
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise LRPError("explain-dataset reads and writes with pyarrow: pip install pyarrow "
                       "(or pip install lrp-onnx[dataset])") from None
    return pyarrow


# -- input ------------------------------------------------------------------------------------------
INPUT_FORMATS = {".jsonl": "json", ".json": "json", ".ndjson": "json", ".csv": "csv", ".tsv": "csv",
                 ".parquet": "parquet", ".pq": "parquet"}


def read_table(path, text_column: str, pick):
    """The input file (by extension: .jsonl/.json/.ndjson, .csv/.tsv, .parquet/.pq) as a pyarrow Table
    of the columns pick(column names) returns. A CSV's text column is read as text, never as numbers."""
    pa = _pyarrow()
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise LRPError(f"{path}: no such input file")
    ext = os.path.splitext(path)[1].lower()
    kind = INPUT_FORMATS.get(ext)
    if kind is None:
        raise LRPError(f"{path}: unknown input format '{ext}'; give .jsonl, .csv, .tsv or .parquet")
    try:
        if kind == "json":
            import pyarrow.json as pj
            table = pj.read_json(path)
            table = table.select(pick(table.column_names))
        elif kind == "csv":
            import pyarrow.csv as pc
            parse = pc.ParseOptions(delimiter="\t" if ext == ".tsv" else ",", newlines_in_values=True)
            with pc.open_csv(path, parse_options=parse) as reader:
                names = reader.schema.names
            columns = pick(names)
            table = pc.read_csv(path, parse_options=parse, convert_options=pc.ConvertOptions(
                include_columns=columns, column_types={text_column: pa.string()}, strings_can_be_null=False))
        else:
            import pyarrow.parquet as pq
            table = pq.read_table(path, columns=pick(pq.read_schema(path).names))
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError, UnicodeDecodeError) as exc:
        raise LRPError(f"{path}: not readable as {kind} ({' '.join(str(exc).split())[:300]})") from None
    text = table.schema.field(text_column).type
    if not (pa.types.is_string(text) or pa.types.is_large_string(text) or pa.types.is_null(text)):
        raise LRPError(f"{path}: column '{text_column}' holds {text}, not text")
    return table


# -- explaining rows (the same code locally, in worker processes and in Ray actors) ----------------
class RowExplainer:
    """One onnxruntime session and the tokenizer; explain(texts, targets, positions) -> output columns."""

    def __init__(self, model, tokenizer, batch_size: int = 32, max_length: int | None = None, full: bool = False,
                 providers=None, threads: int | None = None, generate: int | None = None):
        from .text import load_tokenizer
        from .runner import Explainer

        self.explainer = Explainer(model, providers=providers, threads=threads)
        self.tokenizer = load_tokenizer(tokenizer)
        self.batch_size, self.max_length, self.full, self.generate = batch_size, max_length, full, generate
        names = self.explainer.input_names
        if "input_ids" not in names:
            raise LRPError(f"{model}: explain-dataset explains text; the model has no input 'input_ids' "
                           f"(inputs: {', '.join(names)})")
        fed = {"input_ids", "attention_mask", "token_type_ids", "position_ids"}
        missing = [i.name for i in self.explainer.session.get_inputs()
                   if i.name not in fed and not i.name.startswith("lrp_") and not i.type.startswith("optional")]
        if missing:
            raise LRPError(f"{model}: cannot feed input(s) {', '.join(missing)} from text")
        self.has_position = "lrp_position" in names
        self.model_max = (self.explainer.meta.get("input_limits") or {}).get("max_length")
        if generate is not None and not self.has_position:
            raise LRPError(f"{model}: --generate explains what a language model generates; the explained output "
                           f"'{self.explainer.meta.get('explained_output')}' has no sequence axis")

    def explain(self, texts, targets=None, positions=None) -> dict:
        """Per row: token_ids, tokens, relevance (per token), target, logit, position, relevance_full,
        error. Rows are sorted by length into batches and returned in the given order."""
        from .session import text_inputs

        n = len(texts)
        errors = [None] * n
        encodings = [None] * n
        for i, text in enumerate(texts):
            if text is None:
                errors[i] = "no text (null)"
            elif not text.strip():
                errors[i] = "empty text"
        good = [i for i in range(n) if errors[i] is None]
        for i, e in zip(good, self.tokenizer.encode_batch([texts[i] for i in good]) if good else []):
            length = len(e.ids)
            if length == 0 or not any(e.attention_mask):
                errors[i] = "the text gives no tokens"
            elif self.max_length and length > self.max_length:
                errors[i] = f"{length} tokens, longer than --max-length {self.max_length}"
            elif self.model_max and length > self.model_max:
                errors[i] = f"{length} tokens, longer than the model's {self.model_max} positions"
            elif self.generate and self.model_max and length + self.generate - 1 > self.model_max:
                need = length + self.generate - 1
                errors[i] = (f"{length} tokens and up to {self.generate} generated ones need {need} positions, "
                             f"more than the model's {self.model_max}")
            else:
                encodings[i] = e
        if self.generate:
            return self._explain_generation(encodings, errors)
        target = np.full(n, -1, np.int64)
        for i, value in enumerate(targets if targets is not None else []):
            if errors[i] is None and value is not None:
                target[i], errors[i] = self._target(value)
        position = np.zeros(n, np.int64)
        for i in range(n):
            if encodings[i] is None or errors[i] is not None or not self.has_position:
                continue
            length = len(encodings[i].ids)
            value = positions[i] if positions is not None else None
            if value is None:
                position[i] = length - 1  # the last token of the row
            elif not _is_integer(value):
                errors[i] = f"position {value!r:.40} is not an integer"
            elif not -length <= int(value) < length:
                errors[i] = f"position {int(value)} is outside the text's {length} tokens [-{length}, {length - 1}]"
            else:
                position[i] = int(value) % length
        out = {"token_ids": [None] * n, "tokens": [None] * n, "relevance": [None] * n, "target": [None] * n,
               "logit": [None] * n, "position": [None] * n, "relevance_full": [None] * n}
        for i in range(n):
            if encodings[i] is not None:
                out["token_ids"][i] = list(encodings[i].ids)
                out["tokens"][i] = list(encodings[i].tokens)
        rows = sorted((i for i in range(n) if errors[i] is None), key=lambda i: len(encodings[i].ids))
        names = self.explainer.input_names
        use_target = targets is not None
        for start in range(0, len(rows), self.batch_size):
            batch = rows[start:start + self.batch_size]
            try:
                self._run(batch, encodings, target, position, use_target, names, out, text_inputs)
            except LRPError as exc:
                if len(batch) == 1:
                    errors[batch[0]] = str(exc).strip().splitlines()[0]
                    continue
                for i in batch:  # find the bad row(s): each row alone
                    try:
                        self._run([i], encodings, target, position, use_target, names, out, text_inputs)
                    except LRPError as row_exc:
                        errors[i] = str(row_exc).strip().splitlines()[0]
        for i in range(n):
            if errors[i] is not None:
                for key in ("relevance", "target", "logit", "position", "relevance_full"):
                    out[key][i] = None
        out["error"] = errors
        return out

    def _explain_generation(self, encodings, errors) -> dict:
        """--generate N: each row alone, as Explainer.explain_generation (greedy decoding of up to N
        tokens, stopping at the tokenizer's end token, then every generated token explained)."""
        n = len(encodings)
        out = {key: [None] * n for key in _GENERATION_COLUMNS}
        for i in range(n):
            if encodings[i] is None:
                continue
            out["token_ids"][i] = list(encodings[i].ids)
            out["tokens"][i] = list(encodings[i].tokens)
            if errors[i] is not None:
                continue
            ids = np.asarray(encodings[i].ids, np.int64)
            try:
                g = self.explainer.explain_generation(ids, max_new_tokens=self.generate, tokenizer=self.tokenizer)
            except LRPError as exc:
                errors[i] = str(exc).strip().splitlines()[0]
                continue
            except Exception as exc:  # the decoding session's own refusal (onnxruntime): the row's error
                if not type(exc).__module__.startswith("onnxruntime"):
                    raise
                message = first_line(exc)
                errors[i] = f"onnxruntime could not run the model: {message[:400]}"
                continue
            generated = [int(t) for t in g.generated_ids]
            out["generated_ids"][i] = generated
            out["generated_tokens"][i] = [self.tokenizer.id_to_token(t) for t in generated]
            out["generated_text"][i] = g.text
            out["stopped"][i] = bool(g.stopped)
            out["relevance"][i] = np.asarray(g.relevance, np.float32)
            out["target"][i] = generated
            out["logit"][i] = np.asarray(g.logits, np.float32)
            out["position"][i] = [int(p) for p in g.positions]
        out["error"] = errors
        return out

    def _target(self, value):
        if isinstance(value, str):
            token = self.tokenizer.token_to_id(value)
            return (token, None) if token is not None else (-1, f"target token {value!r} is not in the vocabulary")
        if not _is_integer(value):
            return -1, f"target {value!r:.40} is not an integer"
        if value < 0:
            return -1, f"target {int(value)} is negative"
        return int(value), None

    def _run(self, batch, encodings, target, position, use_target, names, out, text_inputs):
        length = max(len(encodings[i].ids) for i in batch)
        ids = np.zeros((len(batch), length), np.int64)
        mask = np.zeros((len(batch), length), np.int64)
        for r, i in enumerate(batch):
            e = encodings[i]
            ids[r, :len(e.ids)] = e.ids
            mask[r, :len(e.ids)] = e.attention_mask
        feed = text_inputs(names, ids, mask)
        result = self.explainer.run(target=target[batch] if use_target else None,
                                    position=position[batch] if self.has_position else None, **feed)
        per_token = result.token_relevance()
        for r, i in enumerate(batch):
            n = len(encodings[i].ids)
            out["relevance"][i] = per_token[r, :n].astype(np.float32)
            out["target"][i] = int(result.target[r]) if result.target is not None else None
            out["logit"][i] = float(result.logit[r]) if result.logit is not None else None
            out["position"][i] = int(position[i]) if self.has_position else None
            if self.full:
                full = result.relevance[r, :n] if result.relevance.ndim >= 3 else result.relevance[r, :n, None]
                out["relevance_full"][i] = full.astype(np.float16)


def _is_integer(value) -> bool:
    """An int, or a float holding one (JSON/CSV columns with nulls may arrive as floats)."""
    if isinstance(value, (bool, np.bool_)):
        return False
    if isinstance(value, (int, np.integer)):
        return True
    return isinstance(value, (float, np.floating)) and bool(np.isfinite(value)) and float(value).is_integer()


_GENERATION_COLUMNS = ("token_ids", "tokens", "generated_ids", "generated_tokens", "generated_text", "stopped",
                       "relevance", "target", "logit", "position")


def _result_fields(full: bool, generate: int | None = None):
    pa = _pyarrow()
    if generate:  # per row: N generated tokens (N <= generate), T = prompt + N - 1 tokens
        return [pa.field("token_ids", pa.list_(pa.int64())), pa.field("tokens", pa.list_(pa.string())),
                pa.field("generated_ids", pa.list_(pa.int64())), pa.field("generated_tokens", pa.list_(pa.string())),
                pa.field("generated_text", pa.string()), pa.field("stopped", pa.bool_()),
                pa.field("relevance", pa.list_(pa.list_(pa.float32()))), pa.field("target", pa.list_(pa.int64())),
                pa.field("logit", pa.list_(pa.float32())), pa.field("position", pa.list_(pa.int64())),
                pa.field("error", pa.string())]
    fields = [pa.field("token_ids", pa.list_(pa.int64())), pa.field("tokens", pa.list_(pa.string())),
              pa.field("relevance", pa.list_(pa.float32())), pa.field("target", pa.int64()),
              pa.field("logit", pa.float32()), pa.field("position", pa.int64())]
    if full:
        fields.append(pa.field("relevance_full", pa.list_(pa.list_(pa.float16()))))
    return fields + [pa.field("error", pa.string())]


def output_schema(input_schema, full: bool, metadata: dict, generate: int | None = None):
    """The output's schema: row (the input's row number), the input's id/text columns, the results."""
    pa = _pyarrow()
    return pa.schema([pa.field("row", pa.int64())] + list(input_schema) + _result_fields(full, generate),
                     metadata={"lrp_onnx": json.dumps(metadata, sort_keys=True)})


def result_table(columns: dict, full: bool, generate: int | None = None):
    """explain()'s columns as a pyarrow Table (what workers and actors send back)."""
    pa = _pyarrow()
    fields = _result_fields(full, generate)
    arrays = []
    for f in fields:
        values = columns[f.name]
        if f.name == "relevance_full" or (generate and f.name == "relevance"):
            values = [None if v is None else list(v) for v in values]
        arrays.append(pa.array(values, type=f.type))
    return pa.Table.from_arrays(arrays, schema=pa.schema(fields))


def _output_table(result, inputs, first_row: int, schema):
    """A shard of the output: row numbers, the input's id/text columns, the result columns."""
    pa = _pyarrow()
    arrays = [pa.array(np.arange(first_row, first_row + inputs.num_rows, dtype=np.int64))]
    arrays += [inputs.column(name) for name in inputs.column_names]
    arrays += [result.column(f.name) for f in list(schema)[1 + inputs.num_columns:]]
    return pa.Table.from_arrays(arrays, schema=schema)


# -- the job ----------------------------------------------------------------------------------------
@dataclass
class _Job:
    model: str
    tokenizer: str
    text_column: str
    id_column: str | None
    target_column: str | None
    position_column: str | None
    batch_size: int
    max_length: int | None
    full: bool
    providers: list | None
    threads: int | None
    generate: int | None = None

    def worker_options(self):
        return dict(model=self.model, tokenizer=self.tokenizer, batch_size=self.batch_size,
                    max_length=self.max_length, full=self.full, providers=self.providers, threads=self.threads,
                    generate=self.generate)

    def explain_table(self, worker: RowExplainer, table):
        """The result table of the rows of `table` (its text, and target, position columns)."""
        def column(name):
            return table.column(name).to_pylist() if name else None
        columns = worker.explain(column(self.text_column), column(self.target_column), column(self.position_column))
        return result_table(columns, self.full, self.generate)


def _fingerprint(paths: dict, settings: dict) -> dict:
    """What a finished shard depends on: the files (path, size, modification time) and the settings."""
    files = {}
    for what, path in paths.items():
        st = os.stat(path)
        files[what] = {"path": os.path.realpath(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    return {"format": FORMAT, "files": files, "settings": settings}


def explain_dataset(model, tokenizer, input, out, *, text_column: str = "text", id_column: str | None = None,
                    target_column: str | None = None, position_column: str | None = None, batch_size: int = 32,
                    max_length: int | None = None, limit: int | None = None, full: bool = False,
                    shard_rows: int = SHARD_ROWS, workers: int | None = None, threads: int | None = None,
                    providers=None, ray=None, restart: bool = False, progress: bool = True,
                    on_shard=None, generate: int | None = None) -> DatasetResult:
    """Explain every row of `input` (.jsonl, .csv, .tsv, .parquet) with the converted `model` and write
    the Parquet file `out`: row, the id column (`id_column`, default 'id' when the input has one), the
    text, token_ids, tokens, relevance (per token, float32), target, logit, position (of LMs),
    relevance_full ([tokens, hidden] float16, with `full`) and error (null, or why the row has no
    relevance). The rule set and settings are in the file's metadata (key 'lrp_onnx').

    target_column: per row, a class / vocabulary index or a vocabulary token (null: the argmax).
    position_column: per row, the explained position (Python-style negative indices; null: the last token).
    limit: the first N rows. shard_rows: rows per shard (the unit of resumption).
    workers: local worker processes (default 1: one session using all cores), or Ray actors.
    threads: onnxruntime intra-op threads per session. ray: None (local), "" / True (ray.init():
    RAY_ADDRESS, or a new local cluster) or an address ("auto", "ray://host:10001", "host:6379");
    when Ray is initialized already, its cluster is used. restart: discard finished shards of an
    earlier, different job instead of refusing. on_shard(index, rows): called after each shard is
    written (raising from it interrupts the job; a rerun resumes).

    generate: N (a language model): each row's text is a prompt; up to N tokens are decoded greedily
    (stopping at the tokenizer's end token) and every generated token is explained, each row alone,
    exactly as Explainer.explain_generation does (one run per row with a model converted with
    multi_target=True; a single-target model runs the forward once per generated token). The
    columns then are token_ids, tokens (the prompt's), generated_ids, generated_tokens,
    generated_text, stopped (ended at an end token), relevance (list<list<float32>> [N_i, T_i]: row k
    explains generated token k over the T_i = prompt + N_i - 1 tokens before the last one, the
    prompt's then the generated ones; zero after position prompt - 1 + k), and per generated token
    target (= generated_ids), logit and position (prompt - 1 + k), each a list of N_i; error.
    Not with target_column, position_column or full; batch_size does not apply (rows run alone)."""
    from ..ir.files import check_output_file

    pa = _pyarrow()
    import pyarrow.parquet as pq

    for value, what in ((batch_size, "batch-size"), (shard_rows, "shard-rows")):
        if not isinstance(value, int) or value < 1:
            raise LRPError(f"--{what} must be a positive integer, got {value!r}")
    for value, what in ((max_length, "max-length"), (limit, "limit"), (workers, "workers"), (threads, "threads"),
                        (generate, "generate")):
        if value is not None and (not isinstance(value, int) or value < (0 if what == "limit" else 1)):
            raise LRPError(f"--{what} must be a positive integer, got {value!r}")
    if generate is not None:
        given = [flag for flag, value in (("--target-column", target_column), ("--position-column", position_column),
                                          ("--full", full)) if value]
        if given:
            raise LRPError(f"--generate explains the generated tokens: {', '.join(given)} does not apply")
    model, tokenizer, input = os.fspath(model), os.fspath(tokenizer), os.fspath(input)
    if not os.path.isfile(model):
        raise LRPError(f"{model}: no such file")
    out = check_output_file(out, inputs=[model, tokenizer, input])
    shard_dir = out + ".shards"
    if os.path.lexists(shard_dir) and not os.path.isdir(shard_dir):
        raise LRPError(f"{shard_dir}: exists and is not a directory (explain-dataset keeps its shards there)")

    # the input's columns
    def pick(names):
        nonlocal id_column
        if id_column is None and "id" in names and text_column != "id":
            id_column = "id"
        wanted = list(dict.fromkeys(c for c in (text_column, id_column, target_column, position_column) if c))
        missing = [c for c in wanted if c not in names]
        if missing:
            raise LRPError(f"{input}: no column {', '.join(repr(c) for c in missing)}; its columns are: "
                           f"{', '.join(names) or 'none'}")
        taken = [c for c in (text_column, id_column) if c in OUTPUT_COLUMNS]
        if taken:
            raise LRPError(f"{input}: input column '{taken[0]}' has the name of an output column; rename it")
        return wanted

    table = read_table(input, text_column, pick)
    if limit is not None:
        table = table.slice(0, limit)
    rows = table.num_rows
    kept = list(dict.fromkeys(c for c in (id_column, text_column) if c))
    kept_schema = pa.schema([table.schema.field(c) for c in kept])

    job = _Job(model, tokenizer, text_column, id_column, target_column, position_column, batch_size, max_length,
               full, list(providers) if providers else None, threads, generate)
    local = RowExplainer(**job.worker_options()) if ray is None and (workers or 1) == 1 else None
    probe = local or RowExplainer(**{**job.worker_options(), "providers": ["CPUExecutionProvider"]})
    if position_column and not probe.has_position:
        raise LRPError(f"--position-column: the explained output of {model} has no sequence axis")
    meta = probe.explainer.meta
    metadata = {"format": FORMAT, "model": os.path.basename(model), "rules": meta.get("rules"),
                "explained_output": meta.get("explained_output"),
                "relevance_output": (meta.get("relevance_outputs") or [None])[0],
                "text_column": text_column, "id_column": id_column, "target_column": target_column,
                "position_column": position_column, "batch_size": batch_size, "max_length": max_length,
                "full": full, "shard_rows": shard_rows}
    if generate is not None:  # (absent otherwise: the shards of earlier versions stay resumable)
        metadata.update(generate=generate, multi_target=probe.explainer.multi_target)
    if local is None:
        del probe
    schema = output_schema(kept_schema, full, metadata, generate)

    # the shards: consecutive rows; finished ones are kept when the job is the same
    shards = [(start, min(start + shard_rows, rows)) for start in range(0, rows, shard_rows)]
    fingerprint = _fingerprint({"model": model, "tokenizer": tokenizer, "input": input},
                               {k: v for k, v in metadata.items() if k != "model"})
    finished = _open_shard_dir(shard_dir, fingerprint, restart)
    paths = [os.path.join(shard_dir, f"shard-{a:012d}-{b:012d}.parquet") for a, b in shards]
    pending = [k for k, p in enumerate(paths) if os.path.basename(p) not in finished]
    resumed = len(shards) - len(pending)
    bar = _progress(rows, resumed_rows=sum(shards[k][1] - shards[k][0] for k in range(len(shards))
                                           if k not in pending)) if progress else None

    def write_shard(k, result):
        a, b = shards[k]
        _write_parquet(_output_table(result, table.slice(a, b - a).select(kept), a, schema), paths[k])
        if bar is not None:
            bar.update(b - a)
        if on_shard is not None:
            on_shard(k, b - a)

    inputs = [c for c in (text_column, target_column, position_column) if c]
    compute_start = time.perf_counter()
    try:
        if not pending:
            pass
        elif ray is not None:
            _run_ray(job, table.select(list(dict.fromkeys(inputs))), shards, pending, ray, workers, write_shard)
        elif local is not None:
            for k in pending:
                a, b = shards[k]
                write_shard(k, job.explain_table(local, table.slice(a, b - a)))
        else:
            _run_processes(job, table.select(list(dict.fromkeys(inputs))), shards, pending, workers, write_shard)
    finally:
        if bar is not None:
            bar.close()
    computed = sum(shards[k][1] - shards[k][0] for k in pending)
    compute_seconds = time.perf_counter() - compute_start

    # join the shards: one row group each
    errors = 0
    from ..ir.files import _temporary
    with _temporary(os.path.dirname(out), ".partial", named=True) as temporary:
        with pq.ParquetWriter(temporary.path, schema) as writer:
            for path in paths:
                part = pq.read_table(path, schema=schema)
                errors += part.num_rows - part.column("error").null_count
                writer.write_table(part, row_group_size=max(part.num_rows, 1))
        temporary.publish(out)
    shutil.rmtree(shard_dir, ignore_errors=True)
    return DatasetResult(out, rows, errors, computed, len(shards), resumed, compute_seconds)


def _open_shard_dir(shard_dir: str, fingerprint: dict, restart: bool) -> set[str]:
    """Create OUT.shards/ with its manifest, or reopen it: the names of the finished shards."""
    manifest = os.path.join(shard_dir, MANIFEST)
    if os.path.isdir(shard_dir):
        try:
            with open(manifest, encoding="utf-8") as f:
                previous = json.load(f)
        except (OSError, ValueError):
            previous = None
        done = [n for n in os.listdir(shard_dir) if n.startswith("shard-") and n.endswith(".parquet")]
        if previous != fingerprint and (previous is not None or done):
            if not restart:
                changed = _difference(previous, fingerprint)
                raise LRPError(f"{shard_dir}: holds the shards of another job ({changed}); rerun with the same "
                               f"arguments to resume, or give --restart to discard them")
            shutil.rmtree(shard_dir)
    if not os.path.isdir(shard_dir) or not os.path.isfile(manifest):
        os.makedirs(shard_dir, exist_ok=True)
        _write_bytes(manifest, json.dumps(fingerprint, indent=1, sort_keys=True).encode())
        return set()
    return {name for name in os.listdir(shard_dir) if name.startswith("shard-") and name.endswith(".parquet")}


def _difference(previous, current) -> str:
    if not isinstance(previous, dict):
        return "no readable manifest"
    for group in ("files", "settings"):
        for key, value in current.get(group, {}).items():
            if (previous.get(group) or {}).get(key) != value:
                return f"{key} differs" if group == "settings" else f"the {key} file changed"
    return "another format"


def _write_bytes(path: str, data: bytes) -> None:
    from ..ir.files import _temporary
    with _temporary(os.path.dirname(path), ".partial") as temporary:
        temporary.write(data)
        temporary.publish(path)


def _write_parquet(table, path: str) -> None:
    """A shard, whole or not at all."""
    import pyarrow.parquet as pq

    from ..ir.files import _temporary
    with _temporary(os.path.dirname(path), ".partial", named=True) as temporary:
        pq.write_table(table, temporary.path, row_group_size=max(table.num_rows, 1))
        temporary.publish(path)


# -- progress ---------------------------------------------------------------------------------------
class _PlainProgress:
    def __init__(self, total, initial):
        self.total, self.done, self.start, self.initial = total, initial, time.perf_counter(), initial

    def update(self, n):
        self.done += n
        rate = (self.done - self.initial) / max(time.perf_counter() - self.start, 1e-9)
        print(f"\rexplain-dataset: {self.done}/{self.total} rows, {rate:.1f} rows/s", end="", file=sys.stderr,
              flush=True)

    def close(self):
        print(file=sys.stderr)


def _progress(total: int, resumed_rows: int):
    try:
        from tqdm import tqdm
    except ImportError:
        return _PlainProgress(total, resumed_rows)
    return tqdm(total=total, initial=resumed_rows, desc="explain-dataset", unit="row", file=sys.stderr,
                smoothing=0.1)


# -- local worker processes -------------------------------------------------------------------------
_WORKER: tuple | None = None


def _init_process(job: _Job) -> None:
    global _WORKER
    _WORKER = (job, RowExplainer(**job.worker_options()))


def _explain_in_process(k: int, table):
    job, worker = _WORKER
    return k, job.explain_table(worker, table)


def _run_processes(job, table, shards, pending, workers, write_shard) -> None:
    """`workers` processes (spawned: onnxruntime's threads do not survive fork), one session each with
    cores // workers intra-op threads unless `threads` is given; at most 2 shards queued per worker."""
    import concurrent.futures as cf
    import dataclasses
    import multiprocessing

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    job = dataclasses.replace(job, threads=job.threads or max(1, cores // workers))
    context = multiprocessing.get_context("spawn")
    with cf.ProcessPoolExecutor(workers, mp_context=context, initializer=_init_process, initargs=(job,)) as pool:
        queue = list(pending)
        running = set()
        try:
            while queue or running:
                while queue and len(running) < 2 * workers:
                    k = queue.pop(0)
                    a, b = shards[k]
                    running.add(pool.submit(_explain_in_process, k, table.slice(a, b - a)))
                done, running = cf.wait(running, return_when=cf.FIRST_COMPLETED)
                for future in sorted(done, key=lambda f: f.result()[0]):
                    k, result = future.result()
                    write_shard(k, result)
        except BaseException:
            for future in running:
                future.cancel()
            raise


# -- Ray ----------------------------------------------------------------------------------------------
class _RayExplainer:
    """A Ray Data actor holding one session. A batch holds whole shards (one block each): each shard is
    explained as one unit (sorted by length, batched), as locally, so that the results are the same."""

    def __init__(self, job: _Job):
        self.job = job
        self.worker = RowExplainer(**job.worker_options())

    def __call__(self, batch):
        import pyarrow as pa

        shard_ids = batch.column(SHARD_KEY).to_numpy()
        parts = []
        for k in dict.fromkeys(shard_ids.tolist()):
            rows = np.flatnonzero(shard_ids == k)
            part = batch.take(pa.array(rows))
            result = self.job.explain_table(self.worker, part)
            parts.append(result.append_column(SHARD_KEY, part.column(SHARD_KEY))
                         .append_column(INDEX_KEY, part.column(INDEX_KEY)))
        return pa.concat_tables(parts)


def _run_ray(job, table, shards, pending, address, workers, write_shard) -> None:
    """The pending shards as Ray Data blocks (one per shard), explained by map_batches on a pool of
    actors (one onnxruntime session each: CUDA when the cluster has GPUs, one GPU per actor); the
    driver writes each shard as its rows come back."""
    try:
        import ray
        import ray.data
    except ImportError:
        raise LRPError("--ray needs Ray Data: pip install 'ray[data]' (or pip install lrp-onnx[ray])") from None
    import dataclasses

    import pyarrow as pa

    started_here = False
    if not ray.is_initialized():
        kwargs = {"logging_level": "WARNING", "log_to_driver": False}
        if address in (None, "", True):
            kwargs["include_dashboard"] = False
            address = None
        try:
            ray.init(address=address, **kwargs)
        except Exception as exc:  # noqa: BLE001 (Ray's own errors: connection refused, bad address)
            raise LRPError(f"--ray {address or ''}: cannot start or reach a Ray cluster "
                           f"({' '.join(str(exc).split())[:300]})") from None
        started_here = True
    try:
        resources = ray.cluster_resources()
        gpus = int(resources.get("GPU", 0))
        cpus = max(1, int(resources.get("CPU", 1)))
        if job.providers and "CUDAExecutionProvider" not in job.providers:
            gpus = 0
        threads = job.threads or (1 if gpus else max(1, cpus // (workers or cpus)))
        size = workers or (gpus if gpus else max(1, cpus // threads))
        job = dataclasses.replace(job, threads=threads)
        ray.data.DataContext.get_current().enable_progress_bars = False
        blocks = []
        for k in pending:
            a, b = shards[k]
            blocks.append(table.slice(a, b - a)
                          .append_column(SHARD_KEY, pa.array(np.full(b - a, k, np.int64)))
                          .append_column(INDEX_KEY, pa.array(np.arange(b - a, dtype=np.int64))))
        dataset = ray.data.from_arrow(blocks).map_batches(
            _RayExplainer, fn_constructor_kwargs={"job": job}, batch_size=None, batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=size), num_cpus=threads, num_gpus=1 if gpus else 0)
        arrived: dict[int, list] = {}
        for batch in dataset.iter_batches(batch_size=None, batch_format="pyarrow"):
            shard_ids = batch.column(SHARD_KEY).to_numpy()
            for k in dict.fromkeys(shard_ids.tolist()):
                arrived.setdefault(k, []).append(batch.take(pa.array(np.flatnonzero(shard_ids == k))))
                if sum(p.num_rows for p in arrived[k]) == shards[k][1] - shards[k][0]:
                    part = pa.concat_tables(arrived.pop(k))
                    part = part.take(pa.array(np.argsort(part.column(INDEX_KEY).to_numpy(), kind="stable")))
                    write_shard(k, part.drop_columns([SHARD_KEY, INDEX_KEY]))
        if arrived:
            raise LRPError(f"Ray returned shards {sorted(arrived)} incomplete")
    finally:
        if started_here:
            ray.shutdown()
