"""Host-side access to the separate vLLM CPU venv (made by scripts/vllm-cpu-env.sh).

vlmhub never imports vLLM. Whatever needs the real vLLM runs as a script in that venv's
python: :mod:`vlmhub.engines.vllm_tools.parse_args` (check engine flags against vLLM's own parser),
:mod:`vlmhub.engines.vllm_tools.make_tiny_model` (a tiny random text model to serve in tests) and
``vllm_tools.make_tiny_vlm`` (a tiny random model of each built-in VLM architecture).

Finding the venv: ``$VLMHUB_VLLM_VENV`` when set (used as is if its python exists), else
``${VLMHUB_CACHE:-~/.cache/vlmhub}/vllm-cpu-${VLLM_CPU_VERSION:-0.32.0}``, which counts only
once the script has written its current stamp file (:data:`STAMP_FILE`; an older stamp means
a venv without torchvision, which the script upgrades in place).

Every function here blocks (it runs a subprocess); none is meant to be called concurrently on
the same destination, though a model build that loses a race keeps the winner's folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from vlmhub.engines.vllm_tools import make_tiny_vlm as _vlm_tool

DEFAULT_VLLM_CPU_VERSION = "0.32.0"
STAMP_FILE = ".vlmhub-ready-2"  # 2: torchvision importable (scripts/vllm-cpu-env.sh)
TOOLS_DIR = Path(__file__).resolve().parent / "vllm_tools"
PARSE_ARGS_SCRIPT = TOOLS_DIR / "parse_args.py"
MAKE_TINY_MODEL_SCRIPT = TOOLS_DIR / "make_tiny_model.py"
MAKE_TINY_VLM_SCRIPT = TOOLS_DIR / "make_tiny_vlm.py"
TINY_VLM_ARCHS = _vlm_tool.ARCHS  # qwen2.5-vl, qwen3-vl, dots-ocr, phi3-vision


class VllmEnvError(RuntimeError):
    """The vLLM venv is missing, or a tool script run in it failed."""


def vllm_venv() -> Path | None:
    """The vLLM venv directory, or None when it is not (completely) installed."""
    explicit = os.environ.get("VLMHUB_VLLM_VENV")
    if explicit:
        venv = Path(explicit).expanduser()
        return venv if _python_in(venv).is_file() else None
    cache = Path(os.environ.get("VLMHUB_CACHE") or Path.home() / ".cache" / "vlmhub")
    version = os.environ.get("VLLM_CPU_VERSION") or DEFAULT_VLLM_CPU_VERSION
    venv = cache.expanduser() / f"vllm-cpu-{version}"
    if (venv / STAMP_FILE).is_file() and _python_in(venv).is_file():
        return venv
    return None


def _python_in(venv: Path) -> Path:
    return venv / ("Scripts/python.exe" if sys.platform == "win32" else "bin/python")


def vllm_python() -> Path | None:
    """The vLLM venv's python, or None when the venv is missing."""
    venv = vllm_venv()
    return _python_in(venv) if venv is not None else None


def _require_python() -> Path:
    python = vllm_python()
    if python is None:
        raise VllmEnvError(
            "the vLLM CPU venv is missing: run scripts/vllm-cpu-env.sh "
            "(or set VLMHUB_VLLM_VENV to a venv with vLLM installed)"
        )
    return python


def tool_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for the tool scripts and a CPU vLLM server: offline, and without this
    process's PYTHONPATH/venv leaking into the other venv."""
    env = {
        k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")
    }
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    env.setdefault("VLLM_NO_USAGE_STATS", "1")
    env.setdefault("DO_NOT_TRACK", "1")
    if extra:
        env.update(extra)
    return env


def _run_tool(script: Path, args: Sequence[str], *, stdin: str | None, timeout: float) -> str:
    python = _require_python()
    try:
        proc = subprocess.run(
            [str(python), str(script), *args],
            input=stdin,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=tool_env(),
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise VllmEnvError(f"{script.name} timed out after {timeout:g} s") from exc
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or "").strip().splitlines()[-15:])
        raise VllmEnvError(
            f"{script.name} failed (exit {proc.returncode}): {proc.stdout.strip()[-500:]}\n{tail}"
        )
    return proc.stdout


