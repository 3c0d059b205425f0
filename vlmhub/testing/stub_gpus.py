"""The stand-in's pretend machine of several GPUs. Standard library only (it ships beside
stub_engine.py in the stand-in's image).

``VLMHUB_STUB_GPUS`` describes the machine: ``"2"`` is two cards of ``--stub-gpu-total-gib``
each, ``"8,12"`` two cards of 8 and 12 GiB (vlmhub's own device listing reads the same
variable: vlmhub.config.gpu.pretend_gpus). Each pretend card has its own memory ledger, the
directory ``<--stub-ledger>/gpuN``, shared by every stand-in on that card; a stand-in charges
the card its ``CUDA_VISIBLE_DEVICES`` names first (card 0 without it), as a vLLM engine uses
its first visible device. A stand-in started with ``--tensor-parallel-size k`` is k ranks,
one on each of its first k visible cards (:func:`cards`): it charges EACH of them its claim
(vLLM's ``--gpu-memory-utilization`` is per GPU), so every card's ledger shows what its rank
holds, and fails as vLLM does when fewer cards are visible. Without ``VLMHUB_STUB_GPUS`` nothing
changes: one card, the ledger directory itself.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

ENV = "VLMHUB_STUB_GPUS"
VISIBLE = "CUDA_VISIBLE_DEVICES"


class NoDevice(ValueError):
    """The stand-in was given a card the pretend machine does not have (what CUDA says)."""


def sizes(spec: str, default_gib: float) -> list[float]:
    """Each pretend card's GiB from :data:`ENV`'s value."""
    try:
        if "," not in spec:
            return [float(default_gib)] * max(int(spec), 1)
        return [float(part) for part in spec.split(",")]
    except ValueError:
        raise NoDevice(f"RuntimeError: {ENV}={spec!r} is not a pretend machine") from None


def card(ledger: str | None, total_gib: float | None, default_gib: float,
         environ: Mapping[str, str] | None = None) -> tuple[str | None, float | None]:
    """``(ledger dir, total GiB)`` of the pretend card this stand-in runs on; the arguments
    unchanged without :data:`ENV`. Raises :class:`NoDevice` for a
    visible card the machine lacks."""
    return cards(ledger, total_gib, default_gib, environ)[0]


def cards(ledger: str | None, total_gib: float | None, default_gib: float,
          environ: Mapping[str, str] | None = None,
          ranks: int = 1) -> list[tuple[str | None, float | None]]:
    """``(ledger dir, total GiB)`` of each pretend card this stand-in's ``ranks`` run on (its
    first ``ranks`` visible cards); ``[(ledger, total_gib)]`` without :data:`ENV`. Raises
    :class:`NoDevice` for a visible card the machine lacks, or fewer visible cards than
    ranks."""
    env = os.environ if environ is None else environ
    spec = env.get(ENV, "").strip()
    if not spec:
        return [(ledger, total_gib)]
    machine = sizes(spec, total_gib or default_gib)
    visible = [part.strip() for part in (env.get(VISIBLE) or "0").split(",")]
    for part in visible[:ranks]:
        if not part.isdigit() or int(part) >= len(machine):
            raise NoDevice(f"RuntimeError: No CUDA GPUs are available ({VISIBLE}={part!r}, "
                           f"the pretend machine has {len(machine)})")
    if len(visible) < ranks:
        raise NoDevice(f"ValueError: World size ({ranks}) is larger than the number of "
                       f"available GPUs ({len(visible)}) in this node ({VISIBLE}="
                       f"{env.get(VISIBLE) or '0'!r})")
    return [((os.path.join(ledger, f"gpu{n}") if ledger else None), machine[n])
            for n in map(int, visible[:ranks])]
