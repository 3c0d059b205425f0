"""Config reload without a restart: what changed between the running models and a new
models.yaml. :func:`diff_models` compares (pure); :func:`apply_models` changes the replicas
to match (synchronous, no I/O), and the supervisor fails the removed models' waiters and runs
the stops as operations (see :meth:`vlmhub.supervisor.Supervisor.reload`).

- **added**: a new replica, stopped until its first request; with ``preload: true`` started
  at once (the supervisor asks for it);
- **removed**: drained (running requests finish, new ones get 404), stopped, then forgotten;
  one whose engine is being started (or that a running operation is about to start) is kept
  until that start ends, then stopped;
- **changed** (anything that changes the launched engine: spec, flags, variant, budget, env,
  sleep, external URL): keeps serving from the old engine until it is idle, then stops; the
  next request (or ``preload``) starts the new one. An engine being started when the reload
  comes was launched from the old config: it is treated the same way once its start ends.
  Until the old engine is gone the replica counts the larger of the old and new footprints
  (:attr:`Replica.footprint`);
- **unchanged**: keeps serving without a blip; settings that do not touch the engine (ttl,
  aliases, priority, max_queue, pinned...) take effect at once.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

from vlmhub.config.schema import ResolvedModel, sleep_ok
from vlmhub.control.group import new_members
from vlmhub.control.replica import Replica


@dataclass(frozen=True)
class ModelDiff:
    added: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    changed: tuple[str, ...] = ()
    unchanged: tuple[str, ...] = ()

    def summary(self) -> str:
        parts = [
            f"{what}: {', '.join(names)}"
            for what, names in (
                ("added", self.added), ("removed", self.removed), ("changed", self.changed)
            )
            if names
        ]
        return "; ".join(parts) or "no model changed"


def engine_identity(m: ResolvedModel) -> tuple[object, ...]:
    """Everything about ``m`` that the launched engine depends on."""
    return (
        m.spec.spec_hash() if m.spec is not None else None,
        m.entry.url,
        m.entry.served_model_name,
        tuple(sorted(m.entry.env.items())),
        round(m.budget.footprint_gib, 6) if m.budget is not None else None,
        m.entry.sleep,
    )


def diff_models(old: Mapping[str, ResolvedModel], new: Sequence[ResolvedModel]) -> ModelDiff:
    """Compare the running models (by name) with a freshly resolved config."""
    fresh = {m.name: m for m in new}
    added = tuple(n for n in fresh if n not in old)
    removed = tuple(n for n in old if n not in fresh)
    changed = tuple(
        n for n in fresh if n in old and engine_identity(old[n]) != engine_identity(fresh[n])
    )
    unchanged = tuple(n for n in fresh if n in old and n not in changed)
    return ModelDiff(added, removed, changed, unchanged)


@dataclass
class Applied:
    """The outcome of :func:`apply_models`."""

    diff: ModelDiff
    replicas: dict[str, Replica]
    """The new replica table: every model of the new config in its order, then the removed
    ones that still have an engine or requests to drain."""
    removed: list[Replica]
    """Every removed replica (a removed model's queued requests must be failed)."""
    preload: list[Replica]
    """The added replicas with ``preload: true`` (the supervisor asks for their model)."""


def apply_models(
    replicas: Mapping[str, Replica], models: Sequence[ResolvedModel],
    starting: Collection[str] = (),
) -> Applied:
    """Mark and update the replicas (several per model with ``replicas``: a replica beyond a
    lowered count is removed, one beyond a raised count added) for a new config. Runs on the
    event loop, synchronously:
    a removed replica is marked ``retire="removed"`` (forgotten at once when it runs no engine,
    starts none and serves nothing), a changed one whose engine runs or is starting
    ``retire="changed"`` (with the old footprint in ``retiring_gib``), an unchanged one only
    takes the new settings; added models get new (stopped) replicas. ``starting``: the models a
    running operation is bringing in (planned, their engine maybe not launched yet)."""
    diff = diff_models({r.model.name: r.model for r in replicas.values()}, models)
    made = {r.name: r for m in models for r in new_members(m)}
    removed = [r for n, r in replicas.items() if n not in made]
    for r in removed:
        r.retire = "removed"
    for name in (n for n in made if n in replicas):
        r = replicas[name]
        if r.retire == "removed":  # removed by an earlier reload, back before it was gone
            r.retire = None
        old_gib, m = r.footprint, made[name].model
        r.model = m
        if m.name in diff.changed:
            r.sleep_ok = sleep_ok(m)
            # "starting": its engine was (or is being) launched from the old config
            if r.handle is not None or r.state == "starting":
                r.retire, r.retiring_gib = "changed", old_gib
            if m.external:
                r.state, r.retire = "ready", None
    kept = [r.name for r in removed
            if r.handle is not None or r.in_flight or r.state == "starting" or r.name in starting]
    table = {n: replicas.get(n, r) for n, r in made.items()}
    table.update((n, replicas[n]) for n in kept)
    preload = [r for n, r in made.items() if n not in replicas and r.model.entry.preload]
    return Applied(diff, table, removed, preload)
