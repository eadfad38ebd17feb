"""Two fast-path ideas measured on this CPU's kernels before anything is built on them.

1. int8 factors: torch's CPU weight-only int8 matmul (`torch._weight_int8pack_mm`, per-row
   scales) against the float32 matmul on the factor shapes of SmolLM2-135M at 50% kept, for
   one token (decode) and 512 tokens (prefill). Kept only if it is faster.
2. Rank alignment: the time of one factored pair (x·Aᵀ·Bᵀ) at ranks around the 50% rank of the
   MLP (209), to see whether ranks that are multiples of 8/16 run faster per FLOP.

    python benchmarks/archive/kernels.py --out benchmarks/results/kernels.json
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
import torch.nn.functional as F

from rankcut.speed.timing import median_time

SHAPES = [(144, 576), (576, 144), (209, 576), (1536, 209), (209, 1536), (576, 209)]  # (out, in) factors


def _loop(fn, n: int):
    def run() -> None:
        for _ in range(n):
            fn()
    return run


def int8_rows(repeats: int) -> list[dict]:
    rows = []
    for tokens in (1, 512):
        inner = 200 if tokens == 1 else 5
        for out_f, in_f in SHAPES:
            w = torch.randn(out_f, in_f)
            x = torch.randn(tokens, in_f)
            scale = w.abs().amax(dim=1) / 127
            q = torch.round(w / scale[:, None]).to(torch.int8)
            fp32 = median_time(_loop(lambda: F.linear(x, w), inner), repeats) / inner
            int8 = median_time(_loop(lambda: torch._weight_int8pack_mm(x, q, scale), inner), repeats) / inner
            ref = F.linear(x, w)
            err = float((torch._weight_int8pack_mm(x, q, scale) - ref).abs().max() / ref.abs().max())
            rows.append({"tokens": tokens, "shape": [out_f, in_f], "fp32_us": fp32 * 1e6, "int8_us": int8 * 1e6,
                         "int8_speedup": fp32 / int8, "int8_max_rel_err": err})
    return rows


def alignment_rows(repeats: int) -> list[dict]:
    rows = []
    x = torch.randn(512, 576)
    for rank in (192, 200, 207, 208, 209, 210, 216, 224):
        a, b = torch.randn(rank, 576), torch.randn(1536, rank)
        t = median_time(_loop(lambda: F.linear(F.linear(x, a), b), 5), repeats) / 5
        flops = 2 * 512 * rank * (576 + 1536)
        rows.append({"rank": rank, "us": t * 1e6, "gflops": flops / t / 1e9})
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    doc = {"threads": torch.get_num_threads(), "torch": torch.__version__,
           "int8": int8_rows(args.repeats), "alignment": alignment_rows(args.repeats)}
    for r in doc["int8"]:
        print(f"int8  tokens {r['tokens']:>3} {r['shape'][0]:>5}×{r['shape'][1]:<5} fp32 {r['fp32_us']:9.1f} µs  "
              f"int8 {r['int8_us']:9.1f} µs  speed-up {r['int8_speedup']:.2f}×")
    for r in doc["alignment"]:
        print(f"rank {r['rank']:>4}: 512×576 → {r['rank']} → 1536 in {r['us']:8.0f} µs ({r['gflops']:.0f} GFLOP/s)")
    if args.out:
        from rankcut.core.fsutil import atomic_write_text

        atomic_write_text(args.out, json.dumps(doc, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