# --- flag validation ------------------------------------------------------------------------


@dataclass(frozen=True)
class ParseReport:
    vllm_version: str
    parser: str
    model_arg: str
    results: dict[str, str | None]
    warnings: dict[str, list[str]] = field(default_factory=dict)


_argv_cache: dict[tuple[str, tuple[str, ...]], tuple[str | None, list[str]]] = {}
_cache_meta: dict[str, tuple[str, str, str]] = {}


def validate_argv_report(
    argvs: Mapping[str, Sequence[str]], *, timeout: float = 300.0
) -> ParseReport:
    """Parse each argv (the flags after ``vllm serve <model>``) with the installed vLLM's
    real parser, in one run of the vLLM venv's python. Results are cached per argv."""
    python = str(_require_python())
    todo = {
        key: list(argv) for key, argv in argvs.items() if (python, tuple(argv)) not in _argv_cache
    }
    if todo or python not in _cache_meta:
        out = _run_tool(PARSE_ARGS_SCRIPT, [], stdin=json.dumps(todo), timeout=timeout)
        try:
            data = json.loads(out.strip().splitlines()[-1])
        except (ValueError, IndexError) as exc:
            raise VllmEnvError(f"parse_args.py printed no JSON: {out[-500:]!r}") from exc
        _cache_meta[python] = (data["vllm_version"], data["parser"], data["model_arg"])
        for key, argv in todo.items():
            _argv_cache[(python, tuple(argv))] = (
                data["results"][key],
                list(data.get("warnings", {}).get(key, [])),
            )
    version, parser, model_arg = _cache_meta[python]
    results: dict[str, str | None] = {}
    warnings: dict[str, list[str]] = {}
    for key, seq in argvs.items():
        error, warns = _argv_cache[(python, tuple(seq))]
        results[key] = error
        if warns:
            warnings[key] = list(warns)
    return ParseReport(version, parser, model_arg, results, warnings)


def validate_argv(
    argvs: Mapping[str, Sequence[str]], *, timeout: float = 300.0
) -> dict[str, str | None]:
    """Per key: None if vLLM's parser accepts the argv, else the parser's error message
    (e.g. ``"unrecognized arguments: --disable-log-requests"``). Raises VllmEnvError when
    the vLLM venv is missing or the parser cannot be built."""
    return validate_argv_report(argvs, timeout=timeout).results


# --- tiny models ----------------------------------------------------------------------------


def _tiny_model_complete(dest: Path) -> bool:
    return (dest / "config.json").is_file() and (dest / "model.safetensors").is_file()


def make_tiny_model(
    dest: Path, *, seed: int, name: str, dtype: str = "bfloat16", timeout: float = 300.0
) -> Path:
    """Write (once) a tiny random Qwen2 model with its own tokenizer and chat template into
    ``dest``; returns ``dest``. An existing complete model dir is reused as is."""
    dest = Path(dest).expanduser().resolve()
    if not _tiny_model_complete(dest):
        _run_tool(
            MAKE_TINY_MODEL_SCRIPT,
            [str(dest), "--seed", str(seed), "--name", name, "--dtype", dtype],
            stdin=None,
            timeout=timeout,
        )
        if not _tiny_model_complete(dest):
            raise VllmEnvError(f"make_tiny_model.py left no model in {dest}")
    return dest


def tiny_models_dir() -> Path:
    """``${VLMHUB_CACHE:-~/.cache/vlmhub}/tiny-models``: generated models kept between runs."""
    cache = Path(os.environ.get("VLMHUB_CACHE") or Path.home() / ".cache" / "vlmhub")
    return cache.expanduser() / "tiny-models"


