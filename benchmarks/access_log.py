"""CPU per access-log line: what ``vlmhub route`` spends to log one request, in the request's own
thread (the event loop's) and in all (with the writer thread), text and JSON.

Each measurement runs in a fresh process that configures vlmhub's logging as ``vlmhub route``
does (stderr to /dev/null), logs ``--lines`` access lines (fewer than the queue holds, so none
is dropped), then waits for the writer to finish. ``--baseline DIR`` measures the vlmhub of DIR
(e.g. an older commit: ``git archive COMMIT vlmhub | tar -x -C DIR``) the same way, through the
``vlmhub.access`` logger as that code's access middleware called it.

    .venv/bin/python benchmarks/access_log.py [--baseline /tmp/base] [--lines 9000]

It reports, it never asserts. Complements router_overhead.py's ``vlmhub`` against
``vlmhub-quiet`` pair, whose requests/s on a busy 2-core machine move more with the load than
with the log.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CHILD = r"""
import sys, time
lines, fmt, kind = int(sys.argv[1]), sys.argv[2], sys.argv[3]
import vlmhub.logs as L
L.configure("info", fmt, ["sk-bench-key-1"])
rid, path = "0123456789abcdef0123456789abcdef", "/v1/chat/completions"
if kind == "tuple":
    def one():
        L.access((time.time(), rid, "POST", path, "bench", "bench", 200, 0.1, "bench@9000", 0.9,
                  1.0, 300))
else:  # the access middleware before issue 21: a LogRecord with the line's fields as extra
    def one():
        L.ACCESS.info(
            "%s %s %s model=%s%s status=%s queue_ms=%s replica=%s ttfb_ms=%s ms=%.0f bytes=%d",
            rid, "POST", path, "bench", "", 200, "0", "bench@9000", "1", 1.0, 300,
            extra={"request_id": rid, "model": "bench", "asked": "bench", "status": 200,
                   "queue_ms": 0.1, "replica": "bench@9000", "ttfb_ms": 0.9, "duration_ms": 1.0,
                   "bytes": 300, "path": path})
stop = getattr(L, "_stop_writer", None) or getattr(L, "_stop_listener")
start = time.process_time()
for _ in range(lines):
    one()
caller = time.process_time()
stop()
end = time.process_time()
print(f"{(caller - start) / lines * 1e6:.1f} {(end - start) / lines * 1e6:.1f}")
"""


def measure(tree: Path, fmt: str, kind: str, lines: int) -> tuple[float, float]:
    """(µs of CPU per line in the caller, µs per line in all) for one fresh process."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    with open(os.devnull, "w") as null:
        out = subprocess.run([sys.executable, "-c", CHILD, str(lines), fmt, kind], env=env,
                             cwd=tree, stdout=subprocess.PIPE, stderr=null, text=True,
                             check=True).stdout.split()
    return float(out[0]), float(out[1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", type=Path, default=None, help="an older tree to compare")
    parser.add_argument("--lines", type=int, default=9000, help="access lines per process")
    parser.add_argument("--runs", type=int, default=3, help="processes per cell (best kept)")
    args = parser.parse_args()
    trees = [("this tree", REPO, "tuple")]
    if args.baseline is not None:
        trees.append((f"baseline ({args.baseline})", args.baseline.resolve(), "record"))
    print(f"CPU per access line, µs (best of {args.runs} processes of {args.lines:,} lines; "
          f"load {os.getloadavg()[0]:.1f}):\n")
    print("| tree | format | in the request's thread | in all (with the writer) |")
    print("|---|---|---|---|")
    for label, tree, kind in trees:
        for fmt in ("text", "json"):
            runs = [measure(tree, fmt, kind, args.lines) for _ in range(args.runs)]
            caller = min(r[0] for r in runs)
            total = min(r[1] for r in runs)
            print(f"| {label} | {fmt} | {caller:.1f} | {total:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
