"""`rankcut info`: a model's targets (or a saved model's ranks and speed decisions), and
optionally each shape's speed limit on this machine."""

from __future__ import annotations

import argparse

from ..core.errors import RankcutError
from ..core.machine import describe_machine, differences
from ..core.modules import count_bytes, count_params, dtype_name
from ..core.ranks import shape_key
from ..core.record import record_of
from ..core.targets import all_candidates, select_records, select_targets
from ..io.models import load_model
from ..speed.limits import limits_for
from .common import _describe_limits, _emit


def _speed_decisions(modules: dict[str, dict], speed: dict | None) -> dict:
    """What `compress --speed` (rankcut.speed.layouts.speed_up_) decided for this machine, from the manifest."""
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
    if args.pivot and not args.speed:
        raise RankcutError("info --pivot picks the form --speed times: add --speed")
    model = load_model(args.model)
    recorded = record_of(model).modules
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
        payload["speed"] = _speed_decisions(recorded, record_of(model).speed)
        payload["speed"]["limits"] = record_of(model).speed_limits
        payload["by_kind"] = _by_kind(rows)
    if args.speed:  # of the dense shapes, here: for a saved model, what a new budget would be held to

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
