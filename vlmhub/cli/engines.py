"""``vlmhub ps``, ``logs``, ``stop`` and ``health``: look at engines from both runtimes.

Engines are found the way a restarted router finds them: the process runtime's state dir
(``$VLMHUB_STATE_DIR``) and Docker containers labelled with the configured name prefix. Docker
is skipped (with a dim note) when no engine answers. Each command runs one ``asyncio.run``;
health probes of different engines run concurrently.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, TypeVar

import httpx
import typer
from rich.table import Table

from vlmhub.cli.common import ConfigOption, Context, console, err_console, user_errors
from vlmhub.cli.output import JsonOption, print_json
from vlmhub.config.locate import ConfigError
from vlmhub.config.schema import Config, RuntimeConfig, resolve
from vlmhub.engines.base import EngineHandle, EngineStatus, Runtime, probe
from vlmhub.engines.process import ProcessRuntime
from vlmhub.errors import RuntimeUnavailable, VlmhubError
from vlmhub.sizing.vram import DoesNotFit, Gpu, budget_for


@dataclass
class Engines:
    """The runtimes to look in, what the config says about the models, and notes to show."""

    config: Config | None
    runtimes: list[Runtime] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    budgets: dict[str, float] = field(default_factory=dict)
    aliases: dict[str, str] = field(default_factory=dict)

    def name_of(self, name: str) -> str:
        """The engine name for a model name or alias."""
        return self.aliases.get(name, name)

    async def close(self) -> None:
        for rt in self.runtimes:
            await rt.close()

    async def running(self) -> list[tuple[Runtime, EngineHandle]]:
        found: list[tuple[Runtime, EngineHandle]] = []
        for rt in self.runtimes:
            found += [(rt, h) for h in await rt.adopt()]
        return found

    async def find(self, name: str) -> list[tuple[Runtime, EngineHandle]]:
        """Engines of ``name`` in any state (running ones first)."""
        found: list[tuple[Runtime, EngineHandle]] = []
        for rt in self.runtimes:
            finder = getattr(rt, "find", None)
            handle = await finder(name) if finder is not None else None
            if handle is not None:
                found.append((rt, handle))
        return found


def open_engines(config_path: Path | None, with_docker: bool = True) -> Engines:
    """Load the config leniently (a broken file only loses the VRAM column) and connect to
    the runtimes. Blocks briefly on the Docker ping."""
    ctx = Context(config_path)
    config: Config | None = None
    notes: list[str] = []
    try:
        config = ctx.loaded.config
    except ConfigError as exc:
        notes.append(f"config not loaded ({exc.problems[0] if exc.problems else exc})")
    rc = config.runtime if config is not None else RuntimeConfig()
    engines = Engines(config, [ProcessRuntime(rc)], notes)
    if with_docker:
        from vlmhub.engines.docker import DockerRuntime, docker_host_text

        try:
            engines.runtimes.append(DockerRuntime(rc))
        except RuntimeUnavailable:
            notes.append(f"Docker engines not listed: no Docker engine answers "
                         f"({docker_host_text(rc)})")
    if config is not None and rc.kind == "ray":
        _add_ray(engines, rc)
    if config is not None:
        _read_models(ctx, engines)
    return engines


def _add_ray(engines: Engines, rc: RuntimeConfig) -> None:
    """List the Ray cluster's engines too (runtime.kind: ray); a note when it does not
    answer. Blocks on joining the cluster (seconds)."""
    from vlmhub.engines.ray import RayRuntime

    rt = RayRuntime(rc)
    try:
        asyncio.run(rt.nodes())
    except RuntimeUnavailable as exc:
        engines.notes.append(f"Ray engines not listed: {str(exc).splitlines()[0]}")
        return
    engines.runtimes.append(rt)


def _read_models(ctx: Context, engines: Engines) -> None:
    try:
        models = resolve(ctx.loaded, ctx.registry.specs(), Gpu(1.0), check_fit=False)
    except (ConfigError, VlmhubError) as exc:
        engines.notes.append(f"models not resolved: {str(exc).splitlines()[0]}")
        return
    for m in models:
        for alias in m.aliases:
            engines.aliases.setdefault(alias, m.name)
        if m.spec is not None:
            try:
                engines.budgets[m.name] = budget_for(m.spec, m.entry.budget_gib).footprint_gib
            except DoesNotFit:
                continue


def uptime(seconds: float) -> str:
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def _print_notes(engines: Engines) -> None:
    for note in engines.notes:
        err_console.print(f"[dim]note: {note}[/]", highlight=False)


async def _models_info(handle: EngineHandle, client: httpx.AsyncClient) -> list[dict[str, Any]]:
    try:
        auth = {"Authorization": f"Bearer {handle.api_key}"} if handle.api_key else {}
        r = await client.get(handle.base_url + "/v1/models", timeout=3.0, headers=auth)
        data = r.json().get("data", []) if r.status_code == 200 else []
    except (httpx.HTTPError, ValueError, AttributeError):
        return []
    return [d for d in data if isinstance(d, dict)]


T = TypeVar("T")


def _run(coro_fn: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run one command coroutine; Ctrl-C ends it quietly with exit code 0."""
    try:
        return asyncio.run(coro_fn())
    except KeyboardInterrupt:
        raise typer.Exit(0) from None


