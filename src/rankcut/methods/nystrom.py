"""Cutting an MLP's intermediate channels jointly: MoDeGPT's Nyström decomposition (Lin et al. 2024).

An MLP y = W_down · h, with h = act(W_gate x) ⊙ (W_up x) (or act(W_up x)), is one map through its
intermediate dimension, and the three matrices can be cut together instead of one at a time:
keep k of the intermediate channels (rows of W_gate and W_up), and refit W_down on them. With
C = E[h hᵀ] the Gram of the down map's input, the least-squares refit is

    W_down' = W_down · C[:, S] · C[S, S]⁻¹,

the Nyström approximation of C seen through W_down. The channels S are the ones with the highest
ridge leverage scores diag(C (C + λI)⁻¹): the channels the others explain least (or, with
`select="output"`, those chosen greedily by the refit's output error). The result is a dense
MLP of a smaller intermediate size, the form every inference tool already runs.

Pure math on float64 tensors: no model, no hooks (the pipeline in `compress.channels` runs it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..core.errors import RankcutError


@dataclass
class ChannelCut:
    """The channels kept, ascending, and the down map refit on them (out × len(kept))."""

    kept: torch.Tensor
    down: torch.Tensor


def ridge_leverage(gram: torch.Tensor, ridge: float) -> torch.Tensor:
    """diag(C (C + λI)⁻¹) with λ = `ridge` × the mean of diag(C): each channel's share of what the
    channels span, discounted where its energy is under λ. Scale-free in C."""
    n = gram.shape[0]
    scale = gram.diagonal().mean().clamp_min(torch.finfo(gram.dtype).tiny)
    lam = ridge * scale
    values, vectors = torch.linalg.eigh(gram)
    # directions below rounding (pinv's cut-off) are no directions at all, whatever λ
    floor = n * torch.finfo(gram.dtype).eps * values.abs().max()
    share = torch.where(values > floor, values / (values + lam), torch.zeros_like(values))
    # diag(V diag(s/(s+λ)) Vᵀ), without forming the n × n product
    return (vectors.square() @ share).reshape(n)


def greedy_output_channels(gram: torch.Tensor, down: torch.Tensor, keep: int) -> torch.Tensor:
    """The `keep` channels chosen one at a time, each the one whose addition most lowers the refit
    down map's output error tr(W (C − C[:,S] C[S,S]⁻¹ C[S,:]) Wᵀ): a pivoted Cholesky of C whose
    pivot is scored through W = `down`, ‖W r_j‖² / r_jj for the residual column r_j. Leverage
    scores look at C alone; this looks at what the next matrix does with each channel."""
    residual = gram.clone()
    seen = down @ residual  # W R, kept current by the same rank-one updates as R
    chosen: list[int] = []
    taken = torch.zeros(gram.shape[0], dtype=torch.bool, device=gram.device)
    floor = gram.shape[0] * torch.finfo(gram.dtype).eps * gram.diagonal().abs().max()
    for _ in range(keep):
        pivots = residual.diagonal()
        score = seen.square().sum(0) / pivots.clamp_min(floor)
        score[taken | (pivots <= floor)] = -1.0
        j = int(score.argmax())
        if score[j] < 0:  # what is left is explained already: fill with the largest remaining channels
            rest = torch.where(~taken)[0]
            extra = rest[torch.argsort(gram.diagonal()[rest], descending=True)[: keep - len(chosen)]]
            chosen.extend(extra.tolist())
            break
        column = residual[:, j] / pivots[j].sqrt()
        residual -= torch.outer(column, column)
        seen -= torch.outer(down @ column, column)
        taken[j] = True
        chosen.append(j)
    return torch.sort(torch.tensor(chosen, device=gram.device)).values


def nystrom_channels(gram: torch.Tensor, down: torch.Tensor, keep: int, ridge: float = 1e-2,
                     damp: float = 1e-6, select: str = "leverage") -> ChannelCut:
    """Keep `keep` channels of a D-channel intermediate dimension and refit `down` (out × D).

    `gram` is C = Σ h hᵀ over the calibration tokens (D × D, float64). `select`: "leverage"
    (MoDeGPT's ridge leverage scores) or "output" (`greedy_output_channels`). The refit solves
    C[S, S] M = C[S, :] with `damp` × mean(diag C[S, S]) on the diagonal, so that a rank-deficient
    C (a channel that never fires) gives finite factors."""
    n = gram.shape[0]
    if gram.shape != (n, n) or down.shape[1] != n:
        raise RankcutError(f"the down map ({list(down.shape)}) and the Gram of its input ({list(gram.shape)}) "
                           "do not match")
    if not 1 <= keep <= n:
        raise RankcutError(f"cannot keep {keep} of {n} intermediate channels; give 1..{n}")
    gram = gram.to(torch.float64)
    down = down.to(torch.float64)
    if keep == n:
        return ChannelCut(torch.arange(n, device=gram.device), down.clone())
    if select == "leverage":
        kept = torch.sort(torch.topk(ridge_leverage(gram, ridge), keep).indices).values
    elif select == "output":
        kept = greedy_output_channels(gram, down, keep)
    else:
        raise RankcutError(f"channel selection '{select}' is not one rankcut knows; give leverage or output")
    core = gram[kept][:, kept]
    shift = damp * core.diagonal().mean().clamp_min(torch.finfo(core.dtype).tiny)
    core = core + shift * torch.eye(keep, dtype=core.dtype, device=core.device)
    # M = C[S,S]⁻¹ C[S,:]; the refit down map is W_down Mᵀ = W_down C[:,S] C[S,S]⁻¹
    factor = torch.linalg.cholesky(core)
    mapping = torch.cholesky_solve(gram[kept], factor)  # keep × D
    return ChannelCut(kept, down @ mapping.T)
