"""The logit KL taken whole against taken in slices of positions, in real healing steps.

SmolLM2-135M cut to 50% (plain SVD: the step's cost depends on the ranks, not on how the
factors were found), healed with `rankcut.heal`'s default settings; steps alternate between the
two ways of computing the KL, in one process, so the machine's drift hits both alike. Prints the
median seconds per whole step (forward of teacher and student, losses, backward, optimizer).

    python benchmarks/archive/heal_step_kl.py --steps 18
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch
import torch.nn.functional as F
import sys as _sys
from pathlib import Path as _Path

_sys.path.insert(0, str(_Path(__file__).resolve().parents[1]))  # benchmarks/common.py
from common import add_heal_step_args, heal_step_models, timed_heal_step

import rankcut.train.loop as distill
from rankcut.train.data import task_data
from rankcut.train.heal import Heal
from rankcut.train.loop import make_optimizer


def whole_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """The KL as it was computed before session 15: every pass over the whole logits tensor."""
    s = F.log_softmax(student.float() / temperature, -1).reshape(-1, student.shape[-1])
    t = F.log_softmax(teacher.float() / temperature, -1).reshape(-1, teacher.shape[-1])
    return F.kl_div(s, t, log_target=True, reduction="batchmean") * temperature ** 2


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_heal_step_args(parser, steps=18)
    args = parser.parse_args()
    model, teacher = heal_step_models(args)
    config = Heal()
    data = task_data(model, "lm", config, None)
    model.eval()
    opt, _, params = make_optimizer(model, config)
    ways = {"whole": whole_kl, "sliced": distill.distill_loss}
    times: dict[str, list[float]] = {name: [] for name in ways}
    for step in range(args.steps):
        name = list(ways)[step % 2]
        distill.distill_loss = ways[name]  # what step_losses calls
        seconds = timed_heal_step(model, teacher, data, config, step, opt, params)
        if step >= 2:
            times[name].append(seconds)
    medians = {name: statistics.median(v) for name, v in times.items()}
    print(json.dumps({"seconds_per_step": medians, "steps_each": {n: len(v) for n, v in times.items()},
                      "whole_over_sliced": medians["whole"] / medians["sliced"],
                      "kl_rows_per_slice": distill.KL_ROWS}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
