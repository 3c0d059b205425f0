"""The pytest plugin as a plugin author meets it: run in a separate pytest process."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

USES_DOCKER = """
import pytest

@pytest.mark.docker
def test_needs_docker(docker_client):
    assert docker_client.ping()

def test_spec_and_config(tmp_path):
    from vlmhub.testing.fixtures import stub_spec, stub_process_config
    spec = stub_spec("mine", options={"max_model_len": 4096})
    assert spec.image == "vlmhub/stub-engine:dev" and spec.hf_repo == "stub/mine"
    assert spec.options.max_model_len == 4096 and spec.options.enforce_eager
    rc = stub_process_config(tmp_path)
    assert rc.kind == "process" and rc.process_argv[1:] == ["-m", "vlmhub.testing.stub_engine"]
"""


@pytest.mark.parametrize(("ci", "outcome"), [("", "skipped"), ("true", "errors")])
def test_docker_fixture_skips_without_engine_but_fails_in_ci(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, ci: str,
    outcome: str,
) -> None:
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/nothing.sock")
    monkeypatch.setenv("CI", ci)
    pytester.makepyfile(USES_DOCKER)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, **{outcome: 1})
    if ci:
        result.stdout.fnmatch_lines(["*CI=true but no Docker engine answers*"])
