"""models.yaml: its schema, where it is found, and how it becomes resolved models.

:func:`load_config` reads and validates the file; every problem comes back as a
:class:`~vlmhub.locate.ConfigError` naming the file, the line, the field and a fix.
:func:`resolve` joins the file with the plugin registry and the GPU into
:class:`ResolvedModel` objects. Both block only on reading the file.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from vlmhub.config.apikeys import ApiKey, check_names, secrets_of
from vlmhub.config.host import host_budget_gib
from vlmhub.config.locate import ConfigError, FieldProblem, Loc, Locator, explain, load_yaml
from vlmhub.config.params import ParamRules
from vlmhub.config.vision import context_problem
from vlmhub.sizing.budgets import BudgetStore, learned
from vlmhub.sizing.flags import engine_version, flag_like_values
from vlmhub.sizing.parallel import tp_problem
from vlmhub.sizing.sleepplan import AwakeSet, plan_sleep
from vlmhub.sizing.together import GroupPlan, MeasureFn, fit_together
from vlmhub.sizing.vram import Budget, DoesNotFit, Gpu, Measured, budget_for, check_fits_alone
from vlmhub.spec import ModelSpec, Strict, version_tuple

PACKAGE_DIR = Path(__file__).resolve().parent.parent
DEMO_CONFIG = PACKAGE_DIR / "examples" / "demo.yaml"
BUILTIN_CONFIG = PACKAGE_DIR / "examples" / "models.yaml"
"""The shipped models.yaml (the built-in plugins), used on a GPU when no models.yaml exists."""
USER_CONFIG = Path("~/.config/vlmhub/models.yaml")


class Section(Strict):
    """A models.yaml mapping: unknown keys and non-finite floats (``.inf``, ``.nan``) refused."""

    model_config = ConfigDict(allow_inf_nan=False)


def _port_range_problem() -> FieldProblem:
    return FieldProblem(
        "must be [low, high] with 1 <= low <= high <= 65535",
        "write two ports, the lower first, e.g. [8100, 8199]",
    )


class GpuConfig(Section):
    """The card. ``total_gib`` is used when NVML finds no GPU (or always, with ``force``)."""

    total_gib: float | None = Field(default=None, gt=0)
    reserve_gib: float = Field(default=0.5, ge=0)
    budget_gib: float | None = Field(default=None, gt=0)
    index: int = Field(default=0, ge=0)
    force_total: bool = False
    devices: list[Annotated[int, Field(ge=0)]] | None = Field(default=None, min_length=1)
    """The cards engines may use (CUDA device ids). None: every GPU NVML lists (without NVML,
    one card of ``total_gib``). With two or more, each card is a node of its own
    (vlmhub.engines.devices, docs/scale-out.md)."""

    @field_validator("devices")
    @classmethod
    def _distinct_devices(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and len(set(v)) != len(v):
            raise ValueError("lists a device twice; name each card once, e.g. [0, 1]")
        return v


class BatchConfig(Section):
    """``router.batch``: the Batch and Files API (``/v1/files``, ``/v1/batches``; docs/api.md)."""

    max_file_mib: float = Field(default=100.0, gt=0)
    """The largest file ``POST /v1/files`` accepts, in MiB (a larger upload is a 413). The
    upload is held in the router's memory while it arrives."""
    concurrency: int = Field(default=8, ge=1)
    """Lines of all batches sent to the models at once, each at batch priority (keep it under
    the model's ``max_queue`` so interactive requests still find room in the queue)."""
    max_lines: int = Field(default=50_000, ge=1)
    """The most request lines one batch input file may hold (OpenAI's limit is 50,000)."""


