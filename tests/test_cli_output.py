"""Output that survives a pipe: the real ``vlmhub`` command (a subprocess, stdout a pipe, no
COLUMNS) prints whole values in its tables, and every table command offers ``--json``."""

from __future__ import annotations

import io
import json
import os
import random
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest
import yaml

from vlmhub.cli import route as route_cli
from vlmhub.cli.output import PIPE_WIDTH, PipeConsole
from vlmhub.config.registry import Registry
from vlmhub.config.schema import load_config
from vlmhub.control.contract import ReplicaInfo
from vlmhub.sizing.budgets import BudgetStore, key_for
from vlmhub.sizing.vram import Gpu

VLMHUB = str(Path(sys.executable).parent / "vlmhub")
LONG = "a-model-whose-name-is-much-longer-than-any-terminal-column-would-allow-0123456789"
STUB = {"hf_repo": "stub/with-a-long-repository-name-to-see-it-whole-in-the-plan-table",
        "image": "vlmhub/stub-engine:dev", "options": {"max_model_len": 2048},
        "vram": {"weights_gib": 1, "kv_bytes_per_token": 1024},
        "env": {"VLMHUB_STUB_STARTUP_DELAY": "0.2"}}


def write_config(tmp_path: Path) -> Path:
    lo = random.randrange(20000, 60000, 100)
    config = {
        "gpu": {"total_gib": 8},
        "runtime": {"kind": "process", "port_range": [lo, lo + 99],
                    "process_argv": ["{python}", "-m", "vlmhub.testing.stub_engine"]},
        "models": {LONG: {"spec": STUB}},
    }
    path = tmp_path / "models.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def run(tmp_path: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """``vlmhub ARGS`` with stdout and stderr pipes, as in ``vlmhub ... | grep``: no COLUMNS,
    no terminal (stdin is /dev/null, so rich cannot borrow a terminal's width from it)."""
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    env |= {"VLMHUB_STATE_DIR": str(tmp_path / "state"), "NO_COLOR": "1",
            "DOCKER_HOST": "unix:///nonexistent/docker.sock"}
    return subprocess.run([VLMHUB, *args], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=timeout, check=False, stdin=subprocess.DEVNULL)


def line_with(out: str, text: str) -> str:
    return next(ln for ln in out.splitlines() if text in ln)


def test_models_piped_prints_whole_names_and_json(tmp_path: Path) -> None:
    shown = run(tmp_path, "models")
    assert shown.returncode == 0, shown.stderr
    # `vlmhub models | grep phi3-vision`: the whole row, its source and image uncut
    row = line_with(shown.stdout, "phi3-vision")
    assert "vlmhub_plugins.phi3_vision:plugin" in row and "vllm/vllm-openai:v0.32.0" in row
    assert "…" not in shown.stdout
    as_json = run(tmp_path, "models", "--json")
    assert as_json.returncode == 0, as_json.stderr
    models = {m["name"]: m for m in json.loads(as_json.stdout)}
    assert {"dots-ocr", "phi3-vision", "qwen3-vl"} <= set(models)
    assert models["dots-ocr"]["hf_repo"] == "rednote-hilab/dots.ocr"
    assert models["qwen3-vl"]["variants"] == ["2b-fp8", "4b-fp8"]
    assert models["dots-ocr"]["vram_gib"] > 5 and models["dots-ocr"]["error"] is None


def test_plan_piped_keeps_each_row_whole_and_json_has_the_argv(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    shown = run(tmp_path, "plan", "--config", str(config))
    assert shown.returncode == 0, shown.stderr
    row = line_with(shown.stdout, LONG)  # name, budget and argv on one line
    assert f"vllm serve {STUB['hf_repo']} --served-model-name {LONG}" in row
    planned = json.loads(run(tmp_path, "plan", "--json", "--config", str(config)).stdout)
    assert planned["gpu"]["usable_gib"] > 7
    (m,) = planned["models"]
    assert m["name"] == LONG and m["budget_gib"] > 1
    assert m["argv"][:3] == ["vllm", "serve", STUB["hf_repo"]]
    assert planned["fits_together"] == [[LONG]]


def test_ps_and_health_piped_and_as_json(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    assert json.loads(run(tmp_path, "ps", "--json", "--config", str(config)).stdout) == []
    served = run(tmp_path, "serve", LONG, "--detach", "--config", str(config))
    assert served.returncode == 0, served.stderr
    try:
        ps = run(tmp_path, "ps", "--config", str(config))
        assert ps.returncode == 0, ps.stderr
        assert line_with(ps.stdout, LONG).split()[:3] == [LONG, "running", "process"]
        (engine,) = json.loads(run(tmp_path, "ps", "--json", "--config", str(config)).stdout)
        assert engine["name"] == LONG and engine["state"] == "running"
        assert engine["runtime"] == "process" and engine["healthy"] is True
        assert isinstance(engine["port"], int) and engine["vram_gib"] > 1
        assert engine["uptime_s"] >= 0
        health = run(tmp_path, "health", "--config", str(config))
        assert health.returncode == 0, health.stderr
        row = line_with(health.stdout, LONG)
        assert row.split()[0] == LONG and row.split()[3] == LONG  # NAME ... SERVES: whole
        checked = run(tmp_path, "health", "--json", "--config", str(config))
        assert checked.returncode == 0, checked.stderr
        (h,) = json.loads(checked.stdout)
        assert h == {"name": LONG, "url": f"http://127.0.0.1:{engine['port']}/v1",
                     "healthy": True, "serves": [LONG], "max_model_len": ["2048"]}
    finally:
        stopped = run(tmp_path, "stop", "--all", "--config", str(config))
    assert stopped.returncode == 0, stopped.stderr


def test_budgets_piped_and_as_json(tmp_path: Path) -> None:
    store = BudgetStore(tmp_path / "state" / "budgets.json")
    spec = Registry().specs()["qwen3-vl"]
    key = key_for(spec, Gpu(8.0, 0.0, None, "A GPU with a long marketing name 24GB", "config"))
    store.record(key, {"model_load_gib": 4.457, "peak_activation_gib": 0.8,
                       "kv_cache_gib": 2.0, "kv_cache_tokens": 18720},
                 datetime(2026, 12, 2, tzinfo=UTC))
    shown = run(tmp_path, "budgets")
    assert shown.returncode == 0, shown.stderr
    row = line_with(shown.stdout, "qwen3-vl")
    assert "A GPU with a long marketing name 24GB" in row and "4.46" in row
    data = json.loads(run(tmp_path, "budgets", "show", "--json").stdout)
    (entry,) = data["budgets"]
    assert entry["key"]["model"] == "qwen3-vl" and entry["facts"]["model_load_gib"] == 4.457
    assert data["path"] == str(store.path)


def test_route_summary_on_a_pipe_keeps_whole_names(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The router's start-up table, printed by a console that writes to a file."""
    monkeypatch.delenv("COLUMNS", raising=False)
    out = io.StringIO()
    monkeypatch.setattr(route_cli, "console", PipeConsole(file=out))
    config = load_config(write_config(tmp_path)).config
    info = ReplicaInfo(LONG, "stopped", "", "process", None, 1.25, 0, 0, False, False, None,
                       None, None, aliases=("another-alias-that-is-long-enough-to-matter",))
    route_cli.print_summary("http://127.0.0.1:8080", config, Gpu(8.0), [info])
    row = line_with(out.getvalue(), LONG)
    assert "another-alias-that-is-long-enough-to-matter" in row and "1.25" in row


def test_a_pipe_console_is_wide_and_a_terminal_or_columns_keep_their_width(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("COLUMNS", raising=False)
    assert PipeConsole(file=io.StringIO()).width == PIPE_WIDTH
    assert PipeConsole(file=io.StringIO(), width=90).width == 90
    assert PipeConsole(file=io.StringIO(), force_terminal=True, width=100).width == 100
    monkeypatch.setenv("COLUMNS", "120")
    assert PipeConsole(file=io.StringIO()).width == 120
