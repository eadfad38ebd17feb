"""The module that replaces a dense linear: y = B·(C·(A·x)) + b, with C present only in the
Tucker three-factor form.

The dense weight is dropped, not kept beside the factors, so parameters and bytes really fall.
Some model code reads `.weight` directly (transformers' fused Mamba kernels path, tied-weight
helpers); for those the `weight` property materializes the product, at the cost of a matmul.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


def balanced(out_factor: torch.Tensor, in_factor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The same product B·A with every direction's two vectors of equal norm.

    Weighted truncations (whitened, Fisher, activation-scaled) map the factors back through
    the inverse weights, which leaves one side hundreds of times larger than the other (SmolLM2
    at 50%: output columns of norm ~100 against input rows of ~0.1). The product is the same,
    but a fine-tune is not: Adam moves every entry by about the learning rate whatever its
    scale, so the small side changes the map hundreds of times faster than intended (a heal
    of such a cut got worse from its first step). Splitting each direction's scale evenly
    makes a step mean the same on both sides. Exact up to rounding; a direction that is zero
    on either side is left as it is.
    """
    out_norm = out_factor.norm(dim=0)
    in_norm = in_factor.norm(dim=1)
    usable = (out_norm > 0) & (in_norm > 0)
    scale = torch.where(usable, in_norm / torch.where(usable, out_norm, 1.0), 1.0).sqrt()
    return out_factor * scale, in_factor / scale[:, None]


def balance_factors_(model: nn.Module) -> int:
    """Balance every two-factor `LowRankLinear` of `model` in place (models saved before
    factors were stored balanced); returns how many modules it touched."""
    layers = [m for m in model.modules() if isinstance(m, LowRankLinear) and m.core is None]
    for layer in layers:
        layer.balance_()
    return len(layers)


