"""A budget made fast two ways, side by side: dense fallback after the allocation, or speed limits before it.

`speed_up_`'s dense fallback puts back dense every factored module that times slower than the
dense matrix; after a budget's allocation that adds parameters, so the model ends over its
budget. With speed limits (`rankcut.speed_limits`, `compress --budget F --speed`) the allocation
itself chooses, per module, a rank up to the highest one that runs faster here, or dense: the
budget holds. This script builds, from one method and budget,

  budget    the allocation alone (layouts chosen, no module put back)
  fallback  the same model after the dense fallback (what `--budget --speed` did before)
  limits    the allocation under speed limits (what `--budget --speed` does now)

saves and reloads each, scores each on wikitext2, and times dense and all three interleaved in
one process (prefill and decode medians; ratios are dense time / model time).

    python benchmarks/speed/budget_speed.py --budget 0.8 [--pivot] --work /tmp/bs --out benchmarks/results/budget-speed-0.8.json
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
import sys as _sys
from pathlib import Path as _Path

_sys.path.insert(0, str(_Path(__file__).resolve().parents[1]))  # benchmarks/common.py
from common import emit_json

import rankcut
from rankcut.calibration.sources import Calibration
from rankcut.evaluate.tasks import run_task
from rankcut.methods import config_class
from rankcut.speed.bench import benchmark, ratios
from rankcut.speed.layouts import Speed, speed_up_
from rankcut.speed.limits import speed_limits


def targeted_share(model: torch.nn.Module) -> float:
    """Parameters the targets keep, over their dense parameters (the budget's own measure)."""
    records = rankcut.record_of(model).modules.values()
    return sum(r["params"] for r in records) / sum(r["dense_params"] for r in records)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--method", default="fisher")
    parser.add_argument("--budget", type=float, default=0.8)
    parser.add_argument("--one-pass", action="store_true", help="allocate from dense activations only")
    parser.add_argument("--pivot", action="store_true", help="store the factors pivoted (limits timed pivoted)")
    parser.add_argument("--eval-limit", type=int, default=16384, help="wikitext2 tokens (1024-token windows)")
    parser.add_argument("--decode", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work", type=Path, required=True, help="folder for the three saved models")
    parser.add_argument("--out", help="JSON file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cls = config_class(args.method)
    kwargs = {"budget": args.budget, "pivot": args.pivot}
    if cls.needs:
        kwargs["calibration"] = Calibration(two_pass=not args.one_pass, staged=not args.one_pass)
    config = cls(**kwargs)
    doc: dict = {"settings": {k: str(v) for k, v in vars(args).items()}, "config": config.to_dict(), "models": {}}

    t = time.perf_counter()
    model = rankcut.load_model(args.model)
    rankcut.compress_(model, config, progress=True)
    doc["models"]["budget"] = {"compress_s": time.perf_counter() - t}
    rankcut.save(model, args.work / "budget", overwrite=True)
    t = time.perf_counter()
    fallback = speed_up_(model).dense_fallback
    doc["models"]["fallback"] = {"speed_s": time.perf_counter() - t, "dense_fallback": len(fallback)}
    rankcut.save(model, args.work / "fallback", overwrite=True)
    del model

    t = time.perf_counter()
    model = rankcut.load_model(args.model)
    limits = speed_limits(model, pivot=args.pivot, progress=True)
    doc["limits"] = limits
    doc["models"]["limits"] = {"limits_s": time.perf_counter() - t}
    rankcut.compress_(model, replace(config, speed_limits=limits), progress=True)
    doc["models"]["limits"]["compress_s"] = time.perf_counter() - t
    speed_up_(model, Speed(dense_fallback=False))
    rankcut.save(model, args.work / "limits", overwrite=True)
    del model

    models = {"dense": rankcut.load_model(args.model).eval()}
    for name in ("budget", "fallback", "limits"):
        m = rankcut.load(args.work / name).eval()
        speed_up_(m, Speed(dense_fallback=False))  # the layouts, chosen again in this process
        records = rankcut.record_of(m).modules.values()
        doc["models"][name] |= {"targeted_share": targeted_share(m), "params": rankcut.count_params(m),
                                "dense_modules": sum(r["rank"] is None for r in records)}
        models[name] = m
    for name, m in models.items():
        result = run_task(m, "wikitext2", limit=args.eval_limit, seqlen=1024, progress=False)
        doc["models"].setdefault(name, {})["wikitext2"] = result.metrics["perplexity"]
        print(f"{name}: wikitext2 {result.metrics['perplexity']:.2f}", file=sys.stderr)
    results = benchmark(models, seqlen=512, decode=args.decode, repeats=args.repeats)
    doc["timings"] = {n: r.summary() for n, r in results.items()}
    doc["ratios"] = {n: ratios(results["dense"], results[n]) for n in models if n != "dense"}
    for name in ("budget", "fallback", "limits"):
        m, r = doc["models"][name], doc["ratios"][name]
        print(f"{name:>9}: keeps {m['targeted_share']:.1%} of the targets ({m['dense_modules']} dense), "
              f"wikitext2 {m['wikitext2']:.2f} (dense {doc['models']['dense']['wikitext2']:.2f}), "
              f"prefill {r['prefill_speedup']:.2f}× ({r.get('prefill_speedup_low', 0):.2f}–"
              f"{r.get('prefill_speedup_high', 0):.2f}), decode {r['decode_speedup']:.2f}×")
    emit_json(doc, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
