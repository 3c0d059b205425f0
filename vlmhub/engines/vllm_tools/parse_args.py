"""Check engine argv lists against the installed vLLM's real argument parser.

Runs with the vLLM venv's python, never imported by vlmhub itself (it must not import vlmhub
or pydantic). Reads a JSON object ``{"key": ["--flag", "value", ...], ...}`` from stdin; each
list holds the flags that follow the model in ``vllm serve <model> <flags>``. Writes one JSON
object to stdout::

    {"vllm_version": "0.32.0", "parser": "vllm.entrypoints.launchers.cli_args",
     "model_arg": "positional", "results": {"key": null | "parser error message"},
     "warnings": {"key": ["argument 'x' is deprecated", ...]}}

Importing vLLM takes 10-20 s, so all keys are checked in one run. Exit status 0 when the
parser was built (whatever the results), 1 when it could not be.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import sys
import types
from typing import Any

PARSER_MODULES = ("vllm.entrypoints.launchers.cli_args", "vllm.entrypoints.openai.cli_args")
ARGPARSE_UTILS_MODULES = ("vllm.utils.argparse_utils", "vllm.utils")
DUMMY_MODEL = "vlmhub-dummy-model"


class _ParseExit(Exception):
    def __init__(self, status: int, message: str | None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message or ""


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _find(modules: tuple[str, ...], name: str) -> tuple[Any, str]:
    errors: list[str] = []
    for module_name in modules:
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            errors.append(f"{module_name}: {exc}")
            continue
        if hasattr(module, name):
            return getattr(module, name), module_name
        errors.append(f"{module_name}: no {name}")
    raise ImportError(f"cannot find {name}: " + "; ".join(errors))


def build_parser() -> tuple[Any, str]:
    """vLLM's serve parser and the module its make_arg_parser came from."""
    make_arg_parser, module_name = _find(PARSER_MODULES, "make_arg_parser")
    flexible_parser, _ = _find(ARGPARSE_UTILS_MODULES, "FlexibleArgumentParser")
    # prog ending in " serve" turns on vLLM's own hints (e.g. for --task).
    parser = make_arg_parser(flexible_parser(prog="vllm serve"))

    def _exit(self: Any, status: int = 0, message: str | None = None) -> None:
        raise _ParseExit(status, message)

    def _no_usage(self: Any, file: Any = None) -> None:
        return None

    parser.exit = types.MethodType(_exit, parser)
    parser.print_usage = types.MethodType(_no_usage, parser)
    parser.print_help = types.MethodType(_no_usage, parser)
    return parser, module_name


def _error_text(message: str, prog: str) -> str:
    text = message.strip()
    prefix = f"{prog}: error: "
    return text[len(prefix) :] if text.startswith(prefix) else text


def check(parser: Any, argv: list[str], *, positional: bool) -> str | None:
    """None when the parser accepts ``argv`` (a dummy model is put first when ``argv`` names
    none), else its error message."""
    if any(a == "-h" or a == "--help" or a.startswith("--help=") for a in argv):
        return "--help is not an engine flag"
    if (argv and not argv[0].startswith("-")) or "--model" in argv:
        full = list(argv)  # the caller's own model, positional or --model
    else:
        full = [DUMMY_MODEL, *argv] if positional else ["--model", DUMMY_MODEL, *argv]
    try:
        parser.parse_args(full)
    except _ParseExit as exc:
        if exc.status == 0:
            return f"the parser exited early on {argv!r}"
        return _error_text(exc.message, parser.prog) or f"parser exit status {exc.status}"
    except Exception as exc:  # vLLM raises ValueError etc. for some argument checks
        return f"{type(exc).__name__}: {exc}"
    return None


def run(request: dict[str, list[str]]) -> dict[str, Any]:
    parser, module_name = build_parser()
    # `vllm serve <model>` takes the model positionally (model_tag); older api_server parsers
    # only know --model.
    positional = any(getattr(a, "dest", None) == "model_tag" for a in parser._actions)
    collector = _Collect()
    vllm_logger = logging.getLogger("vllm")
    vllm_logger.addHandler(collector)
    results: dict[str, str | None] = {}
    warnings: dict[str, list[str]] = {}
    try:
        for key, argv in request.items():
            collector.messages = []
            if not isinstance(argv, list) or not all(isinstance(a, str) for a in argv):
                results[key] = "argv must be a list of strings"
                continue
            results[key] = check(parser, argv, positional=positional)
            if collector.messages:
                warnings[key] = list(collector.messages)
    finally:
        vllm_logger.removeHandler(collector)
    vllm: Any = importlib.import_module("vllm")
    return {
        "vllm_version": str(getattr(vllm, "__version__", "unknown")),
        "parser": module_name,
        "model_arg": "positional" if positional else "--model",
        "results": results,
        "warnings": warnings,
    }


def main() -> int:
    out = sys.stdout
    # vLLM logs to stdout; keep stdout for our JSON only.
    sys.stdout = sys.stderr
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    try:
        request = json.loads(sys.stdin.read() or "{}")
        if not isinstance(request, dict):
            raise ValueError("stdin must hold a JSON object of argv lists")
        result = run(request)
    except Exception as exc:
        out.write(json.dumps({"error": f"{type(exc).__name__}: {exc}"}) + "\n")
        out.flush()
        return 1
    finally:
        sys.stdout = out
    out.write(json.dumps(result) + "\n")
    out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
