"""Cut every attention block's head channels jointly, block by block (`methods.attention_channels`'
math): Q with K by column–row selection, V with O by a whitened SVD of their product.

Each q, k, v and o map becomes a `ChannelSubsetLinear` holding only its kept block, and the
attention code runs unchanged on heads padded with zeros (see `core.channel_subset`): the
config, RoPE and the scaling stay the dense model's. Every head keeps the same count, a
fraction of its width. Calibration is sequential: each block's input Gram is gathered on the
outputs of the blocks already cut.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..calibration.hooks import InputStats, sequential_inputs
from ..calibration.sources import Calibration
from ..core.channel_subset import ChannelSubsetLinear
from ..core.errors import RankcutError
from ..core.module_records import module_record
from ..core.modules import count_params
from ..core.record import record_of
from ..core.targets import Target, all_candidates, dense_weight
from ..methods.attention_channels import channel_units, qk_kept_channels, value_output_cut

# families whose RoPE rotates interleaved pairs (2i, 2i+1), which the pair units here do not follow
INTERLEAVED_ROPE = frozenset({"gptj", "codegen"})


@dataclass
class AttentionGroup:
    """One block's four attention maps."""

    layer: int
    query: Target
    key: Target
    value: Target
    output: Target


@dataclass
class HeadShape:
    heads: int
    kv_heads: int
    head_dim: int
    rotary_dim: int | None  # channels RoPE rotates (rotate_half pairs), None without RoPE


@dataclass
class AttentionReport:
    qk_channels_before: int
    qk_channels_after: float
    vo_channels_before: int
    vo_channels_after: int
    params_before: int
    params_after: int
    layers: list[int] = field(default_factory=list)


def attention_groups(model: nn.Module) -> list[AttentionGroup]:
    """Each block's q, k, v and o maps, found by kind; a model without four separate maps per
    block (GPT-2's fused c_attn, Mamba) is refused in one line."""
    by_layer: dict[int, dict[str, list[Target]]] = {}
    for t in all_candidates(model):
        if t.layer is None:
            continue
        for role in ("q", "k", "v", "o"):
            if t.matches_kind(role):
                by_layer.setdefault(t.layer, {}).setdefault(role, []).append(t)
    groups = []
    for layer, roles in sorted(by_layer.items()):
        if any(len(roles.get(role, [])) != 1 for role in ("q", "k", "v", "o")):
            continue
        groups.append(AttentionGroup(layer, roles["q"][0], roles["k"][0], roles["v"][0], roles["o"][0]))
    if not groups:
        raise RankcutError(f"{type(model).__name__} has no attention blocks with separate query, key, value and "
                           "output maps to cut head channels from (a fused qkv map, or no attention); use a "
                           "low-rank --method on it instead")
    return groups


def head_shape(model: nn.Module, group: AttentionGroup) -> HeadShape:
    """Heads, key-value heads, head width and RoPE's span, from the config, checked against the maps."""
    config = model.config
    if getattr(config, "model_type", None) in INTERLEAVED_ROPE:
        raise RankcutError(f"{config.model_type} rotates interleaved RoPE pairs, which head-channel cuts do not "
                           "follow; use a low-rank --method on its attention instead")
    heads = getattr(config, "num_attention_heads", None)
    if not heads:
        raise RankcutError(f"{type(config).__name__} names no num_attention_heads; head-channel cuts need it")
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or group.query.out_features // heads
    shapes_fit = (group.query.out_features == heads * head_dim and group.key.out_features == kv_heads * head_dim
                  and group.value.out_features == kv_heads * head_dim and group.output.in_features == heads * head_dim
                  and heads % kv_heads == 0)
    if not shapes_fit:
        raise RankcutError(f"the attention maps of layer {group.layer} do not split into {heads} heads of "
                           f"{head_dim} ({kv_heads} key-value heads); head-channel cuts need that layout")
    rotary = any(getattr(config, name, None) is not None for name in ("rope_parameters", "rope_theta"))
    rotary_dim = None
    if rotary:
        rotary_dim = int(head_dim * float(getattr(config, "partial_rotary_factor", 1.0) or 1.0))
        rotary_dim -= rotary_dim % 2
    return HeadShape(heads, kv_heads, head_dim, rotary_dim)


def moments(stats: InputStats, with_ones: bool) -> torch.Tensor:
    """E[x xᵀ] of the recorded input, or of [x; 1] (for maps with a bias): from the running sums."""
    count = max(1, stats.count)
    second = stats.gram / count
    if not with_ones:
        return second
    mean = (stats.sum / count)[:, None]
    top = torch.cat([second, mean], dim=1)
    bottom = torch.cat([mean.T, torch.ones(1, 1, dtype=second.dtype, device=second.device)], dim=1)
    return torch.cat([top, bottom])


def _with_bias(weight: torch.Tensor, module: nn.Module, with_ones: bool) -> torch.Tensor:
    """The weight with its bias as a last column (zeros for a map without one) when `with_ones`."""
    if not with_ones:
        return weight
    bias = module.bias.detach().double() if module.bias is not None else weight.new_zeros(weight.shape[0])
    return torch.cat([weight, bias[:, None]], dim=1)


def _block(module: nn.Module, kept: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
           bias: torch.Tensor | None) -> ChannelSubsetLinear:
    target = dense_weight(module)
    return ChannelSubsetLinear.from_block(kept.to(target.dtype), rows.to(target.device), cols.to(target.device),
                                          target.shape[1], target.shape[0], bias, dtype=target.dtype)


