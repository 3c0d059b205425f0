"""``vlmhub simulate TRACE``: replay a trace against models.yaml with the supervisor's real
control-loop step, on one GPU or several (``--gpus``), in simulated time
(vlmhub.scheduling.simulate). Reads two files, computes, prints; starts nothing."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from vlmhub.cli.common import ConfigOption, Context, GpuOption, console, user_errors
from vlmhub.scheduling.policy import POLICIES, PolicyName
from vlmhub.scheduling.simtrace import TraceError, check_models, parse_trace
from vlmhub.scheduling.simulate import SimResult, from_config, simulate


def register(app: typer.Typer) -> None:
    app.command("simulate")(simulate_cmd)


def _policies(value: str | None, default: PolicyName) -> list[PolicyName]:
    if value is None:
        return [default]
    names = list(POLICIES) if value == "all" else [v.strip() for v in value.split(",")]
    bad = [n for n in names if n not in POLICIES]
    if bad:
        raise typer.BadParameter(
            f"unknown policy {', '.join(bad)}; use {', '.join(POLICIES)}, a comma list or all",
            param_hint="--policy",
        )
    return [p for p in POLICIES if p in names]


def _wait(r: SimResult, klass: str) -> str:
    s = r.waits.get(klass)
    return "-" if s is None else f"{s.p50_s:.1f}/{s.p95_s:.1f}/{s.max_s:.1f}"


ROWS: tuple[tuple[str, Callable[[SimResult], str]], ...] = (
    ("served", lambda r: f"{r.served}/{r.requests}"),
    ("not served", lambda r: ", ".join(f"{n} {k}" for k, n in r.refused.items() if n) or "0"),
    ("cold loads", lambda r: str(r.loads)),
    ("wakes", lambda r: str(r.wakes)),
    ("evictions (slept)", lambda r: f"{r.evictions} ({r.sleeps})"),
    ("sleeps at level 2", lambda r: str(r.sleeps2)),
    ("host RAM peak", lambda r: f"{r.host_peak_gib:.2f} GiB"),
    ("GPU time loading", lambda r: f"{100 * r.loading_fraction:.1f}%"),
    ("throughput, req/s", lambda r: f"{r.throughput:.2f}"),
    ("makespan", lambda r: f"{r.makespan_s:.1f} s"),
    ("interactive wait p50/95/max", lambda r: _wait(r, "interactive")),
    ("batch wait p50/95/max", lambda r: _wait(r, "batch")),
    ("total wait", lambda r: f"{sum(s.total_wait_s for s in r.waits.values()):.0f} s"),
    ("over max_wait (worst)", lambda r: f"{r.over_max_wait} ({r.worst_wait_ratio:.2f}x)"),
)


def _table(results: list[SimResult]) -> Table:
    """One column per policy, one row per figure (narrow terminals keep every number)."""
    t = Table(box=None, pad_edge=False)
    t.add_column("", no_wrap=True)
    for r in results:
        t.add_column(r.policy, justify="right")
    for label, cell in ROWS:
        t.add_row(label, *(cell(r) for r in results))
    return t


def simulate_cmd(
    trace: Annotated[Path, typer.Argument(help="A trace: JSON Lines (see docs/benchmarks.md).")],
    config: Path | None = ConfigOption,
    policy: Annotated[str | None, typer.Option(
        "--policy", help="vlmhub, fifo, lru or exclusive; a comma list; or all "
        "(default: router.policy of the config)")] = None,
    gpu_gib: float | None = GpuOption,
    start_s: Annotated[float | None, typer.Option(
        "--start-s", min=0, help="Every cold start takes this long (default: each spec's "
        "reload_cost_s)")] = None,
    wake_s: Annotated[float | None, typer.Option(
        "--wake-s", min=0, help="A wake from a level-1 sleep (default: as the supervisor prices "
        "an unmeasured one: 5 % of the model's cold start, at most 2 s).")] = None,
    wake2_s: Annotated[float | None, typer.Option(
        "--wake2-s", min=0, help="A wake from a level-2 sleep, weights loaded again (default: "
        "15 % of the cold start, at most 6 s).")] = None,
    sleep_s: Annotated[float, typer.Option("--sleep-s", min=0, help="A sleep.")] = 1.0,
    host_gib: Annotated[float | None, typer.Option(
        "--host-gib", min=0, help="Host RAM that level-1 sleepers may fill (their weights); "
        "default: no limit.")] = None,
    stop_s: Annotated[float, typer.Option("--stop-s", min=0, help="An engine stop.")] = 2.0,
    rtt_s: Annotated[float, typer.Option(
        "--rtt-s", min=0, help="A closed-loop client's round trip between an answer and its "
        "next request.")] = 0.02,
    gpus: Annotated[int, typer.Option(
        "--gpus", min=1, help="Identical GPUs of the usable GiB each (a Ray cluster's nodes): "
        "the supervisor places each model on one, one engine operation per GPU.")] = 1,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per policy.")] = False,
) -> None:
    """Replay TRACE against the config's models with the real swap policy, in simulated time:
    cold loads, wakes, evictions, time spent loading, throughput and queueing delay."""
    wanted = None if policy is None else _policies(policy, "vlmhub")
    with user_errors():
        ctx = Context(config, gpu_gib)
        try:
            text = trace.read_text()
        except OSError as exc:
            raise TraceError(f"{trace}: cannot read the trace ({exc.strerror}). "
                             "Fix: give the path of a .jsonl trace") from None
        parsed = parse_trace(text, str(trace))
        models = ctx.models()
        check_models(parsed, [m.name for m in models])
        sim = from_config(models, ctx.loaded.config, ctx.gpu.usable_gib, start_s=start_s,
                          wake_s=wake_s, sleep_s=sleep_s, stop_s=stop_s, rtt_s=rtt_s, gpus=gpus,
                          wake2_s=wake2_s,
                          host_gib=math.inf if host_gib is None else host_gib)
        results = [simulate(sim, parsed, p)
                   for p in wanted or [ctx.loaded.config.router.policy]]
    if as_json:
        import json

        for r in results:
            print(json.dumps(r.as_dict()))
        return
    console.print(f"trace {trace} ({results[0].requests} requests), config "
                  f"{ctx.loaded.path}, {f'{gpus} GPUs x ' if gpus > 1 else ''}"
                  f"{ctx.gpu.usable_gib:.2f} GiB usable", highlight=False)
    console.print(_table(results))
    console.print("Waits in seconds (arrival to lease); worst: the largest wait / max_wait_s.",
                  highlight=False)
