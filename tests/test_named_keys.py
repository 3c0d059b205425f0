"""Named client keys (issue 27 item 1): per-key models, rpm and tpm limits, expiry, keys from
the environment or a file, a reload that revokes one, and batches under a key's models. The
real openai client against a real router (uvicorn) over stand-in engine processes."""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
import yaml
from router_support import (
    RunningRouter,
    StubEngine,
    TestSupervisor,
    engines,
    make_config,
    running_router,
    wait_for,
)

from vlmhub.config.locate import ConfigError
from vlmhub.config.schema import load_config
from vlmhub.router.app import apply_settings
from vlmhub.router.batches import attach_batches

PLAIN = "sk-plain-0123456789"
ALICE = "sk-alice-0123456789"
MSG = [{"role": "user", "content": "hello there"}]


@pytest.fixture(scope="module")
def stubs() -> Iterator[dict[str, StubEngine]]:
    with engines(StubEngine("alpha"), StubEngine("bravo")) as started:
        yield started


def supervisor(stubs: dict[str, StubEngine]) -> TestSupervisor:
    return TestSupervisor(dict(stubs), aliases={"a": "alpha"})


def sdk(router: RunningRouter, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=router.url + "/v1", api_key=key, timeout=30, max_retries=0)


def chat(client: openai.OpenAI, model: str = "alpha") -> Any:
    return client.chat.completions.create(model=model, messages=MSG, max_tokens=4)  # type: ignore[arg-type]


def test_a_named_key_sees_only_its_models_and_others_are_unknown_to_it(
    stubs: dict[str, StubEngine]
) -> None:
    """alice may use alpha: /v1/models shows only alpha, and bravo
    answers exactly what a model that does not exist answers (OpenAI's 404, listing only
    alpha), for chat and for GET /v1/models/bravo. The plain key sees both."""
    config = make_config(api_keys=[PLAIN, {"name": "alice", "key": ALICE, "models": ["alpha"]}])
    with running_router(supervisor(stubs), config) as router:
        alice, plain = sdk(router, ALICE), sdk(router, PLAIN)
        assert [m.id for m in alice.models.list()] == ["alpha"]
        assert sorted(m.id for m in plain.models.list()) == ["alpha", "bravo"]
        assert chat(alice, "a").choices[0].message.content
        refusals = []
        for model in ("bravo", "no-such-model"):
            with pytest.raises(openai.NotFoundError) as caught:
                chat(alice, model)
            refusals.append(caught.value.body)
        forbidden, unknown = refusals
        assert forbidden == {**unknown, "message": unknown["message"].replace(  # type: ignore[index]
            "no-such-model", "bravo")}
        assert forbidden["message"] == (  # type: ignore[index]
            "The model `bravo` does not exist. Available models: alpha.")
        assert forbidden["code"] == "model_not_found"  # type: ignore[index]
        with pytest.raises(openai.NotFoundError):
            alice.models.retrieve("bravo")
        assert plain.models.retrieve("bravo").id == "bravo"
        assert chat(plain, "bravo").choices[0].message.content


def test_rpm_answers_429_with_retry_after_and_openai_rate_limit_error(
    stubs: dict[str, StubEngine]
) -> None:
    config = make_config(api_keys=[PLAIN, {"name": "bob", "key": "sk-bob-1", "rpm": 2}])
    with running_router(supervisor(stubs), config) as router:
        bob = sdk(router, "sk-bob-1")
        chat(bob)
        chat(bob)
        with pytest.raises(openai.RateLimitError) as caught:
            chat(bob)
        err = caught.value
        assert err.status_code == 429
        assert 1 <= int(err.response.headers["retry-after"]) <= 60
        assert err.body["type"] == "requests"  # type: ignore[index]
        assert err.body["code"] == "rate_limit_exceeded"  # type: ignore[index]
        assert "RPM" in err.body["message"]  # type: ignore[index]
        assert chat(sdk(router, PLAIN)).choices  # another key is not limited


def test_tpm_counts_tokens_after_the_answer_and_refuses_the_next_request(
    stubs: dict[str, StubEngine]
) -> None:
    """carol may use 10 tokens a minute: her first answer (10 tokens or more) is
    delivered, the next request is refused with type ``tokens``; a stream's usage counts too
    (the engine is asked for it)."""
    config = make_config(api_keys=[{"name": "carol", "key": "sk-carol-1", "tpm": 10},
                                   {"name": "dan", "key": "sk-dan-1", "tpm": 10}])
    with running_router(supervisor(stubs), config) as router:
        first = chat(sdk(router, "sk-carol-1"))
        assert first.usage.total_tokens >= 10
        with pytest.raises(openai.RateLimitError) as caught:
            chat(sdk(router, "sk-carol-1"))
        assert caught.value.body["type"] == "tokens"  # type: ignore[index]
        assert int(caught.value.response.headers["retry-after"]) >= 1
        dan = sdk(router, "sk-dan-1")
        assert list(dan.chat.completions.create(model="alpha", messages=MSG,  # type: ignore[arg-type]
                                                max_tokens=8, stream=True))
        with pytest.raises(openai.RateLimitError):
            chat(dan)