class RouterConfig(Section):
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=1, le=65535)
    api_keys: Annotated[list[ApiKey], AfterValidator(check_names)] = Field(default_factory=list)
    """Client keys for /v1: plain strings, or named keys with models, rpm, tpm, expires
    (vlmhub.config.apikeys)."""
    admin_key: str | None = None
    max_queue: int = Field(default=32, ge=0)
    queue_timeout_s: float = Field(default=600.0, gt=0)
    max_body_mb: float = Field(default=50.0, gt=0)
    body_timeout_s: float = Field(default=30.0, gt=0)
    drain_timeout_s: float = Field(default=30.0, ge=0)
    shutdown_timeout_s: float = Field(default=30.0, ge=0)
    stop_engines_on_exit: bool = True
    health_interval_s: float = Field(default=5.0, gt=0)
    restart_backoff_s: float = Field(default=2.0, ge=0)
    crash_loop_max: int = Field(default=3, ge=1)
    crash_loop_window_s: float = Field(default=300.0, gt=0)
    policy: Literal["vlmhub", "fifo", "lru", "exclusive"] = "vlmhub"
    """The swap policy (vlmhub.scheduling.policy; docs/scheduling.md)."""
    log_format: Literal["text", "json"] = "text"
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    cors_origins: list[str] = Field(default_factory=list)
    """Browser origins (e.g. http://localhost:3000) that may call /v1/* (CORS); "*" for any."""
    batch: BatchConfig = Field(default_factory=BatchConfig)
    """The Batch and Files API's limits (docs/api.md, "Batch and Files")."""
    loading_comments_s: float = Field(default=5.0, ge=0)
    """A streamed request that must wait for its model gets an SSE comment line at once and then
    every this many seconds (``: vlmhub loading MODEL: PHASE (N s)``); 0 turns them off."""
    loading_progress: Literal["comments", "reasoning", "off"] = "comments"
    """How that wait shows: SSE comments, ``delta.reasoning_content`` chunks a chat window shows
    as a "thinking" block (chat completions), or nothing; ``X-Vlmhub-Loading-Progress`` per
    request (vlmhub.router.loading)."""
    trust_loopback: bool = True
    """Without ``admin_key``, clients on this machine (loopback) may use the admin API (/api/*).
    A request carrying ``Forwarded``, ``X-Forwarded-For`` or ``X-Real-IP`` is never trusted as
    loopback; set false (and set ``admin_key``) behind a reverse proxy or an ``ssh -L`` on this
    host, where remote users arrive from loopback without those headers."""

    @field_validator("admin_key")
    @classmethod
    def _admin_key_set(cls, v: str | None) -> str | None:
        if v is not None and not v.strip():
            raise FieldProblem(
                "an empty admin_key would leave the admin API (/api/*) without a key",
                "remove the line (then only loopback clients may use /api/*), or set a real key",
            )
        return v


