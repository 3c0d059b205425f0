"""Find the GPU's real total memory (NVML), falling back to the configured size.

``VLMHUB_PRETEND_GPU_GIB=N`` (tests and demos of the GPU code paths on a machine without a
card) makes :func:`find_gpu` report a pretend card of N GiB instead of asking NVML.

Blocks briefly on NVML when ``nvidia-ml-py`` is installed; safe to call from any thread.
"""

from __future__ import annotations

import os

from vlmhub.config.locate import ConfigError
from vlmhub.config.schema import GpuConfig
from vlmhub.sizing.vram import Gpu
from vlmhub.spec import GIB


def probe_nvml(index: int = 0) -> tuple[str, float] | None:
    """``(name, total GiB)`` of GPU ``index`` from the driver, or None without one."""
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except Exception:  # no driver, no device: NVML raises its own error types
        return None
    try:
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        name = pynvml.nvmlDeviceGetName(handle)
        total = pynvml.nvmlDeviceGetMemoryInfo(handle).total
        return (name.decode() if isinstance(name, bytes) else str(name)), total / GIB
    except Exception:
        return None
    finally:
        pynvml.nvmlShutdown()


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


def detect_gpu(cfg: GpuConfig, override_total_gib: float | None = None) -> Gpu:
    """The GPU to plan for: ``--gpu-gib``, else NVML, else ``gpu.total_gib`` from the file."""
    if override_total_gib is not None:
        return Gpu(override_total_gib, cfg.reserve_gib, cfg.budget_gib, "GPU (--gpu-gib)", "flag")
    found = None if cfg.force_total else find_gpu(cfg.index)
    if found is not None:
        return Gpu(found[1], cfg.reserve_gib, cfg.budget_gib, found[0], "nvml")
    if cfg.total_gib is None:
        raise ConfigError(
            [
                "gpu.total_gib: no NVIDIA GPU was found (NVML) and the config does not give its "
                "size. Fix: set gpu.total_gib in models.yaml, or pass --gpu-gib N."
            ]
        )
    return Gpu(cfg.total_gib, cfg.reserve_gib, cfg.budget_gib, "GPU (from config)", "config")
