"""Timing primitives every speed decision shares: medians over repeats, prefill and decode
clocks, random inputs, and sweeps over weight copies larger than the cache for decode-sized
workloads (a decode step reads its weights from memory, not cache)."""

from __future__ import annotations

import math
import statistics
import time
from typing import Any, Callable, Iterable

import torch
from torch import nn

from ..core.modules import count_bytes

# A generating model runs one token per step and whole prompts; an encoder never runs one token
# at a time, so timing it there would let a matrix-vector product it never computes decide its
# layout and fallback (MiniLM at 50%: 24 of 36 modules put back dense, 1.27x instead of 1.6x).
DECODER_TOKENS: tuple[int, ...] = (1, 512)
ENCODER_TOKENS: tuple[int, ...] = (128, 512)  # one sentence; a small batch of them


def workload_tokens(model: nn.Module) -> tuple[int, ...]:
    """The token counts a model's matmuls see in use: decoding and prefill, or encoding only."""
    can_generate = getattr(model, "can_generate", None)
    return DECODER_TOKENS if callable(can_generate) and can_generate() else ENCODER_TOKENS


# Up to this many tokens a matmul is bound by reading its weight from memory (a decode step):
# such workloads are timed over copies of the weight that together overflow the last-level
# cache, as a model's weights do; timing one small matrix again and again would read it from
# cache and favour whichever shape computes fastest, not whichever streams fastest.
MEMORY_BOUND_TOKENS = 16
COLD_BYTES = {"cpu": 64 << 20, "cuda": 256 << 20}  # several times the last-level cache


def _cache_overflow_bytes(device: torch.device) -> int:
    return COLD_BYTES.get(device.type, COLD_BYTES["cpu"])


def cold_bytes(model: nn.Module, device: torch.device) -> int:
    """How many bytes a decode-sized timing sweeps: as many as the model reads per token, up to
    several times the last-level cache. A model that fits in cache is timed from cache, as it runs
    (and a tiny one is not timed over thousands of copies)."""
    return min(_cache_overflow_bytes(device), count_bytes(model))


def _copies(make: Callable[[], object], nbytes: int, tokens: int, device: torch.device,
            sweep_bytes: int | None = None) -> list:
    if tokens > MEMORY_BOUND_TOKENS:
        return [make()]
    sweep = _cache_overflow_bytes(device) if sweep_bytes is None else sweep_bytes
    return [make() for _ in range(max(1, sweep // max(1, nbytes)))]


def _time_each(fn: Callable[[object], object], copies: list, repeats: int,
               device: torch.device = torch.device("cpu")) -> float:
    """Median time of one call of `fn`, over `copies` in turn (see MEMORY_BOUND_TOKENS)."""
    def sweep() -> None:
        for c in copies:
            fn(c)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    return median_time(lambda: (sweep(), sync()), repeats) / len(copies)


def geometric_mean(values: Iterable[float]) -> float:
    values = list(values)
    return math.exp(sum(math.log(v) for v in values) / len(values))


def median_time(fn: Any, repeats: int) -> float:
    """Median wall time (s) of `fn()` over `repeats` runs, after one warm-up run."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def random_ids(model: nn.Module, batch: int, seqlen: int) -> torch.Tensor:
    """Seeded random token ids: the same prompt for every model a run compares."""
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (batch, seqlen), generator=torch.Generator().manual_seed(0))
    return ids.to(next(model.parameters()).device)


def sync_device(model: nn.Module) -> None:
    """GPU kernels run asynchronously: wait for them before reading the clock."""
    device = next(model.parameters()).device
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def time_prefill(model: nn.Module, ids: torch.Tensor) -> float:
    """One forward over the prompt, logits for the last position only (as `generate` does)."""
    kwargs = prefill_kwargs(model)
    sync_device(model)
    t0 = time.perf_counter()
    model(input_ids=ids, **kwargs)
    sync_device(model)
    return time.perf_counter() - t0


@torch.no_grad()
def time_decode(model: nn.Module, ids: torch.Tensor, new_tokens: int) -> float:
    """Tokens per second of greedy decoding with a KV cache, prompt excluded."""
    sync_device(model)
    t0 = time.perf_counter()
    model(input_ids=ids, use_cache=True)
    sync_device(model)
    prompt_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                   pad_token_id=0)
    sync_device(model)
    total = time.perf_counter() - t0
    return ids.shape[0] * new_tokens / max(1e-9, total - prompt_s)


def prefill_kwargs(model: nn.Module) -> dict[str, Any]:
    """Logits for the last position only, where the model can (as `generate`'s prefill does):
    full logits would time the head once per prompt token."""
    import inspect

    return {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}


DECODE_PROMPT = 32  # tokens of the prompt a decoding run continues
