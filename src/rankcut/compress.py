"""`compress_`: one config, one in-place call (the torchao shape), with peft-style overrides.

Every module's rank is checked against its shape before the first factorization, so a bad
rank or pattern leaves the model untouched. Each swap is recorded in `model.rankcut_state`,
which `rankcut.save` writes into `rankcut.json`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from .layers import LowRankLinear
from .methods import MethodConfig, handler_for
from .ranks import check_rank, factor_params, keep_rank
from .targets import ALL_LINEAR, Target, dense_weight, select_targets


@dataclass
class CompressionReport:
    """What a `compress_` call did: per-module ranks and the parameter counts around it."""

    params_before: int
    params_after: int
    modules: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        return self.params_after / self.params_before


def count_params(model: nn.Module) -> int:
    """Distinct parameters (tied weights counted once, as `parameters()` yields them)."""
    return sum(p.numel() for p in model.parameters())


def count_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def _config_for(target: Target, config: MethodConfig,
                overrides: Mapping[str, MethodConfig] | None) -> MethodConfig:
    for pattern, override in (overrides or {}).items():
        if re.search(pattern, target.name):
            return override
    return config


def _precheck(target: Target, config: MethodConfig) -> None:
    policy = config.policy
    if policy.rank is not None:
        check_rank(target.name, target.out_features, target.in_features, policy.rank, policy.allow_growth)
    elif policy.keep is not None:
        rank = keep_rank(target.out_features, target.in_features, policy.keep)
        check_rank(target.name, target.out_features, target.in_features, rank, policy.allow_growth)


def swap_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def module_record(target: Target, layer: LowRankLinear, config: MethodConfig) -> dict[str, Any]:
    rank = layer.rank
    return {
        "kind": target.kind, "layer": target.layer,
        "out_features": target.out_features, "in_features": target.in_features,
        "transposed": target.transposed, "bias": layer.bias is not None,
        "form": layer.form, "rank": list(rank) if isinstance(rank, tuple) else rank,
        "params": factor_params(target.out_features, target.in_features, rank),
        "dense_params": target.params, "config": config.to_dict(),
    }


def compress_(
    model: nn.Module,
    config: MethodConfig,
    targets: str | Sequence[str] = ALL_LINEAR,
    layers: str | Iterable[int] | None = None,
    overrides: Mapping[str, MethodConfig] | None = None,
    stats: Mapping[str, Any] | None = None,
    progress: bool = True,
) -> CompressionReport:
    """Replace the selected linears of `model` by low-rank factors, in place.

    `overrides` maps a regex on module names to its own config (first match wins), like peft's
    `rank_pattern`. `stats` carries per-module calibration statistics for the methods that use them.
    """
    chosen = select_targets(model, targets, layers)
    plan = [(t, _config_for(t, config, overrides)) for t in chosen]
    for target, cfg in plan:
        handler_for(cfg)
        _precheck(target, cfg)

    before = count_params(model)
    state = model.__dict__.setdefault("rankcut_state", {"modules": {}})
    report = CompressionReport(params_before=before, params_after=before)
    for target, cfg in tqdm(plan, desc=f"compress ({config.method_name})", disable=not progress, unit="module"):
        module = target.module
        weight = dense_weight(module).detach().to(torch.float64)
        factors = handler_for(cfg)(weight, cfg, target.name, (stats or {}).get(target.name))
        bias = module.bias.detach() if getattr(module, "bias", None) is not None else None
        new = LowRankLinear.from_factors(
            factors.out_factor, factors.in_factor, bias=bias, core=factors.core,
            dtype=module.weight.dtype,
        ).to(module.weight.device)
        swap_module(model, target.name, new)
        record = module_record(target, new, cfg)
        state["modules"][target.name] = record
        report.modules[target.name] = record
    report.params_after = count_params(model)
    return report


def compressed_modules(model: nn.Module) -> dict[str, LowRankLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LowRankLinear)}