# ----------------------------------------------------------------------------- ps
def ps(config: Path | None = ConfigOption,
       as_json: Annotated[bool, JsonOption] = False) -> None:
    """List running engines (processes, containers, and Ray actors with runtime.kind: ray):
    state, port, VRAM budget, uptime, health."""
    with user_errors():
        engines = open_engines(config)
        rows = _run(lambda: _ps_rows(engines))
        _print_notes(engines)
        if as_json:
            print_json(rows)
            return
        if not rows:
            console.print("no engines running")
            return
        nodes = any("node" in r for r in rows)  # several GPUs: which one each engine uses
        table = Table("NAME", "STATE", "RUNTIME", *(["NODE"] if nodes else []), "PORT", "VRAM",
                      "UPTIME", "HEALTH", box=None, header_style="bold")
        for r in rows:
            vram, up = r["vram_gib"], r["uptime_s"]
            table.add_row(r["name"], r["state"], r["runtime"],
                          *([r.get("node", "")] if nodes else []), str(r["port"]),
                          f"{vram:.1f} GiB" if vram is not None else "?",
                          uptime(up) if up is not None else "?",
                          "[green]ok[/]" if r["healthy"] else "[red]down[/]")
        console.print(table)


async def _ps_rows(engines: Engines) -> list[dict[str, Any]]:
    try:
        found = await engines.running()
        async with httpx.AsyncClient(trust_env=False) as client:
            statuses: list[EngineStatus] = list(
                await asyncio.gather(*(rt.status(h) for rt, h in found)))
            healthy: list[bool] = list(await asyncio.gather(*(probe(h, client) for _, h in found)))
    finally:
        await engines.close()
    now = time.time()
    rows = []
    for (rt, h), st, ok in zip(found, statuses, healthy, strict=True):
        rows.append({
            "name": h.name, "state": st.state, "runtime": rt.kind, "port": h.port,
            **({"node": h.node} if h.node else {}),
            "vram_gib": engines.budgets.get(h.name.rsplit("#", 1)[0]),  # a replica: its model's
            "uptime_s": round(now - h.started_at, 1) if h.started_at else None,
            "healthy": ok,
        })
    return sorted(rows, key=lambda r: (r["name"], r["runtime"]))


# ----------------------------------------------------------------------------- logs
def logs(
    name: Annotated[str, typer.Argument(help="Model name (or alias).")],
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing new lines.")]
    = False,
    tail: Annotated[int | None, typer.Option("--tail", "-n", help="Lines to show (all: omit)")]
    = 200,
    config: Path | None = ConfigOption,
) -> None:
    """Print an engine's log (also after it exited or was stopped, while the log exists)."""
    with user_errors():
        engines = open_engines(config)
        _run(lambda: _logs(engines, engines.name_of(name), follow, tail))


async def _logs(engines: Engines, name: str, follow: bool, tail: int | None) -> None:
    try:
        found = await engines.find(name)
        if not found:
            for rt in engines.runtimes:
                if isinstance(rt, ProcessRuntime) and rt.log_path(name).is_file():
                    _print_lines(rt.read_log(name, tail))
                    return
            _print_notes(engines)
            raise VlmhubError(f"no engine named {name!r} (running or stopped). "
                              "Fix: `vlmhub ps` lists the running engines.")
        rt, handle = found[0]
        every = await rt.logs(handle, tail=None)
        _print_lines(every if tail is None else every[-tail:] if tail > 0 else [])
        if follow:
            await print_new_lines(rt, handle, skip=len(every))
    finally:
        await engines.close()


