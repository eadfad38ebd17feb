"""Truncation-aware whitening (SVD-LLM): SVD of W·L with XᵀX = L·Lᵀ."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..calibration.hooks import ModuleStats
from ..calibration.sources import Calibration
from ..core.errors import RankcutError
from .base import Factors, MethodConfig, register_method
from .weighted import weighted_svd, whitening


@dataclass
class Whiten(MethodConfig):
    calibration: Calibration = field(default_factory=Calibration)
    damp: float = 1e-4  # shift of XᵀX, relative to its mean diagonal
    method_name = "whiten"
    needs = frozenset({"gram"})


def require_gram(stats: ModuleStats | None, name: str) -> torch.Tensor:
    if stats is None or stats.gram is None:
        raise RankcutError(f"no calibration statistics reached {name}; is it used in the forward pass?")
    return stats.gram


@register_method(Whiten)
def whiten_factorize(weight: torch.Tensor, config: Whiten, name: str,
                     stats: ModuleStats | None = None) -> Factors:
    return weighted_svd(weight, config.policy, name, input_weight=whitening(require_gram(stats, name), config.damp,
                                                                         consume=stats.last_use and stats.cross is None),
                        cross=stats.cross)
