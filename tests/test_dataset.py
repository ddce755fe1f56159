"""Attribution over a dataset (lrp_onnx.explain_dataset, `lrp-onnx explain-dataset`).

On tiny random-weight models with a word-level tokenizer ("wN" -> id N):
* each row's relevance, target and logit in the Parquet output equal Explainer.run on that row alone
  (unpadded, batch of one), in input order, for a 200-row JSONL of mixed lengths (batched by length
  with padding); the same for CSV and Parquet inputs with a target column;
* an interrupted run, rerun, resumes from its finished shards and writes the same bytes as an
  uninterrupted run; a rerun with other arguments is refused (exit 2) unless --restart;
* bad rows get their reason in the `error` column, the other rows are complete;
* worker processes, and Ray Data on a local cluster, give the same table as the local run;
  without --ray nothing imports Ray;
* with --generate N (the tiny llama converted with multi_target=True), each row's matrix [N_i, T_i],
  generated ids/text, logits and positions equal Explainer.explain_generation on that row alone, rows
  stopping at an end token have fewer steps, and an interrupted run resumes to the same bytes.
"""
import csv
import json
import random
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import lrp_onnx
from lrp_onnx.run.runner import Explainer

TOLERANCE = 1e-5


def _converted(tiny_model, workdir, family):
    """The tiny `family` model converted with attnlrp, once per session."""
    _, path = tiny_model(family)
    out = workdir / f"dataset-{family}.lrp.onnx"
    if not out.exists():
        lrp_onnx.convert(path, out, rules="attnlrp")
    return out


@pytest.fixture(scope="module")
def lm(tiny_model, workdir):
    """The tiny llama converted with attnlrp (an LM: explained at the last token by default)."""
    return _converted(tiny_model, workdir, "llama")


@pytest.fixture(scope="module")
def classifier(tiny_model, workdir):
    """The tiny bert classifier (3 classes, 64 positions) converted with attnlrp."""
    return _converted(tiny_model, workdir, "bert")


def texts(n, seed=0, longest=40):
    rng = random.Random(seed)
    return [" ".join(f"w{rng.randrange(1, 100)}" for _ in range(rng.choice([1, 2, 3, 5, 8, 13, 21, longest])))
            for _ in range(n)]


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return path


@pytest.fixture(scope="module")
def dataset_200(workdir):
    return write_jsonl(workdir / "dataset-200.jsonl", [{"id": f"r{i}", "text": t} for i, t in enumerate(texts(200))])


def ids_of(text):
    return np.array([[int(w[1:]) for w in text.split()]], dtype=np.int64)


def reference_row(explainer, text, target=None, position=None):
    """Explainer.run on the row alone: relevance per token, target, logit."""
    ids = ids_of(text)
    feed = {k: v for k, v in {"input_ids": ids, "attention_mask": np.ones_like(ids)}.items()
            if k in explainer.input_names}
    result = explainer.run(target=None if target is None else [target],
                           position=None if position is None else [position], **feed)
    return result.token_relevance()[0], int(result.target[0]), float(result.logit[0])


def assert_rows_equal_reference(table, explainer, rows, targets=None, positions=None):
    assert table.column("row").to_pylist() == list(range(len(rows)))  # input order
    assert table.column("text").to_pylist() == rows
    for i, row in enumerate(table.to_pylist()):
        assert row["error"] is None, row["error"]
        expected, target, logit = reference_row(explainer, rows[i], targets and targets[i], positions and positions[i])
        assert row["token_ids"] == ids_of(rows[i])[0].tolist()
        assert row["tokens"] == rows[i].split()
        assert len(row["relevance"]) == len(expected)
        np.testing.assert_allclose(row["relevance"], expected, rtol=0, atol=TOLERANCE, err_msg=f"row {i}")
        assert row["target"] == target
        assert row["logit"] == pytest.approx(logit, abs=TOLERANCE)


def test_jsonl_relevance_equals_explainer_row_by_row(lm, word_tokenizer, dataset_200, tmp_path):
    out = tmp_path / "out.parquet"
    result = lrp_onnx.explain_dataset(lm, word_tokenizer, dataset_200, out, batch_size=16, shard_rows=64,
                                      progress=False)
    assert (result.rows, result.errors, result.shards, result.resumed_shards) == (200, 0, 4, 0)
    table = pq.read_table(out)
    rows = [json.loads(line)["text"] for line in open(dataset_200)]
    assert len({len(t.split()) for t in rows}) == 8  # mixed lengths: batches are padded
    assert table.column("id").to_pylist() == [f"r{i}" for i in range(200)]
    assert_rows_equal_reference(table, Explainer(lm, providers=["CPUExecutionProvider"]), rows)
    lengths = [len(t.split()) for t in rows]
    assert table.column("position").to_pylist() == [n - 1 for n in lengths]  # the last token of each row
    meta = json.loads(table.schema.metadata[b"lrp_onnx"])
    assert meta["rules"] == "attnlrp" and meta["text_column"] == "text"
    assert table.schema.field("relevance").type == pa.list_(pa.float32())
    assert pq.ParquetFile(out).num_row_groups == 4  # one per shard
    assert not (tmp_path / "out.parquet.shards").exists()


