"""Which GPU size vlmhub plans for: --gpu-gib, NVML, then the config."""

from __future__ import annotations

import pytest

from vlmhub.config.gpu import detect_gpu, probe_nvml
from vlmhub.config.locate import ConfigError
from vlmhub.config.schema import GpuConfig


def test_flag_wins_then_config() -> None:
    cfg = GpuConfig(total_gib=12, reserve_gib=1, budget_gib=9, force_total=True)
    flagged = detect_gpu(cfg, 24)
    assert (flagged.total_gib, flagged.source) == (24, "flag")
    assert flagged.usable_gib == 9  # the budget caps what vlmhub may use
    from_cfg = detect_gpu(cfg)
    assert (from_cfg.total_gib, from_cfg.source, from_cfg.usable_gib) == (12, "config", 9)
    assert detect_gpu(GpuConfig(total_gib=12, reserve_gib=1, force_total=True)).usable_gib == 11


def test_no_gpu_and_no_size_is_a_clear_error() -> None:
    if probe_nvml() is not None:
        pytest.skip("this machine has an NVIDIA GPU: NVML answers")
    with pytest.raises(ConfigError, match=r"no NVIDIA GPU was found .* set gpu.total_gib"):
        detect_gpu(GpuConfig())
