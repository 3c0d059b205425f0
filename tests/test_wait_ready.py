"""How fast a start is noticed (issue 9, the manager's cold-start cost): wait_ready polls fast
early in a start and wakes at once on the engine's "server up" log line. Real stand-in engine
processes through the real ProcessRuntime; an hour-long ``poll_s`` shows which path ended the
wait (a bounded ``asyncio.wait_for`` turns the old behaviour into a failure, not a hang)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from vlmhub.engines import base
from vlmhub.engines.base import EngineHandle, wait_ready
from vlmhub.engines.ports import free_port
from vlmhub.engines.process import ProcessRuntime
from vlmhub.testing.fixtures import stub_launch_request, stub_spec

HOUR = 3600.0
BOUND_S = 30.0  # far beyond a 0.5 s start, far below an hour's poll


async def start_stub(rt: ProcessRuntime, name: str) -> EngineHandle:
    spec = stub_spec(name, env={"VLMHUB_STUB_STARTUP_DELAY": "0.5"})
    return await rt.start(stub_launch_request(rt, rt.rc, spec, free_port()))


async def test_the_server_up_log_line_ends_the_wait(process_runtime: ProcessRuntime,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(base, "FAST_POLL_FOR_S", 0.0)  # no fast polling: only the log can wake
    handle = await start_stub(process_runtime, "evented")
    phases: list[tuple[str, str]] = []
    await asyncio.wait_for(
        wait_ready(process_runtime, handle, timeout_s=BOUND_S, poll_s=HOUR,
                   on_phase=lambda phase, line: phases.append((phase, line))), BOUND_S)
    ready = [line for phase, line in phases if phase == "ready"]
    assert len(ready) == 2 and "Application startup complete" in ready[0]  # from the log
    assert ready[1] == "health check passed"


class SilentRuntime(ProcessRuntime):
    """A process runtime whose engines' logs show nothing: only polling can see them start."""

    async def follow(self, handle: EngineHandle, poll_s: float = 0.1) -> AsyncIterator[str]:
        for line in ():
            yield line


async def test_a_start_is_polled_fast_at_first(process_runtime: ProcessRuntime) -> None:
    rt = SilentRuntime(process_runtime.rc, state_dir=process_runtime.state_dir)
    handle = await start_stub(rt, "silent")
    phases: list[str] = []
    await asyncio.wait_for(
        wait_ready(rt, handle, timeout_s=BOUND_S, poll_s=HOUR,
                   on_phase=lambda phase, _line: phases.append(phase)), BOUND_S)
    assert phases == ["ready"]  # seen by a probe within the fast window, not by the log
    await rt.stop(handle, timeout_s=5.0)
