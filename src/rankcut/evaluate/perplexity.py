"""Token-level perplexity over non-overlapping windows, the way WikiText-2 numbers are reported.

The text is tokenized once; the first `limit` tokens are cut into windows of `seqlen`; each
window is scored on its own (no carried context), with BOS prepended where the tokenizer has
one so the window's first token is scored too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from ..core.errors import RankcutError
from ..core.model_facts import context_length, get_tokenizer


@dataclass
class PerplexityResult:
    perplexity: float
    nll: float  # mean negative log-likelihood per token (nats)
    nll_stderr: float  # standard error of the mean NLL, from the spread across windows
    tokens: int
    windows: int
    seqlen: int

    @property
    def perplexity_stderr(self) -> float:
        """Delta-method standard error of exp(mean NLL)."""
        return self.perplexity * self.nll_stderr


def tokenize_text(model: nn.Module, text: str) -> torch.Tensor:
    tok = get_tokenizer(model)
    ids = tok(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


@torch.no_grad()
def perplexity(model: nn.Module, text: str | torch.Tensor, seqlen: int = 2048,
               limit: int | None = None, batch_size: int = 1, progress: bool = True) -> PerplexityResult:
    """Perplexity of `model` on `text` (a string, or token ids already made)."""
    ids = tokenize_text(model, text) if isinstance(text, str) else text
    if limit is not None:
        ids = ids[:limit]
    bos = getattr(get_tokenizer(model), "bos_token_id", None)
    cap = context_length(model)
    if cap is not None:
        seqlen = min(seqlen, cap - (1 if bos is not None else 0))
    least = 1 if bos is not None else 2  # a window must hold a token and what predicts it
    if seqlen < least:
        raise RankcutError(f"--seqlen {seqlen}: give {least} or more tokens per perplexity window")
    n_windows = ids.numel() // seqlen
    if n_windows == 0:
        raise RankcutError(f"text has {ids.numel()} tokens, fewer than one window of {seqlen}; "
                           "lower --seqlen or raise --limit")
    windows = ids[: n_windows * seqlen].view(n_windows, seqlen)
    if bos is not None:
        windows = torch.cat([torch.full((n_windows, 1), bos, dtype=torch.long), windows], dim=1)
    device = next(model.parameters()).device
    per_window: list[float] = []
    scored_per_window = windows.shape[1] - 1
    for start in tqdm(range(0, n_windows, batch_size), desc="perplexity", disable=not progress, unit="batch"):
        batch = windows[start:start + batch_size].to(device)
        logits = model(input_ids=batch).logits.float()
        logprobs = torch.log_softmax(logits[:, :-1], dim=-1)
        nll = -logprobs.gather(-1, batch[:, 1:, None]).squeeze(-1)
        per_window.extend(nll.mean(dim=1).tolist())
    mean = sum(per_window) / len(per_window)
    var = sum((x - mean) ** 2 for x in per_window) / max(1, len(per_window) - 1)
    return PerplexityResult(
        perplexity=math.exp(mean), nll=mean, nll_stderr=math.sqrt(var / len(per_window)),
        tokens=n_windows * scored_per_window, windows=n_windows, seqlen=seqlen,
    )
