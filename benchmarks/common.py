"""What several benchmark scripts share: the healing-step set-up and how results are written.

Imported by sibling scripts run as `python benchmarks/NAME.py` (their folder is on the path).
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import torch
from torch import nn

import rankcut
from rankcut.fsutil import atomic_write_text
from rankcut.heal import load_teacher


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


def emit_json(doc: dict[str, Any], out: str | None) -> None:
    """Print the result, and write it atomically to `out` when given."""
    text = json.dumps(doc, indent=1)
    print(text)
    if out:
        atomic_write_text(out, text + "\n")
