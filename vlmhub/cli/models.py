"""``vlmhub models``, ``vlmhub plan`` and ``vlmhub config check``: read-only, no engine touched.

Budgets say where they come from: "measured YYYY-MM-DD" (what vLLM reported at a start, kept
by :mod:`vlmhub.sizing.budgets`) or "estimated" (the plugin's figures). ``plan`` also shows each
``together`` group's trade-off: the caps chosen beside the default settings.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table
from rich.text import Text

from vlmhub.cli.budgets import resolve_measured, store
from vlmhub.cli.common import ConfigOption, Context, GpuOption, console, user_errors
from vlmhub.cli.output import JsonOption, print_json
from vlmhub.config.host import host_total_gib
from vlmhub.config.locate import ConfigError
from vlmhub.config.schema import ResolvedModel, find_config, sleep_ok
from vlmhub.sizing.budgets import plan_budget
from vlmhub.sizing.flags import redact, render_argv
from vlmhub.sizing.sleepplan import AwakeSet
from vlmhub.sizing.together import GroupPlan
from vlmhub.sizing.vram import Budget, Gpu, budget_for, fitting_sets
from vlmhub.spec import ModelSpec

config_app = typer.Typer(help="Check models.yaml.", no_args_is_help=True)
COLOURS = ("cyan", "magenta", "green", "yellow", "blue", "red")


def register(app: typer.Typer) -> None:
    app.command("models")(models)
    app.command("plan")(plan)
    app.add_typer(config_app, name="config")


def models(config: Path | None = ConfigOption,
           as_json: Annotated[bool, JsonOption] = False) -> None:
    """Every model plugin: its entry point, VRAM budget, image and whether it loaded."""
    ctx = Context(config)
    with user_errors():
        reg = ctx.registry
        table = Table(title="Model plugins (entry points in vlmhub.models)")
        for col in ("NAME", "SOURCE", "VRAM", "MAX LEN", "IMAGE", "VARIANTS", "STATUS"):
            table.add_column(col)
        rows: list[dict[str, Any]] = []
        for name, info in sorted(reg.plugins.items()):
            if info.spec is None:
                rows.append({"name": name, "source": info.source, "error": info.error})
                table.add_row(
                    name, info.source, "", "", "", "", Text(f"error: {info.error}", "red")
                )
                continue
            spec = info.spec
            b = _plugin_budget(ctx, spec)
            rows.append({"name": name, "source": info.source, "vram_gib": round(b.footprint_gib, 3),
                         "budget_source": b.label, "max_model_len": spec.options.max_model_len,
                         "image": spec.image, "hf_repo": spec.hf_repo,
                         "variants": list(spec.variants), "error": None})
            table.add_row(
                name,
                info.source,
                f"{b.footprint_gib:.2f} GiB ({b.label})",
                str(spec.options.max_model_len),
                spec.image,
                ", ".join(spec.variants) or "-",
                Text("ok", "green"),
            )
        if as_json:
            print_json(rows)
        else:
            console.print(table)
            _param_rules(ctx)
        if reg.errors():
            raise typer.Exit(1)


def _param_rules(ctx: Context) -> None:
    """A line per configured model with request parameter rules (models.yaml ``params``)."""
    try:
        entries = ctx.loaded.config.models
    except ConfigError:  # a broken models.yaml must not hide the plugin list
        return
    for name, entry in entries.items():
        if entry.params:
            console.print(Text(f"params of {name} (models.yaml): {entry.params.summary()}"))


def _plugin_budget(ctx: Context, spec: ModelSpec) -> Budget:
    """The plugin's budget at its own settings, measured on this GPU if it ever was."""
    try:
        gpu, version = ctx.gpu, ctx.loaded.config.runtime.vllm_version
    except ConfigError:  # a broken models.yaml must not hide the plugin list
        return budget_for(spec)
    return plan_budget(spec, gpu, store(), None, version)


