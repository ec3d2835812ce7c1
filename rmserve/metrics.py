"""Prometheus metrics, one registry per app (so several apps in one process never collide).

Names (all labelled by ``model``; requests also by ``endpoint`` and ``status``):

- ``rmserve_requests_total``: requests answered, by HTTP status;
- ``rmserve_request_duration_seconds``: time from request arrival to response;
- ``rmserve_queue_time_seconds``: time each input waited in the queue;
- ``rmserve_inference_time_seconds``: time of each batch's forward pass;
- ``rmserve_batch_size``: inputs per batch;
- ``rmserve_batch_tokens``: real tokens per batch;
- ``rmserve_real_tokens_total`` / ``rmserve_padded_tokens_total``: tokens scored vs computed
  (padding efficiency = real / padded, also exported per batch as ``rmserve_padding_efficiency``);
- ``rmserve_batches_total``: batches run, by outcome (``ok``/``failed``);
- ``rmserve_dropped_inputs_total``: queued inputs dropped because their client hung up;
- ``rmserve_queue_depth`` / ``rmserve_queue_tokens``: inputs and tokens waiting now;
- ``rmserve_input_tokens_total``: tokens of the inputs of answered (200) requests, after truncation;
- ``rmserve_model_weights_bytes``: memory of each model's weights and buffers on its device;
- ``rmserve_model_memory_estimate_bytes``: each model's planned memory, weights plus the activation
  peak of its largest batch (``rmserve.memory.estimate``; only for models the server loaded itself);
- ``rmserve_device_memory_budget_bytes``: the memory budget of each device, labelled by ``device``
  (``cpu``, ``cuda:0``, ...) instead of ``model``;
- ``rmserve_queue_waiting_requests``: trainer-route requests waiting for room in a full queue;
- ``rmserve_run_signal``: the run monitor's signals of each run's last closed window, labelled by
  ``run``, ``model`` and ``signal`` (``rmserve.monitor.SIGNALS``); a run the monitor drops loses its
  labels, so the label sets stay within ``monitor_max_runs`` x models x signals.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from rmserve.monitor import SIGNALS, Window

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 180)
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
TOKEN_BUCKETS = (16, 64, 256, 1024, 2048, 4096, 8192, 16384, 32768, 65536)
RATIO_BUCKETS = (0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.98, 1.0)


class Metrics:
    """The server's metrics, registered on a registry of their own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "rmserve_requests_total", "Requests answered.", ["model", "endpoint", "status"], registry=r
        )
        self.request_duration = Histogram(
            "rmserve_request_duration_seconds",
            "Request latency.",
            ["model", "endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_time = Histogram(
            "rmserve_queue_time_seconds",
            "Queue wait per input.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.inference_time = Histogram(
            "rmserve_inference_time_seconds",
            "Forward time per batch.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "rmserve_batch_size", "Inputs per batch.", ["model"], buckets=SIZE_BUCKETS, registry=r
        )
        self.batch_tokens = Histogram(
            "rmserve_batch_tokens", "Real tokens per batch.", ["model"], buckets=TOKEN_BUCKETS, registry=r
        )
        self.padding_efficiency = Histogram(
            "rmserve_padding_efficiency",
            "Real / padded tokens per batch.",
            ["model"],
            buckets=RATIO_BUCKETS,
            registry=r,
        )
        self.real_tokens = Counter("rmserve_real_tokens_total", "Tokens scored.", ["model"], registry=r)
        self.padded_tokens = Counter(
            "rmserve_padded_tokens_total", "Tokens computed, padding included.", ["model"], registry=r
        )
        self.prefix_reused = Counter(
            "rmserve_prefix_tokens_reused_total",
            "Tokens not computed because inputs shared a prefix (computed once for the group).",
            ["model"],
            registry=r,
        )
        self.duplicate_lookups = Counter(
            "rmserve_duplicate_cache_lookups_total",
            "Inputs looked up in the exact-duplicate cache.",
            ["model"],
            registry=r,
        )
        self.duplicate_hits = Counter(
            "rmserve_duplicate_cache_hits_total",
            "Inputs answered from the exact-duplicate cache, without a forward.",
            ["model"],
            registry=r,
        )
        self.batches = Counter("rmserve_batches_total", "Batches run.", ["model", "outcome"], registry=r)
        self.dropped = Counter(
            "rmserve_dropped_inputs_total",
            "Queued inputs dropped after their client hung up.",
            ["model"],
            registry=r,
        )
        self.model_weights = Gauge(
            "rmserve_model_weights_bytes", "Memory of the model's weights and buffers.", ["model"], registry=r
        )
        self.model_memory_estimate = Gauge(
            "rmserve_model_memory_estimate_bytes",
            "Planned memory of the model: weights plus the activation peak of its largest batch.",
            ["model"],
            registry=r,
        )
        self.device_memory_budget = Gauge(
            "rmserve_device_memory_budget_bytes", "Memory budget of the device.", ["device"], registry=r
        )
        self.queue_depth = Gauge("rmserve_queue_depth", "Inputs waiting.", ["model"], registry=r)
        self.queue_tokens = Gauge("rmserve_queue_tokens", "Tokens waiting.", ["model"], registry=r)
        self.run_signal = Gauge(
            "rmserve_run_signal",
            "Run monitor: each signal of a run's last closed window (bounded: the monitor's runs).",
            ["run", "model", "signal"],
            registry=r,
        )
        self.queue_waiting = Gauge(
            "rmserve_queue_waiting_requests",
            "Trainer-route requests waiting for room in a full queue.",
            ["model"],
            registry=r,
        )
        self.input_tokens = Counter(
            "rmserve_input_tokens_total", "Tokens of the inputs of answered requests.", ["model"], registry=r
        )

    def observer(self, model: str) -> ModelObserver:
        """The batcher observer for one model."""
        return ModelObserver(self, model)

    def run_window(self, run: str, model: str, window: Window) -> None:
        """A run's window closed: its signals become the run's gauges (an absent signal is NaN)."""
        for name in SIGNALS:
            value = window.signal(name)
            self.run_signal.labels(run, model, name).set(float("nan") if value is None else value)

    def run_evicted(self, run: str, models: Sequence[str]) -> None:
        """A run was dropped by the monitor: its label sets go too."""
        for model in models:
            for name in SIGNALS:
                with contextlib.suppress(KeyError):  # no window of it closed yet
                    self.run_signal.remove(run, model, name)

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)


