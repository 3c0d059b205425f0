"""The access log's cost and the router against the thin aiohttp proxy, measured interleaved.

router_overhead.py measures each path once, one after the other; on a machine whose load moves
(other work on its two cores) a path measured in a busy minute looks slower than it is. This
script starts the same paths (the upstream, ``vlmhub route`` at ``--log-level info`` as
deployed, the same router at ``warning``, optionally an older tree's router at ``info``, and the
thin starlette + aiohttp proxy) and runs ``wrk -t1 -cC -d5s`` on each in turn, ``--rounds``
times, reversing the order every other round; it prints the median requests/s and CPU per
request of each path, the ratios the issue-21 targets name, and for each pair of paths the
median of the ratios within one round (paths measured back to back: a machine whose speed
drifts between rounds moves both).

    .venv/bin/python benchmarks/log_cost.py [--baseline /tmp/base] [--concurrency 16,64]

``--named-keys 100`` adds ``vlmhub (info, 100 named keys)``: the same router with 100 named
keys (models, rpm, tpm; the benchmark's key is one of them) instead of one plain key, and the
ratio against ``vlmhub (info)`` (issue 27: at most 3 % at c=16). ``--only info`` keeps the
paths whose name holds one of the given words.

It reports, it never asserts. Needs ``wrk`` on PATH.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchlib import REPO, Processes, cpu_seconds, free_port, machine, save_report
from router_overhead import CHAT_PATH, KEY, THIN_PROXY, WRK_LUA, wait_ready

HERE = Path(__file__).resolve().parent


def run_wrk(url: str, concurrency: int, seconds: int, lua: Path) -> tuple[int, float]:
    """(requests completed, requests/s) of one wrk run."""
    out = subprocess.run(["wrk", "-t1", f"-c{concurrency}", f"-d{seconds}s", "-s", str(lua),
                          url + CHAT_PATH], capture_output=True, text=True, check=True).stdout
    done = re.search(r"(\d+) requests in", out)
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if done is None or rps is None:
        raise RuntimeError(f"unexpected wrk output:\n{out}")
    return int(done.group(1)), float(rps.group(1))


def named_config(plain: str, n: int) -> str:
    """``plain`` (the one-key config) with ``n`` named keys instead; the benchmark's key is
    the last, with models, rpm and tpm limits it never reaches."""
    keys = [f"{{name: user{i}, key: sk-bench-user-{i:03d}, models: [bench], rpm: 100000000, "
            f"tpm: 1000000000}}" for i in range(n - 1)]
    keys.append(f"{{name: bench, key: {KEY}, models: [bench], rpm: 100000000, "
                "tpm: 1000000000}")
    return plain.replace(f"router: {{api_keys: [{KEY}]}}",
                         "router:\n  api_keys:\n" + "".join(f"    - {k}\n" for k in keys))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", type=Path, action="append", default=[],
                        help="an older tree (with vlmhub/) to run at --log-level info too "
                             "(repeatable: each is the path 'baseline NAME (info)')")
    parser.add_argument("--concurrency", default="16,64")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--seconds", type=int, default=5, help="per wrk run")
    parser.add_argument("--named-keys", type=int, default=0,
                        help="add a path whose router has this many named keys")
    parser.add_argument("--only", default="", help="comma-separated words: keep those paths")
    parser.add_argument("--update-doc", type=Path, default=None,
                        help="write the summary into this file's log_cost block")
    args = parser.parse_args()
    began = time.monotonic()
    out = Path(tempfile.mkdtemp(prefix="vlmhub-logcost-"))
    lua = out / "chat.lua"
    lua.write_text(WRK_LUA)
    info = machine(("vlmhub", "uvicorn", "aiohttp", "uvloop"))
    print(", ".join(f"{k} {v}" for k, v in info.items()), flush=True)
    procs = Processes(out)
    try:
        up = free_port()
        upstream = f"http://127.0.0.1:{up}"
        proc = procs.start("upstream", [sys.executable, str(HERE / "upstream.py"), "--port",
                                        str(up)])
        config = out / "models.yaml"
        config.write_text("gpu: {total_gib: 8, force_total: true}\n"
                          f"router: {{api_keys: [{KEY}]}}\nruntime: {{kind: process}}\n"
                          f"models:\n  bench: {{url: \"{upstream}\", served_model_name: bench}}\n")
        paths: dict[str, tuple[list[str], Path, dict[str, str] | None]] = {
            "vlmhub (info)": (["--log-level", "info"], REPO, None),
            "vlmhub (warning)": (["--log-level", "warning"], REPO, None),
        }
        for given in args.baseline:
            base = given.resolve()
            label = "baseline (info)" if len(args.baseline) == 1 else f"baseline {base.name} (info)"
            paths[label] = (["--log-level", "info"], base, {"PYTHONPATH": str(base)})
        named = f"vlmhub (info, {args.named_keys} named keys)"
        if args.named_keys:
            keyed = out / "named.yaml"
            keyed.write_text(named_config(config.read_text(), args.named_keys))
            paths[named] = (["--log-level", "info", "--config", str(keyed)], REPO, None)
        words = [w for w in args.only.split(",") if w]
        paths = {k: v for k, v in paths.items() if not words or any(w in k for w in words)}
        urls: dict[str, str] = {}
        pids: dict[str, int] = {}
        started: dict[str, subprocess.Popen[bytes]] = {}
        for i, (name, (extra, cwd, env)) in enumerate(paths.items()):
            port = free_port()
            p = procs.start(f"router{i}", [sys.executable, "-m", "vlmhub", "route", "--config",
                                           str(config), "--port", str(port), "--state-dir",
                                           str(out / f"state{i}"), *extra], cwd=cwd, env=env)
            urls[name], pids[name], started[name] = f"http://127.0.0.1:{port}", p.pid, p
        script = out / "thin_proxy.py"
        script.write_text(THIN_PROXY)
        port = free_port()
        thin = "starlette + aiohttp"
        if not words or any(w in thin for w in words):
            p = procs.start("aiohttp", [sys.executable, str(script), "aiohttp", upstream,
                                        str(port), "uvloop"])
            urls[thin], pids[thin], started[thin] = f"http://127.0.0.1:{port}", p.pid, p
        wait_ready(procs, "upstream", proc, upstream)
        for name, url in urls.items():
            wait_ready(procs, name, started[name], url)
        table: dict[tuple[str, int], list[tuple[float, float]]] = {}
        for c in (int(x) for x in args.concurrency.split(",")):
            for rnd in range(args.rounds):
                order = list(urls) if rnd % 2 == 0 else list(reversed(urls))
                for name in order:
                    run_wrk(urls[name], c, 1, lua)  # warm-up
                    before = cpu_seconds(pids[name]) or 0.0
                    done, rps = run_wrk(urls[name], c, args.seconds, lua)
                    cpu = ((cpu_seconds(pids[name]) or 0.0) - before) / max(done, 1) * 1e6
                    table.setdefault((name, c), []).append((rps, cpu))
                    print(f"c={c} round {rnd + 1} {name}: {rps:,.0f} rps, {cpu:.0f} µs CPU/request,"
                          f" load {os.getloadavg()[0]:.1f}", flush=True)
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            print(f"\nMedians of {args.rounds} interleaved {args.seconds} s runs "
                  f"(load {os.getloadavg()[0]:.1f} at the end):\n")
            cs = sorted({c for _, c in table})
            print("| path | " + " | ".join(f"c={c} rps | c={c} CPU/request" for c in cs) + " |")
            print("|---" * (1 + 2 * len(cs)) + "|")
            med: dict[tuple[str, int], tuple[float, float]] = {}
            for name in urls:
                cells = []
                for c in cs:
                    runs = table[(name, c)]
                    med[(name, c)] = (statistics.median(r[0] for r in runs),
                                      statistics.median(r[1] for r in runs))
                    cells += [f"{med[(name, c)][0]:,.0f}", f"{med[(name, c)][1]:.0f} µs"]
                print(f"| {name} | " + " | ".join(cells) + " |")
            print()
            pairs = [("vlmhub (info)", "vlmhub (warning)"), ("vlmhub (info)", thin),
                     ("vlmhub (warning)", thin),
                     *((name, "vlmhub (info)") for name in urls if name.startswith("baseline"))]
            for c in cs:  # each round's paths ran back to back: their ratio cancels slow drift
                for a, b in pairs:
                    if (a, c) in table and (b, c) in table:
                        ratios = [x[0] / y[0] for x, y in zip(table[(a, c)], table[(b, c)],
                                                              strict=True)]
                        print(f"- c={c}: {a} / {b}, median of {len(ratios)} same-round ratios: "
                              f"{statistics.median(ratios):.3f} (min {min(ratios):.3f}, "
                              f"max {max(ratios):.3f})")
            print()
            for c in cs:
                on, off = med.get(("vlmhub (info)", c)), med.get(("vlmhub (warning)", c))
                ref = med.get((thin, c))
                if on and off and ref:
                    print(f"- c={c}: access log costs {1 - on[0] / off[0]:+.0%} of requests/s "
                          f"({on[1] - off[1]:+.0f} µs CPU/request); with it on the router serves "
                          f"{on[0] / ref[0]:.2f}x the thin aiohttp proxy")
                if on and (keys := med.get((named, c))):
                    print(f"- c={c}: {args.named_keys} named keys cost {1 - keys[0] / on[0]:+.1%} "
                          f"of requests/s ({keys[1] - on[1]:+.0f} µs CPU/request) against one "
                          "plain key (target: at most 3 %)")
                if on and (old := med.get(("baseline (info)", c))):
                    print(f"- c={c}: against the baseline tree: {1 - on[0] / old[0]:+.1%} of "
                          f"requests/s ({on[1] - old[1]:+.0f} µs CPU/request)")
        print(buf.getvalue(), end="")
        if args.update_doc is not None:
            info["command"] = ("cd benchmarks && ../.venv/bin/python log_cost.py "
                               + " ".join(sys.argv[1:]))
            save_report(out, info, time.monotonic() - began, buf.getvalue().strip(), {},
                        args.update_doc.resolve(), "log_cost")
    finally:
        procs.stop_all()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
