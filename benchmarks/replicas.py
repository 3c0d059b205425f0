"""Replicas (issue 24): pages per second of ``vlmhub ocr`` with 1, 2 and 4 replicas of one
model, how evenly two replicas share 16 clients, and autoscaling under a burst.

Each run starts ``vlmhub route`` on a pretend machine of four 8 GiB GPUs (``gpu.devices``)
with one model whose engines are the stand-in (vlmhub.testing.stub_engine, a test double) at
a fixed 0.5 s per request and one request at a time (``--stub-request-delay 0.5
--stub-max-seqs 1``: an OCR engine at ``max_num_seqs: 1``). With every replica ready (a
warm-up request, then waiting for ``/api/models``), ``vlmhub ocr`` sends 200 small pages
through the router with 16 in flight (``--concurrency 16``), timed from start to exit. The
share of each replica is what its engine counted (the stand-in's ``/stub/stats``).

The autoscaling run has ``replicas: {min: 1, max: 2, target: 2}`` and ``ttl: 5``: the same
200 pages arrive as a burst on one replica; the report gives the most replicas ready during
it, the pages written (none may be lost) and how long after the burst the pool was back to
one replica.

``--ray`` runs the Ray case instead (issue 24 item 7, the Ray tier's figure): the same engines
as Ray actors (``runtime.kind: ray``) on a local two-node cluster (``ray.cluster_utils``: a
head and a worker, separate raylets, each declaring a pretend 8 GiB GPU as ``vram_gib``), with
1 and then 2 replicas. Both replicas would fit on one node: the report names the node of each.

    .venv/bin/python benchmarks/replicas.py [--pages 200] [--ray] [--update-doc docs/benchmarks.md]

Targets: 2 replicas at least 1.8x and 4 replicas at least 3.5x the pages per second of one;
the busiest of 2 replicas serves at most 1.2x the requests of the idlest. It reports, it never
asserts. About 3 minutes.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
from benchlib import Processes, free_port, machine, save_report, sigterm_exits

MODEL = "pages"
STUB = """["{python}", "-m", "vlmhub.testing.stub_engine", "--stub-startup-delay",
                 "0.5", "--stub-request-delay", "0.5", "--stub-max-seqs", "1"]"""
PROCESS = """gpu: {devices: [0, 1, 2, 3], total_gib: 8, reserve_gib: 0.5, force_total: true}
runtime:
  kind: process
  process_argv: STUB"""
RAY = """gpu: {total_gib: 8, reserve_gib: 0.5, force_total: true}
runtime:
  kind: ray
  address: "ADDRESS"
  engine_host: 127.0.0.1
  process_argv: STUB"""
"""The machine and runtime parts of the config: four pretend cards, or a Ray cluster."""
CONFIG = """{machine}
  port_range: [{lo}, {hi}]
router: {{port: {port}, max_queue: 512, queue_timeout_s: 300}}
models:
  {model}:
    replicas: {replicas}
    ttl: {ttl}
    spec:
      hf_repo: stub/pages
      image: vlmhub/stub-engine:dev
      capabilities: [chat, vision, ocr]
      options: {{max_model_len: 8192, max_num_seqs: 1, enforce_eager: true}}
      vram: {{weights_gib: 2.0, kv_bytes_per_token: 28672, activation_gib: 0.5}}
      presets:
        ocr: {{prompt: "Extract the text content from this image."}}
      default_preset: ocr
