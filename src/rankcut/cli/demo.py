"""`rankcut demo`: the main job end to end on the embedded default, with nothing downloaded.

Load SmolLM2-135M from its wheel, measure perplexity on real news text, and compress it twice
with the best training-free method (curvature whitening, KFAC, under a global parameter budget,
two passes: ranks first, then each block calibrated on the blocks already cut; calibrated on the
gensim Wikipedia extract), once for each side of the choice a user has to make:

- accurate: factors stored pivoted, so the budget buys higher ranks (the lowest perplexity
  measured at a given size), at two index writes per module, which on a CPU keep the model
  about as slow as the dense one;
- fast: plain factors, and any module whose factors time slower than its dense weight put back
  dense (`speed_up_`); a higher perplexity at the same budget, a little more size where modules
  went back.

Both store each factor in the memory order its matmul streams fastest on this machine, and
both are saved, reloaded from disk and checked to be the models that were saved; perplexity,
size, prefill and decode speed of all three are measured in one interleaved run. Every figure
printed comes from this run: a demo that showed only one form would hide half of the trade-off.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..calibration.sources import Calibration
from ..compress.apply import CompressionReport
from ..compress.pipeline import oneshot
from ..core.fsutil import atomic_dir, check_output
from ..core.modules import count_bytes, count_params
from ..data.embedded import embedded_text
from ..evaluate.perplexity import perplexity, tokenize_text
from ..io.models import load_model
from ..io.saved import load, save
from ..methods.base import MethodConfig, config_class
from ..speed.bench import BenchResult, benchmark, ratios
from ..speed.layouts import Speed

DEMO_TOKENS = 2048
DEMO_SEQLEN = 512
DEMO_DECODE = 32  # new tokens per decode timing
DEMO_REPEATS = 6  # prefill timings per model; decode gets half as many (`benchmark`)
VARIANTS = ("accurate", "fast")


@dataclass
class Variant:
    """One compressed form of the model, as built, saved and reloaded in this run."""

    name: str
    config: MethodConfig
    report: CompressionReport
    compress_s: float
    model: nn.Module  # the reloaded one, once saved
    dense_fallback: list[str] = field(default_factory=list)
    column_major: int = 0
    reload_max_abs_diff: float = 0.0
    perplexity: float = float("nan")

    def ranks(self) -> list[int]:
        return [r["rank"] for n, r in self.report.modules.items()
                if r["rank"] is not None and n not in self.dense_fallback]

    def left_dense(self) -> int:
        """Modules dense in the result: by the budget's choice, or put back for speed."""
        return len(self.report.modules) - len(self.ranks())

    def dense_by_budget(self) -> int:
        """Modules the rank policy left dense (a budget's allocation, or a rank past break-even)."""
        return sum(r["rank"] is None for r in self.report.modules.values())


def demo_config(method: str, keep: float, pivot: bool) -> MethodConfig:
    """Calibrated methods spread the budget over modules; the others cut every module alike."""
    cls = config_class(method)
    if cls.needs:
        return cls(budget=keep, pivot=pivot, calibration=Calibration(two_pass=True))
    return cls(keep=keep, pivot=pivot)


def _build(name: str, model_name: str, method: str, keep: float, progress: bool) -> Variant:
    """One form through the library's whole job, unsaved: both forms are saved together after.
    Both store each factor in the memory order its matmul streams fastest here (same values);
    only the fast form also trades size for speed, putting back dense what factors slow down."""
    config = demo_config(method, keep, pivot=name == "accurate")
    done = oneshot(model_name, config, speed=Speed(dense_fallback=name == "fast"), speed_limits_for_budget=False,
                   progress=progress)
    variant = Variant(name, config, done.report, 0.0, done.model)
    variant.dense_fallback, variant.column_major = done.speed.dense_fallback, len(done.speed.column_major)
    variant.compress_s = sum(t for stage, t in done.seconds.items() if stage != "load")
    return variant


@torch.no_grad()
def _save_and_reload(variants: list[Variant], out: Path, probe: torch.Tensor) -> None:
    """Both forms land in `out` together or not at all; each is replaced by its reloaded self."""
    with atomic_dir(out, replaceable=VARIANTS) as tmp:
        for v in variants:
            save(v.model, tmp / v.name)
    for v in variants:
        reloaded = load(out / v.name)
        v.reload_max_abs_diff = (v.model(input_ids=probe).logits
                                 - reloaded(input_ids=probe).logits).abs().max().item()
        v.model = reloaded


def _speed_words(ratio: float) -> str:
    return f"{ratio:.2f}× faster" if ratio >= 1 else f"{1 / ratio:.2f}× slower"