def test_full_relevance_sums_to_the_per_token_relevance(lm, word_tokenizer, dataset_200, tmp_path):
    out = tmp_path / "full.parquet"
    lrp_onnx.explain_dataset(lm, word_tokenizer, dataset_200, out, limit=12, batch_size=5, full=True, progress=False)
    table = pq.read_table(out)
    assert table.schema.field("relevance_full").type == pa.list_(pa.list_(pa.float16()))
    explainer = Explainer(lm, providers=["CPUExecutionProvider"])
    for row in table.to_pylist():
        ids = ids_of(row["text"])
        expected = explainer.run(input_ids=ids, attention_mask=np.ones_like(ids)).relevance[0]
        full = np.array(row["relevance_full"], dtype=np.float32)
        assert full.shape == expected.shape  # [tokens, hidden]
        np.testing.assert_allclose(full, expected, rtol=2e-3, atol=1e-4)  # float16
        np.testing.assert_allclose(full.sum(-1), row["relevance"], rtol=1e-2, atol=1e-3)


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_csv_and_parquet_inputs_with_targets(fmt, classifier, word_tokenizer, tmp_path):
    rows = texts(40, seed=1, longest=30)
    targets = [i % 3 for i in range(len(rows))]
    path = tmp_path / f"data.{fmt}"
    if fmt == "csv":
        with open(path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["label", "sentence"])
            writer.writerows(zip(targets, rows))
    else:
        pq.write_table(pa.table({"label": targets, "sentence": rows}), path)
    out = tmp_path / "out.parquet"
    done = lrp("explain-dataset", classifier, "--tokenizer", word_tokenizer, "--input", path, "--out", out,
               "--text-column", "sentence", "--target-column", "label", "--batch-size", "8", "--quiet")
    assert done.returncode == 0, done.stderr
    assert "40 rows, 0 with an error" in done.stdout
    table = pq.read_table(out)
    assert table.column_names[:2] == ["row", "sentence"]
    table = table.rename_columns(["text" if c == "sentence" else c for c in table.column_names])
    assert table.column("target").to_pylist() == targets
    assert_rows_equal_reference(table, Explainer(classifier, providers=["CPUExecutionProvider"]), rows, targets)
    assert table.column("position").null_count == 40  # a classifier has no explained position


def test_interrupted_run_resumes_to_the_same_file(lm, word_tokenizer, dataset_200, tmp_path):
    whole = tmp_path / "whole.parquet"
    lrp_onnx.explain_dataset(lm, word_tokenizer, dataset_200, whole, batch_size=16, shard_rows=48, progress=False)
    out = tmp_path / "out.parquet"

    def crash(index, rows):
        if index == 1:
            raise KeyboardInterrupt("stopped after two shards")

    with pytest.raises(KeyboardInterrupt):
        lrp_onnx.explain_dataset(lm, word_tokenizer, dataset_200, out, batch_size=16, shard_rows=48, progress=False,
                                 on_shard=crash)
    assert not out.exists()
    shards = sorted(p.name for p in (tmp_path / "out.parquet.shards").iterdir() if p.suffix == ".parquet")
    assert len(shards) == 2 and not [p for p in (tmp_path / "out.parquet.shards").iterdir() if "partial" in p.name]
    # another job's shards are refused, one line, exit 2, nothing written; the shards are kept
    refused = lrp("explain-dataset", lm, "--tokenizer", word_tokenizer, "--input", dataset_200, "--out", out,
                  "--batch-size", "8", "--shard-rows", "48", "--quiet")
    assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    assert "another job" in refused.stderr and "batch_size differs" in refused.stderr
    assert not out.exists()
    resumed = lrp("explain-dataset", lm, "--tokenizer", word_tokenizer, "--input", dataset_200, "--out", out,
                  "--batch-size", "16", "--shard-rows", "48", "--quiet")
    assert resumed.returncode == 0, resumed.stderr
    assert "2 of 5 shards resumed" in resumed.stdout
    assert out.read_bytes() == whole.read_bytes()
    assert not (tmp_path / "out.parquet.shards").exists()
    # --restart discards another job's shards
    with pytest.raises(KeyboardInterrupt):
        lrp_onnx.explain_dataset(lm, word_tokenizer, dataset_200, out, batch_size=16, shard_rows=48, progress=False,
                                 on_shard=crash)
    result = lrp_onnx.explain_dataset(lm, word_tokenizer, dataset_200, out, batch_size=16, shard_rows=48, limit=120,
                                      max_length=30, restart=True, progress=False)
    assert result.resumed_shards == 0 and result.rows == 120


