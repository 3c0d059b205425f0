"""``vlmhub cache``: which models' weights are in the local Hugging Face cache.

Reads the cache with ``huggingface_hub.scan_cache_dir`` (blocks: it walks the cache's folders
and stats every file; no network). Lists each plugin's model and variant (and each model of
models.yaml with a spec of its own) as present, partial, another revision, or missing, with
its size, revision and last access; then every other repo in the cache with its size.
``--json`` prints the same as one document. An empty or missing cache is not an error.

The cache is the one the engines read: ``<runtime.hf_cache>/hub`` for the Docker runtime
(mounted into the containers), else the Hugging Face default (``HF_HUB_CACHE``, ``HF_HOME``,
``~/.cache/huggingface/hub``), as for the process runtime; ``--cache-dir`` overrides both.
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer
from huggingface_hub import CachedRepoInfo, CachedRevisionInfo, HFCacheInfo, scan_cache_dir
from huggingface_hub import constants as hf_constants
from huggingface_hub.errors import CacheNotFound
from rich.markup import escape
from rich.table import Table

from vlmhub.cli.common import ConfigOption, Context, console, user_errors
from vlmhub.cli.output import JsonOption, print_json
from vlmhub.config.locate import ConfigError
from vlmhub.config.schema import RuntimeConfig, resolve
from vlmhub.errors import VlmhubError
from vlmhub.sizing.vram import Gpu
from vlmhub.spec import ModelSpec

WEIGHTS = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
COMMIT = re.compile(r"^[0-9a-f]{40}$")
_ANY_GPU = Gpu(1.0, 0.0, None, "unused", "config")  # resolve() without a fit check ignores it

CacheDirOption = typer.Option(
    "--cache-dir", help="The Hugging Face hub cache (default: <runtime.hf_cache>/hub for the "
    "Docker runtime, else HF_HUB_CACHE / HF_HOME / ~/.cache/huggingface/hub).")


def hub_cache_dir(rc: RuntimeConfig | None, explicit: Path | None = None) -> Path:
    """The hub cache the engines read (see the module docstring)."""
    if explicit is not None:
        return explicit.expanduser()
    if rc is not None and rc.kind == "docker":
        return Path(rc.hf_cache).expanduser() / "hub"
    return Path(hf_constants.HF_HUB_CACHE).expanduser()


def runtime_config(ctx: Context) -> RuntimeConfig | None:
    """The config's runtime section, or None when the config cannot be read."""
    try:
        return ctx.loaded.config.runtime
    except ConfigError:
        return None


@dataclass(frozen=True)
class Wanted:
    """A model whose weights vlmhub may need: ``name`` (``model:variant`` for a variant)."""

    name: str
    repo: str
    revision: str | None
    source: str  # "plugin" or "models.yaml"


def wanted_models(ctx: Context) -> list[Wanted]:
    """Every plugin's model and variant (a variant may share its model's weights), then the
    models.yaml models with weights of their own.
    Blocks on loading plugins and the config (a broken config only loses its models)."""
    found: list[Wanted] = []
    seen: set[tuple[str, str | None]] = set()

    def add(name: str, spec: ModelSpec, source: str) -> None:
        if source == "plugin" or (spec.hf_repo, spec.revision) not in seen:
            seen.add((spec.hf_repo, spec.revision))
            found.append(Wanted(name, spec.hf_repo, spec.revision, source))

    for name, spec in sorted(ctx.registry.specs().items()):
        add(name, spec, "plugin")
        for variant in spec.variants:
            add(f"{name}:{variant}", spec.with_variant(variant), "plugin")
    try:
        for m in resolve(ctx.loaded, ctx.registry.specs(), _ANY_GPU, check_fit=False):
            if m.spec is not None:
                add(m.name, m.spec, "models.yaml")
    except (ConfigError, VlmhubError):
        pass
    return found


def _when(ts: float | None) -> str | None:
    if not ts:
        return None
    return dt.datetime.fromtimestamp(ts, dt.UTC).isoformat(timespec="seconds")


def _pick(repo: CachedRepoInfo, revision: str | None) -> tuple[CachedRevisionInfo | None, bool]:
    """The cached revision that ``revision`` names (a commit, else a ref; None: main), and
    whether it is that one (False: only another revision is cached)."""
    wanted = revision or "main"
    for rev in repo.revisions:
        if rev.commit_hash == wanted if COMMIT.match(wanted) else wanted in rev.refs:
            return rev, True
    others = sorted(repo.revisions, key=lambda r: r.last_modified, reverse=True)
    return (others[0], False) if others else (None, False)