class RuntimeConfig(Section):
    kind: Literal["docker", "process", "ray"] = "docker"
    address: str = "auto"
    """``kind: ray``: the Ray cluster to join (``auto``: the one ``ray start`` runs here, or
    ``RAY_ADDRESS``; else ``host:port`` of the head's GCS). See docs/scale-out.md."""
    engine_host: str = "127.0.0.1"
    """``kind: ray``: where each engine listens on its node. ``127.0.0.1`` only reaches engines
    when every node is this machine (tests, a local cluster); ``node`` binds the node's IP,
    which a cluster of several machines needs (on a private network: engines have no auth)."""
    docker_host: str | None = None
    hf_cache: str = "~/.cache/huggingface"
    vllm_cache: str = "~/.cache/vllm"
    process_argv: list[str] = Field(default_factory=lambda: ["vllm", "serve"])
    port_range: tuple[int, int] = (8100, 8199)
    memory_flags: bool = True
    gpus: str | None = "all"
    ipc_host: bool = True
    vllm_version: str | None = None
    env: dict[str, str] = Field(default_factory=dict)
    pass_env: list[str] = Field(default_factory=lambda: ["HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"])
    name_prefix: str = "vlmhub"
    model_arg: Literal["auto", "positional", "flag"] = "auto"

    @property
    def model_as_flag(self) -> bool:
        """Pass the model as ``--model``: the api_server module has no positional model;
        ``vllm serve`` (the image's entrypoint) wants it positional."""
        if self.model_arg != "auto":
            return self.model_arg == "flag"
        return self.kind in ("process", "ray") and any("api_server" in a for a in self.process_argv)

    @field_validator("process_argv")
    @classmethod
    def _argv_not_empty(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("process_argv needs at least the program to run")
        return v

    @field_validator("port_range", mode="before")
    @classmethod
    def _two_ports(cls, v: Any) -> Any:
        if not isinstance(v, (list, tuple)) or len(v) != 2:
            raise _port_range_problem()
        return v

    @field_validator("port_range")
    @classmethod
    def _ports(cls, v: tuple[int, int]) -> tuple[int, int]:
        lo, hi = v
        if not 1 <= lo <= hi <= 65535:
            raise _port_range_problem()
        return v


class ReplicasConfig(Section):
    """``replicas: {min, max, target}``: autoscaled replicas (docs/scheduling.md, Replicas)."""

    min: int = Field(default=0, ge=0, le=64)
    """Replicas kept through their idle ``ttl`` (0: the last one goes too)."""
    max: int = Field(ge=1, le=64)
    target: float = Field(default=4.0, gt=0)
    """Requests (queued and in flight) per running replica above which one more starts."""

    @model_validator(mode="after")
    def _min_le_max(self) -> ReplicasConfig:
        if self.min > self.max:
            raise ValueError(f"replicas: min ({self.min}) is above max ({self.max})")
        return self


class ModelEntry(Section):
    """One enabled model: a plugin (with overrides), an inline spec, or an external URL."""

    plugin: str | None = None
    variant: str | None = None
    spec: dict[str, Any] | None = None
    url: str | None = None
    served_model_name: str | None = None
    aliases: list[str] = Field(default_factory=list)
    model_path: str | None = None
    """The weights to load instead of the plugin's hf_repo (a local folder or a hub repo)."""
    options: dict[str, Any] = Field(default_factory=dict)
    """vLLM options that replace the plugin's, key by key (as in a spec's ``options``)."""
    max_model_len: int | None = Field(default=None, gt=0)
    max_num_seqs: int | None = Field(default=None, gt=0)
    max_pixels: int | None = Field(default=None, gt=0)
    """The image cap (mm_processor_kwargs), lowered as a ``together`` group would."""
    budget_gib: float | None = Field(default=None, gt=0)
    pinned: bool = False
    ttl: float | None = Field(default=None, ge=0, description="Idle seconds before unload.")
    preload: bool = False
    sleep: bool | None = None
    """vLLM sleep mode for evictions. None (default): on where the engine supports it (a GPU
    NVML found, vLLM >= the plugin's ``sleep_min_vllm``); ``false`` opts out."""
    max_queue: int | None = Field(default=None, ge=0)
    priority: Literal["interactive", "batch"] = "interactive"
    """The class of this model's requests unless a request says otherwise (header)."""
    max_wait_s: float | None = Field(default=None, gt=0)
    """The longest a request waits before its model's swap is forced (default: derived)."""
    enabled: bool = True
    env: dict[str, str] = Field(default_factory=dict)
    fit_with: list[str] = Field(
        default_factory=list, description="Models that must be resident with this one."
    )
    params: ParamRules | None = None
    """Request parameter rules: drop, set, defaults (vlmhub.config.params)."""
    tensor_parallel_size: int | None = Field(default=None, ge=1, le=64)
    """The GPUs one engine spans (vLLM's ``--tensor-parallel-size``; default: the spec's, 1):
    a power of two, at most the cards engines may use (docs/configuration.md)."""
    replicas: Annotated[int, Field(ge=1, le=64)] | ReplicasConfig = 1
    """Engines of this model: ``N`` (all N run while it is in use) or ``{min, max, target}``
    (autoscaled between them). Each replica is an engine of its own (docs/scheduling.md)."""

    @field_validator("url")
    @classmethod
    def _http_url(cls, v: str | None) -> str | None:
        if v is None:
            return v
        parts = urlsplit(v)
        try:
            parts.port  # noqa: B018 - raises ValueError for a port out of range
        except ValueError:
            parts = parts._replace(netloc="")
        blank = any(c.isspace() or not c.isprintable() for c in v)
        if parts.scheme not in ("http", "https") or not parts.hostname or blank:
            raise FieldProblem(
                "an external model's url must be an http:// or https:// URL with a host",
                "write the server's base URL, e.g. http://127.0.0.1:8000",
            )
        return v

    @model_validator(mode="after")
    def _one_source(self) -> ModelEntry:
        if self.spec is not None and (self.plugin or self.variant):
            raise ValueError("give either spec (a model declared here) or plugin, not both")
        if self.url is not None and (self.spec is not None or self.plugin):
            raise ValueError("an external model (url) has no plugin or spec")
        if self.url is not None and self.replicas != 1:
            raise ValueError("an external model (url) has one replica: vlmhub runs no engine")
        return self


class HostConfig(Section):
    """``host: {total_gib, reserve_gib}``: the RAM level-1 sleepers' weights may fill.
    ``total_gib`` None: read at start (vlmhub.config.host: /proc/meminfo's MemTotal or the
    cgroup limit, whichever is smaller)."""

    total_gib: float | None = Field(default=None, gt=0)
    reserve_gib: float = Field(default=2.0, ge=0)
    """Kept for the OS, vlmhub and the engines' own processes."""

    def budget_gib(self) -> float:
        """What level-1 sleepers may fill on this host (reads it when ``total_gib`` is None)."""
        return host_budget_gib(self.total_gib, self.reserve_gib)


class Config(Section):
    gpu: GpuConfig = Field(default_factory=GpuConfig)
    host: HostConfig = Field(default_factory=HostConfig)
    router: RouterConfig = Field(default_factory=RouterConfig)
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)
    models: dict[str, ModelEntry] = Field(default_factory=dict)
    together: list[list[str]] = Field(
        default_factory=list, description="Groups of models planned to be resident at once."
    )


