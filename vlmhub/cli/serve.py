"""``vlmhub serve MODEL``: start one engine, show its start-up phases, print how to call it,
then follow its log until Ctrl-C (or return at once with ``--detach``).

The engine's start-up memory lines are recorded as the model's measured budget (or, after a
start that failed for memory, its estimate is raised): see :mod:`vlmhub.sizing.budgets`.

Everything runs in one ``asyncio.run``. SIGINT and SIGTERM are caught by the event loop: during
start-up they stop the engine and exit 130; while following the log they stop it gracefully
and exit 0. An image pull runs in a background thread and shows a progress bar.
:func:`register` adds ``serve`` and the engine commands of :mod:`vlmhub.cli.engines`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shlex
import signal
import time
from collections.abc import Awaitable
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import typer
from rich.console import Group, RenderableType
from rich.live import Live
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn
from rich.spinner import Spinner
from rich.text import Text

from vlmhub.cli import engines as engine_cmds
from vlmhub.cli.budgets import resolve_measured, store
from vlmhub.cli.common import ConfigOption, Context, GpuOption, console, err_console, user_errors
from vlmhub.config.schema import ResolvedModel, RuntimeConfig
from vlmhub.engine_log import LogParser
from vlmhub.engines.base import EngineHandle, LaunchRequest, Runtime, wait_ready
from vlmhub.engines.keys import key_path
from vlmhub.engines.launch import launch_request, make_runtime, runtime_state_dir
from vlmhub.engines.ports import pick_port
from vlmhub.errors import EngineStartError, VlmhubError
from vlmhub.sizing.budgets import observe_start
from vlmhub.sizing.flags import redact

T = TypeVar("T")
RuntimeKind = Literal["docker", "process", "ray"]


class Interrupted(Exception):
    """SIGINT or SIGTERM arrived while waiting."""


class Signals:
    """SIGINT/SIGTERM as an asyncio event (installed on the running loop)."""

    def __init__(self) -> None:
        self.event = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.event.set)

    def remove(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)

    async def guard(self, aw: Awaitable[T]) -> T:
        """``await aw``, or cancel it and raise :class:`Interrupted` when a signal comes."""
        task = asyncio.ensure_future(aw)
        waiter = asyncio.ensure_future(self.event.wait())
        try:
            await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
        if task.done():
            return task.result()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task  # let it clean up; its outcome no longer matters
        raise Interrupted


class PhaseView:
    """The start-up phases with their elapsed times; live on a terminal, else one line each."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.t0 = time.monotonic()
        self.done: list[tuple[str, float]] = []
        self.current: str | None = None
        self.since = self.t0
        self.live = console.is_terminal

    def on_phase(self, phase: str, line: str) -> None:
        if phase == self.current:
            return
        now = time.monotonic()
        if self.current is not None:
            self.done.append((self.current, now - self.since))
        self.current, self.since = phase, now
        if not self.live:
            label = phase.replace("_", " ")
            console.print(f"  [{now - self.t0:6.1f}s] {label}", markup=False, highlight=False)

    def finish(self) -> None:
        if self.current is not None:
            self.done.append((self.current, 0.0))
            self.current = None

    def __rich__(self) -> RenderableType:
        rows: list[RenderableType] = [
            Text.assemble(("  ✓ ", "green"), f"{p.replace('_', ' '):<16}", (f"{d:5.1f}s", "dim"))
            for p, d in self.done
        ]
        if self.current is not None:
            label = self.current.replace("_", " ")
            elapsed = time.monotonic() - self.t0
            rows.append(Spinner("dots", Text(f" {label:<16}{elapsed:5.1f}s total")))
        return Group(*rows)


def planned_command(rt: Runtime, rc: RuntimeConfig, req: LaunchRequest) -> str:
    """The command vlmhub runs, secrets redacted (env values are never shown)."""
    if rt.kind == "docker":
        container = getattr(rt, "container_name", lambda n: n)(req.name)
        parts = ["docker", "run", "-d", "--name", container, "-p", f"127.0.0.1:{req.port}:8000"]
        parts += ["--ipc=host"] if rc.ipc_host else ["--shm-size=2g"]
        if rc.gpus:
            parts += ["--gpus", rc.gpus]
        for host_dir, inner in ((rc.hf_cache, "huggingface"), (rc.vllm_cache, "vllm")):
            parts += ["-v", f"{Path(host_dir).expanduser()}:/root/.cache/{inner}"]
        for key in [*req.env, *(k for k in req.pass_env if k in os.environ)]:
            parts += ["-e", key]  # names only: values may be secret
        return shlex.join([*parts, req.image, *redact(req.argv)])
    return shlex.join(redact([*rc.process_argv, *req.argv]))


def _ocr_prompt(model: ResolvedModel) -> str | None:
    spec = model.spec
    if spec is None or ("ocr" not in spec.capabilities and "ocr" not in spec.presets):
        return None
    if "ocr" in spec.presets:
        return spec.presets["ocr"].prompt
    if spec.default_preset is not None:
        return spec.presets[spec.default_preset].prompt
    return "Extract the text content from this image."


