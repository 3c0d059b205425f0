"""Render the vLLM argv for one model: a pure function of its spec, budget and GPU.

The argv is what follows the engine command (``vllm serve`` in the official image, or a
configured prefix for the process runtime). The model comes first, positionally, as
``vllm serve`` wants it (its ``--model`` is deprecated); ``model_flag=True`` passes it as
``--model`` for ``python -m vllm.entrypoints.openai.api_server``, which has no positional.
Flags that changed between vLLM releases are rendered for the target version.
"""

from __future__ import annotations

import json
import re

from vlmhub.sizing.vram import Budget, Gpu, memory_flags
from vlmhub.spec import ModelSpec, version_tuple

LOG_REQUESTS_FLIP = "0.10.2"
"""From this release request logging is ``--[no-]enable-log-requests``; 0.32 rejects
``--disable-log-requests`` ("unrecognized arguments")."""


def engine_version(spec: ModelSpec) -> str:
    """The vLLM version the spec will run: the image tag when it is a version, else the minimum."""
    m = re.match(r"v?(\d+\.\d+(?:\.\d+)?)", spec.image_tag)
    return m.group(1) if m else spec.vllm_version


def _log_flag(enable: bool, version: str) -> str:
    if version_tuple(version) >= version_tuple(LOG_REQUESTS_FLIP):
        return "--enable-log-requests" if enable else "--no-enable-log-requests"
    return "" if enable else "--disable-log-requests"


def render_argv(
    spec: ModelSpec,
    budget: Budget,
    gpu: Gpu,
    *,
    port: int,
    host: str = "127.0.0.1",
    sleep_mode: bool = False,
    with_memory_flags: bool = True,
    model_path: str | None = None,
    vllm_version: str | None = None,
    model_flag: bool = False,
) -> list[str]:
    """The vLLM arguments for ``spec``. Pure: same inputs, same list."""
    version = vllm_version or engine_version(spec)
    o = spec.options
    model = model_path or spec.hf_repo
    argv = ["--model", model] if model_flag else [model]
    if spec.revision and model_path is None:
        argv += ["--revision", spec.revision]
    argv += ["--served-model-name", spec.api_name, "--host", host, "--port", str(port)]
    argv += ["--max-model-len", str(o.max_model_len)]
    if o.max_num_seqs is not None:
        argv += ["--max-num-seqs", str(o.max_num_seqs)]
    if o.dtype:
        argv += ["--dtype", o.dtype]
    if o.quantization:
        argv += ["--quantization", o.quantization]
    if o.kv_cache_dtype:
        argv += ["--kv-cache-dtype", o.kv_cache_dtype]
    if o.trust_remote_code:
        argv.append("--trust-remote-code")
    if o.enforce_eager:
        argv.append("--enforce-eager")
    if o.tensor_parallel_size > 1:  # the memory flags below are per GPU (sizing.parallel)
        argv += ["--tensor-parallel-size", str(o.tensor_parallel_size)]
    if o.async_scheduling:
        argv.append("--async-scheduling")
    if o.limit_mm_per_prompt is not None:
        argv += ["--limit-mm-per-prompt", json.dumps(o.limit_mm_per_prompt, sort_keys=True)]
    if o.mm_processor_kwargs is not None:
        argv += ["--mm-processor-kwargs", json.dumps(o.mm_processor_kwargs, sort_keys=True)]
    if o.chat_template:
        argv += ["--chat-template", o.chat_template]
    if o.chat_template_content_format:
        argv += ["--chat-template-content-format", o.chat_template_content_format]
    log_flag = _log_flag(bool(o.enable_log_requests), version)
    if log_flag:
        argv.append(log_flag)
    if with_memory_flags:
        argv += memory_flags(spec, budget, gpu)
    if sleep_mode:
        argv.append("--enable-sleep-mode")
    argv += o.extra_args
    return argv


def redact(argv: list[str]) -> list[str]:
    """The argv with secret values (``--api-key``, ``--hf-token``) replaced, for display."""
    out: list[str] = []
    hide = False
    for arg in argv:
        if hide:
            out.append("***")
            hide = False
            continue
        if arg in ("--api-key", "--hf-token"):
            hide = True
        elif arg.startswith(("--api-key=", "--hf-token=")):
            arg = arg.split("=", 1)[0] + "=***"
        out.append(arg)
    return out


FLAG_VALUES = ("hf_repo", "revision", "served_model_name", "options.quantization",
               "options.kv_cache_dtype", "options.chat_template")
"""Spec fields rendered into the argv as a value (or as the positional model)."""


def flag_like_values(
    spec: ModelSpec, where: tuple[str | int, ...], inline: bool
) -> list[tuple[tuple[str | int, ...], str, str]]:
    """``(location, problem, fix)`` for each value of ``spec`` that vLLM would read as a flag:
    it lands in the argv as a value (:data:`FLAG_VALUES`, the served name included, which is
    the models.yaml key unless the spec names one) and starts with ``-``. Flags belong in
    ``options.extra_args``, the one field meant for them. ``where`` locates the model's entry
    in models.yaml; ``inline`` says its spec is written there (locate the field itself)."""
    out: list[tuple[tuple[str | int, ...], str, str]] = []
    for field in FLAG_VALUES:
        obj: object = spec
        for part in field.split("."):
            obj = getattr(obj, part)
        if field == "served_model_name" and obj is None:
            obj, loc = spec.api_name, where  # the models.yaml key itself
        else:
            loc = (*where, "spec", *field.split(".")) if inline else where
        if isinstance(obj, str) and obj.startswith("-"):
            out.append((loc, f"{field} {obj!r} starts with '-': vLLM would read it as a flag, "
                        "not as the value", "write the value without the leading '-'; flags "
                        "for vLLM go in options.extra_args"))
    return out
