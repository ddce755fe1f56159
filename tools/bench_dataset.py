"""Rows/s of `explain-dataset` on a converted model: local (one session), local worker processes, and
Ray Data on a local cluster.

    python tools/bench_dataset.py MODEL.lrp.onnx TOKENIZER.json --rows 256 [--modes local,workers2,ray2]

Writes a JSONL of --rows English sentences of mixed length (5..60 words) to a temporary folder and
runs lrp_onnx.explain_dataset on it once per mode; prints rows/s (rows explained / seconds of
explaining, excluding reading the input and opening the first session) and the wall time."""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

WORDS = ("the model explains each prediction with relevance scores over its input tokens so that a reader can "
         "see which words of a review a question or a document mattered for the answer and which did not while "
         "the dataset command writes every row into a parquet file").split()


def sentences(n, seed=0):
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.choice([5, 10, 15, 20, 30, 40, 60]))).capitalize() + "."
            for _ in range(n)]


def main(argv=None):
    import lrp_onnx

    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("tokenizer")
    p.add_argument("--rows", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--shard-rows", type=int, default=64)
    p.add_argument("--modes", default="local,workers2,ray2")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "data.jsonl")
        with open(data, "w") as f:
            for i, text in enumerate(sentences(args.rows)):
                f.write(json.dumps({"id": i, "text": text}) + "\n")
        for mode in args.modes.split(","):
            options = {"local": {}, "workers2": {"workers": 2}, "ray2": {"ray": "", "workers": 2}}[mode]
            start = time.perf_counter()
            result = lrp_onnx.explain_dataset(args.model, args.tokenizer, data, os.path.join(tmp, f"{mode}.parquet"),
                                              batch_size=args.batch_size, shard_rows=args.shard_rows, progress=False,
                                              **options)
            wall = time.perf_counter() - start
            print(json.dumps({"model": os.path.basename(os.path.dirname(os.path.abspath(args.model))), "mode": mode,
                              "rows": result.rows, "errors": result.errors,
                              "rows_per_s": round(result.rows_per_second, 2), "wall_s": round(wall, 1)}), flush=True)


if __name__ == "__main__":
    main()
