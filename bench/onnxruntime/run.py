"""Baseline for bench/benches/onnxruntime.rs: the `onnxruntime` wheel from
Python on the same model, one text per call, one intra-op and one inter-op
thread. Two kinds of pass:

- `run`: the token ids the Rust side computed (IDS.json), so no
  tokenization in the time: ONNX Runtime's own floor.
- `job`: what the embed job does, in Python: tokenize each text with
  Hugging Face `tokenizers` (the model's tokenizer.json), run, and
  L2-normalise the pooled vector (the vectors stay numpy arrays: no output
  encoding, which the job's JSON output pays for).

Before any pass it checks that `tokenizers` gives exactly the ids in
IDS.json for TEXTS.json (same inputs on both sides) and exits otherwise.

usage: python run.py MODEL.onnx IDS.json WARMUP ITERATIONS [TOKENIZER.json TEXTS.json]
(ITERATIONS = 0: one pass per line read from stdin, `run` or `job`,
printing its seconds)
"""
import json
import statistics
import sys
import time

import numpy as np
import onnxruntime as ort

model, ids_file, warmup, iterations = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
opts = ort.SessionOptions()
opts.intra_op_num_threads = 1
opts.inter_op_num_threads = 1
session = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
all_ids = json.load(open(ids_file))
texts = [np.array([ids], dtype=np.int64) for ids in all_ids]


def pooled(ids):
    """The pooled output (only that one is asked for) of one text's ids."""
    (out,) = session.run(["461"], {"input_ids": ids, "attention_mask": np.ones_like(ids)})
    return out[0]


def one_pass():
    for ids in texts:
        pooled(ids)


raw_texts, tokenizer = [], None
if len(sys.argv) > 6:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(sys.argv[5])
    tokenizer.no_padding()
    tokenizer.enable_truncation(128)
    raw_texts = json.load(open(sys.argv[6]))
    got = [tokenizer.encode(t).ids for t in raw_texts]
    if got != all_ids:
        bad = next(i for i, (a, b) in enumerate(zip(got, all_ids)) if a != b)
        sys.exit(f"tokenizers gives other ids than the Rust side for text {bad}: {got[bad]} vs {all_ids[bad]}")


def job_pass():
    vectors = []
    for text in raw_texts:
        v = pooled(np.array([tokenizer.encode(text).ids], dtype=np.int64))
        vectors.append(v / np.linalg.norm(v))
    return vectors


if iterations == 0:
    # Interleaved mode: one pass per line on stdin, its seconds on stdout,
    # so the Rust side alternates passes with its own (side by side).
    for line in sys.stdin:
        kind = line.strip()
        t = time.perf_counter()
        if kind == "job":
            job_pass()
        else:
            one_pass()
        print(time.perf_counter() - t, flush=True)
    sys.exit(0)

for _ in range(warmup):
    one_pass()
times = []
for _ in range(iterations):
    t = time.perf_counter()
    one_pass()
    times.append(time.perf_counter() - t)
print(f"median {statistics.median(times)} {ort.__version__}")
