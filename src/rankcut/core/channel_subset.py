"""The module that replaces a dense linear by a block of it: some input columns, some output rows.

A joint cut of two matrices that act together (attention's Q with K, V with O) keeps fewer
channels of each head, but transformers' attention code needs every head at its full width:
q, k and v are reshaped to (heads, head_dim), and RoPE rotates fixed channel pairs at fixed
frequencies. So the cut cannot change the config's head size. Instead the module stores only
the kept block W[rows, cols] and puts zeros where the dropped output channels were. A query and
key channel that are both zero add nothing to a score, a value channel that is zero feeds
nothing to the output map, so the attention computed on the padded heads is exactly the cut
attention. The parameters and bytes are those of the kept block.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ChannelSubsetLinear(nn.Module):
    """y = scatter_rows(W_kept · x[cols]) + bias: a dense linear whose weight is zero outside the
    rows × cols block it stores. `rows` and `cols` are index buffers, saved with the weights."""

    form = "channels"

    def __init__(self, in_features: int, out_features: int, kept_rows: int, kept_cols: int, bias: bool = True,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> None:
        super().__init__()
        if not (1 <= kept_rows <= out_features and 1 <= kept_cols <= in_features):
            raise ValueError(f"a block of {kept_rows} × {kept_cols} must lie within {out_features} × {in_features}")
        self.in_features, self.out_features = in_features, out_features
        kw = {"dtype": dtype, "device": device}
        self.kept = nn.Parameter(torch.empty(kept_rows, kept_cols, **kw))
        # full width: the dropped rows' entries are zero, so the padded output is exactly the cut
        self.bias = nn.Parameter(torch.zeros(out_features, **kw)) if bias else None
        self.register_buffer("rows", torch.arange(kept_rows, dtype=torch.int64, device=device))
        self.register_buffer("cols", torch.arange(kept_cols, dtype=torch.int64, device=device))

    @classmethod
    @torch.no_grad()
    def from_block(cls, kept: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, in_features: int,
                   out_features: int, bias: torch.Tensor | None = None,
                   dtype: torch.dtype | None = None) -> "ChannelSubsetLinear":
        """The module holding `kept` (len(rows) × len(cols)) at output rows `rows` and input
        columns `cols`; `bias` is the full-width bias (its dropped rows are zeroed here)."""
        dtype = dtype or kept.dtype
        layer = cls(in_features, out_features, len(rows), len(cols), bias=bias is not None, dtype=dtype,
                    device=kept.device)
        layer.kept.copy_(kept)
        layer.rows.copy_(rows)
        layer.cols.copy_(cols)
        if bias is not None:
            layer.bias.zero_()
            layer.bias[layer.rows] = bias.to(dtype)[layer.rows]
        return layer

    @property
    def rank(self) -> tuple[int, int]:
        """The kept block's shape (rows, columns), as the manifest records it."""
        return (self.kept.shape[0], self.kept.shape[1])

    @property
    def weight(self) -> torch.Tensor:
        """The dense (out × in) matrix, zero outside the block, for code that reads weights directly."""
        dense = self.kept.new_zeros(self.out_features, self.in_features)
        dense[self.rows[:, None], self.cols[None, :]] = self.kept
        return dense

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.cols.numel() < self.in_features:
            x = x.index_select(-1, self.cols)
        y = F.linear(x, self.kept)
        if self.rows.numel() < self.out_features:
            y = y.new_zeros(*y.shape[:-1], self.out_features).index_copy(-1, self.rows, y)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"kept={self.kept.shape[0]}x{self.kept.shape[1]}, bias={self.bias is not None}")
