"""Healing steps in float32 against bfloat16 forwards (`--precision bf16`), in one run.

SmolLM2-135M cut to 50% (plain SVD: a step's cost depends on the ranks, not on how the factors
were found), healed with `rankcut.heal`'s default settings. Steps alternate between the two
precisions in one process, so the machine's drift hits both alike; each step is a whole one
(teacher and student forwards, losses, backward, clipping, Adam). Prints the median seconds per
step of each and their ratio, and both precisions' losses on the first batch, before any step.

    python benchmarks/training/heal_step_precision.py --steps 20
"""

from __future__ import annotations

import argparse
import statistics
from dataclasses import replace

import torch
import sys as _sys
from pathlib import Path as _Path

_sys.path.insert(0, str(_Path(__file__).resolve().parents[1]))  # benchmarks/common.py
from common import add_heal_step_args, emit_json, heal_step_models, timed_heal_step

from rankcut.train.data import task_data
from rankcut.train.heal import Heal
from rankcut.train.loop import make_optimizer, step_losses


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_heal_step_args(parser, steps=20)
    parser.add_argument("--out", default=None, help="also write the JSON here")
    args = parser.parse_args()
    model, teacher = heal_step_models(args)
    configs = {p: replace(Heal(), precision=p) for p in ("fp32", "bf16")}
    data = task_data(model, "lm", configs["fp32"], None)
    model.eval()
    opt, _, params = make_optimizer(model, configs["fp32"])
    with torch.no_grad():  # the same batch, the same weights: how far apart the precisions' losses are
        first = {p: [round(float(v), 5) for v in step_losses(model, teacher, data, c, 0)] for p, c in configs.items()}
    times: dict[str, list[float]] = {p: [] for p in configs}
    for step in range(args.steps):
        precision = list(configs)[step % 2]
        seconds = timed_heal_step(model, teacher, data, configs[precision], step, opt, params)
        if step >= 2:
            times[precision].append(seconds)
    medians = {p: statistics.median(v) for p, v in times.items()}
    result = {"model": args.model, "keep": args.keep, "threads": args.threads,
              "tokens_per_step": configs["fp32"].batch_size * configs["fp32"].seqlen,
              "seconds_per_step": medians, "steps_each": {p: len(v) for p, v in times.items()},
              "fp32_over_bf16": medians["fp32"] / medians["bf16"],
              "first_batch_task_and_distill_loss": first}
    emit_json(result, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
