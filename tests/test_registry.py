"""The plugin registry: built-in, third-party and broken plugins, all through entry points."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from vlmhub.config.registry import Registry
from vlmhub.spec import ModelSpec, VllmOptions, VramModel

REPO = Path(__file__).resolve().parent.parent


def make_dist(root: Path, name: str, entry_points: str, module: str | None = None) -> None:
    info = root / f"{name}-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[vlmhub.models]\n{entry_points}\n")
    if module is not None:
        (root / f"{name}.py").write_text(module)


def test_example_third_party_plugin_is_loaded_from_its_distribution() -> None:
    reg = Registry()
    info = reg.plugins.get("smolvlm")
    assert info is not None, "install examples/vlmhub-example-plugin (the test command does)"
    assert info.ok and info.spec is not None
    assert info.source == "vlmhub_example_plugin:plugin (vlmhub-example-plugin 0.1.0)"
    assert reg.plugins["dots-ocr"].source.endswith("(vlmhub 0.1.0)")


def test_broken_plugins_are_reported_and_do_not_break_others(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_dist(tmp_path, "missing_mod", "ghost = no_such_module_anywhere:plugin")
    make_dist(
        tmp_path,
        "raising_mod",
        "boom = raising_mod:plugin",
        "def plugin():\n    raise RuntimeError('needs a GPU library')\n",
    )
    make_dist(
        tmp_path,
        "wrong_mod",
        "wrongname = wrong_mod:plugin",
        "from vlmhub.spec import ModelSpec\n"
        "def plugin():\n    return ModelSpec(name='other', hf_repo='a/b', "
        "options={'max_model_len': 8}, vram={'weights_gib': 1, 'kv_bytes_per_token': 8})\n",
    )
    make_dist(
        tmp_path,
        "bad_spec",
        "badspec = bad_spec:plugin",
        "from vlmhub.spec import ModelSpec\n"
        "def plugin():\n    return ModelSpec(name='badspec', hf_repo='a/b', image='x:latest',"
        " options={'max_model_len': 8}, vram={'weights_gib': 1, 'kv_bytes_per_token': 8})\n",
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    reg = Registry()
    errors = reg.errors()
    assert "No module named 'no_such_module_anywhere'" in errors["ghost"]
    assert errors["boom"] == "RuntimeError: needs a GPU library"
    assert "named 'wrongname' but its spec is named 'other'" in errors["wrongname"]
    assert "image" in errors["badspec"] and "pinned" in errors["badspec"]
    assert {"dots-ocr", "qwen3-vl", "phi3-vision"} <= set(reg.specs())


def test_models_cli_shows_load_errors(tmp_path: Path) -> None:
    make_dist(
        tmp_path,
        "raising_mod",
        "boom = raising_mod:plugin",
        "def plugin():\n    raise RuntimeError('needs a GPU library')\n",
    )
    res = subprocess.run(
        [sys.executable, "-m", "vlmhub", "models"],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PYTHONPATH": str(tmp_path), "COLUMNS": "250", "PATH": "/usr/bin:/bin"},
    )
    assert res.returncode == 1
    assert "boom" in res.stdout and "needs a GPU library" in res.stdout
    assert "dots-ocr" in res.stdout


def test_registry_from_specs_uses_stevedore_test_instance() -> None:
    spec = ModelSpec(
        name="mem",
        hf_repo="a/b",
        options=VllmOptions(max_model_len=64),
        vram=VramModel(weights_gib=1, kv_bytes_per_token=64),
    )
    reg = Registry.from_specs([spec])
    assert reg.specs() == {"mem": spec}
    assert reg.plugins["mem"].source == "(in memory)"
