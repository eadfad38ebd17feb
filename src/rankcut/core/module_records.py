"""One targeted module as the manifest records it, both ways: the record of a swapped layer, and
the empty factored layer a record describes (checked before any tensor is made from it)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .errors import RankcutError
from .layers import FACTORED, LowRankLinear, PivotLowRankLinear
from .ranks import factor_params
from .targets import Target

MANIFEST = "rankcut.json"


DENSE_FORMS = ("dense", "dense-fallback")  # budget left it dense; `speed_up_` put it back dense
FACTORED_FORMS = {"two-factor": 1, "pivot": 1, "tucker3": 2}  # form → how many ranks it records


def _recorded_rank(name: str, rec: Any) -> int | tuple[int, int] | None:
    """A module record's rank (None for a dense one), checked before any tensor is made from it."""
    form = rec.get("form") if isinstance(rec, dict) else None
    if form in DENSE_FORMS:
        return None
    if form not in FACTORED_FORMS:
        raise RankcutError(f"{MANIFEST} entry for {name} has form {form!r}, not one of "
                           f"{', '.join([*FACTORED_FORMS, *DENSE_FORMS])}; save the model again")
    rank = rec.get("rank")
    ranks = rank if isinstance(rank, list) else [rank]
    if len(ranks) != FACTORED_FORMS[form] or not all(type(r) is int and r >= 1 for r in ranks):
        raise RankcutError(f"{MANIFEST} entry for {name} records rank {rank!r}, not a valid rank for form {form}; "
                           "save the model again")
    return tuple(ranks) if isinstance(rank, list) else rank


def empty_factored(name: str, rec: Any, dtype: torch.dtype) -> LowRankLinear | PivotLowRankLinear | None:
    """The factored module a record describes, uninitialized (None for a dense record), for the
    weights on disk to be loaded into."""
    rank = _recorded_rank(name, rec)
    if rank is None:
        return None
    try:
        if rec.get("form") == PivotLowRankLinear.form:
            return PivotLowRankLinear(rec["in_features"], rec["out_features"], rank, bias=rec["bias"], dtype=dtype)
        return LowRankLinear(rec["in_features"], rec["out_features"], rank, bias=rec["bias"], dtype=dtype)
    except (ValueError, TypeError, KeyError) as exc:
        raise RankcutError(f"{MANIFEST} entry for {name} is inconsistent ({exc}); save the model again") from None


def module_record(target: Target, layer: nn.Module, config: Any) -> dict[str, Any]:
    """The manifest entry of one target: its factors, or form "dense" for a target the budget
    left dense (its break-even rank would have bought nothing). `config`: the module's method
    config (anything with `to_dict`: core knows no method), or its dict already."""
    factored = isinstance(layer, FACTORED)
    rank = layer.rank if factored else None
    pivot = isinstance(layer, PivotLowRankLinear)
    return {
        "kind": target.kind, "layer": target.layer,
        "out_features": target.out_features, "in_features": target.in_features,
        "transposed": target.transposed, "bias": getattr(layer, "bias", None) is not None,
        "form": layer.form if factored else "dense", "rank": list(rank) if isinstance(rank, tuple) else rank,
        "params": factor_params(target.out_features, target.in_features, rank, pivot) if factored else target.params,
        "dense_params": target.params, "config": config if isinstance(config, dict) else config.to_dict(),
    }
