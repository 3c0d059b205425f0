"""vlmhub installed from its wheel, run in an empty folder (issue 21 item 18).

The wheel is built from a copy of this tree and installed into a fresh venv (no deps: the
dependencies come from this venv's site-packages through a folder of links, without this
tree's vlmhub). With no models.yaml: without a GPU the headline `vlmhub serve dots-ocr` says
plainly that it needs one and how to try the demo (it used to say "demo.yaml: no model named
'dots-ocr'"), and the commands say they read the stand-in DEMO; with a (pretend) GPU every
command reads the built-in plugins (package data) and says so, `serve PLUGIN` serves it, and
`vlmhub init` writes a models.yaml for the card that the next command reads.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
SKIP = shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "__pycache__",
                              ".*_cache", ".hypothesis", "node_modules", "*.log")
SITE = Path(sysconfig.get_paths()["purelib"])


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The ``bin`` folder of a fresh venv with only the built wheel installed."""
    root = tmp_path_factory.mktemp("wheel")
    src = root / "src"
    shutil.copytree(REPO, src, ignore=SKIP, symlinks=True)
    pip = [sys.executable, "-m", "pip"]
    built = subprocess.run([*pip, "wheel", "--no-deps", "-q", "-w", str(root / "dist"), str(src)],
                           capture_output=True, text=True, timeout=600, check=False)
    assert built.returncode == 0, built.stdout + built.stderr
    (wheel,) = (root / "dist").glob("vlmhub-*.whl")
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True,
                   timeout=120)
    done = subprocess.run([*pip, "--python", str(venv / "bin" / "python"), "install", "-q",
                           "--no-deps", "--no-index", str(wheel)],
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    deps = root / "deps"  # this venv's packages, minus vlmhub itself and its editable hook
    deps.mkdir()
    for item in SITE.iterdir():
        if not item.name.startswith(("vlmhub", "__editable__", "_distutils_hack")) \
                and not item.name.endswith(".pth"):
            (deps / item.name).symlink_to(item)
    (site,) = (venv / "lib").glob("python3*/site-packages")
    (site / "deps.pth").write_text(f"{deps}\n")
    return venv / "bin"


def run(bin_dir: Path, cwd: Path, *args: str, gpu_gib: str | None = None
        ) -> subprocess.CompletedProcess[str]:
    home = cwd.parent / "home"
    home.mkdir(exist_ok=True)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(home), "COLUMNS": "250",
           "NO_COLOR": "1", "VLMHUB_STATE_DIR": str(cwd.parent / "state"), "LANG": "C.UTF-8"}
    if gpu_gib is not None:
        env["VLMHUB_PRETEND_GPU_GIB"] = gpu_gib
    return subprocess.run([str(bin_dir / "vlmhub"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120, check=False)


def empty_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "empty"
    folder.mkdir()
    return folder


def test_the_installed_wheel_ships_the_built_in_plugins_config(installed: Path) -> None:
    (site,) = (installed.parent / "lib").glob("python3*/site-packages")
    shipped = site / "vlmhub" / "examples" / "models.yaml"
    assert shipped.read_text() == (REPO / "models.yaml").read_text()  # the same content
    assert (site / "vlmhub" / "examples" / "demo.yaml").is_file()
    assert {"dots-ocr", "qwen3-vl"} <= set(yaml.safe_load(shipped.read_text())["models"])


def test_without_a_gpu_serve_plugin_says_it_needs_one_and_how_to_try_the_demo(
    installed: Path, tmp_path: Path,
) -> None:
    here = empty_folder(tmp_path)
    listed = run(installed, here, "models")
    assert listed.returncode == 0 and "dots-ocr" in listed.stdout, listed.stderr
    served = run(installed, here, "serve", "dots-ocr")
    assert served.returncode == 2
    assert "no model named" not in served.stderr
    assert "dots-ocr is a real model: it runs on an NVIDIA GPU, and none was found" in served.stderr
    assert "`vlmhub serve demo-ocr`" in served.stderr and "vlmhub init" in served.stderr
    plan = run(installed, here, "plan")
    assert plan.returncode == 0 and "demo-ocr" in plan.stdout
    assert "using the stand-in DEMO" in plan.stderr and "not real models" in plan.stderr
    refused = run(installed, here, "init")
    assert refused.returncode == 2 and "no NVIDIA GPU was found" in refused.stderr
    assert not (here / "models.yaml").exists()


def test_with_a_gpu_every_command_uses_the_built_in_plugins_and_init_writes_one(
    installed: Path, tmp_path: Path,
) -> None:
    here = empty_folder(tmp_path)
    plan = run(installed, here, "plan", gpu_gib="12")
    assert plan.returncode == 0, plan.stderr
    assert "using the built-in plugins" in plan.stderr
    assert "dots-ocr" in plan.stdout and "demo-ocr" not in plan.stdout
    # the headline command resolves the plugin and starts it (here vLLM is not installed, so
    # the start itself fails plainly: the config part is what this checks)
    served = run(installed, here, "serve", "dots-ocr", "--runtime", "process", gpu_gib="12")
    assert "no model named" not in served.stderr
    assert "Starting dots-ocr (process)" in served.stdout, served.stderr
    assert "cannot run 'vllm': not found on PATH" in served.stderr
    # a plugin the built-in config does not list is served at its defaults
    other = run(installed, here, "serve", "phi3-vision", "--runtime", "process", gpu_gib="12")
    assert "Starting phi3-vision (process)" in other.stdout, other.stderr

    made = run(installed, here, "init", gpu_gib="12")
    assert made.returncode == 0, made.stderr
    written = (here / "models.yaml").read_text()
    assert written.startswith("# vlmhub configuration for Pretend GPU")
    assert "dots-ocr:" in written and yaml.safe_load(written)["gpu"]["total_gib"] == 12
    again = run(installed, here, "plan", gpu_gib="12")
    assert again.returncode == 0 and "built-in" not in again.stderr  # ./models.yaml now
    assert "config: models.yaml" in again.stdout
    kept = run(installed, here, "init", gpu_gib="12")
    assert kept.returncode == 2 and "not replacing it" in kept.stderr


def test_the_shipped_copy_matches_models_yaml() -> None:
    """vlmhub/examples/models.yaml is the package-data copy of ./models.yaml: keep them equal."""
    assert (REPO / "vlmhub" / "examples" / "models.yaml").read_text() == \
        (REPO / "models.yaml").read_text()
