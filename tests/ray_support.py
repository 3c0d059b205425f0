"""A real three-node Ray cluster on this machine for the Ray tier (tests/test_ray_*.py).

``ray.cluster_utils.Cluster``: a head and two worker nodes, separate raylets, each declaring a
pretend GPU (8 GiB; :func:`local_cluster` takes other sizes) as the custom resource
``vram_gib`` and named by the ``vlmhub/node`` label (``head``, ``w1``, ``w2``). Small object
stores (80 MB) and one CPU each keep it light. When Ray cannot start, the tier is skipped with
the reason, except under ``CI=true``, where it FAILS.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import openai
import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
MB = 1024 * 1024
NODE_ARGS: dict[str, Any] = {"num_cpus": 1, "object_store_memory": 80 * MB}


@dataclass
class LocalCluster:
    cluster: Any
    workers: dict[str, Any]
    """Worker node name -> its Ray node object (for ``cluster.remove_node``)."""

    @property
    def address(self) -> str:
        return str(self.cluster.address)


def ray_unavailable(reason: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI=true but Ray cannot start a local cluster: {reason}")
    pytest.skip(f"Ray cannot start a local cluster: {reason}")


def local_cluster(head_gib: float = 8.0, worker_gib: float = 8.0) -> Iterator[LocalCluster]:
    """Head + two workers (``w1``, ``w2``) declaring ``head_gib`` and ``worker_gib`` of
    ``vram_gib``; this process joins as a driver (to list the engine actors) in the ``vlmhub``
    namespace. Shut down when the generator is closed."""
    try:
        import ray
        from ray.cluster_utils import Cluster
    except ImportError as exc:
        ray_unavailable(f"ray is not installed ({exc}); pip install 'ray[default]'")
    try:
        cluster = Cluster(initialize_head=True, head_node_args={
            **NODE_ARGS, "resources": {"vram_gib": head_gib}, "include_dashboard": False,
            "labels": {"vlmhub/node": "head"}})
        workers = {
            name: cluster.add_node(**NODE_ARGS, resources={"vram_gib": worker_gib},
                                   labels={"vlmhub/node": name})
            for name in ("w1", "w2")
        }
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, namespace="vlmhub", log_to_driver=False)
    except Exception as exc:
        ray_unavailable(f"{type(exc).__name__}: {exc}")
    try:
        yield LocalCluster(cluster, workers)
    finally:
        ray.shutdown()
        cluster.shutdown()


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[LocalCluster]:
    """Head + two workers, each with ``vram_gib: 8`` (:func:`local_cluster`), per module."""
    yield from local_cluster()


def engine_actors() -> dict[str, str]:
    """Engine (a model, or a replica ``model#n``) -> the name of its live engine actor
    (unique per engine start)."""
    import ray

    out: dict[str, str] = {}
    for entry in ray.util.list_named_actors(all_namespaces=True):
        name = str(entry["name"])
        if entry.get("namespace") == "vlmhub" and name.startswith("vlmhub."):
            out[name.split(".")[1]] = name
    return out


def demo_config(cluster: LocalCluster, port: int) -> dict[str, Any]:
    """examples/ray-demo.yaml for a router on ``port`` joined to ``cluster``: health checks every
    0.5 s, engine ports in a random block below the ephemeral range Ray's workers use."""
    config: dict[str, Any] = yaml.safe_load((REPO / "examples" / "ray-demo.yaml").read_text())
    config["router"].update(port=port, health_interval_s=0.5)
    config["runtime"]["address"] = cluster.address
    base = random.randrange(20000, 30000, 100)
    config["runtime"]["port_range"] = [base, base + 99]
    return config


@dataclass
class RayHub:
    """A `vlmhub route` process (route_support.route_process) on a local cluster."""

    url: str
    cluster: LocalCluster
    log: Path
    """The router's log (route_support): its engine events, in order."""

    def client(self) -> openai.OpenAI:
        """The real openai SDK on the router, without retries."""
        return openai.OpenAI(base_url=self.url + "/v1", api_key="none", timeout=120,
                             max_retries=0)

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        """``vlmhub ARGS --config`` the router's config, with a state dir of its own (it joins
        the cluster as another driver); fails unless it exits 0."""
        env = {**os.environ, "VLMHUB_STATE_DIR": str(self.log.parent / "cli-state")}
        done = subprocess.run([sys.executable, "-m", "vlmhub", *args, "--config",
                               str(self.log.parent / "models.yaml")],
                              capture_output=True, text=True, env=env, timeout=120)
        assert done.returncode == 0, done.stderr
        return done


class Clients:
    """``count`` client threads, each calling :meth:`one` (with its index) in a loop from the
    start of the ``with`` block until its end (then they are joined)."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.stop = threading.Event()
        self.threads: list[threading.Thread] = []

    def one(self, index: int) -> None:
        """One request of client ``index`` (recorded by the subclass)."""
        raise NotImplementedError

    def _loop(self, index: int) -> None:
        while not self.stop.is_set():
            self.one(index)

    def __enter__(self) -> Self:
        for i in range(self.count):
            t = threading.Thread(target=self._loop, args=(i,), daemon=True)
            t.start()
            self.threads.append(t)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(120)