"""


def make_pages(folder: Path, count: int) -> None:
    """``count`` small distinct PNG pages."""
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        img = Image.new("RGB", (96, 64), "white")
        ImageDraw.Draw(img).text((4, 24), f"page {i}", fill="black")
        img.save(folder / f"p{i:04d}.png")


@contextmanager
def router(root: Path, replicas: str, ttl: float, setup: str = PROCESS) -> Iterator[str]:
    """``vlmhub route`` on a config with ``replicas`` on ``setup`` (:data:`PROCESS`, or
    :data:`RAY` with its address); yields its URL once /health answers, then stops it and its
    engines (benchlib.Processes)."""
    port, lo = free_port(), 20000 + (os.getpid() * 7) % 10000  # below Ray's worker ports
    cfg = root / f"models-{time.monotonic_ns()}.yaml"
    cfg.write_text(CONFIG.format(machine=setup.replace("STUB", STUB), port=port, lo=lo,
                                 hi=lo + 40, model=MODEL, replicas=replicas, ttl=ttl))
    procs = Processes(root)
    procs.start("route", [sys.executable, "-m", "vlmhub", "route", "--config", str(cfg),
                          "--log-level", "warning"],
                env={"VLMHUB_STATE_DIR": str(root / "state"), "COLUMNS": "200"})
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        yield url
    finally:
        procs.stop_all()


def replicas_of(url: str) -> list[dict[str, Any]]:
    (row,) = httpx.get(url + "/api/models", timeout=5).json()["models"]
    return list(row["replicas"]) or [row]


def ready_count(url: str) -> int:
    return sum(1 for r in replicas_of(url) if r["state"] == "ready")


def served_by(url: str) -> dict[str, int]:
    """Each replica's completions, as its engine counted them."""
    out = {}
    for r in replicas_of(url):
        if r["port"] is not None:
            stats = httpx.get(f"http://127.0.0.1:{r['port']}/stub/stats", timeout=5).json()
            out[r["replica"] or r["name"]] = int(stats["completions"])
    return out


