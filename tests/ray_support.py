"""A real three-node Ray cluster on this machine for the Ray tier (tests/test_ray_*.py).

``ray.cluster_utils.Cluster``: a head and two worker nodes, separate raylets, each declaring a
pretend 8 GiB GPU as the custom resource ``vram_gib`` and named by the ``vlmhub/node`` label
(``head``, ``w1``, ``w2``). Small object stores (80 MB) and one CPU each keep it light. When Ray
cannot start, the tier is skipped with the reason, except under ``CI=true``, where it FAILS.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

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


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[LocalCluster]:
    """Head + two workers, each with ``vram_gib: 8``; this process joins as a driver (to list
    the engine actors) in the ``vlmhub`` namespace. Shut down at the end of the module."""
    try:
        import ray
        from ray.cluster_utils import Cluster
    except ImportError as exc:
        ray_unavailable(f"ray is not installed ({exc}); pip install 'ray[default]'")
    try:
        cluster = Cluster(initialize_head=True, head_node_args={
            **NODE_ARGS, "resources": {"vram_gib": 8}, "include_dashboard": False,
            "labels": {"vlmhub/node": "head"}})
        workers = {
            name: cluster.add_node(**NODE_ARGS, resources={"vram_gib": 8},
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


def engine_actors() -> dict[str, str]:
    """Model -> the name of its live engine actor (unique per engine start)."""
    import ray

    out: dict[str, str] = {}
    for entry in ray.util.list_named_actors(all_namespaces=True):
        name = str(entry["name"])
        if entry.get("namespace") == "vlmhub" and name.startswith("vlmhub."):
            out[name.split(".")[1]] = name
    return out
