"""Shared fixtures: tiny random models (no download) and helpers that compare outputs."""

from __future__ import annotations

import pytest
import torch

import rankcut
from rankcut.models import model_output
from rankcut.targets import select_targets

TINY = ["tiny-llama", "tiny-gpt2", "tiny-bert", "tiny-mamba"]
SAMPLE = "Low-rank factors make a model smaller. The quick brown fox jumps over the lazy dog."


def sample_ids(model: torch.nn.Module) -> torch.Tensor:
    return rankcut.get_tokenizer(model)(SAMPLE, return_tensors="pt").input_ids


@torch.no_grad()
def output(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model_output(model, ids)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def full_rank_overrides(model: torch.nn.Module, cls: type, **kw) -> dict:
    """Per-module configs at each matrix's full rank (past break-even, so growth is allowed)."""
    return {f"^{t.name}$": cls(rank=t.max_rank, allow_growth=True, **kw) for t in select_targets(model)}


@pytest.fixture(params=TINY)
def tiny_name(request: pytest.FixtureRequest) -> str:
    return request.param
