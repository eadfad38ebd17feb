"""What several commands share: JSON or text output, `--rank` parsing, and the checks of an
output folder and a fine-tune's checkpoint made before any work."""

from __future__ import annotations

import argparse
import json
from typing import Any, Callable

from ..core.errors import RankcutError
from ..core.fsutil import check_output
from ..train.checkpoint import checkpoint_folder


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
    check_output(out, overwrite)


def _temperature(args: argparse.Namespace) -> dict[str, float]:
    """--distill-temperature if given; else each command's own default (Heal's and SoftRank's differ)."""
    return {} if args.distill_temperature is None else {"distill_temperature": args.distill_temperature}


def _check_checkpoint(args: argparse.Namespace) -> None:
    """Before any evaluation or training: a fine-tune's --checkpoint/--resume must agree with the folder."""

    if args.resume and not args.checkpoint:
        raise RankcutError("--resume needs --checkpoint FOLDER (where the interrupted run wrote)")
    checkpoint_folder(args.checkpoint, args.resume)


def _describe_limits(limits: dict[str, int]) -> str:
    return "highest rank faster than dense here: " + ", ".join(
        f"{k.replace('x', '×')} {v}" for k, v in sorted(limits.items()))

