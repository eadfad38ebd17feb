"""Log-likelihood of continuations given contexts, as lm-evaluation-harness defines it.

A (context, continuation) pair is tokenized as lm-eval does: trailing spaces of the context move
to the continuation, the whole string is tokenized, and the continuation is what follows the
context's own tokens. For each distinct context the model runs once (KV cache), and every
continuation of that context is scored in one batch on top of it; models whose cache cannot
be shared fall back to batched full sequences.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from ..core.errors import RankcutError
from ..core.model_facts import (
    context_length,
    get_tokenizer,
    leading_special_ids,
    position_table_rows,
    with_leading_specials,
)


@dataclass
class Score:
    loglik: float
    greedy: bool  # every continuation token is the argmax


def encode_pair(tok: Any, context: str, continuation: str,
                prefix: list[int] | None = None) -> tuple[list[int], list[int]]:
    """Context and continuation ids. The context opens as the tokenizer opens any text
    (`prefix`: `leading_special_ids(tok)`, read off the tokenizer when not given)."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    whole = enc(context + continuation)
    ctx = enc(context)
    prefix = leading_special_ids(tok) if prefix is None else prefix
    if prefix:  # the context opens as the tokenizer opens any text; an empty one is the prefix alone
        return with_leading_specials(ctx, prefix), whole[len(ctx):]
    if not ctx:  # lm-eval's rule: BOS (else EOS) as the context, unless the text already opens with it
        start = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
        if whole and whole[0] == start:
            return whole[:1], whole[1:]
        return [start], whole
    return ctx, whole[len(ctx):]


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _cache_keyword(model: nn.Module) -> str:
    """transformers 5.24 renamed `past_key_values` to `cache` (the old name warns, then goes)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _returned_cache(out: Any) -> Any:
    cache = getattr(out, "cache", None)
    return cache if cache is not None else getattr(out, "past_key_values", None)


def _score_rows(logprobs: torch.Tensor, first: torch.Tensor | None, conts: Sequence[list[int]]) -> list[Score]:
    """logprobs[i, j] predicts conts[i][j+1]; `first` predicts conts[i][0] (None: in logprobs)."""
    out = []
    for i, cont in enumerate(conts):
        target = torch.tensor(cont, device=logprobs.device)
        if first is not None:
            rows = torch.cat([first[None], logprobs[i, : len(cont) - 1]], dim=0)
        else:
            rows = logprobs[i, : len(cont)]
        ll = rows.gather(-1, target[:, None]).sum().item()
        out.append(Score(ll, bool((rows.argmax(-1) == target).all())))
    return out


@torch.no_grad()
def _score_shared_context(model: nn.Module, ctx: list[int], conts: list[list[int]]) -> list[Score] | None:
    device = _device(model)
    out = model(input_ids=torch.tensor([ctx], device=device), use_cache=True)
    first = torch.log_softmax(out.logits[0, -1].float(), dim=-1)
    past = _returned_cache(out)
    longest = max(len(c) for c in conts)
    if longest == 1:  # every answer is one token (MMLU's " A".." D"): the context pass is enough
        return [Score(first[c[0]].item(), bool(first.argmax() == c[0])) for c in conts]
    if past is None or not hasattr(past, "batch_repeat_interleave"):
        return None
    try:
        past.batch_repeat_interleave(len(conts))
    except (AttributeError, NotImplementedError):  # a cache whose layers cannot repeat (Mamba's, transformers 5.24)
        return None
    pad = conts[0][0]
    # Each continuation's last token is predicted, never fed (lm-eval's input is ctx + cont[:-1]).
    # Right padding needs no mask: a causal model never lets a real token see a later pad.
    batch = torch.tensor([c[:-1] + [pad] * (longest - len(c)) for c in conts], device=device)
    logits = model(input_ids=batch, use_cache=True, **{_cache_keyword(model): past}).logits.float()
    return _score_rows(torch.log_softmax(logits, dim=-1), first, conts)


@torch.no_grad()
def _score_full(model: nn.Module, ctx: list[int], conts: list[list[int]]) -> list[Score]:
    device = _device(model)
    longest = max(len(c) for c in conts)
    rows = [ctx + c[:-1] + [c[0]] * (longest - len(c)) for c in conts]  # the last token is predicted, not fed
    logits = model(input_ids=torch.tensor(rows, device=device)).logits.float()
    logprobs = torch.log_softmax(logits[:, len(ctx) - 1:], dim=-1)
    return _score_rows(logprobs, None, conts)


def loglikelihoods(model: nn.Module, groups: Sequence[Sequence[tuple[str, str]]],
                   progress: bool = True, desc: str = "score") -> list[list[Score]]:
    """Score each group of (context, continuation) pairs; pairs sharing a context share its pass."""
    tok = get_tokenizer(model)
    cap = context_length(model)
    table = position_table_rows(model)
    prefix = leading_special_ids(tok)  # once, not per pair: it encodes a probe text twice
    results: list[list[Score]] = []
    share = True
    for group in tqdm(groups, desc=desc, disable=not progress, unit="q"):
        encoded = [encode_pair(tok, c, x, prefix) for c, x in group]
        encoded = [(ctx, cont or [tok.eos_token_id or 0]) for ctx, cont in encoded]
        for _, cont in encoded:
            if table is not None and len(cont) >= table:
                raise RankcutError(f"{desc}: an answer of {len(cont)} tokens leaves no room for its question in the "
                                   f"model's {table} positions")
        if cap is not None:  # lm-eval's left truncation, pair by pair: the model sees the last `cap` of ctx + cont[:-1]
            encoded = [(ctx[-max(1, cap + 1 - len(cont)):], cont) for ctx, cont in encoded]
        scores: list[Score | None] = [None] * len(encoded)
        by_ctx: dict[tuple[int, ...], list[int]] = {}
        for i, (ctx, _) in enumerate(encoded):
            by_ctx.setdefault(tuple(ctx), []).append(i)
        for ctx_t, idxs in by_ctx.items():
            conts = [encoded[i][1] for i in idxs]
            ctx = list(ctx_t)
            got = _score_shared_context(model, ctx, conts) if share else None
            if got is None:
                share = False
                got = _score_full(model, ctx, conts)
            for i, s in zip(idxs, got):
                scores[i] = s
        results.append(scores)  # type: ignore[arg-type]
    return results
