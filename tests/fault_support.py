"""Real parts for the fault and security suites (issue 10): `vlmhub route` as its own process
over stand-in engines (from vlmhub.testing.soak), the engines of a state dir, and a private
Docker engine that a test may stop and start without touching the shared one."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
import uuid
from pathlib import Path

from vlmhub.engines.procfs import alive
from vlmhub.testing.pytest_plugin import skip_or_fail
from vlmhub.testing.soak import (
    REPO,
    RouterProcess,
    listening,
    running,
    stub_models,
    write_config,
)

__all__ = ["REPO", "PrivateDockerd", "RouterProcess", "alive", "engine_pids", "listening",
           "running", "stub_models", "write_config"]


def engine_pids(state: Path) -> dict[str, int]:
    """The engines recorded in a state dir: model -> pid."""
    import json

    return {p.stem: int(json.loads(p.read_text())["pid"])
            for p in sorted((state / "process").glob("*.json"))}


class PrivateDockerd:
    """A Docker engine of this test alone: its own socket, data root, exec root and bridge
    (no iptables: ports are published by docker-proxy on 127.0.0.1). The stand-in image is
    copied from the shared engine. :meth:`stop` and :meth:`start` take it down and up again
    like ``systemctl restart docker`` would, containers and all."""

    def __init__(self, root: Path, shared_host: str | None) -> None:
        self.root = root
        self.host = f"unix://{root}/d.sock"
        self.bridge = f"vlmt{uuid.uuid4().hex[:8]}"
        self.shared_host = shared_host
        self.proc: subprocess.Popen[bytes] | None = None
        for tool in ("dockerd", "docker", "ip"):
            if shutil.which(tool) is None:
                skip_or_fail(f"{tool} is not installed (a private Docker engine needs it)")
        if os.geteuid() != 0:
            skip_or_fail("a private Docker engine needs root")

    def _docker(self, *args: str, host: str | None = None) -> None:
        env = {**os.environ, "DOCKER_HOST": host or self.host}
        subprocess.run(["docker", *args], env=env, check=True, capture_output=True, timeout=120)

    def setup(self, image: str) -> PrivateDockerd:
        third = 200 + int(self.bridge[-2:], 16) % 50
        for cmd in (["link", "add", "name", self.bridge, "type", "bridge"],
                    ["addr", "add", f"172.31.{third}.1/24", "dev", self.bridge],
                    ["link", "set", self.bridge, "up"]):
            subprocess.run(["ip", *cmd], check=True, capture_output=True)
        self.start()
        env_src = {**os.environ}
        if self.shared_host:
            env_src["DOCKER_HOST"] = self.shared_host
        save = subprocess.Popen(["docker", "save", image], stdout=subprocess.PIPE, env=env_src)
        load = subprocess.run(["docker", "load"], stdin=save.stdout, capture_output=True,
                              env={**os.environ, "DOCKER_HOST": self.host}, timeout=300)
        save.wait(60)
        assert load.returncode == 0, load.stderr
        return self

    def start(self) -> None:
        """Start the engine and wait until it answers."""
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / "dockerd.log", "ab") as out:
            self.proc = subprocess.Popen(
                ["dockerd", "--host", self.host, "--data-root", str(self.root / "data"),
                 "--exec-root", str(self.root / "exec"), "--pidfile", str(self.root / "d.pid"),
                 "--bridge", self.bridge, "--iptables=false", "--ip-masq=false"],
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with contextlib.suppress(subprocess.CalledProcessError):
                self._docker("version")
                return
            time.sleep(0.3)
        raise AssertionError("the private dockerd did not come up:\n"
                             + (self.root / "dockerd.log").read_text()[-3000:])

    def stop(self) -> None:
        """SIGTERM the engine (it stops its containers first) and wait until it is gone."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            out = subprocess.run(["docker", "ps", "-aq"], capture_output=True, text=True,
                                 env={**os.environ, "DOCKER_HOST": self.host}, timeout=30)
            if out.stdout.split():
                self._docker("rm", "-f", *out.stdout.split())
        self.stop()
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True)
        shutil.rmtree(self.root, ignore_errors=True)
