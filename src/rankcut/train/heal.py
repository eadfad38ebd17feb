"""Heal a compressed model: a short distillation from its dense source, ranks held fixed.

A training-free cut chooses every layer's factors to match that layer's own outputs; the errors
still compound through the depth of the model, and nothing re-balances the norms and the
layers left dense around them. A few hundred steps of distillation from the dense model (its
logits and every block's hidden states) repair much of that without adding a parameter: the
ranks and the stored forms stay, only the values move. It is the loop SoftLMs' static baseline
runs (`rankcut.train.loop`), started from any compressed model instead of a fresh uniform cut, so
the best training-free cut and a short fine-tune compose.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from ..core.errors import RankcutError
from ..core.layers import balance_factors_
from ..core.record import record_of
from ..io.models import load_model
from .checkpoint import checkpoint_folder, load_checkpoint, save_checkpoint
from .data import GLUE_TASKS, LM_TASKS, task_data
from .loop import (
    check_run_settings,
    make_optimizer,
    prepare,
    schedule_lr_,
    step_losses,
    task_scorer,
    training_layout,
    warn_if_emulated,
)


@dataclass
class Heal:
    """One healing run. The defaults are the recipe that healed SmolLM2-135M at 50% kept best
    within 20 minutes on a 2-core CPU."""

    steps: int = 125
    batch_size: int = 4
    seqlen: int = 128  # language modelling: tokens per training sequence
    lr: float = 1e-4
    warmup: float = 0.05
    task_weight: float = 1.0
    distill: float = 1.0
    # T = 1 distils the distribution perplexity itself scores; on SmolLM2 at 50% it healed further than T = 2
    distill_temperature: float = 1.0
    hidden_distill: float = 1.0  # weight of matching every block's hidden states to the teacher's
    checkpoint_every: int = 50
    seed: int = 0
    precision: str = "fp32"  # "bf16": forward matmuls in bfloat16 (rankcut.train.loop.PRECISIONS)

    def __post_init__(self) -> None:
        check_run_settings(self)

    def describe(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class HealResult:
    steps: int
    seconds: float
    history: list[dict[str, Any]] = field(default_factory=list)
    train_seconds: float = 0.0  # the steps alone (this process's); `seconds` adds teacher, data and evaluations

    @property
    def curve(self) -> list[dict[str, Any]]:
        """The held-out scores taken during the run (`eval_every`), step by step."""
        return [{"step": h["step"], **h["eval"]} for h in self.history if "eval" in h]


def _frozen(model: nn.Module) -> nn.Module:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def load_teacher(student: nn.Module, task: str, teacher: str | nn.Module | None = None, data_dir: Any = None,
                 progress: bool = True) -> nn.Module:
    """The dense model to distil from: `teacher` if given, else the source the compressed model
    records (its manifest's `source_model`); for a GLUE task an encoder becomes its classifier
    fine-tuned by the GLUE recipe (cached), the model a compressed classifier was cut from."""

    if isinstance(teacher, nn.Module):
        return _frozen(teacher)
    name = teacher or record_of(student).source
    if not name:
        raise RankcutError("the compressed model records no source model: give the dense teacher (--teacher MODEL)")
    dense = load_model(name).to(next(student.parameters()).device)
    if task in GLUE_TASKS and type(dense).__name__ != type(student).__name__:
        dense, _ = prepare(dense, task, data_dir, progress=progress)
    if type(dense).__name__ != type(student).__name__ or dense.config.vocab_size != student.config.vocab_size:
        raise RankcutError(f"teacher {name} ({type(dense).__name__}) does not fit the compressed model "
                           f"({type(student).__name__}); give the dense model it was cut from (--teacher MODEL)")
    return _frozen(dense)


def heal(model: nn.Module, task: str, config: Heal, teacher: str | nn.Module | None = None,
         checkpoint: str | Path | None = None, resume: bool = False, data_dir: Any = None,
         progress: bool = True, stop_after: int | None = None, eval_every: int = 0,
         evaluate: Callable[[nn.Module], dict[str, Any]] | None = None) -> HealResult:
    """Fine-tune a compressed `model` in place towards its dense teacher on `task`.

    Every parameter but the input embeddings trains (factors, norms, biases, modules left
    dense); no module changes shape, so the size is the one the cut chose. `checkpoint`: a folder
    written every `checkpoint_every` steps; `resume=True` continues from it. `stop_after`: end
    early at that step (after checkpointing), as a kill would. `eval_every`: score the model with
    `evaluate` (a held-out metric; default the task's own, `rankcut.train.loop.task_scorer`) every so
    many steps and after the last. The scores go into the step's history entry, so a resumed run
    keeps the earlier ones; they show where more steps stop paying, which one final score cannot.
    Scoring changes no parameter and no random state, and its time is not in `train_seconds`.
    """
    if task not in LM_TASKS + GLUE_TASKS:
        raise RankcutError(f"--task {task!r}: choose one of {', '.join(LM_TASKS + GLUE_TASKS)}")
    if not record_of(model).modules:
        raise RankcutError("the model has no compressed modules: heal a model saved by `rankcut compress` "
                           "(or `rankcut.save`), not a dense one")
    if eval_every < 0:
        raise RankcutError(f"--eval-every {eval_every}: give a number of steps (0: score only at the end, if at all)")
    folder = checkpoint_folder(checkpoint, resume)  # before any work: a wrong --resume fails at once
    evaluate = evaluate or task_scorer(task, data_dir)
    warn_if_emulated(model, config)
    t_start = time.perf_counter()
    dense = load_teacher(model, task, teacher, data_dir, progress)
    data = task_data(model, task, config, data_dir)
    torch.manual_seed(config.seed)
    # a model stored in 16 bits (`compress --dtype`) trains in float32: bfloat16's 8-bit mantissa
    # rounds most of Adam's 1e-4 steps away; it is rounded back once, at the end
    stored_dtype = next(model.parameters()).dtype
    model.to(torch.float32)  # not .float(): transformers refuses that on a model loaded with a quantizer
    model.eval()  # dropout off: the run is a deterministic function of (seed, step)
    # factors saved unbalanced (by rankcut before they were stored balanced) would make Adam's
    # steps far too large on one side; the same map either way (a resume loads over it)
    balance_factors_(model)
    opt, _, params = make_optimizer(model, config)
    # the checkpoint must belong to this model: same source, settings and every parameter's shape
    shapes = ";".join(f"{n}:{tuple(p.shape)}" for n, p in model.named_parameters())
    fingerprint = {"source": str(record_of(model).source), "task": task,
                   "config": config.describe(), "shapes": hashlib.sha256(shapes.encode()).hexdigest()}
    step, history = 0, []
    if resume:
        step, history = load_checkpoint(folder, model, opt, fingerprint)
    bar = tqdm(total=config.steps, initial=step, desc=f"heal {task}", disable=not progress, unit="step")
    t_loop, eval_seconds = time.perf_counter(), 0.0
    with training_layout(model):
        while step < config.steps:
            if stop_after is not None and step >= stop_after:
                break
            schedule_lr_(opt, config, step)
            task_loss, distill = step_losses(model, dense, data, config, step)
            loss = config.task_weight * task_loss + config.distill * distill
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            history.append({"step": step, "loss": loss.item(), "task": task_loss.item(), "distill": distill.item()})
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.3f}", task=f"{task_loss.item():.3f}")
            if eval_every and (step % eval_every == 0 or step == config.steps):
                t_eval = time.perf_counter()
                # no graph for a score; the model is in eval mode throughout (dropout off), and the
                # pivoted layers' training layout computes the same map
                with torch.no_grad():
                    history[-1]["eval"] = dict(evaluate(model))
                eval_seconds += time.perf_counter() - t_eval
            if folder is not None and (step % config.checkpoint_every == 0 or step == config.steps):
                save_checkpoint(folder, model, opt, step, history, fingerprint)
    bar.close()
    train_seconds = time.perf_counter() - t_loop - eval_seconds
    model.eval()
    model.to(stored_dtype)
    model.get_input_embeddings().weight.requires_grad_(True)  # as loaded: nothing stays frozen
    if step == config.steps:  # recorded in rankcut.json when the model is saved
        record_of(model).healed = {
            "task": task, "settings": config.describe(), "steps": step,
            "teacher": teacher if isinstance(teacher, str) else record_of(model).source,
            "final_loss": history[-1] if history else None}
    return HealResult(step, time.perf_counter() - t_start, history, train_seconds)
