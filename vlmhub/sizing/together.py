"""Fit a group of models on the GPU at the same time (``together:`` in models.yaml).

Pure functions: :func:`fit_together` takes the specs of a group, the GPU and a way to look up
measured budgets, and returns a :class:`GroupPlan`. When the group does not fit at the
plugins' settings, the planner lowers, within each plugin's :class:`~vlmhub.spec.Floors`:

1. ``max_num_seqs``, where it bounds how many full-length sequences the KV cache must hold
   (a model whose KV cache holds one sequence keeps its ``max_num_seqs``);
2. then ``max_model_len`` (the KV cache), all members by the same fraction;
3. then ``max_pixels`` (the image cap: the activation peak vLLM profiles, and the context
   one image needs), all members by the same fraction. A model's ``max_model_len`` never
   drops below one full input plus its ``min_output_tokens`` (a full page for dots.ocr).

It keeps each setting as high as the fit allows, and says why when even the floors do not fit.
No I/O, no logging: ``vlmhub plan``, ``config check`` and the router call it freely.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from vlmhub.sizing.vram import BLOCK_TOKENS, Budget, Gpu, Measured, budget_for
from vlmhub.spec import ModelSpec

MeasureFn = Callable[[ModelSpec], Measured | None]
_STEPS = 24  # bisection steps on a fraction: finer than one 16-token block for any model


def _no_measure(spec: ModelSpec) -> Measured | None:
    return None


@dataclass(frozen=True)
class Caps:
    """The memory-changing settings of one member."""

    max_num_seqs: int | None
    max_model_len: int
    max_pixels: int | None

    @staticmethod
    def of(spec: ModelSpec) -> Caps:
        return Caps(spec.options.max_num_seqs, spec.options.max_model_len, spec.max_pixels)


@dataclass(frozen=True)
class Member:
    """One model of a group: its default and its planned (capped) spec and budget."""

    name: str
    spec: ModelSpec
    budget: Budget
    default_budget: Budget
    caps: Caps
    default_caps: Caps

    @property
    def lowered(self) -> list[str]:
        """``"max_model_len 24576 -> 12288"`` for each setting the planner lowered."""
        out = []
        for field in ("max_num_seqs", "max_model_len", "max_pixels"):
            was, now = getattr(self.default_caps, field), getattr(self.caps, field)
            if was != now:
                out.append(f"{field} {was} -> {now}")
        return out


@dataclass(frozen=True)
class GroupPlan:
    """How a group fits (``fits``), with the caps chosen per member, or why it cannot."""

    names: tuple[str, ...]
    fits: bool
    members: tuple[Member, ...]
    usable_gib: float
    reason: str = ""

    @property
    def total_gib(self) -> float:
        return sum(m.budget.footprint_gib for m in self.members)

    @property
    def default_total_gib(self) -> float:
        return sum(m.default_budget.footprint_gib for m in self.members)

    @property
    def lowered(self) -> bool:
        return any(m.lowered for m in self.members)

    def summary(self) -> str:
        """One paragraph for people: the trade-off, or the reason."""
        group = " + ".join(self.names)
        if not self.fits:
            return f"{group} cannot be resident together: {self.reason}"
        if not self.lowered:
            return (
                f"{group} fit together at their settings: {self.total_gib:.2f} of "
                f"{self.usable_gib:.2f} GiB"
            )
        caps = "; ".join(f"{m.name}: {', '.join(m.lowered)}" for m in self.members if m.lowered)
        return (
            f"{group} fit together with lower caps ({caps}): {self.total_gib:.2f} of "
            f"{self.usable_gib:.2f} GiB (at their defaults {self.default_total_gib:.2f} GiB)"
        )


def _round_up(n: int) -> int:
    return -(-n // BLOCK_TOKENS) * BLOCK_TOKENS


def _pixels(spec: ModelSpec, scale: float) -> int | None:
    """The pixel cap at ``scale`` of the default, within the floor, whole tokens."""
    v, floor = spec.vision, spec.floors.max_pixels
    if v is None or floor is None or floor >= v.max_pixels:
        return spec.max_pixels
    per_token = v.patch_factor**2
    top, low = v.max_pixels // per_token, -(-floor // per_token)
    return max(low, int(top * scale)) * per_token


def _apply(spec: ModelSpec, seqs: int | None, len_scale: float, px_scale: float) -> ModelSpec:
    """``spec`` with the three levers set; never above the plugin's own settings."""
    o = spec.options
    new_seqs = None  # lowered only where it shrinks the KV cache (fewer full sequences)
    if seqs is not None and o.max_num_seqs is not None and seqs < spec.vram.kv_sequences:
        new_seqs = max(spec.floors.max_num_seqs, min(o.max_num_seqs, seqs))
    pixels = _pixels(spec, px_scale)
    floor_len = min(_round_up(spec.min_model_len_at(pixels)), o.max_model_len)
    length = int(o.max_model_len * len_scale) // BLOCK_TOKENS * BLOCK_TOKENS
    return spec.with_caps(
        max_num_seqs=new_seqs,
        max_model_len=max(floor_len, min(length, o.max_model_len)),
        max_pixels=pixels if pixels != spec.max_pixels else None,
    )


