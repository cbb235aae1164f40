"""Celery baseline for Tidepool's pool benchmark: the same trivial job
(return the input) through Celery with a Redis broker and result backend."""
import os
from celery import Celery

url = os.environ.get("BENCH_REDIS", "redis://127.0.0.1:6379/0")
app = Celery("tasks", broker=url, backend=url)
app.conf.update(
    task_acks_late=True,            # like Tidepool's leases: a task is not lost with its worker
    worker_prefetch_multiplier=64,  # like Tidepool's lease batches
    result_expires=3600,
    broker_connection_retry_on_startup=True,
)


@app.task
def echo(x):
    return x