def ocr(url: str, pages: Path, out: Path) -> tuple[float, int]:
    """Run ``vlmhub ocr`` over ``pages`` (16 in flight); its seconds and pages written."""
    began = time.monotonic()
    subprocess.run([sys.executable, "-m", "vlmhub", "ocr", str(pages), "--model", MODEL,
                    "--url", url + "/v1", "--concurrency", "16", "--out", str(out)],
                   check=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    took = time.monotonic() - began
    done = sum(1 for line in (out / "manifest.jsonl").read_text().splitlines()
               if json.loads(line).get("status") == "ok")
    return took, done


def fixed(root: Path, pages: Path, n: int, setup: str = PROCESS) -> dict[str, Any]:
    with router(root, str(n), 600, setup) as url:
        httpx.post(url + "/v1/chat/completions", timeout=60, json={
            "model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
        for _ in range(300):
            if ready_count(url) == n:
                break
            time.sleep(0.1)
        before = served_by(url)
        nodes = {r["replica"] or r["name"]: r.get("node") for r in replicas_of(url)}
        took, done = ocr(url, pages, root / f"out-{n}-{time.monotonic_ns()}")
        after = served_by(url)
    share = {k: after[k] - before.get(k, 0) for k in after}
    return {"replicas": n, "seconds": took, "pages": done, "pages_per_s": done / took,
            "served": share, "nodes": nodes}


def autoscale(root: Path, pages: Path) -> dict[str, Any]:
    with router(root, "{min: 1, max: 2, target: 2}", 5) as url:
        for _ in range(300):
            if ready_count(url) == 1:
                break
            time.sleep(0.1)
        peak, stop = [0], threading.Event()

        def sample() -> None:
            while not stop.is_set():
                peak[0] = max(peak[0], ready_count(url))
                time.sleep(0.2)

        t = threading.Thread(target=sample)
        t.start()
        took, done = ocr(url, pages, root / "out-auto")
        stop.set()
        t.join()
        ended, back = time.monotonic(), None
        for _ in range(600):
            if ready_count(url) == 1:
                back = time.monotonic() - ended
                break
            time.sleep(0.1)
    return {"seconds": took, "pages": done, "peak_ready": peak[0], "back_to_min_s": back}


@contextmanager
def ray_cluster() -> Iterator[str]:
    """A local Ray cluster of two nodes (``head``, ``w1``), each a pretend 8 GiB GPU and one
    CPU, as the Ray tier has it (tests/ray_support.py); yields its address, shuts it down."""
    from ray.cluster_utils import Cluster

    node: dict[str, Any] = {"num_cpus": 1, "object_store_memory": 80 * 1024 * 1024,
                            "resources": {"vram_gib": 8}}
    cluster = Cluster(initialize_head=True, head_node_args={
        **node, "include_dashboard": False, "labels": {"vlmhub/node": "head"}})
    try:
        cluster.add_node(**node, labels={"vlmhub/node": "w1"})
        cluster.wait_for_nodes()
        yield str(cluster.address)
    finally:
        cluster.shutdown()


def on_ray(root: Path, pages: Path, pages_n: int) -> tuple[str, dict[str, Any]]:
    """The Ray case: 1 and 2 replicas as Ray actors; its text and results."""
    with ray_cluster() as address:
        runs = [fixed(root, pages, n, RAY.replace("ADDRESS", address)) for n in (1, 2)]
    one, two = runs

    def row(r: dict[str, Any]) -> str:
        where = ", ".join(f"{k} {v} on {r['nodes'].get(k)}" for k, v in sorted(r["served"].items()))
        return (f"| {r['replicas']} | {r['pages']} | {r['seconds']:.1f} | {r['pages_per_s']:.2f} "
                f"| {r['pages_per_s'] / one['pages_per_s']:.2f}x | {where} |")

    counts = list(two["served"].values())
    lost = pages_n - two["pages"]
    text = "\n".join([
        "| replicas (Ray actors) | pages | seconds | pages/s | vs 1 replica | requests per "
        "replica, node |", "|---:|---:|---:|---:|---:|---|", *(row(r) for r in runs), "",
        f"2 replicas on Ray: {two['pages_per_s'] / one['pages_per_s']:.2f}x the pages per second "
        f"of one; busiest / idlest = {max(counts) / max(min(counts), 1):.2f}; {lost} of "
        f"{pages_n} pages lost.",
    ])
    return text, {"ray": runs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pages", type=int, default=200)
    ap.add_argument("--ray", action="store_true", help="the Ray case (1 and 2 replicas)")
    ap.add_argument("--update-doc", type=Path, default=None)
    args = ap.parse_args()
    began = time.monotonic()
    command = ".venv/bin/python benchmarks/replicas.py" + (
        f" --pages {args.pages}" if args.pages != 200 else "") + (" --ray" if args.ray else "")
    if args.ray:
        with sigterm_exits(), tempfile.TemporaryDirectory(prefix="vlmhub-replicas-") as tmp:
            make_pages(Path(tmp) / "pages", args.pages)
            text, results = on_ray(Path(tmp), Path(tmp) / "pages", args.pages)
        print(text)
        info = {"date": dt.date.today().isoformat(), "command": command,
                **machine(["httpx", "ray"])}
        out = Path(tempfile.mkdtemp(prefix="vlmhub-replicas-report-"))
        save_report(out, info, time.monotonic() - began, text, results, args.update_doc,
                    "replicas-ray")
        return
    with sigterm_exits(), tempfile.TemporaryDirectory(prefix="vlmhub-replicas-") as tmp:
        root = Path(tmp)
        pages = root / "pages"
        make_pages(pages, args.pages)
        runs = [fixed(root, pages, n) for n in (1, 2, 4)]
        auto = autoscale(root, pages)
    base = runs[0]["pages_per_s"]
    lines = ["| replicas | pages | seconds | pages/s | vs 1 replica | requests per replica |",
             "|---:|---:|---:|---:|---:|---|"]
    for r in runs:
        served = ", ".join(f"{k} {v}" for k, v in sorted(r["served"].items()))
        lines.append(f"| {r['replicas']} | {r['pages']} | {r['seconds']:.1f} | "
                     f"{r['pages_per_s']:.2f} | {r['pages_per_s'] / base:.2f}x | {served} |")
    two = list(runs[1]["served"].values())
    ratio = max(two) / max(min(two), 1)
    back = auto["back_to_min_s"]
    text = "\n".join([
        *lines, "",
        f"Balance, 2 replicas under 16 clients: busiest / idlest = {ratio:.2f} (target <= 1.2).",
        f"Targets: 2 replicas {runs[1]['pages_per_s'] / base:.2f}x (>= 1.8x), 4 replicas "
        f"{runs[2]['pages_per_s'] / base:.2f}x (>= 3.5x).",
        f"Autoscaling {{min: 1, max: 2, target: 2}}, ttl 5 s: {auto['pages']} of {args.pages} "
        f"pages written in {auto['seconds']:.1f} s, at most {auto['peak_ready']} replicas ready, "
        + (f"back to one {back:.1f} s after the burst." if back is not None
           else "not back to one within 60 s."),
    ])
    print(text)
    info = {"date": dt.date.today().isoformat(), "command": command, **machine(["httpx"])}
    out = Path(tempfile.mkdtemp(prefix="vlmhub-replicas-report-"))
    save_report(out, info, time.monotonic() - began, text,
                {"fixed": runs, "autoscale": auto}, args.update_doc, "replicas")


if __name__ == "__main__":
    main()
