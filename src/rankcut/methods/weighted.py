"""The shared core of the activation-aware methods: SVD of D·W·S, mapped back.

S acts on the input side (whitening by the Cholesky factor of XᵀX, or ASVD's activation
scales), D on the output side (Fisher weights). Truncating the SVD of D·W·S minimizes the
weighted error ‖D(W − W′)S‖, which for whitening is exactly the error of the layer's outputs on
the calibration data. The squared singular values of D·W·S are what each direction is worth in
that metric, and budgeted allocation compares them across modules.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..core.errors import RankcutError
from ..core.ranks import RankPolicy, resolve_rank
from .base import Factors


@dataclass
class InputWeight:
    """S with XᵀX ≈ S·Sᵀ, and how to apply S⁻¹ from the right."""

    matrix: torch.Tensor
    kind: str  # "cholesky" (lower-triangular), "eigen" (general), "diagonal"
    inverse: torch.Tensor | None = None  # for "eigen"
    shift: float = 0.0  # λ added to XᵀX's diagonal before factoring

    def right_inverse(self, b: torch.Tensor) -> torch.Tensor:
        """B·S⁻¹."""
        if self.kind == "cholesky":
            return torch.linalg.solve_triangular(self.matrix, b, upper=False, left=False)
        if self.kind == "diagonal":
            return b / self.matrix
        return b @ self.inverse

    def apply(self, w: torch.Tensor) -> torch.Tensor:
        """W·S."""
        return w * self.matrix if self.kind == "diagonal" else w @ self.matrix

    def apply_(self, w: torch.Tensor) -> torch.Tensor:
        """W·S written over W, a block of rows at a time: the product never sits beside W."""
        if self.kind == "diagonal":
            return w.mul_(self.matrix)
        step = max(1, CHUNK_NUMBERS // max(1, w.shape[1]))
        for start in range(0, w.shape[0], step):
            w[start:start + step] = w[start:start + step] @ self.matrix
        return w

    def apply_corrected(self, w: torch.Tensor, cross: torch.Tensor) -> torch.Tensor:
        """W·(X_dᵀX_c + λI)·S⁻ᵀ, with S·Sᵀ = X_cᵀX_c + λI: the matrix whose truncation best maps
        the compressed stream's inputs X_c onto the dense model's outputs X_d·Wᵀ, ridge-pulled
        toward W (not toward zero) by λ. Equals W·S when X_c = X_d, so full rank stays exact."""
        cross_t = cross.T.double()
        m = w @ (cross_t + self.shift * torch.eye(cross_t.shape[0], dtype=cross_t.dtype))
        if self.kind == "cholesky":  # M·L⁻ᵀ = (L⁻¹·Mᵀ)ᵀ
            return torch.linalg.solve_triangular(self.matrix, m.T, upper=False).T
        if self.kind == "diagonal":
            return m / self.matrix
        return m @ self.inverse.T


CHUNK_NUMBERS = 1 << 22  # entries per row block of an in-place product (32 MB in float64)
IN_PLACE_FROM = 4096  # Gram sides from which a last use factors it in place (an 11008² Gram is 1 GB)


def whitening(gram: torch.Tensor, damp: float, consume: bool = False) -> InputWeight:
    """Cholesky of XᵀX + damp·mean(diag)·I; an eigen-decomposition with a floor if that fails.

    A rank-deficient Gram (too few or repeated calibration tokens) must still give finite
    factors: the shift makes it positive definite, and the eigen path floors tiny eigenvalues.
    `consume`: the caller is the Gram's last user, so a large one (a 7B model's MLP input) is
    shifted and factored in its own memory instead of beside two copies; the factor is the same.
    """
    gram = gram.double()
    n = gram.shape[0]
    scale = float(gram.diagonal().mean())
    if not scale > 0.0 or not torch.isfinite(gram).all():
        return InputWeight(torch.ones(n, dtype=gram.dtype, device=gram.device), "diagonal")
    shift = damp * scale
    if consume and n >= IN_PLACE_FROM:
        gram.diagonal().add_(shift)
        info = torch.empty((), dtype=torch.int32, device=gram.device)
        chol, info = torch.linalg.cholesky_ex(gram, out=(gram, info))
        if int(info) == 0 and torch.isfinite(chol).all() and float(chol.diagonal().min()) > 0:
            return InputWeight(chol, "cholesky", shift=shift)
        raise RankcutError(f"XᵀX ({n}×{n}) is not positive definite even after damping {damp:g}; "
                           "raise the method's damp or calibrate on more tokens")
    shifted = gram.clone()
    shifted.diagonal().add_(shift)  # the same as gram + shift·I, without an n×n identity beside it
    chol, info = torch.linalg.cholesky_ex(shifted)
    if int(info) == 0 and torch.isfinite(chol).all() and float(chol.diagonal().min()) > 0:
        return InputWeight(chol, "cholesky", shift=shift)
    del chol
    evals, evecs = torch.linalg.eigh(shifted)
    evals = evals.clamp_min(max(float(evals.max()) * 1e-10, 1e-300))
    root = evals.sqrt()
    return InputWeight(evecs * root, "eigen", inverse=(evecs / root).T, shift=shift)


def gram_svd(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD through the eigen-decomposition of the smaller Gram matrix (float64).

    Two to three times faster than a direct SVD for the wide matrices of an MLP, and as
    accurate for every direction that can survive a truncation; the tiniest singular values
    lose relative precision, but U·S·Vᵀ = U·Uᵀ·A reproduces A at full rank regardless.
    """
    m, n = a.shape
    if m > n:
        u, s, vh = gram_svd(a.T)
        return vh.T, s, u.T
    evals, u = torch.linalg.eigh(a @ a.T)
    evals, u = evals.flip(0), u.flip(1)
    s = evals.clamp_min(0.0).sqrt()
    floor = float(s[0]) * 1e-12 if s.numel() and float(s[0]) > 0 else 1e-300
    vh = u.T @ a
    vh /= s.clamp_min(floor)[:, None]  # in place: a 7B MLP's Vᵀ is 360 MB in float64
    return u, s, vh


