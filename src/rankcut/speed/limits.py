"""Which ranks run faster than the dense matrix on this machine: the speed break-even rank.

A factored (m × n) map at rank r stores r·(m+n) numbers, so it is smaller than dense below
r* = mn/(m+n). Faster is a stricter test: two thin matmuls reach a lower share of the
machine's speed than one square one, so a module factored just below r* is smaller but slower
(SmolLM2 at 80% kept: 60 of 210 modules). The speed limit of a shape is the highest rank whose
factors time faster than dense over the model's workloads (geometric mean of the time ratios at
decode and prefill token counts, as `rankcut.speed.layouts.dense_fallback_` decides), found by bisection
since the factored time grows with the rank.

A budget given these limits (`MethodConfig.speed_limits`) chooses, for each module, a rank up to
its limit or dense, so that the parameter budget still holds after the speed decisions: the
post-hoc dense fallback instead puts modules back after the allocation and overshoots it.
Limits are facts about one machine: they are recorded with the compressed model.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from ..core.ranks import shape_key, size_limit
from ..core.targets import ALL_LINEAR, select_targets
from .layouts import factored_to_dense_ratio
from .timing import cold_bytes, geometric_mean, workload_tokens


def speed_limit(out_features: int, in_features: int, tokens: Sequence[int], repeats: int = 7,
                dtype: torch.dtype = torch.float32, pivot: bool = False,
                device: torch.device | str = "cpu", sweep_bytes: int | None = None,
                highest: int | None = None) -> tuple[int, dict[int, float]]:
    """The highest rank (≤ `highest`, by default the size limit) whose factors run faster than
    the dense matrix here; 0 when not even rank 1 does. Returns it with the geometric-mean
    time ratio (factored over dense) of every rank timed on the way."""
    top = size_limit(out_features, in_features, pivot) if highest is None else highest
    timed: dict[int, float] = {}

    def faster(rank: int) -> bool:
        ratios = factored_to_dense_ratio(out_features, in_features, rank, tuple(tokens), repeats, dtype,
                                         pivot, device=device, sweep_bytes=sweep_bytes)
        timed[rank] = geometric_mean(ratios.values())
        return timed[rank] < 1.0

    if top < 1:
        return 0, timed
    if faster(top):
        return top, timed
    lo, hi = 0, top - 1  # lo: known faster (0 stands for "none"); the answer lies in lo … hi
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if faster(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo, timed


def speed_limits(model: nn.Module, targets: str | Sequence[str] = ALL_LINEAR,
                 layers: str | Iterable[int] | None = None, pivot: bool = False,
                 tokens: Sequence[int] | None = None, repeats: int = 7,
                 progress: bool = True, dtype: torch.dtype | None = None) -> dict[str, int]:
    """The speed limit of every target shape of `model`, timed here once per shape, in the
    model's dtype (or `dtype`, the one it will be stored in) and on its device, over its
    workloads (`rankcut.speed.timing.workload_tokens`).
    `pivot`: timed in the pivoted form, for a budget that stores its factors pivoted."""
    chosen = select_targets(model, targets, layers)
    return limits_for(model, [(t.out_features, t.in_features) for t in chosen], pivot, tokens, repeats, progress,
                      dtype)


def limits_for(model: nn.Module, shapes: Iterable[tuple[int, int]], pivot: bool = False,
               tokens: Sequence[int] | None = None, repeats: int = 7, progress: bool = True,
               dtype: torch.dtype | None = None) -> dict[str, int]:
    """`speed_limits` of the given (out, in) shapes, each timed once."""
    weight = next(model.parameters())
    dtype = dtype or weight.dtype
    tokens = tuple(tokens or workload_tokens(model))
    sweep = cold_bytes(model, weight.device)
    out = {}
    for m, n in tqdm(sorted(set(shapes)), desc="speed limits", unit="shape", disable=not progress):
        out[shape_key(m, n)], _ = speed_limit(m, n, tokens, repeats, dtype, pivot,
                                              weight.device, sweep)
    return out