def test_bad_rows_land_in_the_error_column(lm, classifier, word_tokenizer, tmp_path):
    good = texts(12, seed=2, longest=20)
    rows = [{"text": t} for t in good]
    bad = {2: ({"text": ""}, "empty text"), 4: ({"text": "   "}, "empty text"), 5: ({"text": None}, "no text"),
           7: ({"text": " ".join(["w3"] * 31)}, "31 tokens, longer than --max-length 30"),
           9: ({"text": "w4 w5", "target": 100}, "target 100 (row 0) is out of range"),
           10: ({"text": "w4 w5", "target": -3}, "target -3 is negative"),
           11: ({"text": "w4 w5 w6", "position": 3}, "position 3 is outside the text's 3 tokens")}
    for at, (row, _) in sorted(bad.items()):
        rows.insert(at, row)
    rows[0]["target"], rows[1] = 42, {"text": "w1 w2 w3 w4", "position": -2}  # good ones
    data = write_jsonl(tmp_path / "bad.jsonl", rows)
    out = tmp_path / "out.parquet"
    done = lrp("explain-dataset", lm, "--tokenizer", word_tokenizer, "--input", data, "--out", out, "--quiet",
               "--target-column", "target", "--position-column", "position", "--max-length", "30", "--batch-size", "4")
    assert done.returncode == 0, done.stderr
    table = pq.read_table(out).to_pylist()
    assert f"{len(rows)} rows, {len(bad)} with an error" in done.stdout
    explainer = Explainer(lm, providers=["CPUExecutionProvider"])
    for i, (row, got) in enumerate(zip(rows, table)):
        if i in bad:
            assert got["error"] is not None and bad[i][1] in got["error"], (i, got["error"])
            assert got["relevance"] is None and got["target"] is None and got["logit"] is None
            continue
        assert got["error"] is None, (i, got["error"])
        target = row.get("target")
        target = int(target[1:]) if isinstance(target, str) else target
        expected, target_out, logit = reference_row(explainer, row["text"], target, row.get("position"))
        np.testing.assert_allclose(got["relevance"], expected, rtol=0, atol=TOLERANCE)
        assert got["target"] == target_out and got["logit"] == pytest.approx(logit, abs=TOLERANCE)
        if target is not None:
            assert got["target"] == target
    # targets given as vocabulary tokens
    tokens = write_jsonl(tmp_path / "tokens.jsonl", [{"text": "w4 w5", "target": "w17"}, {"text": "w4", "target": "nope"}])
    lrp_onnx.explain_dataset(lm, word_tokenizer, tokens, tmp_path / "tokens.parquet", target_column="target",
                             progress=False)
    got = pq.read_table(tmp_path / "tokens.parquet").to_pylist()
    expected, _, logit = reference_row(explainer, "w4 w5", 17)
    assert got[0]["target"] == 17 and got[0]["logit"] == pytest.approx(logit, abs=TOLERANCE)
    np.testing.assert_allclose(got[0]["relevance"], expected, rtol=0, atol=TOLERANCE)
    assert got[1]["error"] == "target token 'nope' is not in the vocabulary"
    # a classifier's 64-position table: longer rows are bad rows, not a failed run
    long_rows = write_jsonl(tmp_path / "long.jsonl", [{"text": "w5 w6"}, {"text": " ".join(["w7"] * 70)}])
    result = lrp_onnx.explain_dataset(classifier, word_tokenizer, long_rows, tmp_path / "long.parquet", progress=False)
    errors = pq.read_table(tmp_path / "long.parquet").column("error").to_pylist()
    assert result.errors == 1 and errors[0] is None
    # its position table is not recorded as a limit in this export: onnxruntime's refusal is the row's error
    assert "longer than the model's 64 positions" in errors[1] or "invalid expand shape" in errors[1], errors[1]


