"""Two-sided curvature whitening: minimize tr(G·(W − W′)·XᵀX·(W − W′)ᵀ), with XᵀX the input Gram
and G the full out × out covariance of the loss gradients at the module's output.

This is the Kronecker-factored (K-FAC) approximation of the loss's curvature for one linear
map: the second-order loss increase of an error E is ½·tr(G·E·XᵀX·Eᵀ) under it. The Fisher
method keeps only diag(G); here the output side is the whole matrix, so correlated output
channels (a head's dimensions, an MLP's gated pairs) are weighted as the loss sees them. The
squared singular values of D·W·L are estimates of the loss increase from each direction, which
budgeted allocation compares across modules. `shrink` blends G towards its diagonal, which
matters when fewer gradient rows than output channels estimate it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..calibration.hooks import ModuleStats
from ..core.errors import RankcutError
from .base import Factors, register_method
from .fisher import Fisher
from .weighted import curvature_weight, weighted_svd, whitening
from .whiten import anchor_of, require_gram


@dataclass
class KFAC(Fisher):
    # blend of the output covariance towards its diagonal (0: the full covariance, 1: the Fisher
    # method). 8 × 256 gradient rows estimate a 1,536-wide covariance poorly: on SmolLM2 at a budget
    # of 0.8, 0 scored 35.9, 0.3 / 0.5 / 0.7 scored 32.5 / 32.2 / 32.3, and 1 (Fisher) 33.4
    shrink: float = 0.5
    method_name = "kfac"
    needs = frozenset({"gram", "out_covariance"})

    def __post_init__(self) -> None:
        if not 0.0 <= self.shrink <= 1.0:
            raise RankcutError(f"shrink {self.shrink} is outside [0, 1]; 0 keeps the full output covariance, "
                               "1 its diagonal only")
        super().__post_init__()


@register_method(KFAC)
def kfac_factorize(weight: torch.Tensor, config: KFAC, name: str, stats: ModuleStats | None = None,
                   overwrite: bool = False) -> Factors:
    if stats is None or stats.out_fisher is None:
        raise RankcutError(f"no gradient statistics reached {name}; is it used in the forward pass?")
    if stats.out_fisher.ndim != 2:
        raise RankcutError(f"{name} has only a diagonal gradient statistic; kfac needs the output covariance")
    input_weight = whitening(require_gram(stats, name), config.damp,
                             consume=stats.last_use and stats.cross is None) if config.whiten else None
    output_weight = curvature_weight(stats.out_fisher, config.fisher_damp, config.shrink).to(weight.device)
    return weighted_svd(weight, config.policy, name, input_weight=input_weight, output_weight=output_weight,
                        cross=stats.cross if config.whiten else None,
                        anchor=anchor_of(config, stats) if config.whiten else None, overwrite=overwrite)
