"""Find the GPU's real total memory (NVML), falling back to the configured size.

``VLMHUB_PRETEND_GPU_GIB=N`` (tests and demos of the GPU code paths on a machine without a
card) makes :func:`find_gpu` report a pretend card of N GiB instead of asking NVML.

Blocks briefly on NVML when ``nvidia-ml-py`` is installed; safe to call from any thread.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from typing import Any, TypeVar

from vlmhub.config.locate import ConfigError
from vlmhub.config.schema import GpuConfig
from vlmhub.sizing.vram import Gpu
from vlmhub.spec import GIB

T = TypeVar("T")


def _nvml(index: int, read: Callable[[Any, Any], T]) -> T | None:
    """``read(pynvml, handle of GPU index)`` between NVML's init and shutdown; None without a
    driver or device (NVML raises its own error types). Blocks briefly."""
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except Exception:
        return None
    try:
        return read(pynvml, pynvml.nvmlDeviceGetHandleByIndex(index))
    except Exception:
        return None
    finally:
        pynvml.nvmlShutdown()


def _name_and_total(nvml: Any, handle: Any) -> tuple[str, float]:
    name = nvml.nvmlDeviceGetName(handle)
    total = nvml.nvmlDeviceGetMemoryInfo(handle).total
    return (name.decode() if isinstance(name, bytes) else str(name)), total / GIB


def probe_nvml(index: int = 0) -> tuple[str, float] | None:
    """``(name, total GiB)`` of GPU ``index`` from the driver, or None without one."""
    return _nvml(index, _name_and_total)


def nvml_used_gib(index: int = 0) -> float | None:
    """GiB in use now on GPU ``index`` (every program's), from the driver; None without one.
    Blocks briefly (NVML)."""
    return _nvml(index, lambda nvml, handle: float(nvml.nvmlDeviceGetMemoryInfo(handle).used)
                 / GIB)


PRETEND_ENV = "VLMHUB_PRETEND_GPU_GIB"


def find_gpu(index: int = 0) -> tuple[str, float] | None:
    """``(name, total GiB)`` of GPU ``index``: a pretend card (:data:`PRETEND_ENV`), else
    the driver's (NVML), else None."""
    pretend = os.environ.get(PRETEND_ENV, "").strip()
    if pretend:
        try:
            total = float(pretend)
        except ValueError:
            total = 0.0
        if total > 0:
            return f"Pretend GPU ({PRETEND_ENV})", total
    return probe_nvml(index)


STUB_GPUS_ENV = "VLMHUB_STUB_GPUS"
"""The pretend machine of several cards (tests, demos): ``"2"`` is two cards of the configured
size (``gpu.total_gib``, else :data:`PRETEND_ENV`), ``"8,12"`` two cards of 8 and 12 GiB. The
stand-in engine reads it too (vlmhub.testing.stub_gpus): each pretend card its own ledger."""


def pretend_gpus(default_gib: float | None) -> list[float] | None:
    """The GiB of each card of the pretend machine (:data:`STUB_GPUS_ENV`), None without one.
    Raises :class:`ConfigError` when the variable is malformed."""
    text = os.environ.get(STUB_GPUS_ENV, "").strip()
    if not text:
        return None
    try:
        if "," not in text:
            count = int(text)
            if count < 1 or not default_gib:
                raise ValueError
            return [default_gib] * count
        sizes = [float(part) for part in text.split(",")]
        if not all(0 < g < math.inf for g in sizes):
            raise ValueError
        return sizes
    except ValueError:
        raise ConfigError([
            f"{STUB_GPUS_ENV}={text!r}: not a pretend machine. Fix: a number of cards (\"2\", "
            "with gpu.total_gib set) or each card's GiB (\"8,8\")."
        ]) from None


def probe_nvml_all() -> list[tuple[str, float]] | None:
    """``(name, total GiB)`` of every GPU the driver lists, or None without NVML."""
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except Exception:
        return None
    try:
        count = pynvml.nvmlDeviceGetCount()
    except Exception:
        return None
    finally:
        pynvml.nvmlShutdown()
    found = [probe_nvml(i) for i in range(count)]
    return [f for f in found if f is not None] if all(found) else None


def device_totals(cfg: GpuConfig) -> dict[int, float]:
    """Each card engines may use -> its total GiB, in ``gpu.devices`` order.

    The cards: ``gpu.devices``, else every card of the pretend machine (:data:`STUB_GPUS_ENV`)
    or of NVML, else none ({}: one GPU, the one of ``gpu:``, as before). Each card's size:
    the pretend machine's or NVML's, else (no such card, no NVML, or ``force_total``)
    ``gpu.total_gib``. A card without a size is a :class:`ConfigError`. Blocks briefly on
    NVML."""
    default = cfg.total_gib or (find_gpu(cfg.index) or (None, None))[1]
    listed = pretend_gpus(default)
    if listed is None and not cfg.force_total:
        listed = [total for _, total in probe_nvml_all() or []] or None
    if cfg.devices is None and listed is None:
        return {}
    wanted = cfg.devices if cfg.devices is not None else list(range(len(listed or [])))
    out: dict[int, float] = {}
    for d in wanted:
        size = listed[d] if listed is not None and d < len(listed) else cfg.total_gib
        if size is None:
            raise ConfigError([
                f"gpu.devices: card {d} was not found (NVML) and gpu.total_gib is not set. "
                "Fix: set gpu.total_gib, or list only the cards this machine has."
            ])
        out[d] = size
    return out


def device_count(cfg: GpuConfig) -> int:
    """How many cards engines may use: ``gpu.devices``, else the pretend machine's, else
    NVML's, else one. Blocks briefly on NVML."""
    if cfg.devices is not None:
        return len(cfg.devices)
    default = cfg.total_gib or (find_gpu(cfg.index) or (None, None))[1]
    listed = pretend_gpus(default)
    if listed is None and not cfg.force_total:
        listed = [total for _, total in probe_nvml_all() or []] or None
    return max(len(listed or []), 1)


def detect_gpu(cfg: GpuConfig, override_total_gib: float | None = None) -> Gpu:
    """The GPU to plan for: ``--gpu-gib``, else NVML, else ``gpu.total_gib`` from the file;
    ``devices``: how many such cards engines may use (:func:`device_count`)."""
    n = device_count(cfg)
    if override_total_gib is not None:
        return Gpu(override_total_gib, cfg.reserve_gib, cfg.budget_gib, "GPU (--gpu-gib)", "flag",
                   devices=n)
    found = None if cfg.force_total else find_gpu(cfg.index)
    if found is not None:
        return Gpu(found[1], cfg.reserve_gib, cfg.budget_gib, found[0], "nvml", devices=n)
    if cfg.total_gib is None:
        raise ConfigError(
            [
                "gpu.total_gib: no NVIDIA GPU was found (NVML) and the config does not give its "
                "size. Fix: set gpu.total_gib in models.yaml, or pass --gpu-gib N."
            ]
        )
    return Gpu(cfg.total_gib, cfg.reserve_gib, cfg.budget_gib, "GPU (from config)", "config",
               devices=n)
