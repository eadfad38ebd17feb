"""`rankcut bench`: time a model, or two side by side, and optionally split where the time goes."""

from __future__ import annotations

import argparse
from typing import Any

from ..core.errors import RankcutError
from ..core.machine import resolve_device
from ..core.modules import dtype_name
from ..io.models import load_model
from ..speed.bench import benchmark, ratios
from ..speed.timesplit import check_decode, compare_splits
from ..speed.timing import random_ids
from .common import _emit, _torch_dtype


def cmd_bench(args: argparse.Namespace) -> None:
    device = resolve_device(args.device)
    names = {"model": args.model}
    if args.vs:
        names["vs"] = args.vs
    if args.breakdown:
        if not args.vs:
            raise RankcutError("--breakdown compares two models: add --vs COMPRESSED_DIR")
        check_decode(args.decode)
    models = {key: load_model(n).to(device) for key, n in names.items()}
    if args.dtype:  # like for like: both models at one precision, whatever each was stored in
        models = {key: m.to(_torch_dtype(args.dtype)) for key, m in models.items()}
    precisions = {key: dtype_name(m) for key, m in models.items()}
    results = benchmark(models, seqlen=args.seqlen, batch=args.batch, decode=args.decode,
                        repeats=args.repeats, memory=args.memory, names_on_disk=names)
    payload: dict[str, Any] = {"device": args.device, "seqlen": args.seqlen, "batch": args.batch, "decode": args.decode,
                               "repeats": args.repeats, "threads": __import__("torch").get_num_threads(),
                               "models": {names[k]: {**r.summary(), "dtype": precisions[k]} for k, r in results.items()}}
    if args.vs:
        payload["ratios"] = ratios(results["model"], results["vs"])
    splits = []
    if args.breakdown:
        ids = random_ids(models["model"], args.batch, args.seqlen)
        splits = compare_splits(models["model"], models["vs"], ids, decode=args.decode, repeats=args.repeats)
        payload["breakdown"] = [s.summary() for s in splits]

    def human() -> None:
        cols = list(names)
        rows = [("parameters", "params", "{:,.0f}"), ("bytes (MiB)", "bytes", "{:.1f}"),
                ("linear GFLOP/token", "linear_flops_per_token", "{:.3f}"),
                (f"prefill {args.batch}×{args.seqlen} (s)", "prefill_s_median", "{:.3f}"),
                ("decode (tokens/s)", "decode_tokens_per_s_median", "{:.1f}"),
                ("peak RSS (MiB)", "peak_rss_mb", "{:.0f}")]
        print(f"{'':<26}" + "".join(f"{names[c][-28:]:>30}" for c in cols) + ("       ratio" if args.vs else ""))
        print(f"{'precision':<26}" + "".join(f"{precisions[c]:>30}" for c in cols))
        for label, key, fmt in rows:
            vals = [results[c].summary().get(key) for c in cols]
            if vals[0] is None:
                continue
            scale = {"bytes": 2**20, "linear_flops_per_token": 1e9}.get(key, 1)
            line = f"{label:<26}" + "".join(f"{fmt.format(v / scale):>30}" for v in vals)
            if args.vs:
                line += f"{vals[1] / vals[0]:>12.3f}"
            print(line)
        if args.vs:
            r = payload["ratios"]
            def speedup(what: str) -> str:
                text = f"{what} {r[what + '_speedup']:.2f}× faster"
                if what + "_speedup_low" in r:
                    text += f" (paired runs {r[what + '_speedup_low']:.2f}–{r[what + '_speedup_high']:.2f}×)"
                return text

            extra = [speedup("prefill")]
            if "decode_speedup" in r:
                extra.append(speedup("decode"))
            print(f"{args.vs} vs {args.model}: " + ", ".join(extra) +
                  f" (medians of {args.repeats} interleaved runs, {payload['threads']} threads)")
            if precisions["model"] != precisions["vs"]:
                print(f"note: {args.vs} runs in {precisions['vs']} and {args.model} in {precisions['model']}: "
                      "the ratio mixes the precision's speed with the cut's (--dtype DTYPE times both at one)")
        for s in splits:
            print(f"\nwhere the time goes, {s.workload} (timed by hooks on the {s.targets} targeted modules, "
                  "apart from the figures above):")
            print(f"{'':<26}{'dense':>12}{'compressed':>14}{'speed-up':>11}")
            rows = [("targeted linear maps", s.dense.targets_s, s.compressed.targets_s),
                    ("everything else", s.dense.rest_s, s.compressed.rest_s)]
            if s.dense.head_s > 0:
                rows.append(("  of which the head", s.dense.head_s, s.compressed.head_s))
            for label, d, c in rows + [("whole", s.dense.total_s, s.compressed.total_s)]:
                print(f"{label:<26}{d * 1e3:>10.1f}ms{c * 1e3:>12.1f}ms{d / c if c > 0 else float('nan'):>10.2f}×")
                if label == "targeted linear maps":
                    for kind, k in s.by_kind().items():
                        print(f"  {kind:<24}{k['dense_s'] * 1e3:>10.1f}ms{k['compressed_s'] * 1e3:>12.1f}ms"
                              f"{k['speedup']:>10.2f}×  at {k['param_ratio']:.2f}× the parameters: "
                              f"{k['efficiency']:.2f}× dense's speed per parameter")
            print(f"ceiling: {s.ceiling:.2f}× (the targets at {s.targets_param_ratio:.2f}× dense's parameters taking "
                  "that fraction of dense's time, everything else as dense); the factored maps ran at "
                  f"{s.targets_efficiency:.2f}× dense's speed per parameter")

    _emit(args, payload, human)
