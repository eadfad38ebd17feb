"""What several benchmark scripts share: the healing-step set-up and how results are written.

Imported by the scripts in the area folders (`python benchmarks/AREA/NAME.py`), which put benchmarks/ on the path.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import torch
from torch import nn

import rankcut
import rankcut.train.loop as distill
from rankcut.core.fsutil import atomic_write_text
from rankcut.train.heal import load_teacher


def add_heal_step_args(parser: argparse.ArgumentParser, steps: int) -> None:
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--keep", type=float, default=0.5)
    parser.add_argument("--steps", type=int, default=steps, help="alternating steps, the first two not timed")
    parser.add_argument("--threads", type=int, default=2)


def heal_step_models(args: argparse.Namespace) -> tuple[nn.Module, nn.Module]:
    """The model cut to `args.keep` (plain SVD: a step's cost depends on the ranks, not on how
    the factors were found) and its dense teacher."""
    torch.set_num_threads(args.threads)
    model = rankcut.load_model(args.model)
    rankcut.compress_(model, rankcut.SVD(keep=args.keep), progress=False)
    return model, load_teacher(model, "lm", args.model)


def timed_heal_step(model: nn.Module, teacher: nn.Module, data: Any, config: Any, step: int,
                    opt: torch.optim.Optimizer, params: list[nn.Parameter]) -> float:
    """Seconds of one whole healing step: both forwards, the losses, backward, clipping, Adam
    (as `rankcut.heal` runs it). `step_losses` reads `rankcut.train.loop.distill_loss` when called,
    so a script can swap that loss for another."""
    t0 = time.perf_counter()
    task_loss, kl = distill.step_losses(model, teacher, data, config, step)
    (task_loss + kl).backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def emit_json(doc: dict[str, Any], out: str | None) -> None:
    """Print the result, and write it atomically to `out` when given."""
    text = json.dumps(doc, indent=1)
    print(text)
    if out:
        atomic_write_text(out, text + "\n")
