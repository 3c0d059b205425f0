"""Several GPUs in one machine, without Ray: each card is a node of its own.

The process and Docker runtimes list the machine's cards (``gpu.devices``, else every card the
pretend machine or NVML lists; :func:`vlmhub.config.gpu.device_totals`) as nodes ``gpu0``,
``gpu1``, ... with each card's total GiB, exactly as :class:`~vlmhub.engines.ray.RayRuntime`
lists Ray nodes: the supervisor turns each total into usable GiB (``gpu.reserve_gib``,
``gpu.budget_gib``) and the placement and swap policy run per node, one engine operation per
card at a time. An engine started on node ``gpuN`` sees card N alone: the process runtime
sets ``CUDA_VISIBLE_DEVICES=N`` in the engine's environment (not vlmhub's), the Docker runtime
asks for that card (``device_requests`` with its id).

With one card there is one node ``""`` (the single-GPU path, unchanged); a card named in
``gpu.devices`` is still the one the engine sees. Pure apart from :func:`local_devices` (which
may ask NVML, briefly).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from vlmhub.config.gpu import device_totals
from vlmhub.config.schema import GpuConfig

PREFIX = "gpu"
"""Node names: ``gpu0``, ``gpu1``, ... (the CUDA device id)."""
ENV = "CUDA_VISIBLE_DEVICES"
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
        (one card, not pinned). A node of this runtime is ``gpuN``; anything else (a node of
        another runtime) names no card."""
        if not node:
            return list(self.totals) if self.pinned else []
        m = _NODE.fullmatch(node)
        return [int(m.group(1))] if m is not None and int(m.group(1)) in self.totals else []

    def env(self, node: str) -> dict[str, str]:
        """``{"CUDA_VISIBLE_DEVICES": "N"}`` for an engine on ``node``; {} without a card."""
        ids = self.ids(node)
        return {ENV: ",".join(map(str, ids))} if ids else {}


def local_devices(cfg: GpuConfig) -> Devices:
    """This machine's cards for ``cfg`` (see :func:`vlmhub.config.gpu.device_totals`). Blocks
    briefly on NVML; raises :class:`~vlmhub.config.locate.ConfigError` for a card without a
    size."""
    return Devices(device_totals(cfg), pinned=cfg.devices is not None)
