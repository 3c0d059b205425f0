"""Per-request cost of what issue 26 added to the router's hot path, timed in-process.

A chat request now goes through :func:`vlmhub.router.body.parse_request` (a body that starts
with ``{`` is JSON at once; only another body reads Content-Type, for multipart forms) and
:func:`vlmhub.router.params.ruled` (one dict lookup for a model without ``params`` rules). This
times both against the old ``parse_payload`` alone on the proxy benchmark's chat body: best of
25 repeats of 100,000 calls. It reports, it never asserts; docs/benchmarks.md has a run.

    .venv/bin/python benchmarks/request_parse.py
"""

from __future__ import annotations

import timeit

from starlette.datastructures import Headers

from vlmhub.config.schema import Config
from vlmhub.router.body import parse_payload, parse_request  # noqa: F401 - timed by name
from vlmhub.router.params import ruled  # noqa: F401 - timed by name

BODY = b'{"model":"bench","messages":[{"role":"user","content":"hi"}]}'
CONFIG = Config.model_validate({"models": {"bench": {"url": "http://127.0.0.1:9"}}})
HEADERS = Headers(raw=[(b"host", b"127.0.0.1:8080"), (b"authorization", b"Bearer sk"),
                       (b"content-type", b"application/json"), (b"content-length", b"61")])
PAYLOAD = parse_payload(BODY)


def best_ns(stmt: str, number: int = 100_000) -> float:
    runs = timeit.repeat(stmt, number=number, repeat=25, globals=globals())
    return min(runs) / number * 1e9


def main() -> None:
    old = best_ns("parse_payload(BODY)")
    new = best_ns("parse_request(BODY, HEADERS)")
    rules = best_ns('ruled(CONFIG, "bench", BODY, PAYLOAD)')
    print(f"parse_payload (before): {old:.0f} ns; parse_request (after): {new:.0f} ns; "
          f"ruled() for a model without rules: {rules:.0f} ns; "
          f"added per request: {new - old + rules:.0f} ns")


if __name__ == "__main__":
    main()
