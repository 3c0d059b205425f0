"""models.yaml: schema, located errors (file, line, field, fix), resolution and the CLI."""

from __future__ import annotations

import itertools
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from vlmhub.config.locate import ConfigError
from vlmhub.config.registry import Registry
from vlmhub.config.schema import DEMO_CONFIG, find_config, load_config, resolve
from vlmhub.sizing.vram import Gpu

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


def run_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vlmhub", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
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
    from vlmhub.config.schema import RuntimeConfig

    assert not RuntimeConfig().model_as_flag  # docker: the image's `vllm serve <model>`
    assert not RuntimeConfig(kind="process").model_as_flag  # `vllm serve`
    api = RuntimeConfig(
        kind="process", process_argv=["python", "-m", "vllm.entrypoints.openai.api_server"]
    )
    assert api.model_as_flag
    assert RuntimeConfig(kind="process", model_arg="flag").model_as_flag


# --- issue 14 item 11: YAML that used to give a traceback (or run for minutes) -------------


def load_problems(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as err:
        load_config(path)
    return err.value.problems


def bomb(levels: int, width: int = 9) -> str:
    """``levels`` anchors, each a list of ``width`` aliases of the previous one."""
    names = [f"l{i}" for i in range(levels + 1)]
    lines = [f"{names[0]}: &{names[0]} [{', '.join(['x'] * width)}]"]
    for prev, name in itertools.pairwise(names):
        lines.append(f"{name}: &{name} [{', '.join(['*' + prev] * width)}]")
    return "\n".join([*lines, f"models: *{names[-1]}", ""])


# YAML that gave a traceback (RecursionError, ReaderError, UnicodeDecodeError, ValueError).
UNREADABLE = [
    (b"gpu: {}\nmodels: &a [*a]\n", 2, "YAML", "recursive alias"),
    (b"gpu: {}\nmodels: &a {x: {y: *a}}\n", 2, "YAML", "recursive alias"),
    (b"gpu:\n  total_gib: 8\x00\n", 2, "YAML", "U+0000 is not allowed"),
    (b"gpu: {}\nmodels:\n  caf\xe9: {}\n", 3, "YAML", "not UTF-8 text (byte 0xe9"),
    (b"models:\n  dots-ocr:\n    ttl: 2020-99-99\n", 3, "YAML", "cannot read the value"),
    (b"models:\n  dots-ocr:\n    ttl: " + b"9" * 5000 + b"\n", 3, "YAML", "cannot read the value"),
    (b"models: " + b"[" * 3000 + b"]" * 3000 + b"\n", 1, "YAML", "nested more than 64 levels"),
]


def test_alias_bomb_is_refused_fast_by_config_check(tmp_path: Path) -> None:
    p = tmp_path / "models.yaml"
    p.write_text(bomb(9))  # 9**10 values once expanded: it ran for minutes, growing memory
    res = run_cli("config", "check", "--config", str(p), timeout=20)
    assert res.returncode == 2
    assert f"{p}:" in res.stderr and "more than 20000 values" in res.stderr
    assert "Traceback" not in res.stderr + res.stdout


def test_aliases_and_merge_keys_that_fit_still_load(tmp_path: Path) -> None:
    p = write(
        tmp_path,
        """
        models:
          dots-ocr:
            env: &shared {A: "1", B: "2"}
            ttl: 60
          qwen3-vl:
            env: {<<: *shared, B: "3"}
            aliases: &names [qwen-a, qwen-b]
          phi3-vision:
            env: *shared
    """,
    )
    config = load_config(p).config
    assert config.models["qwen3-vl"].env == {"A": "1", "B": "3"}
    assert config.models["phi3-vision"].env == {"A": "1", "B": "2"}
    p.write_text(bomb(2).replace("models: *l2", "gpu: {total_gib: 8}"))
    with pytest.raises(ConfigError, match="unknown key"):  # 9**3 values: read, then validated
        load_config(p)


# --- issue 14 item 12: accepted but wrong ---------------------------------------------------


def test_duplicate_keys_are_refused_naming_both_lines(tmp_path: Path) -> None:
    p = write(
        tmp_path,
        """
        gpu:
          total_gib: 8
        models:
          dots-ocr:
            ttl: 60
            ttl: 600
        gpu:
          total_gib: 80
    """,
    )
    msgs = load_problems(p)
    assert len(msgs) == 2
    assert msgs[0].startswith(f"{p}:6: models.dots-ocr.ttl: duplicate key (first on line 5)")
    assert "Fix: keep the one `ttl:` you mean and delete the other" in msgs[0]
    assert msgs[1].startswith(f"{p}:7: gpu: duplicate key (first on line 1)")
    assert "Fix: merge the two `gpu:` blocks into one" in msgs[1]


# Values that were accepted although wrong.
WRONG = [
    (b"runtime:\n  port_range: [200, 100]\n", 2, "runtime.port_range", "1 <= low <= high"),
    (b"runtime:\n  port_range: [0, 0]\n", 2, "runtime.port_range", "1 <= low <= high"),
    (b"runtime:\n  port_range: [-5, 3]\n", 2, "runtime.port_range", "1 <= low <= high"),
    (b"runtime:\n  port_range: [1, 70000]\n", 2, "runtime.port_range", "1 <= low <= high"),
    (b"runtime:\n  port_range: [8100]\n", 2, "runtime.port_range", "1 <= low <= high"),
    (b"gpu:\n  reserve_gib: 1\n  total_gib: .inf\n", 3, "gpu.total_gib", "finite number"),
    (b"router:\n  drain_timeout_s: .inf\n", 2, "router.drain_timeout_s", "finite number"),
    (b"router:\n  queue_timeout_s: .nan\n", 2, "router.queue_timeout_s", "finite number"),
    (b"router:\n  health_interval_s: 'inf'\n", 2, "router.health_interval_s", "finite"),
    (b"models:\n  dots-ocr:\n    ttl: .inf\n", 3, "models.dots-ocr.ttl", "finite number"),
    (b"router:\n  port: 0\n", 2, "router.port", "greater than or equal to 1"),
    (b"router:\n  api_keys: [sk-1, '']\n", 2, "router.api_keys.1", "an empty key"),
    (b"router:\n  admin_key: ''\n", 2, "router.admin_key", "admin API (/api/*) without"),
    (b"models:\n  x:\n    url: ftp://host/v1\n", 3, "models.x.url", "http:// or https://"),
    (b"models:\n  x:\n    url: 127.0.0.1:8000\n", 3, "models.x.url", "http:// or https://"),
    (b"models:\n  x:\n    url: 'http://'\n", 3, "models.x.url", "with a host"),
]


@pytest.mark.parametrize(("data", "line", "field", "problem"), [*UNREADABLE, *WRONG])
def test_bad_files_are_refused_with_line_field_and_fix(
    tmp_path: Path, data: bytes, line: int, field: str, problem: str
) -> None:
    p = tmp_path / "models.yaml"
    p.write_bytes(data)
    (msg,) = load_problems(p)
    assert msg.startswith(f"{p}:{line}: {field}: ") and problem in msg and " Fix: " in msg


def test_empty_admin_key_fix_says_what_to_do(tmp_path: Path) -> None:
    p = write(tmp_path, "router:\n  admin_key: ''\n")
    (msg,) = load_problems(p)
    assert "Fix: remove the line (then only loopback clients may use /api/*), or set a real" in msg


def test_non_finite_number_in_an_inline_spec_is_located(tmp_path: Path) -> None:
    p = write(
        tmp_path,
        """
        models:
          mine:
            spec:
              hf_repo: me/model
              image: me/engine:1
              options: {max_model_len: 2048}
              vram: {weights_gib: 1, kv_bytes_per_token: 1024, activation_gib: .inf}
    """,
    )
    (msg,) = problems(p)
    assert msg.startswith(f"{p}:7: models.mine.spec.vram.activation_gib: inf is not a finite")


def test_keys_are_never_echoed_in_errors(tmp_path: Path) -> None:
    p = write(tmp_path, "router:\n  admin_key: 987654321\n  api_keys: [sk-ok, 123456789]\n")
    msgs = load_problems(p)
    assert len(msgs) == 2 and not any("987654321" in m or "123456789" in m for m in msgs)


@pytest.mark.parametrize(
    ("data", "line"),
    [
        (b"models: &a [*a]\n", 1),
        (b"gpu:\n  total_gib: 8\n\x00\n", 3),
        (b"models:\n  \xff\xfe: {}\n", 2),
        (b"gpu:\n  total_gib: 8\ngpu:\n  total_gib: 80\n", 3),
        (b"router:\n  admin_key: ''\n", 2),
        (b"runtime:\n  port_range: [200, 100]\n", 2),
    ],
)
def test_config_check_cli_refuses_bad_files_without_traceback(
    tmp_path: Path, data: bytes, line: int
) -> None:
    p = tmp_path / "models.yaml"
    p.write_bytes(data)
    res = run_cli("config", "check", "--config", str(p), "--gpu-gib", "12")
    assert res.returncode == 2, res.stdout
    assert f"{p}:{line}: " in res.stderr and "Fix: " in res.stderr
    assert "Traceback" not in res.stderr + res.stdout
