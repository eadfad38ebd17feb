"""`rankcut heal`: distil a saved compressed model towards the dense model it was cut from."""

from __future__ import annotations

import argparse

from ..core.errors import RankcutError
from ..core.machine import resolve_device
from ..core.record import record_of
from ..io.saved import load, save
from ..train.heal import Heal, heal
from ..train.loop import evaluate_task, task_scorer
from .common import _check_checkpoint, _check_out, _emit, _temperature


def cmd_heal(args: argparse.Namespace) -> None:
    _check_out(args.out, args.overwrite)
    _check_checkpoint(args)
    config = Heal(steps=args.steps, batch_size=args.batch_size, seqlen=args.seqlen, lr=args.lr,
                  distill=args.distill, hidden_distill=args.hidden_distill, task_weight=args.task_weight,
                  **_temperature(args), checkpoint_every=args.checkpoint_every,
                  seed=args.seed, precision=args.precision)
    if args.eval_every and not args.eval:
        raise RankcutError("--eval-every scores the model during the run: add --eval (and --eval-limit to bound it)")
    model = load(args.model).to(resolve_device(args.device))
    before = evaluate_task(model, args.task, args.data_dir, args.eval_limit, progress=False) if args.eval else None
    result = heal(model, args.task, config, teacher=args.teacher, checkpoint=args.checkpoint, resume=args.resume,
                  data_dir=args.data_dir, progress=not args.json, eval_every=args.eval_every,
                  evaluate=task_scorer(args.task, args.data_dir, args.eval_limit))
    after = evaluate_task(model, args.task, args.data_dir, args.eval_limit, progress=False) if args.eval else None
    curve = result.curve
    save(model, args.out, overwrite=args.overwrite)
    payload = {"model": args.model, "task": args.task, "out": args.out, "settings": config.describe(),
               "teacher": args.teacher or record_of(model).source, "steps": result.steps,
               "seconds": result.seconds, "train_seconds": result.train_seconds, "eval_before": before, "eval": after,
               "final_loss": result.history[-1] if result.history else None, "curve": curve}
    _emit(args, payload, lambda: print(
        f"healed {result.steps} steps in {result.train_seconds:.0f} s ({result.seconds:.0f} s with the teacher, "
        f"data and scoring); saved to {args.out}"
        + (f"\nbefore {before['metrics']} → after {after['metrics']}" if before else "")
        + "".join(f"\n  step {c['step']}: " + ", ".join(f"{k} {v:.4g}" for k, v in c.items()
                                                      if k != "step" and isinstance(v, float)) for c in curve)))
