"""Sleep mode measured at run time, kept in the budgets file (vlmhub.sizing.budgets).

What a sleeping engine really keeps on the GPU varies (vLLM #32714: since 0.14 a sleep frees
much less than before), and so do wakes. After every sleep the process that runs the engine
reads vLLM's own line ``Sleep mode freed X GiB memory, Y GiB memory is still in use.``; the
engine's residue is its planned footprint less what it freed. Each wake's time is kept per
level, and a level whose wake failed is barred for that model until ``vlmhub budgets forget``.
The plan then uses these figures instead of the plugin's ``sleep_residual_gib`` and the
default wake costs. Pure, except :func:`remember` (blocks briefly on the budgets file).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from vlmhub.sizing.budgets import BudgetKey, BudgetStore

FREED = re.compile(r"Sleep mode freed (\d+(?:\.\d+)?) GiB memory")


def freed_gib(lines: Iterable[str]) -> float | None:
    """What the last sleep freed, from vLLM's log lines (None: no such line)."""
    found = None
    for line in lines:
        if m := FREED.search(line):
            found = float(m.group(1))
    return found


WAKE_SHARE = {1: (0.05, 2.0), 2: (0.15, 6.0)}
"""Until measured: a wake's share of a cold start, and its cap (level 1, level 2). vLLM
measured level-1 wakes at 0.7-1.4 % and level-2 wakes at 2.3-4.4 % of a cold reload
(docs: vllm-notes, sleep mode); the caps are the 2 s / 6 s the simulator used before."""


def wake_price_s(level: int, cold_s: float, measured: float | None = None) -> float:
    """What a wake from ``level`` costs: ``measured`` where a wake was timed, else
    :data:`WAKE_SHARE` of the model's cold start ``cold_s``, at most its cap. The one rule
    the supervisor (control.replica) and ``vlmhub simulate`` both price wakes by."""
    if measured is not None:
        return measured
    share, most = WAKE_SHARE[level]
    return min(share * cold_s, most)


@dataclass(frozen=True)
class SleepFacts:
    """What was learned about one model's sleeps (empty: nothing yet)."""

    residue_gib: float | None = None
    wake_s: dict[int, float] = field(default_factory=dict)
    barred: frozenset[int] = frozenset()
    """Levels whose wake failed: not used for this model again until reset."""


def facts_of(store: BudgetStore | None, key: BudgetKey) -> SleepFacts:
    """The sleep figures ``store`` holds for ``key``."""
    entry = store.find(key) if store is not None else None
    if entry is None:
        return SleepFacts()
    got = entry.sleep
    return SleepFacts(
        residue_gib=got.get("residue_gib"),
        wake_s={lv: got[f"wake{lv}_s"] for lv in (1, 2) if f"wake{lv}_s" in got},
        barred=frozenset(lv for lv in (1, 2) if got.get(f"barred{lv}")),
    )


def remember(store: BudgetStore | None, key: BudgetKey, *, residue_gib: float | None = None,
             level: int | None = None, wake_s: float | None = None, failed: bool = False,
             ) -> None:
    """Record a sleep's residue, a wake's time at ``level``, or (``failed``) bar ``level``."""
    if store is None:
        return
    values: dict[str, float] = {}
    if residue_gib is not None:
        values["residue_gib"] = round(residue_gib, 3)
    if level is not None and wake_s is not None:
        values[f"wake{level}_s"] = round(wake_s, 3)
    if level is not None and failed:
        values[f"barred{level}"] = 1.0
    if values:
        store.record_sleep(key, values)


def merged(facts: SleepFacts, *, residue_gib: float | None = None, level: int | None = None,
           wake_s: float | None = None, failed: bool = False) -> SleepFacts:
    """``facts`` with one more figure (the same arguments as :func:`remember`)."""
    wakes = dict(facts.wake_s)
    if level is not None and wake_s is not None:
        wakes[level] = wake_s
    barred = facts.barred | ({level} if failed and level is not None else set())
    return SleepFacts(facts.residue_gib if residue_gib is None else residue_gib, wakes, barred)