def weighted_svd(weight: torch.Tensor, policy: RankPolicy, name: str,
                 input_weight: InputWeight | None = None,
                 output_weight: torch.Tensor | None = None,
                 cross: torch.Tensor | None = None,
                 anchor: tuple[torch.Tensor, float] | None = None, overwrite: bool = False) -> Factors:
    """Truncated SVD of D·W·S at the rank the policy gives, mapped back to W's space.

    D is a vector of per-channel weights (a diagonal), or an upper-triangular matrix (DᵀD the
    output metric, as `curvature_weight` returns).

    With `cross` (X_cᵀX_d, and S from X_cᵀX_c), the target is the dense model's output rather
    than this layer's own output on its (already perturbed) inputs: upstream error is corrected.
    With `anchor` (X_cᵀX_c and a ridge strength) as well, the truncation stays that of W·S and
    only the kept input factor is refit towards the dense outputs (`anchored_refit`).
    `overwrite`: `weight` is the caller's float64 copy, and D·W·S is formed in its memory.
    """
    w = weight.double()
    corrected = cross is not None and anchor is None
    in_place = overwrite and w is weight and anchor is None  # the refit reads W again
    if input_weight is not None:
        if corrected:
            w = input_weight.apply_corrected(w, cross)
        else:
            w = input_weight.apply_(w) if in_place else input_weight.apply(w)
    if output_weight is not None:
        w = _left_apply_(output_weight, w) if in_place else (
            output_weight[:, None] * w if output_weight.ndim == 1 else output_weight @ w)
    u, s, vh = gram_svd(w)
    del w  # D·W·S, where it is a copy of its own
    rank = resolve_rank(policy, name, weight.shape[0], weight.shape[1], s)
    rank = int(rank if not isinstance(rank, tuple) else min(rank))
    root = s[:rank].sqrt()
    out_factor = u[:, :rank] * root
    in_factor = root[:, None] * vh[:rank]
    del u, vh  # before the back-maps allocate: a 7B MLP's Vᵀ and U are 500 MB in float64
    if output_weight is not None:
        out_factor = (out_factor / output_weight[:, None] if output_weight.ndim == 1
                      else torch.linalg.solve_triangular(output_weight, out_factor, upper=True))
    if input_weight is not None:
        in_factor = input_weight.right_inverse(in_factor)
    if anchor is not None and cross is not None and rank < min(weight.shape):
        in_factor = anchored_refit(weight.double(), out_factor, in_factor, anchor[0], cross, anchor[1],
                                   output_weight)
    return Factors(out_factor=out_factor, in_factor=in_factor, importance=s.square())


