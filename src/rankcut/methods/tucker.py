"""Tucker-2 of a weight matrix through tensorly, as in Moar et al. (2024).

`tucker(W, rank=[r1, r2])` gives W ≈ U₁·G·U₂ᵀ with an r1×r2 core G. By default the core is
folded into the factor on the smaller side, leaving two factors of rank min(r1, r2) (same
numbers, one matmul fewer); `three_factor=True` keeps the paper's three linears.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch

from ..core.errors import RankcutError
from ..core.ranks import resolve_rank
from .base import Factors, MethodConfig, register_method


@dataclass
class Tucker(MethodConfig):
    three_factor: bool = False
    n_iter_max: int = 100
    tol: float = 1e-8
    method_name = "tucker"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.budget is not None:  # refused here, not as a KeyError after every module is factored
            raise RankcutError("a budget compares the worth of each direction across modules, and a Tucker "
                               "rank pair has no such order: give tucker --rank R1,R2, --keep or --energy, "
                               "or use --budget with --method svd, whiten, asvd or fisher (Tucker-2 of a "
                               "matrix at equal ranks is its truncated SVD)")


def _tucker2(weight: torch.Tensor, r_out: int, r_in: int, n_iter_max: int, tol: float
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    try:
        import tensorly
        from tensorly.decomposition import tucker
    except ImportError:
        raise RankcutError("the tucker method needs tensorly: pip install 'rankcut[tucker]'") from None

    w = weight.detach().cpu().double().numpy()
    # HOOI warns when a mode's rank exceeds the other mode's; the result is still exact.
    with tensorly.backend_context("numpy"), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Trying to compute SVD with n_eigenvecs")
        core, (u_out, u_in) = tucker(w, rank=[r_out, r_in], n_iter_max=n_iter_max, tol=tol, init="svd")
    return np.asarray(core), np.asarray(u_out), np.asarray(u_in)


@register_method(Tucker)
def tucker_factorize(weight: torch.Tensor, config: Tucker, name: str, stats: object = None,
                     overwrite: bool = False) -> Factors:
    m, n = weight.shape
    spectrum = torch.linalg.svdvals(weight) if config.energy is not None else None
    rank = resolve_rank(config.policy, name, m, n, spectrum)
    r_out, r_in = rank if isinstance(rank, tuple) else (rank, rank)
    core, u_out, u_in = _tucker2(weight, r_out, r_in, config.n_iter_max, config.tol)
    as_t = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(weight.dtype)  # noqa: E731
    if config.three_factor:
        return Factors(out_factor=as_t(u_out), in_factor=as_t(u_in.T), core=as_t(core))
    if r_out <= r_in:
        return Factors(out_factor=as_t(u_out), in_factor=as_t(core @ u_in.T))
    return Factors(out_factor=as_t(u_out @ core), in_factor=as_t(u_in.T))
