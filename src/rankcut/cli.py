"""The `rankcut` command. Every error a user can cause prints one line and exits with 2."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Callable

from .errors import RankcutError, require

DTYPES = ("float32", "bfloat16", "float16")  # the precisions compress stores and bench times in


def _torch_dtype(name: str) -> Any:
    import torch

    return getattr(torch, name)


def _emit(args: argparse.Namespace, payload: dict[str, Any], human: Callable[[], None]) -> None:
    if getattr(args, "json", False):
        print(json.dumps(payload, indent=2, default=str))
    else:
        human()


def _parse_rank(text: str | None) -> int | tuple[int, int] | None:
    if text is None:
        return None
    try:
        parts = [int(p) for p in text.split(",")]
    except ValueError:
        raise RankcutError(f"bad --rank '{text}': give an integer, or R1,R2 for a Tucker pair") from None
    if len(parts) == 1:
        return parts[0]
    if len(parts) == 2:
        return (parts[0], parts[1])
    raise RankcutError(f"bad --rank '{text}': give an integer, or R1,R2 for a Tucker pair")


def _check_out(out: str, overwrite: bool) -> None:
    from .fsutil import check_output

    check_output(out, overwrite)


def _temperature(args: argparse.Namespace) -> dict[str, float]:
    """--distill-temperature if given; else each command's own default (Heal's and SoftRank's differ)."""
    return {} if args.distill_temperature is None else {"distill_temperature": args.distill_temperature}


def _check_checkpoint(args: argparse.Namespace) -> None:
    """Before any evaluation or training: a fine-tune's --checkpoint/--resume must agree with the folder."""
    from .distill import checkpoint_folder

    if args.resume and not args.checkpoint:
        raise RankcutError("--resume needs --checkpoint FOLDER (where the interrupted run wrote)")
    checkpoint_folder(args.checkpoint, args.resume)


# --------------------------------------------------------------------------- info

def _speed_decisions(modules: dict[str, dict], speed: dict | None) -> dict:
    """What `compress --speed` (rankcut.fast.speed_up_) decided for this machine, from the manifest."""
    return {"timed": speed is not None,
            "column_major": sum(1 for r in modules.values() if r.get("column_major")),
            "dense_fallback": sum(1 for r in modules.values() if r.get("form") == "dense-fallback"),
            "tokens_as_columns": sum(1 for r in modules.values() if r.get("tokens_as_columns")),
            "pivot_outputs": ((speed or {}).get("pivot_outputs") or {}).get("chosen"),
            "machine": (speed or {}).get("machine")}


def _describe_speed(d: dict) -> str:
    if not d["timed"]:
        return "speed: no decisions recorded (`rankcut compress --speed` times the layouts and the dense fallback)"
    line = (f"speed: {d['column_major']} modules with factors stored column-major, "
            f"{d['dense_fallback']} put back dense where their factors timed slower")
    if d.get("limits"):
        line += f"; the budget allocated under speed limits ({_describe_limits(d['limits'])})"
    if d["pivot_outputs"] is not None:
        line += f"; pivoted layers: {d['pivot_outputs']} ({d['tokens_as_columns']} with tokens as columns)"
    if d.get("machine"):
        from .machine import describe_machine, differences

        where = d["machine"]
        line += f"\ntimed on {where.get('processor')} ({where.get('device')}, {where.get('threads')} threads)"
        changed = differences(where, describe_machine("cpu"))  # [] for a GPU's record: not comparable here
        if changed:
            line += f": not this machine ({'; '.join(changed)}); `compress --speed` here decides for this one"
    return line


_FAST_R_NOTE = ("fast r = the highest rank whose factors{form} ran faster than the dense matrix here "
               "(0: none did); `compress --budget F --speed` keeps each module under it or dense")


def _by_kind(rows: list[dict]) -> dict[str, dict]:
    """Each kind's ranks in a few numbers: a budget spreads them unevenly, 210 lines hide how."""
    import statistics

    out: dict[str, dict] = {}
    for kind in dict.fromkeys(r["kind"] for r in rows):
        mine = [r for r in rows if r["kind"] == kind]
        ranks = sorted(r["rank"] if isinstance(r["rank"], int) else max(r["rank"])
                       for r in mine if r["rank"] is not None and r["form"] != "dense-fallback")
        out[kind] = {"modules": len(mine), "dense": len(mine) - len(ranks),
                     "rank_min": ranks[0] if ranks else None,
                     "rank_median": int(statistics.median_low(ranks)) if ranks else None,
                     "rank_max": ranks[-1] if ranks else None,
                     "kept": sum(r["params"] for r in mine) / max(1, sum(r["dense_params"] for r in mine))}
    return out


