"""``vlmhub usage``: tokens per key name and model, from the running router's admin API
(``GET /api/usage``), the way ``vlmhub status`` reads ``/api/models``.

Counts are kept by the router in ``<state dir>/usage.json`` in hourly buckets: ``--since``
starts at the hour it falls in. Never shows a key, only its name (a plain key:
``key-<first 6 hex of its SHA-256>``). One blocking HTTP request.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated
from urllib.parse import urlencode

import typer
from rich.table import Table

from vlmhub.cli.common import ConfigOption, console, user_errors
from vlmhub.cli.output import JsonOption, print_json
from vlmhub.cli.status import RouterOption, admin_call, admin_target

SinceOption = typer.Option(
    "--since", help="From when: 30m, 12h, 1d, 2w, a Unix time or an ISO date (default: all).")


def usage(
    config: Path | None = ConfigOption,
    router: Annotated[str | None, RouterOption] = None,
    since: Annotated[str | None, SinceOption] = None,
    as_json: Annotated[bool, JsonOption] = False,
) -> None:
    """Prompt and completion tokens per key name and model, as the engines counted them."""
    with user_errors():
        url, key = admin_target(config, router)
        query = f"?{urlencode({'since': since})}" if since else ""
        answer = admin_call("GET", f"{url}/api/usage{query}", key, 10.0)
        if as_json:
            print_json(answer)
            return
        table = Table(box=None, pad_edge=False)
        for col in ("KEY", "MODEL", "REQUESTS", "PROMPT", "COMPLETION", "TOTAL"):
            table.add_column(col, overflow="fold", justify="left" if col in ("KEY", "MODEL")
                             else "right")
        for row in answer["data"]:
            table.add_row(row["key"], row["model"], str(row["requests"]),
                          str(row["prompt_tokens"]), str(row["completion_tokens"]),
                          str(row["total_tokens"]))
        console.print(table if answer["data"] else "No usage recorded in that time.")


def register(app: typer.Typer) -> None:
    app.command("usage")(usage)
