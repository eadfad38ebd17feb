"""The distillation fine-tune that SoftLMs and healing share: the task's batches, the losses
against the dense teacher, the optimizer, the learning-rate schedule and exact checkpoints.

Kept apart from the algorithms (as llm-compressor keeps calibration apart from its modifiers):
`rankcut.softrank` adds thresholds and a budget to this loop, `rankcut.heal` runs it at fixed
ranks on a model that is compressed already.

`config` is a `SoftRank` or a `Heal`: the functions read the fields the two share (steps,
batch_size, seqlen, lr, warmup, distillation weights, seed).

Training runs with dropout off and a data order fixed by (seed, step), so a run resumed from a
checkpoint ends exactly where an uninterrupted run with the same seed would.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ..core.errors import RankcutError
from ..core.layers import PivotLowRankLinear
from ..core.machine import cpu_multiplies_bf16
from ..core.record import record_of
from ..data.benchmarks import find_data_dir
from ..evaluate.glue import glue_model
from ..evaluate.tasks import run_task
from .data import GLUE_TASKS, LM_TASKS

log = logging.getLogger(__name__)


# "bf16": the forward passes (teacher's and student's) run their matmuls in bfloat16 under
# autocast; the parameters, the optimizer's state and the losses stay float32. On a CPU with
# AVX512-BF16 (or AMX) the matmuls run 2-3x faster, so a fixed time buys more steps.
PRECISIONS = ("fp32", "bf16")


# Positions per slice of the logit KL. A language model's logits are positions × vocabulary
# (512 × 49,152 floats = 100 MB for SmolLM2 at 4 × 128): taken whole, each of the KL's half-dozen
# passes allocated a fresh 100 MB tensor, and the KL cost ~1 s of a ~5 s healing step; in slices
# of 12 MB it took 0.1–0.6 s, the same value to float rounding.
KL_ROWS = 64


def distill_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher ‖ student) at a temperature, averaged over positions, scaled by T² as usual so
    its gradient keeps its size."""
    if student.shape[-1] == 1:  # regression head: match the teacher's prediction
        return F.mse_loss(student.float(), teacher.float())
    s, t = student.reshape(-1, student.shape[-1]), teacher.reshape(-1, teacher.shape[-1])
    total = torch.zeros((), device=s.device)
    # split, not indexing: its backward joins the slices' gradients once, where each index would
    # scatter its slice into a whole-size zero tensor
    for s_part, t_part in zip(s.split(KL_ROWS), t.split(KL_ROWS)):
        s_log = F.log_softmax(s_part.float() / temperature, -1)
        with torch.no_grad():  # the teacher's side is a target
            t_log = F.log_softmax(t_part.float() / temperature, -1)
        total = total + F.kl_div(s_log, t_log, log_target=True, reduction="sum")
    return total / s.shape[0] * temperature ** 2


def hidden_loss(student: tuple[torch.Tensor, ...] | None, teacher: tuple[torch.Tensor, ...] | None
                 ) -> torch.Tensor:
    """Mean over layers of ‖h_s − h_t‖² / ‖h_t‖²: every block is pulled back towards the dense
    block's output, a much denser signal than the logits alone for a heavily cut model."""
    if not student or not teacher:
        return torch.zeros(())
    losses = [((s.float() - t.float()) ** 2).mean() / (t.float() ** 2).mean().clamp(min=1e-12)
              for s, t in zip(student[1:], teacher[1:])]
    return torch.stack(losses).mean()


def check_run_settings(config: Any) -> None:
    """The settings every fine-tune shares, refused with the flag to fix before any work starts."""
    for name in ("steps", "batch_size", "seqlen", "checkpoint_every", "seed"):
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int):  # the Python API takes what it is given
            raise RankcutError(f"{name} = {value!r}: give a whole number (--{name.replace('_', '-')})")
    for name in ("lr", "task_weight", "distill", "hidden_distill", "distill_temperature"):
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RankcutError(f"{name} = {value!r}: give a number (--{name.replace('_', '-')})")
    if config.steps < 1:
        raise RankcutError("--steps must be at least 1")
    if config.batch_size < 1:
        raise RankcutError("--batch-size must be at least 1")
    if config.seqlen < 2:
        raise RankcutError("--seqlen must be at least 2 (next-token prediction needs a pair)")
    if not config.lr > 0:
        raise RankcutError(f"--lr {config.lr}: give a positive learning rate")
    if config.checkpoint_every < 1:
        raise RankcutError("--checkpoint-every must be at least 1")
    if config.precision not in PRECISIONS:
        raise RankcutError(f"--precision {config.precision!r}: use one of {', '.join(PRECISIONS)}")
    for flag, weight in (("--task-weight", config.task_weight), ("--distill", config.distill),
                         ("--hidden-distill", config.hidden_distill)):
        if not weight >= 0:  # a negative weight trains away from what it weighs
            raise RankcutError(f"{flag} {weight}: give a weight of 0 or more")
    if config.task_weight == 0 and config.distill == 0:
        raise RankcutError("--task-weight 0 with --distill 0 leaves nothing to train on; give either a weight")
    if not config.distill_temperature > 0:
        raise RankcutError(f"--distill-temperature {config.distill_temperature}: give a positive temperature")


def warn_if_emulated(model: nn.Module, config: Any) -> None:
    """bf16 pays only where the CPU multiplies bfloat16 in hardware: say so before a slow run."""
    if config.precision == "bf16" and next(model.parameters()).device.type == "cpu" and cpu_multiplies_bf16() is False:
        log.warning("--precision bf16 on a CPU without bfloat16 matrix instructions (no avx512_bf16 or amx_bf16 "
                    "in /proc/cpuinfo): bfloat16 is emulated here and each step runs slower than in fp32 (2.4x "
                    "slower measured on such a Xeon); --precision fp32 is the faster choice")