def examples(model: ResolvedModel, base_url: str, key_file: Path | None = None
             ) -> tuple[str, str]:
    """A curl command and a Python ``openai`` snippet for the engine, ready to paste. With
    ``key_file`` (the engine's own key, :mod:`vlmhub.engines.keys`) they read the key from
    it: the key itself is never printed."""
    name = model.api_name
    prompt = _ocr_prompt(model)
    if prompt is None:
        content: Any = "Hello! Who are you?"
        py_content = '"Hello! Who are you?"'
        py_pre = ""
    else:
        content = [{"type": "image_url", "image_url": {"url": "@IMAGE@"}},
                   {"type": "text", "text": prompt}]
        py_content = ('[\n        {"type": "image_url", "image_url": {"url": '
                      'f"data:image/png;base64,{image}"}},\n        {"type": "text", "text": '
                      f"{json.dumps(prompt)}}},\n    ]")
        py_pre = 'image = base64.b64encode(open("page.png", "rb").read()).decode()\n'
    body = json.dumps({"model": name, "messages": [{"role": "user", "content": content}],
                       "max_tokens": 256})
    body = body.replace("'", "'\\''").replace(
        "@IMAGE@", "data:image/png;base64,'\"$(base64 -w0 page.png)\"'")
    auth = f"-H \"Authorization: Bearer $(cat '{key_file}')\" " if key_file else ""
    curl = (f"curl -s {base_url}/chat/completions {auth}-H 'Content-Type: application/json' "
            f"-d '{body}'")
    key = f'open("{key_file}").read().strip()' if key_file else '"EMPTY"'
    imports = "import base64\n" if prompt is not None else ""
    python = (
        f"{imports}from openai import OpenAI\n\n"
        f'client = OpenAI(base_url="{base_url}", api_key={key})\n'
        f"{py_pre}"
        "response = client.chat.completions.create(\n"
        f'    model="{name}",\n'
        f'    messages=[{{"role": "user", "content": {py_content}}}],\n'
        "    max_tokens=256,\n"
        ")\n"
        "print(response.choices[0].message.content)"
    )
    return curl, python


def print_ready(model: ResolvedModel, handle: EngineHandle, seconds: float, detach: bool,
                state_dir: Path) -> None:
    base_url = handle.base_url + "/v1"
    console.print(f"[bold green]{handle.name} is ready[/] after {seconds:.1f} s "
                  f"({handle.runtime}, model id {model.api_name!r})", highlight=False)
    console.print(f"Endpoint: {base_url}", markup=False, highlight=False, soft_wrap=True)
    key_file = key_path(state_dir, handle.name) if handle.api_key else None
    curl, python = examples(model, base_url, key_file)
    hint = " (page.png is your image)" if _ocr_prompt(model) is not None else ""
    console.print(f"\n[bold]curl[/]{hint}:", highlight=False)
    console.print(curl, markup=False, highlight=False, soft_wrap=True)
    console.print("\n[bold]Python[/] (pip install openai):", highlight=False)
    console.print(python, markup=False, highlight=False, soft_wrap=True)
    if detach:
        console.print(f"\nRunning in the background. Logs: vlmhub logs {handle.name} -f    "
                      f"Stop: vlmhub stop {handle.name}", markup=False, highlight=False,
                      soft_wrap=True)
    else:
        console.print("\nFollowing the log; Ctrl-C stops the engine.", highlight=False)


async def _pull(rt: Runtime, image: str, signals: Signals) -> None:
    ensure = getattr(rt, "ensure_image", None)
    if ensure is None:
        return
    sizes: dict[str, tuple[int, int | None]] = {}
    with Progress(TextColumn("pulling {task.description}"), BarColumn(), DownloadColumn(),
                  TransferSpeedColumn(), console=console, transient=True) as bar:
        task = bar.add_task(image, total=None)

        def progress(layer: str, done: int | None, size: int | None) -> None:
            sizes[layer] = (done or 0, size)
            known = [s for _, s in sizes.values() if s]
            total = sum(known) if len(known) == len(sizes) else None
            bar.update(task, completed=sum(d for d, _ in sizes.values()), total=total)

        await signals.guard(ensure(image, progress))


async def _already_running(rt: Runtime, model: ResolvedModel, req_hash: str,
                           detach: bool) -> bool:
    for handle in await rt.adopt():
        if handle.name != model.name:
            continue
        if handle.spec_hash != req_hash:
            raise VlmhubError(
                f"{model.name} already runs ({handle.runtime}, port {handle.port}) with a "
                f"different configuration. Fix: `vlmhub stop {model.name}`, then serve again."
            )
        console.print(f"{model.name} is already running; not starting it again.")
        print_ready(model, handle, time.time() - handle.started_at, True,
                    runtime_state_dir(rt))
        return True
    return False