def _left_apply_(output_weight: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """D·W written over W (a vector D is a diagonal), a block of columns at a time."""
    if output_weight.ndim == 1:
        return w.mul_(output_weight[:, None])
    step = max(1, CHUNK_NUMBERS // max(1, w.shape[0]))
    for start in range(0, w.shape[1], step):
        w[:, start:start + step] = output_weight @ w[:, start:start + step]
    return w


def anchored_refit(weight: torch.Tensor, out_factor: torch.Tensor, in_factor: torch.Tensor, gram: torch.Tensor,
                   cross: torch.Tensor, ridge: float, output_weight: torch.Tensor | None = None) -> torch.Tensor:
    """The input factor B refit, with A fixed, so that A·B on the compressed model's inputs X_c
    matches the dense module's outputs W·X_d in the output metric M = DᵀD:

        min_B ‖D·(A·B·X_cᵀ − W·X_dᵀ)‖² + λ‖D·A·(B − B₀)‖²,   λ = ridge · mean diag(X_cᵀX_c),

    solved in closed form in float64: B = (P·W·X_dᵀX_c + λ·B₀)·(X_cᵀX_c + λI)⁻¹, with P the
    M-weighted pseudo-inverse of A. The penalty is zero at the truncation's own B₀, so the refit's
    calibration error is never above B₀'s; λ pulls towards B₀ where the calibration data (a few
    thousand tokens against up to thousands of input dimensions) cannot pin B down. A
    rank-deficient X_cᵀX_c stays solvable: λ > 0 is added before solving.
    """
    a = out_factor.double()
    if output_weight is None:
        ma = a
    elif output_weight.ndim == 1:
        ma = output_weight.double().square()[:, None] * a
    else:
        d = output_weight.double()
        ma = d.T @ (d @ a)
    normal = a.T @ ma  # AᵀMA (r × r)
    projected = torch.linalg.solve(normal + 1e-12 * float(normal.diagonal().mean()) * torch.eye(
        normal.shape[0], dtype=normal.dtype, device=normal.device), ma.T @ weight)  # P·W
    c = gram.double()
    lam = ridge * float(c.diagonal().mean())
    if not lam > 0.0:
        return in_factor
    rhs = projected @ cross.double().T + lam * in_factor.double()  # P·W·X_dᵀX_c + λB₀
    shifted = c.clone()
    shifted.diagonal().add_(lam)
    chol, info = torch.linalg.cholesky_ex(shifted)
    if int(info) != 0:
        return in_factor
    return torch.cholesky_solve(rhs.T, chol).T  # (C + λI) is symmetric: B = rhs·(C + λI)⁻¹


def fisher_weight(out_fisher: torch.Tensor, damp: float) -> torch.Tensor:
    """√(F + damp·mean F) per output channel; all ones if the Fisher is empty."""
    f = out_fisher.double()
    mean = float(f.mean())
    if not mean > 0.0 or not torch.isfinite(f).all():
        return torch.ones_like(f)
    return (f + damp * mean).sqrt()


def curvature_weight(out_covariance: torch.Tensor, damp: float, shrink: float = 0.0) -> torch.Tensor:
    """Upper-triangular D with DᵀD = (1 − shrink)·G + shrink·diag(G) + damp·mean(diag G)·I, for
    the gradients' output covariance G: ‖D·E‖² is then the loss's second-order estimate of an
    output error E under the Kronecker-factored curvature.

    A covariance estimated from fewer gradient rows than its side is rank-deficient and noisy
    off its diagonal; `shrink` moves it towards the diagonal Fisher (shrink = 1 is exactly the
    diagonal method's metric) and the damping keeps it positive definite. An empty or non-finite
    G gives the identity (plain whitening).
    """
    g = out_covariance.double()
    n = g.shape[0]
    diag = g.diagonal().clone()
    mean = float(diag.mean())
    if not mean > 0.0 or not torch.isfinite(g).all():
        return torch.eye(n, dtype=g.dtype, device=g.device)
    metric = g * (1.0 - shrink)
    metric.diagonal().add_(shrink * diag + damp * mean)
    chol, info = torch.linalg.cholesky_ex(metric)
    if int(info) != 0:  # rounding on a nearly singular G: a floor on its eigenvalues instead
        evals, evecs = torch.linalg.eigh(metric)
        evals = evals.clamp_min(max(float(evals.max()) * 1e-10, 1e-300))
        chol = torch.linalg.cholesky((evecs * evals) @ evecs.T)
    return chol.T
