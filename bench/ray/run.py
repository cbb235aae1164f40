"""Ray baseline for the pool benchmark (issue #18): N no-op tasks on a local
Ray with 4 CPUs, end to end (submit every task, wait for every result);
prints "N seconds"."""
import sys
import time

import ray

n = int(sys.argv[1])
ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)


@ray.remote
def echo(x):
    return x


inputs = [f"input {i}" for i in range(n)]
# Warm up the workers (as the other two sides do).
assert ray.get([echo.remote(x) for x in inputs[:200]]) == inputs[:200]
start = time.perf_counter()
out = ray.get([echo.remote(x) for x in inputs])
elapsed = time.perf_counter() - start
assert out == inputs, "ray returned wrong results"
print(f"{n} {elapsed:.6f}")
ray.shutdown()