def test_bad_arguments_fail_cleanly(lm, word_tokenizer, dataset_200, tmp_path):
    out = tmp_path / "out.parquet"
    cases = [(["--text-column", "sentence"], "no column 'sentence'"),
             (["--position-column", "id"], None),  # strings: each row's error, not the run's
             (["--batch-size", "0"], "--batch-size must be a positive integer")]
    for extra, message in cases:
        done = lrp("explain-dataset", lm, "--tokenizer", word_tokenizer, "--input", dataset_200, "--out", out,
                   "--quiet", "--limit", "3", *extra)
        if message is None:
            assert done.returncode == 0, done.stderr
            assert "3 rows, 3 with an error" in done.stdout
            out.unlink()
            continue
        assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
        assert message in done.stderr
        assert not out.exists() and not (tmp_path / "out.parquet.shards").exists()
    unknown = tmp_path / "data.xml"
    unknown.write_text("<a/>")
    done = lrp("explain-dataset", lm, "--tokenizer", word_tokenizer, "--input", unknown, "--out", out)
    assert done.returncode == 2 and "unknown input format '.xml'" in done.stderr and not out.exists()


def test_worker_processes_equal_the_local_run_and_no_ray_import(lm, word_tokenizer, dataset_200, tmp_path):
    local = tmp_path / "local.parquet"
    code = ("import sys, lrp_onnx; r = lrp_onnx.explain_dataset(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], "
            "batch_size=16, shard_rows=64, limit=150, progress=False, workers=int(sys.argv[5])); "
            "assert r.rows == 150; print(sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.')))")
    for path, workers in ((local, 1), (tmp_path / "workers.parquet", 2)):
        done = subprocess.run([sys.executable, "-c", code, lm, word_tokenizer, dataset_200, path, str(workers)],
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == "[]"  # Ray is imported only with --ray
    a, b = pq.read_table(local), pq.read_table(tmp_path / "workers.parquet")
    assert a.drop_columns(["relevance", "logit"]).equals(b.drop_columns(["relevance", "logit"]))
    for x, y in zip(a.column("relevance").to_pylist(), b.column("relevance").to_pylist()):
        np.testing.assert_allclose(x, y, rtol=0, atol=TOLERANCE)


def test_ray_local_cluster_gives_the_local_table(lm, word_tokenizer, dataset_200, tmp_path):
    import ray
    local = tmp_path / "local.parquet"
    lrp_onnx.explain_dataset(lm, word_tokenizer, dataset_200, local, batch_size=16, shard_rows=40, progress=False,
                             threads=1)
    ray.init(num_cpus=2, address="local", include_dashboard=False, log_to_driver=False,
             _node_ip_address="127.0.0.1")
    try:
        result = lrp_onnx.explain_dataset(lm, word_tokenizer, dataset_200, tmp_path / "ray.parquet", batch_size=16,
                                          shard_rows=40, progress=False, ray="", workers=2)
    finally:
        ray.shutdown()
    assert (result.rows, result.shards) == (200, 5)
    a, b = pq.read_table(local), pq.read_table(tmp_path / "ray.parquet")
    assert a.schema.equals(b.schema, check_metadata=True)
    assert a.equals(b)  # the same shards, each explained in the same batches: the same numbers
    assert local.read_bytes() == (tmp_path / "ray.parquet").read_bytes()


def lrp(*args):
    return subprocess.run([sys.executable, "-m", "lrp_onnx", *map(str, args)], capture_output=True, text=True,
                          timeout=300)


# -- --generate: each row's greedy continuation explained (as Explainer.explain_generation) ---------------------
GENERATE = 5


@pytest.fixture(scope="module")
def lm_multi(tiny_model, workdir):
    """The tiny llama converted with attnlrp and multi_target=True (every generated token in one run)."""
    _, path = tiny_model("llama")
    out = workdir / "dataset-llama.multi.lrp.onnx"
    if not out.exists():
        lrp_onnx.convert(path, out, rules="attnlrp", multi_target=True)
    return out


def stop_tokenizer(path, stop):
    """The word tokenizer with id `stop` named '</s>' (an end token: generation stops there)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, **{("</s>" if i == stop else f"w{i}"): i for i in range(1, 100)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(path))
    return path


def test_generate_rows_equal_explain_generation_and_resume(lm_multi, word_tokenizer, tmp_path):
    explainer = Explainer(lm_multi, providers=["CPUExecutionProvider"])
    prompts = texts(7, seed=3, longest=12)
    # an end token that some rows generate after their first token and others never: rows of different lengths
    plain = [explainer.explain_generation(ids_of(t)[0], GENERATE).generated_ids.tolist() for t in prompts]
    later = [g[1:] for g in plain]
    stop = next(s for g in later for s in g if 0 < sum(s in h for h in later) < len(later))
    tokenizer = stop_tokenizer(tmp_path / "stop-tokenizer.json", stop)
    rows = [{"id": i, "text": t} for i, t in enumerate(prompts)]
    rows.insert(3, {"id": 99, "text": " "})  # a bad row
    data = write_jsonl(tmp_path / "prompts.jsonl", rows)
    whole = tmp_path / "whole.parquet"
    result = lrp_onnx.explain_dataset(lm_multi, tokenizer, data, whole, generate=GENERATE, shard_rows=3,
                                      progress=False)
    assert (result.rows, result.errors, result.shards) == (8, 1, 3)
    table = pq.read_table(whole)
    assert table.schema.field("relevance").type == pa.list_(pa.list_(pa.float32()))
    assert table.schema.field("logit").type == pa.list_(pa.float32())
    meta = json.loads(table.schema.metadata[b"lrp_onnx"])
    assert meta["generate"] == GENERATE and meta["multi_target"] is True
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(tokenizer))
    lengths = set()
    for i, got in enumerate(table.to_pylist()):
        assert got["row"] == i and got["id"] == rows[i]["id"]
        if rows[i]["text"] == " ":
            assert got["error"] == "empty text" and got["relevance"] is None and got["generated_ids"] is None
            continue
        assert got["error"] is None, got["error"]
        ids = tok.encode(rows[i]["text"]).ids
        g = explainer.explain_generation(np.array(ids), GENERATE, tokenizer=tok)
        n, p = len(g.generated_ids), len(ids)
        lengths.add(n)
        assert got["token_ids"] == ids and got["generated_ids"] == g.generated_ids.tolist() == got["target"]
        assert got["generated_tokens"] == [tok.id_to_token(t) for t in g.generated_ids]
        assert got["generated_text"] == g.text and got["stopped"] == g.stopped == (g.generated_ids[-1] == stop)
        matrix = np.array(got["relevance"], dtype=np.float32)
        assert matrix.shape == g.relevance.shape == (n, p + n - 1)
        np.testing.assert_allclose(matrix, g.relevance, rtol=0, atol=TOLERANCE, err_msg=f"row {i}")
        np.testing.assert_allclose(got["logit"], g.logits, rtol=0, atol=TOLERANCE)
        assert got["position"] == list(range(p - 1, p - 1 + n))
    assert len(lengths) > 1 and min(lengths) < GENERATE  # some rows stopped at the end token

    # interrupted after the first shard, resumed by the command: the same bytes
    out = tmp_path / "out.parquet"

    def crash(index, rows):
        raise KeyboardInterrupt("stopped after one shard")

    with pytest.raises(KeyboardInterrupt):
        lrp_onnx.explain_dataset(lm_multi, tokenizer, data, out, generate=GENERATE, shard_rows=3, progress=False,
                                 on_shard=crash)
    other = lrp("explain-dataset", lm_multi, "--tokenizer", tokenizer, "--input", data, "--out", out,
                "--generate", str(GENERATE + 1), "--shard-rows", "3", "--quiet")
    assert other.returncode == 2 and "generate differs" in other.stderr, other.stderr
    resumed = lrp("explain-dataset", lm_multi, "--tokenizer", tokenizer, "--input", data, "--out", out,
                  "--generate", str(GENERATE), "--shard-rows", "3", "--quiet")
    assert resumed.returncode == 0, resumed.stderr
    assert "8 rows, 1 with an error" in resumed.stdout and "1 of 3 shards resumed" in resumed.stdout
    assert out.read_bytes() == whole.read_bytes()


def test_generate_refusals(lm_multi, classifier, word_tokenizer, dataset_200, tmp_path):
    out = tmp_path / "out.parquet"
    cases = [(lm_multi, dict(target_column="id"), "--generate explains the generated tokens: --target-column"),
             (lm_multi, dict(full=True), "--full does not apply"),
             (lm_multi, dict(generate=0), "--generate must be a positive integer, got 0"),
             (classifier, {}, "--generate explains what a language model generates")]
    for model, kwargs, message in cases:
        with pytest.raises(lrp_onnx.LRPError, match=message):
            lrp_onnx.explain_dataset(model, word_tokenizer, dataset_200, out, progress=False, limit=2,
                                     **{"generate": 3, **kwargs})
        assert not out.exists() and not (tmp_path / "out.parquet.shards").exists()
