"""API fuzzing (issue 10, item 3): schemathesis reads the router's own /openapi.json and throws
well over 1,000 generated requests, valid and invalid, at every route of a real router (uvicorn)
over the real supervisor and two stand-in engines. The router must never crash, never answer
500 and never log an internal error, and must still serve afterwards. A second pass fills
``model`` with the configured names so that fuzzed bodies reach the engines through the data
path. models.yaml is fuzzed by hypothesis in test_config_fuzz.py."""

from __future__ import annotations

import asyncio
import copy
import logging
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from supervisor_support import build, model, routed

MIN_CASES = 1_000
FORWARDED_EXAMPLES = 45  # per forwarded route and generation mode
OTHER_EXAMPLES = 25
DATA_PATH_EXAMPLES = 30  # per forwarded route, with a configured model name


class Collector(logging.Handler):
    """Keeps every ERROR record of the router and of uvicorn."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(f"{record.name}: {record.getMessage()}")


class ThreadedRouter:
    """The real router and supervisor on their own event loop in a thread, so that the
    synchronous schemathesis client can call it."""

    def __init__(self, tmp: Path) -> None:
        self.tmp, self.url = tmp, ""
        self.ready, self.failed = threading.Event(), ""
        self.loop: asyncio.AbstractEventLoop | None = None
        self.stop_event: asyncio.Event | None = None
        self.thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    async def _main(self) -> None:
        try:
            sup, _, _ = build(self.tmp, {"a": model(1.0, preload=True, aliases=["alpha"]),
                                         "b": model(1.0, preload=True)},
                              router={"max_body_mb": 1, "body_timeout_s": 5})
            self.loop, self.stop_event = asyncio.get_running_loop(), asyncio.Event()
            async with routed(sup) as url:
                async with httpx.AsyncClient(base_url=url, timeout=60) as c:
                    for name in ("a", "b"):  # both engines up before the fuzzing starts
                        assert (await c.post(f"/api/models/{name}/load")).status_code == 200
                self.url = url
                self.ready.set()
                await self.stop_event.wait()
        except BaseException as exc:
            self.failed = repr(exc)
            self.ready.set()
            raise

    def start(self) -> ThreadedRouter:
        self.thread.start()
        assert self.ready.wait(120) and not self.failed, self.failed
        return self

    def stop(self) -> None:
        if self.loop is not None and self.stop_event is not None:
            self.loop.call_soon_threadsafe(self.stop_event.set)
        self.thread.join(60)


@pytest.fixture(scope="module")
def router(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ThreadedRouter]:
    r = ThreadedRouter(tmp_path_factory.mktemp("fuzz")).start()
    try:
        yield r
    finally:
        r.stop()


def with_model_names(doc: dict[str, Any], names: list[str]) -> dict[str, Any]:
    """The document with every forwarded body's ``model`` limited to ``names``."""
    out = copy.deepcopy(doc)
    for item in out["paths"].values():
        body = item.get("post", {}).get("requestBody")
        for content in (body or {}).get("content", {}).values():  # JSON or a form
            props = content.get("schema", {}).get("properties", {})
            if "model" in props:
                props["model"] = {"type": "string", "enum": names}
    return out


def fuzz(schema: Any, url: str, examples: dict[bool, int], modes: tuple[GenerationMode, ...],
         session: requests.Session, seen: Counter[str], failures: list[str]) -> None:
    """Run every operation of ``schema`` against ``url``: ``examples[forwarded]`` cases per
    operation and mode. Counts statuses in ``seen``; collects what must never happen."""
    for result in schema.get_all_operations():
        op = result.ok()
        forwarded = op.method.upper() == "POST" and not op.path.startswith("/api/")
        for mode in modes:
            try:
                cases(op.as_strategy(generation_mode=mode), op.label, examples[forwarded], url,
                      session, seen, failures)
            except Unsatisfiable:  # nothing to make invalid (an operation without inputs)
                continue


def cases(strategy: Any, label: str, count: int, url: str, session: requests.Session,
          seen: Counter[str], failures: list[str]) -> None:
    """Send up to ``count`` generated cases of one operation."""

    @settings(max_examples=count, deadline=None, database=None,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    @given(case=strategy)
    def run(case: Any) -> None:
        try:
            resp = case.call(base_url=url, session=session, timeout=60)
        except requests.RequestException as exc:  # the router dropped the connection
            failures.append(f"{label}: no answer: {exc!r}")
            return
        seen[f"{label} {resp.status_code}"] += 1
        seen["cases"] += 1
        if resp.status_code == 500 or resp.status_code > 504:  # 501-504 are documented
            failures.append(f"{label}: {resp.status_code} {resp.text[:300]}")

    if count:
        run()


def test_fuzz_the_router_api_with_schemathesis(router: ThreadedRouter) -> None:
    errors = Collector()
    for name in ("vlmhub", "uvicorn.error"):
        logging.getLogger(name).addHandler(errors)
    seen: Counter[str] = Counter()
    failures: list[str] = []
    try:
        schema = schemathesis.openapi.from_url(router.url + "/openapi.json")  # as served
        raw = requests.get(router.url + "/openapi.json", timeout=30).json()
        with requests.Session() as session:
            both = (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
            fuzz(schema, router.url, {True: FORWARDED_EXAMPLES, False: OTHER_EXAMPLES}, both,
                 session, seen, failures)
            named = with_model_names(raw, ["a", "alpha", "b"])
            data_path = schemathesis.openapi.from_dict(named)
            fuzz(data_path.include(method="POST", path_regex="^/(v1|tokenize|detokenize)"),
                 router.url, {True: DATA_PATH_EXAMPLES, False: 0},
                 (GenerationMode.POSITIVE,), session, seen, failures)
    finally:
        for name in ("vlmhub", "uvicorn.error"):
            logging.getLogger(name).removeHandler(errors)
    print(f"fuzz: {seen['cases']} cases; " + ", ".join(
        f"{k}: {v}" for k, v in sorted(seen.items()) if k != "cases"))
    assert failures == [], failures[:10]
    internal = [r for r in errors.records if "internal error" in r or "Exception" in r]
    assert internal == [], internal[:5]
    assert seen["cases"] >= MIN_CASES, seen["cases"]
    proxied = sum(v for k, v in seen.items()
                  if k.startswith("POST /v1/chat") and k.endswith(" 200"))
    assert proxied > 0, "the data-path pass reached the engines"
    after = httpx.post(router.url + "/v1/chat/completions", timeout=60,
                       json={"model": "a", "messages": [{"role": "user", "content": "hi"}]})
    assert after.status_code == 200, after.text  # still serving


def test_fuzz_document_describes_every_route_the_router_has() -> None:
    """/openapi.json cannot drift from the app: every route it describes exists, and every
    route is described except the dashboard's own helpers under /api/ui/ (not an API)."""
    from router_support import TestSupervisor, make_config
    from starlette.routing import Route

    from vlmhub.router.app import create_app
    from vlmhub.router.openapi import build_document

    app = create_app(TestSupervisor({}), make_config())
    served = {(m, r.path.replace(":path}", "}")) for r in app.routes if isinstance(r, Route)
              for m in (r.methods or set()) - {"HEAD"}}
    doc = build_document()
    described = {(m.upper(), p) for p, item in doc["paths"].items() for m in item}
    assert described <= served, described - served
    public = {(m, p) for m, p in served if not p.startswith("/api/ui/")}
    assert public <= described, public - described
    assert doc["openapi"].startswith("3.")
