"""The README's main job: `make run` -> scripts/run.sh -> `vlmhub route` over the built-in demo
(three stand-in engines, two fit the pretend GPU) when there is no NVIDIA GPU."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import openai
import pytest
from route_support import wait_healthy

from vlmhub.engines.ports import free_port

REPO = Path(__file__).resolve().parent.parent


def test_main_job_serves_the_demo_and_swaps(tmp_path: Path) -> None:
    if shutil.which("nvidia-smi"):
        pytest.skip("this machine has a GPU: the main job serves models.yaml instead")
    port = free_port()
    venv = Path(sys.executable).parent.parent
    env = {
        **os.environ,
        "VENV": str(venv),
        "VLMHUB_STATE_DIR": str(tmp_path / "state"),
        "COLUMNS": "160",
    }
    log = (tmp_path / "run.log").open("w")
    proc = subprocess.Popen(
        ["bash", str(REPO / "scripts" / "run.sh"), "--port", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        cwd=REPO,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc, tmp_path / "run.log")
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", timeout=60)
        for name in ("demo-ocr", "demo-vl", "demo-phi", "dots-ocr-demo"):
            r = client.chat.completions.create(
                model=name, messages=[{"role": "user", "content": "hi"}], max_tokens=4
            )
            served = "demo-ocr" if name == "dots-ocr-demo" else name
            assert (r.choices[0].message.content or "").startswith(f"{served}:")
        models = {m["id"]: m for m in httpx.get(url + "/v1/models").json()["data"]}
        assert set(models) == {"demo-ocr", "demo-vl", "demo-phi"}
        ready = {n for n, m in models.items() if m["state"] == "ready"}
        assert ready == {"demo-ocr", "demo-phi"}  # two of three fit: demo-vl was swapped out
    finally:
        proc.send_signal(signal.SIGINT)
        code = proc.wait(60)
        log.close()
    output = (tmp_path / "run.log").read_text()
    assert code == 0, output
    assert "running the demo (examples/demo.yaml" in output
    assert "DEMO: these models are stand-in engines" in output  # issue 21 item 18: says so
    assert "vlmhub router stopped." in output
    logs = sorted(p.name for p in (tmp_path / "state" / "logs").glob("*.log"))
    assert logs == ["demo-ocr.log", "demo-phi.log", "demo-vl.log"]  # the engines ran here
    assert list((tmp_path / "state" / "process").glob("*.json")) == []  # and were stopped
