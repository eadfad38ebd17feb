"""Small helpers on a model's modules that every part needs: parameter and byte counts, the
precision's name, swapping a submodule, finding the factored ones and multiplying one back."""

from __future__ import annotations

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from .channel_subset import ChannelSubsetLinear
from .layers import FACTORED


def count_params(model: nn.Module) -> int:
    """Distinct parameters (tied weights counted once, as `parameters()` yields them)."""
    return sum(p.numel() for p in model.parameters())


def count_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def dtype_name(model: nn.Module) -> str:
    """The precision the model's weights are held in, as `rankcut.json` and the CLI spell it."""
    return str(next(model.parameters()).dtype).replace("torch.", "")


def swap_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def compressed_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Every factored module (plain or pivoted), by name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, FACTORED)}


def replaced_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Every module rankcut swapped in for a dense linear, by name: the factored ones and the
    channel blocks (which have a dense form, but no factors to lay out or time)."""
    return {n: m for n, m in model.named_modules() if isinstance(m, (*FACTORED, ChannelSubsetLinear))}


@torch.no_grad()
def dense_form(layer: nn.Module, transposed: bool = False, dtype: torch.dtype | None = None) -> nn.Module:
    """The dense module a factored one stands for, its factors multiplied out: nn.Linear, or
    GPT-2's Conv1D (`transposed`: the original stored its weight as in × out)."""
    weight = layer.weight.detach()
    dtype = dtype or weight.dtype
    bias = None if layer.bias is None else layer.bias.detach()
    if transposed:
        dense = Conv1D(layer.out_features, layer.in_features)
        dense.weight = nn.Parameter(weight.T.contiguous().to(dtype))
        if bias is not None:
            dense.bias = nn.Parameter(bias.to(dtype).clone())
        return dense.to(weight.device)
    dense = nn.Linear(layer.in_features, layer.out_features, bias=bias is not None, device=weight.device, dtype=dtype)
    dense.weight.copy_(weight)
    if bias is not None:
        dense.bias.copy_(bias)
    return dense
