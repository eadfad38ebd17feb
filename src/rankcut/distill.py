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
import json
import logging
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .errors import RankcutError
from .fsutil import atomic_dir, check_output
from .layers import PivotLowRankLinear
from .machine import cpu_multiplies_bf16
from .models import check_fits_positions

log = logging.getLogger(__name__)

LM_TASKS = ("lm", "wikitext2")  # the same: train on the gensim extract, score on wikitext2 (DESIGN.md names it wikitext2)
GLUE_TASKS = ("sst2", "mrpc")
# "bf16": the forward passes (teacher's and student's) run their matmuls in bfloat16 under
# autocast; the parameters, the optimizer's state and the losses stay float32. On a CPU with
# AVX512-BF16 (or AMX) the matmuls run 2-3x faster, so a fixed time buys more steps.
PRECISIONS = ("fp32", "bf16")


# --------------------------------------------------------------------------- data


class LMData:
    """Next-token prediction on the gensim Wikipedia extract (calibration's text, not the eval set)."""

    def __init__(self, model: nn.Module, config: Any) -> None:
        from .evaluate.perplexity import tokenize_text
        from .evaluate.tasks import check_language_model
        from .texts import embedded_text

        check_language_model(model, "--task lm")
        check_fits_positions(model, config.seqlen, "--seqlen")
        ids = tokenize_text(model, embedded_text("gensim-wiki"))
        n = ids.numel() // config.seqlen
        if n < config.batch_size:
            raise RankcutError(f"the training text has {ids.numel()} tokens: too few for --batch-size "
                               f"{config.batch_size} × --seqlen {config.seqlen}")
        self.chunks = ids[: n * config.seqlen].view(n, config.seqlen)
        self.config = config

    def _order(self, epoch: int) -> torch.Tensor:
        return torch.randperm(self.chunks.shape[0], generator=torch.Generator().manual_seed(self.config.seed + epoch))

    def batch(self, step: int) -> dict[str, torch.Tensor]:
        """Sequences step·bs … step·bs + bs − 1 of an endless stream of seeded epoch shuffles."""
        n = self.chunks.shape[0]
        positions = range(step * self.config.batch_size, (step + 1) * self.config.batch_size)
        return {"input_ids": torch.stack([self.chunks[self._order(p // n)[p % n]] for p in positions])}

    def task_loss(self, out: Any, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = out.logits[:, :-1].float()
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), inputs["input_ids"][:, 1:].reshape(-1))


class GlueData:
    """A GLUE task's train split, bucketed batches as the fine-tune recipe makes them."""

    def __init__(self, model: nn.Module, task: str, config: Any, data_dir: Any = None) -> None:
        from .evaluate.data import find_data_dir, sample
        from .evaluate.glue import GLUE, _batches, read_glue
        from .models import get_tokenizer

        spec = GLUE[task]
        train = sample(read_glue(find_data_dir(data_dir), task, "train"), spec.train_examples, seed=config.seed)
        self.batches = _batches(get_tokenizer(model), train, config.batch_size, 128, True, config.seed)
        self.regression = spec.num_labels == 1

    def batch(self, step: int) -> dict[str, torch.Tensor]:
        inputs, labels = self.batches[step % len(self.batches)]
        return {**inputs, "labels": labels.float() if self.regression else labels.long()}

    def task_loss(self, out: Any, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = out.logits.float()  # bfloat16 under --precision bf16: the loss is taken in float32
        if self.regression:
            return F.mse_loss(logits[:, 0], inputs["labels"])
        return F.cross_entropy(logits, inputs["labels"])


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
                    "slower on such a Xeon, benchmarks/RESULTS.md); --precision fp32 is the faster choice")


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
    inputs = data.batch(step)
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
    layout `rankcut.fast` chose for inference, which comes back after. On SmolLM2's pivoted 50%
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


CHECKPOINT_FILES = frozenset({"state.safetensors", "progress.json"})


def save_checkpoint(folder: Path, model: nn.Module, opt: torch.optim.Optimizer, step: int,
                    history: list[dict[str, float]], fingerprint: dict[str, Any],
                    cut_ranks: dict[str, int] | None = None) -> None:
    from safetensors.torch import save_file

    params = trainable(model)
    names = {id(p): n for n, p in params.items()}
    state = opt.state_dict()
    order = [names[id(p)] for g in opt.param_groups for p in g["params"]]
    tensors = {f"param.{n}": p.detach().contiguous() for n, p in params.items()}
    for idx, st in state["state"].items():
        for key, value in st.items():
            tensors[f"opt.{order[idx]}.{key}"] = value.detach().contiguous()
    groups = [{k: v for k, v in g.items() if k != "params"} for g in state["param_groups"]]
    with atomic_dir(folder, replaceable=CHECKPOINT_FILES) as tmp:
        save_file(tensors, str(tmp / "state.safetensors"))
        (tmp / "progress.json").write_text(json.dumps({"step": step, "history": history, "groups": groups,
                                                       "fingerprint": fingerprint, "cut_ranks": cut_ranks},
                                                      indent=1))


def checkpoint_folder(checkpoint: str | Path | None, resume: bool) -> Path | None:
    """Where a run checkpoints, checked against `resume` before any work: resuming needs a
    checkpoint there, and a fresh run must not silently overwrite one."""
    folder = Path(checkpoint) if checkpoint else None
    found = folder is not None and (folder / "progress.json").is_file()
    if resume and not found:
        raise RankcutError(f"--resume: no checkpoint in {folder}; run without --resume to start")
    if not resume and found:
        raise RankcutError(f"{folder} holds a checkpoint already: pass --resume to continue it, or delete it")
    if folder is not None:
        check_output(folder, replaceable=CHECKPOINT_FILES)
    return folder


def read_progress(folder: Path) -> dict[str, Any]:
    try:
        return json.loads((folder / "progress.json").read_text())
    except (OSError, ValueError) as exc:
        raise RankcutError(f"checkpoint {folder} is unreadable ({exc}); delete it to start over") from None


def load_checkpoint(folder: Path, model: nn.Module, opt: torch.optim.Optimizer, fingerprint: dict[str, Any]
                    ) -> tuple[int, list[dict[str, float]]]:
    from safetensors.torch import load_file

    try:
        progress = json.loads((folder / "progress.json").read_text())
        tensors = load_file(str(folder / "state.safetensors"))
    except (OSError, ValueError) as exc:
        raise RankcutError(f"checkpoint {folder} is unreadable ({exc}); delete it to start over") from None
    if progress["fingerprint"] != fingerprint:
        raise RankcutError(f"checkpoint {folder} belongs to a different run (model, task or settings "
                           "differ); delete it or give another --checkpoint folder")
    params = trainable(model)
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(tensors[f"param.{n}"])
    names = {id(p): n for n, p in params.items()}
    order = [names[id(p)] for g in opt.param_groups for p in g["params"]]
    state: dict[int, dict[str, torch.Tensor]] = {}
    for idx, name in enumerate(order):
        entry = {k.rsplit(".", 1)[1]: v for k, v in tensors.items() if k.startswith(f"opt.{name}.")
                 and k.count(".") == f"opt.{name}.".count(".")}
        if entry:
            state[idx] = entry
    groups, first = [], 0
    for saved, live in zip(progress["groups"], opt.param_groups):  # indices run group by group
        groups.append({**saved, "params": list(range(first, first + len(live["params"])))})
        first += len(live["params"])
    opt.load_state_dict({"state": state, "param_groups": groups})
    return int(progress["step"]), list(progress["history"])


# --------------------------------------------------------------------------- tasks


def task_data(model: nn.Module, task: str, config: Any, data_dir: Any) -> Any:
    if task in LM_TASKS:
        return LMData(model, config)
    if task in GLUE_TASKS:
        from .evaluate.glue import is_classifier

        if not is_classifier(model):
            raise RankcutError(f"--task {task} needs a sequence classifier; give the encoder's fine-tuned "
                               "classifier (rankcut.softrank does this for an encoder name)")
        return GlueData(model, task, config, data_dir)
    raise RankcutError(f"--task {task!r}: choose one of {', '.join(LM_TASKS + GLUE_TASKS)}")


def prepare(model: nn.Module, task: str, data_dir: Any = None, progress: bool = True) -> tuple[nn.Module, str]:
    """The model a task trains: an encoder becomes its classifier fine-tuned by the GLUE recipe
    (cached; the dense teacher and the starting point), a decoder stays as it is."""
    source = str(getattr(model, "rankcut_source", None) or type(model).__name__)
    if task in GLUE_TASKS:
        from .evaluate.data import find_data_dir
        from .evaluate.glue import glue_model

        tuned, _ = glue_model(model, task, find_data_dir(data_dir), progress=progress)
        return tuned, f"{source}-{task}"
    return model, source


def evaluate_task(model: nn.Module, task: str, data_dir: Any = None, limit: int | None = None,
                  seqlen: int = 1024, progress: bool = True) -> dict[str, Any]:
    """The held-out score for a task: GLUE dev metrics, or wikitext2 perplexity for `lm`."""
    from .evaluate import run_task

    result = run_task(model, "wikitext2" if task in LM_TASKS else task, data_dir=data_dir, limit=limit,
                      seqlen=seqlen, progress=progress)
    return result.to_dict()


def task_scorer(task: str, data_dir: Any = None, limit: int | None = None) -> Callable[[nn.Module], dict[str, Any]]:
    """`evaluate_task`'s metrics as a function of the model alone: what a run scores itself with
    as it goes (`heal(eval_every=...)`)."""
    return lambda model: evaluate_task(model, task, data_dir, limit, progress=False)["metrics"]
