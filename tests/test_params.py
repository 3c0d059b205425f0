"""Per-model request parameter rules (issue 26 item 4): ``params: {drop, set, defaults}`` on a
models.yaml entry, checked with file:line errors, applied to JSON bodies by the router before
they reach the engine, and shown by ``vlmhub models``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import openai
import pytest
import yaml
from supervisor_support import build, model, routed

from vlmhub.config.locate import ConfigError
from vlmhub.config.params import ParamRules
from vlmhub.config.schema import load_config
from vlmhub.router.params import apply_rules

VLMHUB = str(Path(sys.executable).parent / "vlmhub")
CHAT: list[Any] = [{"role": "user", "content": "one two three"}]


def test_drop_set_and_defaults() -> None:
    rules = ParamRules(drop=["temperature", "top_p"], set={"max_tokens": 512},
                       defaults={"seed": 7, "n": 1})
    payload = {"model": "m", "temperature": 0.7, "max_tokens": 9000, "n": 3, "stream": True}
    out = apply_rules(rules, payload)
    assert out is not None
    new, raw = out
    assert new == {"model": "m", "max_tokens": 512, "n": 3, "stream": True, "seed": 7}
    assert json.loads(raw) == new
    assert payload["temperature"] == 0.7  # the client's payload is not changed in place


def test_a_body_the_rules_do_not_change_keeps_its_bytes() -> None:
    rules = ParamRules(drop=["temperature"], set={"max_tokens": 5}, defaults={"seed": 1})
    assert apply_rules(rules, {"model": "m", "max_tokens": 5, "seed": 3}) is None
    assert not ParamRules()  # empty rules are no rules: the router skips them


def write(tmp_path: Path, params: Any) -> Path:
    path = tmp_path / "models.yaml"
    path.write_text(yaml.safe_dump({"models": {"ocr": {
        "url": "http://127.0.0.1:9", "params": params}}}, sort_keys=False))
    return path


@pytest.mark.parametrize(("params", "says"), [
    ({"set": {"model": "other"}}, "may not change model"),
    ({"drop": ["temperature"], "set": {"temperature": 0}}, "more than one of drop, set"),
    ({"drop": [""]}, "empty parameter name"),
    ({"sett": {"max_tokens": 1}}, "sett"),
    ({"drop": "temperature"}, "params.drop"),
])
def test_bad_rules_are_located_errors(tmp_path: Path, params: Any, says: str) -> None:
    path = write(tmp_path, params)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    text = str(err.value)
    assert f"{path}:" in text and "models.ocr.params" in text and says in text, text


async def test_the_router_applies_the_rules_before_the_engine(tmp_path: Path) -> None:
    """Through the real router and stand-in engines: the stand-in answers as many tokens as
    ``max_completion_tokens`` (else ``max_tokens``) asks, so the rules show in the answer."""
    pinned = model(1.0, params={"set": {"max_tokens": 3}})
    filled = model(1.0, params={"drop": ["max_completion_tokens"],
                                "defaults": {"max_tokens": 2}})
    sup, _, _ = build(tmp_path, {"pinned": pinned, "filled": filled, "plain": model(1.0)})
    async with routed(sup) as base:
        client = openai.AsyncOpenAI(base_url=base + "/v1", api_key="x", max_retries=0)
        out = await client.chat.completions.create(model="pinned", messages=CHAT,
                                                   max_tokens=40, temperature=0.7)
        assert out.usage is not None and out.usage.completion_tokens == 3
        out = await client.chat.completions.create(model="filled", messages=CHAT,
                                                   max_completion_tokens=40)
        assert out.usage is not None and out.usage.completion_tokens == 2
        out = await client.chat.completions.create(model="plain", messages=CHAT, max_tokens=6)
        assert out.usage is not None and out.usage.completion_tokens == 6


def test_vlmhub_models_lists_the_rules(tmp_path: Path) -> None:
    path = write(tmp_path, {"drop": ["temperature"], "set": {"max_tokens": 512}})
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    env |= {"VLMHUB_STATE_DIR": str(tmp_path / "state"), "NO_COLOR": "1"}
    shown = subprocess.run([VLMHUB, "models", "--config", str(path)], env=env, cwd=tmp_path,
                           capture_output=True, text=True, timeout=60, check=False,
                           stdin=subprocess.DEVNULL)
    assert shown.returncode == 0, shown.stderr
    line = next(ln for ln in shown.stdout.splitlines() if "params of ocr" in ln)
    assert "drop temperature" in line and "set max_tokens=512" in line
