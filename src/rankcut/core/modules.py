"""Small helpers on a model's modules that every part needs: parameter and byte counts, the
precision's name, swapping a submodule, and finding the factored ones."""

from __future__ import annotations

from torch import nn

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