def cmd_info(args: argparse.Namespace) -> None:
    from .compress import count_bytes, count_params, dtype_name
    from .models import load_model
    from .targets import all_candidates, select_records, select_targets

    if args.pivot and not args.speed:
        raise RankcutError("info --pivot picks the form --speed times: add --speed")
    model = load_model(args.model)
    recorded = getattr(model, "rankcut_state", {}).get("modules", {})
    if recorded:
        recorded = select_records(recorded, args.targets, args.layers)
        rows = [{"name": n, "kind": r["kind"], "layer": r["layer"],
                 "shape": [r["out_features"], r["in_features"]], "params": r["params"],
                 "dense_params": r["dense_params"], "rank": r["rank"], "form": r["form"],
                 "break_even_rank": round(r["out_features"] * r["in_features"]
                                          / (r["out_features"] + r["in_features"]), 1)}
                for n, r in recorded.items()]
    else:
        chosen = select_targets(model, args.targets, args.layers) if args.targets else \
            [t for t in all_candidates(model)]
        rows = [{"name": t.name, "kind": t.kind, "layer": t.layer,
                 "shape": [t.out_features, t.in_features], "params": t.params,
                 "break_even_rank": round(t.break_even_rank, 1),
                 "in_all_linear": t.layer is not None} for t in chosen]
    payload = {"model": args.model, "params": count_params(model), "bytes": count_bytes(model),
               "dtype": dtype_name(model),
               "compressed": bool(recorded), "targets": rows}
    if recorded:
        payload["speed"] = _speed_decisions(recorded, getattr(model, "rankcut_state", {}).get("speed"))
        payload["speed"]["limits"] = getattr(model, "rankcut_state", {}).get("speed_limits")
        payload["by_kind"] = _by_kind(rows)
    if args.speed:  # of the dense shapes, here: for a saved model, what a new budget would be held to
        from .ranks import shape_key
        from .speedlimits import limits_for

        limits = limits_for(model, [tuple(r["shape"]) for r in rows], pivot=args.pivot, progress=not args.json)
        for r in rows:
            r["speed_limit"] = limits[shape_key(*r["shape"])]
        payload["speed_limits"] = limits

    def human() -> None:
        print(f"{args.model}: {payload['params']:,} parameters, {payload['bytes'] / 2**20:.1f} MiB "
              f"({payload['dtype']})")
        if recorded:
            timed = "speed_limits" in payload
            print(f"{'module':<48} {'kind':<17} {'shape':>12} {'rank':>9} {'params':>10} {'dense':>10}"
                  + (f" {'fast r':>7}" if timed else ""))
            for r in rows:
                shape = f"{r['shape'][0]}×{r['shape'][1]}"
                rank = "dense" if r["rank"] is None else str(r["rank"]) + ("p" if r["form"] == "pivot" else "")
                print(f"{r['name']:<48} {r['kind']:<17} {shape:>12} {rank:>9} "
                      f"{r['params']:>10,} {r['dense_params']:>10,}" + (f" {r['speed_limit']:>7}" if timed else ""))
            print(f"{'by kind':<17} {'modules':>7} {'dense':>6} {'ranks (min / median / max)':>27} {'kept':>7}")
            for kind, k in payload["by_kind"].items():
                span = (f"{k['rank_min']} / {k['rank_median']} / {k['rank_max']}" if k["rank_min"] is not None
                        else "-")
                print(f"{kind:<17} {k['modules']:>7} {k['dense']:>6} {span:>27} {k['kept']:>7.1%}")
            kept = sum(r["params"] for r in rows) / max(1, sum(r["dense_params"] for r in rows))
            dense = sum(r["rank"] is None for r in rows)
            print(f"{len(rows)} targeted modules ({dense} left dense by the budget) keep {kept:.1%} "
                  "of their dense parameters")
            if any(r["form"] == "pivot" for r in rows):
                print("Np = rank N stored pivoted: N·(m+n) − N² numbers")
            print(_describe_speed(payload["speed"]))
            if timed:
                print(_FAST_R_NOTE.format(form=" (pivoted)" if args.pivot else ""))
        else:
            timed = "speed_limits" in payload
            print(f"{'module':<48} {'kind':<17} {'layer':>5} {'shape':>12} {'params':>10} {'r*':>7}"
                  + (f" {'fast r':>7}" if timed else ""))
            for r in rows:
                shape = f"{r['shape'][0]}×{r['shape'][1]}"
                layer = "-" if r["layer"] is None else r["layer"]
                print(f"{r['name']:<48} {r['kind']:<17} {layer:>5} {shape:>12} {r['params']:>10,} "
                      f"{r['break_even_rank']:>7}" + (f" {r['speed_limit']:>7}" if timed else ""))
            print("r* = mn/(m+n), the break-even rank; modules without a layer are not in all-linear")
            if timed:
                print(_FAST_R_NOTE.format(form=" (pivoted)" if args.pivot else ""))

    _emit(args, payload, human)


# --------------------------------------------------------------------------- compress