@dataclass(frozen=True)
class LoadedConfig:
    config: Config
    path: Path
    locator: Locator


@dataclass(frozen=True)
class ResolvedModel:
    """A model ready to plan and launch. ``spec`` is None for an external endpoint."""

    name: str
    entry: ModelEntry
    spec: ModelSpec | None
    budget: Budget | None
    source: str
    group: GroupPlan | None = None
    """The ``together`` group this model is planned in (its caps and the trade-off)."""
    refusal: str | None = None
    """Why this model is refused although its plugin's estimate fits: what starts of it
    learned (the budgets file) no longer fits the GPU. Its ``budget`` is that learned one, so
    the scheduler refuses it; the others serve. Says how to reset it."""
    awake: AwakeSet | None = None
    """Where models sleep: its awake set, planned to wake beside the others' residue
    (:mod:`vlmhub.sizing.sleepplan`)."""

    @property
    def external(self) -> bool:
        return self.entry.url is not None

    @property
    def aliases(self) -> list[str]:
        base = self.spec.aliases if self.spec else []
        return [*base, *self.entry.aliases]

    @property
    def api_name(self) -> str:
        if self.spec is not None:
            return self.spec.api_name
        return self.entry.served_model_name or self.name


def find_config(explicit: Path | None, have_gpu: Callable[[], bool] | None = None) -> Path:
    """``--config``, then ./models.yaml, then ~/.config/vlmhub/models.yaml; without one the
    built-in plugins (:data:`BUILTIN_CONFIG`) where ``have_gpu()`` finds a GPU, else the
    stand-in demo (:data:`DEMO_CONFIG`)."""
    if explicit is not None:
        return explicit
    for candidate in (Path("models.yaml"), USER_CONFIG.expanduser()):
        if candidate.is_file():
            return candidate
    return BUILTIN_CONFIG if have_gpu is not None and have_gpu() else DEMO_CONFIG


def load_config(path: Path) -> LoadedConfig:
    data, locator = load_yaml(path)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError([locator.error((), "the file must be a mapping", "start with `models:`")])
    try:
        config = Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(explain(exc, Config, locator)) from None
    base = path.parent
    expanded = {
        **config.runtime.model_dump(),
        "process_argv": [_expand(a, base) for a in config.runtime.process_argv],
    }
    config = config.model_copy(update={"runtime": RuntimeConfig.model_validate(expanded)})
    return LoadedConfig(config, path, locator)


