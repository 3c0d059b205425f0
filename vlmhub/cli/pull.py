"""``vlmhub pull MODEL``: fetch a model's weights and its engine image before the first start.

The weights come with ``huggingface_hub.snapshot_download`` (the spec's ``hf_repo`` at its
``revision``) into the cache the engines read (see :func:`vlmhub.cli.cache.hub_cache_dir`),
with huggingface_hub's progress bars on stderr; files already there are not fetched again.
The engine image is pulled by the Docker runtime with a progress bar, as ``vlmhub serve``
does; the process runtime has no image. Both block (the download runs in this thread, the
image pull in the runtime's thread under one ``asyncio.run``).

A token comes from ``HF_TOKEN`` (or ``huggingface-cli login``) and is never printed. An
offline machine, a gated repo without a token (or without access), an unknown repo or
revision, and an unreachable Docker each end with one message naming the fix (exit 1).
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Annotated, Literal

import typer
from huggingface_hub import constants as hf_constants
from huggingface_hub import get_token, snapshot_download
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from rich.markup import escape

from vlmhub.cli.cache import CacheDirOption, hub_cache_dir, runtime_config
from vlmhub.cli.common import ConfigOption, Context, console, err_console, user_errors
from vlmhub.cli.ocr import find_spec
from vlmhub.cli.serve import Interrupted, Signals, _pull
from vlmhub.config.schema import RuntimeConfig
from vlmhub.errors import ImageUnavailable, RuntimeUnavailable, VlmhubError
from vlmhub.spec import ModelSpec

RuntimeKind = Literal["docker", "process"]


def find_model(ctx: Context, name: str, variant: str | None) -> ModelSpec:
    """The spec of ``name`` (``model:variant`` or ``--variant`` for a variant), from
    models.yaml or the plugins. VlmhubError names what exists."""
    if variant is None and ":" in name:
        name, variant = name.split(":", 1)
    spec = find_spec(ctx, name)
    if spec is None:
        known = ", ".join(sorted(ctx.registry.specs())) or "none"
        raise VlmhubError(f"no model named {name!r} with weights to fetch (an external `url:` "
                          f"model has none). Fix: use one of: {known}, or a model of "
                          "models.yaml (`vlmhub models`, `vlmhub plan`)")
    if variant is not None:
        try:
            spec = spec.with_variant(variant)
        except KeyError as exc:
            raise VlmhubError(f"{exc.args[0]}. Fix: pick one of those") from None
    return spec


def explain(exc: Exception, repo: str, revision: str | None, cache_dir: Path) -> str:
    """One message for a failed download, with the fix. Never includes the token."""
    hub = hf_constants.ENDPOINT
    page = f"{hub}/{repo}"
    if isinstance(exc, GatedRepoError):
        if get_token() is None:
            return (f"{repo} is gated: accept its conditions at {page} (logged in), then set "
                    f"HF_TOKEN to a read token from {hub}/settings/tokens and pull again")
        return (f"{repo} is gated and the token in use has no access: accept its conditions "
                f"at {page} with that token's account (or set HF_TOKEN to another token)")
    if isinstance(exc, RevisionNotFoundError):
        return f"{repo} has no revision {revision!r}. Fix: check the spec's `revision`"
    if isinstance(exc, RepositoryNotFoundError) or _status(exc) == 404:
        return (f"{repo} is not on {hub}, or it is private. Fix: check the spec's `hf_repo`; "
                "for a private repo set HF_TOKEN to a token that can read it")
    if isinstance(exc, LocalEntryNotFoundError):
        if hf_constants.HF_HUB_OFFLINE:
            return (f"HF_HUB_OFFLINE is set and {repo} is not in the cache at {cache_dir}. "
                    "Fix: unset HF_HUB_OFFLINE to download it")
        cause = exc.__cause__ or exc.__context__
        why = f"{type(cause).__name__}: {cause}" if cause else "no answer"
        return (f"cannot reach the Hugging Face Hub at {hub} ({why.splitlines()[0]}) and "
                f"{repo} is not in the cache at {cache_dir}. Fix: check the network (a proxy: "
                "HTTPS_PROXY; a mirror: HF_ENDPOINT), or copy the weights into that cache")
    if isinstance(exc, HfHubHTTPError):
        return f"the Hub answered for {repo}: {str(exc).splitlines()[0]}"
    return f"fetching {repo} into {cache_dir} failed: {type(exc).__name__}: {exc}"


def _status(exc: Exception) -> int | None:
    for e in (exc, exc.__cause__, exc.__context__):
        if isinstance(e, HfHubHTTPError) and e.response is not None:
            return int(e.response.status_code)
    return None


def pull_weights(spec: ModelSpec, cache_dir: Path) -> str:
    """Download the spec's repo into ``cache_dir``; return the snapshot folder. Blocks.
    Raises VlmhubError with :func:`explain`'s message."""
    try:
        return str(snapshot_download(spec.hf_repo, revision=spec.revision,
                                     cache_dir=cache_dir))
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError, ValueError) as exc:
        raise VlmhubError(explain(exc, spec.hf_repo, spec.revision, cache_dir)) from None


