"""What rankcut reads off a loaded model: its tokenizer, its context length, whether a learned
position table bounds its input, and the tensor that stands for its answer."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .errors import RankcutError
from .record import record_of


def context_length(model: nn.Module) -> int | None:
    """The context the model was built for (`max_position_embeddings` or `n_positions`); None where
    its config names none (Mamba). A rotary model runs past it; see `position_table_rows`."""
    config = getattr(model, "config", None)
    for attr in ("max_position_embeddings", "n_positions"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def position_table_rows(model: nn.Module) -> int | None:
    """Rows of a learned position table (GPT-2's wpe, BERT's position_embeddings): an input longer
    than this fails inside the forward. Rotary models have none and run past `context_length`."""
    cap = context_length(model)
    if cap is None:
        return None
    inputs = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    for module in model.modules():
        if isinstance(module, nn.Embedding) and module is not inputs and module.num_embeddings == cap:
            return cap
    return None


def check_fits_positions(model: nn.Module, tokens: int, flag: str) -> None:
    """Refuse, naming `flag`, an input that a learned position table cannot hold."""
    table = position_table_rows(model)
    if table is not None and tokens > table:
        raise RankcutError(f"{flag} {tokens} is past the model's {table} positions; give {flag} {table} or less")


def get_tokenizer(model: nn.Module) -> Any:
    """The tokenizer that came with the model, or a clear error naming the fix."""
    tok = record_of(model).tokenizer
    if tok is None:
        raise RankcutError(
            "this model has no tokenizer; load it with rankcut.load_model from a folder that has "
            "tokenizer files, or set rankcut.core.record.record_of(model).tokenizer"
        )
    return tok


def model_output(model: nn.Module, input_ids: torch.Tensor, **kwargs: Any) -> torch.Tensor:
    """The tensor that stands for the model's answer: logits for LMs, hidden states for encoders."""
    out = model(input_ids=input_ids, **kwargs)
    logits = getattr(out, "logits", None)
    return logits if logits is not None else out.last_hidden_state


def leading_special_ids(tok: Any) -> list[int]:
    """The ids a tokenizer puts before any text by default: BOS for Llama-style tokenizers,
    [CLS] for BERT's, none for GPT-2's or SmolLM2's.

    A model trained always to see these at position 0 produces other activations without them,
    so calibration windows, training windows and scoring contexts start with them exactly where
    the tokenizer's default encoding would (the rule lm-eval follows: the tokenizer's default,
    never a duplicate). Read off the tokenizer by encoding one character both ways."""
    plain = tok("a", add_special_tokens=False)["input_ids"]
    full = tok("a")["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start:start + len(plain)] == plain:
            return list(full[:start])
    return []


def with_leading_specials(ids: list[int], prefix: list[int]) -> list[int]:
    """`prefix` + `ids`, unless `ids` already starts with it (text that spelled out the BOS)."""
    return list(ids) if not prefix or list(ids[:len(prefix)]) == prefix else [*prefix, *ids]


def prefixed_windows(ids: torch.Tensor, seqlen: int, prefix: list[int]) -> torch.Tensor:
    """Consecutive windows of `seqlen` tokens from a token stream, each opening with `prefix`
    followed by the stream's next `seqlen - len(prefix)` tokens (all of them when there is no
    prefix, as the stream cut in pieces)."""
    body = seqlen - len(prefix)
    n = ids.numel() // body
    rows = ids[: n * body].view(n, body)
    if not prefix:
        return rows
    return torch.cat([torch.tensor(prefix, dtype=ids.dtype).expand(n, -1), rows], dim=1)