class LowRankLinear(nn.Module):
    """A linear map held as factors: in_factor (r_in × in), optional core (r_out × r_in),
    out_factor (out × r_out), bias (out)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int | tuple[int, int],
        bias: bool = True,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        three_factor = isinstance(rank, (tuple, list))
        r_out, r_in = (int(rank[0]), int(rank[1])) if three_factor else (int(rank), int(rank))
        kw = {"dtype": dtype, "device": device}
        self.in_factor = nn.Parameter(torch.empty(r_in, in_features, **kw))
        self.core = nn.Parameter(torch.empty(r_out, r_in, **kw)) if three_factor else None
        self.out_factor = nn.Parameter(torch.empty(out_features, r_out, **kw))
        self.bias = nn.Parameter(torch.zeros(out_features, **kw)) if bias else None

    @classmethod
    def from_factors(
        cls,
        out_factor: torch.Tensor,
        in_factor: torch.Tensor,
        bias: torch.Tensor | None = None,
        core: torch.Tensor | None = None,
        dtype: torch.dtype = torch.float32,
        balance: bool = True,
    ) -> "LowRankLinear":
        """`balance`: store the two factors at equal scale (see `balanced`), the same product."""
        if balance and core is None:
            out_factor, in_factor = balanced(out_factor, in_factor)
        rank = (core.shape[0], core.shape[1]) if core is not None else in_factor.shape[0]
        layer = cls(in_factor.shape[1], out_factor.shape[0], rank, bias=bias is not None,
                    dtype=dtype, device=in_factor.device)
        with torch.no_grad():
            layer.in_factor.copy_(in_factor)
            layer.out_factor.copy_(out_factor)
            if core is not None:
                layer.core.copy_(core)
            if bias is not None:
                layer.bias.copy_(bias)
        return layer

    @property
    def rank(self) -> int | tuple[int, int]:
        if self.core is not None:
            return (self.core.shape[0], self.core.shape[1])
        return self.in_factor.shape[0]

    @property
    def form(self) -> str:
        return "tucker3" if self.core is not None else "two-factor"

    @torch.no_grad()
    def balance_(self) -> None:
        """Rescale the two factors to equal scale in place (see `balanced`); Tucker forms stay."""
        if self.core is None:
            out_factor, in_factor = balanced(self.out_factor.double(), self.in_factor.double())
            self.out_factor.copy_(out_factor)
            self.in_factor.copy_(in_factor)

    @torch.no_grad()
    def truncate_(self, rank: int) -> None:
        """Keep the first `rank` directions (factors come sorted by importance)."""
        if self.core is not None:
            raise ValueError("truncate_ applies to the two-factor form")
        self.in_factor = nn.Parameter(self.in_factor[:rank].clone())
        self.out_factor = nn.Parameter(self.out_factor[:, :rank].clone())

    @property
    def weight(self) -> torch.Tensor:
        """The dense (out × in) product, for code that reads weights directly."""
        inner = self.in_factor if self.core is None else self.core @ self.in_factor
        return self.out_factor @ inner

    # set by rankcut.speed.layouts when siblings share their input: one stacked matmul serves them all
    shared_input = None
    shared_slice: tuple[int, int] = (0, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.shared_input is not None and not torch.is_grad_enabled():
            h = self.shared_input.project(x)[..., self.shared_slice[0]:self.shared_slice[1]]
        else:
            h = F.linear(x, self.in_factor)
        if self.core is not None:
            h = F.linear(h, self.core)
        return F.linear(h, self.out_factor, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"rank={self.rank}, bias={self.bias is not None}")


class PivotLowRankLinear(nn.Module):
    """A rank-r linear map in r·(out + in) − r² numbers instead of r·(out + in).

    Any rank-r product B·A can be rewritten with r of its output rows (the pivots) held
    exactly, as the r × in factor P = B_p·A, and every other row as a combination of them:
    W = [I; C]·P with C = B_rest·B_p⁻¹, rows put back in their order. The r × r block that the
    plain form spends on the pivot rows is an identity, so it is not stored. The map is the same
    (up to float rounding); at a fixed parameter budget the rank is higher, by about 15% at half
    the parameters and 40% at 80% of a square matrix (PIFA, Zhao et al. 2025, does the same).

    Forward: h = P·x (the pivot rows' outputs), then C·h for the rest, put back in the output's
    row order, so the FLOPs equal the parameters. Two ways to lay the work out, the same values:
    - tokens as rows (the default): the result is contiguous, as nn.Linear's is, at the cost of
      one gather of the output's columns;
    - tokens as columns (`tokens_as_columns`, for more than one token): both products keep
      tokens as columns, the rows land by index as whole runs (cheaper than the gather), and the
      result is a transposed view. Elementwise ops and a next linear layer take that view at no
      cost, but attention does not: SDPA falls back from its flash kernel to the math path on
      strided q, k, v (SmolLM2's prefill spent 1.5–2× dense's time outside the targets).
    `rankcut.speed.layouts` chooses the way by timing the whole model, and picks each factor's memory
    order for the product it meets (the thin second factor streams much faster column-major at
    one token); its dense fallback times the layer as it will run.
    """

    form = "pivot"
    # set per module by rankcut.speed.layouts (and restored by rankcut.load): see the class docstring
    tokens_as_columns: bool = False

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> None:
        super().__init__()
        if not 1 <= rank <= min(in_features, out_features):
            raise ValueError(f"pivoted rank {rank} must be within 1 … {min(in_features, out_features)}")
        self.in_features, self.out_features = in_features, out_features
        kw = {"dtype": dtype, "device": device}
        self.in_factor = nn.Parameter(torch.empty(rank, in_features, **kw))  # the pivot rows
        self.out_factor = nn.Parameter(torch.empty(out_features - rank, rank, **kw))  # the rest, over them
        self.bias = nn.Parameter(torch.zeros(out_features, **kw)) if bias else None
        # output row of each pivot, then of each other row (a permutation of 0 … out − 1)
        self.register_buffer("rows", torch.arange(out_features, dtype=torch.int64, device=device))
        # where each output row sits in [pivots; rest]: the inverse of `rows`, kept in step with it
        self.register_buffer("order", torch.arange(out_features, dtype=torch.int64, device=device),
                             persistent=False)

    @classmethod
    @torch.no_grad()
    def from_factors(cls, out_factor: torch.Tensor, in_factor: torch.Tensor, bias: torch.Tensor | None = None,
                     dtype: torch.dtype = torch.float32) -> "PivotLowRankLinear":
        """The pivoted form of out_factor · in_factor (computed in float64).

        Pivots by LU with partial pivoting of out_factor (B): P·B = [L₁; L₂]·U, so the pivot rows
        are B_p = L₁·U and C = B_rest·B_p⁻¹ = L₂·L₁⁻¹, a unit-triangular solve (|L| ≤ 1 keeps
        it tame). Several times faster than column-pivoted QR, which matters at 200 modules.
        """
        b, a = out_factor.detach().double(), in_factor.detach().double()
        rank = a.shape[0]
        lu, swaps = torch.linalg.lu_factor(b)
        order = list(range(b.shape[0]))
        for i, j in enumerate((swaps - 1).tolist()):  # LAPACK's row interchanges, in sequence
            order[i], order[j] = order[j], order[i]
        lower = torch.tril(lu, diagonal=-1)
        lower[:rank].diagonal().fill_(1.0)
        upper = torch.triu(lu[:rank])
        layer = cls(a.shape[1], b.shape[0], rank, bias=bias is not None, dtype=dtype, device=in_factor.device)
        layer.in_factor.copy_(lower[:rank] @ (upper @ a))
        layer.out_factor.copy_(torch.linalg.solve_triangular(lower[:rank], lower[rank:], upper=False, left=False,
                                                             unitriangular=True))
        layer.rows.copy_(torch.tensor(order, dtype=torch.int64))
        layer._sync_order()
        if bias is not None:
            layer.bias.copy_(bias)
        return layer

    @classmethod
    def from_low_rank(cls, layer: "LowRankLinear") -> "PivotLowRankLinear":
        if layer.core is not None:
            raise ValueError("the pivoted form applies to two factors; fold the Tucker core first")
        bias = None if layer.bias is None else layer.bias.detach()
        return cls.from_factors(layer.out_factor, layer.in_factor, bias, dtype=layer.in_factor.dtype)

    @property
    def rank(self) -> int:
        return self.in_factor.shape[0]

    @property
    def weight(self) -> torch.Tensor:
        """The dense (out × in) product, for code that reads weights directly."""
        stacked = torch.cat([self.in_factor, self.out_factor @ self.in_factor])
        return stacked.new_empty(stacked.shape).index_copy_(0, self.rows, stacked)

    # set by rankcut.speed.layouts when siblings share their input: one stacked matmul serves them all
    shared_input = None
    shared_slice: tuple[int, int] = (0, 0)
    core = None

    @torch.no_grad()
    def _sync_order(self) -> None:
        self.order.copy_(torch.argsort(self.rows))

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._sync_order()  # `order` is derived from the loaded `rows`, not stored

    def _first(self, x: torch.Tensor) -> torch.Tensor | None:
        """The pivot rows' outputs (tokens as rows) when a stacked sibling computed them."""
        if self.shared_input is not None and not torch.is_grad_enabled():
            return self.shared_input.project(x)[..., self.shared_slice[0]:self.shared_slice[1]]
        return None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tokens_as_columns and x.numel() > self.in_features:
            return self._forward_tokens_as_columns(x)
        h = self._first(x)
        if h is None:
            h = F.linear(x, self.in_factor)
        stacked = torch.cat([h, F.linear(h, self.out_factor)], dim=-1)  # rows in [pivots; rest] order
        out = stacked.index_select(-1, self.order)
        return out if self.bias is None else out + self.bias

    def _forward_tokens_as_columns(self, x: torch.Tensor) -> torch.Tensor:
        r = self.rank
        h = self._first(x)
        if h is not None:
            h_t = h.reshape(-1, r).T
        else:
            h_t = torch.mm(self.in_factor, x.reshape(-1, self.in_features).T)  # r × tokens
        # each output row is a contiguous run of tokens that index_copy_ moves whole
        out_t = h_t.new_empty(self.out_features, h_t.shape[1])
        out_t.index_copy_(0, self.rows[:r], h_t)  # row j of [h; C·h] is output row rows[j]
        out_t.index_copy_(0, self.rows[r:], torch.mm(self.out_factor, h_t))
        out = out_t.T.reshape(*x.shape[:-1], self.out_features)
        return out if self.bias is None else out + self.bias

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"rank={self.rank}, pivoted, bias={self.bias is not None}")


