"""What storing a model in a 16-bit format costs in accuracy and buys in bytes, dense and compressed.

`rankcut compress --dtype bfloat16` computes the factors in float64 and rounds them once. This
scores each given model cast to each precision, on wikitext2 (the
same windows as `rankcut heal --eval`: 1024 tokens), so the byte saving of the precision can be
set beside the saving of the low-rank cut, and against what each costs.

    python benchmarks/quality/dtype_cost.py smollm2-135m SAVED_DIR [...] --limit 16384 \
        --out benchmarks/results/dtype-cost.json
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
import sys as _sys
from pathlib import Path as _Path

_sys.path.insert(0, str(_Path(__file__).resolve().parents[1]))  # benchmarks/common.py
from common import emit_json

import rankcut
from rankcut.core.modules import dtype_name
from rankcut.evaluate.tasks import run_task


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("models", nargs="+", help="zoo aliases or saved rankcut folders")
    p.add_argument("--dtypes", default="float32,bfloat16,float16",
                   help="precisions to score each model at (a model stored in 16 bits is widened for float32)")
    p.add_argument("--limit", type=int, default=16384, help="wikitext2 tokens scored")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    rows = []
    for name in args.models:
        base = rankcut.load_model(name)
        stored = dtype_name(base)
        for dtype in args.dtypes.split(","):
            model = base if dtype == stored else copy.deepcopy(base).to(getattr(torch, dtype))
            start = time.perf_counter()
            score = run_task(model, "wikitext2", limit=args.limit, seqlen=1024, progress=False)
            rows.append({"model": name, "stored": stored, "dtype": dtype, "params": rankcut.count_params(model),
                         "bytes": rankcut.count_bytes(model), "wikitext2": score.metrics["perplexity"],
                         "nll": score.metrics.get("nll"), "tokens": score.n,
                         "seconds": round(time.perf_counter() - start, 1)})
            print(f"{name:40s} {dtype:9s} {rows[-1]['bytes'] / 2**20:8.1f} MiB  wikitext2 {rows[-1]['wikitext2']:.3f}",
                  flush=True)
            if model is not base:
                del model
    for r in rows:
        r["bytes_vs_first"] = round(r["bytes"] / rows[0]["bytes"], 4)
    emit_json({"limit": args.limit, "seqlen": 1024, "threads": torch.get_num_threads(), "rows": rows}, args.out)


if __name__ == "__main__":
    main()