async def run_serve(ctx: Context, name: str, kind: RuntimeKind | None, port: int | None,
                    detach: bool) -> int:
    """The whole ``serve`` command; returns the exit code."""
    model = resolve_measured(ctx, only=[ctx.model(name).name])[0]
    if model.spec is None:
        raise VlmhubError(f"{model.name} is an external endpoint ({model.entry.url}); "
                          "vlmhub does not launch it")
    config = ctx.loaded.config
    rc = config.runtime
    rt = make_runtime(config, kind)
    signals = Signals()
    try:
        if await _already_running(rt, model, model.spec.spec_hash(), detach):
            return 0
        taken = [h.port for h in await rt.adopt()]
        chosen, note = pick_port(port, rc.port_range, taken)
        if note:
            console.print(f"[yellow]{note}[/]", highlight=False)
        req = launch_request(model, ctx.gpu, rt, rc, chosen)
        console.print(f"[bold]Starting {model.name}[/] ({rt.kind}) on 127.0.0.1:{chosen}",
                      highlight=False)
        console.print(f"  $ {planned_command(rt, rc, req)}", markup=False, highlight=False,
                      soft_wrap=True)
        try:
            await _pull(rt, req.image, signals)
        except Interrupted:
            err_console.print("interrupted during the image pull")
            return 130
        return await _start_and_watch(rt, model, req, signals, detach, ctx)
    finally:
        signals.remove()
        await rt.close()


async def _start_and_watch(rt: Runtime, model: ResolvedModel, req: LaunchRequest,
                           signals: Signals, detach: bool, ctx: Context) -> int:
    handle = await rt.start(req)
    view = PhaseView(model.name)
    t0 = time.monotonic()
    parser = LogParser()
    try:
        with Live(view, console=console, refresh_per_second=8) if view.live else _Null():
            view.on_phase("starting", "")
            try:
                await signals.guard(wait_ready(rt, handle, timeout_s=req.startup_timeout_s,
                                               on_phase=view.on_phase, parser=parser))
            finally:
                view.finish()
    except EngineStartError as exc:
        err_console.print(f"[bold red]{model.name} failed to start[/]", highlight=False)
        err_console.print(str(exc), markup=False, highlight=False, soft_wrap=True)
        _record(ctx, model, parser, exc)
        await rt.stop(handle, timeout_s=5.0)
        return 1
    except Interrupted:
        err_console.print(f"interrupted: stopping {model.name}", highlight=False)
        await rt.stop(handle)
        return 130
    print_ready(model, handle, time.monotonic() - t0, detach, runtime_state_dir(rt))
    _record(ctx, model, parser, None)
    if detach:
        return 0
    return await _follow(rt, handle, signals)


def _record(ctx: Context, model: ResolvedModel, parser: LogParser,
            error: EngineStartError | None) -> None:
    """Record the start's memory figures (or raise the estimate after a memory failure)."""
    try:
        seen = observe_start(store(), model, ctx.gpu, parser.facts, error is None, error,
                             vllm_version=ctx.loaded.config.runtime.vllm_version)
    except OSError as exc:  # an unwritable state dir must not fail the serve
        err_console.print(f"[yellow]could not record the measured budget: {exc}[/]",
                          highlight=False)
        return
    if seen.message:
        out = console if seen.kind == "measured" else err_console
        out.print(seen.message, markup=False, highlight=False, soft_wrap=True)


async def _follow(rt: Runtime, handle: EngineHandle, signals: Signals) -> int:
    seen = len(await rt.logs(handle, tail=None))
    try:
        await signals.guard(engine_cmds.print_new_lines(rt, handle, skip=seen))
    except Interrupted:
        console.print(f"stopping {handle.name} ...", highlight=False)
        await rt.stop(handle)
        console.print(f"stopped {handle.name}", highlight=False)
        return 0
    st = await rt.status(handle)
    err_console.print(f"[red]{handle.name} exited[/] ({st.detail or st.state}); removing it",
                      highlight=False)
    await rt.stop(handle, timeout_s=5.0)
    return 1


class _Null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def serve(
    model: Annotated[str, typer.Argument(help="Model name (or alias) from models.yaml.")],
    config: Path | None = ConfigOption,
    runtime: Annotated[RuntimeKind | None, typer.Option(
        "--runtime", help="docker or process (default: runtime.kind in models.yaml).")] = None,
    port: Annotated[int | None, typer.Option(
        "--port", help="Host port (default: the first free one in runtime.port_range).")]
    = None,
    detach: Annotated[bool, typer.Option(
        "--detach", "-d", help="Return once the engine is ready; it keeps running.")] = False,
    gpu_gib: float | None = GpuOption,
) -> None:
    """Start one model's vLLM engine and wait until it is ready."""
    with user_errors():
        ctx = Context(config, gpu_gib)
        code = asyncio.run(run_serve(ctx, model, runtime, port, detach))
    raise typer.Exit(code)


def register(app: typer.Typer) -> None:
    """Add serve, ps, logs, stop and health to ``app``."""
    app.command("serve")(serve)
    engine_cmds.register(app)


def standalone_app() -> typer.Typer:
    """These commands alone (``python -m vlmhub.cli.serve``), until the main CLI has them."""
    app = typer.Typer(no_args_is_help=True, add_completion=False)
    register(app)
    return app


if __name__ == "__main__":
    standalone_app()()