# the layer types that hold a compressed target's factors (for isinstance checks)
FACTORED: tuple[type[nn.Module], ...] = (LowRankLinear, PivotLowRankLinear)


class SoftThresholdLinear(nn.Module):
    """SoftLMs' trainable layer: W = out_factor · diag(max(s − τ, 0)) · in_factor.

    τ = rho · scale is learned per layer; directions whose singular value falls under it
    contribute exactly zero, so the final hard cut to a LowRankLinear drops only dead
    directions. `scale` (the layer's largest initial singular value) is a fixed buffer: it puts
    every layer's threshold and the rank estimate's temperature on the same relative footing.

    `shrink=False` keeps the selection and drops the shrinkage: W = out·diag(s·[s > τ])·in,
    with the gate's gradient taken from its sigmoid (straight-through). Soft-thresholding
    lowers every kept value by τ, a large change a short fine-tune cannot undo; the gate
    changes nothing but which directions live, and its gradient also reaches the dead
    directions near τ, so the threshold learns what reviving them would be worth.
    """

    def __init__(self, out_factor: torch.Tensor, in_factor: torch.Tensor, singular_values: torch.Tensor,
                 tau: float, bias: torch.Tensor | None = None, temperature: float = 0.01,
                 shrink: bool = True) -> None:
        super().__init__()
        self.out_features, self.in_features = out_factor.shape[0], in_factor.shape[1]
        self.out_factor = nn.Parameter(out_factor.clone())
        self.in_factor = nn.Parameter(in_factor.clone())
        self.s = nn.Parameter(singular_values.clone())
        scale = float(singular_values.max().clamp(min=1e-12))
        self.register_buffer("scale", torch.tensor(scale, dtype=singular_values.dtype))
        self.rho = nn.Parameter(torch.tensor(tau / scale, dtype=singular_values.dtype))
        self.bias = nn.Parameter(bias.clone()) if bias is not None else None
        self.temperature = temperature
        self.shrink = shrink

    @property
    def tau(self) -> torch.Tensor:
        return self.rho.clamp(min=0) * self.scale

    def thresholded(self) -> torch.Tensor:
        """The singular values as the forward pass uses them."""
        if self.shrink:
            return torch.relu(self.s - self.tau)
        soft = torch.sigmoid((self.s - self.tau) / (self.temperature * self.scale))
        hard = (self.s > self.tau).to(self.s.dtype)
        return self.s * (hard + soft - soft.detach())

    def soft_rank(self) -> torch.Tensor:
        """A differentiable count of the surviving directions, for the budget penalty's gradient."""
        return torch.sigmoid((self.s - self.tau) / (self.temperature * self.scale)).sum()

    def hard_rank(self) -> int:
        return int((self.s > self.tau).sum())

    @property
    def rank(self) -> int:
        return self.hard_rank()

    @property
    def weight(self) -> torch.Tensor:
        return (self.out_factor * self.thresholded()) @ self.in_factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.linear(x, self.in_factor) * self.thresholded()
        return F.linear(h, self.out_factor, self.bias)

    @torch.no_grad()
    def to_low_rank(self, keep: torch.Tensor, tau: float) -> LowRankLinear:
        """The hard cut: the directions in `keep` (indices), soft-thresholded at `tau`."""
        order = keep[torch.argsort(self.s[keep], descending=True)]
        values = torch.relu(self.s[order] - tau) if self.shrink else self.s[order]
        bias = None if self.bias is None else self.bias.detach()
        return LowRankLinear.from_factors(self.out_factor[:, order] * values, self.in_factor[order], bias=bias,
                                          dtype=self.out_factor.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"max_rank={self.s.numel()}, rank={self.hard_rank()}")
