"""Fast factorized inference: the same maps as the plain factors, fewer and better-shaped matmuls.

Three transforms, each exact up to float rounding:
- fold the Tucker core into whichever neighbouring factor leaves fewer parameters;
- modules that read the same input (q, k, v; gate and up; BERT's query, key, value) multiply
  it by their stacked first factors in one matmul; each member's `in_factor` becomes a view into
  the stack, so nothing is stored twice and the saved format is unchanged;
- a module that is not faster factored than dense at the measured workloads (decode and
  prefill token counts, on this machine) goes back to a dense `nn.Linear` holding B·A.

`speed_up_` folds cores and makes the dense-fallback decision (a decision about a machine,
recorded in the manifest as form "dense-fallback"); stacking shared inputs is opt-in
(`Speed(fuse_shared_inputs=True)`, `rankcut.load(..., fast=True)`) because on the 2-core CPU
it was measured no faster than the plain factors (benchmarks/speed.py keeps measuring it).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .bench import median_time
from .compress import compressed_modules, swap_module
from .layers import LowRankLinear, PivotLowRankLinear

# sibling modules that are called on the same tensor, by their attribute names
SHARED_INPUT_GROUPS: tuple[frozenset[str], ...] = (
    frozenset({"q_proj", "k_proj", "v_proj"}),
    frozenset({"gate_proj", "up_proj"}),
    frozenset({"query", "key", "value"}),
)


class SharedInput:
    """The stacked first factors of sibling modules; the first sibling called on an input
    computes every sibling's projection, the others read their slice. Inference only (no
    autograd): with gradients enabled each module multiplies by its own view as usual."""

    def __init__(self, stacked: torch.Tensor, members: int) -> None:
        self.stacked = stacked
        self.members = members
        self._x: torch.Tensor | None = None
        self._version = -1
        self._h: torch.Tensor | None = None
        self._served = 0

    def project(self, x: torch.Tensor) -> torch.Tensor:
        if self._x is not x or self._version != x._version:
            self._h = F.linear(x, self.stacked)
            self._x, self._version, self._served = x, x._version, 0
        h = self._h
        self._served += 1
        if self._served >= self.members:  # every sibling served: let the activations go
            self._x = self._h = None
        return h


@dataclass
class Speed:
    """What `speed_up_` does. `tokens`: the workloads the dense-fallback decision times
    (1 = a decode step, 512 = a prefill), batch 1."""

    fold_core: bool = True
    fuse_shared_inputs: bool = False  # measured no faster on CPU: opt-in
    dense_fallback: bool = True
    tokens: tuple[int, ...] = (1, 512)
    repeats: int = 7


@dataclass
class SpeedReport:
    folded: list[str] = field(default_factory=list)
    fused_groups: list[list[str]] = field(default_factory=list)
    dense_fallback: list[str] = field(default_factory=list)
    timings: dict[str, dict[str, float]] = field(default_factory=dict)  # shape → factored/dense time ratios


@torch.no_grad()
def fold_cores_(model: nn.Module) -> list[str]:
    """Multiply each Tucker core into the neighbouring factor that keeps the fewer parameters."""
    folded = []
    for name, layer in compressed_modules(model).items():
        if layer.core is None:
            continue
        r_out, r_in = layer.core.shape
        if layer.out_features * r_in <= r_out * layer.in_features:  # B·C is out × r_in
            layer.out_factor = nn.Parameter((layer.out_factor @ layer.core).contiguous())
        else:  # C·A is r_out × in
            layer.in_factor = nn.Parameter((layer.core @ layer.in_factor).contiguous())
        layer.core = None
        folded.append(name)
    return folded


@torch.no_grad()
def fuse_shared_inputs_(model: nn.Module) -> list[list[str]]:
    """Stack the first factors of siblings that share their input (see SharedInput)."""
    groups: dict[tuple[str, frozenset[str]], list[tuple[str, nn.Module]]] = {}
    for name, layer in compressed_modules(model).items():
        parent, _, child = name.rpartition(".")
        for group in SHARED_INPUT_GROUPS:
            if child in group and layer.core is None:
                groups.setdefault((parent, group), []).append((name, layer))
    fused = []
    for members in groups.values():
        if len(members) < 2 or len({(m.in_features, m.in_factor.dtype) for _, m in members}) > 1:
            continue
        stacked = torch.cat([m.in_factor.detach() for _, m in members]).contiguous()
        shared = SharedInput(stacked, len(members))
        start = 0
        for _, m in members:
            rows = m.in_factor.shape[0]
            m.in_factor = nn.Parameter(stacked[start:start + rows], requires_grad=m.in_factor.requires_grad)
            m.shared_input, m.shared_slice = shared, (start, start + rows)
            start += rows
        fused.append([n for n, _ in members])
    return fused


@contextmanager
def unfused(model: nn.Module) -> Iterator[None]:
    """Members' first factors as their own tensors for the span (saving needs whole tensors)."""
    swapped = []
    for layer in compressed_modules(model).values():
        if getattr(layer, "shared_input", None) is not None:
            swapped.append((layer, layer.in_factor))
            layer.in_factor = nn.Parameter(layer.in_factor.detach().clone(),
                                           requires_grad=layer.in_factor.requires_grad)
    try:
        yield
    finally:
        for layer, view in swapped:
            layer.in_factor = view


