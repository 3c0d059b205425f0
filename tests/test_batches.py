"""The Batch and Files API (issue 26 item 2): ``/v1/files`` and ``/v1/batches`` through the real
``openai`` SDK. End to end on a real ``vlmhub route`` over stand-in engines, killed mid-batch
and restarted on its state dir (every answer exactly once); in process (a real uvicorn over a
small supervisor of stand-in engines) for validation, cancel, expiry, keys and the size limit."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml
from route_support import wait_healthy
from router_support import RunningRouter, StubEngine, TestSupervisor, engines, make_config

from vlmhub.engines.ports import free_port
from vlmhub.router.batches import attach_batches

KEY = "sk-batch-test-key"


def chat_line(custom_id: str, model: str, **extra: Any) -> dict[str, Any]:
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": model, "max_tokens": 3,
                     "messages": [{"role": "user", "content": f"question {custom_id}"}]},
            **extra}


def jsonl(lines: list[Any]) -> bytes:
    return b"".join((x if isinstance(x, bytes) else json.dumps(x).encode()) + b"\n"
                    for x in lines)


def upload(client: openai.OpenAI, lines: list[Any]) -> str:
    return client.files.create(file=("in.jsonl", io.BytesIO(jsonl(lines))), purpose="batch").id


def wait_batch(client: openai.OpenAI, batch_id: str, done: Callable[[Any], bool],
               timeout_s: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        batch = client.batches.retrieve(batch_id)
        if done(batch):
            return batch
        assert time.monotonic() < deadline, batch
        time.sleep(0.1)


def finished(batch: Any) -> bool:
    return batch.status in ("completed", "failed", "cancelled", "expired")


def file_lines(client: openai.OpenAI, file_id: str | None) -> list[dict[str, Any]]:
    if file_id is None:
        return []
    return [json.loads(x) for x in client.files.content(file_id).text.splitlines()]


# ------------------------------------------------------------------ vlmhub route, restarted
def route_config(tmp_path: Path) -> Path:
    lo = free_port()
    spec = {"hf_repo": "stub/x", "image": "vlmhub/stub-engine:dev",
            "options": {"max_model_len": 2048, "enforce_eager": True},
            "vram": {"weights_gib": 1.0, "kv_bytes_per_token": 28672, "activation_gib": 0.5}}
    cfg = {
        "gpu": {"total_gib": 8, "reserve_gib": 0.5, "force_total": True},
        "router": {"api_keys": [KEY], "shutdown_timeout_s": 5, "batch": {"concurrency": 8}},
        "runtime": {"kind": "process", "port_range": [lo, lo + 50], "process_argv": [
            sys.executable, "-m", "vlmhub.testing.stub_engine", "--stub-startup-delay", "0.2",
            "--stub-token-delay", "0.005"]},
        "models": {"alpha": {"aliases": ["a"], "spec": {**spec, "hf_repo": "stub/alpha"}},
                   "bravo": {"spec": {**spec, "hf_repo": "stub/bravo"}}},
    }
    path = tmp_path / "models.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def start_route(config: Path, tmp_path: Path, n: int) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    env = {**os.environ, "VLMHUB_STATE_DIR": str(tmp_path / "state"), "COLUMNS": "200"}
    log = tmp_path / f"route{n}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "vlmhub", "route", "--config",
                                 str(config), "--port", str(port)],
                                stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    wait_healthy(url, proc, log)
    return proc, url


def test_500_lines_over_two_models_survive_a_router_kill_exactly_once(tmp_path: Path) -> None:
    """500 lines over two models (one by its alias); the router is SIGKILLed mid-batch and a
    new router on the same state dir finishes it: each custom_id once in the output file,
    with its model's answer, and the counts add up."""
    config = route_config(tmp_path)
    lines = [chat_line(f"q{i}", ("a", "bravo")[i % 2]) for i in range(500)]
    proc, url = start_route(config, tmp_path, 1)
    procs = [proc]
    try:
        client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, timeout=30, max_retries=0)
        file_id = upload(client, lines)
        batch = client.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions",
                                      completion_window="24h", metadata={"job": "restart"})
        assert batch.status == "validating" and batch.input_file_id == file_id
        part = wait_batch(client, batch.id, lambda b: b.request_counts is not None
                          and b.request_counts.completed >= 60)
        assert part.status == "in_progress" and part.request_counts.total == 500
        proc.kill()  # mid-batch, no shutdown: lines in flight are lost, the journal is not
        proc.wait(10)
        proc, url = start_route(config, tmp_path, 2)
        procs.append(proc)
        client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, timeout=30, max_retries=0)
        done = wait_batch(client, batch.id, finished, timeout_s=120)
        assert done.status == "completed", done
        assert done.request_counts.model_dump() == {"total": 500, "completed": 500,
                                                    "failed": 0}
        assert done.error_file_id is None and done.metadata == {"job": "restart"}
        out = file_lines(client, done.output_file_id)
        seen = Counter(x["custom_id"] for x in out)
        assert seen == Counter(f"q{i}" for i in range(500))  # every line, exactly once
        for x in out:
            i = int(x["custom_id"][1:])
            assert x["response"]["status_code"] == 200 and x["error"] is None
            answer = x["response"]["body"]["choices"][0]["message"]["content"]
            assert answer.startswith(("alpha:", "bravo:")[i % 2]), x
            assert x["response"]["request_id"] and x["id"].startswith("batch_req_")
        journal = tmp_path / "state" / "batches" / "runs" / f"{batch.id}.journal"
        journaled = [json.loads(x)["custom_id"] for x in journal.read_text().splitlines()]
        assert sorted(journaled) == sorted(seen)  # the resumed router ran none of them again
        assert [b.id for b in client.batches.list()] == [batch.id]
        output = client.files.retrieve(done.output_file_id)
        assert output.purpose == "batch_output" and output.bytes > 0
        with pytest.raises(openai.AuthenticationError):  # a key is needed, as for /v1
            openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0
                          ).batches.retrieve(batch.id)
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
                try:
                    p.wait(60)
                except subprocess.TimeoutExpired:
                    p.kill()
        for n in (1, 2):
            log = tmp_path / f"route{n}.log"
            if log.exists():
                print(f"--- route{n}.log\n" + log.read_text()[-3000:])


