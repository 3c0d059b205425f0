"""Tests of the stub engine (vlmhub.testing.stub_engine), the stand-in for vLLM's server.

Each test starts the stub as a real subprocess on a free 127.0.0.1 port and talks HTTP to it,
through httpx or the real `openai` SDK.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from vlmhub.engine_log import LogParser, diagnose
from vlmhub.testing.pytest_plugin import skip_or_fail
from vlmhub.testing.stub_engine import ledger_used_gib, read_ledger

REPO = Path(__file__).resolve().parents[1]
STUB_FILE = REPO / "vlmhub" / "testing" / "stub_engine.py"
BUILD_SCRIPT = REPO / "scripts" / "build-stub-image.sh"
PNG_DATA_URL = (
    "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8/5+hHgAH"
    "ggJ/PchI7wAAAABJRU5ErkJggg=="
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Engine:
    proc: subprocess.Popen[bytes]
    port: int
    out: Path
    err: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stdout(self) -> str:
        return self.out.read_text()

    def stderr(self) -> str:
        return self.err.read_text()

    def client(self, api_key: str = "unused") -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=api_key, max_retries=0, timeout=10)

    def wait_healthy(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"stub exited early:\n{self.stdout()}{self.stderr()}"
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.02)
        raise AssertionError("stub engine never became healthy")

    def wait_exit(self, timeout: float = 10.0) -> int:
        return self.proc.wait(timeout=timeout)


StartStub = Callable[..., Engine]


@pytest.fixture
def stub(tmp_path: Path) -> Iterator[StartStub]:
    """Factory: stub(*flags, env=..., wait=True, delay=0.05) -> a started Engine."""
    engines: list[Engine] = []

    def start(*flags: str, env: dict[str, str] | None = None, wait: bool = True,
              delay: float = 0.05, cmd: list[str] | None = None) -> Engine:
        port = free_port()
        n = len(engines)
        out, err = tmp_path / f"stub{n}.out", tmp_path / f"stub{n}.err"
        argv = [*(cmd or [sys.executable, "-m", "vlmhub.testing.stub_engine"]),
                "--host", "127.0.0.1", "--port", str(port),
                "--stub-startup-delay", str(delay),
                # other vLLM flags are accepted and ignored, as by vllm serve
                "--trust-remote-code", "--dtype", "bfloat16", "--limit-mm-per-prompt",
                '{"image": 2}', *flags]
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("VLMHUB_STUB")}
        full_env.pop("VLLM_SERVER_DEV_MODE", None)
        full_env.update(env or {})
        with out.open("wb") as fout, err.open("wb") as ferr:
            proc = subprocess.Popen(argv, stdout=fout, stderr=ferr, env=full_env, cwd=REPO)
        engine = Engine(proc, port, out, err)
        engines.append(engine)
        if wait:
            engine.wait_healthy()
        return engine

    yield start
    for engine in engines:
        if engine.proc.poll() is None:
            engine.proc.kill()
            engine.proc.wait()


def chat(
    engine: Engine, model: str, text: str, timeout: float = 10, **kw: object
) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": text}], **kw}
    return httpx.post(f"{engine.url}/v1/chat/completions", json=body, timeout=timeout)


def metric(engine: Engine, name: str) -> float:
    for line in httpx.get(f"{engine.url}/metrics").text.splitlines():
        if line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


# ---------------------------------------------------------------------------- start-up
def test_port_refuses_connections_while_loading_then_serves(stub: StartStub) -> None:
    engine = stub("demo-model", delay=0.8, wait=False)
    deadline = time.monotonic() + 5
    while "Starting to load model demo-model..." not in engine.stdout():
        assert time.monotonic() < deadline
        time.sleep(0.01)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", engine.port)).close()
    engine.wait_healthy()
    log = engine.stdout()
    order = ["vLLM API server version 0.32.0", "Starting to load model demo-model...",
             "Loading weights took", "Model loading took", "Available KV cache memory",
             "GPU KV cache size", "Started server process", "Application startup complete.",
             f"Uvicorn running on http://127.0.0.1:{engine.port}"]
    positions = [log.index(marker) for marker in order]
    assert positions == sorted(positions)
    assert httpx.get(f"{engine.url}/version").json() == {"version": "0.32.0"}


def test_runs_as_a_plain_file_with_the_system_python(stub: StartStub) -> None:
    python3 = "/usr/bin/python3" if Path("/usr/bin/python3").exists() else sys.executable
    engine = stub("plain-model", cmd=[python3, "-I", str(STUB_FILE)])
    assert httpx.get(f"{engine.url}/v1/models").json()["data"][0]["id"] == "plain-model"


def test_disable_log_requests_is_rejected_like_vllm(stub: StartStub) -> None:
    engine = stub("demo-model", "--disable-log-requests", wait=False)
    assert engine.wait_exit() == 2
    assert "api_server.py: error: unrecognized arguments: --disable-log-requests" in engine.stderr()


FAILURES = {
    "free-memory": "ValueError: Free memory on device cuda:0 (3.21/11.50 GiB) on startup is less "
    "than desired GPU memory utilization (0.85, 9.78 GiB). Decrease GPU memory utilization or "
    "reduce GPU memory used by other processes.",
    "no-cache-blocks": "ValueError: No available memory for the cache blocks. Try increasing "
    "`gpu_memory_utilization` when initializing the engine.",
    "max-model-len": "ValueError: To serve at least one request with the models's max seq len "
    "(32768), (3.50 GiB KV cache is needed, which is larger than the available KV cache memory "
    "(1.10 GiB). Based on the available memory, the estimated maximum model length is 10240. "
    "Try increasing `gpu_memory_utilization` or decreasing `max_model_len` when initializing "
    "the engine.",
    "CUDA out of memory": "RuntimeError: CUDA out of memory",
}


@pytest.mark.parametrize("reason", list(FAILURES))
def test_fail_at_startup_prints_the_vllm_error(stub: StartStub, reason: str) -> None:
    engine = stub("demo-model", "--stub-fail-at-startup", reason, wait=False, delay=0.2)
    assert engine.wait_exit() == 1
    err = engine.stderr().splitlines()
    assert FAILURES[reason] in err
    assert err.index("Traceback (most recent call last):") < err.index(FAILURES[reason])
    assert any(line.startswith('  File "') for line in err)
    assert "Starting to load model demo-model..." in engine.stdout()
    assert "Application startup complete." not in engine.stdout()


def test_knobs_come_from_env_and_flags_win(stub: StartStub) -> None:
    engine = stub("demo-model", env={"VLMHUB_STUB_FAIL_AT_STARTUP": "no-cache-blocks"},
                  wait=False)
    assert engine.wait_exit() == 1
    assert FAILURES["no-cache-blocks"] in engine.stderr()
    # the env asks for a 60 s start-up; the flag (0.05 s, passed by the fixture) wins
    started = time.monotonic()
    stub("demo-model", env={"VLMHUB_STUB_STARTUP_DELAY": "60"})
    assert time.monotonic() - started < 10


def test_sigterm_shuts_down_gracefully(stub: StartStub) -> None:
    engine = stub("demo-model")
    engine.proc.send_signal(signal.SIGTERM)
    assert engine.wait_exit(timeout=5) == 0
    assert "Shutting down" in engine.stdout()


# ---------------------------------------------------------------------------- HTTP surface
def test_v1_models_lists_each_served_name(stub: StartStub) -> None:
    engine = stub("org/demo-model", "--served-model-name", "alpha", "beta",
                  "--max-model-len", "2048")
    body = httpx.get(f"{engine.url}/v1/models").json()
    assert body["object"] == "list"
    assert [m["id"] for m in body["data"]] == ["alpha", "beta"]
    for entry in body["data"]:
        assert entry["object"] == "model" and entry["owned_by"] == "vllm"
        assert entry["root"] == "org/demo-model" and entry["parent"] is None
        assert entry["max_model_len"] == 2048 and isinstance(entry["created"], int)
    models = engine.client().models.list()
    assert [m.id for m in models.data] == ["alpha", "beta"]


def test_chat_through_the_openai_sdk(stub: StartStub) -> None:
    engine = stub("demo-model", "--served-model-name", "dots-ocr")
    client = engine.client()
    messages: list[ChatCompletionMessageParam] = [{"role": "user", "content": [
        {"type": "text", "text": "Read this page."},
        {"type": "image_url", "image_url": {"url": PNG_DATA_URL}},
    ]}]
    reply = client.chat.completions.create(model="dots-ocr", messages=messages, max_tokens=8)
    text = reply.choices[0].message.content
    assert text is not None and text.startswith("dots-ocr: [1 image] ")
    assert len(text.removeprefix("dots-ocr: [1 image] ").split(" ")) == 6  # 8 tokens in all
    assert reply.choices[0].finish_reason == "length"
    assert reply.object == "chat.completion" and reply.model == "dots-ocr"
    assert reply.usage is not None and reply.usage.completion_tokens == 8
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + 8

    stream = client.chat.completions.create(model="dots-ocr", messages=messages, max_tokens=8,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    finals = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finals[-1] == "length" and not any(finals[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 8

    plain = client.chat.completions.create(model="dots-ocr",
                                           messages=[{"role": "user", "content": "hi"}])
    assert plain.choices[0].finish_reason == "stop"
    assert len((plain.choices[0].message.content or "").split(" ")) == 16


def test_text_completions_through_the_openai_sdk(stub: StartStub) -> None:
    engine = stub("demo-model")
    client = engine.client()
    reply = client.completions.create(model="demo-model", prompt="Once upon", max_tokens=5)
    assert reply.object == "text_completion"
    assert reply.choices[0].text.startswith("demo-model: ")
    streamed = client.completions.create(model="demo-model", prompt="Once upon", max_tokens=5,
                                         stream=True)
    assert "".join(c.choices[0].text for c in streamed) == reply.choices[0].text


def test_raw_stream_is_chunked_sse_ending_with_done(stub: StartStub) -> None:
    engine = stub("demo-model")
    body = {"model": "demo-model", "messages": [{"role": "user", "content": "x"}],
            "max_tokens": 3, "stream": True}
    with httpx.stream("POST", f"{engine.url}/v1/chat/completions", json=body) as resp:
        assert resp.headers["transfer-encoding"] == "chunked"
        assert resp.headers["content-type"].startswith("text/event-stream")
        events = [line for line in resp.iter_lines() if line]
    assert all(line.startswith("data: ") for line in events)
    assert events[-1] == "data: [DONE]"
    assert len(events) == 1 + 3 + 1 + 1  # role, 3 tokens, finish, [DONE]


def test_output_is_deterministic(stub: StartStub) -> None:
    engine = stub("demo-model", "--served-model-name", "model-a", "model-b")
    first = chat(engine, "model-a", "same prompt").json()["choices"][0]["message"]["content"]
    again = chat(engine, "model-a", "same prompt").json()["choices"][0]["message"]["content"]
    other_prompt = chat(engine, "model-a", "other prompt").json()
    other_model = chat(engine, "model-b", "same prompt").json()
    assert first == again and first.startswith("model-a: ")
    assert other_prompt["choices"][0]["message"]["content"] != first
    text_b = other_model["choices"][0]["message"]["content"]
    assert text_b.startswith("model-b: ")
    assert text_b.split(" ")[1:] != first.split(" ")[1:]
    # another process with the same name answers the same
    engine2 = stub("demo-model", "--served-model-name", "model-a")
    again2 = chat(engine2, "model-a", "same prompt").json()
    assert again2["choices"][0]["message"]["content"] == first


def test_error_shapes(stub: StartStub) -> None:
    engine = stub("demo-model", "--max-model-len", "100")
    with pytest.raises(openai.NotFoundError) as info:
        engine.client().chat.completions.create(
            model="nope", messages=[{"role": "user", "content": "x"}])
    assert info.value.body == {"message": "The model `nope` does not exist.",
                               "type": "NotFoundError", "param": None, "code": 404}
    bad = httpx.post(f"{engine.url}/v1/chat/completions", content=b"{not json",
                     headers={"content-type": "application/json"})
    assert bad.status_code == 400
    assert bad.json()["error"]["code"] == 400 and bad.json()["error"]["type"] == "BadRequestError"
    too_long = chat(engine, "demo-model", "x", max_tokens=500)
    assert too_long.status_code == 400
    assert "maximum context length is 100 tokens" in too_long.json()["error"]["message"]
    assert httpx.get(f"{engine.url}/nowhere").status_code == 404


def test_embeddings_and_tokenize(stub: StartStub) -> None:
    engine = stub("demo-model", "--max-model-len", "1024")
    emb = engine.client().embeddings.create(model="demo-model", input=["a", "b"])
    assert [d.index for d in emb.data] == [0, 1]
    assert emb.data[0].embedding != emb.data[1].embedding
    tok = httpx.post(f"{engine.url}/tokenize", json={"prompt": "one two three"}).json()
    assert tok["count"] == 3 and len(tok["tokens"]) == 3 and tok["max_model_len"] == 1024


def test_access_log_lines(stub: StartStub) -> None:
    engine = stub("demo-model")
    httpx.get(f"{engine.url}/v1/models")
    chat(engine, "missing", "x")
    time.sleep(0.1)
    log = engine.stdout()
    assert '- "GET /v1/models HTTP/1.1" 200 OK' in log
    assert '- "POST /v1/chat/completions HTTP/1.1" 404 Not Found' in log
    assert "INFO:     127.0.0.1:" in log


def test_keep_alive_serves_many_requests_on_one_connection(stub: StartStub) -> None:
    engine = stub("demo-model")
    body = {"messages": [{"role": "user", "content": "x"}], "max_tokens": 2}
    with httpx.Client(base_url=engine.url) as client:
        for _ in range(5):
            assert client.get("/version").status_code == 200
            assert client.post("/v1/chat/completions", json=body).status_code == 200
            with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
                assert list(r.iter_lines())[-2] == "data: [DONE]"
    assert httpx.get(f"{engine.url}/stub/stats").json()["requests"]["/version"] == 5
    time.sleep(0.1)
    ports = re.findall(r'127\.0\.0\.1:(\d+) - "(?:GET /version|POST /v1/chat)', engine.stdout())
    assert len(ports) == 15 and len(set(ports)) == 1  # all on one connection


def test_api_key_guards_v1_only(stub: StartStub) -> None:
    engine = stub("demo-model", "--api-key", "s3cret")
    denied = httpx.get(f"{engine.url}/v1/models")
    assert denied.status_code == 401 and denied.json() == {"error": "Unauthorized"}
    wrong = httpx.get(f"{engine.url}/v1/models", headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401
    assert httpx.get(f"{engine.url}/health").status_code == 200
    assert httpx.get(f"{engine.url}/metrics").status_code == 200
    with pytest.raises(openai.AuthenticationError):
        engine.client("nope").models.list()
    assert engine.client("s3cret").models.list().data[0].id == "demo-model"


def test_api_key_from_the_vllm_api_key_environment_like_vllm(stub: StartStub) -> None:
    """vLLM reads ``VLLM_API_KEY`` when ``--api-key`` is not given (vlmhub passes each engine
    its key that way, out of ``ps``); the flag wins; the scheme is case-insensitive."""
    engine = stub("demo-model", env={"VLLM_API_KEY": "from-env"})
    assert httpx.get(f"{engine.url}/v1/models").status_code == 401
    ok = httpx.get(f"{engine.url}/v1/models", headers={"Authorization": "bearer from-env"})
    assert ok.status_code == 200
    assert httpx.get(f"{engine.url}/health").status_code == 200
    flagged = stub("demo-model", "--api-key", "flag", env={"VLLM_API_KEY": "from-env"})
    assert engine.client("from-env").models.list().data[0].id == "demo-model"
    with pytest.raises(openai.AuthenticationError):
        flagged.client("from-env").models.list()


# ---------------------------------------------------------------------------- failures
def test_crash_after_breaks_the_stream_mid_way(stub: StartStub) -> None:
    engine = stub("demo-model", "--stub-crash-after", "2")
    client = engine.client()
    messages: list[ChatCompletionMessageParam] = [{"role": "user", "content": "x"}]
    first = client.chat.completions.create(model="demo-model", messages=messages)
    assert first.choices[0].message.content
    received: list[str] = []
    stream = client.chat.completions.create(model="demo-model", messages=messages,
                                            max_tokens=20, stream=True)
    with pytest.raises((httpx.HTTPError, openai.APIError)):
        for chunk in stream:
            received.append(chunk.choices[0].delta.content or "")
    assert "".join(received).startswith("demo-model:")  # some chunks came before the break
    assert engine.wait_exit(timeout=5) == 1
    assert "ERROR" in engine.stdout() and "EngineCore encountered a fatal error." in engine.stdout()


def test_crash_after_non_streaming_drops_the_connection(stub: StartStub) -> None:
    engine = stub("demo-model", env={"VLMHUB_STUB_CRASH_AFTER": "1"})
    with pytest.raises(openai.APIConnectionError):
        engine.client().chat.completions.create(
            model="demo-model", messages=[{"role": "user", "content": "x"}])
    assert engine.wait_exit(timeout=5) == 1


def test_client_disconnect_mid_stream_is_counted(stub: StartStub) -> None:
    engine = stub("demo-model", "--stub-token-delay", "0.05")
    body = {"model": "demo-model", "prompt": "p", "max_tokens": 60, "stream": True}
    with httpx.stream("POST", f"{engine.url}/v1/completions", json=body) as resp:
        lines = resp.iter_lines()
        assert next(lines).startswith("data: ")
    deadline = time.monotonic() + 3
    while httpx.get(f"{engine.url}/stub/stats").json()["disconnects"] != 1:
        assert time.monotonic() < deadline, "disconnect not detected"
        time.sleep(0.02)
    stats = httpx.get(f"{engine.url}/stub/stats").json()
    assert stats["running"] == 0 and stats["requests"]["/v1/completions"] == 1


def test_client_giving_up_on_a_slow_answer_is_noticed_at_once(stub: StartStub) -> None:
    engine = stub("demo-model", "--stub-token-delay", "0.1")  # 60 tokens: 6 s to answer
    with pytest.raises(httpx.ReadTimeout):
        chat(engine, "demo-model", "x", max_tokens=60, timeout=0.3)
    gave_up = time.monotonic()
    while httpx.get(f"{engine.url}/stub/stats").json()["disconnects"] != 1:
        assert time.monotonic() - gave_up < 1.0, "the stub kept generating for a gone client"
        time.sleep(0.02)
    assert metric(engine, "vllm:num_requests_running") == 0


def test_metrics_count_concurrent_running_requests(stub: StartStub) -> None:
    engine = stub("demo-model", "--stub-token-delay", "0.04")
    assert metric(engine, "vllm:num_requests_running") == 0
    text = httpx.get(f"{engine.url}/metrics").text
    assert "# TYPE vllm:num_requests_running gauge" in text
    assert 'vllm:num_requests_waiting{engine="0",model_name="demo-model"} 0.0' in text
    assert ('vllm:engine_sleep_state{engine="0",model_name="demo-model",sleep_state="awake"} 1.0'
            in text)
    threads = [threading.Thread(target=chat, args=(engine, "demo-model", f"q{i}"),
                                kwargs={"max_tokens": 25}) for i in range(3)]
    for t in threads:
        t.start()
    seen = 0.0
    deadline = time.monotonic() + 3
    while seen < 3 and time.monotonic() < deadline:
        seen = max(seen, metric(engine, "vllm:num_requests_running"))
        time.sleep(0.02)
    for t in threads:
        t.join()
    assert seen == 3
    assert metric(engine, "vllm:num_requests_running") == 0
    assert metric(engine, "vllm:request_success_total") == 3


# ---------------------------------------------------------------------------- sleep mode
def test_sleep_endpoints_need_dev_mode_and_the_flag(stub: StartStub) -> None:
    plain = stub("demo-model", "--enable-sleep-mode")
    no_flag = stub("demo-model", env={"VLLM_SERVER_DEV_MODE": "1"})
    for engine in (plain, no_flag):
        assert httpx.post(f"{engine.url}/sleep?level=1").status_code == 404
        assert httpx.post(f"{engine.url}/wake_up").status_code == 404
        assert httpx.get(f"{engine.url}/is_sleeping").status_code == 404
    assert httpx.post(f"{plain.url}/reset_prefix_cache").status_code == 404
    assert httpx.post(f"{no_flag.url}/reset_prefix_cache").status_code == 200


def test_sleep_and_wake(stub: StartStub) -> None:
    engine = stub("demo-model", "--enable-sleep-mode", env={"VLLM_SERVER_DEV_MODE": "1"})
    url = engine.url
    assert httpx.get(f"{url}/is_sleeping").json() == {"is_sleeping": False}
    assert httpx.post(f"{url}/sleep?level=1").status_code == 200
    assert httpx.get(f"{url}/is_sleeping").json() == {"is_sleeping": True}
    text = httpx.get(f"{url}/metrics").text
    assert 'sleep_state="weights_offloaded"} 1.0' in text and 'sleep_state="awake"} 0.0' in text
    asleep = chat(engine, "demo-model", "x")
    assert asleep.status_code == 503 and "asleep" in asleep.json()["error"]["message"]
    assert httpx.post(f"{url}/wake_up").status_code == 200
    assert httpx.get(f"{url}/is_sleeping").json() == {"is_sleeping": False}
    assert chat(engine, "demo-model", "x").status_code == 200
    # level 2 drops the weights: answers fail until reload_weights
    assert httpx.post(f"{url}/sleep?level=2").status_code == 200
    assert 'sleep_state="discard_all"} 1.0' in httpx.get(f"{url}/metrics").text
    assert httpx.post(f"{url}/wake_up").status_code == 200
    assert chat(engine, "demo-model", "x").status_code == 500
    rpc = httpx.post(f"{url}/collective_rpc", json={"method": "reload_weights"})
    assert rpc.status_code == 200
    assert httpx.post(f"{url}/reset_prefix_cache").status_code == 200
    assert chat(engine, "demo-model", "x").status_code == 200


def test_both_sleep_levels_on_the_pretend_gpu_and_host(stub: StartStub, tmp_path: Path) -> None:
    gpu, host = tmp_path / "gpu", tmp_path / "host"
    dev = {"VLLM_SERVER_DEV_MODE": "1"}
    common = ["--enable-sleep-mode", "--stub-gpu-total-gib", "10", "--stub-ledger", str(gpu),
              "--stub-host-total-gib", "4", "--stub-host-ledger", str(host),
              "--stub-weights-gib", "3", "--max-model-len", "2048",
              "--stub-sleep-residue-gib", "1.0", "--stub-wake-s", "0.01", "--stub-wake2-s", "0.02"]
    a = stub("model-a", *common, "--gpu-memory-utilization", "0.5", env=dev)
    assert httpx.post(f"{a.url}/sleep", params={"level": "1"}).status_code == 200
    assert httpx.get(f"{a.url}/is_sleeping").json() == {"is_sleeping": True}
    assert ledger_used_gib(gpu) == pytest.approx(1.0)  # the residue it keeps while asleep
    assert [(e["model"], e["host_gib"]) for e in read_ledger(host)] == [("model-a", 3.0)]

    b = stub("model-b", *common, "--gpu-memory-utilization", "0.4", env=dev)
    # level 1 needs 3 GiB of host RAM, 1 is free: it fails and b stays awake, holding its GPU
    full = httpx.post(f"{b.url}/sleep", params={"level": "1"})
    assert full.status_code == 500 and "host memory" in full.json()["error"]["message"]
    assert httpx.get(f"{b.url}/is_sleeping").json() == {"is_sleeping": False}
    assert ledger_used_gib(gpu) == pytest.approx(5.0)
    # level 2 keeps nothing on the host
    assert httpx.post(f"{b.url}/sleep", params={"level": "2"}).status_code == 200
    assert ledger_used_gib(gpu) == pytest.approx(2.0)
    assert [e["model"] for e in read_ledger(host)] == ["model-a"]

    c = stub("model-c", *common, "--gpu-memory-utilization", "0.75", env=dev)
    assert ledger_used_gib(gpu) == pytest.approx(9.5)
    # a's wake needs 5 GiB, 1.5 are free: CUDA out of memory, and nothing leaks
    oom = httpx.post(f"{a.url}/wake_up")
    assert oom.status_code == 500
    assert "torch.OutOfMemoryError: CUDA out of memory" in oom.json()["error"]["message"]
    assert httpx.get(f"{a.url}/is_sleeping").json() == {"is_sleeping": True}
    assert ledger_used_gib(gpu) == pytest.approx(9.5)
    assert [e["model"] for e in read_ledger(host)] == ["model-a"]

    c.proc.send_signal(signal.SIGTERM)
    assert c.wait_exit(timeout=5) == 0
    assert httpx.post(f"{a.url}/wake_up").status_code == 200  # room made: the wake succeeds
    assert httpx.get(f"{a.url}/is_sleeping").json() == {"is_sleeping": False}
    assert ledger_used_gib(gpu) == pytest.approx(6.0) and read_ledger(host) == []
    assert chat(a, "model-a", "x").status_code == 200
    assert httpx.post(f"{b.url}/wake_up").status_code == 200
    assert chat(b, "model-b", "x").status_code == 500  # level 2: weights reloaded first
    assert "It took" in a.stdout() and "seconds to wake up." in a.stdout()


def test_sleep_routes_need_the_engine_key(stub: StartStub) -> None:
    engine = stub("demo-model", "--enable-sleep-mode", "--api-key", "k-1",
                  env={"VLLM_SERVER_DEV_MODE": "1"})
    auth = {"Authorization": "Bearer k-1"}
    for path in ("/sleep", "/wake_up", "/collective_rpc", "/reset_prefix_cache"):
        assert httpx.post(f"{engine.url}{path}").status_code == 401
    assert httpx.get(f"{engine.url}/is_sleeping").status_code == 401
    assert httpx.get(f"{engine.url}/health").status_code == 200  # still open
    assert httpx.post(f"{engine.url}/sleep?level=2", headers=auth).status_code == 200
    assert httpx.get(f"{engine.url}/is_sleeping", headers=auth).json() == {"is_sleeping": True}
    assert httpx.post(f"{engine.url}/wake_up", headers=auth).status_code == 200


# ---------------------------------------------------------------------------- GPU ledger
def test_ledger_refuses_an_engine_that_does_not_fit_and_frees_on_sigterm(
    stub: StartStub, tmp_path: Path
) -> None:
    ledger = tmp_path / "gpu"
    gpu = ["--stub-gpu-total-gib", "10", "--stub-ledger", str(ledger), "--enable-sleep-mode"]
    dev = {"VLLM_SERVER_DEV_MODE": "1"}
    first = stub("model-a", *gpu, "--gpu-memory-utilization", "0.6", env=dev)
    entries = read_ledger(ledger)
    assert [(e["pid"], e["port"], e["model"], e["sleeping"]) for e in entries] == [
        (first.proc.pid, first.port, "model-a", False)]
    assert ledger_used_gib(ledger) == pytest.approx(6.0)

    second = stub("model-b", *gpu, "--gpu-memory-utilization", "0.5", env=dev, wait=False)
    assert second.wait_exit() == 1
    assert ("ValueError: Free memory on device cuda:0 (4.00/10.00 GiB) on startup is less than "
            "desired GPU memory utilization (0.5, 5.00 GiB). Decrease GPU memory utilization or "
            "reduce GPU memory used by other processes.") in second.stderr()
    assert ledger_used_gib(ledger) == pytest.approx(6.0)

    # a sleeping engine keeps only 1.25 GiB, so the second one fits now
    assert httpx.post(f"{first.url}/sleep?level=1").status_code == 200
    assert ledger_used_gib(ledger) == pytest.approx(1.25)
    third = stub("model-b", *gpu, "--gpu-memory-utilization", "0.5", env=dev)
    assert ledger_used_gib(ledger) == pytest.approx(6.25)
    # vLLM does not check before it wakes: the wake runs out of memory (stub_sleep.py)
    assert httpx.post(f"{first.url}/wake_up").status_code == 500
    assert ledger_used_gib(ledger) == pytest.approx(6.25)

    first.proc.send_signal(signal.SIGTERM)
    assert first.wait_exit(timeout=5) == 0
    assert [e["model"] for e in read_ledger(ledger)] == ["model-b"]
    third.proc.send_signal(signal.SIGTERM)
    assert third.wait_exit(timeout=5) == 0
    assert read_ledger(ledger) == [] and ledger_used_gib(ledger) == 0.0


MEM = ["--stub-gpu-total-gib", "8", "--stub-weights-gib", "1.2", "--stub-activation-gib", "0.3",
       "--stub-non-torch-gib", "0.1", "--stub-cuda-graph-gib", "0.25", "--max-model-len", "4096"]


def parsed(engine: Engine) -> LogParser:
    parser = LogParser()
    for line in (engine.stdout() + engine.stderr()).splitlines():
        parser.feed(line)
    return parser


def test_memory_lines_when_profiling_are_vllms_and_parse_back(stub: StartStub) -> None:
    engine = stub("m", *MEM, "--gpu-memory-utilization", "0.4")
    out = engine.stdout()
    assert "Model loading took 1.2000 GiB memory and " in out
    assert "Available KV cache memory: 1.35 GiB" in out  # 3.2 - 1.2 - 0.3 - 0.1 - 0.25
    assert ("Free memory on device (8.00/8.00 GiB) on startup. Desired GPU memory utilization "
            "is (0.4, 3.20 GiB). Actual usage is 1.30 GiB for consumed memory (weights + "
            "non-torch), 0.30 GiB for peak activation, and 0.25 GiB for CUDAGraph memory.") in out
    facts = parsed(engine).facts
    names = ("model_load_gib", "consumed_gib", "peak_activation_gib", "cuda_graph_gib",
             "kv_cache_gib")
    assert [facts[k] for k in names] == [1.2, 1.3, 0.3, 0.25, 1.35]
    assert facts["kv_cache_tokens"] == int(1.35 * 1024**3 // 131072) // 16 * 16


def test_enforce_eager_drops_graphs_and_kv_bytes_skip_profiling(stub: StartStub) -> None:
    engine = stub("m", *MEM, "--enforce-eager", "--kv-cache-memory-bytes", str(2**29),
                  "--stub-kv-bytes-per-token", "65536")  # fmt: skip
    out = engine.stdout()
    assert "reserved 0.50 GiB memory for KV Cache as specified by kv_cache_memory_bytes" in out
    assert "Graph capturing" not in out and "Actual usage" not in out
    assert "GPU KV cache size: 8,192 tokens" in out
    facts = parsed(engine).facts
    assert facts["kv_cache_gib"] == 0.5 and "peak_activation_gib" not in facts


@pytest.mark.parametrize(
    ("flags", "code", "line"),
    [
        (["--gpu-memory-utilization", "0.2"], "no_cache_blocks",  # 1.6 < 1.85 of fixed parts
         "ValueError: No available memory for the cache blocks."),
        (["--gpu-memory-utilization", "0.29"], "max_model_len",  # 0.47 GiB < 0.5 needed
         "ValueError: To serve at least one request with the model's max seq len (4096), (0.50 "
         "GiB KV cache is needed, which is larger than the available KV cache memory (0.47 "
         "GiB). Based on the available memory, the estimated maximum model length is 3840."),
        (["--kv-cache-memory-bytes", str(7 * 2**30)], "cuda_oom",  # 1.85 + 7 > 8 GiB
         "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 7.00 GiB. GPU 0 has a "
         "total capacity of 8.00 GiB of which 6.15 GiB is free."),
    ],
)  # fmt: skip
def test_short_memory_fails_with_vllms_errors(
    stub: StartStub, flags: list[str], code: str, line: str
) -> None:
    engine = stub("m", *MEM, *flags, wait=False)
    assert engine.wait_exit() == 1
    assert line in engine.stderr()
    err = diagnose(engine.stderr().splitlines())
    assert err is not None and err.code == code


def test_ledger_holds_what_the_engine_really_uses(stub: StartStub, tmp_path: Path) -> None:
    ledger = tmp_path / "gpu"
    profiled = stub("a", *MEM, "--stub-ledger", str(ledger), "--gpu-memory-utilization", "0.4")
    assert ledger_used_gib(ledger) == pytest.approx(3.2)  # profiling: the KV cache takes the rest
    stub("b", *MEM, "--stub-ledger", str(ledger), "--kv-cache-memory-bytes", str(2**30),
         "--gpu-memory-utilization", "0.4")  # the start-up check still asks for 3.2 GiB free
    assert ledger_used_gib(ledger) == pytest.approx(3.2 + 1.85 + 1.0)  # exactly its parts
    profiled.proc.send_signal(signal.SIGTERM)
    assert profiled.wait_exit(timeout=5) == 0
    assert ledger_used_gib(ledger) == pytest.approx(2.85)


def test_ledger_readers_skip_dead_pids_and_keep_idents(tmp_path: Path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / f"{dead.pid}-8000.json").write_text(
        json.dumps({"pid": dead.pid, "port": 8000, "model": "gone", "claim_gib": 5.0}))
    (tmp_path / "ctr-8000.json").write_text(json.dumps(
        {"pid": 1, "ident": "ctr", "port": 8000, "model": "boxed", "claim_gib": 2.5}))
    (tmp_path / f"{os.getpid()}-9.json").write_text(
        json.dumps({"pid": os.getpid(), "port": 9, "model": "me", "claim_gib": 1.0}))
    (tmp_path / "junk.json").write_text("{not json")
    assert sorted(e["model"] for e in read_ledger(tmp_path)) == ["boxed", "me"]
    assert ledger_used_gib(tmp_path) == pytest.approx(3.5)
    assert read_ledger(tmp_path / "missing") == []


def test_ledger_id_env_names_the_entry(stub: StartStub, tmp_path: Path) -> None:
    ledger = tmp_path / "gpu"
    engine = stub("demo-model", "--stub-gpu-total-gib", "12", "--stub-ledger", str(ledger),
                  env={"VLMHUB_STUB_LEDGER_ID": "container-7"})
    [entry] = read_ledger(ledger)
    assert entry["ident"] == "container-7" and entry["file"] == f"container-7-{engine.port}.json"
    assert entry["claim_gib"] == pytest.approx(0.92 * 12)
    engine.proc.send_signal(signal.SIGINT)
    assert engine.wait_exit(timeout=5) == 0
    assert read_ledger(ledger) == []


# ---------------------------------------------------------------------------- Docker
@pytest.mark.docker
def test_docker_image_serves_v1_models(tmp_path: Path) -> None:
    docker = pytest.importorskip("docker")
    try:
        client = docker.from_env()
        client.ping()
    except Exception as exc:
        skip_or_fail(f"no Docker engine answers: {exc}")
    image = os.environ.get("VLMHUB_STUB_IMAGE", "vlmhub/stub-engine:dev")
    # always run the (idempotent) script: it reuses the base image and refreshes the stub code
    build = subprocess.run(["bash", str(BUILD_SCRIPT)], capture_output=True, text=True,
                           timeout=600, env={**os.environ, "VLMHUB_STUB_IMAGE": image})
    assert build.returncode == 0, build.stderr
    port = free_port()
    container = client.containers.run(
        image, ["demo-model", "--max-model-len", "2048", "--stub-startup-delay", "0.2"],
        ports={"8000/tcp": ("127.0.0.1", port)}, detach=True)
    try:
        deadline = time.monotonic() + 30
        models = None
        while models is None:
            assert time.monotonic() < deadline, container.logs().decode()
            try:
                models = httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=2).json()
            except (httpx.TransportError, ValueError):
                time.sleep(0.1)
        assert [(m["id"], m["max_model_len"]) for m in models["data"]] == [("demo-model", 2048)]
        container.stop(timeout=5)  # SIGTERM: python3 is pid 1 and handles it
        assert container.wait(timeout=10)["StatusCode"] == 0
        logs = container.logs().decode()
        assert "Application startup complete." in logs and "Shutting down" in logs
    finally:
        container.remove(force=True)