def plan(config: Path | None = ConfigOption, gpu_gib: float | None = GpuOption,
         as_json: Annotated[bool, JsonOption] = False) -> None:
    """Each configured model's budget, its exact vLLM argv, and what fits together."""
    ctx = Context(config, gpu_gib)
    with user_errors():
        gpu, resolved = ctx.gpu, resolve_measured(ctx)
        rc = ctx.loaded.config.runtime
        if as_json:
            print_json(_plan_json(ctx, gpu, resolved))
            return
        console.print(
            f"[bold]{gpu.name}[/]: {gpu.total_gib:.2f} GiB total ({gpu.source}), "
            f"{gpu.reserve_gib:.2f} GiB reserved, [bold]{gpu.usable_gib:.2f} GiB usable[/]"
            f"  config: {ctx.loaded.path}"
        )
        if (host := _host(ctx, resolved))["sleepers_weights_gib"]:
            console.print(
                f"Host RAM: [bold]{host['usable_gib']:.2f} GiB[/] for level-1 sleepers "
                f"({host['total_gib']:.2f} total, {host['reserve_gib']:.2f} reserved); the "
                f"sleepers' weights: {host['sleepers_weights_gib']:.2f} GiB, so "
                + ("each sleeps at level 1" if host["all_level1"] else
                   "some sleep at level 2 (their weights are loaded again on wake)"))
        table = Table(show_lines=True)
        for col in ("MODEL", "BUDGET", "WEIGHTS", "KV CACHE", "FLAGS", "vLLM ARGV"):
            table.add_column(col, overflow="fold")
        budgets: list[Budget] = []
        for m in resolved:
            if m.spec is None or m.budget is None:
                table.add_row(m.name, "external", "", "", "", m.entry.url or "")
                continue
            b = m.budget
            budgets.append(b)
            argv = render_argv(
                m.spec,
                b,
                gpu,
                port=8000,
                host="0.0.0.0",
                sleep_mode=sleep_ok(m),
                with_memory_flags=rc.memory_flags,
            )
            flags = (
                ", ".join(
                    f
                    for f, on in (
                        ("pinned", m.entry.pinned),
                        ("preload", m.entry.preload),
                        ("sleep", sleep_ok(m)),
                    )
                    if on
                )
                or "-"
            )
            table.add_row(
                m.name,
                f"{b.footprint_gib:.2f} GiB\n{b.label}",
                f"{b.weights_gib:.2f} GiB",
                f"{b.kv_cache_gib:.2f} GiB ({b.kv_tokens} tok)",
                flags,
                shlex.join(["vllm", "serve", *redact(argv)]),
            )
        console.print(table)
        _groups(resolved)
        _switches(resolved)
        _gpu_bar(gpu, budgets)


def _plan_json(ctx: Context, gpu: Gpu, resolved: list[ResolvedModel]) -> dict[str, Any]:
    """What ``plan`` shows, as one JSON document (``--json``)."""
    rc = ctx.loaded.config.runtime
    models: list[dict[str, Any]] = []
    for m in resolved:
        if m.spec is None or m.budget is None:
            models.append({"name": m.name, "external": True, "url": m.entry.url})
            continue
        b = m.budget
        argv = render_argv(m.spec, b, gpu, port=8000, host="0.0.0.0", sleep_mode=sleep_ok(m),
                           with_memory_flags=rc.memory_flags)
        models.append({
            "name": m.name, "external": False, "budget_gib": round(b.footprint_gib, 3),
            "budget_source": b.label, "weights_gib": round(b.weights_gib, 3),
            "kv_cache_gib": round(b.kv_cache_gib, 3), "kv_tokens": b.kv_tokens,
            "pinned": m.entry.pinned, "preload": m.entry.preload, "sleep": sleep_ok(m),
            "params": m.entry.params.model_dump() if m.entry.params else None,
            "group": m.group.summary() if m.group is not None else None,
            "argv": ["vllm", "serve", *redact(argv)],
        })
    budgets = [m.budget for m in resolved if m.spec is not None and m.budget is not None]
    return {"config": str(ctx.loaded.path),
            "gpu": {"name": gpu.name, "total_gib": round(gpu.total_gib, 3),
                    "reserve_gib": round(gpu.reserve_gib, 3),
                    "usable_gib": round(gpu.usable_gib, 3), "source": gpu.source},
            "models": models,
            "host": _host(ctx, resolved),
            "fits_together": [sorted(s) for s in fitting_sets(budgets, gpu)],
            "switches": [
                {"set": list(s.names), "awake_gib": round(s.plan.total_gib, 3),
                 "room_gib": round(s.room_gib, 3), "beside": s.beside, "others": list(s.others),
                 "switch": "wake" if s.all_wake else "wake, stopping sleepers",
                 "lowered": {m.name: m.lowered for m in s.plan.members}}
                for s in _awake_sets(resolved)]}