def model_row(w: Wanted, repo: CachedRepoInfo | None, incomplete: set[Path]) -> dict[str, Any]:
    row: dict[str, Any] = {"model": w.name, "repo": w.repo, "revision_wanted": w.revision,
                           "source": w.source, "status": "missing", "size_bytes": 0,
                           "revision": None, "refs": [], "last_accessed": None,
                           "path": None}
    if repo is None:
        return row
    rev, exact = _pick(repo, w.revision)
    if rev is None:
        return row
    has_weights = any(f.file_name.endswith(WEIGHTS) for f in rev.files)
    partial = not has_weights or any(p.is_relative_to(repo.repo_path) for p in incomplete)
    row |= {"status": "partial" if partial else "present" if exact else "other revision",
            "size_bytes": rev.size_on_disk, "revision": rev.commit_hash,
            "refs": sorted(rev.refs), "last_accessed": _when(repo.last_accessed),
            "path": str(rev.snapshot_path)}
    return row


def report(cache_dir: Path, wanted: list[Wanted]) -> dict[str, Any]:
    """What ``vlmhub cache`` shows, as a JSON-able dict. Blocks (scans the cache)."""
    info: HFCacheInfo | None
    try:
        info = scan_cache_dir(cache_dir)
    except CacheNotFound:
        info = None
    except ValueError as exc:  # a file where the folder should be
        raise VlmhubError(f"{cache_dir} is not a folder ({exc}). Fix: pass --cache-dir "
                          "with the Hugging Face hub cache folder") from None
    repos = {r.repo_id: r for r in info.repos if r.repo_type == "model"} if info else {}
    partials = getattr(info, "incomplete_files", ())  # interrupted downloads (newer hubs)
    incomplete = {Path(f.file_path) for f in partials}
    models = [model_row(w, repos.get(w.repo), incomplete) for w in wanted]
    known = {w.repo for w in wanted}
    other = [{"repo": r.repo_id, "type": r.repo_type, "size_bytes": r.size_on_disk,
              "revisions": len(r.revisions),
              "refs": sorted({ref for rev in r.revisions for ref in rev.refs}),
              "last_accessed": _when(r.last_accessed)}
             for r in sorted(info.repos if info else (), key=lambda r: -r.size_on_disk)
             if not (r.repo_type == "model" and r.repo_id in known)]
    return {"cache_dir": str(cache_dir), "exists": info is not None,
            "size_bytes": info.size_on_disk if info else 0, "models": models, "other": other,
            "warnings": [str(w) for w in info.warnings] if info else []}


def human(size: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size >= scale:
            return f"{size / scale:.2f} {unit}"
    return f"{size} B"


STATUS_STYLE = {"present": "green", "partial": "yellow", "other revision": "yellow",
                "missing": "dim"}


def print_report(data: dict[str, Any]) -> None:
    where = escape(data["cache_dir"])
    if not data["exists"]:
        console.print(f"No Hugging Face cache at {where}: nothing downloaded there yet. "
                      "`vlmhub pull MODEL` fetches a model's weights.", highlight=False)
    elif data["size_bytes"] == 0 and not data["other"]:
        console.print(f"The Hugging Face cache at {where} is empty. `vlmhub pull MODEL` "
                      "fetches a model's weights.", highlight=False)
    else:
        console.print(f"Hugging Face cache {where}: {human(data['size_bytes'])}",
                      highlight=False)
    table = Table(title="Models vlmhub knows")
    for col in ("MODEL", "REPO", "STATUS", "SIZE", "REVISION", "LAST ACCESS"):
        table.add_column(col, overflow="fold")
    for m in data["models"]:
        rev = (m["revision"] or "")[:12] + (f" ({', '.join(m['refs'])})" if m["refs"] else "")
        table.add_row(m["model"], m["repo"] + (f"@{m['revision_wanted']}"
                                               if m["revision_wanted"] else ""),
                      f"[{STATUS_STYLE[m['status']]}]{m['status']}[/]",
                      human(m["size_bytes"]) if m["status"] != "missing" else "-", rev or "-",
                      (m["last_accessed"] or "-").replace("T", " ").replace("+00:00", " UTC"))
    console.print(table)
    if data["other"]:
        others = Table(title="Other repos in the cache")
        for col in ("REPO", "TYPE", "SIZE", "REVISIONS", "REFS", "LAST ACCESS"):
            others.add_column(col, overflow="fold")
        for r in data["other"]:
            others.add_row(r["repo"], r["type"], human(r["size_bytes"]), str(r["revisions"]),
                           ", ".join(r["refs"]) or "-",
                           (r["last_accessed"] or "-").replace("T", " ")
                           .replace("+00:00", " UTC"))
        console.print(others)
    for warning in data["warnings"]:
        console.print(f"[yellow]warning:[/] {escape(warning)}", highlight=False)


def cache(
    config: Path | None = ConfigOption,
    cache_dir: Annotated[Path | None, CacheDirOption] = None,
    as_json: Annotated[bool, JsonOption] = False,
) -> None:
    """Which models' weights are in the Hugging Face cache (size, revision, last access),
    then the other repos there. Exit 0 also for an empty or missing cache."""
    with user_errors():
        ctx = Context(config)
        where = hub_cache_dir(runtime_config(ctx), cache_dir)
        data = report(where, wanted_models(ctx))
    if as_json:
        print_json(data)
    else:
        print_report(data)


def register(app: typer.Typer) -> None:
    """Add ``cache`` to ``app``."""
    app.command("cache")(cache)
