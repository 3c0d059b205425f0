"""models.yaml: schema, located errors (file, line, field, fix), resolution and the CLI."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from vlmhub.config import DEMO_CONFIG, find_config, load_config, resolve
from vlmhub.locate import ConfigError
from vlmhub.registry import Registry
from vlmhub.vram import Gpu

PLUGINS = Registry().specs()
GPU12 = Gpu(12.0, 0.5)
REPO = Path(__file__).resolve().parent.parent


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "models.yaml"
    p.write_text(textwrap.dedent(text).lstrip())
    return p


def problems(path: Path, gpu: Gpu = GPU12) -> list[str]:
    with pytest.raises(ConfigError) as err:
        resolve(load_config(path), PLUGINS, gpu)
    return err.value.problems


def test_repo_models_yaml_and_demo_are_valid() -> None:
    for path in (REPO / "models.yaml", REPO / "examples" / "demo.yaml", DEMO_CONFIG):
        loaded = load_config(path)
        models = resolve(loaded, PLUGINS, Gpu(loaded.config.gpu.total_gib or 12, 0.5))
        assert models


def test_unknown_key_names_line_field_and_suggestion(tmp_path: Path) -> None:
    p = write(
        tmp_path,
        """
        gpu:
          total_gib: 12
        models:
          dots-ocr:
            preloadd: true
    """,
    )
    (msg,) = problems(p)
    assert msg.startswith(f"{p}:5: models.dots-ocr.preloadd: unknown key.")
    assert "did you mean 'preload'?" in msg


def test_wrong_type_names_line_and_fix(tmp_path: Path) -> None:
    p = write(
        tmp_path,
        """
        router:
          port: eighty
        models: {}
    """,
    )
    (msg,) = problems(p)
    assert f"{p}:2: router.port:" in msg and "'eighty'" in msg and "Fix: write a number" in msg


def test_yaml_syntax_error_has_a_line(tmp_path: Path) -> None:
    p = write(
        tmp_path,
        """
        models:
          dots-ocr:
            ttl: [1, 2
        gpu: {}
    """,
    )
    (msg,) = problems(p)
    assert msg.startswith(f"{p}:") and "YAML syntax" in msg and "Fix:" in msg


def test_unknown_plugin_lists_known_ones(tmp_path: Path) -> None:
    p = write(
        tmp_path,
        """
        models:
          ocr:
            plugin: dots_ocr
    """,
    )
    (msg,) = problems(p)
    assert f"{p}:3: models.ocr.plugin: no model plugin named 'dots_ocr'" in msg
    assert "dots-ocr" in msg and "phi3-vision" in msg


def test_unknown_variant_and_too_long_context_are_located(tmp_path: Path) -> None:
    p = write(
        tmp_path,
        """
        models:
          qwen3-vl:
            variant: 8b
          phi3-vision:
            max_model_len: 65536
    """,
    )
    msgs = problems(p)
    assert any(m.startswith(f"{p}:3: models.qwen3-vl.variant:") and "4b-fp8" in m for m in msgs)
    long = [m for m in msgs if "phi3-vision.max_model_len" in m]
    assert long and f"{p}:5:" in long[0] and "set max_model_len to" in long[0]


def test_inline_spec_errors_point_inside_the_spec(tmp_path: Path) -> None:
    p = write(
        tmp_path,
        """
        models:
          mine:
            spec:
              hf_repo: me/model
              image: me/engine:latest
              options: {max_model_len: 2048}
              vram: {weights_gib: 1, kv_bytes_per_token: 1024}
    """,
    )
    (msg,) = problems(p)
    assert f"{p}:5: models.mine.spec.image:" in msg and "never 'latest'" in msg


def test_duplicate_alias_is_an_error(tmp_path: Path) -> None:
    p = write(
        tmp_path,
        """
        models:
          dots-ocr: {}
          other:
            plugin: qwen3-vl
            aliases: [dots.ocr]
    """,
    )
    (msg,) = problems(p)
    assert "'dots.ocr'" in msg and "also used by 'dots-ocr'" in msg


def test_overrides_and_variant_resolve(tmp_path: Path) -> None:
    p = write(
        tmp_path,
        """
        models:
          qwen-small:
            plugin: qwen3-vl
            max_model_len: 8192
            pinned: true
            ttl: 60
          qwen-4b:
            plugin: qwen3-vl
            variant: 4b-fp8
          seed-container:
            url: http://127.0.0.1:8000
            served_model_name: model
    """,
    )
    got = {m.name: m for m in resolve(load_config(p), PLUGINS, GPU12)}
    assert got["qwen-small"].spec is not None
    assert got["qwen-small"].spec.options.max_model_len == 8192
    assert got["qwen-small"].entry.pinned and got["qwen-small"].entry.ttl == 60
    assert got["qwen-4b"].spec is not None and got["qwen-4b"].spec.name == "qwen-4b"
    assert got["qwen-4b"].spec.hf_repo.endswith("FP8")
    assert got["seed-container"].external and got["seed-container"].api_name == "model"


def test_config_search_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert find_config(None) == DEMO_CONFIG
    user = tmp_path / "home" / ".config" / "vlmhub" / "models.yaml"
    user.parent.mkdir(parents=True)
    user.write_text("models: {}\n")
    assert find_config(None) == user
    (tmp_path / "models.yaml").write_text("models: {}\n")
    assert find_config(None) == Path("models.yaml")
    assert find_config(Path("x.yaml")) == Path("x.yaml")


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vlmhub", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={"COLUMNS": "200", "PATH": "/usr/bin:/bin"},
    )


def test_config_check_cli_ok_and_error_without_traceback(tmp_path: Path) -> None:
    ok = run_cli("config", "check", "--config", str(REPO / "models.yaml"))
    assert ok.returncode == 0, ok.stderr
    assert "ok" in ok.stdout and "3 model(s)" in ok.stdout
    bad = write(tmp_path, "models:\n  dots-ocr:\n    ttl: soon\n")
    res = run_cli("config", "check", "--config", str(bad))
    assert res.returncode == 2
    assert f"{bad}:3: models.dots-ocr.ttl" in res.stderr
    assert "Traceback" not in res.stderr + res.stdout


def test_plan_cli_shows_argv_and_fitting_sets() -> None:
    res = run_cli("plan", "--config", str(REPO / "models.yaml"), "--gpu-gib", "24")
    assert res.returncode == 0, res.stderr
    # estimated budgets: vLLM profiles, so the fraction only (measured ones add the KV bytes)
    assert "--gpu-memory-utilization" in res.stdout and "estimated" in res.stdout
    assert "dots-ocr + qwen3-vl" in res.stdout
    res12 = run_cli("plan", "--config", str(REPO / "models.yaml"), "--gpu-gib", "12")
    # models.yaml keeps dots-ocr and qwen3-vl together: on 12 GB with lower caps
    assert "dots-ocr + qwen3-vl" in res12.stdout.split("What fits together")[1].split("\n")[1]


def test_models_cli_lists_sources_and_budgets() -> None:
    res = run_cli("models")
    assert res.returncode == 0, res.stderr
    for name in ("dots-ocr", "qwen3-vl", "phi3-vision"):
        assert name in res.stdout
    assert "vlmhub_plugins.dots_ocr:plugin" in res.stdout and "GiB" in res.stdout


def test_model_argument_follows_the_engine_command(tmp_path: Path) -> None:
    from vlmhub.config import RuntimeConfig

    assert not RuntimeConfig().model_as_flag  # docker: the image's `vllm serve <model>`
    assert not RuntimeConfig(kind="process").model_as_flag  # `vllm serve`
    api = RuntimeConfig(
        kind="process", process_argv=["python", "-m", "vllm.entrypoints.openai.api_server"]
    )
    assert api.model_as_flag
    assert RuntimeConfig(kind="process", model_arg="flag").model_as_flag
