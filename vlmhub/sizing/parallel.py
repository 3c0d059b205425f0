"""Tensor parallelism: what one rank of a ``tensor_parallel_size: k`` engine holds. Pure.

vLLM's ``--tensor-parallel-size k`` runs the engine on k GPUs, one rank (worker process) on
each; each rank holds 1/k of the weights and the KV cache of its share of the attention heads,
and ``--gpu-memory-utilization`` is a fraction of EACH GPU. So a TP engine is planned per
device (docs/vram.md, "Tensor parallelism")::

    per device = weights / k                      # each rank loads its shard
               + activation_peak                  # each rank profiles its own peak (kept whole)
               + non_torch + TP_RANK_OVERHEAD_GIB # NCCL / custom all-reduce buffers (k > 1)
               + cuda_graphs                      # captured on every rank (kept whole)
               + kv_per_token x ceil(kv_heads / k) / kv_heads x tokens
               + cuda_context                     # every rank has its own

The KV share is 1/k of the heads, but a head is never split: with fewer KV heads than ranks
vLLM replicates them, one head per rank at least. Only ESTIMATED parts are divided: an engine's
log reports its own rank's figures (vLLM logs them per worker), so measured parts are already
per rank (budgets.json keys them by ``tensor_parallel_size``).
"""

from __future__ import annotations

import math

from vlmhub.spec import ModelSpec

TP_RANK_OVERHEAD_GIB = 0.25
"""What a rank of a k > 1 engine holds beyond a lone engine's parts, until measured: NCCL's
and the custom all-reduce's buffers (vLLM's non-torch memory once measured)."""


def is_power_of_two(k: int) -> bool:
    return k >= 1 and k & (k - 1) == 0


def ranks(spec: ModelSpec) -> int:
    """The GPUs one engine of ``spec`` spans (its ``tensor_parallel_size``)."""
    return spec.options.tensor_parallel_size


def weights_share(spec: ModelSpec) -> float:
    """The fraction of the weights one rank holds (estimates)."""
    return 1.0 / ranks(spec)


def kv_share(spec: ModelSpec) -> float:
    """The fraction of a token's KV bytes one rank holds: its heads, never less than one head."""
    k = ranks(spec)
    heads = spec.vram.kv_heads
    if k == 1:
        return 1.0
    if heads is None:  # kv_bytes_per_token given: assume at least k heads
        return 1.0 / k
    return math.ceil(heads / k) / heads


def rank_overhead_gib(spec: ModelSpec) -> float:
    """The per-rank communication buffers of a k > 1 engine (estimates)."""
    return TP_RANK_OVERHEAD_GIB if ranks(spec) > 1 else 0.0


def tp_problem(k: int, devices: int | None, runtime: str) -> tuple[str, str] | None:
    """``(problem, fix)`` when ``tensor_parallel_size: k`` cannot run here, else None.
    ``devices``: the cards engines may use (None: not known, not checked); ``runtime``:
    ``runtime.kind``."""
    if not is_power_of_two(k):
        lower = 1 << (k.bit_length() - 1)
        return (f"tensor_parallel_size {k} is not a power of two (vLLM splits the attention "
                f"heads evenly)", f"use {lower} or {lower * 2}")
    if k == 1:
        return None
    if runtime == "ray":
        return ("tensor_parallel_size above 1 is not supported with the ray runtime: vlmhub "
                "places each engine on one node's one GPU (vram_gib), not across GPUs",
                "use runtime.kind: process or docker on a machine with several GPUs, or "
                "tensor_parallel_size: 1")
    if devices is not None and k > devices:
        return (f"tensor_parallel_size {k} needs {k} GPUs; engines may use {devices} here",
                f"list {k} cards in gpu.devices (this machine's CUDA ids), or lower "
                f"tensor_parallel_size to {1 << (devices.bit_length() - 1)}")
    return None
