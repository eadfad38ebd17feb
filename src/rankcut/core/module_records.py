"""One targeted module as the manifest records it, both ways: the record of a swapped layer, and
the empty factored layer a record describes (checked before any tensor is made from it)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .channel_subset import ChannelSubsetLinear
from .embedding import EMBEDDING_FORM, TIED_HEAD_FORM, LowRankEmbedding, TiedLowRankHead
from .errors import RankcutError
from .layers import FACTORED, LowRankLinear, PivotLowRankLinear
from .ranks import factor_params
from .targets import Target

MANIFEST = "rankcut.json"


DENSE_FORMS = ("dense", "dense-fallback")  # budget left it dense; `speed_up_` put it back dense
# form → how many ranks it records
# ("channels" records the kept block's rows and columns)
FACTORED_FORMS = {"two-factor": 1, "pivot": 1, "tucker3": 2, EMBEDDING_FORM: 1, TIED_HEAD_FORM: 1,
                  ChannelSubsetLinear.form: 2}


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


def empty_factored(name: str, rec: Any, dtype: torch.dtype, model: nn.Module | None = None) -> nn.Module | None:
    """The factored module a record describes, uninitialized (None for a dense record), for the
    weights on disk to be loaded into. `model` (the skeleton being filled) is read by the
    embedding forms: the dense embedding's padding index, and the factored one a tied head uses."""
    rank = _recorded_rank(name, rec)
    if rank is None:
        return None
    if rec["form"] in (EMBEDDING_FORM, TIED_HEAD_FORM):
        return _empty_embedding_form(name, rec, dtype, rank, model)
    try:
        if rec.get("form") == ChannelSubsetLinear.form:
            return ChannelSubsetLinear(rec["in_features"], rec["out_features"], *rank, bias=rec["bias"], dtype=dtype)
        if rec.get("form") == PivotLowRankLinear.form:
            return PivotLowRankLinear(rec["in_features"], rec["out_features"], rank, bias=rec["bias"], dtype=dtype)
        return LowRankLinear(rec["in_features"], rec["out_features"], rank, bias=rec["bias"], dtype=dtype)
    except (ValueError, TypeError, KeyError) as exc:
        raise RankcutError(f"{MANIFEST} entry for {name} is inconsistent ({exc}); save the model again") from None


def module_record(target: Target, layer: nn.Module, config: Any) -> dict[str, Any]:
    """The manifest entry of one target: its factors (or kept channel block), or form "dense" for a
    target the budget left dense (its break-even rank would have bought nothing). `config`: the module's method
    config (anything with `to_dict`: core knows no method), or its dict already."""
    factored = isinstance(layer, (*FACTORED, ChannelSubsetLinear))
    rank = layer.rank if factored else None
    pivot = isinstance(layer, PivotLowRankLinear)
    if isinstance(layer, ChannelSubsetLinear):  # the kept block (biases are left out, as in dense_params)
        params = rank[0] * rank[1]
    else:
        params = factor_params(target.out_features, target.in_features, rank, pivot) if factored else target.params
    return {
        "kind": target.kind, "layer": target.layer,
        "out_features": target.out_features, "in_features": target.in_features,
        "transposed": target.transposed, "bias": getattr(layer, "bias", None) is not None,
        "form": layer.form if factored else "dense", "rank": list(rank) if isinstance(rank, tuple) else rank,
        "params": params,
        "dense_params": target.params, "config": config if isinstance(config, dict) else config.to_dict(),
    }


def _empty_embedding_form(name: str, rec: dict, dtype: torch.dtype, rank: int, model: nn.Module | None) -> nn.Module:
    if model is None:
        raise RankcutError(f"{MANIFEST} entry for {name} is a factored embedding form, built only inside its model")
    if rec["form"] == TIED_HEAD_FORM:
        try:
            embedding = model.get_submodule(rec.get("tied_to", ""))
        except AttributeError:
            embedding = None
        if not isinstance(embedding, LowRankEmbedding) or embedding.rank != rank:
            raise RankcutError(f"{MANIFEST} entry for {name} is tied to {rec.get('tied_to')!r}, which is not the "
                               "factored embedding of that rank; save the model again")
        return TiedLowRankHead(embedding)
    dense = model.get_submodule(name)
    return LowRankEmbedding(rec["out_features"], rec["in_features"], rank,
                            padding_idx=getattr(dense, "padding_idx", None), dtype=dtype)
