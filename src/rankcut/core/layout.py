"""How factors are stored, without timing anything: column- or row-major factors, pivoted
layers' token layout, Tucker cores folded into a factor, shared-input stacks, and the
row-major copies `save` writes. `speed.layouts` decides; this module carries out."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .layers import PivotLowRankLinear
from .modules import compressed_modules
from .record import record_of

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


def column_major(t: torch.Tensor) -> torch.Tensor:
    """The same values, stored so that the transpose is contiguous."""
    return t.detach().t().contiguous().t()


def is_column_major(t: torch.Tensor) -> bool:
    return t.dim() == 2 and t.shape[0] > 1 and t.stride() == (1, t.shape[0])


def set_column_major_(layer: nn.Module, factor: str) -> None:
    old = getattr(layer, factor)
    setattr(layer, factor, nn.Parameter(column_major(old), requires_grad=old.requires_grad))


def set_row_major_(layer: nn.Module, factor: str) -> None:
    """Store `factor` back as PyTorch stores a linear weight (a no-op where it is already)."""
    old = getattr(layer, factor)
    if not old.is_contiguous():
        setattr(layer, factor, nn.Parameter(old.detach().contiguous(), requires_grad=old.requires_grad))


def set_tokens_as_columns_(model: nn.Module, names: Iterable[str]) -> None:
    """Lay out the named pivoted modules with tokens as columns, every other one with tokens as
    rows, and record it for `rankcut.load`."""
    names = set(names)
    records = record_of(model).modules
    for name, layer in compressed_modules(model).items():
        if isinstance(layer, PivotLowRankLinear):
            layer.tokens_as_columns = name in names
            record = records.get(name)
            if record is not None:
                record.pop("tokens_as_columns", None)
                if layer.tokens_as_columns:
                    record["tokens_as_columns"] = True


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
def storable(model: nn.Module) -> Iterator[None]:
    """Every factor as its own contiguous tensor for the span (safetensors stores whole,
    row-major tensors): fused members' views into their stack, and column-major factors, are
    copied out and put back after. The manifest keeps what `rankcut.load` must redo."""
    swapped = []
    for layer in compressed_modules(model).values():
        for factor in ("in_factor", "out_factor", "core"):
            w = getattr(layer, factor, None)
            fused = factor == "in_factor" and getattr(layer, "shared_input", None) is not None
            if w is not None and (fused or not w.is_contiguous()):
                swapped.append((layer, factor, w))
                setattr(layer, factor, nn.Parameter(w.detach().clone(memory_format=torch.contiguous_format),
                                                    requires_grad=w.requires_grad))
    try:
        yield
    finally:
        for layer, factor, w in swapped:
            setattr(layer, factor, w)
