"""`rankcut sweep`: draw configurations from a space file, score them by the proxy, benchmark
the front (resumable; locally or on Ray)."""

from __future__ import annotations

import argparse

from ..core.errors import RankcutError, require
from ..core.fsutil import check_output_file
from ..core.machine import resolve_device
from ..evaluate.tasks import check_limit, parse_tasks
from ..io.models import load_model
from ..study.space import ModelShape, Space
from ..study.sweep import (
    ResultsFile,
    SweepSpec,
    build_context,
    proxy_ids,
    run_baselines,
    run_front,
    run_local,
    run_ray,
)
from .common import _emit


def cmd_sweep(args: argparse.Namespace) -> None:
    import time


    tasks = parse_tasks(args.tasks) if args.tasks else []
    check_limit(args.limit)
    if args.workers < 1:
        raise RankcutError(f"--workers {args.workers}: give 1 or more")
    check_output_file(args.results)
    if args.executor == "ray":
        require("ray", "ray", "--executor ray")
    model = load_model(args.model).to(resolve_device(args.device))
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
