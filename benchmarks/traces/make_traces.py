"""Write the shipped traces of `vlmhub simulate` (benchmarks/traces/*.jsonl). Deterministic:
every random draw comes from a fixed seed, so a re-run rewrites the same files.

    .venv/bin/python benchmarks/traces/make_traces.py [--azure-dir DIR]

The models are named after the built-in plugins (dots-ocr, qwen3-vl, phi3-vision), which both
standin.yaml (stand-in engines, ~1.7 s starts) and plugins.yaml (the plugins' real reload
costs) configure, so every trace runs against every config. Request durations are service
times on the GPU at the offered concurrency.

``azure-2023-shape.jsonl`` is derived from the Azure LLM inference trace 2023 (Patel et al.,
"Splitwise", ISCA 2024; https://github.com/Azure/AzurePublicDataset, file
AzureLLMInferenceDataset2023.md; CC-BY 4.0): the first hour of its conversation and code
traces, ``TIMESTAMP,ContextTokens,GeneratedTokens`` per request. It is rewritten only when
``--azure-dir`` names a folder holding AzureLLMInferenceTrace_conv.csv and
AzureLLMInferenceTrace_code.csv (from the dataset's data/ folder or its release downloads).
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import random
from collections.abc import Iterable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
OCR, VL, PHI = "dots-ocr", "qwen3-vl", "phi3-vision"


def write(name: str, note: str, lines: Iterable[dict[str, Any]]) -> None:
    rows = [{"note": note}, *lines]
    text = "".join(json.dumps(r) + "\n" for r in rows)
    (HERE / f"{name}.jsonl").write_text(text)
    print(f"{name}.jsonl: {len(rows) - 1} lines")


def req(t: float, model: str, duration: float, priority: str | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"t": round(t, 3), "model": model, "duration": round(duration, 3)}
    if priority:
        out["priority"] = priority
    return out


def uniform3() -> None:
    write("uniform3", "issue 16: 16 closed-loop clients, 1,000 short chat requests spread evenly "
          "over three models of which two fit at a time (the stand-in answers in ~20 ms)",
          [{"clients": 16, "requests": 1000, "models": [OCR, VL, PHI],
            "duration": [0.01, 0.03], "seed": 16}])


def ocr_batch_with_chat() -> None:
    write("ocr-batch-with-chat", "issue 16: a 1,000-page OCR batch (vlmhub ocr: priority batch, "
          "concurrency 8, 4-12 s a page) on dots-ocr, and interactive chat on the two other "
          "models arriving every 20-60 s while the batch runs",
          [{"clients": 8, "requests": 1000, "models": [OCR], "duration": [4, 12],
            "priority": "batch", "seed": 1},
           {"every": [20, 60], "models": [VL, PHI], "duration": [1, 6],
            "priority": "interactive", "until": "clients", "seed": 2}])


def mixed3() -> None:
    """One hour, open loop: steady chat on qwen3-vl, sessions on phi3-vision, OCR jobs."""
    rng = random.Random(3)  # noqa: S311 - a reproducible workload
    out: list[dict[str, Any]] = []
    t = 0.0
    while (t := t + rng.expovariate(1 / 15)) < 3600:  # chat, 1 per 15 s on average
        out.append(req(t, VL, rng.uniform(1, 5)))
    t = 0.0
    while (t := t + rng.expovariate(1 / 480)) < 3600:  # a phi3-vision session every ~8 min
        s = t
        for _ in range(rng.randint(3, 10)):
            out.append(req(s, PHI, rng.uniform(2, 8)))
            s += rng.uniform(5, 30)
    t = 0.0
    while (t := t + rng.expovariate(1 / 600)) < 3600:  # a small OCR job every ~10 min
        s = t
        for _ in range(rng.randint(10, 40)):
            out.append(req(s, OCR, rng.uniform(4, 12), "batch"))
            s += rng.uniform(0.5, 3)
    out.sort(key=lambda r: r["t"])
    write("mixed3", "issue 9: one hour of mixed 3-model traffic, two models fit at a time: steady "
          "chat on qwen3-vl (1 per 15 s), phi3-vision sessions of 3-10 requests every ~8 min, "
          "OCR jobs of 10-40 pages (batch) every ~10 min", out)


def bursty_ocr() -> None:
    """OCR batches in bursts (vlmhub ocr at concurrency 8) with chat in between and during."""
    rng = random.Random(4)  # noqa: S311
    bursts = [(0.0, 200), (900.0, 300), (2000.0, 150), (2700.0, 250)]
    lines: list[dict[str, Any]] = [
        {"clients": 8, "requests": n, "models": [OCR], "duration": [4, 12],
         "priority": "batch", "start": start, "seed": 40 + i}
        for i, (start, n) in enumerate(bursts)
    ]
    t = 0.0
    while (t := t + rng.uniform(10, 40)) < 3600:
        lines.append(req(t, rng.choice([VL, PHI]), rng.uniform(1, 6), "interactive"))
    write("bursty-ocr", "issue 9: four OCR batches (200, 300, 150, 250 pages; batch priority, "
          "concurrency 8) starting at 0, 15, 33 and 45 min, with interactive chat on qwen3-vl "
          "and phi3-vision every 10-40 s for the hour", lines)


def _rows(path: Path) -> list[tuple[float, int, int]]:
    with path.open() as f:
        r = csv.DictReader(f)
        return [(dt.datetime.fromisoformat(row["TIMESTAMP"][:26]).timestamp(),
                 int(row["ContextTokens"]), int(row["GeneratedTokens"])) for row in r]


def azure(folder: Path) -> None:
    """Every 40th conversation request and every 20th code request of the hour, at their real
    times (so the arrival shape, bursts included, is the trace's at 1/40 and 1/20 the rate).
    Conversation requests with a context of 2,048 tokens or more go to dots-ocr (document-sized
    prompts), the other conversation requests to qwen3-vl, code requests to phi3-vision. A
    request runs 0.25 s + context / 5,000 tok/s + output / 40 tok/s (a 2-4B model on one
    consumer GPU)."""
    conv = _rows(folder / "AzureLLMInferenceTrace_conv.csv")[::40]
    code = _rows(folder / "AzureLLMInferenceTrace_code.csv")[::20]
    t0 = min(conv[0][0], code[0][0])
    out = []
    for rows, kind in ((conv, "conv"), (code, "code")):
        for ts, ctx, gen in rows:
            model = PHI if kind == "code" else OCR if ctx >= 2048 else VL
            out.append(req(ts - t0, model, 0.25 + ctx / 5000 + gen / 40))
    out.sort(key=lambda r: r["t"])
    write("azure-2023-shape", "derived from the Azure LLM inference trace 2023 (Patel et al., "
          "Splitwise, ISCA 2024; github.com/Azure/AzurePublicDataset, CC-BY 4.0): every 40th "
          "conversation and every 20th code request of its hour at their real times; "
          "conversation with >= 2048 context tokens -> dots-ocr, other conversation -> qwen3-vl, "
          "code -> phi3-vision; duration 0.25 s + context/5000 + output/40 tok/s "
          "(benchmarks/traces/make_traces.py)", out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--azure-dir", type=Path, default=None,
                    help="folder with AzureLLMInferenceTrace_conv.csv and _code.csv")
    a = ap.parse_args()
    uniform3()
    ocr_batch_with_chat()
    mixed3()
    bursty_ocr()
    if a.azure_dir is not None:
        azure(a.azure_dir)


if __name__ == "__main__":
    main()
