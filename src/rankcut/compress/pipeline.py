"""`oneshot`: the whole job a user runs, from a model (or its name) to a saved compressed folder.

`compress_` is the in-place core; a compression that is worth keeping needs more around it:
loading, the speed limits a budget is allocated under, the precision the factors are stored
in, the layouts and dense fallbacks timed on this machine, saving, removing the checkpoint once
the result is safe, and the rank plot. llm-compressor's `oneshot` and torchao's `quantize_`
give their users the job in one call; this is rankcut's, and `rankcut compress` and `rankcut
demo` are thin callers of it. Each stage's wall time is returned, so a user sees where a long
compression spent it.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import torch
from torch import nn

from ..calibration.sources import Calibration
from ..core.errors import RankcutError
from ..core.fsutil import check_output
from ..core.machine import resolve_device
from ..core.modules import count_bytes, count_params
from ..core.targets import ALL_LINEAR
from ..io.models import load_model, parse_dtype
from ..io.saved import save, save_streamed
from ..io.streamed import (
    StreamedModel,
    needs_streaming,
    open_streamed,
    streamable_folder,
)
from ..methods.base import MethodConfig
from ..speed.layouts import Speed, SpeedReport, speed_up_
from ..speed.limits import speed_limits
from .apply import CompressionReport, compress_
from .attention import cut_attention_channels_
from .channels import cut_mlp_channels_
from .checkpoint import (
    CompressCheckpoint,
    check_checkpoint_folder,
    recorded_speed_limits,
)
from .rank_plot import plot_ranks_beside

log = logging.getLogger(__name__)

DTYPES = ("float32", "bfloat16", "float16")  # the precisions a compressed model may be stored in


@dataclass
class OneshotResult:
    """What `oneshot` did: the compressed model and every stage's outcome."""

    model: nn.Module
    config: MethodConfig  # as applied: with the speed limits it was allocated under, if any
    report: CompressionReport
    bytes_before: int
    bytes_after: int
    speed: SpeedReport | None = None
    speed_limits: dict[str, int] | None = None
    out: Path | None = None
    ranks_plot: Path | None = None
    seconds: dict[str, float] = field(default_factory=dict)  # stage → wall seconds, in the order run


def _storage_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise RankcutError(f"dtype '{dtype}' is not one rankcut stores factors in; give one of {', '.join(DTYPES)}")
    return getattr(torch, dtype)


def check_job(out: str | os.PathLike | None, overwrite: bool = False,
              checkpoint: str | os.PathLike | None = None, resume: bool = False) -> None:
    """What `oneshot` refuses before any work: an output folder it may not replace, a resume with
    nothing to resume from, a checkpoint folder that disagrees with `resume`. `rankcut compress`
    calls it first, so these come before any error in the method's flags."""
    if out is not None:
        check_output(out, overwrite)
    if resume and checkpoint is None:
        raise RankcutError("--resume needs --checkpoint FOLDER (where the interrupted compression wrote)")
    if checkpoint is not None:
        check_checkpoint_folder(checkpoint, resume)


