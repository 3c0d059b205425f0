"""``vlmhub budgets [show | forget MODEL | --reset MODEL]``: the budgets vlmhub learned.

Each engine start records what vLLM reported about its memory (see :mod:`vlmhub.sizing.budgets`);
``show`` lists them, ``forget`` drops a model's so the next start measures again. Both read
or write one small file and return. ``--reset MODEL`` is ``forget MODEL``: what a router that
refuses a model whose learned budget no longer fits tells the user to run.
"""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from vlmhub.cli.common import Context, console
from vlmhub.cli.output import JsonOption, print_json
from vlmhub.config.schema import ResolvedModel, resolve
from vlmhub.sizing.budgets import BudgetStore, Entry, measured_from_facts
from vlmhub.spec import KIB

budgets_app = typer.Typer(
    help="Measured VRAM budgets: what vLLM reported at each model's last start.",
    invoke_without_command=True,
)


def register(app: typer.Typer) -> None:
    app.add_typer(budgets_app, name="budgets")


def store() -> BudgetStore:
    """The budgets file of this user (``$VLMHUB_STATE_DIR/budgets.json``)."""
    return BudgetStore.default()


def resolve_measured(ctx: Context, only: list[str] | None = None) -> list[ResolvedModel]:
    """The configured models planned with the measured budgets (``ctx.models()`` plans with
    the estimates only)."""
    return resolve(ctx.loaded, ctx.registry.specs(), ctx.gpu, only=only, measured=store())


def _gib(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _row(e: Entry) -> list[str]:
    k, m = e.key, measured_from_facts(e.facts) if e.measured_at else None
    settings = f"len {k.max_model_len}, seqs {k.max_num_seqs}"
    if k.max_pixels:
        settings += f", px {k.max_pixels}"
    if k.kv_cache_dtype:
        settings += f", kv {k.kv_cache_dtype}"
    settings += ", eager" if k.enforce_eager else ""
    raised = "-"
    if e.raised_at:
        raised = (f"+{e.raised_activation_gib + e.raised_headroom_gib:.2f} GiB "
                  f"{e.raised_at[:10]}: {e.reasons[-1] if e.reasons else ''}")  # fmt: skip
    kv = "-" if m is None or m.kv_bytes_per_token is None else f"{m.kv_bytes_per_token / KIB:.1f}"
    return [
        k.model + (f":{k.variant}" if k.variant else ""),
        f"{k.vllm_version} / {k.gpu}",
        settings,
        _gib(m.weights_gib if m else None),
        _gib(m.activation_gib if m else None),
        _gib(m.non_torch_gib if m else None),
        _gib(m.cuda_graph_gib if m else None),
        kv,
        (e.measured_at or "-")[:10],
        raised,
    ]


@budgets_app.callback()
def main(
    typer_ctx: typer.Context,
    reset: Annotated[str | None, typer.Option(
        "--reset", metavar="MODEL", help="Forget what MODEL's starts taught (measurements and "
        "raises): its next start plans with the plugin's estimate and measures again.")] = None,
) -> None:
    """Show the measured budgets (the default), or forget a model's."""
    if reset is not None:
        forget(reset, all_models=False)
    elif typer_ctx.invoked_subcommand is None:
        show()


@budgets_app.command("show")
def show(as_json: Annotated[bool, JsonOption] = False) -> None:
    """Every measured budget: the settings it is for and what vLLM reported (GiB)."""
    s = store()
    entries = sorted(s.entries(), key=lambda e: (e.key.model, e.measured_at or ""))
    if as_json:
        print_json({"path": str(s.path), "budgets": [e.as_dict() for e in entries]})
        return
    if not entries:
        console.print(f"No measured budgets yet ({s.path}): every plan uses the estimates. "
                      "Each engine start records what vLLM reports.", highlight=False)  # fmt: skip
        return
    table = Table(title=f"Measured budgets ({s.path})")
    for col in ("MODEL", "vLLM / GPU", "SETTINGS", "WEIGHTS", "ACTIVATION", "NON-TORCH",
                "GRAPHS", "KV KiB/TOK", "MEASURED", "RAISED"):  # fmt: skip
        table.add_column(col, overflow="fold")
    for e in entries:
        table.add_row(*_row(e))
    console.print(table)


@budgets_app.command("forget")
def forget(
    model: Annotated[str | None, typer.Argument(help="The model whose budgets to drop.")] = None,
    all_models: Annotated[bool, typer.Option("--all", help="Drop every model's.")] = False,
) -> None:
    """Drop a model's measured budgets: its next start measures again."""
    if (model is None) == (not all_models):
        console.print("Give a MODEL, or --all (not both).")
        raise typer.Exit(2)
    n = store().forget(None if all_models else model)
    what = "every model" if all_models else repr(model)
    console.print(f"Forgot {n} measured budget(s) of {what}.", highlight=False)

