"""Cutting the token embedding and the output head (`--targets embed`, `head`).

A tied embedding/head is one vocab × dim matrix E, so it is factored once, E ≈ A·B, and both
sides use the factors (`rankcut.core.embedding`). The head's side is the one the loss sees:
calibrated methods whiten E by the Gram of the head's inputs (the final hidden states of the
model as it is cut, block factors already in place) and weight each vocabulary row by the
loss's Fisher at the logits, (p − y)² per token, measured without a backward pass. An untied
embedding named alone is looked up, never multiplied by activations, so it is cut by plain SVD.

Under a budget the embedding keeps the budget's own fraction: the budget then holds over
everything named, blocks and embedding together, though the two are not traded against each
other direction by direction.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..calibration.hooks import InputStats, ModuleStats, run_until
from ..calibration.sources import Calibration, batches, calibration_ids
from ..core.embedding import LowRankEmbedding, TiedLowRankHead
from ..core.errors import RankcutError
from ..core.modules import swap_module
from ..core.ranks import energy_rank, factor_params, keep_rank
from ..core.record import record_of
from ..methods.base import MethodConfig, handler_for
from ..methods.fisher import Fisher
from ..methods.svd import SVD

EMBEDDING_KINDS = ("embed", "head")


def split_embedding_targets(targets: Any) -> tuple[Any, set[str]]:
    """The target spec without `embed`/`head`, and which of the two it named."""
    tokens = [t.strip() for t in targets.split(",")] if isinstance(targets, str) else list(targets)
    named = {t for t in tokens if t in EMBEDDING_KINDS}
    rest = [t for t in tokens if t not in EMBEDDING_KINDS]
    if not named:
        return targets, set()
    return (",".join(rest) if isinstance(targets, str) else rest) if rest else None, named


def _parts(model: nn.Module) -> tuple[str, nn.Embedding, str | None, nn.Module | None, bool]:
    embedding = model.get_input_embeddings()
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(embedding, nn.Embedding):
        raise RankcutError(f"{type(model).__name__}'s input embedding is {type(embedding).__name__}, not a dense "
                           "nn.Embedding (already cut?); compress the dense model")
    names = {id(m): n for n, m in model.named_modules()}
    tied = isinstance(head, nn.Linear) and head.weight is embedding.weight
    return names[id(embedding)], embedding, names.get(id(head)) if head is not None else None, head, tied


def check_embedding_targets(model: nn.Module, named: set[str], config: MethodConfig) -> None:
    """Refuse what cannot be cut before any work starts."""
    _, embedding, _, head, tied = _parts(model)
    if "head" in named and not tied:
        raise RankcutError("cutting an untied output head is not supported yet; name `embed` for a model whose "
                           "head is tied to its embedding, or leave the head out")
    if isinstance(config.rank, tuple):
        raise RankcutError("the embedding takes one rank, not a Tucker pair")
    if embedding.weight.is_meta:
        raise RankcutError("the embedding is not in memory (a streamed model); drop --offload disk to cut it")


def embedding_rank(config: MethodConfig, vocab: int, dim: int, worth: torch.Tensor) -> int:
    """The rank the config gives a vocab × dim table (a budget counts as the fraction kept)."""
    if config.rank is not None:
        return min(int(config.rank), vocab, dim)
    if config.energy is not None:
        return energy_rank(worth.sqrt(), config.energy)
    fraction = config.keep if config.keep is not None else config.budget
    return keep_rank(vocab, dim, fraction)


@torch.no_grad()
def head_statistics(model: nn.Module, head: nn.Module, ids: torch.Tensor, calib: Calibration, needs: set[str],
                    progress: bool = True, chunk: int = 64) -> ModuleStats:
    """The head's input Gram over the calibration windows, and with a Fisher method the mean
    (p − y)² per vocabulary row at the logits (the loss gradient there, in closed form)."""
    inputs: InputStats | None = None
    fisher = None
    fisher_windows = calib.fisher_samples or ids.shape[0]
    seen = 0
    for batch in tqdm(batches(ids, calib.batch_size), desc="calibrate (head)", disable=not progress):
        reached = run_until(model, head, batch)
        if reached is None:
            raise RankcutError(f"{type(model).__name__} never called its output head; cannot calibrate it")
        hidden = (reached[0][0] if reached[0] else next(iter(reached[1].values()))).detach()
        if inputs is None:
            inputs = InputStats(hidden.shape[-1], with_abs=False, device=hidden.device)
        inputs.add(hidden)
        if needs & {"out_fisher", "out_covariance"} and seen < fisher_windows:
            rows = batch[: fisher_windows - seen]
            h, labels = hidden[: rows.shape[0], :-1], rows[:, 1:]
            for start in range(0, labels.shape[1], chunk):
                logits = head(h[:, start:start + chunk]).float()
                grad = logits.softmax(-1)
                grad.scatter_add_(-1, labels[:, start:start + chunk, None],
                                  torch.full_like(grad[..., :1], -1.0))
                part = grad.reshape(-1, grad.shape[-1]).double().square().sum(0)
                fisher = part if fisher is None else fisher + part
            seen += rows.shape[0]
    stats = ModuleStats(inputs=inputs)
    if fisher is not None:
        stats.out_fisher = fisher / max(1, seen * (ids.shape[1] - 1))
    return stats


def factor_embedding_(model: nn.Module, config: MethodConfig, named: set[str],
                      progress: bool = True) -> dict[str, dict[str, Any]]:
    """Factor the embedding (and its tied head) in place; the manifest records it makes."""
    check_embedding_targets(model, named, config)
    embed_name, embedding, head_name, head, tied = _parts(model)
    weight = embedding.weight.detach().to(torch.float64, copy=True)  # the handler may overwrite it
    calibrated = bool(config.needs) and tied
    method = config if calibrated else SVD(rank=config.rank, keep=config.keep, energy=config.energy,
                                           budget=config.budget)
    stats = None
    if calibrated:
        calib = getattr(config, "calibration", None) or Calibration()
        ids = calibration_ids(model, calib).to(embedding.weight.device)
        stats = head_statistics(model, head, ids, calib, set(config.needs), progress)
        if stats.out_fisher is not None and stats.out_fisher.ndim == 1 and "out_covariance" in config.needs:
            # a vocab × vocab covariance would not fit: the curvature method weights the head's rows by
            # their diagonal, as the Fisher method does
            fields = {k: v for k, v in method.to_dict().items() if k in Fisher.field_names()}
            fields["calibration"] = method.calibration
            method = Fisher(**fields)
    # factor at full width first: the rank may depend on the spectrum (energy)
    full = replace(method, rank=min(weight.shape), keep=None, energy=None, budget=None, allow_growth=True,
                   pivot=False, speed_limits=None)
    factors = handler_for(full)(weight, full, embed_name, stats, overwrite=True)
    rank = embedding_rank(config, *weight.shape, factors.importance)
    layer = LowRankEmbedding.from_factors(factors.out_factor[:, :rank], factors.in_factor[:rank],
                                          embedding.padding_idx, dtype=embedding.weight.dtype)
    layer = layer.to(embedding.weight.device)
    swap_module(model, embed_name, layer)
    record = {"kind": "embed", "layer": None, "out_features": weight.shape[0], "in_features": weight.shape[1],
              "transposed": False, "bias": False, "form": layer.form, "rank": rank,
              "params": factor_params(*weight.shape, rank), "dense_params": weight.numel(),
              "config": method.to_dict()}
    records = {embed_name: record}
    if tied:
        swap_module(model, head_name, TiedLowRankHead(layer))
        records[head_name] = {**record, "kind": "head", "form": TiedLowRankHead.form, "tied_to": embed_name,
                              "params": 0, "dense_params": 0}
        for config_of in (model.config, getattr(model.config, "get_text_config", lambda: None)()):
            if config_of is not None and hasattr(config_of, "tie_word_embeddings"):
                config_of.tie_word_embeddings = False  # nothing left to tie: the head reads the factors
    state = record_of(model)
    state.modules.update(records)
    return records
