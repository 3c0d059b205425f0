"""The stand-in's pretend machine of several GPUs. Standard library only (it ships beside
stub_engine.py in the stand-in's image).

``VLMHUB_STUB_GPUS`` describes the machine: ``"2"`` is two cards of ``--stub-gpu-total-gib``
each, ``"8,12"`` two cards of 8 and 12 GiB (vlmhub's own device listing reads the same
variable: vlmhub.config.gpu.pretend_gpus). Each pretend card has its own memory ledger, the
directory ``<--stub-ledger>/gpuN``, shared by every stand-in on that card; a stand-in charges
the card its ``CUDA_VISIBLE_DEVICES`` names first (card 0 without it), as a vLLM engine uses
its first visible device. Without ``VLMHUB_STUB_GPUS`` nothing changes: one card, the ledger
directory itself.
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
    env = os.environ if environ is None else environ
    spec = env.get(ENV, "").strip()
    if not spec:
        return ledger, total_gib
    cards = sizes(spec, total_gib or default_gib)
    first = (env.get(VISIBLE) or "0").split(",")[0].strip()
    if not first.isdigit() or int(first) >= len(cards):
        raise NoDevice(f"RuntimeError: No CUDA GPUs are available ({VISIBLE}={first!r}, "
                       f"the pretend machine has {len(cards)})")
    n = int(first)
    return (os.path.join(ledger, f"gpu{n}") if ledger else None), cards[n]
