"""Concurrent requests scored together, the way Triton's dynamic batcher does it.

Every request's preprocessed rows ([n, 3, H, W]) join one FIFO queue. The inference thread takes
the oldest request, then adds the requests queued behind it while they are for the same served
version (the same `LoadedModel`), have the same row shape and their rows fit the version's
`max_batch_size`, waiting at most `max_queue_delay_s` after taking the oldest; then it runs one
session call and hands each request its own rows of every output. Both numbers come from the
served version's config.pbtxt (`max_batch_size`, `dynamic_batching.max_queue_delay_microseconds`,
written from params.yaml `export.triton_max_batch_size` / `export.triton_max_queue_delay_us`), so
`r2m serve` and Triton batch the same requests alike (deploy/README.md, "Batching").

A batch never mixes versions: after a hot reload, the first request for the new version waits
until the batch ahead of it is dispatched and starts the next one, so every answer comes from
the version it names. A request larger than `max_batch_size` (an Open Inference Protocol batch)
runs alone. One inference thread runs the calls one after another; ONNX Runtime's intra-op threads
(`serve.threads`) parallelise inside each call.

`BatchStats` counts what ran, per version and batch size, as Triton's statistics extension
reports it (`GET /v2/models/<name>/stats`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np

log = logging.getLogger("r2m.serving")


class BatchStats:
    """Session calls per (version, rows in the call): count and nanoseconds spent, thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._calls: dict[int, dict[int, list[int]]] = {}  # version -> rows -> [calls, ns]
        self._requests: dict[int, int] = {}

    def record(self, version: int, rows: int, requests: int, ns: int) -> None:
        with self._lock:
            cell = self._calls.setdefault(version, {}).setdefault(rows, [0, 0])
            cell[0] += 1
            cell[1] += ns
            self._requests[version] = self._requests.get(version, 0) + requests

    def model_stats(self, name: str) -> list[dict]:
        """Triton's statistics extension, the fields r2m fills: per version, `inference_count`
        (rows scored), `execution_count` (session calls), `request_count` and `batch_stats`
        (per batch size: `compute_infer` {count, ns})."""
        with self._lock:
            out = []
            for version in sorted(self._calls):
                sizes = self._calls[version]
                out.append({
                    "name": name, "version": str(version),
                    "inference_count": sum(rows * c for rows, (c, _) in sizes.items()),
                    "execution_count": sum(c for c, _ in sizes.values()),
                    "request_count": self._requests.get(version, 0),
                    "batch_stats": [{"batch_size": rows, "compute_infer": {"count": c, "ns": ns}}
                                    for rows, (c, ns) in sorted(sizes.items())],
                })
            return out


def run_session(model, x: np.ndarray, stats: BatchStats | None = None, requests: int = 1) -> list[np.ndarray]:
    """Every output of `model` (a `LoadedModel`) for rows `x`, in `model.output_names` order."""
    start = time.perf_counter_ns()
    outputs = model.session.run(None, {model.input_name: x})
    if stats is not None:
        stats.record(model.version, len(x), requests, time.perf_counter_ns() - start)
    return outputs


@dataclass
class _Request:
    model: object  # LoadedModel: compared by identity, so two loads of one version never share a batch
    x: np.ndarray
    future: Future = field(default_factory=Future)


class Batcher:
    """The queue and the inference thread. `submit` from any thread; `stop` fails what is still queued."""

    def __init__(self, stats: BatchStats | None = None, name: str = "r2m-batcher"):
        self.stats = stats or BatchStats()
        self._name = name
        self._queue: deque[_Request] = deque()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False

    def start(self) -> None:
        with self._cond:
            if self._thread is None or not self._thread.is_alive():
                self._stopping = False
                self._thread = threading.Thread(target=self._loop, name=self._name, daemon=True)
                self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join(timeout)
        with self._cond:
            self._thread = None
            while self._queue:
                self._queue.popleft().future.set_exception(RuntimeError("the server is shutting down"))

    def submit(self, model, x: np.ndarray) -> Future:
        """Queue rows `x` [n, ...] for `model`; the future's result is every output's n rows."""
        request = _Request(model, x)
        with self._cond:
            if self._stopping:
                raise RuntimeError("the server is shutting down")
            self._queue.append(request)
            self._cond.notify_all()
        if self._thread is None:
            self.start()
        return request.future

    def _joins(self, first: _Request, rows: int) -> bool:
        """Whether the request at the front of the queue may join `first`'s batch of `rows` rows."""
        nxt = self._queue[0]
        return (nxt.model is first.model and nxt.x.shape[1:] == first.x.shape[1:]
                and rows + len(nxt.x) <= first.model.batching.max_batch_size)

    def _take(self) -> list[_Request] | None:
        """The next batch (None once stopping): the oldest request and those that may join it."""
        with self._cond:
            while True:
                while not self._queue and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    return None
                first = self._queue.popleft()
                if first.future.set_running_or_notify_cancel():
                    break
            batch, rows = [first], len(first.x)
            policy = first.model.batching
            deadline = time.monotonic() + policy.max_queue_delay_s
            while rows < policy.max_batch_size:
                while self._queue and self._joins(first, rows):
                    request = self._queue.popleft()
                    if request.future.set_running_or_notify_cancel():
                        batch.append(request)
                        rows += len(request.x)
                if self._queue or rows >= policy.max_batch_size:
                    break  # full, or the next request starts the next batch (another version, no room)
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._stopping:
                    break
                self._cond.wait(remaining)
            return batch

    def _loop(self) -> None:
        while (batch := self._take()) is not None:
            model = batch[0].model
            x = batch[0].x if len(batch) == 1 else np.concatenate([r.x for r in batch])
            try:
                outputs = run_session(model, x, self.stats, len(batch))
            except Exception as err:  # e.g. ONNX Runtime refusing an input: every request of the batch learns why
                log.error("scoring a batch of %d rows on version %s failed: %s", len(x), model.version, err)
                for request in batch:
                    request.future.set_exception(err)
                continue
            start = 0
            for request in batch:
                n = len(request.x)
                request.future.set_result([o[start : start + n] for o in outputs])
                start += n