def build_config(args: argparse.Namespace) -> Any:
    from .methods import config_class

    cls = config_class(args.method)
    kwargs: dict[str, Any] = {"rank": _parse_rank(args.rank), "keep": args.keep, "energy": args.energy,
                              "budget": args.budget, "allow_growth": args.allow_growth, "pivot": args.pivot}
    if cls.needs:
        from .calibration import Calibration

        kwargs["calibration"] = Calibration(text=args.calib, samples=args.calib_samples,
                                            seqlen=args.calib_seqlen, sequential=not args.no_sequential,
                                            two_pass=args.two_pass, staged=args.staged)
    if isinstance(kwargs["rank"], tuple) and args.method != "tucker":
        raise RankcutError("a rank pair R1,R2 is for --method tucker; give one integer for this method")
    if getattr(args, "three_factor", False):
        if "three_factor" not in cls.field_names():
            raise RankcutError("--three-factor applies to --method tucker only")
        kwargs["three_factor"] = True
    return cls(**kwargs)


def _dense_by_budget(report: Any) -> int:
    return sum(r["rank"] is None for r in report.modules.values())


def _describe_limits(limits: dict[str, int]) -> str:
    return "highest rank faster than dense here: " + ", ".join(
        f"{k.replace('x', '×')} {v}" for k, v in sorted(limits.items()))


def cmd_compress(args: argparse.Namespace) -> None:
    from .compress import compress_, count_bytes, count_params
    from .io import save
    from .models import load_model

    import time

    from .bench import current_rss_mb, high_water_rss_mb

    t_start = time.perf_counter()
    _check_out(args.out, args.overwrite)
    if args.resume and not args.checkpoint:
        raise RankcutError("--resume needs --checkpoint FOLDER (where the interrupted compression wrote)")
    if args.checkpoint:
        from .compress_checkpoint import check_checkpoint_folder

        check_checkpoint_folder(args.checkpoint, args.resume)
    if args.method == "tucker":
        require("tensorly", "tucker", "--method tucker")
    config = build_config(args)
    runtime_mb = current_rss_mb()
    model = load_model(args.model)
    bytes_before = count_bytes(model)
    limits = None
    if args.speed and config.budget is not None:
        from dataclasses import replace

        from .compress_checkpoint import recorded_speed_limits
        from .speedlimits import speed_limits

        # a resumed run allocates under the limits the interrupted one measured
        limits = recorded_speed_limits(args.checkpoint) if args.resume else None
        if limits is None:
            limits = speed_limits(model, args.targets, args.layers, pivot=config.pivot, progress=not args.json,
                                  dtype=_torch_dtype(args.dtype))  # timed at the precision it is stored in
        config = replace(config, speed_limits=limits)
    report = compress_(model, config, targets=args.targets, layers=args.layers,
                       progress=not args.json, checkpoint=args.checkpoint, resume=args.resume)
    if args.dtype != "float32":  # rounded once the factors are computed (in float64, stored float32)
        model.to(_torch_dtype(args.dtype))
    speed = None
    if args.speed:
        from .fast import Speed, speed_up_

        # under speed limits the allocation already chose dense where factors are not faster:
        # a second, noisier verdict would only push the model over its budget
        speed = speed_up_(model, Speed(dense_fallback=limits is None))
        report.params_after = count_params(model)  # the modules put back dense count again
    save(model, args.out, overwrite=args.overwrite)
    if args.checkpoint:  # the saved model holds everything the checkpoint did
        from .compress_checkpoint import CompressCheckpoint

        CompressCheckpoint.remove_folder(args.checkpoint)
    # a budget or an energy share gives every module its own rank: plot where they went
    plot = None
    if config.budget is not None or config.energy is not None:
        from .rankplot import plot_ranks_beside

        plot = plot_ranks_beside(model, args.out)
    payload = {"model": args.model, "out": args.out, "config": config.to_dict(),
               "ranks_plot": str(plot) if plot else None,
               "column_major": None if speed is None else len(speed.column_major),
               "modules": len(report.modules), "params_before": report.params_before,
               "params_after": report.params_after, "bytes_before": bytes_before,
               "bytes_after": count_bytes(model), "ratio": report.ratio, "dtype": args.dtype,
               "dense_fallback": None if speed is None else speed.dense_fallback,
               "speed_limits": limits,
               "seconds": round(time.perf_counter() - t_start, 2),
               "peak_rss_mb": round(high_water_rss_mb(), 1), "runtime_rss_mb": round(runtime_mb, 1)}
    # what loading, calibrating and compressing took at the peak (the model, its libraries' code
    # and the tokenizer included), against the size of the model's weights
    payload["peak_over_model"] = round((payload["peak_rss_mb"] - runtime_mb) * 2**20 / bytes_before, 3)
    _emit(args, payload, lambda: print(
        f"compressed {len(report.modules)} modules of {args.model} with {config.method_name}: "
        f"{report.params_before:,} → {report.params_after:,} parameters ({report.ratio:.1%}), "
        f"{bytes_before / 2**20:,.1f} → {payload['bytes_after'] / 2**20:,.1f} MiB ({args.dtype}), "
        f"saved to {args.out}" + (" (ranks.png)" if plot else "")
        + (f"; {len(speed.dense_fallback)} modules kept dense (not faster factored here), "
           f"{len(speed.column_major)} with factors stored column-major (faster here)" if speed and not limits else "")
        + (f"; {_dense_by_budget(report)} modules kept dense by the budget under the speed limits "
           f"({_describe_limits(limits)}), {len(speed.column_major)} with factors stored column-major"
           if limits else "")
        + f"\n{payload['seconds']:.1f} s; peak memory {payload['peak_rss_mb']:,.0f} MB, "
        f"{payload['peak_rss_mb'] - runtime_mb:,.0f} MB of it above the process before the model loaded = "
        f"{payload['peak_over_model']:.2f}× the {bytes_before / 2**20:,.0f} MB model"))


