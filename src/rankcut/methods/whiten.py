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
    # refit the kept input factors towards the dense model's outputs (`anchored_refit`), with
    # this ridge relative to XᵀX's mean diagonal; needs a sequential pass at known ranks
    anchor: float | None = None
    method_name = "whiten"
    needs = frozenset({"gram"})

    def __post_init__(self) -> None:
        super().__post_init__()
        add_anchor_need(self)


def add_anchor_need(config: MethodConfig) -> None:
    """An anchored config also reads X_cᵀX_d, so the calibration runs a dense stream beside the cut one."""
    anchor = getattr(config, "anchor", None)
    if anchor is None:
        return
    if not anchor > 0.0:
        raise RankcutError(f"anchor {anchor} must be positive: it is the refit's ridge relative to XᵀX's mean "
                           "diagonal (e.g. 0.1)")
    config.needs = type(config).needs | {"cross"}


def anchor_of(config: MethodConfig, stats: ModuleStats) -> tuple[torch.Tensor, float] | None:
    """What `weighted_svd` needs to refit (X_cᵀX_c and the ridge), or None: no anchor asked, or a
    pass without the dense stream (the first pass of a two-pass budget only measures worths)."""
    anchor = getattr(config, "anchor", None)
    return None if anchor is None or stats.cross is None else (stats.gram, anchor)


def require_gram(stats: ModuleStats | None, name: str) -> torch.Tensor:
    if stats is None or stats.gram is None:
        raise RankcutError(f"no calibration statistics reached {name}; is it used in the forward pass?")
    return stats.gram


@register_method(Whiten)
def whiten_factorize(weight: torch.Tensor, config: Whiten, name: str,
                     stats: ModuleStats | None = None,
                     overwrite: bool = False) -> Factors:
    return weighted_svd(weight, config.policy, name, input_weight=whitening(require_gram(stats, name), config.damp,
                                                                         consume=stats.last_use and stats.cross is None),
                        cross=stats.cross, anchor=anchor_of(config, stats), overwrite=overwrite)
