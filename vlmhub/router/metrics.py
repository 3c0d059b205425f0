"""Prometheus metrics of the router and the supervisor, in a registry of their own.

The router counts requests; the supervisor reports loads and evictions through
:meth:`RouterMetrics.observe_load` and :meth:`RouterMetrics.observe_eviction`; the gauges
(queue depth, in flight, model state) are refreshed from a supervisor snapshot at scrape time.
Every method is synchronous and non-blocking; prometheus_client is thread-safe.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from vlmhub.control.contract import STATES, ReplicaInfo

UNKNOWN_MODEL = "(unknown)"
"""The model label of requests that named no configured model (keeps label values bounded)."""

REQUEST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
LOAD_BUCKETS = (0.5, 1, 2, 5, 10, 20, 30, 45, 60, 90, 120, 180, 300, 600, 900)


class LoadObserver(Protocol):
    """What the supervisor reports to (implemented by :class:`RouterMetrics`)."""

    def observe_load(self, model: str, seconds: float, ok: bool) -> None: ...

    def observe_eviction(self, model: str, mode: str) -> None: ...


class RouterMetrics:
    """Counters, histograms and gauges of one router; ``render`` gives the text format."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.requests = Counter("vlmhub_requests", "Requests answered, by model and HTTP status.",
                                ["model", "status"], registry=r)
        self.request_seconds = Histogram(
            "vlmhub_request_seconds",
            "Seconds from receiving a request to sending its response headers (queueing and "
            "model loading included).", ["model"], buckets=REQUEST_BUCKETS, registry=r)
        self.queue_depth = Gauge("vlmhub_queue_depth", "Requests waiting for the model.",
                                 ["model"], registry=r)
        self.in_flight = Gauge("vlmhub_in_flight", "Requests being served by the model's engine.",
                               ["model"], registry=r)
        self.replica_in_flight = Gauge(
            "vlmhub_replica_in_flight", "Requests in flight on each replica of a model with "
            "several (replicas in models.yaml).", ["model", "replica"], registry=r)
        self.replica_state = Gauge("vlmhub_replica_state", "1 for each replica's current "
                                   "state, 0 for the others.", ["model", "replica", "state"],
                                   registry=r)
        self.model_state = Gauge("vlmhub_model_state",
                                 "1 for the model's current state, 0 for the others.",
                                 ["model", "state"], registry=r)
        self.loads = Counter("vlmhub_loads", "Engine starts, by result (ok or failed).",
                             ["model", "result"], registry=r)
        self.load_seconds = Histogram("vlmhub_load_seconds",
                                      "Seconds from starting an engine to it being ready.",
                                      ["model"], buckets=LOAD_BUCKETS, registry=r)
        self.evictions = Counter("vlmhub_evictions", "Models evicted to make room, by mode.",
                                 ["model", "mode"], registry=r)
        self.prompt_tokens = Counter("vlmhub_prompt_tokens", "Prompt tokens the engines "
                                     "counted, by key name and model.", ["key", "model"],
                                     registry=r)
        self.completion_tokens = Counter("vlmhub_completion_tokens", "Completion tokens the "
                                         "engines counted, by key name and model.",
                                         ["key", "model"], registry=r)
        self._usage: dict[tuple[str, str], tuple[Counter, Counter]] = {}
        self._counted: dict[tuple[str, int], Counter] = {}  # labelled children, made once
        self._timed: dict[str, Histogram] = {}

    def observe_request(self, model: str | None, status: int, seconds: float | None) -> None:
        """One answered request; ``seconds`` to its headers (None: not timed)."""
        label = model or UNKNOWN_MODEL
        counter = self._counted.get((label, status))
        if counter is None:  # labels() costs a lock and a lookup: once per model and status
            counter = self._counted[(label, status)] = self.requests.labels(
                model=label, status=str(status))
        counter.inc()
        if seconds is not None:
            timer = self._timed.get(label)
            if timer is None:
                timer = self._timed[label] = self.request_seconds.labels(model=label)
            timer.observe(seconds)

    def observe_load(self, model: str, seconds: float, ok: bool) -> None:
        """An engine start finished (ready, or failed after ``seconds``)."""
        self.loads.labels(model=model, result="ok" if ok else "failed").inc()
        if ok:
            self.load_seconds.labels(model=model).observe(seconds)

    def observe_eviction(self, model: str, mode: str) -> None:
        """A model was evicted; ``mode`` is how (``stop`` or ``sleep``)."""
        self.evictions.labels(model=model, mode=mode).inc()

    def observe_usage(self, key: str, model: str, prompt: int, completion: int) -> None:
        """One answer's tokens under its key's name (never the key)."""
        pair = self._usage.get((key, model))
        if pair is None:  # labels() costs a lock and a lookup: once per key and model
            pair = self._usage[(key, model)] = (self.prompt_tokens.labels(key=key, model=model),
                                                self.completion_tokens.labels(key=key,
                                                                              model=model))
        pair[0].inc(prompt)
        pair[1].inc(completion)

    def refresh(self, snapshot: Iterable[ReplicaInfo]) -> None:
        """Set the gauges from a supervisor snapshot (models gone from it disappear)."""
        self.queue_depth.clear()
        self.in_flight.clear()
        self.model_state.clear()
        self.replica_in_flight.clear()
        self.replica_state.clear()
        for info in snapshot:
            for each in info.replicas:
                self.replica_in_flight.labels(model=info.name, replica=each.replica).set(
                    each.in_flight)
                for state in STATES:
                    self.replica_state.labels(model=info.name, replica=each.replica,
                                              state=state).set(float(each.state == state))
            self.queue_depth.labels(model=info.name).set(info.queued)
            self.in_flight.labels(model=info.name).set(info.in_flight)
            for state in STATES:
                self.model_state.labels(model=info.name, state=state).set(
                    1.0 if info.state == state else 0.0)

    def render(self, snapshot: Iterable[ReplicaInfo]) -> bytes:
        """The Prometheus text exposition, gauges refreshed from ``snapshot`` first."""
        self.refresh(snapshot)
        return generate_latest(self.registry)
