"""Measured budgets: what vLLM reported at start-up, kept so the next plan uses it.

Every engine start logs its memory (``Model loading took X GiB``, the profiled peak
activation and non-torch memory, CUDA-graph memory, the KV cache it got; on a CPU the
checkpoint size); :mod:`vlmhub.engine_log` parses those lines into facts. The process that
started the engine (the router's supervisor, or ``vlmhub serve``) hands them to
:func:`observe_start`, which records them here; :func:`vlmhub.config.resolve` then plans with
the measured figures (plus a margin, see :mod:`.vram`) instead of the plugin's estimate.
A start that fails for memory (vLLM's no-cache-blocks, max-model-len or CUDA out-of-memory
errors) raises that model's estimate instead, and says so. Such raises are bounded (at most
:data:`RAISE_CAP_FRACTION` of the plugin's estimate in all) and expire (after
:data:`RAISE_TTL_DAYS` days, and at the next good start that measures the activation). A
start that failed because the card was busy (vLLM's free-memory check: another program held
memory) says nothing about the model, and never raises it.

The store is one small JSON file, ``$VLMHUB_STATE_DIR/budgets.json`` (default
``~/.local/state/vlmhub``), keyed by :class:`BudgetKey`: model, variant, vLLM version, GPU
name and the settings that change memory. Writes are atomic (temp file + ``os.replace``) under
an advisory lock. Everything blocks briefly on that small file; nothing here is async.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import math
import os
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vlmhub.engine_log import MEMORY_FACTS, KnownError, diagnose
from vlmhub.paths import default_state_dir
from vlmhub.sizing.flags import engine_version
from vlmhub.sizing.vram import Budget, Gpu, Measured, budget_for
from vlmhub.spec import GIB, ModelSpec

if TYPE_CHECKING:
    from vlmhub.config.schema import ResolvedModel

FILE_NAME = "budgets.json"
SCHEMA = 1
MEMORY_ERRORS = ("no_cache_blocks", "max_model_len", "cuda_oom")
BUSY_CARD = "free_memory"
"""vLLM's start-up check found less free memory than asked: the card was busy, not the model
too big. It never raises a budget."""
RAISE_CAP_FRACTION = 0.5
"""All raises of one model together are at most this fraction of its estimated footprint."""
RAISE_TTL_DAYS = 7
"""A raise older than this is ignored (the conditions that caused it rarely last)."""
RAISE_FRACTION = 0.25
"""Without a shortfall in the error, a memory failure raises the activation by 25 %..."""
RAISE_MIN_GIB = 0.25
"""...and by at least this much."""


@dataclass(frozen=True)
class BudgetKey:
    """What a measurement is valid for: the same weights, vLLM, card and memory settings."""

    model: str
    variant: str | None
    hf_repo: str
    vllm_version: str
    gpu: str
    max_model_len: int
    max_num_seqs: int | None
    max_pixels: int | None
    dtype: str | None
    kv_cache_dtype: str | None
    quantization: str | None
    enforce_eager: bool
    sleep_mode: bool = False
    """Started with ``--enable-sleep-mode``: measured apart (the flag changes memory, vLLM
    #48680). Entries written before it existed read as False."""
    tensor_parallel_size: int = 1
    """The engine's ranks: each rank's figures are measured, so they differ with it. Entries
    written before it existed read as 1."""

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def planned_version(spec: ModelSpec, vllm_version: str | None = None) -> str:
    """The vLLM version a start of ``spec`` runs: ``runtime.vllm_version`` if set, else the
    image tag (the same rule for recording and for planning, so keys meet)."""
    return vllm_version or engine_version(spec)


def key_for(spec: ModelSpec, gpu: Gpu, vllm_version: str | None = None, *,
            sleep_mode: bool = False) -> BudgetKey:
    o = spec.options
    return BudgetKey(
        model=spec.name,
        variant=spec.variant,
        hf_repo=spec.hf_repo,
        vllm_version=planned_version(spec, vllm_version),
        gpu=gpu.name,
        max_model_len=o.max_model_len,
        max_num_seqs=o.max_num_seqs,
        max_pixels=spec.max_pixels,
        dtype=o.dtype,
        kv_cache_dtype=o.kv_cache_dtype,
        quantization=o.quantization,
        enforce_eager=o.enforce_eager,
        sleep_mode=sleep_mode,
        tensor_parallel_size=o.tensor_parallel_size,
    )


def measured_from_facts(facts: Mapping[str, float]) -> Measured:
    """The budget parts an engine log reported (GPU lines, or vLLM CPU's checkpoint size)."""
    weights = facts.get("model_load_gib", facts.get("weights_gib", facts.get("checkpoint_gib")))
    non_torch = facts.get("non_torch_gib")
    if non_torch is None and "consumed_gib" in facts and weights is not None:
        non_torch = max(facts["consumed_gib"] - weights, 0.0)
    kv_per_token = None
    tokens, kv_gib = facts.get("kv_cache_tokens"), facts.get("kv_cache_gib")
    if tokens and kv_gib:
        kv_per_token = kv_gib * GIB / tokens
    return Measured(
        weights_gib=weights,
        activation_gib=facts.get("peak_activation_gib"),
        non_torch_gib=non_torch,
        cuda_graph_gib=facts.get("cuda_graph_gib"),
        kv_bytes_per_token=kv_per_token,
    )


@dataclass(frozen=True)
class Entry:
    """One stored measurement (and any raise after a memory failure)."""

    key: BudgetKey
    facts: dict[str, float] = field(default_factory=dict)
    measured_at: str | None = None
    raised_activation_gib: float = 0.0
    raised_headroom_gib: float = 0.0
    raised_at: str | None = None
    reasons: tuple[str, ...] = ()
    sleep: dict[str, float] = field(default_factory=dict)
    """Sleep-mode figures measured at run time (vlmhub.sizing.sleepfacts): the residue, each
    level's wake, the levels whose wake failed."""

    def measured(self, now: datetime | None = None) -> Measured:
        """The measured parts, with the raises unless they expired (:data:`RAISE_TTL_DAYS`)."""
        base = measured_from_facts(self.facts) if self.measured_at else Measured()
        base = dataclasses.replace(
            base, measured_on=self.measured_at[:10] if self.measured_at else None
        )
        if self.raise_expired(now):
            return base
        return dataclasses.replace(
            base,
            raised_activation_gib=self.raised_activation_gib,
            raised_headroom_gib=self.raised_headroom_gib,
            raised_on=self.raised_at[:10] if self.raised_at else None,
        )

    def raise_expired(self, now: datetime | None = None) -> bool:
        """Whether the raise (if any) is older than :data:`RAISE_TTL_DAYS`."""
        if self.raised_at is None:
            return False
        try:
            at = datetime.fromisoformat(self.raised_at)
            return (now or datetime.now().astimezone()) - at > timedelta(days=RAISE_TTL_DAYS)
        except (ValueError, TypeError):  # unreadable or naive stamp: treat as expired
            return True

    def as_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["reasons"] = list(self.reasons)
        return data

    @staticmethod
    def from_dict(data: Mapping[str, Any]) -> Entry:
        facts = {str(k): float(v) for k, v in dict(data.get("facts") or {}).items()}
        return Entry(
            key=BudgetKey(**data["key"]),
            facts=facts,
            measured_at=data.get("measured_at"),
            raised_activation_gib=float(data.get("raised_activation_gib", 0.0)),
            raised_headroom_gib=float(data.get("raised_headroom_gib", 0.0)),
            raised_at=data.get("raised_at"),
            reasons=tuple(str(r) for r in data.get("reasons") or ()),
            sleep={str(k): float(v) for k, v in dict(data.get("sleep") or {}).items()},
        )


def _stamp(now: datetime | None) -> str:
    return (now or datetime.now().astimezone()).isoformat(timespec="seconds")


class BudgetStore:
    """The budgets file. One owner writes it per engine (the process that started it); the
    lock only keeps two writers (a router and ``vlmhub budgets forget``) from losing updates.
    An unreadable file reads as empty and is replaced on the next write."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    @classmethod
    def default(cls) -> BudgetStore:
        return cls(default_state_dir() / FILE_NAME)

    def entries(self) -> list[Entry]:
        try:
            data = json.loads(self.path.read_text())
            return [Entry.from_dict(e) for e in data.get("entries", [])]
        except (OSError, ValueError, TypeError, KeyError, AttributeError):
            return []

    def find(self, key: BudgetKey) -> Entry | None:
        return next((e for e in self.entries() if e.key == key), None)

    def lookup(self, key: BudgetKey, now: datetime | None = None) -> Measured | None:
        """The measured parts for ``key`` (None if never measured nor raised); a raise older
        than :data:`RAISE_TTL_DAYS` is left out."""
        entry = self.find(key)
        return entry.measured(now) if entry is not None else None

    def record(
        self, key: BudgetKey, facts: Mapping[str, float], now: datetime | None = None
    ) -> Entry:
        """Store what a successful start measured. A measured peak activation supersedes an
        earlier raise of the activation; a good start also ends a headroom raise (the card had
        the room after all)."""
        kept = {k: float(v) for k, v in facts.items() if k in MEMORY_FACTS}

        def update(old: Entry | None) -> Entry:
            base = old or Entry(key)
            activation = base.raised_activation_gib
            if "peak_activation_gib" in kept:
                activation = 0.0
            return dataclasses.replace(
                base, facts=kept, measured_at=_stamp(now), raised_activation_gib=activation,
                raised_headroom_gib=0.0, raised_at=base.raised_at if activation else None,
            )

        return self._update(key, update)

    def raise_estimate(
        self,
        key: BudgetKey,
        reason: str,
        *,
        activation_gib: float = 0.0,
        headroom_gib: float = 0.0,
        cap_gib: float | None = None,
        now: datetime | None = None,
    ) -> Entry:
        """Add to the model's activation (inside its GPU fraction) or to the headroom kept
        free outside it, after a start that failed for memory. An expired raise starts again
        from 0; the sum stays at most ``cap_gib`` (the activation gives way first)."""

        def update(old: Entry | None) -> Entry:
            base = old or Entry(key)
            if base.raise_expired(now):
                base = dataclasses.replace(base, raised_activation_gib=0.0,
                                           raised_headroom_gib=0.0)  # fmt: skip
            act = base.raised_activation_gib + activation_gib
            head = base.raised_headroom_gib + headroom_gib
            if cap_gib is not None and act + head > cap_gib:
                head = min(head, cap_gib)
                act = max(cap_gib - head, 0.0)
            return dataclasses.replace(
                base,
                raised_activation_gib=act,
                raised_headroom_gib=head,
                raised_at=_stamp(now),
                reasons=(*base.reasons, reason)[-5:],
            )

        return self._update(key, update)

    def record_sleep(self, key: BudgetKey, values: Mapping[str, float]) -> Entry:
        """Merge sleep-mode figures into ``key``'s entry (vlmhub.sizing.sleepfacts)."""
        return self._update(key, lambda old: dataclasses.replace(
            old or Entry(key), sleep={**(old.sleep if old else {}), **values}))

    def forget(self, model: str | None = None) -> int:
        """Drop every entry of ``model`` (all entries with None); returns how many."""
        with self._locked():
            entries = self.entries()
            kept = [e for e in entries if model is not None and e.key.model != model]
            self._write(kept)
        return len(entries) - len(kept)

    def _update(self, key: BudgetKey, change: Any) -> Entry:
        with self._locked():
            entries = self.entries()
            old = next((e for e in entries if e.key == key), None)
            new: Entry = change(old)
            self._write([*(e for e in entries if e.key != key), new])
        return new

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_name(self.path.name + ".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    def _write(self, entries: list[Entry]) -> None:
        data = {"schema": SCHEMA, "entries": [e.as_dict() for e in entries]}
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(data, f, indent=1, sort_keys=True)
                f.write("\n")
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise


# --- one call for whoever started the engine ----------------------------------------------


@dataclass(frozen=True)
class Observation:
    """What :func:`observe_start` did: ``kind`` is "measured", "raised", "busy" (the card was
    busy: nothing recorded, ``message`` says so) or "none";
    ``model`` is the model re-planned with the store (use it for the next start)."""

    kind: str
    message: str
    model: ResolvedModel
    before: Budget | None
    after: Budget | None


def raise_cap_gib(spec: ModelSpec) -> float:
    """The most all raises of ``spec`` may add: :data:`RAISE_CAP_FRACTION` of its estimate."""
    return _up(RAISE_CAP_FRACTION * budget_for(spec).footprint_gib)


def learned(
    store: BudgetStore | None,
    spec: ModelSpec,
    gpu: Gpu,
    vllm_version: str | None = None,
    now: datetime | None = None,
    *,
    sleep_mode: bool = False,
) -> Measured | None:
    """What ``store`` learned for ``spec``: measurements, and unexpired raises held to
    :func:`raise_cap_gib` (a file written before the cap existed is held to it too)."""
    if store is None:
        return None
    m = store.lookup(key_for(spec, gpu, vllm_version, sleep_mode=sleep_mode), now)
    if m is None or m.raised_gib <= (cap := raise_cap_gib(spec)):
        return m
    head = min(m.raised_headroom_gib, cap)
    return dataclasses.replace(m, raised_headroom_gib=head, raised_activation_gib=cap - head)


def plan_budget(
    spec: ModelSpec,
    gpu: Gpu,
    store: BudgetStore | None,
    budget_gib: float | None = None,
    vllm_version: str | None = None,
    *,
    sleep_mode: bool = False,
) -> Budget:
    """``spec``'s budget with whatever ``store`` learned for it (no fit check)."""
    return budget_for(spec, budget_gib, learned(store, spec, gpu, vllm_version,
                                                sleep_mode=sleep_mode))


def observe_start(
    store: BudgetStore,
    model: ResolvedModel,
    gpu: Gpu,
    facts: Mapping[str, float],
    ok: bool,
    error: BaseException | None = None,
    *,
    vllm_version: str | None = None,
    now: datetime | None = None,
    sleep_mode: bool = False,
) -> Observation:
    """Record one engine start of ``model``: its measured facts when it became ready
    (``ok``), or a raised estimate (bounded) when it failed for memory (``error`` is the
    :class:`~vlmhub.errors.EngineStartError`; its ``code`` and log ``tail`` say how much).
    A start that met a busy card, and other failures, change nothing. Blocks briefly on the
    budgets file."""
    spec = model.spec
    if spec is None:
        return Observation("none", "", model, None, None)
    key = key_for(spec, gpu, vllm_version, sleep_mode=sleep_mode)
    before = model.budget
    if ok:
        if not any(k in facts for k in MEMORY_FACTS):
            return Observation("none", f"{model.name}: its log reported no memory figures",
                               model, before, before)  # fmt: skip
        store.record(key, facts, now)
        kind = "measured"
    else:
        if (busy := _busy_card(error)) is not None:
            return Observation("busy", f"{model.name}: {busy}", model, before, before)
        raise_by = _raise_for(error, before, spec)
        if raise_by is None:
            return Observation("none", "", model, before, before)
        reason, activation, headroom = raise_by
        store.raise_estimate(key, reason, activation_gib=activation, headroom_gib=headroom,
                             cap_gib=raise_cap_gib(spec), now=now)  # fmt: skip
        kind = "raised"
    after = plan_budget(spec, gpu, store, model.entry.budget_gib, vllm_version,
                        sleep_mode=sleep_mode)
    new_model = dataclasses.replace(model, budget=after)
    return Observation(kind, _message(kind, model.name, before, after), new_model, before, after)


def _known(error: BaseException | None) -> tuple[str | None, KnownError | None]:
    """The error's code (the log's diagnosis first) and the diagnosis."""
    code = getattr(error, "code", None)
    tail = list(getattr(error, "tail", None) or [])
    known: KnownError | None = diagnose(tail) if tail else None
    if known is not None and known.code in (*MEMORY_ERRORS, BUSY_CARD):
        code = known.code
    return code, known


def _busy_card(error: BaseException | None) -> str | None:
    """What to say when ``error`` is vLLM's free-memory check (the card was busy), else None."""
    code, known = _known(error)
    if code != BUSY_CARD:
        return None
    d = known.details if known is not None and known.code == code else {}
    seen = (f" ({d['free_gib']:g} GiB free < {d['requested_gib']:g} GiB requested)"
            if "requested_gib" in d else "")  # fmt: skip
    return (f"the GPU was busy at start-up{seen}: another program held memory. Its budget is "
            "unchanged; free the GPU (`nvidia-smi` lists who holds it) and try again")


def _raise_for(
    error: BaseException | None, planned: Budget | None, spec: ModelSpec
) -> tuple[str, float, float] | None:
    """(reason, activation GiB, headroom GiB) to add after ``error``, or None."""
    code, known = _known(error)
    if code not in MEMORY_ERRORS:
        return None
    d = known.details if known is not None and known.code == code else {}
    activation = planned.activation_gib if planned is not None else spec.vram.activation_gib
    fallback = max(RAISE_FRACTION * activation, RAISE_MIN_GIB)
    if code == "max_model_len" and "needed_gib" in d:
        short = max(d["needed_gib"] - d["available_gib"], 0.0)
        return (f"KV cache {d['available_gib']:g} GiB < needed {d['needed_gib']:g} GiB",
                _up(short + 0.05), 0.0)  # fmt: skip
    if code == "no_cache_blocks":  # the rest took at least the planned KV cache, and more
        kv = planned.kv_cache_gib if planned is not None else 0.0
        return "no memory was left for the KV cache", _up(kv + fallback), 0.0
    if code == "cuda_oom" and "tried_gib" in d:
        return f"CUDA out of memory ({d['tried_gib']:g} GiB)", _up(d["tried_gib"]), 0.0
    return f"{code.replace('_', ' ')} at start-up", _up(fallback), 0.0


def _up(gib: float) -> float:
    """Round a raise up to 0.01 GiB."""
    return math.ceil(round(gib * 100, 6)) / 100


def _message(kind: str, name: str, before: Budget | None, after: Budget) -> str:
    was = f" (was {before.footprint_gib:.2f} GiB, {before.label})" if before else ""
    if kind == "measured":
        return (
            f"{name}: recorded the measured budget (weights {after.weights_gib:.2f} GiB, "
            f"activation {after.activation_gib:.2f}, non-torch {after.non_torch_gib:.2f}, "
            f"CUDA graphs {after.cuda_graph_gib:.2f}); it now plans "
            f"{after.footprint_gib:.2f} GiB{was}"
        )
    return (
        f"{name} failed to start for lack of memory: raised its budget by "
        f"{after.raised_gib - (before.raised_gib if before else 0.0):.2f} GiB to "
        f"{after.footprint_gib:.2f} GiB{was}, so the next start gets more room"
    )