async def pull_image(rc: RuntimeConfig, image: str) -> None:
    """Pull ``image`` with the Docker runtime, with a progress bar (returns at once when it is
    present). Raises VlmhubError (no Docker, a failed pull) or Interrupted (Ctrl-C)."""
    from vlmhub.engines.docker import DockerRuntime

    rt = DockerRuntime(rc)  # RuntimeUnavailable names how to start Docker
    signals = Signals()
    try:
        await _pull(rt, image, signals)
    finally:
        signals.remove()
        await rt.close()


def pull(
    model: Annotated[str, typer.Argument(help="Model name or alias (`model:variant` for a "
                                         "variant), from models.yaml or a plugin.")],
    variant: Annotated[str | None, typer.Option("--variant", help="One of the model's "
                                                "variants (`vlmhub models`).")] = None,
    weights: Annotated[bool, typer.Option("--weights/--no-weights",
                                          help="Fetch the weights.")] = True,
    image: Annotated[bool, typer.Option("--image/--no-image",
                                        help="Pull the engine image (Docker runtime).")] = True,
    runtime: Annotated[RuntimeKind | None, typer.Option(
        "--runtime", help="docker or process (default: runtime.kind in models.yaml).")] = None,
    cache_dir: Annotated[Path | None, CacheDirOption] = None,
    config: Path | None = ConfigOption,
) -> None:
    """Fetch a model's weights (Hugging Face) and its engine image (Docker), with progress."""
    with user_errors():
        ctx = Context(config)
        spec = find_model(ctx, model, variant)
        rc = runtime_config(ctx) or RuntimeConfig()
        if runtime is not None:
            rc = rc.model_copy(update={"kind": runtime})
        where = hub_cache_dir(rc, cache_dir)
    failed = False
    if weights:
        what = spec.hf_repo + (f"@{spec.revision}" if spec.revision else "")
        console.print(f"Fetching {escape(what)} into {escape(str(where))}"
                      + (" (with HF_TOKEN)" if os.environ.get("HF_TOKEN") else ""),
                      highlight=False)
        try:
            path = pull_weights(spec, where)
        except VlmhubError as exc:
            err_console.print(f"[bold red]Weights not fetched:[/] {escape(str(exc))}",
                              highlight=False)
            failed = True
        else:
            console.print(f"[green]weights ready[/] {escape(path)}", highlight=False)
    if image and rc.kind == "docker":
        console.print(f"Pulling the engine image {escape(spec.image)}", highlight=False)
        try:
            asyncio.run(pull_image(rc, spec.image))
        except Interrupted:
            err_console.print("interrupted during the image pull")
            raise typer.Exit(130) from None
        except (RuntimeUnavailable, ImageUnavailable) as exc:
            err_console.print(f"[bold red]Image not pulled:[/] {escape(str(exc))}",
                              highlight=False)
            failed = True
        else:
            console.print(f"[green]image ready[/] {escape(spec.image)}", highlight=False)
    elif image:
        console.print("The process runtime runs vLLM from runtime.process_argv: no engine "
                      "image to pull.", highlight=False)
    raise typer.Exit(1 if failed else 0)


def register(app: typer.Typer) -> None:
    """Add ``pull`` to ``app``."""
    app.command("pull")(pull)