def _print_lines(lines: list[str]) -> None:
    for line in lines:
        console.print(line, markup=False, highlight=False, soft_wrap=True)


async def print_new_lines(rt: Runtime, handle: EngineHandle, skip: int) -> None:
    """Follow the log, printing only non-blank lines after the first ``skip`` non-blank ones
    (those already printed from :meth:`Runtime.logs`). Ends when the engine exits."""
    seen = 0
    async for line in rt.follow(handle):
        if not line.strip():
            continue
        seen += 1
        if seen > skip:
            console.print(line, markup=False, highlight=False, soft_wrap=True)


# ----------------------------------------------------------------------------- stop
def stop(
    name: Annotated[str | None, typer.Argument(help="Model name (or alias).")] = None,
    all_: Annotated[bool, typer.Option("--all", help="Stop every engine.")] = False,
    timeout: Annotated[float, typer.Option("--timeout", help="Seconds before SIGKILL.")]
    = 20.0,
    config: Path | None = ConfigOption,
) -> None:
    """Stop an engine (SIGTERM, then SIGKILL after --timeout) and remove it."""
    with user_errors():
        if (name is None) == (not all_):
            raise VlmhubError("name one engine (`vlmhub stop NAME`) or use --all")
        engines = open_engines(config)
        target = engines.name_of(name) if name is not None else None
        stopped = _run(lambda: _stop(engines, target, timeout))
        _print_notes(engines)
        for rt_kind, engine in stopped:
            console.print(f"stopped {engine} ({rt_kind})")
        if target is not None and not stopped:
            raise VlmhubError(f"no engine named {target!r} runs. Fix: `vlmhub ps` lists them.")
        if target is None and not stopped:
            console.print("no engines running")


async def _stop(engines: Engines, name: str | None, timeout: float) -> list[tuple[str, str]]:
    try:
        if name is None:
            found = await engines.running()
        else:
            found = await engines.find(name)
        await asyncio.gather(*(rt.stop(h, timeout) for rt, h in found))
    finally:
        await engines.close()
    return [(rt.kind, h.name) for rt, h in found]


# ----------------------------------------------------------------------------- health
def health(config: Path | None = ConfigOption,
           as_json: Annotated[bool, JsonOption] = False) -> None:
    """Check every running engine: /health and /v1/models. Exit 1 if any is unhealthy."""
    with user_errors():
        engines = open_engines(config)
        rows = _run(lambda: _health_rows(engines))
        _print_notes(engines)
        if as_json:
            print_json([{"name": r[0], "url": r[1], "healthy": r[5],
                         "serves": [] if r[3] == "-" else r[3].split(", "),
                         "max_model_len": [] if r[4] == "-" else r[4].split(", ")}
                        for r in rows])
        elif not rows:
            console.print("no engines running")
        else:
            table = Table("NAME", "URL", "HEALTH", "SERVES", "MAX_MODEL_LEN", box=None,
                          header_style="bold")
            for row in rows:
                table.add_row(*row[:5])
            console.print(table)
        bad = [row[0] for row in rows if not row[5]]
        if bad:
            if not as_json:
                err_console.print(f"[red]unhealthy:[/] {', '.join(bad)} "
                                  "(`vlmhub logs NAME` shows why)", highlight=False)
            raise typer.Exit(1)


async def _health_rows(engines: Engines) -> list[tuple[str, str, str, str, str, bool]]:
    try:
        found = await engines.running()
        async with httpx.AsyncClient(trust_env=False) as client:
            checks = await asyncio.gather(*(_check(h, client) for _, h in found))
    finally:
        await engines.close()
    return sorted(checks)


async def _check(h: EngineHandle, client: httpx.AsyncClient) -> tuple[str, str, str, str,
                                                                      str, bool]:
    ok = await probe(h, client)
    models = await _models_info(h, client) if ok else []
    ids = ", ".join(str(m.get("id")) for m in models) or "-"
    lens = ", ".join(str(m.get("max_model_len", "?")) for m in models) or "-"
    good = ok and bool(models)
    mark = "[green]ok[/]" if good else "[red]down[/]" if not ok else "[red]no models[/]"
    return h.name, h.base_url + "/v1", mark, ids, lens, good


def register(app: typer.Typer) -> None:
    """Add ps, logs, stop and health to ``app``."""
    app.command("ps")(ps)
    app.command("logs")(logs)
    app.command("stop")(stop)
    app.command("health")(health)
