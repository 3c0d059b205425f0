"""Config reload without a restart: what changed between the running models and a new
models.yaml. Pure: :func:`diff_models` compares, the supervisor applies the result (see
:meth:`vlmhub.supervisor.Supervisor.reload`).

- **added**: a new replica, stopped until its first request (or preload);
- **removed**: drained (running requests finish, new ones get 404), stopped, then forgotten;
- **changed** (anything that changes the launched engine: spec, flags, variant, budget, env,
  sleep, external URL): keeps serving from the old engine until it is idle, then stops; the
  next request starts the new one;
- **unchanged**: keeps serving without a blip; settings that do not touch the engine (ttl,
  aliases, priority, max_queue, pinned...) take effect at once.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from vlmhub.config import ResolvedModel


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
