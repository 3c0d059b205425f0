"""The sleep-aware plan: caps that let each model wake beside the others' sleep residue.

With sleep mode, a model that is not awake keeps its *residue* on the GPU (CUDA context and
pools, ``Budget.sleep_residual_gib``; measured where a sleep was measured). A model planned to
fill the whole card cannot wake beside that residue, so every switch to it stops the sleepers
and is a cold start for them later. :func:`plan_sleep` plans each *awake set* (a ``together``
group, or a model on its own) to fit in what the residues of every other sleeping model leave:
it lowers the set's caps with :func:`vlmhub.sizing.together.fit_together`, within each plugin's
floors. Where even the floors do not fit beside every residue, the set is planned beside as
many residues as its floors allow (the smallest first): a switch to it still wakes it, but
stops that many sleepers (their next switch is a cold start); with none, it keeps the plain
plan.

Pure functions, like :mod:`.together`: no I/O, no logging.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from vlmhub.sizing.together import GroupPlan, MeasureFn, fit_together
from vlmhub.sizing.vram import Gpu, budget_for
from vlmhub.spec import ModelSpec


def _no_measure(spec: ModelSpec) -> None:
    return None


@dataclass(frozen=True)
class AwakeSet:
    """One set of models awake at once, planned beside ``beside`` of the other sleepers."""

    plan: GroupPlan
    others: tuple[str, ...]
    """The sleeping models outside this set (each keeps its residue while this set is awake)."""
    beside: int
    """How many of ``others`` it was planned to wake beside (the smallest residues first)."""
    room_gib: float
    """What the set was planned into: the usable GPU less those residues."""

    @property
    def names(self) -> tuple[str, ...]:
        return self.plan.names

    @property
    def all_wake(self) -> bool:
        """A switch to this set stops no sleeper: every switch to and from it is a wake."""
        return self.beside == len(self.others)

    def switch(self) -> str:
        """What a switch to this set does, for people."""
        if self.all_wake:
            beside = ", ".join(self.others) or "nothing"
            return f"wake (beside the residue of {beside})"
        stops = len(self.others) - self.beside
        return (f"wake, stopping {stops} of {', '.join(self.others)} (whose next switch is a "
                "cold start): even at its plugins' floors it does not fit beside every residue")


@dataclass(frozen=True)
class SleepPlan:
    """Every awake set's plan, on ``usable_gib``."""

    sets: tuple[AwakeSet, ...]
    usable_gib: float

    @property
    def cold_switches(self) -> tuple[AwakeSet, ...]:
        """The sets a switch to which stops a sleeper."""
        return tuple(s for s in self.sets if not s.all_wake)

    def of(self, name: str) -> AwakeSet | None:
        return next((s for s in self.sets if name in s.names), None)


def residues(
    specs: Sequence[ModelSpec], measure: MeasureFn = _no_measure,
    learned: Mapping[str, float] | None = None,
) -> dict[str, float]:
    """Each model's residue while asleep: what a sleep of it was measured to leave
    (``learned``), else its budget's ``sleep_residual_gib``."""
    out = {}
    for s in specs:
        got = (learned or {}).get(s.name)
        out[s.name] = got if got is not None else budget_for(s, None, measure(s)).sleep_residual_gib
    return out


def plan_sleep(
    sets: Sequence[Sequence[ModelSpec]],
    sleepers: frozenset[str],
    gpu: Gpu,
    measure: MeasureFn = _no_measure,
    residue: Mapping[str, float] | None = None,
) -> SleepPlan:
    """Plan every awake set (see the module docs). ``sleepers``: the models that sleep when
    evicted (the others are stopped and hold nothing); ``residue``: each sleeper's residue
    (default: :func:`residues`)."""
    specs = [s for group in sets for s in group]
    left = dict(residue) if residue is not None else residues(specs, measure)
    out = []
    for group in sets:
        mine = {s.name for s in group}
        others = sorted((n for n in sleepers if n not in mine and n in left),
                        key=lambda n: (left[n], n))
        best: AwakeSet | None = None
        for k in range(len(others), -1, -1):
            room = gpu.usable_gib - sum(left[n] for n in others[:k])
            if room <= 0:
                continue
            budget = room if gpu.budget_gib is None else min(room, gpu.budget_gib)
            plan = fit_together(list(group), Gpu(gpu.total_gib, gpu.reserve_gib, budget,
                                                 gpu.name, gpu.source), measure)
            if plan.fits:
                best = AwakeSet(plan, tuple(others), k, room)
                break
        if best is None:  # not even alone: the plain plan says why
            best = AwakeSet(fit_together(list(group), gpu, measure), tuple(others), 0,
                            gpu.usable_gib)
        out.append(best)
    return SleepPlan(tuple(out), gpu.usable_gib)