@torch.no_grad()
def factored_to_dense_ratio(out_features: int, in_features: int, rank: int, tokens: tuple[int, ...],
                            repeats: int = 7, dtype: torch.dtype = torch.float32,
                            pivot: bool = False) -> dict[int, float]:
    """Time of the factored map (plain, or pivoted) over the dense one, per token count, here."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(out_features, in_features, generator=g, dtype=dtype)
    a = torch.randn(rank, in_features, generator=g, dtype=dtype)
    b = torch.randn(out_features, rank, generator=g, dtype=dtype)
    plain = LowRankLinear.from_factors(b, a, dtype=dtype)
    layer = PivotLowRankLinear.from_low_rank(plain) if pivot else plain
    out = {}
    for t in tokens:
        x = torch.randn(1, t, in_features, generator=g, dtype=dtype)
        dense = median_time(lambda: F.linear(x, w), repeats)
        factored = median_time(lambda: layer(x), repeats)
        out[t] = factored / dense
    return out


@torch.no_grad()
def dense_fallback_(model: nn.Module, tokens: tuple[int, ...] = (1, 512), repeats: int = 7
                    ) -> tuple[list[str], dict[str, dict[str, float]]]:
    """Put back as dense every factored module that is not faster than dense on balance
    (geometric mean of its time ratios over `tokens` ≥ 1). Shapes are timed once each."""
    import math

    timings: dict[str, dict[str, float]] = {}
    fallback = []
    state = model.__dict__.setdefault("rankcut_state", {"modules": {}})
    for name, layer in compressed_modules(model).items():
        if layer.core is not None:
            continue
        pivot = isinstance(layer, PivotLowRankLinear)
        key = f"{layer.out_features}x{layer.in_features}@{layer.in_factor.shape[0]}{'p' if pivot else ''}"
        if key not in timings:
            ratios = factored_to_dense_ratio(layer.out_features, layer.in_features, layer.in_factor.shape[0],
                                             tokens, repeats, layer.in_factor.dtype, pivot)
            timings[key] = {str(t): r for t, r in ratios.items()}
        mean = math.exp(sum(math.log(r) for r in timings[key].values()) / len(timings[key]))
        record = state["modules"].get(name)
        if mean < 1.0 or (record is not None and record.get("transposed")):
            continue  # faster factored; or GPT-2's Conv1D, whose saved dense form is (in × out)
        dense = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None,
                          dtype=layer.in_factor.dtype, device=layer.in_factor.device)
        dense.weight.copy_(layer.weight)
        if layer.bias is not None:
            dense.bias.copy_(layer.bias)
        swap_module(model, name, dense)
        if record is not None:
            record["form"] = "dense-fallback"
            record["params"] = record["dense_params"]
        fallback.append(name)
    return fallback, timings


def speed_up_(model: nn.Module, config: Speed = Speed()) -> SpeedReport:
    """Apply the fast path in place (see the module docstring); returns what was done."""
    report = SpeedReport()
    if config.fold_core:
        report.folded = fold_cores_(model)
    if config.dense_fallback:
        report.dense_fallback, report.timings = dense_fallback_(model, config.tokens, config.repeats)
    if config.fuse_shared_inputs:
        report.fused_groups = fuse_shared_inputs_(model)
    state = model.__dict__.setdefault("rankcut_state", {"modules": {}})
    state["speed"] = {"dense_fallback": report.dense_fallback, "tokens": list(config.tokens),
                      "timings": report.timings}
    return report
