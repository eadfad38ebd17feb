"""`rankcut compress`: the flags become a method config and a `oneshot` call."""

from __future__ import annotations

import argparse
import time
from typing import Any

from ..calibration.sources import Calibration
from ..compress.pipeline import check_job, oneshot
from ..core.errors import RankcutError, require
from ..core.machine import current_rss_mb, high_water_rss_mb, resolve_device
from ..core.modules import dtype_name
from ..methods.base import config_class
from .common import _describe_limits, _emit, _parse_rank


def _calibration(args: argparse.Namespace) -> Calibration:
    return Calibration(text=args.calib, samples=args.calib_samples, seqlen=args.calib_seqlen,
                       draw=args.calib_draw, sequential=not args.no_sequential, two_pass=args.two_pass,
                       staged=args.staged)


def build_config(args: argparse.Namespace) -> Any:
    cls = config_class(args.method)
    kwargs: dict[str, Any] = {"rank": _parse_rank(args.rank), "keep": args.keep, "energy": args.energy,
                              "budget": args.budget, "allow_growth": args.allow_growth, "pivot": args.pivot}
    if cls.needs:
        kwargs["calibration"] = _calibration(args)
    if isinstance(kwargs["rank"], tuple) and args.method != "tucker":
        raise RankcutError("a rank pair R1,R2 is for --method tucker; give one integer for this method")
    for flag, field_name in (("shrink", "shrink"), ("anchor", "anchor")):
        value = getattr(args, flag, None)
        if value is None:
            continue
        if field_name not in cls.field_names():
            raise RankcutError(f"--{flag} does not apply to --method {args.method}")
        kwargs[field_name] = value
    if getattr(args, "three_factor", False):
        if "three_factor" not in cls.field_names():
            raise RankcutError("--three-factor applies to --method tucker only")
        kwargs["three_factor"] = True
    return cls(**kwargs)


def _dense_by_budget(report: Any) -> int:
    return sum(r["rank"] is None for r in report.modules.values())


def cmd_compress(args: argparse.Namespace) -> None:
    """Refuse bad input before any work, run `oneshot`, report what it did and what it cost."""
    t_start = time.perf_counter()
    check_job(args.out, args.overwrite, args.checkpoint, args.resume)
    if args.method == "tucker":
        require("tensorly", "tucker", "--method tucker")
    config = build_config(args)
    runtime_mb = current_rss_mb()
    resolve_device(args.device)
    done = oneshot(args.model, config, targets=args.targets, layers=args.layers, load_dtype=args.dtype,
                   device=args.device, offload=args.offload, speed=args.speed, out=args.out,
                   overwrite=args.overwrite, checkpoint=args.checkpoint, resume=args.resume, progress=not args.json,
                   mlp_channels=args.mlp_channels, channel_calibration=_calibration(args),
                   channel_select=args.mlp_select, attention_channels=args.attn_channels)
    dtype = dtype_name(done.model)
    config, report, speed, limits, plot = done.config, done.report, done.speed, done.speed_limits, done.ranks_plot
    bytes_before = done.bytes_before
    payload = {"model": args.model, "out": args.out, "config": config.to_dict(),
               "ranks_plot": str(plot) if plot else None,
               "column_major": None if speed is None else len(speed.column_major),
               "modules": len(report.modules), "params_before": report.params_before,
               "params_after": report.params_after, "bytes_before": bytes_before,
               "bytes_after": done.bytes_after, "ratio": report.ratio, "dtype": dtype,
               "dense_fallback": None if speed is None else speed.dense_fallback,
               "speed_limits": limits,
               "seconds": round(time.perf_counter() - t_start, 2), "stage_seconds": done.seconds,
               "peak_rss_mb": round(high_water_rss_mb(), 1), "runtime_rss_mb": round(runtime_mb, 1)}
    # what loading, calibrating and compressing took at the peak (the model, its libraries' code
    # and the tokenizer included), against the size of the model's weights
    payload["peak_over_model"] = round((payload["peak_rss_mb"] - runtime_mb) * 2**20 / bytes_before, 3)
    _emit(args, payload, lambda: print(
        f"compressed {len(report.modules)} modules of {args.model} with {config.method_name}: "
        f"{report.params_before:,} → {report.params_after:,} parameters ({report.ratio:.1%}), "
        f"{bytes_before / 2**20:,.1f} → {payload['bytes_after'] / 2**20:,.1f} MiB ({dtype}), "
        f"saved to {args.out}" + (" (ranks.png)" if plot else "")
        + (f"; {len(speed.dense_fallback)} modules kept dense (not faster factored here), "
           f"{len(speed.column_major)} with factors stored column-major (faster here)" if speed and not limits else "")
        + (f"; {_dense_by_budget(report)} modules kept dense by the budget under the speed limits "
           f"({_describe_limits(limits)}), {len(speed.column_major)} with factors stored column-major"
           if limits else "")
        + f"\n{payload['seconds']:.1f} s; peak memory {payload['peak_rss_mb']:,.0f} MB, "
        f"{payload['peak_rss_mb'] - runtime_mb:,.0f} MB of it above the process before the model loaded = "
        f"{payload['peak_over_model']:.2f}× the {bytes_before / 2**20:,.0f} MB model"))