def oneshot(
    model: nn.Module | str | os.PathLike,
    config: MethodConfig,
    targets: str | Sequence[str] = ALL_LINEAR,
    layers: str | Iterable[int] | None = None,
    overrides: Mapping[str, MethodConfig] | None = None,
    dtype: torch.dtype | str | None = None,
    load_dtype: torch.dtype | str | None = None,
    device: str | torch.device = "auto",
    offload: str | None = None,
    speed: bool | Speed = False,
    speed_limits_for_budget: bool = True,
    out: str | os.PathLike | None = None,
    overwrite: bool = False,
    checkpoint: str | os.PathLike | None = None,
    resume: bool = False,
    plot: bool = True,
    progress: bool = True,
    mlp_channels: float | None = None,
    channel_calibration: Calibration | None = None,
    channel_select: str = "leverage",
    attention_channels: float | None = None,
) -> OneshotResult:
    """Compress `model` (a loaded model, changed in place, or anything `load_model` takes) with
    `config` and, with `out`, save it there.

    - `dtype`: store the factors in this precision (computed in float64 either way, rounded
      once); `speed` decisions are then timed at it. By default, the model's own.
    - `load_dtype`: load the model in this precision (default: the checkpoint's own; "auto" too).
      Nothing upcasts the whole model: each block is computed in float32 while it is worked on.
    - `device`: where each block is calibrated and factorized (`auto`: a GPU if there is one).
    - `offload`: "disk" streams the blocks from the checkpoint's shards and writes each finished
      block at once (needs `out`; memory holds a block or two); "none" loads the model whole;
      None (the default) streams only when the checkpoint would not fit in memory.
    - `speed`: time this machine's layouts and put back dense each module its factors slow down
      (`True`, or a `Speed` to choose which). With a `budget` and `speed_limits_for_budget`,
      each shape's highest rank faster than dense is timed first and the budget is allocated
      under those limits, so it still holds: nothing is put back afterwards.
    - `checkpoint`/`resume`: every finished block goes to `checkpoint`; a resumed call continues
      an interrupted one to the same factors (and under the speed limits it measured). The
      checkpoint is removed once the model is saved.
    - `plot`: with `out`, where a budget or an energy share spread the ranks, `ranks.png`.
    - `mlp_channels`: first keep this fraction of every MLP's intermediate channels, cut jointly
      with the down map refit on them (`compress.channels`, MoDeGPT's Nyström form); `config` then
      cuts `targets` as the channel cut left them. In memory only. Calibrated on
      `channel_calibration`, else the config's calibration, else the default; the channels chosen
      by `channel_select` ("leverage" or "output", see `methods.nystrom`).
    - `attention_channels`: first keep this fraction of every attention head's channels, Q with
      K and V with O cut jointly (`compress.attention`, MoDeGPT's CR and SVD forms), calibrated
      as `mlp_channels` is; the attention maps are then no longer `targets` of `config`.
    Every argument is checked before the model is loaded; the folder is written atomically.
    """
    seconds: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(stage: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        seconds[stage] = round(now - clock, 3)
        clock = now

    check_job(out, overwrite, checkpoint, resume)
    stored = _storage_dtype(dtype)
    compute_device = resolve_device(device)
    loaded_as = parse_dtype(load_dtype)
    if offload not in (None, "disk", "none"):
        raise RankcutError(f"offload '{offload}' is not one rankcut knows; give disk or none")
    if mlp_channels is not None and not 0 < mlp_channels <= 1:
        raise RankcutError(f"--mlp-channels {mlp_channels}: give the fraction of MLP channels to keep, in (0, 1]")
    if attention_channels is not None and not 0 < attention_channels <= 1:
        raise RankcutError(f"--attn-channels {attention_channels}: give the fraction of attention head channels "
                           "to keep, in (0, 1]")
    streamed = None
    if not isinstance(model, nn.Module):
        if _streams(str(model), offload, loaded_as):
            if out is None:
                raise RankcutError("--offload disk writes each finished block into the output as it goes; give --out")
            if speed:
                raise RankcutError("--speed times layouts on the whole model in memory; drop it with --offload disk "
                                   "(or time the saved model with rankcut bench)")
            if mlp_channels is not None or attention_channels is not None:
                flag = "--mlp-channels" if mlp_channels is not None else "--attn-channels"
                raise RankcutError(f"{flag} cuts the model in memory; drop --offload disk (or {flag})")
            streamed = open_streamed(streamable_folder(str(model)), loaded_as)
            model = streamed.model
        else:
            model = load_model(model, dtype=loaded_as)
        lap("load")
    elif offload == "disk":
        raise RankcutError("--offload disk streams a checkpoint from disk; give the model's name or folder, "
                           "not a model already in memory")
    bytes_before = count_bytes(model)
    if streamed is not None:
        return _oneshot_streamed(streamed, config, targets, layers, overrides, stored, compute_device, out,
                                 overwrite, checkpoint, resume, plot, progress, bytes_before, seconds, lap)

    params_dense = count_params(model)
    channel_calibration = channel_calibration or getattr(config, "calibration", None)
    if attention_channels is not None:
        cut_attention_channels_(model, attention_channels, channel_calibration, progress=progress)
        lap("attention_channels")
    if mlp_channels is not None:
        cut_mlp_channels_(model, mlp_channels, channel_calibration, select=channel_select, progress=progress)
        lap("mlp_channels")
    limits = None
    if speed and config.budget is not None and speed_limits_for_budget:
        limits = recorded_speed_limits(checkpoint) if resume else None
        if limits is None:  # timed at the precision the factors will be stored in
            limits = speed_limits(model, targets, layers, pivot=config.pivot, progress=progress, dtype=stored)
        config = replace(config, speed_limits=limits)
        lap("speed_limits")
    report = compress_(model, config, targets=targets, layers=layers, overrides=overrides, progress=progress,
                       checkpoint=checkpoint, resume=resume, device=compute_device)
    lap("compress")
    seconds.update(_work_split(report.seconds))
    if mlp_channels is not None or attention_channels is not None:  # the whole cut, from the dense model
        report.params_before = params_dense
    if stored is not None and stored != next(model.parameters()).dtype:
        model.to(stored)
    speed_report = None
    if speed:
        choice = speed if isinstance(speed, Speed) else Speed()
        # under speed limits the allocation already chose dense where factors are not faster:
        # a second, noisier verdict would only push the model over its budget
        speed_report = speed_up_(model, replace(choice, dense_fallback=choice.dense_fallback and limits is None))
        report.params_after = count_params(model)  # the modules put back dense count again
        lap("speed")
    result = OneshotResult(model=model, config=config, report=report, bytes_before=bytes_before,
                           bytes_after=count_bytes(model), speed=speed_report, speed_limits=limits, seconds=seconds)
    if out is None:
        return result
    result.out = save(model, out, overwrite=overwrite)
    return _after_save(result, out, checkpoint, plot, lap)


def _after_save(result: OneshotResult, out: str | os.PathLike, checkpoint: str | os.PathLike | None, plot: bool,
                lap: Callable[[str], None]) -> OneshotResult:
    """Once the model is saved: the checkpoint goes (the saved model holds everything it did), and a
    spectrum-shaped rank policy gets its plot beside the model."""
    if checkpoint is not None:
        CompressCheckpoint.remove_folder(checkpoint)
    lap("save")
    config = result.config
    if plot and (config.budget is not None or config.energy is not None):
        result.ranks_plot = plot_ranks_beside(result.model, out)
        lap("plot")
    return result


def _work_split(seconds: Mapping[str, float]) -> dict[str, float]:
    """Where the compression stage's time went, as `compress.KIND` entries beside the stages."""
    return {f"compress.{kind}": round(value, 3) for kind, value in seconds.items()}


def _streams(name: str, offload: str | None, dtype: torch.dtype | None) -> bool:
    """Whether to stream: asked for, or (unasked) the checkpoint would not fit in memory."""
    if offload == "disk":
        return True
    if offload == "none":
        return False
    try:
        folder = streamable_folder(name)
    except RankcutError:  # in-memory only (tiny, GGUF, unreachable): loading says what is wrong
        return False
    if needs_streaming(folder, dtype):
        log.warning("%s would not fit in memory beside its compression: streaming it block by block from disk "
                    "(--offload disk; --offload none to load it whole)", name)
        return True
    return False


def _oneshot_streamed(streamed: StreamedModel, config: MethodConfig, targets: str | Sequence[str],
                      layers: str | Iterable[int] | None, overrides: Mapping[str, MethodConfig] | None,
                      stored: torch.dtype | None, device: torch.device, out: str | os.PathLike, overwrite: bool,
                      checkpoint: str | os.PathLike | None, resume: bool, plot: bool, progress: bool,
                      bytes_before: int, seconds: dict[str, float], lap: Callable[[str], None]) -> OneshotResult:
    """`oneshot` with the blocks on disk: each is read when needed and written into the output once
    done; the model returned has its blocks' tensors on the meta device (load `out` to use it)."""
    model = streamed.model
    residency = streamed.residency(out, device)
    try:
        if stored is not None and stored != residency.storage_dtype:
            residency.storage_dtype = stored
            model.to(stored)  # the parts outside the blocks; the blocks are cast as they are written
        report = compress_(model, config, targets=targets, layers=layers, overrides=overrides, progress=progress,
                           checkpoint=checkpoint, resume=resume, residency=residency)
        lap("compress")
        seconds.update(_work_split({**report.seconds, **residency.seconds}))
        result = OneshotResult(model=model, config=config, report=report, bytes_before=bytes_before,
                               bytes_after=count_bytes(model), seconds=seconds)
        result.out = save_streamed(model, residency, out, overwrite=overwrite)
    finally:
        residency.close()
    return _after_save(result, out, checkpoint, plot, lap)
