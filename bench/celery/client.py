"""Submit N echo tasks to Celery and wait for every result; print tasks/s."""
import sys
import time
from celery import group
from tasks import echo

n = int(sys.argv[1])
inputs = [f"input {i}" for i in range(n)]
# Warm up the workers.
group(echo.s(x) for x in inputs[:200]).apply_async().get(timeout=120)
start = time.perf_counter()
res = group(echo.s(x) for x in inputs).apply_async()
out = res.get(timeout=600)
elapsed = time.perf_counter() - start
assert out == inputs, "celery returned wrong results"
print(f"{n} {elapsed:.6f}")