# --------------------------------------------------------------------------- eval

def cmd_eval(args: argparse.Namespace) -> None:
    import time

    from . import __version__
    from .compress import count_params
    from .evaluate import parse_tasks, run_task
    from .fsutil import atomic_write_text, check_output_file
    from .models import load_model

    tasks = parse_tasks(args.tasks)
    if args.out:
        check_output_file(args.out)
    if args.harness == "lm-eval":
        require("lm_eval", "lmeval", "--harness lm-eval")
    model = load_model(args.model)
    doc: dict[str, Any] = {"model": args.model, "rankcut_version": __version__,
                           "params": count_params(model), "limit": args.limit, "results": []}
    if args.harness == "lm-eval":
        from .evaluate.harness import run_lm_eval

        doc["results"] = run_lm_eval(model, tasks, args.limit)
    else:
        for task in tasks:
            t0 = time.perf_counter()
            result = run_task(model, task, data_dir=args.data_dir, limit=args.limit,
                              seqlen=args.seqlen, progress=not args.json).to_dict()
            result["seconds"] = round(time.perf_counter() - t0, 2)
            doc["results"].append(result)
            if not args.json:
                metrics = ", ".join(f"{k}={v:.4g}" for k, v in result["metrics"].items()
                                    if not k.endswith("stderr") and isinstance(v, float))
                print(f"{task:<16} n={result['n']:<6} {metrics}  ({result['seconds']:.0f} s)")
    if args.out:
        atomic_write_text(args.out, json.dumps(doc, indent=2) + "\n")
    if args.json:
        print(json.dumps(doc, indent=2))


# --------------------------------------------------------------------------- bench

def cmd_bench(args: argparse.Namespace) -> None:
    from .bench import benchmark, ratios
    from .compress import dtype_name
    from .models import load_model, resolve_device

    device = resolve_device(args.device)
    names = {"model": args.model}
    if args.vs:
        names["vs"] = args.vs
    if args.breakdown:
        from .timesplit import check_decode

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
        from .bench import random_ids
        from .timesplit import compare_splits

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


# --------------------------------------------------------------------------- sweep / report

