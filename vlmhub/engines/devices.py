"""Several GPUs in one machine, without Ray: each card is a node of its own.

The process and Docker runtimes list the machine's cards (``gpu.devices``, else every card the
pretend machine or NVML lists; :func:`vlmhub.config.gpu.device_totals`) as nodes ``gpu0``,
``gpu1``, ... with each card's total GiB, exactly as :class:`~vlmhub.engines.ray.RayRuntime`
lists Ray nodes: the supervisor turns each total into usable GiB (``gpu.reserve_gib``,
``gpu.budget_gib``) and the placement and swap policy run per node, one engine operation per
card at a time. An engine started on node ``gpuN`` sees card N alone: the process runtime
sets ``CUDA_VISIBLE_DEVICES=N`` in the engine's environment (not vlmhub's), the Docker runtime
asks for that card (``device_requests`` with its id). A tensor-parallel engine
(``tensor_parallel_size: k``) is placed on k cards at once, the node ``gpu0+gpu1``
(:func:`vlmhub.scheduling.placement.joined`): it sees all of them, ``CUDA_VISIBLE_DEVICES=0,1``
and a ``device_requests`` entry with both ids.

With one card there is one node ``""`` (the single-GPU path, unchanged); a card named in
``gpu.devices`` is still the one the engine sees. Pure apart from :func:`local_devices` (which
may ask NVML, briefly).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from vlmhub.config.gpu import device_totals, nvml_used_gib
from vlmhub.config.schema import GpuConfig

PREFIX = "gpu"
"""Node names: ``gpu0``, ``gpu1``, ... (the CUDA device id)."""
ENV = "CUDA_VISIBLE_DEVICES"
JOIN = "+"
"""Joins the cards of a tensor-parallel engine's node (vlmhub.scheduling.placement.JOIN: the
engines layer sits below scheduling, so the separator is repeated, and a test pins both)."""
_NODE = re.compile(rf"{PREFIX}(\d+)")


def node_name(device: int) -> str:
    return f"{PREFIX}{device}"


@dataclass(frozen=True)
class Devices:
    """The cards of this machine that engines may use."""

    totals: Mapping[int, float] = field(default_factory=dict)
    """CUDA device id -> its total GiB, in the configured order."""
    pinned: bool = False
    """``gpu.devices`` named them: even a lone card is named to its engines."""

    def nodes(self) -> dict[str, float] | None:
        """Node -> total GiB with two cards or more; None with one (the single-GPU path)."""
        if len(self.totals) < 2:
            return None
        return {node_name(d): total for d, total in self.totals.items()}

    def ids(self, node: str) -> list[int]:
        """The device ids an engine on ``node`` sees; [] to leave the choice to the engine
        (one card, not pinned). A node of this runtime is ``gpuN``, or ``gpuN+gpuM...`` for a
        tensor-parallel engine (every card, in order); anything else (a node of another
        runtime, a card this machine lacks) names no card."""
        if not node:
            return list(self.totals) if self.pinned else []
        found = [_NODE.fullmatch(part) for part in node.split(JOIN)]
        ids = [int(m.group(1)) for m in found if m is not None]
        return ids if len(ids) == len(found) and all(d in self.totals for d in ids) else []

    def env(self, node: str) -> dict[str, str]:
        """``{"CUDA_VISIBLE_DEVICES": "N"}`` (``"0,1"`` across two cards) for an engine on
        ``node``; {} without a card."""
        ids = self.ids(node)
        return {ENV: ",".join(map(str, ids))} if ids else {}


    def used_gib(self, node: str) -> float | None:
        """GiB in use now on the card(s) of ``node`` (every program's, summed), from NVML;
        None where the driver cannot tell. Blocks briefly: call it off the event loop."""
        used = [nvml_used_gib(d) for d in (self.ids(node) or [0])]
        return None if any(u is None for u in used) else sum(u or 0.0 for u in used)


def local_devices(cfg: GpuConfig) -> Devices:
    """This machine's cards for ``cfg`` (see :func:`vlmhub.config.gpu.device_totals`). Blocks
    briefly on NVML; raises :class:`~vlmhub.config.locate.ConfigError` for a card without a
    size."""
    return Devices(device_totals(cfg), pinned=cfg.devices is not None)
