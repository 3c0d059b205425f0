"""The trace format of ``vlmhub simulate``: what arrives, when, and for how long it runs.

A trace is JSON Lines, one object a line (blank lines are skipped). Three kinds of line:

``{"t": 12.5, "model": "m", "duration": 2.0, "priority": "batch"}``
    One request (open loop): it arrives at ``t`` seconds and, once leased, runs ``duration``
    seconds. ``priority`` (``interactive``/``batch``) is optional: by default the model's own
    ``priority`` from models.yaml, as the router does without an ``X-Vlmhub-Priority`` header.
``{"clients": 16, "requests": 1000, "models": ["a", "b"], "duration": [0.5, 2], ...}``
    A closed loop: ``clients`` clients each send a request, wait for its answer, ``think``
    seconds, and send the next, until the group has sent ``requests`` in all. Request k's
    model, duration and think time are drawn in order from ``seed`` (models evenly, or by
    ``weights``), so every policy sees the same requests. Optional: ``start`` (s), ``think``,
    ``priority``, ``seed``, ``weights``.
``{"every": [20, 60], "models": ["b", "c"], "duration": [1, 4], "until": "clients", ...}``
    An open-loop stream: arrivals ``every`` seconds apart (a number or a uniform range) from
    ``start``, each for one of ``models``, until ``until``: a time in seconds, or ``"clients"``
    (the stream stops once every closed loop of the trace has finished).
``{"note": "..."}`` lines are comments.

A number or ``[lo, hi]`` (uniform) is accepted wherever a duration is. Pure: parsing does no
I/O (the CLI reads the file) and the random draws come from each line's own seed.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from vlmhub.errors import VlmhubError
from vlmhub.scheduling.policy import PRIORITIES, Priority

Span = tuple[float, float]
"""A fixed value (lo == hi) or a uniform range."""


class TraceError(VlmhubError):
    """A trace line is malformed: the message names the file, line, field and fix."""


@dataclass(frozen=True)
class Request:
    """One open-loop request line."""

    t: float
    model: str
    duration: float
    priority: Priority | None = None


@dataclass(frozen=True)
class Draw:
    """One generated request: its model, how long it runs, and the think time after it."""

    model: str
    duration: float
    think: float = 0.0


@dataclass(frozen=True)
class Clients:
    """A closed loop of ``clients`` clients sending the ``draws`` in order."""

    clients: int
    draws: tuple[Draw, ...]
    start: float = 0.0
    priority: Priority | None = None


@dataclass(frozen=True)
class Stream:
    """An open-loop stream: ``gaps[i]`` before ``draws[i]``, stopping at ``until``."""

    start: float
    every: Span
    models: tuple[str, ...]
    duration: Span
    until: float | Literal["clients"]
    seed: int
    priority: Priority | None = None

    def arrivals(self) -> random.Random:
        """The stream's own random source (gap, model, duration drawn in that order)."""
        return random.Random(self.seed)  # noqa: S311 - a reproducible workload, not a secret


@dataclass(frozen=True)
class Trace:
    name: str
    requests: tuple[Request, ...] = ()
    clients: tuple[Clients, ...] = ()
    streams: tuple[Stream, ...] = ()

    def models(self) -> set[str]:
        out = {r.model for r in self.requests}
        out.update(d.model for c in self.clients for d in c.draws)
        out.update(m for s in self.streams for m in s.models)
        return out


def draw(rng: random.Random, span: Span) -> float:
    lo, hi = span
    return lo if lo == hi else rng.uniform(lo, hi)


class _Line:
    """One parsed line and the location used in its errors."""

    def __init__(self, where: str, obj: Mapping[str, Any]) -> None:
        self.where, self.obj = where, obj

    def fail(self, field: str, problem: str, fix: str) -> TraceError:
        return TraceError(f"{self.where}: {field}: {problem}. Fix: {fix}")

    def number(self, field: str, default: float | None = None, low: float = 0.0) -> float:
        v = self.obj.get(field, default)
        if v is None:
            raise self.fail(field, "missing", f"add \"{field}\": a number of seconds")
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise self.fail(field, f"{v!r} is not a finite number", "write a number")
        if v < low:
            raise self.fail(field, f"{v} is below {low:g}", f"use a value >= {low:g}")
        return float(v)

    def count(self, field: str) -> int:
        v = self.obj.get(field)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise self.fail(field, f"{v!r} is not a positive whole number", "write e.g. 16")
        return v

    def span(self, field: str, default: float | None = None) -> Span:
        v = self.obj.get(field, default)
        if isinstance(v, list):
            if len(v) != 2:
                raise self.fail(field, "a range needs two numbers", "write [low, high]")
            lo = _Line(self.where, {field: v[0]}).number(field)
            hi = _Line(self.where, {field: v[1]}).number(field)
            if hi < lo:
                raise self.fail(field, f"[{lo:g}, {hi:g}] runs backwards", "write [low, high]")
            return lo, hi
        x = self.number(field, default)
        return x, x

    def priority(self) -> Priority | None:
        v = self.obj.get("priority")
        if v is None:
            return None
        if v not in PRIORITIES:
            raise self.fail("priority", f"{v!r} is not a priority", "use interactive or batch")
        return v  # type: ignore[no-any-return]

    def models(self) -> tuple[str, ...]:
        v = self.obj.get("models")
        if not isinstance(v, list) or not v or not all(isinstance(m, str) and m for m in v):
            raise self.fail("models", f"{v!r} is not a list of model names", 'write ["a", "b"]')
        return tuple(v)

    def seed(self) -> int:
        v = self.obj.get("seed", 0)
        if isinstance(v, bool) or not isinstance(v, int):
            raise self.fail("seed", f"{v!r} is not a whole number", "write e.g. 1")
        return v