class ModelObserver:
    """Feeds one model's batcher measurements into the metrics (implements ``BatchObserver``)."""

    def __init__(self, metrics: Metrics, model: str) -> None:
        self._m = metrics
        self._model = model

    def batch_done(
        self,
        *,
        size: int,
        real_tokens: int,
        padded_tokens: int,
        queue_s: Sequence[float],
        inference_s: float,
        ok: bool,
    ) -> None:
        m, name = self._m, self._model
        m.batches.labels(name, "ok" if ok else "failed").inc()
        m.batch_size.labels(name).observe(size)
        m.batch_tokens.labels(name).observe(real_tokens)
        m.inference_time.labels(name).observe(inference_s)
        m.real_tokens.labels(name).inc(real_tokens)
        m.padded_tokens.labels(name).inc(padded_tokens)
        m.padding_efficiency.labels(name).observe(real_tokens / padded_tokens if padded_tokens else 1.0)
        queue_hist = m.queue_time.labels(name)
        for waited in queue_s:
            queue_hist.observe(waited)

    def queue_changed(self, *, items: int, tokens: int) -> None:
        self._m.queue_depth.labels(self._model).set(items)
        self._m.queue_tokens.labels(self._model).set(tokens)

    def waiting_changed(self, requests: int) -> None:
        self._m.queue_waiting.labels(self._model).set(requests)

    def items_dropped(self, count: int) -> None:
        self._m.dropped.labels(self._model).inc(count)

    def prefix_reused(self, tokens: int) -> None:
        self._m.prefix_reused.labels(self._model).inc(tokens)

    def duplicates_looked_up(self, *, lookups: int, hits: int) -> None:
        self._m.duplicate_lookups.labels(self._model).inc(lookups)
        self._m.duplicate_hits.labels(self._model).inc(hits)
