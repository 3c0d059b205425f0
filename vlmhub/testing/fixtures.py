"""Test helpers for vlmhub and for authors of model plugins: specs and configs that run the
stand-in engine (:mod:`vlmhub.testing.stub_engine`) instead of vLLM.

Plain functions, no pytest needed; the fixtures built on them are in
:mod:`vlmhub.testing.pytest_plugin`. :func:`docker_client_or_reason` and
:func:`ensure_stub_image` block on Docker (the image build takes seconds to a minute).
"""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vlmhub.config.schema import ModelEntry, ResolvedModel, RuntimeConfig
from vlmhub.spec import ModelSpec

if TYPE_CHECKING:
    from vlmhub.engines.base import LaunchRequest, Runtime

STUB_IMAGE = "vlmhub/stub-engine:dev"
STUB_MODULE = "vlmhub.testing.stub_engine"
REPO_ROOT = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = REPO_ROOT / "scripts" / "build-stub-image.sh"
STUB_SOURCE = Path(__file__).resolve().parent / "stub_engine.py"


def stub_spec(name: str, **overrides: Any) -> ModelSpec:
    """A small model served by the stand-in engine: image :data:`STUB_IMAGE`, hf_repo
    ``stub/<name>``, max_model_len 2048, eager mode and a ~1.4 GiB VRAM footprint.

    ``overrides`` replace top-level spec fields; ``options`` and ``vram`` dicts are merged
    into the defaults (``stub_spec("a", options={"max_model_len": 4096})``).
    """
    data: dict[str, Any] = {
        "name": name,
        "description": f"stand-in engine model {name}",
        "hf_repo": f"stub/{name}",
        "image": STUB_IMAGE,
        "vllm_version": "0.32.0",
        "options": {"max_model_len": 2048, "max_num_seqs": 4, "enforce_eager": True},
        "vram": {"weights_gib": 0.5, "kv_bytes_per_token": 1024, "activation_gib": 0.2,
                 "non_torch_gib": 0.1, "cuda_context_gib": 0.3, "sleep_residual_gib": 0.3},
        "startup_timeout_s": 60.0,
        "reload_cost_s": 1.0,
    }
    for key, value in overrides.items():
        if key in ("options", "vram") and isinstance(value, dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    return ModelSpec.model_validate(data)


def stub_model(spec: ModelSpec, gpu_total_gib: float = 8.0) -> ResolvedModel:
    """``spec`` as a configured model (no models.yaml), its budget checked against a GPU."""
    from vlmhub.sizing.vram import Gpu, check_fits_alone

    budget = check_fits_alone(spec, Gpu(gpu_total_gib))
    return ResolvedModel(spec.name, ModelEntry(), spec, budget, "test")


def stub_launch_request(
    runtime: Runtime, rc: RuntimeConfig, spec: ModelSpec, port: int,
    gpu_total_gib: float = 8.0,
) -> LaunchRequest:
    """The real launch request (:func:`vlmhub.launch.launch_request`) for ``spec``."""
    from vlmhub.engines.launch import launch_request
    from vlmhub.sizing.vram import Gpu

    return launch_request(stub_model(spec, gpu_total_gib), Gpu(gpu_total_gib), runtime, rc, port)


def stub_process_config(tmp_path: Path, **overrides: Any) -> RuntimeConfig:
    """A process runtime that runs the stand-in engine with this interpreter; caches under
    ``tmp_path``. ``overrides`` replace RuntimeConfig fields."""
    data: dict[str, Any] = {
        "kind": "process",
        "process_argv": [sys.executable, "-m", STUB_MODULE],
        "memory_flags": True,
        "gpus": None,
        "hf_cache": str(tmp_path / "hf-cache"),
        "vllm_cache": str(tmp_path / "vllm-cache"),
        **overrides,
    }
    return RuntimeConfig.model_validate(data)


def stub_docker_config(tmp_path: Path, name_prefix: str, **overrides: Any) -> RuntimeConfig:
    """A Docker runtime without GPUs, its caches under ``tmp_path``, containers named
    ``<name_prefix>-<model>`` (use a unique prefix per test: cleanup goes by it)."""
    data: dict[str, Any] = {
        "kind": "docker",
        "gpus": None,
        "hf_cache": str(tmp_path / "hf-cache"),
        "vllm_cache": str(tmp_path / "vllm-cache"),
        "name_prefix": name_prefix,
        **overrides,
    }
    return RuntimeConfig.model_validate(data)


def docker_client_or_reason(docker_host: str | None = None) -> tuple[Any, str | None]:
    """``(client, None)`` when a Docker engine answers, else ``(None, why not)``."""
    try:
        import docker
    except ImportError as exc:  # pragma: no cover - docker is a dependency
        return None, f"the docker SDK is not installed: {exc}"
    host = docker_host or os.environ.get("DOCKER_HOST")
    try:
        client = docker.DockerClient(base_url=host) if host else docker.from_env()
        client.ping()
    except Exception as exc:  # any connection failure means "no engine"
        return None, (f"no Docker engine answers at {host or 'the default socket'} ({exc}); "
                      "start one (scripts/start-dockerd.sh) and set DOCKER_HOST")
    return client, None


def _image_created(client: Any, image: str) -> float | None:
    import docker.errors

    try:
        created = str(client.images.get(image).attrs.get("Created", ""))
    except docker.errors.ImageNotFound:
        return None
    stamp = created[:26].rstrip("Z") if created else ""
    try:
        return datetime.fromisoformat(stamp + "+00:00").timestamp()
    except ValueError:
        return 0.0


def ensure_stub_image(client: Any, image: str = STUB_IMAGE, script: Path = BUILD_SCRIPT) -> str:
    """Build ``image`` with scripts/build-stub-image.sh when it is missing or older than
    stub_engine.py. Blocks for the build. Raises RuntimeError with the script's output."""
    created = _image_created(client, image)
    if created is not None and created >= STUB_SOURCE.stat().st_mtime:
        return image
    if not script.is_file():
        raise RuntimeError(
            f"{image} is missing (or older than {STUB_SOURCE.name}) and the build script "
            f"{script} does not exist (vlmhub installed without its repository?). Build the "
            "stand-in image yourself from vlmhub/testing/Dockerfile and tag it " + image
        )
    env = {**os.environ, "VLMHUB_STUB_IMAGE": image}  # the script uses DOCKER_HOST as well
    done = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True,
                          timeout=900, check=False)
    if done.returncode != 0 or _image_created(client, image) is None:
        raise RuntimeError(f"{script} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return image
