"""The ray runtime without a cluster: a cluster that does not answer is a clear, fast error,
and the router refuses requests with the reason instead of letting them time out."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from vlmhub.cli import app
from vlmhub.config.gpu import probe_nvml
from vlmhub.config.registry import Registry
from vlmhub.config.schema import RuntimeConfig, load_config, resolve
from vlmhub.control.contract import Refused
from vlmhub.control.supervisor import Supervisor
from vlmhub.engines.ports import free_port
from vlmhub.engines.ray import RayRuntime
from vlmhub.errors import RuntimeUnavailable
from vlmhub.sizing.vram import Gpu

pytestmark = pytest.mark.ray
REPO = Path(__file__).resolve().parent.parent


async def test_ray_unreachable_cluster_is_a_clear_fast_error() -> None:
    address = f"127.0.0.1:{free_port()}"  # nothing listens there
    with pytest.raises(RuntimeUnavailable) as err:
        await RayRuntime(RuntimeConfig(kind="ray", address=address)).nodes()
    assert address in str(err.value) and "ray start --head" in str(err.value)
    assert "Connection refused" in str(err.value)  # the port check, not ray.init's retries


async def test_ray_no_node_refuses_with_the_reason(tmp_path: Path) -> None:
    config = yaml.safe_load((REPO / "examples" / "ray-demo.yaml").read_text())
    config["runtime"]["address"] = f"127.0.0.1:{free_port()}"
    path = tmp_path / "models.yaml"
    path.write_text(yaml.safe_dump(config))
    loaded = load_config(path)
    gpu = Gpu(8.0, 0.5)
    models = resolve(loaded, Registry().specs(), gpu)
    sup = Supervisor(models, loaded.config, gpu, RayRuntime(loaded.config.runtime), tick_s=0.05)
    await sup.start()
    try:
        assert sup.nodes == {}
        with pytest.raises(Refused, match="no GPU node is available"):
            await sup.acquire("ray-ocr")
    finally:
        await sup.shutdown()


def test_node_resources_declares_vram_for_ray_start() -> None:
    """`vlmhub node-resources` prints what `ray start --resources` takes; without a GPU (and
    without --gib) it says how to declare one."""
    run = CliRunner().invoke(app, ["node-resources", "--gib", "12"])
    assert run.exit_code == 0 and json.loads(run.output) == {"vram_gib": 12.0}
    if probe_nvml() is None:  # this machine has no NVIDIA GPU: the NVML path says so
        run = CliRunner().invoke(app, ["node-resources"])
        assert run.exit_code == 2 and "--gib N" in run.output
