"""Match engines left running by an earlier vlmhub with the models configured now.

:func:`reconcile_engines` works for any :class:`~vlmhub.engines.base.Runtime`: it adopts the
runtime's engines whose owner is gone (never those another live vlmhub process runs), keeps those
whose spec hash is still the configured one, and stops (and removes) those whose spec changed,
so that the caller starts them afresh. It blocks only in the runtime's own coroutines; stops of
different engines run concurrently.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass, field

from vlmhub.engines.base import EngineHandle, Runtime
from vlmhub.engines.owner import owned_by_other


@dataclass(frozen=True)
class Reconciled:
    """What :func:`reconcile_engines` found.

    ``kept``: running engines whose spec hash matches the wanted one (adopt them as they are).
    ``stopped``: engines of a wanted model whose spec hash changed; they were stopped and
    removed. ``unknown``: engines of models that are not wanted; left running, untouched.
    ``others``: engines another live vlmhub process owns (a router on another state dir, a
    ``vlmhub serve``), whatever their model: not adopted, not stopped.
    """

    kept: list[EngineHandle] = field(default_factory=list)
    stopped: list[EngineHandle] = field(default_factory=list)
    unknown: list[EngineHandle] = field(default_factory=list)
    others: list[EngineHandle] = field(default_factory=list)


async def reconcile_engines(
    runtime: Runtime, wanted: Mapping[str, str], *, timeout_s: float = 20.0
) -> Reconciled:
    """Adopt ``runtime``'s ownerless engines and sort them against ``wanted`` (model name ->
    spec hash); kept ones are claimed (this process becomes their owner).

    An engine whose spec hash differs from the wanted one is stopped (SIGTERM, then SIGKILL
    after ``timeout_s``) and removed. When two engines claim the same model (which vlmhub
    never does itself), the first matching one is kept and the others are stopped.
    """
    result = Reconciled()
    for handle in await runtime.adopt():
        want = wanted.get(handle.name)
        if owned_by_other(handle.owner):
            result.others.append(handle)
        elif want is None:
            result.unknown.append(handle)
        elif want == handle.spec_hash and all(k.name != handle.name for k in result.kept):
            result.kept.append(handle)
        else:
            result.stopped.append(handle)
    await asyncio.gather(*(runtime.stop(h, timeout_s) for h in result.stopped))
    for handle in result.kept:
        await runtime.claim(handle)
    return result