def _request(ln: _Line) -> Request:
    model = ln.obj.get("model")
    if not isinstance(model, str) or not model:
        raise ln.fail("model", f"{model!r} is not a model name", 'write "model": "name"')
    return Request(ln.number("t"), model, ln.number("duration"), ln.priority())


def _clients(ln: _Line) -> Clients:
    models, n, rng = ln.models(), ln.count("requests"), random.Random(ln.seed())  # noqa: S311
    duration, think = ln.span("duration"), ln.span("think", 0.0)
    weights = ln.obj.get("weights")
    if weights is not None and (
        not isinstance(weights, list)
        or len(weights) != len(models)
        or not all(isinstance(w, (int, float)) and not isinstance(w, bool) and w >= 0
                   for w in weights)
        or not sum(weights) > 0
    ):
        raise ln.fail("weights", "needs one non-negative number per model, not all zero",
                      f"write {len(models)} numbers")
    draws = tuple(
        Draw(rng.choices(models, weights)[0], draw(rng, duration), draw(rng, think))
        for _ in range(n)
    )
    return Clients(ln.count("clients"), draws, ln.number("start", 0.0), ln.priority())


def _stream(ln: _Line) -> Stream:
    until_raw = ln.obj.get("until")
    until: float | Literal["clients"] = (
        "clients" if until_raw == "clients" else ln.number("until")
    )
    every = ln.span("every")
    if every[1] <= 0:
        raise ln.fail("every", "arrivals must be some time apart", "use a gap above 0")
    return Stream(ln.number("start", 0.0), every, ln.models(), ln.span("duration"), until,
                  ln.seed(), ln.priority())


def parse_trace(text: str, name: str = "trace") -> Trace:
    """Parse a trace; a bad line raises :class:`TraceError` naming ``name:line``."""
    requests: list[Request] = []
    clients: list[Clients] = []
    streams: list[Stream] = []
    for no, raw in enumerate(text.splitlines(), 1):
        if not raw.strip():
            continue
        where = f"{name}:{no}"
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise TraceError(
                f"{where}: not JSON ({exc.msg}). Fix: one JSON object a line"
            ) from None
        if not isinstance(obj, dict):
            raise TraceError(f"{where}: a line must be a JSON object. Fix: write {{...}}")
        ln = _Line(where, obj)
        if "note" in obj and len(obj) == 1:
            continue
        if "clients" in obj:
            clients.append(_clients(ln))
        elif "every" in obj:
            streams.append(_stream(ln))
        elif "t" in obj or "model" in obj:
            requests.append(_request(ln))
        else:
            raise TraceError(
                f"{where}: not a request, a closed loop or a stream. Fix: give \"t\" and "
                "\"model\" (a request), \"clients\" (a closed loop) or \"every\" (a stream)"
            )
    if not (requests or clients or streams):
        raise TraceError(f"{name}: the trace has no requests. Fix: add at least one line")
    if any(s.until == "clients" for s in streams) and not clients:
        raise TraceError(f'{name}: a stream runs until "clients" but the trace has no closed '
                         'loop. Fix: give "until" in seconds')
    return Trace(name, tuple(sorted(requests, key=lambda r: r.t)), tuple(clients),
                 tuple(streams))


def check_models(trace: Trace, known: Sequence[str]) -> None:
    """Every model the trace names is configured (else a TraceError listing them)."""
    missing = sorted(trace.models() - set(known))
    if missing:
        raise TraceError(
            f"{trace.name}: the trace names models the config does not have: "
            f"{', '.join(missing)}. Fix: use one of {', '.join(known) or 'none'}, "
            "or pass the config that defines them (--config)"
        )