def _host(ctx: Context, resolved: list[ResolvedModel]) -> dict[str, Any]:
    """The host RAM level-1 sleepers may fill (models.yaml ``host:``) against their weights."""
    hc = ctx.loaded.config.host
    total = host_total_gib() if hc.total_gib is None else hc.total_gib
    usable = max(total - hc.reserve_gib, 0.0)
    weights = sum(m.budget.weights_gib for m in resolved if m.budget and sleep_ok(m))
    return {"total_gib": round(total, 3), "reserve_gib": hc.reserve_gib,
            "usable_gib": round(usable, 3), "sleepers_weights_gib": round(weights, 3),
            "all_level1": weights <= usable + 1e-9}


def _awake_sets(resolved: list[ResolvedModel]) -> list[AwakeSet]:
    out: list[AwakeSet] = []
    for m in resolved:
        if m.awake is not None and all(m.awake is not s for s in out):
            out.append(m.awake)
    return out


def _switches(resolved: list[ResolvedModel]) -> None:
    """The sleep-aware switch plan: each awake set, what a switch to it does, its caps."""
    sets = _awake_sets(resolved)
    if not sets:
        return
    console.print("\n[bold]Switch plan[/] (sleep mode: each set wakes beside the others' "
                  "residue; caps chosen against the defaults):")
    table = Table(show_header=True)
    for col in ("AWAKE SET", "GiB (ROOM)", "A SWITCH TO IT", "CAPS LOWERED"):
        table.add_column(col, overflow="fold")
    for s in sets:
        caps = "; ".join(f"{m.name}: {', '.join(m.lowered)}" for m in s.plan.members
                         if m.lowered) or "none"
        table.add_row(" + ".join(s.names), f"{s.plan.total_gib:.2f} ({s.room_gib:.2f})",
                      s.switch(), caps)
    console.print(table)


def _groups(resolved: list[ResolvedModel]) -> None:
    """Each ``together`` group: the caps chosen beside the defaults, and the totals."""
    plans: list[GroupPlan] = []
    for m in resolved:
        if m.group is not None and all(m.group is not p for p in plans):
            plans.append(m.group)
    for plan in plans:
        console.print(f"\n[bold]Together[/]: {plan.summary()}", highlight=False)
        table = Table(show_header=True)
        for col in ("MODEL", "DEFAULT", "TOGETHER", "CAPS LOWERED"):
            table.add_column(col, overflow="fold")
        for member in plan.members:
            d, c = member.default_caps, member.caps
            table.add_row(
                member.name,
                f"{member.default_budget.footprint_gib:.2f} GiB (len {d.max_model_len}, "
                f"seqs {d.max_num_seqs}" + (f", px {d.max_pixels})" if d.max_pixels else ")"),
                f"{member.budget.footprint_gib:.2f} GiB (len {c.max_model_len}, "
                f"seqs {c.max_num_seqs}" + (f", px {c.max_pixels})" if c.max_pixels else ")"),
                ", ".join(member.lowered) or "none",
            )
        console.print(table)


def _gpu_bar(gpu: Gpu, bs: list[Budget]) -> None:
    width = 60
    sets = fitting_sets(bs, gpu)
    colour = {b.model: COLOURS[i % len(COLOURS)] for i, b in enumerate(bs)}
    size = {b.model: b.footprint_gib for b in bs}
    console.print("\n[bold]What fits together[/] (each bar is the usable GPU):")
    for s in sets:
        bar = Text("[")
        used = 0
        for name in sorted(s):
            n = round(size[name] / gpu.usable_gib * width)
            bar.append("█" * n, colour[name])
            used += n
        bar.append("·" * max(width - used, 0), "dim")
        total = sum(size[n] for n in s)
        bar.append(f"] {total:.2f}/{gpu.usable_gib:.2f} GiB  {' + '.join(sorted(s))}")
        console.print(bar)
    if len(sets) > 1:
        console.print("[dim]Models in different sets are swapped in and out by `vlmhub route`.[/]")


@config_app.command("check")
def check(config: Path | None = ConfigOption, gpu_gib: float | None = GpuOption) -> None:
    """Validate models.yaml: schema, plugins, variants and that each model fits the GPU."""
    ctx = Context(config, gpu_gib)
    with user_errors():
        resolved = ctx.models()
        console.print(
            f"[green]ok[/] {find_config(config)}: {len(resolved)} model(s), "
            f"{ctx.gpu.usable_gib:.2f} GiB usable"
        )