def _expand(arg: str, base: Path) -> str:
    """``{python}`` is this interpreter; ``{config_dir}`` the folder of the config file."""
    import sys

    return arg.replace("{python}", sys.executable).replace("{config_dir}", str(base.resolve()))


def _inline_spec(name: str, entry: ModelEntry, locator: Locator) -> ModelSpec:
    assert entry.spec is not None
    where: Loc = ("models", name, "spec")
    try:
        spec = ModelSpec.model_validate({"name": name, **entry.spec})
    except ValidationError as exc:
        raise ConfigError(explain(exc, ModelSpec, locator, where)) from None
    bad = [
        locator.error(
            loc, f"{value} is not a finite number", "write a finite number, or remove the key"
        )
        for loc, value in _non_finite(spec.model_dump(exclude={"name"}), where)
    ]
    if bad:
        raise ConfigError(bad)
    return spec


def _non_finite(value: Any, loc: Loc) -> Iterator[tuple[Loc, float]]:
    """Every ``inf``/``nan`` in plain data, with its key path."""
    if isinstance(value, float) and not math.isfinite(value):
        yield loc, value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _non_finite(item, (*loc, str(key)))
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            yield from _non_finite(item, (*loc, i))


def resolve(
    loaded: LoadedConfig,
    plugins: dict[str, ModelSpec],
    gpu: Gpu,
    *,
    only: list[str] | None = None,
    check_fit: bool = True,
    measured: BudgetStore | None = None,
) -> list[ResolvedModel]:
    """Join the file with the plugins. All problems are collected, then raised together.
    Budgets use what ``measured`` recorded for a model where it has a measurement; models in
    a ``together`` group get the caps that make the group fit (see
    :mod:`vlmhub.sizing.together`)."""
    config, loc = loaded.config, loaded.locator
    problems: list[str] = []
    out: list[ResolvedModel] = []
    groups = together_groups(config)
    wanted = None if only is None else set(only).union(*(g for g in groups if g & set(only)))

    sleeping: dict[str, bool] = {}  # model -> started with --enable-sleep-mode (budget key)

    def measure(spec: ModelSpec) -> Measured | None:
        return learned(measured, spec, gpu, config.runtime.vllm_version,
                       sleep_mode=sleeping.get(spec.name, False))

    for name, entry in config.models.items():
        if not entry.enabled or (wanted is not None and name not in wanted):
            continue
        where = ("models", name)
        if entry.sleep is None:  # the default: sleep where a real GPU runs the engines
            entry = entry.model_copy(update={"sleep": entry.url is None and gpu.source == "nvml"})
        if entry.url is not None:
            out.append(ResolvedModel(name, entry, None, None, f"external {entry.url}"))
            continue
        try:
            if entry.spec is not None:
                spec, source = _inline_spec(name, entry, loc), f"{loaded.path.name} (inline)"
            else:
                plugin = entry.plugin or name
                if plugin not in plugins:
                    known = ", ".join(sorted(plugins)) or "none installed"
                    problems.append(
                        loc.error(
                            (*where, "plugin") if entry.plugin else where,
                            f"no model plugin named {plugin!r}",
                            f"use one of: {known} (see `vlmhub models`)",
                        )
                    )
                    continue
                spec, source = plugins[plugin], f"plugin {plugin}"
                if entry.variant is not None:
                    try:
                        spec = spec.with_variant(entry.variant)
                    except KeyError as exc:
                        problems.append(loc.error((*where, "variant"), str(exc.args[0])))
                        continue
                if spec.name != name:  # renamed: the plugin's own aliases stay with the plugin
                    spec = spec.model_copy(update={"name": name, "aliases": []})
            spec = _entry_overrides(spec, entry)
            if (bad := tp_problem(spec.options.tensor_parallel_size,
                                  gpu.devices if check_fit else None,
                                  config.runtime.kind)) is not None:
                problems.append(loc.error(_tp_loc(where, entry), *bad))
                continue
            if (need := context_problem(spec)) is not None:
                problems.append(loc.error((*where, "max_model_len"), *need.problem(name)))
                continue
            sleeping[name] = sleeps(bool(entry.sleep), spec)
            budget, refusal = (_fit_alone(spec, gpu, entry.budget_gib, measure(spec))
                               if check_fit else (None, None))  # fmt: skip
        except ConfigError as exc:
            problems += exc.problems
            continue
        except DoesNotFit as exc:
            field = "budget_gib" if entry.budget_gib else "max_model_len"
            problems.append(loc.error((*where, field), str(exc)))
            continue
        except ValidationError as exc:
            problems += explain(exc, ModelSpec, loc, where)
            continue
        inline = entry.spec is not None
        problems += [loc.error(*bad) for bad in flag_like_values(spec, where, inline)]
        out.append(ResolvedModel(name, entry, spec, budget, source, refusal=refusal))
    problems += _check_names(out, loc)
    if check_fit and not problems:
        raw = out
        out, problems = _fit_groups(out, config, groups, gpu, measure, loc)
        if not problems:
            out = _sleep_caps(raw, out, groups, gpu, measure)
    if problems:
        raise ConfigError(problems)
    return [m for m in out if only is None or m.name in only]