def forward_precision(model: nn.Module, config: Any) -> contextlib.AbstractContextManager:
    """The context the forward passes run in: autocast to bfloat16 for "bf16", else nothing."""
    if config.precision == "fp32":
        return contextlib.nullcontext()
    device = next(model.parameters()).device.type
    return torch.autocast(device_type=device, dtype=torch.bfloat16)


def lr_factor(config: Any, step: int) -> float:
    """Linear warm-up over the first `config.warmup` of the steps, then linear decay to zero."""
    warm = max(1, int(config.warmup * config.steps))
    return min((step + 1) / warm, max(0.0, (config.steps - step) / max(1, config.steps - warm)))


def schedule_lr_(opt: torch.optim.Optimizer, config: Any, step: int) -> None:
    """Set every group's learning rate for `step` from the rate it started with."""
    for g in opt.param_groups:
        g["lr"] = g.setdefault("initial_lr", g["lr"]) * lr_factor(config, step)


def step_losses(model: nn.Module, teacher: nn.Module, data: Any, config: Any, step: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """The task loss and the distillation (logits, plus every layer's hidden states when
    `config.hidden_distill` > 0) on the batch of `step`."""
    device = next(model.parameters()).device
    inputs = {k: v.to(device) for k, v in data.batch(step).items()}
    model_inputs = {k: v for k, v in inputs.items() if k != "labels"}
    hidden = config.hidden_distill > 0
    with forward_precision(model, config):
        with torch.no_grad():
            teacher_out = teacher(**model_inputs, output_hidden_states=hidden)
        out = model(**model_inputs, output_hidden_states=hidden)
    task_loss = data.task_loss(out, inputs)
    distill = distill_loss(out.logits, teacher_out.logits, config.distill_temperature)
    if hidden:
        distill = distill + config.hidden_distill * hidden_loss(out.hidden_states, teacher_out.hidden_states)
    return task_loss, distill


@contextlib.contextmanager
def training_layout(model: nn.Module) -> Iterator[None]:
    """Pivoted layers train with their tokens as columns (see PivotLowRankLinear), whatever
    layout `rankcut.speed.layouts` chose for inference, which comes back after. On SmolLM2's pivoted 50%
    cut, bf16 heal steps alternating in one run: 3.0 s with every layer so, 3.5 s with q, k, v
    as rows, 4.1 s with every layer as rows (the gather's backward is a scatter-add)."""
    pivots = [m for m in model.modules() if isinstance(m, PivotLowRankLinear)]
    before = [m.tokens_as_columns for m in pivots]
    for m in pivots:
        m.tokens_as_columns = True
    try:
        yield
    finally:
        for m, was in zip(pivots, before):
            m.tokens_as_columns = was


# --------------------------------------------------------------------------- optimizer and checkpoints


def make_optimizer(model: nn.Module, config: Any) -> tuple[torch.optim.Optimizer, list[nn.Parameter],
                                                            list[nn.Parameter]]:
    """Adam over everything but the input embeddings (half a small model; barely moves). SoftLMs'
    thresholds (parameters named `*.rho`) get a group of their own with their own learning rate,
    or (threshold_step "scaled") are stepped by `rankcut.softrank` outside the optimizer."""
    for p in model.parameters():
        p.requires_grad_(True)
    model.get_input_embeddings().weight.requires_grad_(False)
    thresholds = [p for n, p in model.named_parameters() if n.endswith(".rho")]
    others = [p for n, p in model.named_parameters() if p.requires_grad and not n.endswith(".rho")]
    groups = [{"params": others, "lr": config.lr}]
    if thresholds and config.threshold_step == "adam":
        groups.append({"params": thresholds, "lr": config.threshold_lr})
    # one fused kernel for the whole update: 0.03 s a step for SmolLM2's 80M trainable numbers on
    # two cores, against 0.10 s for the per-tensor loop (same update to float rounding)
    fused = all(p.device.type in ("cpu", "cuda") for g in groups for p in g["params"])
    return torch.optim.Adam(groups, fused=fused or None), thresholds, others


def trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def prepare(model: nn.Module, task: str, data_dir: Any = None, progress: bool = True) -> tuple[nn.Module, str]:
    """The model a task trains: an encoder becomes its classifier fine-tuned by the GLUE recipe
    (cached; the dense teacher and the starting point), a decoder stays as it is."""
    source = str(record_of(model).source or type(model).__name__)
    if task in GLUE_TASKS:
        tuned, _ = glue_model(model, task, find_data_dir(data_dir), progress=progress)
        return tuned, f"{source}-{task}"
    return model, source


def evaluate_task(model: nn.Module, task: str, data_dir: Any = None, limit: int | None = None,
                  seqlen: int = 1024, progress: bool = True) -> dict[str, Any]:
    """The held-out score for a task: GLUE dev metrics, or wikitext2 perplexity for `lm`."""

    result = run_task(model, "wikitext2" if task in LM_TASKS else task, data_dir=data_dir, limit=limit,
                      seqlen=seqlen, progress=progress)
    return result.to_dict()


def task_scorer(task: str, data_dir: Any = None, limit: int | None = None) -> Callable[[nn.Module], dict[str, Any]]:
    """`evaluate_task`'s metrics as a function of the model alone: what a run scores itself with
    as it goes (`heal(eval_every=...)`)."""
    return lambda model: evaluate_task(model, task, data_dir, limit, progress=False)["metrics"]
