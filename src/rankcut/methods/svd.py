"""Plain truncated SVD: the Eckart–Young optimum for the weight's own Frobenius error."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..ranks import resolve_rank
from .base import Factors, MethodConfig, register_method


@dataclass
class SVD(MethodConfig):
    method_name = "svd"


def split_svd(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, rank: int) -> Factors:
    """Share √σ between the two factors so neither carries the whole dynamic range."""
    root = s[:rank].sqrt()
    return Factors(out_factor=u[:, :rank] * root, in_factor=root[:, None] * vh[:rank])


@register_method(SVD)
def svd_factorize(weight: torch.Tensor, config: SVD, name: str, stats: object = None) -> Factors:
    u, s, vh = torch.linalg.svd(weight, full_matrices=False)
    rank = resolve_rank(config.policy, name, weight.shape[0], weight.shape[1], s)
    return split_svd(u, s, vh, int(rank if not isinstance(rank, tuple) else min(rank)))