def _print_table(dense: dict[str, Any], variants: list[Variant], speed: dict[str, BenchResult]) -> None:
    base = speed["dense"].summary()
    labels = ["parameters", "bytes (MiB)", "perplexity (news)", f"prefill {DEMO_SEQLEN} tok (s)",
              "decode (tokens/s)"]
    columns = [[f"{base['params']:,}", f"{base['bytes'] / 2**20:.1f}", f"{dense['perplexity']:.2f}",
                f"{base['prefill_s_median']:.3f}", f"{base['decode_tokens_per_s_median']:.1f}"]]
    for v in variants:
        s, r = speed[v.name].summary(), ratios(speed["dense"], speed[v.name])
        columns.append([
            f"{s['params']:,} ({r['params']:.3f})",
            f"{s['bytes'] / 2**20:.1f} ({r['bytes']:.3f})",
            f"{v.perplexity:.2f} ({v.perplexity / dense['perplexity']:.2f}×)",
            f"{s['prefill_s_median']:.3f} ({_speed_words(r['prefill_speedup'])})",
            f"{s['decode_tokens_per_s_median']:.1f} ({_speed_words(r['decode_speedup'])})",
        ])
    names = ["dense", *(v.name for v in variants)]
    widths = [max(len(cell) for cell in [name, *column]) for name, column in zip(names, columns)]
    print(f"\n{'':<22}" + "  ".join(f"{n:>{w}}" for n, w in zip(names, widths)))
    for i, label in enumerate(labels):
        print(f"{label:<22}" + "  ".join(f"{column[i]:>{w}}" for column, w in zip(columns, widths)))


def _describe(v: Variant, keep: float) -> str:
    ranks = v.ranks()
    span = f"ranks {min(ranks)}–{max(ranks)}" if ranks else "no module factored"
    policy = "budget" if v.config.budget is not None else "keep"
    what = f"{v.name}: {v.config.method_name} {policy}={keep}, "
    form = "factors stored pivoted" if v.name == "accurate" else "plain factors"
    by = " by the budget" if policy == "budget" else ""
    what += f"{form} ({span}; {v.dense_by_budget()} of {len(v.report.modules)} left dense{by}); "
    what += f"{v.column_major} modules stored column-major"
    if v.name == "fast":
        what += f", {len(v.dense_fallback)} put back dense where their factors timed slower here"
    return f"{what}; compressed in {v.compress_s:.1f} s"


def run_demo(model_name: str = "smollm2-135m", out: str = "out/demo", keep: float = 0.8,
             method: str = "fisher", as_json: bool = False) -> dict[str, Any]:
    say = (lambda *a: None) if as_json else print
    check_output(out, replaceable=VARIANTS)  # before minutes of work, not after
    t0 = time.perf_counter()
    dense_model = load_model(model_name)
    load_s = time.perf_counter() - t0
    ids = tokenize_text(dense_model, embedded_text("gensim-news"))[:DEMO_TOKENS]
    say(f"loaded {model_name} in {load_s:.1f} s; scoring {ids.numel()} tokens of "
        f"gensim news text in {DEMO_SEQLEN}-token windows")
    dense_ppl = perplexity(dense_model, ids, seqlen=DEMO_SEQLEN, progress=False)
    dense = {"params": count_params(dense_model), "bytes": count_bytes(dense_model),
             "perplexity": dense_ppl.perplexity}

    variants = []
    for name in VARIANTS:
        say(f"compressing: {name}")
        variants.append(_build(name, model_name, method, keep, progress=not as_json))
    folder = Path(out)
    _save_and_reload(variants, folder, ids[None, :64])
    for v in variants:
        v.perplexity = perplexity(v.model, ids, seqlen=DEMO_SEQLEN, progress=False).perplexity
    speed = benchmark({"dense": dense_model, **{v.name: v.model for v in variants}}, seqlen=DEMO_SEQLEN,
                      decode=DEMO_DECODE, repeats=DEMO_REPEATS)

    result = {
        "model": model_name, "out": str(folder),
        "dense": {**dense, "text": "gensim-news", "tokens": dense_ppl.tokens, "seqlen": DEMO_SEQLEN,
                  **speed["dense"].summary()},
        "variants": {v.name: {
            "folder": str(folder / v.name), "config": v.config.to_dict(),
            "modules": len(v.report.modules), "left_dense": v.left_dense(),
            "dense_fallback": v.dense_fallback, "column_major_modules": v.column_major,
            "perplexity": v.perplexity, "compress_s": v.compress_s,
            "reload_max_abs_diff": v.reload_max_abs_diff,
            **speed[v.name].summary(), "vs_dense": ratios(speed["dense"], speed[v.name]),
        } for v in variants},
        "timing": {"load_s": load_s, "repeats": DEMO_REPEATS, "decode_new_tokens": DEMO_DECODE},
    }
    if as_json:
        print(json.dumps(result, indent=2))
        return result
    _print_table(dense, variants, speed)
    print()
    for v in variants:
        print(_describe(v, keep))
    diffs = ", ".join(f"{v.reload_max_abs_diff:.1e}" for v in variants)
    print(f"saved to {folder}/{{{','.join(VARIANTS)}}} and reloaded (max |Δlogit| {diffs}); "
          f"times are medians of {DEMO_REPEATS} (prefill) and {max(1, DEMO_REPEATS // 2)} (decode) interleaved runs")
    return result


def cmd_demo(args: argparse.Namespace) -> None:
    run_demo(model_name=args.model, out=args.out, keep=args.keep, method=args.method,
             as_json=args.json)
