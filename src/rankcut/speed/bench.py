"""Efficiency, measured: parameters, bytes, FLOPs per token, prefill latency, decode speed,
peak memory — for one model or for two side by side.

Two models are timed interleaved (A, B, A, B, ...) in one process so that machine noise hits
both alike; medians are reported with the ratio. Peak memory is measured in a fresh child
process per model (the high-water mark of its resident set during one prefill), because a
process's own high-water mark never falls.
"""

from __future__ import annotations

import multiprocessing as mp
import resource
import statistics
from dataclasses import asdict, dataclass, field
from typing import Any

from torch import nn

from ..core.errors import RankcutError
from ..core.layers import FACTORED
from ..core.model_facts import position_table_rows
from ..core.modules import count_bytes, count_params
from ..core.targets import is_compressible
from ..io.models import load_model
from .timing import DECODE_PROMPT, random_ids, time_decode, time_prefill


@dataclass
class StaticFigures:
    params: int
    bytes: int
    bytes_by_dtype: dict[str, int]
    linear_flops_per_token: int  # 2 × multiply-adds of every linear map (head included)


@dataclass
class BenchResult:
    name: str
    static: StaticFigures
    prefill_s: list[float] = field(default_factory=list)
    decode_tokens_per_s: list[float] = field(default_factory=list)
    peak_rss_mb: float | None = None

    def summary(self) -> dict[str, Any]:
        out = asdict(self.static)
        if self.prefill_s:
            out["prefill_s_median"] = statistics.median(self.prefill_s)
        if self.decode_tokens_per_s:
            out["decode_tokens_per_s_median"] = statistics.median(self.decode_tokens_per_s)
        if self.peak_rss_mb is not None:
            out["peak_rss_mb"] = self.peak_rss_mb
        return out


def is_linear_map(module: nn.Module) -> bool:
    """A linear map rankcut counts: a factored module, or a dense one it could factorize."""
    return isinstance(module, FACTORED) or is_compressible(module)


def map_params(module: nn.Module) -> int:
    """The numbers a linear map multiplies by: its weight or its factors (the bias is an add)."""
    return sum(p.numel() for n, p in module.named_parameters() if n != "bias")


def static_figures(model: nn.Module) -> StaticFigures:
    by_dtype: dict[str, int] = {}
    for p in model.parameters():
        key = str(p.dtype).replace("torch.", "")
        by_dtype[key] = by_dtype.get(key, 0) + p.numel() * p.element_size()
    macs = sum(map_params(m) for m in model.modules() if is_linear_map(m))
    return StaticFigures(count_params(model), count_bytes(model), by_dtype, 2 * macs)


def _peak_child(name: str, batch: int, seqlen: int, queue: Any) -> None:
    model = load_model(name)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    time_prefill(model, random_ids(model, batch, seqlen))
    queue.put((base, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss))


def peak_rss_mb(name: str, batch: int, seqlen: int) -> float:
    """High-water resident memory (MiB) of a fresh process that loads `name` and runs a prefill."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_peak_child, args=(name, batch, seqlen, queue))
    proc.start()
    _, peak = queue.get(timeout=900)
    proc.join()
    return peak / 1024


def check_workload(models: dict[str, nn.Module], seqlen: int, batch: int, decode: int, repeats: int,
                   labels: dict[str, str] | None = None) -> None:
    """Sizes a forward cannot run fail here, naming the flag, not deep inside a model's forward."""
    for flag, value, least in (("--seqlen", seqlen, 1), ("--batch", batch, 1), ("--repeats", repeats, 1),
                               ("--decode", decode, 0)):
        if value < least:
            raise RankcutError(f"{flag} {value}: give {least} or more")
    for name, model in models.items():
        if decode and not callable(getattr(model, "generate", None)):
            raise RankcutError(f"{(labels or {}).get(name, name)} is an encoder and does not generate: drop --decode")
        cap = position_table_rows(model)
        longest = max(seqlen, min(seqlen, DECODE_PROMPT) + decode if decode else 0)
        if cap is not None and longest > cap:
            what = "--seqlen" if seqlen > cap else "--decode"
            raise RankcutError(f"{(labels or {}).get(name, name)} has positions for {cap} tokens; lower {what} "
                               f"(asked for {longest})")


def benchmark(models: dict[str, nn.Module], seqlen: int = 512, batch: int = 1, decode: int = 0,
              repeats: int = 5, warmup: int = 1, memory: bool = False,
              names_on_disk: dict[str, str] | None = None) -> dict[str, BenchResult]:
    check_workload(models, seqlen, batch, decode, repeats, labels=names_on_disk)
    results = {n: BenchResult(n, static_figures(m)) for n, m in models.items()}
    ids = random_ids(next(iter(models.values())), batch, seqlen)
    for _ in range(warmup):
        for m in models.values():
            time_prefill(m, ids)
    for _ in range(repeats):  # interleaved: machine noise hits every model alike
        for n, m in models.items():
            results[n].prefill_s.append(time_prefill(m, ids))
    if decode:
        prompt = ids[:, :DECODE_PROMPT]
        for _ in range(max(1, repeats // 2)):
            for n, m in models.items():
                results[n].decode_tokens_per_s.append(time_decode(m, prompt, decode))
    if memory and names_on_disk:
        for n, on_disk in names_on_disk.items():
            results[n].peak_rss_mb = peak_rss_mb(on_disk, batch, seqlen)
    return results


def paired_range(slow: list[float], fast: list[float]) -> tuple[float, float] | None:
    """The lowest and highest speed-up of one interleaved repeat against its partner (slow[i] /
    fast[i]): how far one run of the benchmark could land from the median's ratio. The ratio of
    the medians always lies inside it. None when the runs were not paired one to one."""
    if not slow or len(slow) != len(fast):
        return None
    pairs = [s / f for s, f in zip(slow, fast)]
    return min(pairs), max(pairs)


def ratios(base: BenchResult, other: BenchResult) -> dict[str, float]:
    """other relative to base: sizes as other/base, speeds as the speed-up of other, with the
    range of the paired repeats' speed-ups as `*_low` and `*_high`."""
    a, b = base.summary(), other.summary()
    out = {"params": b["params"] / a["params"], "bytes": b["bytes"] / a["bytes"],
           "linear_flops_per_token": b["linear_flops_per_token"] / a["linear_flops_per_token"]}
    if "prefill_s_median" in a:
        out["prefill_speedup"] = a["prefill_s_median"] / b["prefill_s_median"]
        spread = paired_range(base.prefill_s, other.prefill_s)
        if spread:
            out["prefill_speedup_low"], out["prefill_speedup_high"] = spread
    if "decode_tokens_per_s_median" in a:
        out["decode_speedup"] = b["decode_tokens_per_s_median"] / a["decode_tokens_per_s_median"]
        spread = paired_range(other.decode_tokens_per_s, base.decode_tokens_per_s)  # rates: faster is higher
        if spread:
            out["decode_speedup_low"], out["decode_speedup_high"] = spread
    if "peak_rss_mb" in a and "peak_rss_mb" in b:
        out["peak_rss"] = b["peak_rss_mb"] / a["peak_rss_mb"]
    return out
