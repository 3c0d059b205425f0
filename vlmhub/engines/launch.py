"""Turn a resolved model into a :class:`~vlmhub.engines.base.LaunchRequest`, and pick the
runtime for a config. Pure apart from :func:`make_runtime` (which may connect to Docker)."""

from __future__ import annotations

from pathlib import Path

from vlmhub.config.schema import Config, ResolvedModel, RuntimeConfig
from vlmhub.engines.base import LaunchRequest, Runtime
from vlmhub.engines.devices import local_devices
from vlmhub.engines.keys import engine_key
from vlmhub.paths import default_state_dir
from vlmhub.sizing.flags import render_argv
from vlmhub.sizing.vram import Gpu


def engine_hash(model: ResolvedModel, sleep_mode: bool) -> str:
    """What identifies a launched engine: the spec hash, plus whether it can sleep."""
    assert model.spec is not None
    return model.spec.spec_hash() + ("-sleep" if sleep_mode else "")


def launch_request(
    model: ResolvedModel,
    gpu: Gpu,
    runtime: Runtime,
    rc: RuntimeConfig,
    port: int,
    *,
    sleep_mode: bool = False,
) -> LaunchRequest:
    """The engine's argv, environment, port and its own API key (made on first use in the
    runtime's state dir, see :mod:`vlmhub.engines.keys`). Other secret values never enter the
    request (``pass_env`` names them). Blocks briefly on the key file."""
    spec, budget = model.spec, model.budget
    if spec is None or budget is None:
        raise ValueError(f"{model.name} is an external endpoint; vlmhub does not launch it")
    host, inner_port = runtime.engine_bind(port)
    argv = render_argv(
        spec,
        budget,
        gpu,
        port=inner_port,
        host=host,
        sleep_mode=sleep_mode,
        with_memory_flags=rc.memory_flags,
        vllm_version=rc.vllm_version,
        model_flag=rc.model_as_flag,
    )
    env = {**rc.env, **spec.env, **model.entry.env}
    if sleep_mode:
        env["VLLM_SERVER_DEV_MODE"] = "1"
    return LaunchRequest(
        name=model.name,
        spec_hash=engine_hash(model, sleep_mode),
        image=spec.image,
        argv=argv,
        port=port,
        env=env,
        pass_env=list(rc.pass_env),
        health_path=spec.health_path,
        startup_timeout_s=spec.startup_timeout_s,
        api_key=engine_key(runtime_state_dir(runtime), model.name),
    )


def runtime_state_dir(runtime: Runtime) -> Path:
    """Where ``runtime`` keeps its state (engine keys, process records): its ``state_dir``
    (``vlmhub route --state-dir``), else the default state dir."""
    state = getattr(runtime, "state_dir", None)
    return Path(state) if state is not None else default_state_dir()


def make_runtime(config: Config, kind: str | None = None) -> Runtime:
    """The runtime named by ``kind`` or the config. Docker connects (and may raise
    :class:`~vlmhub.errors.RuntimeUnavailable` naming how to start the engine); the process
    and Docker runtimes list this machine's cards (``gpu.devices``, NVML: briefly)."""
    rc = config.runtime
    chosen = kind or rc.kind
    if chosen == "docker":
        from vlmhub.engines.docker import DockerRuntime

        return DockerRuntime(rc, devices=local_devices(config.gpu))
    if chosen == "process":
        from vlmhub.engines.process import ProcessRuntime

        return ProcessRuntime(rc, devices=local_devices(config.gpu))
    if chosen == "ray":
        from vlmhub.engines.ray import RayRuntime

        return RayRuntime(rc)
    raise ValueError(f"unknown runtime {chosen!r}: use docker, process or ray")