# ------------------------------------------------------------------------------ in process
class Clock:
    """An injected wall clock: real time plus ``offset`` seconds."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


@pytest.fixture(scope="module")
def stubs() -> Iterator[dict[str, StubEngine]]:
    with engines(StubEngine("alpha"), StubEngine("bravo")) as started:
        yield started


def in_process(tmp_path: Path, stubs: dict[str, StubEngine], clock: Clock | None = None,
               delay: float = 0.0, **router: Any) -> tuple[RunningRouter, TestSupervisor]:
    sup = TestSupervisor(dict(stubs), aliases={"a": "alpha"})
    if delay:
        sup.acquire_delay["bravo"] = delay
    running = RunningRouter(sup, make_config(**router))
    attach_batches(running.app, tmp_path / "state", clock or time.time)
    return running.start(), sup


def sdk(router: RunningRouter, key: str = "none") -> openai.OpenAI:
    return openai.OpenAI(base_url=router.url + "/v1", api_key=key, timeout=30, max_retries=0)


def test_an_invalid_input_file_fails_the_batch_with_line_numbers_and_bad_calls_are_400(
    tmp_path: Path, stubs: dict[str, StubEngine]
) -> None:
    router, _ = in_process(tmp_path, stubs, api_keys=[KEY, "sk-other"])
    try:
        client = sdk(router, KEY)
        bad = upload(client, [
            chat_line("ok1", "alpha"),
            b"{not json",
            {k: v for k, v in chat_line("x", "alpha").items() if k != "custom_id"},
            chat_line("ok2", "a"),
            chat_line("ok1", "bravo"),  # duplicate custom_id
            {**chat_line("u", "alpha"), "url": "/v1/embeddings"},
            chat_line("m", "no-such-model"),
        ])
        batch = client.batches.create(input_file_id=bad, endpoint="/v1/chat/completions",
                                      completion_window="24h")
        failed = wait_batch(client, batch.id, finished)
        assert failed.status == "failed" and failed.failed_at is not None
        assert failed.errors is not None and failed.errors.data is not None
        got = [(e.line, e.code) for e in failed.errors.data]
        assert got == [(2, "invalid_json_line"), (3, "missing_custom_id"),
                       (5, "duplicate_custom_id"), (6, "mismatched_endpoint"),
                       (7, "model_not_found")]
        assert failed.output_file_id is None
        good = upload(client, [chat_line("ok", "alpha")])
        for kwargs, param in [
            ({"input_file_id": "file-nope"}, "input_file_id"),
            ({"endpoint": "/v1/moderations"}, "endpoint"),
            ({"completion_window": "48h"}, "completion_window"),
        ]:
            args: dict[str, Any] = {"input_file_id": good, "endpoint": "/v1/chat/completions",
                                    "completion_window": "24h", **kwargs}
            with pytest.raises(openai.BadRequestError) as caught:
                client.batches.create(**args)
            assert caught.value.body is not None
            assert caught.value.body["param"] == param  # type: ignore[index]
        other = sdk(router, "sk-other")  # another key sees none of it
        with pytest.raises(openai.NotFoundError):
            other.batches.retrieve(batch.id)
        with pytest.raises(openai.NotFoundError):
            other.files.content(good)
        assert other.batches.list().data == [] and other.files.list().data == []
        with pytest.raises(openai.AuthenticationError):
            sdk(router, "wrong").files.list()
    finally:
        router.stop()


def test_cancel_stops_new_lines_and_keeps_what_finished(
    tmp_path: Path, stubs: dict[str, StubEngine]
) -> None:
    router, sup = in_process(tmp_path, stubs, delay=0.3, batch={"concurrency": 2})
    try:
        client = sdk(router)
        file_id = upload(client, [chat_line(f"c{i}", "bravo") for i in range(20)])
        batch = client.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions",
                                      completion_window="24h")
        wait_batch(client, batch.id, lambda b: b.status == "in_progress")
        cancelling = client.batches.cancel(batch.id)
        assert cancelling.status in ("cancelling", "cancelled")
        with pytest.raises(openai.ConflictError):  # its input is still being read
            client.files.delete(file_id)
        done = wait_batch(client, batch.id, finished)
        assert done.status == "cancelled" and done.cancelled_at is not None
        counts = done.request_counts
        assert counts is not None and counts.total == 20 and counts.completed < 20
        out = file_lines(client, done.output_file_id)
        assert len(out) == counts.completed == len({x["custom_id"] for x in out})
        assert sup.settled() and sup.double_releases == 0
        with pytest.raises(openai.ConflictError):
            client.batches.cancel(batch.id)
        assert client.files.delete(file_id).deleted is True
        with pytest.raises(openai.NotFoundError):
            client.files.retrieve(file_id)
    finally:
        router.stop()


def test_a_batch_whose_window_passes_expires_with_the_rest_in_its_error_file(
    tmp_path: Path, stubs: dict[str, StubEngine]
) -> None:
    clock = Clock()
    router, _ = in_process(tmp_path, stubs, clock, delay=0.5, batch={"concurrency": 2})
    try:
        client = sdk(router)
        lines = [chat_line(f"e{i}", "bravo") for i in range(8)]
        batch = client.batches.create(input_file_id=upload(client, lines),
                                      endpoint="/v1/chat/completions", completion_window="24h")
        assert batch.expires_at == batch.created_at + 24 * 3600
        wait_batch(client, batch.id, lambda b: b.status == "in_progress")
        clock.offset = 24 * 3600 + 60  # a day later: the lines waiting for the model never run
        done = wait_batch(client, batch.id, finished)
        assert done.status == "expired" and done.expired_at is not None
        out = file_lines(client, done.output_file_id)
        errors = file_lines(client, done.error_file_id)
        assert sorted(x["custom_id"] for x in out + errors) == sorted(x["custom_id"]
                                                                      for x in lines)
        assert errors and all(x["error"]["code"] == "batch_expired" and x["response"] is None
                              for x in errors)
        counts = done.request_counts
        assert counts is not None and (counts.completed, counts.failed) == (len(out),
                                                                           len(errors))
    finally:
        router.stop()


def test_a_file_over_the_size_limit_is_a_413_and_only_batch_files_are_kept(
    tmp_path: Path, stubs: dict[str, StubEngine]
) -> None:
    router, _ = in_process(tmp_path, stubs, batch={"max_file_mib": 0.01})  # 10 KiB
    try:
        client = sdk(router)
        small = [chat_line(f"s{i}", "alpha") for i in range(5)]
        big = [chat_line(f"b{i}", "alpha") for i in range(200)]
        assert len(jsonl(big)) > 0.01 * 1024 * 1024 > len(jsonl(small))
        with pytest.raises(openai.APIStatusError) as caught:
            upload(client, big)
        assert caught.value.status_code == 413
        assert "router.batch.max_file_mib" in caught.value.message
        kept = client.files.create(file=("s.jsonl", io.BytesIO(jsonl(small))), purpose="batch")
        assert kept.bytes == len(jsonl(small)) and kept.filename == "s.jsonl"
        assert client.files.content(kept.id).content == jsonl(small)
        with pytest.raises(openai.BadRequestError):
            client.files.create(file=("s.jsonl", io.BytesIO(jsonl(small))),
                                purpose="fine-tune")
        assert [f.id for f in client.files.list()] == [kept.id]
        bad = httpx.post(router.url + "/v1/files", content=b"x" * 200_000,
                         headers={"content-type": "application/json"})
        assert bad.status_code == 413 and bad.json()["error"]["code"] == "file_too_large"
    finally:
        router.stop()


def test_batches_list_pages_with_limit_and_after(tmp_path: Path,
                                                 stubs: dict[str, StubEngine]) -> None:
    router, _ = in_process(tmp_path, stubs)
    try:
        client = sdk(router)
        file_id = upload(client, [chat_line("p", "alpha")])
        made = [client.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions",
                                      completion_window="24h").id for _ in range(5)]
        first = client.batches.list(limit=2)
        assert [b.id for b in first.data] == made[::-1][:2] and first.has_more
        rest = client.batches.list(limit=10, after=first.data[-1].id)
        assert [b.id for b in rest.data] == made[::-1][2:] and not rest.has_more
        assert sorted(b.id for b in client.batches.list(limit=2)) != []  # auto-paging works
        assert [b.id for b in client.batches.list(limit=2)] == made[::-1]
        for bid in made:
            done = wait_batch(client, bid, finished)
            assert done.status == "completed"
            assert file_lines(client, done.output_file_id)[0]["custom_id"] == "p"
    finally:
        router.stop()


def test_a_resumed_batch_answers_lines_of_a_model_gone_since_with_404_once(
    tmp_path: Path, stubs: dict[str, StubEngine]
) -> None:
    """Stopped cleanly mid-batch (its runner cancelled, lines in flight dropped), the batch
    resumes in a router whose config lost one of its models: those lines are answered 404 in
    the error file, the others in the output file, each custom_id once."""
    lines = [chat_line(f"r{i}", ("alpha", "bravo")[i % 2]) for i in range(12)]
    router, _ = in_process(tmp_path, stubs, delay=0.3, batch={"concurrency": 1})
    try:
        client = sdk(router)
        batch = client.batches.create(input_file_id=upload(client, lines),
                                      endpoint="/v1/chat/completions", completion_window="24h")
        wait_batch(client, batch.id, lambda b: b.request_counts is not None
                   and b.request_counts.completed >= 2)
    finally:
        router.stop()
    sup = TestSupervisor({"alpha": stubs["alpha"]})
    again = RunningRouter(sup, make_config())
    attach_batches(again.app, tmp_path / "state")
    again.start()
    try:
        client = sdk(again)
        done = wait_batch(client, batch.id, finished)
        assert done.status == "completed"
        out = file_lines(client, done.output_file_id)
        errors = file_lines(client, done.error_file_id)
        assert Counter(x["custom_id"] for x in out + errors) == Counter(x["custom_id"]
                                                                        for x in lines)
        gone = {x["custom_id"] for x in errors}
        assert gone and all(int(c[1:]) % 2 == 1 for c in gone)  # bravo's, not yet run
        assert all(x["response"]["status_code"] == 404 for x in errors)
        assert all(x["response"]["body"]["choices"][0]["message"]["content"].startswith(
            ("alpha:", "bravo:")[int(x["custom_id"][1:]) % 2]) for x in out)
    finally:
        again.stop()
