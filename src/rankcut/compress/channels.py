"""Cut every MLP's intermediate channels jointly, block by block (`methods.nystrom`'s math).

The model keeps its architecture: each MLP becomes a dense MLP of a smaller intermediate size,
the same in every block, and the config says so. A saved result is therefore a plain checkpoint
of the same family, which transformers, vLLM or llama.cpp load as it is.

Calibration is sequential, as for the low-rank methods: each block's Gram is gathered on the
outputs of the blocks already cut, so each refit sees the inputs the cut model really produces.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from ..calibration.hooks import sequential_inputs
from ..calibration.sources import Calibration
from ..core.errors import RankcutError
from ..core.modules import count_params
from ..core.record import record_of
from ..core.targets import Target, all_candidates, dense_weight
from ..methods.nystrom import nystrom_channels

# the config field that holds the intermediate size, by family
SIZE_FIELDS = ("intermediate_size", "n_inner", "ffn_dim")


@dataclass
class MLPGroup:
    """One block's MLP seen as producers (rows = channels) and the down map that reads them."""

    layer: int
    producers: list[Target]
    down: Target


@dataclass
class ChannelReport:
    channels_before: int
    channels_after: int
    params_before: int
    params_after: int
    layers: list[int] = field(default_factory=list)


def mlp_groups(model: nn.Module) -> list[MLPGroup]:
    """Each block's up (and gate) maps and its down map, found by kind; a block whose MLP is not
    that shape (Mamba has none) makes the model unsuitable, said in one line."""
    by_layer: dict[int, list[Target]] = {}
    for t in all_candidates(model):
        if t.layer is not None:
            by_layer.setdefault(t.layer, []).append(t)
    groups = []
    for layer, targets in sorted(by_layer.items()):
        downs = [t for t in targets if t.matches_kind("down")]
        producers = [t for t in targets if t.matches_kind("up") or t.kind == "gate"]
        if len(downs) != 1 or not producers or any(p.out_features != downs[0].in_features for p in producers):
            raise RankcutError(f"layer {layer} of {type(model).__name__} has no MLP of up/gate and down maps to "
                               "cut channels from; use a low-rank --method on it instead")
        groups.append(MLPGroup(layer, producers, downs[0]))
    if not groups:
        raise RankcutError(f"{type(model).__name__} has no MLP blocks to cut channels from")
    return groups


def _size_field(config: object) -> str:
    for name in SIZE_FIELDS:
        if hasattr(config, name):
            return name
    raise RankcutError(f"{type(config).__name__} names no intermediate size ({', '.join(SIZE_FIELDS)}); "
                       "channel cuts need one to save the smaller MLP")


def _rows(module: nn.Module, rows: torch.Tensor) -> nn.Module:
    """A copy of `module` producing only output channels `rows` (a Linear's rows, a Conv1D's columns)."""
    weight = dense_weight(module)[rows]
    bias = None if module.bias is None else module.bias[rows]
    return _like(module, weight, bias)


def _like(module: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
    """A module of `module`'s type computing weight (out × in) + bias, in its dtype and device."""
    dtype, device = module.weight.dtype, module.weight.device
    out_features, in_features = weight.shape
    if type(module) is nn.Linear:
        new = nn.Linear(in_features, out_features, bias=bias is not None, device="meta")
        new.weight = nn.Parameter(weight.to(device=device, dtype=dtype).contiguous(), requires_grad=False)
    else:  # transformers' Conv1D stores (in, out)
        new = type(module)(out_features, in_features)
        new.weight = nn.Parameter(weight.t().to(device=device, dtype=dtype).contiguous(), requires_grad=False)
    if bias is not None:
        new.bias = nn.Parameter(bias.to(device=device, dtype=dtype).clone(), requires_grad=False)
    return new


@torch.no_grad()
def cut_mlp_channels_(model: nn.Module, keep: float, calibration: Calibration | None = None,
                      ridge: float = 1e-2, select: str = "leverage", progress: bool = True) -> ChannelReport:
    """Keep the fraction `keep` of every MLP's intermediate channels (rounded, the same count in
    every block) and refit each down map on them; in place. Returns what it cut."""
    if not 0 < keep <= 1:
        raise RankcutError(f"keep={keep}: give the fraction of MLP channels to keep, in (0, 1]")
    if select not in ("leverage", "output"):
        raise RankcutError(f"channel selection '{select}' is not one rankcut knows; give leverage or output")
    calibration = calibration or Calibration()
    groups = mlp_groups(model)
    size_field = _size_field(model.config)
    width = groups[0].down.in_features
    if any(g.down.in_features != width for g in groups):
        raise RankcutError("the MLPs of this model differ in width; channel cuts keep one intermediate size")
    kept_count = max(1, math.floor(keep * width + 0.5))
    params_before = count_params(model)
    by_layer = {g.layer: g for g in groups}
    downs = {g.layer: g.down for g in groups} if kept_count < width else {}
    for index, stats in sequential_inputs(model, calibration, downs, "MLP channels", progress):
        group = by_layer[index]
        cut = nystrom_channels(stats.gram, dense_weight(group.down.module).double(), kept_count, ridge=ridge,
                               select=select)
        for producer in group.producers:
            kept = cut.kept.to(producer.module.weight.device)
            model.set_submodule(producer.name, _rows(producer.module, kept))
        down = group.down.module
        model.set_submodule(group.down.name, _like(down, cut.down, down.bias))
    setattr(model.config, size_field, kept_count)
    record = record_of(model)
    record.channels = {"method": "nystrom", "select": select, "keep": keep, "ridge": ridge,
                       "intermediate_size": kept_count, "intermediate_size_before": width,
                       "calibration": calibration.describe()}
    return ChannelReport(width, kept_count, params_before, count_params(model), [g.layer for g in groups])
