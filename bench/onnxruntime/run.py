"""Baseline for bench/benches/onnxruntime.rs: the `onnxruntime` wheel from
Python on the same model and the same token ids (tokenized by the Rust side,
so tokenization is not in this baseline's time), one text per call, one
intra-op and one inter-op thread. Prints the median seconds per pass over
all texts.

usage: python run.py MODEL.onnx IDS.json WARMUP ITERATIONS
(ITERATIONS = 0: one pass per line read from stdin, printing its seconds)
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
texts = [np.array([ids], dtype=np.int64) for ids in json.load(open(ids_file))]


def one_pass():
    for ids in texts:
        session.run(["461"], {"input_ids": ids, "attention_mask": np.ones_like(ids)})


if iterations == 0:
    # Interleaved mode: one pass per line on stdin, its seconds on stdout,
    # so the Rust side alternates passes with its own (side by side).
    for line in sys.stdin:
        t = time.perf_counter()
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
