"""Fisher-weighted, whitened SVD: minimize Σₖ Fₖ·‖(W − W′)ₖ·X‖², where Fₖ is the mean squared
loss gradient of output channel k.

Whitening alone measures every output channel's error the same; the loss does not. Weighting
rows by √Fₖ (FWSVD's idea, on output channels) on top of whitening makes a squared singular
value an estimate of the loss increase from dropping that direction — comparable across
modules, which is what budgeted allocation needs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..calibration.hooks import ModuleStats
from ..calibration.sources import Calibration
from ..core.errors import RankcutError
from .base import Factors, MethodConfig, register_method
from .weighted import fisher_weight, weighted_svd, whitening
from .whiten import add_anchor_need, anchor_of, require_gram


@dataclass
class Fisher(MethodConfig):
    calibration: Calibration = field(default_factory=Calibration)
    damp: float = 1e-4
    fisher_damp: float = 1e-2  # floor on each channel's Fisher, relative to the mean
    whiten: bool = True
    anchor: float | None = None  # as Whiten's: refit the kept input factors towards the dense outputs
    method_name = "fisher"
    needs = frozenset({"gram", "out_fisher"})

    def __post_init__(self) -> None:
        super().__post_init__()
        add_anchor_need(self)


@register_method(Fisher)
def fisher_factorize(weight: torch.Tensor, config: Fisher, name: str,
                     stats: ModuleStats | None = None,
                     overwrite: bool = False) -> Factors:
    if stats is None or stats.out_fisher is None:
        raise RankcutError(f"no gradient statistics reached {name}; is it used in the forward pass?")
    input_weight = whitening(require_gram(stats, name), config.damp,
                             consume=stats.last_use and stats.cross is None) if config.whiten else None
    return weighted_svd(weight, config.policy, name, input_weight=input_weight,
                        output_weight=fisher_weight(stats.out_fisher, config.fisher_damp),
                        cross=stats.cross if config.whiten else None,
                        anchor=anchor_of(config, stats) if config.whiten else None, overwrite=overwrite)
