"""The VRAM planner: pure functions from model specs and a GPU to budgets and vLLM flags.

Nothing here does I/O or logs; every function is deterministic, so it is table-tested and
``vlmhub plan`` and the scheduler can call it freely.

Memory model (see docs/vram.md)::

    engine_gib = weights + activation_peak + non_torch + cuda_graphs (0 if eager) + kv_cache
    kv_cache   = kv_bytes_per_token * max_model_len * kv_sequences
    footprint  = engine_gib + cuda_context       # what the instance really holds on the GPU

With ``tensor_parallel_size: k`` every figure is ONE rank's, on each of its k GPUs
(:mod:`vlmhub.sizing.parallel`: weights / k, a share of the KV heads, a rank's buffers), and
``--gpu-memory-utilization`` is that rank's fraction of its card, as vLLM applies it per GPU.

``--gpu-memory-utilization`` covers ``engine_gib`` only (the CUDA context is outside it) and
is a fraction of the card's TOTAL memory, so it is ``engine_gib / total``, never "0.9".

Where an engine start measured the parts (:class:`Measured`, kept by :mod:`vlmhub.sizing.budgets`),
the measured figures replace the plugin's estimates, plus a safety margin; the budget says
which it is (``Budget.source``: ``"estimated"`` or ``"measured 2026-12-02"``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import combinations

from vlmhub.sizing.parallel import kv_share, rank_overhead_gib, weights_share
from vlmhub.spec import GIB, ModelSpec, version_tuple

KV_CACHE_BYTES_SINCE = "0.11.0"
"""First vLLM release with ``--kv-cache-memory-bytes`` (see docs/vram.md)."""
BLOCK_TOKENS = 16
"""vLLM allocates KV in blocks of 16 tokens; suggested lengths are rounded down to it."""
MEASURED_MARGIN = 0.05
MEASURED_MARGIN_MIN_GIB = 0.1
"""A measured budget adds max(5 %, 0.1 GiB) of its measured non-KV parts: run-to-run noise."""


@dataclass(frozen=True)
class Measured:
    """What engine starts reported for one model at one setting (GiB; None = not reported),
    and how much a start that failed for memory raised the estimate.

    ``raised_activation_gib`` goes to the activation (inside ``--gpu-memory-utilization``);
    ``raised_headroom_gib`` to the room kept outside it (a free-memory failure at start-up
    means the card had less free than planned: the scheduler must free more before this
    model starts, while the engine asks for the same).
    """

    weights_gib: float | None = None
    activation_gib: float | None = None
    non_torch_gib: float | None = None
    cuda_graph_gib: float | None = None
    kv_bytes_per_token: float | None = None
    measured_on: str | None = None
    raised_activation_gib: float = 0.0
    raised_headroom_gib: float = 0.0
    raised_on: str | None = None

    @property
    def any_measured(self) -> bool:
        return self.measured_on is not None and any(
            v is not None
            for v in (self.weights_gib, self.activation_gib, self.non_torch_gib,
                      self.cuda_graph_gib, self.kv_bytes_per_token)
        )  # fmt: skip

    @property
    def raised_gib(self) -> float:
        return self.raised_activation_gib + self.raised_headroom_gib


@dataclass(frozen=True)
class Gpu:
    """The card vlmhub plans for. ``usable_gib`` is what vlmhub may hand out."""

    total_gib: float
    reserve_gib: float = 0.0
    budget_gib: float | None = None
    name: str = "GPU"
    source: str = "config"
    devices: int = 1
    """The cards engines may use (``gpu.devices``, else the machine's); a
    ``tensor_parallel_size`` above it cannot run (:func:`vlmhub.sizing.parallel.tp_problem`)."""

    @property
    def usable_gib(self) -> float:
        usable = self.total_gib - self.reserve_gib
        if self.budget_gib is not None:
            usable = min(usable, self.budget_gib)
        return max(usable, 0.0)


@dataclass(frozen=True)
class Budget:
    """One model's memory, part by part, in GiB."""

    model: str
    weights_gib: float
    activation_gib: float
    non_torch_gib: float
    cuda_graph_gib: float
    kv_cache_gib: float
    kv_tokens: int
    cuda_context_gib: float
    sleep_residual_gib: float
    margin_gib: float = 0.0
    source: str = "estimated"
    """``"estimated"`` (the plugin's figures) or ``"measured YYYY-MM-DD"`` (an engine's log)."""
    raised_gib: float = 0.0
    """Added after a start that failed for memory (already inside the parts above)."""

    @property
    def measured(self) -> bool:
        return self.source.startswith("measured")

    @property
    def label(self) -> str:
        """``source``, plus the raise after a memory failure if any, for people."""
        if self.raised_gib <= 0:
            return self.source
        return f"{self.source}, +{self.raised_gib:.2f} GiB after a memory failure"

    @property
    def engine_gib(self) -> float:
        """What ``--gpu-memory-utilization`` must cover."""
        return (
            self.weights_gib
            + self.activation_gib
            + self.non_torch_gib
            + self.cuda_graph_gib
            + self.margin_gib
            + self.kv_cache_gib
        )

    @property
    def footprint_gib(self) -> float:
        """What the running instance holds on the card, CUDA context included."""
        return self.engine_gib + self.cuda_context_gib

    @property
    def kv_cache_bytes(self) -> int:
        return int(self.kv_cache_gib * GIB)


class DoesNotFit(ValueError):
    """A model cannot fit the GPU even alone. ``max_model_len`` is the largest that would."""

    def __init__(self, model: str, needed_gib: float, usable_gib: float, max_model_len: int):
        self.model = model
        self.needed_gib = needed_gib
        self.usable_gib = usable_gib
        self.max_model_len = max_model_len
        if max_model_len > 0:
            fix = f"set max_model_len to {max_model_len} or less, or raise the GPU budget"
        else:
            fix = "its weights alone do not fit: choose a smaller or quantized variant"
        super().__init__(
            f"{model} needs {needed_gib:.2f} GiB but only {usable_gib:.2f} GiB of the GPU "
            f"is usable; {fix}"
        )


@dataclass(frozen=True)
class _Parts:
    weights: float
    activation: float
    non_torch: float
    graphs: float
    margin: float
    context: float
    kv_per_token: float
    source: str
    raised: float

    @property
    def fixed(self) -> float:
        """Everything inside --gpu-memory-utilization except the KV cache."""
        return self.weights + self.activation + self.non_torch + self.graphs + self.margin


def _pick(measured: float | None, estimate: float) -> float:
    return estimate if measured is None else measured


def _parts(spec: ModelSpec, measured: Measured | None) -> _Parts:
    """The parts of the budget: measured where an engine reported them, else estimated."""
    v, eager = spec.vram, spec.options.enforce_eager
    m = measured or Measured()
    graphs = 0.0 if eager else _pick(m.cuda_graph_gib, v.cuda_graph_gib)
    weights = _pick(m.weights_gib, v.weights_gib * weights_share(spec))  # a rank's (parallel)
    activation = _pick(m.activation_gib, v.activation_gib)
    non_torch = _pick(m.non_torch_gib, v.non_torch_gib + rank_overhead_gib(spec))
    margin, source = 0.0, "estimated"
    if m.any_measured:
        base = weights + activation + non_torch + graphs
        margin = max(MEASURED_MARGIN * base, MEASURED_MARGIN_MIN_GIB)
        source = f"measured {m.measured_on}"
    return _Parts(
        weights=weights,
        activation=activation + m.raised_activation_gib,
        non_torch=non_torch,
        graphs=graphs,
        margin=margin,
        context=v.cuda_context_gib + m.raised_headroom_gib,
        kv_per_token=_pick(m.kv_bytes_per_token, v.kv_per_token * kv_share(spec)),
        source=source,
        raised=m.raised_gib,
    )


def kv_sequences(spec: ModelSpec) -> float:
    """Full-length sequences the KV cache holds: the plugin's figure, but never more than
    ``max_num_seqs`` (the engine never runs more sequences at once)."""
    seqs = spec.vram.kv_sequences
    if spec.options.max_num_seqs is not None:
        seqs = min(seqs, float(spec.options.max_num_seqs))
    return seqs


def budget_for(
    spec: ModelSpec, budget_gib: float | None = None, measured: Measured | None = None
) -> Budget:
    """The memory ``spec`` needs at its max_model_len (measured parts where known).

    With ``budget_gib`` (a user override of the whole footprint) the KV cache takes what the
    fixed parts leave; a budget too small for one full-length sequence raises ``DoesNotFit``.
    """
    p = _parts(spec, measured)
    tokens = math.ceil(spec.options.max_model_len * kv_sequences(spec))
    kv_gib = tokens * p.kv_per_token / GIB
    if budget_gib is not None:
        kv_gib = budget_gib - p.context - p.fixed
        tokens = int(kv_gib * GIB // p.kv_per_token)
        if tokens < spec.options.max_model_len:
            needed = p.fixed + p.context + spec.options.max_model_len * p.kv_per_token / GIB
            raise DoesNotFit(spec.name, needed, budget_gib, _round_len(tokens))
    return Budget(
        model=spec.name,
        weights_gib=p.weights,
        activation_gib=p.activation,
        non_torch_gib=p.non_torch,
        cuda_graph_gib=p.graphs,
        kv_cache_gib=kv_gib,
        kv_tokens=tokens,
        cuda_context_gib=p.context,
        sleep_residual_gib=spec.vram.sleep_residual_gib,
        margin_gib=p.margin,
        source=p.source,
        raised_gib=p.raised,
    )


def _round_len(tokens: float) -> int:
    return max(int(tokens) // BLOCK_TOKENS * BLOCK_TOKENS, 0)


def max_model_len_that_fits(
    spec: ModelSpec, usable_gib: float, measured: Measured | None = None
) -> int:
    """The largest max_model_len (a multiple of 16) whose budget fits in ``usable_gib``."""
    p = _parts(spec, measured)
    room = usable_gib - p.context - p.fixed
    if room <= 0:
        return 0
    return _round_len(room * GIB / p.kv_per_token / kv_sequences(spec))


def check_fits_alone(
    spec: ModelSpec, gpu: Gpu, budget_gib: float | None = None, measured: Measured | None = None
) -> Budget:
    """The model's budget, or ``DoesNotFit`` naming the largest max_model_len that would fit."""
    budget = budget_for(spec, budget_gib, measured)
    if budget.footprint_gib > gpu.usable_gib + 1e-9:
        raise DoesNotFit(
            spec.name,
            budget.footprint_gib,
            gpu.usable_gib,
            max_model_len_that_fits(spec, gpu.usable_gib, measured),
        )
    return budget


def gpu_memory_utilization(budget: Budget, gpu: Gpu) -> float:
    """The per-instance fraction of the card's total, rounded DOWN to 0.001.

    Down, so that instances planned to fill the card exactly never ask vLLM's start-up check
    for more than the card has; the KV cache is sized in bytes where vLLM allows it.
    """
    return math.floor(budget.engine_gib / gpu.total_gib * 1000) / 1000


def supports_kv_cache_bytes(vllm_version: str) -> bool:
    return version_tuple(vllm_version) >= version_tuple(KV_CACHE_BYTES_SINCE)


def memory_flags(spec: ModelSpec, budget: Budget, gpu: Gpu) -> list[str]:
    """The vLLM flags that hold one instance to ``budget``.

    Always a per-instance ``--gpu-memory-utilization`` (vLLM's start-up check compares it
    with the free memory). An estimated budget stops there: vLLM then profiles, sizes the KV
    cache from what the fraction leaves, and logs the weights, peak activation, non-torch and
    CUDA-graph memory it measured, which :mod:`vlmhub.sizing.budgets` records. A measured budget,
    where the spec's vLLM has ``--kv-cache-memory-bytes``, also sets the KV cache in bytes,
    so the instance does not grow into the slack of the fraction.
    """
    flags = ["--gpu-memory-utilization", f"{gpu_memory_utilization(budget, gpu):.3f}"]
    if budget.measured and supports_kv_cache_bytes(spec.vllm_version):
        flags += ["--kv-cache-memory-bytes", str(budget.kv_cache_bytes)]
    return flags


def fits(footprints: Iterable[float], usable_gib: float) -> bool:
    return sum(footprints) <= usable_gib + 1e-9


def fitting_sets(budgets: Sequence[Budget], gpu: Gpu) -> list[frozenset[str]]:
    """Every maximal set of models that fit on the GPU together, largest sets first."""
    names = [b.model for b in budgets]
    size = {b.model: b.footprint_gib for b in budgets}
    found: list[frozenset[str]] = []
    for r in range(len(names), 0, -1):
        for combo in combinations(names, r):
            s = frozenset(combo)
            if fits((size[n] for n in s), gpu.usable_gib) and not any(s < f for f in found):
                found.append(s)
    return found