def _fit_alone(
    spec: ModelSpec, gpu: Gpu, budget_gib: float | None, learned_parts: Measured | None
) -> tuple[Budget, str | None]:
    """The budget and, when only what the budgets file learned makes it too big for the GPU,
    the refusal (the model is then refused, not the config). ``DoesNotFit`` when even the
    plugin's estimate does not fit: that stays a config error."""
    try:
        return check_fits_alone(spec, gpu, budget_gib, learned_parts), None
    except DoesNotFit as exc:
        if learned_parts is None:
            raise
        estimate = check_fits_alone(spec, gpu, budget_gib)  # or DoesNotFit: a config error
        budget = budget_for(spec, None, learned_parts)
        return budget, (
            f"{spec.name} is refused: what its past starts taught (budgets file: {budget.label}) "
            f"makes it need {exc.needed_gib:.2f} GiB, more than the {gpu.usable_gib:.2f} GiB "
            f"usable (its estimate, {estimate.footprint_gib:.2f} GiB, fits). If the GPU is "
            f"free now, reset it: `vlmhub budgets --reset {spec.name}`"
        )


def _entry_overrides(spec: ModelSpec, entry: ModelEntry) -> ModelSpec:
    """``spec`` with the entry's weights, vLLM options, then its caps (in one validation)."""
    if entry.model_path is not None:
        spec = spec.model_copy(update={"hf_repo": entry.model_path, "revision": None})
    options = dict(entry.options)
    if entry.tensor_parallel_size is not None:
        options["tensor_parallel_size"] = entry.tensor_parallel_size
    return spec.with_overrides(**options).with_caps(
        max_num_seqs=entry.max_num_seqs, max_model_len=entry.max_model_len,
        max_pixels=entry.max_pixels)  # fmt: skip


def _tp_loc(where: Loc, entry: ModelEntry) -> Loc:
    """Where a model's tensor_parallel_size is written (the entry's field, its options, or the
    entry itself for a plugin's)."""
    if entry.tensor_parallel_size is not None:
        return (*where, "tensor_parallel_size")
    if "tensor_parallel_size" in entry.options:
        return (*where, "options", "tensor_parallel_size")
    return where


def together_groups(config: Config) -> list[frozenset[str]]:
    """The models that must be resident at once: every ``together`` entry and every model
    with its ``fit_with``; groups that share a model are one group."""
    merged: list[set[str]] = []
    raw = [*config.together, *([n, *e.fit_with] for n, e in config.models.items() if e.fit_with)]
    for group in raw:
        joined = set(group)
        for other in [m for m in merged if m & joined]:
            joined |= other
            merged.remove(other)
        merged.append(joined)
    return [frozenset(g) for g in merged if len(g) > 1]


