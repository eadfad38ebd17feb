"""Dense against several saved compressed models, timed interleaved in one process.

`rankcut bench --vs` compares two models; comparing forms of the same budget (healed plain
factors against healed pivoted ones, say) needs them in one run, since this machine's speed
drifts within the hour. Each saved model gets `speed_up_`'s layout choice (each factor in the
memory order its matmul runs fastest in here) without the dense fallback, so its size is the
one saved. Ratios are dense time / model time (> 1 is faster).

    python benchmarks/speed/speed_saved.py OUT_PLAIN OUT_PIVOT --out bench.json
    python benchmarks/speed/speed_saved.py OUT_PIVOT --row-major-too   # what the layout choice buys
    python benchmarks/speed/speed_saved.py OUT_PIVOT --pivot-outputs-too   # what laying out tokens buys
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

import rankcut
from rankcut.core.fsutil import atomic_write_text
from rankcut.core.layers import PivotLowRankLinear
from rankcut.core.layout import set_row_major_, set_tokens_as_columns_
from rankcut.core.modules import compressed_modules
from rankcut.io.models import load_model
from rankcut.speed.bench import benchmark, ratios
from rankcut.speed.layouts import Speed, pivot_output_candidates, speed_up_


def row_major(model: torch.nn.Module) -> torch.nn.Module:
    """The same model with every factor stored row-major, as PyTorch stores a linear weight."""
    for layer in compressed_modules(model).values():
        for factor in ("in_factor", "out_factor"):
            if getattr(layer, factor, None) is not None:
                set_row_major_(layer, factor)
    return model


def with_pivot_outputs(folder: Path) -> dict[str, torch.nn.Module]:
    """The saved model once per pivot-output candidate (rankcut.speed.layouts.PIVOT_OUTPUTS) held fixed,
    each then given its layout choice: "columns" is how every pivoted layer ran before
    session 18 (one token aside), "rows" is nn.Linear's contiguous output everywhere."""
    probe = rankcut.load(folder)
    pivots = {n: m for n, m in compressed_modules(probe).items() if isinstance(m, PivotLowRankLinear)}
    out: dict[str, torch.nn.Module] = {}
    if not pivots:
        return out
    for candidate, names in pivot_output_candidates(pivots).items():
        model = rankcut.load(folder).eval()
        set_tokens_as_columns_(model, names)
        speed_up_(model, Speed(dense_fallback=False, pivot_outputs=False))
        out[f"{folder} {candidate}"] = model
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", type=Path, help="folders saved by rankcut")
    parser.add_argument("--dense", help="the dense model (default: the first model's recorded source)")
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--decode", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--row-major-too", action="store_true",
                        help="also time each model with every factor row-major (what the layout buys)")
    parser.add_argument("--pivot-outputs-too", action="store_true",
                        help="also time each pivoted model under every tokens-as-rows/columns candidate, "
                             "each held fixed")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    compressed = {}
    for folder in args.models:
        model = rankcut.load(folder).eval()
        report = speed_up_(model, Speed(dense_fallback=False))
        print(f"{folder}: {len(report.column_major)} modules column-major; pivot outputs: {report.pivot_outputs} "
              f"(whole forwards, s: {report.pivot_output_timings})", file=sys.stderr)
        compressed[str(folder)] = model
        if args.pivot_outputs_too:
            compressed.update(with_pivot_outputs(folder))
        if args.row_major_too:
            compressed[f"{folder} row-major"] = row_major(rankcut.load(folder).eval())
    source = args.dense or rankcut.record_of(next(iter(compressed.values()))).source
    if not source:
        parser.error("the first model records no source: give --dense MODEL")
    models = {"dense": load_model(source).eval(), **compressed}
    results = benchmark(models, seqlen=args.seqlen, decode=args.decode, repeats=args.repeats)
    out = {"settings": vars(args) | {"models": [str(m) for m in args.models], "out": str(args.out)},
           **{n: r.summary() for n, r in results.items()},
           "ratios": {n: ratios(results["dense"], results[n]) for n in compressed}}
    for name, r in out["ratios"].items():
        print(f"{name}: params {r['params']:.3f}×, prefill {r['prefill_speedup']:.2f}× faster, "
              f"decode {r.get('decode_speedup', float('nan')):.2f}× faster")
    if args.out:
        atomic_write_text(args.out, json.dumps(out, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
