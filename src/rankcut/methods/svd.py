"""Plain truncated SVD: the Eckart–Young optimum for the weight's own Frobenius error."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Factors, MethodConfig, register_method
from .weighted import weighted_svd


@dataclass
class SVD(MethodConfig):
    method_name = "svd"


@register_method(SVD)
def svd_factorize(weight: torch.Tensor, config: SVD, name: str, stats: object = None,
                  overwrite: bool = False) -> Factors:
    return weighted_svd(weight, config.policy, name, overwrite=overwrite)
