"""``vlmhub node-resources``: the Ray resources a GPU node declares (docs/scale-out.md).

Prints ``{"vram_gib": N}`` for ``ray start --resources``: the GPU's total memory from NVML on
this machine (``nvidia-ml-py``), or ``--gib``. Blocks briefly on NVML.
"""

from __future__ import annotations

import json
from typing import Annotated

import typer

from vlmhub.cli.common import user_errors
from vlmhub.config.gpu import probe_nvml
from vlmhub.errors import VlmhubError


def node_resources(
    index: Annotated[int, typer.Option("--index", help="The GPU's NVML index.")] = 0,
    gib: Annotated[float | None, typer.Option(
        "--gib", help="Declare this many GiB instead of asking NVML.", min=0.1)] = None,
) -> None:
    """Print this node's Ray resources: ray start --resources="$(vlmhub node-resources)"."""
    with user_errors():
        total = gib
        if total is None:
            found = probe_nvml(index)
            if found is None:
                raise VlmhubError(
                    f"no NVIDIA GPU {index} found through NVML on this machine. Fix: install "
                    "the driver and `pip install nvidia-ml-py`, or declare the memory with "
                    "--gib N."
                )
            total = found[1]
        typer.echo(json.dumps({"vram_gib": round(total, 2)}))


def register(app: typer.Typer) -> None:
    """Add ``node-resources`` to ``app``."""
    app.command("node-resources")(node_resources)