def cmd_sweep(args: argparse.Namespace) -> None:
    import time

    from .evaluate import parse_tasks
    from .evaluate.tasks import check_limit
    from .fsutil import check_output_file
    from .models import load_model
    from .space import ModelShape, Space
    from .sweep import (ResultsFile, SweepSpec, build_context, proxy_ids, run_baselines, run_front, run_local,
                        run_ray)

    tasks = parse_tasks(args.tasks) if args.tasks else []
    check_limit(args.limit)
    if args.workers < 1:
        raise RankcutError(f"--workers {args.workers}: give 1 or more")
    check_output_file(args.results)
    if args.executor == "ray":
        require("ray", "ray", "--executor ray")
    model = load_model(args.model)
    shape = ModelShape.of(model)
    space = Space.from_yaml(args.space, shape)  # every error surfaces here, before any work
    if "tucker" in space.methods:
        require("tensorly", "tucker", "a sweep over the tucker method")
    configs = space.sample()
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    ids = proxy_ids(model, args.proxy_tokens)
    results = ResultsFile(args.results)  # created only once the sweep's inputs are known to be good
    methods = list(dict.fromkeys([*space.methods, *([args.baseline_method] if args.baselines else [])]))
    ctx = build_context(model, args.model, methods, ids, progress=not args.json)
    timings["factor_cache_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    if args.executor == "ray":
        spec = SweepSpec(args.model, space.methods, args.proxy_tokens)
        written = run_ray(spec, configs, results, address=args.ray_address, workers=args.workers,
                          progress=not args.json)
    else:
        written = run_local(ctx, configs, results, progress=not args.json)
    if space.sampler == "greedy":  # second round: cuts grown from the single cells' losses
        losses = {r["key"]: r["proxy"]["kl"] for r in results.rows() if r.get("kind") == "config"}
        configs = space.greedy(losses)
        written += run_local(ctx, configs, results, progress=not args.json)
    timings["proxy_stage_s"] = time.perf_counter() - t0
    rows = [r for r in results.rows() if r.get("kind") == "config"]
    if args.baselines:
        t0 = time.perf_counter()
        run_baselines(ctx, [r["params"] for r in rows], results, args.baseline_method, progress=not args.json)
        timings["baselines_s"] = time.perf_counter() - t0
    if tasks:
        t0 = time.perf_counter()
        baselines = [r for r in results.rows() if r.get("kind") == "baseline"] if args.front_baselines else []
        run_front(ctx, rows, tasks, results, args.limit, data_dir=args.data_dir, progress=not args.json,
                  baselines=baselines)
        timings["front_stage_s"] = time.perf_counter() - t0
    median = lambda xs: sorted(xs)[len(xs) // 2] if xs else None  # noqa: E731
    payload = {"space": str(args.space), "configurations": len(configs), "space_size": space.count(),
               "written": written, "results": str(args.results), "timings": timings,
               "median_config_s": median([r["seconds"] for r in rows]),
               "median_apply_s": median([r["apply_s"] for r in rows if "apply_s" in r])}
    per_config = payload["median_config_s"]
    _emit(args, payload, lambda: print(
        f"{len(configs)} configurations of a space of {space.count():,} ({written} new) → {args.results}; "
        + ", ".join(f"{k} {v:.1f}" for k, v in timings.items())
        + (f"; median {per_config:.2f} s per configuration" if per_config else "")
        + (f" ({payload['median_apply_s']:.3f} s of it cutting from the factor cache)"
           if payload["median_apply_s"] is not None else "")))


def cmd_report(args: argparse.Namespace) -> None:
    from .report import write_report

    require("matplotlib", "plot", "rankcut report")
    out = write_report(args.results, args.out)
    print(f"wrote {out}/table.md, {out}/pareto.png" + (", sensitivity.png" if (out / "sensitivity.png").exists() else ""))


# --------------------------------------------------------------------------- softrank

def cmd_softrank(args: argparse.Namespace) -> None:
    from .calibration import Calibration
    from .compress import count_params
    from .io import save
    from .models import load_model
    from .distill import evaluate_task, prepare
    from .rankplot import plot_ranks_beside
    from .softrank import SoftRank, softrank

    _check_out(args.out, args.overwrite)
    _check_checkpoint(args)
    config = SoftRank(budget=args.budget, method=args.method, init=args.init, learn_ranks=not args.static,
                      fisher_examples=args.fisher_examples,
                      steps=args.steps, batch_size=args.batch_size, seqlen=args.seqlen, lr=args.lr,
                      threshold_lr=args.threshold_lr, distill=args.distill, hidden_distill=args.hidden_distill,
                      task_weight=args.task_weight, **_temperature(args),
                      penalty=args.penalty, project=args.project, shrink=not args.gate,
                      threshold_step=args.threshold_step, rank_phase=args.rank_phase,
                      checkpoint_every=args.checkpoint_every, seed=args.seed, precision=args.precision,
                      targets=args.targets, layers=args.layers,
                      calibration=Calibration(text=args.calib, samples=args.calib_samples,
                                              seqlen=args.calib_seqlen))
    model, name = prepare(load_model(args.model), args.task, args.data_dir, progress=not args.json)
    dense_params = count_params(model)
    before = evaluate_task(model, args.task, args.data_dir, args.eval_limit, progress=False) if args.eval else None
    result = softrank(model, args.task, config, model_name=name, checkpoint=args.checkpoint, resume=args.resume,
                      data_dir=args.data_dir, progress=not args.json)
    after = evaluate_task(model, args.task, args.data_dir, args.eval_limit, progress=False) if args.eval else None
    save(model, args.out, overwrite=args.overwrite)
    plotted = plot_ranks_beside(model, args.out)
    ranks = [r for r in result.ranks.values() if r is not None] or [0]
    payload = {"model": args.model, "task": args.task, "out": args.out, "settings": config.describe(),
               "dense_params": dense_params, "params": result.params, "target_params": result.target_params,
               "budget_params": result.budget_params, "budget_error": result.budget_error,
               "rank_min": min(ranks), "rank_max": max(ranks), "ranks": result.ranks,
               "seconds": result.seconds, "train_seconds": result.train_seconds, "dense_eval": before, "eval": after,
               "final_loss": result.history[-1] if result.history else None}
    _emit(args, payload, lambda: print(
        f"{'learned' if config.learn_ranks else 'static'} ranks {min(ranks)}–{max(ranks)}; targeted parameters "
        f"{result.target_params:,} for a budget of {result.budget_params:,} ({result.budget_error:+.2%}); "
        f"{result.seconds:.0f} s; saved to {args.out} "
        + ("(ranks.png)" if plotted else "(no ranks.png: pip install 'rankcut[plot]' to draw one)")
        + (f"\ndense {before['metrics']} → {after['metrics']}" if before else "")))


# --------------------------------------------------------------------------- heal

def cmd_heal(args: argparse.Namespace) -> None:
    from .distill import evaluate_task, task_scorer
    from .heal import Heal, heal
    from .io import load, save

    _check_out(args.out, args.overwrite)
    _check_checkpoint(args)
    config = Heal(steps=args.steps, batch_size=args.batch_size, seqlen=args.seqlen, lr=args.lr,
                  distill=args.distill, hidden_distill=args.hidden_distill, task_weight=args.task_weight,
                  **_temperature(args), checkpoint_every=args.checkpoint_every,
                  seed=args.seed, precision=args.precision)
    if args.eval_every and not args.eval:
        raise RankcutError("--eval-every scores the model during the run: add --eval (and --eval-limit to bound it)")
    model = load(args.model)
    before = evaluate_task(model, args.task, args.data_dir, args.eval_limit, progress=False) if args.eval else None
    result = heal(model, args.task, config, teacher=args.teacher, checkpoint=args.checkpoint, resume=args.resume,
                  data_dir=args.data_dir, progress=not args.json, eval_every=args.eval_every,
                  evaluate=task_scorer(args.task, args.data_dir, args.eval_limit))
    after = evaluate_task(model, args.task, args.data_dir, args.eval_limit, progress=False) if args.eval else None
    curve = result.curve
    save(model, args.out, overwrite=args.overwrite)
    payload = {"model": args.model, "task": args.task, "out": args.out, "settings": config.describe(),
               "teacher": args.teacher or getattr(model, "rankcut_source", None), "steps": result.steps,
               "seconds": result.seconds, "train_seconds": result.train_seconds, "eval_before": before, "eval": after,
               "final_loss": result.history[-1] if result.history else None, "curve": curve}
    _emit(args, payload, lambda: print(
        f"healed {result.steps} steps in {result.train_seconds:.0f} s ({result.seconds:.0f} s with the teacher, "
        f"data and scoring); saved to {args.out}"
        + (f"\nbefore {before['metrics']} → after {after['metrics']}" if before else "")
        + "".join(f"\n  step {c['step']}: " + ", ".join(f"{k} {v:.4g}" for k, v in c.items()
                                                      if k != "step" and isinstance(v, float)) for c in curve)))


# --------------------------------------------------------------------------- demo

def cmd_demo(args: argparse.Namespace) -> None:
    from .demo import run_demo

    run_demo(model_name=args.model, out=args.out, keep=args.keep, method=args.method,
             as_json=args.json)


# --------------------------------------------------------------------------- parser

def _add_training_run(p: argparse.ArgumentParser, eval_help: str) -> None:
    """What every fine-tuning command takes: seed, checkpoints, evaluation and output."""
    from .distill import PRECISIONS

    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--precision", default="fp32", choices=PRECISIONS,
                   help="bf16: teacher and student forwards in bfloat16 under autocast (weights, optimizer "
                        "and losses stay float32); 1.5-1.6x faster steps on a CPU with AVX512-BF16")
    p.add_argument("--task-weight", type=float, default=1.0,
                   help="weight of the task loss (next-token cross-entropy, or the GLUE labels' cross-entropy)")
    p.add_argument("--distill-temperature", type=float, default=None,
                   help="temperature of the logit distillation (KL to the dense model's softened outputs, scaled by "
                        "T²); default: heal 1 (measured best on SmolLM2), softrank 2 (its GLUE recipe)")
    p.add_argument("--checkpoint", default=None, help="folder for checkpoints (every --checkpoint-every steps)")
    p.add_argument("--checkpoint-every", type=int, default=50)
    p.add_argument("--resume", action="store_true", help="continue the run in --checkpoint")
    p.add_argument("--eval", action="store_true", help=eval_help)
    p.add_argument("--eval-limit", type=int, default=None, help="tokens (lm) or examples (GLUE) to score")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--out", required=True)
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--json", action="store_true")


def _add_selection(p: argparse.ArgumentParser, default: str | None = "all-linear") -> None:
    p.add_argument("--targets", default=default,
                   help="all-linear, a comma list of kinds (q,k,v,o,gate,up,down,...), or a regex")
    p.add_argument("--layers", default=None, help="layer indices and ranges, e.g. 0-5,9")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="rankcut", description=__doc__)
    parser.add_argument("--version", action="version", version=f"rankcut {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("info", help="targets, shapes, parameters, break-even ranks")
    p.add_argument("model")
    _add_selection(p, default=None)
    p.add_argument("--speed", action="store_true",
                   help="also time, once per shape, the highest rank whose factors run faster than the "
                        "dense matrix on this machine (at decode and prefill sizes; sentence and batch "
                        "sizes for an encoder)")
    p.add_argument("--pivot", action="store_true", help="with --speed: time the pivoted form")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("compress", help="factorize a model's weights and save it")
    p.add_argument("model")
    p.add_argument("--method", default="svd", help="svd, tucker, whiten, asvd or fisher")
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--keep", type=float, help="fraction of each module's parameters kept, in (0, 1]")
    group.add_argument("--rank", help="fixed rank N (or R1,R2 for tucker)")
    group.add_argument("--energy", type=float, help="fraction of squared singular values kept")
    group.add_argument("--budget", type=float,
                       help="fraction of all targeted parameters kept, spread unevenly by what each direction is worth")
    p.add_argument("--three-factor", action="store_true", help="tucker: keep the r1×r2 core as its own linear")
    p.add_argument("--speed", action="store_true",
                   help="also store each factor in the memory order its matmul runs fastest in, and put back "
                        "as dense every module that is not faster factored, both as timed on this machine at "
                        "the model's workloads: decode and prefill sizes for a generating model, sentence and "
                        "batch sizes for an encoder (recorded in rankcut.json; rankcut.load redoes both). "
                        "With --budget, each shape's highest rank that runs faster than dense is timed first "
                        "and the budget gives every module a rank up to it or keeps it dense, so the budget "
                        "still holds")
    p.add_argument("--allow-growth", action="store_true", help="allow ranks past the break-even rank")
    p.add_argument("--pivot", action="store_true",
                   help="store factors pivoted: r of the output rows kept exactly, the rest as their "
                        "combinations (the same map in r² fewer numbers, so a budget buys a higher rank)")
    p.add_argument("--calib", default="gensim-wiki",
                   help="calibration text for whiten/asvd/fisher: gensim-wiki, gensim-news, a train split "
                        "(sst2, mrpc, rte, stsb, gsm8k) or a text file")
    p.add_argument("--calib-samples", type=int, default=32)
    p.add_argument("--calib-seqlen", type=int, default=256)
    p.add_argument("--two-pass", action="store_true",
                   help="--budget: allocate ranks in a first pass, then compress block by block on the "
                        "compressed model's activations (better, about twice the time)")
    p.add_argument("--staged", action="store_true",
                   help="sequential calibration inside each block too: every input group (q/k/v, o, "
                        "gate/up, down) on the outputs of the groups already cut (better, slower)")
    p.add_argument("--no-sequential", action="store_true",
                   help="calibrate every block on the dense model's activations (faster, less accurate)")
    _add_selection(p)
    p.add_argument("--out", required=True)
    p.add_argument("--dtype", default="float32", choices=DTYPES,
                   help="store the compressed model in this precision (bfloat16: half the bytes; recorded in "
                        "rankcut.json, and --speed decides at this precision)")
    p.add_argument("--checkpoint", default=None,
                   help="folder that receives each finished block, so that a killed compression can go on "
                        "with --resume (same command) to the same result; removed once the model is saved")
    p.add_argument("--resume", action="store_true", help="continue the compression checkpointed in --checkpoint")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_compress)

    p = sub.add_parser("eval", help="perplexity and zero-shot benchmarks")
    p.add_argument("model")
    p.add_argument("--tasks", required=True, help="comma list: wikitext2, arc_easy, ..., or zero-shot-six")
    p.add_argument("--limit", type=int, default=None,
                   help="perplexity: first N tokens; other tasks: a fixed seeded sample of N questions")
    p.add_argument("--data-dir", default=None,
                   help="benchmark files (default: ../shared/data or $RANKCUT_DATA_DIR), or 'hub' for the HF hub")
    p.add_argument("--seqlen", type=int, default=2048, help="perplexity window (capped at the model's maximum)")
    p.add_argument("--harness", choices=["rankcut", "lm-eval"], default="rankcut")
    p.add_argument("--out", default=None, help="write the results document here (JSON)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("bench", help="params, bytes, FLOPs, latency, memory; --vs for a side-by-side")
    p.add_argument("model")
    p.add_argument("--vs", default=None, help="a second model, timed interleaved with the first")
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--decode", type=int, default=0, help="also time greedy decoding of N new tokens")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--memory", action="store_true", help="peak memory of a prefill, each model in its own process")
    p.add_argument("--breakdown", action="store_true",
                   help="with --vs: time the targeted linear maps apart from the rest, and the speed-up's ceiling")
    p.add_argument("--device", default="cpu", help="cpu or cuda (GPU timings synchronize the device)")
    p.add_argument("--dtype", default=None, choices=DTYPES,
                   help="cast both models to this precision before timing (default: each as stored)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("sweep", help="evaluate many configurations of a design space (resumable)")
    p.add_argument("model")
    p.add_argument("--space", required=True, help="a YAML file describing the space (see rankcut.space)")
    p.add_argument("--tasks", default=None, help="benchmarks to run on the proxy's Pareto front")
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--results", required=True, help="JSONL file; rows are appended, a rerun resumes")
    p.add_argument("--proxy-tokens", type=int, default=1024)
    p.add_argument("--executor", choices=["local", "ray"], default="local")
    p.add_argument("--ray-address", default=None, help="join an existing Ray cluster (default: a local Ray)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--baselines", action="store_true",
                   help="also: layer dropping and a global-budget allocation at each configuration's size")
    p.add_argument("--no-front-baselines", dest="front_baselines", action="store_false",
                   help="benchmark only the configurations' front, not the baselines at its sizes")
    p.add_argument("--baseline-method", default="fisher", help="the method whose worths drive the budget baseline")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("report", help="table.md, pareto.png and sensitivity.png from a sweep's results")
    p.add_argument("results")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("softrank", help="SoftLMs: learn per-layer ranks under a budget in a short fine-tune")
    p.add_argument("model")
    p.add_argument("--task", default="lm", help="lm or wikitext2 (decoders: trained on gensim Wikipedia, scored on wikitext2), sst2, mrpc")
    p.add_argument("--budget", type=float, default=0.5, help="fraction of the targeted parameters to keep")
    p.add_argument("--method", default="whiten", help="factors to start from: svd, whiten, fisher, asvd")
    p.add_argument("--fisher-examples", type=int, default=256,
                   help="--init fisher: training examples whose loss gradients measure every direction")
    p.add_argument("--init", default="uniform", choices=["uniform", "budget", "fisher"],
                   help="starting ranks: uniform; the method's global budget allocation; or allocated by "
                        "the task loss's Fisher information of every direction (--fisher-examples)")
    p.add_argument("--static", action="store_true",
                   help="baseline: fine-tune the starting cut with the same steps and data, ranks fixed")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seqlen", type=int, default=128, help="training sequence length (lm)")
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--threshold-lr", type=float, default=2e-3)
    p.add_argument("--distill", type=float, default=1.0, help="weight of the distillation from the dense model")
    p.add_argument("--hidden-distill", type=float, default=1.0,
                   help="weight of matching each layer's hidden states to the dense model's (0: logits only)")
    p.add_argument("--penalty", type=float, default=10.0, help="weight of the budget penalty")
    p.add_argument("--rank-phase", type=float, default=0.5,
                   help="fraction of the steps that learn ranks; the cut is made then and the rest heal it (1: cut at the end)")
    p.add_argument("--threshold-step", default="scaled", choices=["scaled", "adam"],
                   help="thresholds step by their gradient over the largest one (scaled), or by Adam")
    p.add_argument("--gate", action="store_true",
                   help="select directions by the threshold without shrinking the kept singular values "
                        "(straight-through gradient) instead of SoftLMs' soft threshold max(s − τ, 0)")
    p.add_argument("--project", default="proportional", choices=["proportional", "shared", "off"],
                   help="after each step bring the hard count back within budget: every layer's live "
                        "directions cut by the same fraction, or every threshold raised by the same "
                        "amount, or not at all (penalty only)")
    p.add_argument("--calib", default="gensim-wiki")
    p.add_argument("--calib-samples", type=int, default=32)
    p.add_argument("--calib-seqlen", type=int, default=256)
    _add_training_run(p, "score dense and result on the task's held-out set")
    _add_selection(p)
    p.set_defaults(func=cmd_softrank)

    p = sub.add_parser("heal", help="fine-tune a compressed model towards its dense source, ranks fixed")
    p.add_argument("model", help="a folder saved by rankcut compress / softrank")
    p.add_argument("--task", default="lm", help="lm or wikitext2 (decoders: trained on gensim Wikipedia, scored on wikitext2), sst2, mrpc")
    p.add_argument("--teacher", default=None,
                   help="the dense model to distil from (default: the source recorded in rankcut.json)")
    p.add_argument("--steps", type=int, default=125)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seqlen", type=int, default=128, help="training sequence length (lm)")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--distill", type=float, default=1.0, help="weight of the distillation from the dense model")
    p.add_argument("--eval-every", type=int, default=0,
                   help="with --eval: also score every N steps (the healing curve, in the JSON's `curve`)")
    p.add_argument("--hidden-distill", type=float, default=1.0,
                   help="weight of matching each layer's hidden states to the dense model's (0: logits only)")
    _add_training_run(p, "score the model before and after on the task's held-out set")
    p.set_defaults(func=cmd_heal)

    p = sub.add_parser("demo", help="the main job on the embedded default model")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--method", default="fisher")
    p.add_argument("--keep", type=float, default=0.8,
                   help="fraction of the targeted parameters kept (a global budget for calibrated methods)")
    p.add_argument("--out", default="out/demo")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if not args.verbose:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        logging.getLogger("huggingface_hub").setLevel(logging.ERROR)  # its retry warnings, a line each
    try:
        args.func(args)
    except RankcutError as exc:
        print(f"rankcut: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into `head`
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        print("rankcut: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
