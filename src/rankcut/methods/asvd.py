"""Activation-aware SVD (ASVD): scale input channels by their mean |activation|^α before the SVD,
so channels that carry large activations (outlier channels) are kept more faithfully."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..calibration.hooks import ModuleStats
from ..calibration.sources import Calibration
from ..core.errors import RankcutError
from .base import Factors, MethodConfig, register_method
from .weighted import InputWeight, weighted_svd


@dataclass
class ASVD(MethodConfig):
    calibration: Calibration = field(default_factory=Calibration)
    alpha: float = 0.5
    method_name = "asvd"
    needs = frozenset({"abs_mean"})


@register_method(ASVD)
def asvd_factorize(weight: torch.Tensor, config: ASVD, name: str,
                   stats: ModuleStats | None = None,
                   overwrite: bool = False) -> Factors:
    if stats is None or stats.inputs is None:
        raise RankcutError(f"no calibration statistics reached {name}; is it used in the forward pass?")
    scale = stats.inputs.abs_mean.double()
    floor = float(scale.max()) * 1e-6 if float(scale.max()) > 0 else 1.0
    scale = scale.clamp_min(floor) ** config.alpha
    return weighted_svd(weight, config.policy, name, input_weight=InputWeight(scale, "diagonal"), overwrite=overwrite)