def _largest(ok: Callable[[float], bool]) -> float:
    """The largest fraction in [0, 1] for which ``ok`` holds (``ok(0)`` must hold)."""
    lo, hi = 0.0, 1.0
    if ok(hi):
        return hi
    for _ in range(_STEPS):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if ok(mid) else (lo, mid)
    return lo


def fit_together(
    specs: Sequence[ModelSpec], gpu: Gpu, measure: MeasureFn = _no_measure
) -> GroupPlan:
    """Plan ``specs`` to be resident on ``gpu`` at once; see the module docstring."""
    names = tuple(s.name for s in specs)

    def plan(seqs: int | None, f: float, g: float) -> list[tuple[ModelSpec, Budget]]:
        out = []
        for s in specs:
            capped = _apply(s, seqs, f, g)
            out.append((capped, budget_for(capped, None, measure(capped))))
        return out

    def fits(seqs: int | None, f: float, g: float) -> bool:
        total = sum(b.footprint_gib for _, b in plan(seqs, f, g))
        return total <= gpu.usable_gib + 1e-9

    def result(seqs: int | None, f: float, g: float) -> GroupPlan:
        members = tuple(
            Member(s.name, capped, b, budget_for(s, None, measure(s)), Caps.of(capped),
                   Caps.of(s))
            for s, (capped, b) in zip(specs, plan(seqs, f, g), strict=True)
        )  # fmt: skip
        return GroupPlan(names, True, members, gpu.usable_gib)

    top = max((s.options.max_num_seqs or 1 for s in specs), default=1)
    for seqs in sorted({top, *(2**i for i in range(top.bit_length()))}, reverse=True):
        if fits(seqs, 1.0, 1.0):
            return result(seqs, 1.0, 1.0)
    if fits(1, 0.0, 1.0):
        return result(1, _largest(lambda f: fits(1, f, 1.0)), 1.0)
    if fits(1, 0.0, 0.0):
        g = _largest(lambda g: fits(1, 0.0, g))
        return result(1, _largest(lambda f: fits(1, f, g)), g)
    return _cannot(specs, gpu, plan(1, 0.0, 0.0), measure)


def _cannot(
    specs: Sequence[ModelSpec],
    gpu: Gpu,
    floor: list[tuple[ModelSpec, Budget]],
    measure: MeasureFn,
) -> GroupPlan:
    need = sum(b.footprint_gib for _, b in floor)
    fixed = sum(b.footprint_gib - b.kv_cache_gib for _, b in floor)
    settings = "; ".join(
        f"{s.name}: max_num_seqs {s.options.max_num_seqs}, max_model_len "
        f"{s.options.max_model_len}" + (f", max_pixels {s.max_pixels}" if s.max_pixels else "")
        for s, _ in floor
    )
    reason = (
        f"even at the lowest settings their plugins allow ({settings}) they need "
        f"{need:.2f} GiB ({fixed:.2f} GiB before any KV cache), and {gpu.usable_gib:.2f} GiB "
        "is usable. Fix: pick smaller or quantized variants, give vlmhub more of the GPU "
        "(gpu.reserve_gib, gpu.budget_gib), or drop a model from the group"
    )
    members = tuple(
        Member(s.name, capped, b, budget_for(s, None, measure(s)), Caps.of(capped), Caps.of(s))
        for s, (capped, b) in zip(specs, floor, strict=True)
    )
    return GroupPlan(tuple(s.name for s in specs), False, members, gpu.usable_gib, reason)