def test_an_expired_key_gets_401_and_one_not_yet_expired_works(
    stubs: dict[str, StubEngine]
) -> None:
    config = make_config(api_keys=[
        {"name": "old", "key": "sk-old-1", "expires": "2020-01-01"},
        {"name": "new", "key": "sk-new-1", "expires": "2999-01-01T00:00:00Z"}])
    with running_router(supervisor(stubs), config) as router:
        with pytest.raises(openai.AuthenticationError) as caught:
            chat(sdk(router, "sk-old-1"))
        assert caught.value.body["code"] == "expired_api_key"  # type: ignore[index]
        assert "sk-old-1" not in json.dumps(caught.value.body)
        with pytest.raises(openai.AuthenticationError):
            sdk(router, "sk-old-1").models.list()
        assert chat(sdk(router, "sk-new-1")).choices
        with pytest.raises(openai.AuthenticationError):
            chat(sdk(router, "sk-not-a-key"))


def test_keys_from_an_env_var_and_a_file_and_errors_that_never_echo_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stubs: dict[str, StubEngine]
) -> None:
    monkeypatch.setenv("TEAM_ERIN_KEY", "sk-erin-from-env")
    key_file = tmp_path / "frank.key"
    key_file.write_text("sk-frank-from-file\n")
    path = tmp_path / "models.yaml"
    path.write_text(yaml.safe_dump({"router": {"api_keys": [
        {"name": "erin", "key_env": "TEAM_ERIN_KEY"},
        {"name": "frank", "key_file": str(key_file)}]}}))
    config = load_config(path).config
    assert "sk-erin" not in repr(config) and "sk-frank" not in repr(config)
    with running_router(supervisor(stubs), config) as router:
        assert chat(sdk(router, "sk-erin-from-env")).choices
        assert chat(sdk(router, "sk-frank-from-file")).choices
    path.write_text("router:\n  api_keys:\n    - sk-one\n    - name: hal\n"
                    "      key_env: NOT_SET_HERE\n")
    monkeypatch.delenv("NOT_SET_HERE", raising=False)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert f"{path}:4:" in str(caught.value) and "NOT_SET_HERE" in str(caught.value)
    path.write_text("router:\n  api_keys:\n    - sk-dup-secret\n    - name: gina\n"
                    "      key: sk-dup-secret\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert f"{path}:2:" in str(caught.value) and "same key" in str(caught.value)
    assert "sk-dup-secret" not in str(caught.value)


def test_a_reload_revokes_a_named_key_from_the_next_request(stubs: dict[str, StubEngine]
                                                           ) -> None:
    keys: list[Any] = [PLAIN, {"name": "ivan", "key": "sk-ivan-1", "models": ["alpha"]}]
    with running_router(supervisor(stubs), make_config(api_keys=keys)) as router:
        ivan = sdk(router, "sk-ivan-1")
        assert chat(ivan).choices

        async def reload(config: Any) -> list[str]:
            return apply_settings(router.app, config)

        router.call(reload(make_config(api_keys=[PLAIN])))
        with pytest.raises(openai.AuthenticationError):
            chat(ivan)
        router.call(reload(make_config(api_keys=[PLAIN, {"name": "ivan", "key": "sk-ivan-1",
                                                          "models": ["bravo"]}])))
        assert [m.id for m in ivan.models.list()] == ["bravo"]  # its new models apply too


def test_a_batch_of_a_named_key_obeys_its_models_and_counts_under_its_name(
    tmp_path: Path, stubs: dict[str, StubEngine]
) -> None:
    """alice's batch asks alpha (hers) and bravo (not hers): the bravo line is answered with
    the unknown-model 404 in the error file, the alpha line runs; its tokens count under
    ``alice``."""
    config = make_config(api_keys=[PLAIN, {"name": "alice", "key": ALICE, "models": ["alpha"]}])
    router = RunningRouter(supervisor(stubs), config)
    attach_batches(router.app, tmp_path / "state")
    router.start()
    try:
        alice = sdk(router, ALICE)
        lines = [{"custom_id": f"c-{m}", "method": "POST", "url": "/v1/chat/completions",
                  "body": {"model": m, "messages": MSG, "max_tokens": 4}}
                 for m in ("alpha", "bravo")]
        data = "".join(json.dumps(x) + "\n" for x in lines).encode()
        upload = alice.files.create(file=("in.jsonl", io.BytesIO(data)), purpose="batch")
        batch = alice.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions",
                                     completion_window="24h")
        assert wait_for(lambda: alice.batches.retrieve(batch.id).status == "completed", 30)
        done = alice.batches.retrieve(batch.id)
        errors = [json.loads(x) for x in alice.files.content(done.error_file_id or "")
                  .text.splitlines()]
        assert [e["custom_id"] for e in errors] == ["c-bravo"]
        assert errors[0]["response"]["status_code"] == 404
        assert "Available models: alpha." in json.dumps(errors[0])
        rows = router.app.state.router.usage.report(None)
        assert [(r["key"], r["model"], r["requests"]) for r in rows] == [("alice", "alpha", 1)]
    finally:
        router.stop()


def test_the_plain_key_label_is_stable_and_not_the_key() -> None:
    from vlmhub.router.keys import plain_label

    label = plain_label(PLAIN.encode())
    assert label == "key-" + hashlib.sha256(PLAIN.encode()).hexdigest()[:6]
    assert PLAIN not in label and label == plain_label(PLAIN.encode())
