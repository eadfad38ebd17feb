"""A factored token embedding, E ≈ A·B, and the output head that shares it.

The lookup of token t becomes row t of A (vocab × r) times B (r × dim); a head tied to the
embedding computes logits = (h·Bᵀ)·Aᵀ, two thin matmuls in place of one vocab × dim one. The
tied head owns no parameters: it reads the embedding's factors, so the state dict holds them
once and nothing has to be re-tied after loading (the model's config says its head is untied,
which keeps transformers from tying a `.weight` that no longer exists).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .layers import balanced

EMBEDDING_FORM = "embedding"
TIED_HEAD_FORM = "tied-head"


class LowRankEmbedding(nn.Module):
    """nn.Embedding held as factors: out_factor (vocab × r) rows looked up, times in_factor (r × dim)."""

    form = EMBEDDING_FORM

    def __init__(self, num_embeddings: int, embedding_dim: int, rank: int, padding_idx: int | None = None,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.padding_idx = padding_idx
        self.out_factor = nn.Parameter(torch.empty(num_embeddings, int(rank), dtype=dtype, device=device))
        self.in_factor = nn.Parameter(torch.empty(int(rank), embedding_dim, dtype=dtype, device=device))

    @classmethod
    def from_factors(cls, out_factor: torch.Tensor, in_factor: torch.Tensor, padding_idx: int | None = None,
                     dtype: torch.dtype = torch.float32) -> "LowRankEmbedding":
        out_factor, in_factor = balanced(out_factor, in_factor)
        layer = cls(out_factor.shape[0], in_factor.shape[1], in_factor.shape[0], padding_idx, dtype,
                    in_factor.device)
        with torch.no_grad():
            layer.out_factor.copy_(out_factor)
            layer.in_factor.copy_(in_factor)
        return layer

    # the names transformers and rankcut read off a linear-like module
    @property
    def out_features(self) -> int:
        return self.num_embeddings

    @property
    def in_features(self) -> int:
        return self.embedding_dim

    bias = None

    @property
    def rank(self) -> int:
        return self.in_factor.shape[0]

    @property
    def weight(self) -> torch.Tensor:
        """The dense (vocab × dim) table, for code that reads it directly."""
        return self.out_factor @ self.in_factor

    @torch.no_grad()
    def truncate_(self, rank: int) -> None:
        self.in_factor = nn.Parameter(self.in_factor[:rank].clone())
        self.out_factor = nn.Parameter(self.out_factor[:, :rank].clone())

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.linear(F.embedding(ids, self.out_factor, self.padding_idx), self.in_factor.T)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, rank={self.rank}"


class TiedLowRankHead(nn.Module):
    """The output head of a model whose tied embedding is a `LowRankEmbedding`: its factors, read
    through a reference that is not a submodule (so they are saved and counted once)."""

    form = TIED_HEAD_FORM
    bias = None

    def __init__(self, embedding: LowRankEmbedding) -> None:
        super().__init__()
        self._embedding = [embedding]  # a list: not registered, so not a second owner of the factors

    @property
    def embedding(self) -> LowRankEmbedding:
        return self._embedding[0]

    @property
    def in_features(self) -> int:
        return self.embedding.embedding_dim

    @property
    def out_features(self) -> int:
        return self.embedding.num_embeddings

    @property
    def rank(self) -> int:
        return self.embedding.rank

    @property
    def weight(self) -> torch.Tensor:
        return self.embedding.weight

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(hidden, self.embedding.in_factor), self.embedding.out_factor)

    def extra_repr(self) -> str:
        return f"tied to the factored embedding, {self.in_features} → {self.out_features}, rank={self.rank}"


FACTORED_EMBEDDINGS: tuple[type[nn.Module], ...] = (LowRankEmbedding, TiedLowRankHead)
