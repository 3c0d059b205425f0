"""``vlmhub init``: write a commented models.yaml for the GPU of this machine.

Every installed plugin gets an entry: the plugin's defaults where they fit the card alone,
else the first of its variants (by name) that fits (``variant:``), else a commented-out entry
saying why. The file is checked (loaded and planned) before it is written; an existing file is kept
unless ``--force``. Blocks briefly on NVML and on writing one small file.
"""

from __future__ import annotations

import tempfile
from datetime import date
from pathlib import Path
from typing import Annotated

import typer

from vlmhub.cli.common import GpuOption, console, user_errors
from vlmhub.config.gpu import detect_gpu, find_gpu
from vlmhub.config.registry import Registry
from vlmhub.config.schema import GpuConfig, load_config, resolve
from vlmhub.errors import VlmhubError
from vlmhub.sizing.vram import DoesNotFit, Gpu, check_fits_alone
from vlmhub.spec import ModelSpec

RESERVE_GIB = GpuConfig().reserve_gib


def _choice(spec: ModelSpec, gpu: Gpu) -> tuple[str | None, float] | None:
    """(variant or None for the defaults, footprint GiB) of the first setting that fits."""
    for variant in (None, *sorted(spec.variants)):
        try:
            s = spec if variant is None else spec.with_variant(variant)
            return variant, check_fits_alone(s, gpu).footprint_gib
        except (DoesNotFit, KeyError):
            continue
    return None


def render(specs: dict[str, ModelSpec], gpu: Gpu, today: date) -> str:
    """The models.yaml text for ``gpu``: every plugin, enabled where it fits alone."""
    lines = [
        f"# vlmhub configuration for {gpu.name} ({gpu.total_gib:.1f} GiB), written by "
        f"`vlmhub init` on {today.isoformat()}.",
        "# Every key is described in docs/configuration.md. Check it with: vlmhub config check;",
        "# `vlmhub plan` shows each model's budget and vLLM argv. Models that do not fit at",
        "# once are swapped in and out on demand by `vlmhub route`.",
        "gpu:",
        f"  total_gib: {gpu.total_gib:g}    # used only when NVML finds no GPU",
        f"  reserve_gib: {RESERVE_GIB:g}     # kept free for the desktop and other programs",
        "  # budget_gib: 10     # optional cap on what vlmhub may use",
        "",
        "router:",
        "  host: 127.0.0.1",
        "  port: 8080",
        "  # api_keys: [sk-local-1]   # or VLMHUB_API_KEYS=key1,key2 in the environment",
        "",
        "runtime:",
        "  kind: docker           # or process (vLLM installed here) or ray",
        "",
        "models:",
    ]
    fitting = 0
    for name, spec in sorted(specs.items()):
        what = (spec.description or spec.hf_repo).splitlines()[0]
        chosen = _choice(spec, gpu)
        if chosen is None:
            lines += [f"  # {name}:    # {what}: does not fit the {gpu.usable_gib:.1f} GiB "
                      "usable, even in its smallest variant"]
            continue
        variant, gib = chosen
        fitting += 1
        lines.append(f"  {name}:    # {what}: {gib:.2f} GiB estimated")
        if variant is not None:
            lines.append(f"    variant: {variant}    # the defaults do not fit this card")
        lines.append("    ttl: 600             # stop after 10 idle minutes")
    if not fitting:
        lines.append("  {}    # no installed plugin fits this card alone")
    return "\n".join(lines) + "\n"


def init(
    output: Annotated[Path, typer.Option(
        "--output", "-o", help="Where to write it (default: ./models.yaml).")]
    = Path("models.yaml"),
    force: Annotated[bool, typer.Option("--force", help="Replace an existing file.")] = False,
    gpu_gib: float | None = GpuOption,
) -> None:
    """Write a commented models.yaml for this machine's GPU (or --gpu-gib N)."""
    with user_errors():
        if output.exists() and not force:
            raise VlmhubError(f"{output} exists; not replacing it. Fix: edit it, or pass "
                              "--force (or --output OTHER.yaml)")
        if gpu_gib is None and find_gpu() is None:
            raise VlmhubError("no NVIDIA GPU was found (NVML), so there is no card to write "
                              "a models.yaml for. Fix: pass --gpu-gib N for the card it is "
                              "for; without a GPU, `vlmhub route` runs the stand-in demo.")
        gpu = detect_gpu(GpuConfig(), gpu_gib)
        specs = Registry().specs()
        text = render(specs, gpu, date.today())
        with tempfile.TemporaryDirectory() as tmp:  # check it plans before writing it
            trial = Path(tmp) / "models.yaml"
            trial.write_text(text)
            models = resolve(load_config(trial), specs, gpu)
        output.write_text(text)
        console.print(f"Wrote {output} for {gpu.name} ({gpu.total_gib:.1f} GiB, "
                      f"{gpu.usable_gib:.1f} usable): {len(models)} model(s) "
                      f"({', '.join(m.name for m in models) or 'none'}). Next: `vlmhub plan`, "
                      "then `vlmhub route`.", highlight=False, soft_wrap=True)


def register(app: typer.Typer) -> None:
    """Add ``init`` to ``app``."""
    app.command("init")(init)
