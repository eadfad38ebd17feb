"""Dense and factored SmolLM2 in float32 and in bfloat16, timed interleaved in one run.

This CPU (AMD EPYC, AVX512-BF16) multiplies bfloat16 matrices 2-3x faster than float32 ones, so
a user may ask whether storing the factors in bfloat16 is the better speed-up. The four models:
dense and plain factors (uniform SVD at `--keep`, then `speed_up_`'s layout and dense-fallback
choice made in the model's own dtype), each in float32 and cast to bfloat16. Prints the medians
and the ratios that matter: factored against dense within a dtype (the compression's own
speed-up), and each model against the float32 dense one.

    python benchmarks/archive/bf16_inference.py --repeats 5 --out benchmarks/results/bf16-inference-s16.json
"""

from __future__ import annotations

import argparse
import copy
import statistics

import torch
import sys as _sys
from pathlib import Path as _Path

_sys.path.insert(0, str(_Path(__file__).resolve().parents[1]))  # benchmarks/common.py
from common import emit_json

import rankcut
from rankcut.speed.layouts import speed_up_
from rankcut.speed.timing import random_ids, time_decode, time_prefill


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--keep", type=float, default=0.5)
    parser.add_argument("--prefill", type=int, default=512)
    parser.add_argument("--decode", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dense = rankcut.load_model(args.model)
    plain = rankcut.load_model(args.model)
    rankcut.compress_(plain, rankcut.SVD(keep=args.keep), progress=False)
    plain16 = copy.deepcopy(plain).to(torch.bfloat16)
    choices = {"plain-fp32": speed_up_(plain), "plain-bf16": speed_up_(plain16)}
    models = {"dense-fp32": dense, "dense-bf16": copy.deepcopy(dense).to(torch.bfloat16),
              "plain-fp32": plain, "plain-bf16": plain16}
    ids = random_ids(dense, 1, args.prefill)
    prompt = ids[:, :32]
    with torch.no_grad():
        ref = dense(input_ids=ids[:, :128]).logits.float()
        errors = {n: float((m(input_ids=ids[:, :128]).logits.float() - ref).abs().max() / ref.abs().max())
                  for n, m in models.items()}
    for m in models.values():  # warm-up
        time_prefill(m, ids)
        time_decode(m, prompt, 4)
    prefill: dict[str, list[float]] = {n: [] for n in models}
    decode: dict[str, list[float]] = {n: [] for n in models}
    for _ in range(args.repeats):
        for n, m in models.items():
            prefill[n].append(time_prefill(m, ids))
            decode[n].append(time_decode(m, prompt, args.decode))
    pre = {n: statistics.median(v) for n, v in prefill.items()}
    dec = {n: statistics.median(v) for n, v in decode.items()}
    result = {
        "model": args.model, "keep": args.keep, "threads": args.threads, "repeats": args.repeats,
        "prefill_tokens": args.prefill, "decode_tokens": args.decode,
        "params": {n: rankcut.count_params(m) for n, m in models.items()},
        "bytes": {n: rankcut.count_bytes(m) for n, m in models.items()},
        "prefill_s": pre, "decode_tok_s": dec,
        "factored_over_dense_same_dtype": {
            dt: {"prefill": pre[f"dense-{dt}"] / pre[f"plain-{dt}"], "decode": dec[f"plain-{dt}"] / dec[f"dense-{dt}"]}
            for dt in ("fp32", "bf16")},
        "over_dense_fp32": {n: {"prefill": pre["dense-fp32"] / pre[n], "decode": dec[n] / dec["dense-fp32"]}
                            for n in models if n != "dense-fp32"},
        "max_rel_logit_err_vs_dense_fp32": errors,
        "speed_up": {n: {"column_major": len(r.column_major), "dense_fallback": len(r.dense_fallback)}
                     for n, r in choices.items()},
    }
    emit_json(result, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
