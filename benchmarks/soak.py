"""The full-size soak of `vlmhub route` (issue 10, item 2); tests/test_soak.py runs it reduced.

64 OpenAI clients (AsyncOpenAI, half of the requests streamed) against a `vlmhub route`
process over three stand-in engines of 3.25 GiB on a simulated 8 GiB GPU (two fit), until the
router has swapped 100 times after a warm-up. Every request is counted (ok, each status, lost,
wrong engine); the router process's descriptors, TCP connections, threads and RSS are read from
/proc after the warm-up and at the end, each after the router has been idle for 10 s.

    .venv/bin/python benchmarks/soak.py [--clients 64] [--swaps 100] [--json FILE]

About 3 minutes with the defaults on a 2-core machine. Exits 1 if a request was lost, answered
by the wrong engine or got a status other than 200/503/504, or if a descriptor, connection or
thread was left behind. Traffic goes to 127.0.0.1 only; the run is bounded by --limit-s.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from vlmhub.testing.soak import run_soak


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=64, help="concurrent clients (default 64)")
    p.add_argument("--swaps", type=int, default=100, help="swaps after the warm-up (100)")
    p.add_argument("--limit-s", type=float, default=1800, help="stop the load after this")
    p.add_argument("--json", type=Path, help="write the counts and samples here")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="vlmhub-soak-") as folder:
        res = run_soak(Path(folder), clients=args.clients, swaps=args.swaps,
                       limit_s=args.limit_s)
    print(res.summary())
    for reason, count in res.reasons.most_common(5):
        print(f"  {count} x {reason}")
    for line in (res.lost + res.wrong)[:10]:
        print(f"  {line}")
    if args.json:
        args.json.write_text(json.dumps(res.as_json(), indent=2))
    b, a = res.before, res.after
    leaked = a is None or b is None or a.fds > b.fds or a.tcp > b.tcp or a.threads > b.threads
    bad = res.lost or res.wrong or res.undocumented or res.swaps < args.swaps + 3 or leaked
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