@torch.no_grad()
def cut_group_(model: nn.Module, group: AttentionGroup, shape: HeadShape, stats: InputStats, keep_units: int,
               keep_values: int, damp: float, config: dict[str, Any]) -> float:
    """Cut one block's attention in place, given its input statistics; returns the query/key
    channels kept per head (a mean: with RoPE over part of a head, groups may differ)."""
    d, per_group = shape.head_dim, shape.heads // shape.kv_heads
    maps = (group.query, group.key, group.value)
    with_ones = any(t.module.bias is not None for t in maps)
    gram = moments(stats, with_ones)
    weights = {t.name: dense_weight(t.module).double().to(gram.device) for t in (*maps, group.output)}
    query = _with_bias(weights[group.query.name], group.query.module, with_ones)
    key = _with_bias(weights[group.key.name], group.key.module, with_ones)
    kept = qk_kept_channels(gram, query, key, shape.heads, shape.kv_heads, d, keep_units, shape.rotary_dim)
    q_rows = torch.cat([h * d + kept[h // per_group] for h in range(shape.heads)])
    k_rows = torch.cat([g * d + kept[g] for g in range(shape.kv_heads)])
    replaced: dict[str, ChannelSubsetLinear] = {}
    for target, rows in ((group.query, q_rows), (group.key, k_rows)):
        every_input = torch.arange(target.in_features, device=rows.device)
        bias = None if target.module.bias is None else target.module.bias.detach()
        replaced[target.name] = _block(target.module, weights[target.name][rows], rows, every_input, bias)

    value, output = weights[group.value.name], weights[group.output.name]
    v_bias = group.value.module.bias
    # with a ones column in the Gram the value map needs a bias column too (zeros when it has none)
    v_bias_full = (v_bias.detach().double().to(gram.device) if v_bias is not None
                   else value.new_zeros(value.shape[0])) if with_ones else None
    v_rows, v_bias_rows, o_blocks = [], [], []
    for g in range(shape.kv_heads):
        heads = range(g * per_group, (g + 1) * per_group)
        cut = value_output_cut(gram, value[g * d:(g + 1) * d],
                               None if v_bias_full is None else v_bias_full[g * d:(g + 1) * d],
                               [output[:, h * d:(h + 1) * d] for h in heads], keep_values, damp=damp)
        v_rows.append(cut.value)
        if cut.value_bias is not None:
            v_bias_rows.append(cut.value_bias)
        o_blocks += cut.outputs
    positions = torch.arange(keep_values, device=gram.device)
    v_index = torch.cat([g * d + positions for g in range(shape.kv_heads)])
    o_index = torch.cat([h * d + positions for h in range(shape.heads)])
    v_full_bias = None
    if v_bias is not None:
        v_full_bias = torch.zeros(group.value.out_features, dtype=torch.float64, device=gram.device)
        v_full_bias[v_index] = torch.cat(v_bias_rows)
    replaced[group.value.name] = _block(group.value.module, torch.cat(v_rows), v_index,
                                        torch.arange(group.value.in_features, device=gram.device), v_full_bias)
    o_bias = None if group.output.module.bias is None else group.output.module.bias.detach()
    replaced[group.output.name] = _block(group.output.module, torch.cat(o_blocks, dim=1),
                                         torch.arange(group.output.out_features, device=gram.device), o_index, o_bias)
    record = record_of(model)
    for target in (*maps, group.output):
        layer = replaced[target.name]
        model.set_submodule(target.name, layer)
        record.modules[target.name] = module_record(target, layer, config)
    return sum(len(k) for k in kept) / len(kept)


@torch.no_grad()
def cut_attention_channels_(model: nn.Module, keep: float, calibration: Calibration | None = None,
                            damp: float = 1e-6, progress: bool = True,
                            value_keep: float | None = None) -> AttentionReport:
    """Keep the fraction `keep` of every head's channels, Q·K and V·O cut jointly (the same count
    in every head and block); in place. `value_keep`: a different fraction for V·O (default
    `keep`). Returns what it cut."""
    value_keep = keep if value_keep is None else value_keep
    for fraction in (keep, value_keep):
        if not 0 < fraction <= 1:
            raise RankcutError(f"keep={fraction}: give the fraction of attention head channels to keep, in (0, 1]")
    calibration = calibration or Calibration()
    groups = attention_groups(model)
    shape = head_shape(model, groups[0])
    for group in groups[1:]:
        head_shape(model, group)
    units = channel_units(shape.head_dim, shape.rotary_dim)
    keep_units = max(1, math.floor(keep * len(units) + 0.5))
    keep_values = max(1, math.floor(value_keep * shape.head_dim + 0.5))
    config = {"method": "attention-channels", "keep": keep, "value_keep": value_keep, "damp": damp,
              "calibration": calibration.describe()}
    params_before = count_params(model)
    by_layer = {g.layer: g for g in groups}
    qk_kept = [cut_group_(model, by_layer[index], shape, stats, keep_units, keep_values, damp, config)
               for index, stats in sequential_inputs(model, calibration, {g.layer: g.query for g in groups},
                                                     "attention channels", progress)]
    qk_after = sum(qk_kept) / len(qk_kept) if qk_kept else float(shape.head_dim)
    record_of(model).attention = {**config, "head_dim": shape.head_dim, "qk_channels": qk_after,
                                  "vo_channels": keep_values, "rotary_dim": shape.rotary_dim}
    return AttentionReport(shape.head_dim, qk_after, shape.head_dim, keep_values, params_before,
                           count_params(model), [g.layer for g in groups])