def _fit_groups(
    models: list[ResolvedModel],
    config: Config,
    groups: list[frozenset[str]],
    gpu: Gpu,
    measure: MeasureFn,
    loc: Locator,
) -> tuple[list[ResolvedModel], list[str]]:
    """Plan each group with :func:`~vlmhub.together.fit_together`; models get its caps."""
    problems: list[str] = []
    by_name = {m.name: m for m in models}
    for group in groups:
        where: Loc = _group_loc(config, group)
        unknown = sorted(n for n in group if n not in config.models)
        if unknown:
            problems.append(loc.error(where, f"no model named {', '.join(unknown)} in `models:`",
                                      "list only models defined under `models:`"))  # fmt: skip
            continue
        members = [by_name[n] for n in sorted(group) if n in by_name and by_name[n].spec]
        plan = fit_together([m.spec for m in members if m.spec is not None], gpu, measure)
        if not plan.fits:
            problems.append(loc.error(where, plan.summary()))
            continue
        for member, m in zip(plan.members, members, strict=True):
            by_name[m.name] = dataclasses.replace(
                m, spec=member.spec, budget=member.budget, group=plan
            )
    return [by_name[m.name] for m in models], problems


def _sleep_caps(
    raw: list[ResolvedModel], models: list[ResolvedModel], groups: list[frozenset[str]],
    gpu: Gpu, measure: MeasureFn,
) -> list[ResolvedModel]:
    """Where models sleep, plan each awake set (a group, else a model alone) from its
    settings (``raw``) to wake beside the other sleepers' residue
    (:func:`vlmhub.sizing.sleepplan.plan_sleep`); ``models`` (as planned without sleep) get
    its caps and their set. A model with ``budget_gib`` or a refusal keeps its own plan."""
    sleepers = frozenset(m.name for m in raw if sleep_ok(m))
    planned = [m for m in raw if m.spec is not None and not m.entry.budget_gib
               and m.refusal is None]
    if not sleepers or len(planned) < 2:
        return models
    names = {m.name for m in planned}
    sets = [g for g in groups if g <= names] + [
        frozenset({m.name}) for m in planned if not any(m.name in g for g in groups)]
    specs = {m.name: m.spec for m in planned if m.spec is not None}
    by_name = {m.name: m for m in models}
    sp = plan_sleep([[specs[n] for n in sorted(g)] for g in sets], sleepers & names, gpu,
                    measure)
    for s in sp.sets:
        if not s.plan.fits:
            continue
        for member in s.plan.members:
            m = by_name[member.name]
            by_name[m.name] = dataclasses.replace(
                m, spec=member.spec, budget=member.budget, awake=s,
                group=s.plan if m.group is not None else None)
    return [by_name[m.name] for m in models]


def _group_loc(config: Config, group: frozenset[str]) -> Loc:
    for i, listed in enumerate(config.together):
        if set(listed) <= group:
            return ("together", i)
    name = next(n for n, e in config.models.items() if e.fit_with and n in group)
    return ("models", name, "fit_with")


def _check_names(models: list[ResolvedModel], loc: Locator) -> list[str]:
    seen: dict[str, str] = {}
    problems: list[str] = []
    for m in models:
        for alias in [m.name, *m.aliases]:
            if alias in seen and seen[alias] != m.name:
                problems.append(
                    loc.error(
                        ("models", m.name),
                        f"name or alias {alias!r} is also used by {seen[alias]!r}",
                        "give every model and alias a distinct name",
                    )
                )
            seen.setdefault(alias, m.name)
    return problems


def api_keys(config: Config) -> list[str]:
    """Keys from the file plus ``VLMHUB_API_KEYS`` (comma-separated). Never logged."""
    extra = [k.strip() for k in os.environ.get("VLMHUB_API_KEYS", "").split(",") if k.strip()]
    return [*secrets_of(config.router.api_keys), *extra]


def sleep_ok(m: ResolvedModel) -> bool:
    """Whether ``m``'s engine is started with sleep mode (asked for, and vLLM can)."""
    return m.spec is not None and sleeps(bool(m.entry.sleep), m.spec)


def sleeps(asked: bool, spec: ModelSpec) -> bool:
    """Sleep mode ``asked`` for, and ``spec``'s vLLM has it (>= its ``sleep_min_vllm``)."""
    return asked and version_tuple(engine_version(spec)) >= version_tuple(spec.sleep_min_vllm)
