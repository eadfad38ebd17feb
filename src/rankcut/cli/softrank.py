"""`rankcut softrank`: learn per-layer ranks by soft-thresholding during a short fine-tune."""

from __future__ import annotations

import argparse

from ..calibration.sources import Calibration
from ..compress.rank_plot import plot_ranks_beside
from ..core.machine import resolve_device
from ..core.modules import count_params
from ..io.models import load_model
from ..io.saved import save
from ..train.loop import evaluate_task, prepare
from ..train.softrank import SoftRank, softrank
from .common import _check_checkpoint, _check_out, _emit, _temperature


def cmd_softrank(args: argparse.Namespace) -> None:
    _check_out(args.out, args.overwrite)
    _check_checkpoint(args)
    config = SoftRank(budget=args.budget, method=args.method, init=args.init, learn_ranks=not args.static,
                      fisher_examples=args.fisher_examples,
                      steps=args.steps, batch_size=args.batch_size, seqlen=args.seqlen, lr=args.lr,
                      threshold_lr=args.threshold_lr, distill=args.distill, hidden_distill=args.hidden_distill,
                      task_weight=args.task_weight, **_temperature(args),
                      penalty=args.penalty, project=args.project, shrink=not args.gate,
                      threshold_step=args.threshold_step, rank_phase=args.rank_phase,
                      checkpoint_every=args.checkpoint_every, seed=args.seed, precision=args.precision,
                      targets=args.targets, layers=args.layers,
                      calibration=Calibration(text=args.calib, samples=args.calib_samples,
                                              seqlen=args.calib_seqlen, draw=args.calib_draw))
    model, name = prepare(load_model(args.model).to(resolve_device(args.device)), args.task, args.data_dir,
                          progress=not args.json)
    dense_params = count_params(model)
    before = evaluate_task(model, args.task, args.data_dir, args.eval_limit, progress=False) if args.eval else None
    result = softrank(model, args.task, config, model_name=name, checkpoint=args.checkpoint, resume=args.resume,
                      data_dir=args.data_dir, progress=not args.json)
    after = evaluate_task(model, args.task, args.data_dir, args.eval_limit, progress=False) if args.eval else None
    save(model, args.out, overwrite=args.overwrite)
    plotted = plot_ranks_beside(model, args.out)
    ranks = [r for r in result.ranks.values() if r is not None] or [0]
    payload = {"model": args.model, "task": args.task, "out": args.out, "settings": config.describe(),
               "dense_params": dense_params, "params": result.params, "target_params": result.target_params,
               "budget_params": result.budget_params, "budget_error": result.budget_error,
               "rank_min": min(ranks), "rank_max": max(ranks), "ranks": result.ranks,
               "seconds": result.seconds, "train_seconds": result.train_seconds, "dense_eval": before, "eval": after,
               "final_loss": result.history[-1] if result.history else None}
    _emit(args, payload, lambda: print(
        f"{'learned' if config.learn_ranks else 'static'} ranks {min(ranks)}–{max(ranks)}; targeted parameters "
        f"{result.target_params:,} for a budget of {result.budget_params:,} ({result.budget_error:+.2%}); "
        f"{result.seconds:.0f} s; saved to {args.out} "
        + ("(ranks.png)" if plotted else "(no ranks.png: pip install 'rankcut[plot]' to draw one)")
        + (f"\ndense {before['metrics']} → {after['metrics']}" if before else "")))
