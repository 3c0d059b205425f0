"""scripts/start-dockerd.sh (issue 21 item 17): the Docker engine it starts lives in a private
directory made for the run (random name, 0700, root's), recorded in a 0600 file; a second call
reuses that engine, and a record or a directory that is not private is never trusted.

The script is run for real and starts real dockerds, one at a time, of this test only: their
own record file (VLMHUB_DOCKERD_RECORD in tmp_path), no bridge and no iptables rules, so the
engine the rest of the suite uses is left alone (each runs in a network namespace of its own,
so the host's docker0 is never touched); each is stopped by its pid at the end."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fault_support import REPO

from vlmhub.testing.pytest_plugin import skip_or_fail

SCRIPT = REPO / "scripts" / "start-dockerd.sh"
BESIDE = "--bridge=none --iptables=false --ip-masq=false"  # nothing shared with another engine
TMP = Path(tempfile.gettempdir())


def run_script(record: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "DOCKER_HOST"}
    env |= {"VLMHUB_DOCKERD_RECORD": str(record), "VLMHUB_DOCKERD_ARGS": BESIDE,
            "TMPDIR": str(TMP)}
    # Its own network namespace too: a dockerd beside another one must not touch the host's
    # docker0 (one that stopped here took the shared engine's bridge with it).
    return subprocess.run(["unshare", "--net", "bash", str(SCRIPT), *args], env=env,
                          capture_output=True, text=True, timeout=180)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def stop_dockerd(run_dir: Path) -> None:
    """SIGTERM the dockerd whose pidfile is in ``run_dir``, wait until it is gone, remove it."""
    with contextlib.suppress(FileNotFoundError, ValueError, ProcessLookupError):
        pid = int((run_dir / "dockerd.pid").read_text())
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 60
        while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.2)
    shutil.rmtree(run_dir, ignore_errors=True)


@pytest.fixture
def own_dockerds() -> Iterator[None]:
    """Afterwards, the engines in the run directories new in TMP (this test's) are stopped;
    never one that was there before."""
    before = set(TMP.glob("vlmhub-dockerd*"))
    try:
        yield
    finally:
        for run_dir in set(TMP.glob("vlmhub-dockerd*")) - before:
            stop_dockerd(run_dir)


@pytest.mark.docker
def test_start_dockerd_uses_a_private_random_directory_and_trusts_only_private_records(
        tmp_path: Path, own_dockerds: None) -> None:
    if os.geteuid() != 0:
        skip_or_fail("dockerd needs root")
    for tool in ("dockerd", "docker", "flock", "unshare"):
        if shutil.which(tool) is None:
            skip_or_fail(f"{tool} is not installed (scripts/test.sh installs docker.io)")
    record = tmp_path / "dockerd.dir"

    first = run_script(record)
    assert first.returncode == 0, first.stderr
    host = first.stdout.splitlines()[-1]
    assert host.startswith("unix://") and host.endswith("/docker.sock"), first.stdout
    run_dir = Path(host.removeprefix("unix://")).parent
    assert not run_dir.is_symlink() and run_dir.is_dir()
    assert mode(run_dir) == 0o700, oct(mode(run_dir))  # nobody else may enter it
    assert run_dir.stat().st_uid == 0
    assert run_dir.parent == TMP and re.fullmatch(r"vlmhub-dockerd\.[A-Za-z0-9]{10}",
                                                  run_dir.name), run_dir
    assert record.read_text() == f"{run_dir}\n"  # where it is, for the next call
    assert mode(record) == 0o600 and record.stat().st_uid == 0
    env = {**os.environ, "DOCKER_HOST": host}
    assert subprocess.run(["docker", "version"], env=env, capture_output=True,
                          timeout=60).returncode == 0
    pid = (run_dir / "dockerd.pid").read_text()

    again = run_script(record)  # a second call reuses the running engine
    assert again.returncode == 0, again.stderr
    assert again.stdout.splitlines()[-1] == host
    assert (run_dir / "dockerd.pid").read_text() == pid and Path(f"/proc/{pid}").exists()
    running = run_script(record, "--running")
    assert running.returncode == 0 and running.stdout.strip() == host, running.stderr

    def refused() -> None:
        out = run_script(record, "--running")
        assert out.returncode != 0 and host not in out.stdout, out.stdout
        assert "can be trusted" in out.stderr

    run_dir.chmod(0o755)  # the engine still answers there, but others could enter
    refused()
    run_dir.chmod(0o700)
    os.chown(run_dir, 65534, 65534)  # another user's directory
    refused()
    os.chown(run_dir, 0, 0)
    record.chmod(0o644)  # a record others could have written
    refused()
    record.chmod(0o600)
    kept = tmp_path / "kept.dir"
    record.rename(kept)
    record.symlink_to(kept)  # a record that is a link
    refused()
    record.unlink()
    kept.rename(record)
    record.write_text(f"{run_dir.name}\n")  # not an absolute path
    refused()
    record.write_text(f"{run_dir}\n")
    assert run_script(record, "--running").stdout.strip() == host  # all put back

    stop_dockerd(run_dir)  # a record of an engine that has gone is not reused
    refused()
    fresh = run_script(record)
    assert fresh.returncode == 0, fresh.stderr
    other = Path(fresh.stdout.splitlines()[-1].removeprefix("unix://")).parent
    assert other != run_dir and mode(other) == 0o700  # a new name each run
    assert record.read_text() == f"{other}\n"