def tiny_vlm_version(arch: str, *, seed: int = 0) -> str:
    """12 hex digits naming one build of a tiny VLM: the generator's sources (so that a change
    to them makes a new model), the architecture, the seed, and the venv's vLLM and
    transformers versions (they decide what a saved folder looks like)."""
    if arch not in TINY_VLM_ARCHS:
        raise ValueError(f"unknown tiny VLM architecture {arch!r}; one of {TINY_VLM_ARCHS}")
    digest = hashlib.sha256()
    for source in sorted(TOOLS_DIR.glob("*.py")):
        if source.name.startswith(("make_tiny_", "hf_")):
            digest.update(source.name.encode() + b"\0" + source.read_bytes() + b"\0")
    versions = (installed_vllm_version(), _installed_version("transformers"))
    digest.update(json.dumps([arch, seed, *versions]).encode())
    return digest.hexdigest()[:12]


def tiny_vlm_dir(arch: str, *, seed: int = 0) -> Path:
    """Where :func:`make_tiny_vlm` keeps ``arch``'s model by default:
    ``tiny-models/<arch>-s<seed>-<version>`` under :func:`tiny_models_dir`."""
    return tiny_models_dir() / f"{arch}-s{seed}-{tiny_vlm_version(arch, seed=seed)}"


def make_tiny_vlm(
    arch: str, dest: Path | None = None, *, seed: int = 0, timeout: float = 900.0
) -> Path:
    """A tiny random-weight model of ``arch`` (one of :data:`TINY_VLM_ARCHS`) that real vLLM
    serves with images: built once by make_tiny_vlm.py in the vLLM venv (seconds; Phi-3-V,
    whose CLIP tower vLLM hard-codes, ~0.56 GiB), then reused. Returns its folder: ``dest``,
    or :func:`tiny_vlm_dir`, in which case older builds of the same arch and seed are removed
    once the new one is complete."""
    default = dest is None
    folder = tiny_vlm_dir(arch, seed=seed) if dest is None else Path(dest).expanduser().resolve()
    if not _vlm_tool.is_complete(folder):
        _run_tool(
            MAKE_TINY_VLM_SCRIPT,
            [arch, str(folder), "--seed", str(seed), "--name", f"tiny-{arch}"],
            stdin=None,
            timeout=timeout,
        )
        if not _vlm_tool.is_complete(folder):
            raise VllmEnvError(f"make_tiny_vlm.py left no model in {folder}")
        if default:
            for old in folder.parent.glob(f"{arch}-s{seed}-*"):
                if old != folder and old.is_dir():
                    shutil.rmtree(old, ignore_errors=True)
    return folder


# --- version and serving --------------------------------------------------------------------

_VERSION_RE = re.compile(r"^Version:\s*(\S+)", re.MULTILINE)


def _installed_version(*dists: str) -> str | None:
    """The version of the first of ``dists`` installed in the venv (read from its dist-info,
    without importing it), or None."""
    venv = vllm_venv()
    if venv is None:
        return None
    for meta in sorted(venv.glob("lib*/python*/site-packages/*.dist-info/METADATA")):
        dist = meta.parent.name.split("-")[0].lower().replace("_", "-")
        if dist not in dists:
            continue
        m = _VERSION_RE.search(meta.read_text(encoding="utf-8", errors="replace"))
        if m:
            return m.group(1)
    return None


def installed_vllm_version() -> str | None:
    """The vLLM version in the venv (read from its dist-info; no import), or None."""
    return _installed_version("vllm", "vllm-cpu")


def api_server_argv(
    model: str | Path,
    *,
    port: int,
    host: str = "127.0.0.1",
    served_model_name: str | None = None,
    flags: Sequence[str] = ("--enforce-eager", "--max-model-len", "1024"),
) -> list[str]:
    """Command line for a local vLLM OpenAI server from the venv. The CPU package's
    ``vllm serve`` entry point is broken (its distribution is named vllm-cpu), so this
    runs ``python -m vllm.entrypoints.openai.api_server --model ...``."""
    argv = [
        str(_require_python()),
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(model),
        "--host",
        host,
        "--port",
        str(port),
    ]
    if served_model_name:
        argv += ["--served-model-name", served_model_name]
    return argv + list(flags)


def cpu_server_env(
    *, kv_cache_gib: int = 1, extra: Mapping[str, str] | None = None
) -> dict[str, str]:
    """Environment for :func:`api_server_argv` on a CPU: a small KV cache, offline."""
    return tool_env({"VLLM_CPU_KVCACHE_SPACE": str(kv_cache_gib), **(extra or {})})
