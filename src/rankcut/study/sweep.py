"""Run many configurations cheaply, resumably, and in parallel.

Cheap: every target is factorized once at full rank and the factors are cached on disk, keyed
by model, method and calibration; a configuration then costs a truncation (a slice of the
cached factors) plus its evaluation. The dense model is modified in place and restored after
each configuration, so no copy of it is ever made. Tucker-2 of a matrix at rank (r, r)
converges to the truncated SVD (HOOI from an SVD start; tested), so tucker configurations
slice the same cached factors. Calibrated methods use the dense model's activations here (no
sequential pass), since a cache is shared by every configuration.

Resumable: each result is one JSONL line, appended under an exclusive file lock; a rerun skips
the configurations already in the file, and a half-written last line (a killed run) is cut off
before the next append. Two sweeps on one file don't corrupt it and don't write a row twice.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

from ..calibration.hooks import find_blocks
from ..compress.factor_cache import FactorCache
from ..core.errors import RankcutError
from ..core.fsutil import check_output_file, failed_write
from ..core.model_facts import get_tokenizer, leading_special_ids, prefixed_windows
from ..core.modules import count_params, swap_module
from ..core.ranks import allocate_targets, budget_cap
from ..data.embedded import embedded_text
from ..evaluate.perplexity import tokenize_text
from ..evaluate.tasks import run_task
from ..io.models import load_model
from .space import Configuration, ModelShape, module_rank


@contextmanager
def applied(model: nn.Module, shape: ModelShape, config: Configuration, cache: FactorCache) -> Iterator[None]:
    """The model with `config` swapped in; the dense modules come back afterwards."""
    ranks = {}
    for t in shape.selected(config):
        r = module_rank(t, config.rank)
        ranks[t.name] = min(r) if isinstance(r, tuple) else r
    with applied_ranks(model, ranks, cache):
        yield


@contextmanager
def applied_ranks(model: nn.Module, ranks: dict[str, int], cache: FactorCache) -> Iterator[None]:
    """The model with the named modules cut to the given ranks from the cache, then restored."""
    originals = {name: model.get_submodule(name) for name in ranks}
    try:
        for name, rank in ranks.items():
            bias = getattr(originals[name], "bias", None)
            swap_module(model, name, cache.layer(name, rank, None if bias is None else bias.detach()))
        yield
    finally:
        for name, module in originals.items():
            swap_module(model, name, module)


# --------------------------------------------------------------------------- baselines


class SkippedBlock(nn.Module):
    """A removed block: its input passes straight through (layer dropping)."""

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return args[0] if args else kwargs["hidden_states"]


@contextmanager
def dropped(model: nn.Module, layers: Iterable[int]) -> Iterator[None]:
    found = find_blocks(model)
    if found is None:
        raise RankcutError("this model has no repeated blocks to drop")
    blocks = found[1]
    originals = {i: blocks[i] for i in layers}
    try:
        for i in originals:
            blocks[i] = SkippedBlock()
        yield
    finally:
        for i, block in originals.items():
            blocks[i] = block


def block_params(model: nn.Module) -> list[int]:
    found = find_blocks(model)
    return [sum(p.numel() for p in b.parameters()) for b in found[1]] if found else []


def budget_ranks(cache: FactorCache, shape: ModelShape, params: int) -> dict[str, int] | None:
    """Ranks of the budgeted allocation (by the cache's direction worths) whose model has
    `params` parameters; None if the cache has no worths or the size is out of reach. Modules
    the allocation gives their break-even rank are left out: they stay dense, as in compress_."""

    if not cache.importance:
        return None
    targets = [t for t in shape.targets if t.name in cache.importance]
    dense_targets = sum(t.params for t in targets)
    budget = dense_targets - (shape.total_params - params)
    if budget <= sum(t.out_features + t.in_features for t in targets):
        return None
    ranks = allocate_targets(targets, cache.importance, budget)
    return {t.name: ranks[t.name] for t in targets if ranks[t.name] < budget_cap(t.out_features, t.in_features)}


def run_baselines(ctx: SweepContext, sizes: Iterable[int], results: ResultsFile, budget_method: str | None,
                  progress: bool = True) -> int:
    """At each size: drop the least proxy-sensitive whole layers, and allocate a global budget."""
    existing = {r["key"]: r for r in results.rows() if "key" in r}
    done = set(existing)
    written = 0
    sizes_per_block = block_params(ctx.model)
    single: dict[int, float] = {}
    for i in tqdm(range(len(sizes_per_block)), desc="layer sensitivity", disable=not progress):
        key = f"baseline|drop|L{i}"
        row = existing.get(key)
        if row is None:
            with dropped(ctx.model, [i]):
                metrics = ctx.proxy(ctx.model)
            row = {"key": key, "kind": "baseline", "baseline": "drop-layers", "layers": [i],
                   "params": ctx.shape.total_params - sizes_per_block[i], "proxy": metrics}
            written += results.append(row)
        single[i] = row["proxy"]["kl"]
    order = sorted(single, key=single.get)
    for size in sorted(set(sizes)):
        chosen, params = [], ctx.shape.total_params
        for i in order:
            if params <= size:
                break
            chosen.append(i)
            params -= sizes_per_block[i]
        key = f"baseline|drop|L{','.join(map(str, sorted(chosen)))}"
        if len(chosen) > 1 and key not in done:
            with dropped(ctx.model, chosen):
                metrics = ctx.proxy(ctx.model)
            written += results.append({"key": key, "kind": "baseline", "baseline": "drop-layers",
                                       "layers": sorted(chosen), "params": params, "target_params": size,
                                       "proxy": metrics})
        if budget_method is None:
            continue
        key = f"baseline|budget-{budget_method}|{size}"
        ranks = budget_ranks(ctx.caches[budget_method], ctx.shape, size) if key not in done else None
        if ranks is not None:
            with applied_ranks(ctx.model, ranks, ctx.caches[budget_method]):
                metrics = ctx.proxy(ctx.model)
                params = count_params(ctx.model)
            written += results.append({"key": key, "kind": "baseline", "baseline": f"budget-{budget_method}",
                                       "method": budget_method, "ranks": ranks, "params": params,
                                       "target_params": size, "proxy": metrics})
    return written


# --------------------------------------------------------------------------- proxy


class Proxy:
    """A fast stand-in for the benchmarks: KL(dense ‖ compressed) of the next-token distribution
    and perplexity, on a few thousand tokens of held-out text."""

    def __init__(self, model: nn.Module, ids: torch.Tensor) -> None:
        self.ids = ids.to(next(model.parameters()).device)
        with torch.no_grad():
            # float32 (tokens × vocab): 200 MB for 1,024 tokens of a 49k vocabulary
            self.reference = torch.log_softmax(model(input_ids=ids).logits.float(), -1)

    @torch.no_grad()
    def __call__(self, model: nn.Module) -> dict[str, float]:
        logp = torch.log_softmax(model(input_ids=self.ids).logits.float(), -1)
        ref = self.reference
        kl = (ref.exp() * (ref - logp)).sum(-1).mean().item()
        nll = -logp[:, :-1].gather(-1, self.ids[:, 1:, None]).mean().item()
        return {"kl": kl, "perplexity": math.exp(nll)}


# --------------------------------------------------------------------------- results file


class ResultsFile:
    """An append-only JSONL file, safe against kills and concurrent writers."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        check_output_file(self.path)
        with failed_write(self.path):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.touch(exist_ok=True)

    @contextmanager
    def _locked(self) -> Iterator[Any]:
        with open(self.path, "r+b") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield fh
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    @staticmethod
    def _complete_lines(data: bytes) -> list[bytes]:
        lines = data.split(b"\n")
        return [line for line in lines[:-1] if line.strip()]  # the last piece lacks its newline

    def rows(self) -> list[dict[str, Any]]:
        rows = []
        for number, line in enumerate(self._complete_lines(self.path.read_bytes()), start=1):
            try:
                row = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise RankcutError(f"{self.path}: result {number} is not a JSON row ({exc}); delete or repair "
                                   "that line (a rerun recomputes what is missing)") from None
            if not isinstance(row, dict):
                raise RankcutError(f"{self.path}: result {number} is not a JSON object; delete or repair that line")
            rows.append(row)
        return rows

    def keys(self) -> set[str]:
        return {r["key"] for r in self.rows() if "key" in r}

    def append(self, row: dict[str, Any]) -> bool:
        """Write `row` unless its key is there already; False if it was a duplicate."""
        with self._locked() as fh:
            data = fh.read()
            if data and not data.endswith(b"\n"):  # a killed writer left half a line: cut it
                fh.truncate(data.rfind(b"\n") + 1)
                data = data[: data.rfind(b"\n") + 1]
            if row.get("key") in {json.loads(line).get("key") for line in self._complete_lines(data)}:
                return False
            fh.seek(0, os.SEEK_END)
            fh.write((json.dumps(row) + "\n").encode())
            fh.flush()
            os.fsync(fh.fileno())
        return True


# --------------------------------------------------------------------------- runner


@dataclass
class SweepContext:
    model: nn.Module
    model_name: str
    shape: ModelShape
    proxy: Proxy
    caches: dict[str, FactorCache]


def evaluate_configuration(ctx: SweepContext, config: Configuration) -> dict[str, Any]:
    """One configuration: cut from the cached factors (timed apart: the sweep's per-configuration
    compression cost, against a from-scratch compression) and scored by the proxy."""
    t0 = time.perf_counter()
    with applied(ctx.model, ctx.shape, config, ctx.caches[config.method]):
        t1 = time.perf_counter()
        metrics = ctx.proxy(ctx.model)
    return {"key": config.key(), "kind": "config", "config": config.to_dict(),
            "params": ctx.shape.size(config), "dense_params": ctx.shape.total_params,
            "proxy": metrics, "apply_s": t1 - t0, "seconds": time.perf_counter() - t0}


def run_local(ctx: SweepContext, configs: Iterable[Configuration], results: ResultsFile,
              progress: bool = True, after_each: Callable[[dict], None] | None = None) -> int:
    """Evaluate every configuration not yet in `results`; returns how many rows were written."""
    done = results.keys()
    todo = [c for c in configs if c.key() not in done]
    written = 0
    for config in tqdm(todo, desc="sweep", disable=not progress, unit="config"):
        row = evaluate_configuration(ctx, config)
        if results.append(row):
            written += 1
            if after_each is not None:
                after_each(row)
    return written


def build_context(model: nn.Module, model_name: str, methods: Iterable[str], proxy_ids: torch.Tensor,
                  calibration: Any = None, cache_dir: Path | None = None, progress: bool = True) -> SweepContext:
    shape = ModelShape.of(model)
    proxy = Proxy(model, proxy_ids)
    caches: dict[str, FactorCache] = {}
    for m in methods:
        caches[m] = FactorCache(model, model_name, m, cache_dir, calibration, progress)
    if count_params(model) != shape.total_params:
        raise RankcutError("internal: the model was not restored after factoring")
    return SweepContext(model, model_name, shape, proxy, caches)


def pareto_front(rows: list[dict[str, Any]], cost: str | Callable[[dict], float] = "params",
                 loss: Callable[[dict], float] | None = None) -> list[dict[str, Any]]:
    """Rows not dominated by another row that is no larger and no worse (and better in one).
    `cost` is a row's key or a function of the row."""
    loss = loss or (lambda r: r["proxy"]["kl"])
    size = cost if callable(cost) else (lambda r: r[cost])
    ordered = sorted(rows, key=lambda r: (size(r), loss(r)))
    front, best = [], math.inf
    for r in ordered:
        if loss(r) < best:
            front.append(r)
            best = loss(r)
    return front


def _applied_row(ctx: SweepContext, row: dict[str, Any]) -> contextlib.AbstractContextManager:
    """The model as a results row describes it: a configuration, dropped layers or budget ranks."""
    if row.get("kind") == "config":
        config = Configuration.from_dict(row["config"])
        return applied(ctx.model, ctx.shape, config, ctx.caches[config.method])
    if row.get("baseline") == "drop-layers":
        return dropped(ctx.model, row["layers"])
    if "ranks" in row and row.get("method") in ctx.caches:
        return applied_ranks(ctx.model, row["ranks"], ctx.caches[row["method"]])
    raise RankcutError(f"cannot rebuild the model of results row {row['key']!r}")


def run_front(ctx: SweepContext, rows: list[dict[str, Any]], tasks: list[str], results: ResultsFile,
              limit: int | None, data_dir: Any = None, progress: bool = True,
              baselines: list[dict[str, Any]] | None = None, timing_repeats: int = 5) -> int:
    """Full benchmarks for the proxy's Pareto front, the dense model, and the baselines built
    at the front's sizes (so each front point has its like-for-like comparison), skipping rows done;
    then each benchmarked model's prefill timed against dense (`run_front_timing`)."""

    def score() -> dict[str, Any]:
        return {t: run_task(ctx.model, t, data_dir=data_dir, limit=limit, progress=False).metrics for t in tasks}

    done = results.keys()
    written = 0
    if "front|dense" not in done:
        written += results.append({"key": "front|dense", "kind": "front", "config": None,
                                   "params": ctx.shape.total_params, "tasks": score(), "limit": limit})
    front = pareto_front(rows)
    sizes = {r["params"] for r in front}
    todo = front + [b for b in baselines or [] if b.get("target_params") in sizes]
    for row in tqdm([r for r in todo if f"front|{r['key']}" not in done],
                    desc="front", disable=not progress, unit="model"):
        with _applied_row(ctx, row):
            metrics = score()
        written += results.append({"key": f"front|{row['key']}", "kind": "front", "config": row.get("config"),
                                   "baseline": row.get("baseline"), "params": row["params"],
                                   "proxy": row["proxy"], "tasks": metrics, "limit": limit})
    return written + run_front_timing(ctx, todo, results, timing_repeats, progress)


def run_front_timing(ctx: SweepContext, rows: list[dict[str, Any]], results: ResultsFile, repeats: int = 5,
                     progress: bool = True) -> int:
    """A `timing|KEY` row for each benchmarked model that has none: its prefill of one proxy window
    against the dense model's, one forward of each in turn, so load on the machine falls on both
    alike. Apart from the scores, so a sweep benchmarked before this gets its timings on a rerun."""
    done = results.keys()
    written = 0
    for row in tqdm([r for r in rows if f"timing|{r['key']}" not in done],
                    desc="front timing", disable=not progress, unit="model"):
        compressed_ms, dense_ms = paired_prefill_ms(ctx, row, repeats)
        written += results.append({"key": f"timing|{row['key']}", "kind": "timing", "front_key": f"front|{row['key']}",
                                   "params": row["params"], "prefill_ms": compressed_ms,
                                   "dense_prefill_ms": dense_ms, "prefill_speedup": dense_ms / compressed_ms,
                                   "repeats": repeats, "window": int(ctx.proxy.ids.shape[1])})
    return written


@torch.no_grad()
def paired_prefill_ms(ctx: SweepContext, row: dict[str, Any], repeats: int = 5) -> tuple[float, float]:
    """Median milliseconds of one forward over a proxy window, every position's logits included:
    (the row's model, dense), taken alternately after a round that warms both. The swap between them (~0.01 s from the factor
    cache) stays outside the clock. `rankcut bench --vs` gives the careful figures for a saved model."""
    import statistics
    import time

    ids = ctx.proxy.ids[:1]

    def once() -> float:
        t0 = time.perf_counter()
        ctx.model(input_ids=ids)
        return time.perf_counter() - t0

    compressed, dense = [], []
    for i in range(repeats + 1):
        with _applied_row(ctx, row):
            c = once()
        d = once()
        if i:
            compressed.append(c)
            dense.append(d)
    return 1000 * statistics.median(compressed), 1000 * statistics.median(dense)


@dataclass
class SweepSpec:
    """Everything a worker needs to rebuild a sweep context on its own machine."""

    model: str
    methods: list[str]
    proxy_tokens: int
    cache_dir: str | None = None


def proxy_ids(model: nn.Module, tokens: int, window: int = 256) -> torch.Tensor:
    """Held-out proxy text: the gensim news articles (calibration uses the Wikipedia extract)."""

    if tokens < 2:
        raise RankcutError(f"--proxy-tokens {tokens}: give 2 or more (the proxy's perplexity needs a pair)")
    ids = tokenize_text(model, embedded_text("gensim-news"))
    window = min(window, tokens)
    n = tokens // window
    windows = prefixed_windows(ids, window, leading_special_ids(get_tokenizer(model)))
    if windows.shape[0] < n or n == 0:
        raise RankcutError(f"the proxy text has {ids.numel()} tokens; ask for fewer --proxy-tokens")
    return windows[:n]


def context_from_spec(spec: SweepSpec, progress: bool = False) -> SweepContext:
    model = load_model(spec.model)
    return build_context(model, spec.model, spec.methods, proxy_ids(model, spec.proxy_tokens),
                         cache_dir=Path(spec.cache_dir) if spec.cache_dir else None, progress=progress)


def run_ray(spec: SweepSpec, configs: list[Configuration], results: ResultsFile, address: str | None = None,
            workers: int = 2, progress: bool = True) -> int:
    """Spread configurations over Ray workers (a local Ray, or the cluster at `address`).

    Each worker builds its own context (the factor cache is read from disk, so build it once
    first, e.g. with the local executor on one configuration); the driver alone writes rows.
    """
    try:
        import ray
    except ImportError:
        raise RankcutError("--executor ray needs Ray: pip install 'rankcut[ray]'") from None
    if not ray.is_initialized():
        if address:
            ray.init(address=address, log_to_driver=False)
        else:  # a private local instance sized to the asked workers, no dashboard to serve
            ray.init(num_cpus=max(1, workers), include_dashboard=False, log_to_driver=False)

    @ray.remote
    class Worker:
        def __init__(self, spec: SweepSpec) -> None:
            torch.set_num_threads(1)
            self.ctx = context_from_spec(spec)

        def run(self, config: dict[str, Any]) -> dict[str, Any]:
            return evaluate_configuration(self.ctx, Configuration.from_dict(config))

    done = results.keys()
    todo = [c for c in configs if c.key() not in done]
    if not todo:
        return 0
    pool = ray.util.ActorPool([Worker.remote(spec) for _ in range(max(1, workers))])
    written = 0
    for row in tqdm(pool.map_unordered(lambda a, c: a.run.remote(c.to_dict()), todo), total=len(todo),
                    desc="sweep (ray)", disable=not progress, unit="config"):
        written += results.append(row)
    return written
