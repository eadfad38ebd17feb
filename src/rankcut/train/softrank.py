"""SoftLMs (Bhatnagar et al., 2024): learn every layer's rank during a short fine-tune.

Each target becomes a `SoftThresholdLinear` started from the method's (optionally whitened)
full-rank factors. A learnable threshold per layer soft-thresholds its singular values; the
loss is the task loss + distillation from the dense teacher + a penalty that pulls the
differentiable parameter count (Σ soft rank × (m + n)) to the budget. After the first
`rank_phase` of the steps each layer is cut to the directions that survive (the global cut
trimmed to meet the budget), and the remaining steps fine-tune the cut model at those ranks:
a cut made at the very end would leave nothing to heal what it removed.

With `learn_ranks=False` the same loop fine-tunes a static cut (uniform ranks, or the method's
budget allocation) with the same steps and data: the like-for-like baseline. The data, losses,
optimizer and checkpoints are `rankcut.train.loop`'s, shared with `rankcut.heal`.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..calibration.sources import Calibration
from ..compress.factor_cache import FactorCache
from ..core.errors import RankcutError
from ..core.layers import FACTORED, SoftThresholdLinear, balanced
from ..core.module_records import module_record
from ..core.modules import count_params, swap_module
from ..core.ranks import allocate_targets, budget_cap, factor_params, keep_rank
from ..core.record import record_of
from ..core.targets import Target, select_targets
from .checkpoint import checkpoint_folder, load_checkpoint, read_progress, save_checkpoint
from .data import task_data
from .loop import check_run_settings, lr_factor, make_optimizer, schedule_lr_, step_losses, warn_if_emulated

PROJECTIONS = ("proportional", "shared", "off")
INITS = ("uniform", "budget", "fisher")
__all__ = ["GLUE_TASKS", "LM_TASKS", "GlueData", "LMData", "SoftRank", "SoftRankResult", "build_student",
           "evaluate_task", "hard_cut", "prepare", "softrank"]


@dataclass
class SoftRank:
    """One SoftLMs run. `budget` is the fraction of the targeted parameters to keep."""

    budget: float = 0.5
    method: str = "whiten"  # whose factors and singular values the layers start from
    # starting ranks: "uniform"; "budget" (the method's global allocation); "fisher" (allocated by
    # the task loss's Fisher information of every direction, from `fisher_examples` training examples)
    init: str = "uniform"
    fisher_examples: int = 256
    learn_ranks: bool = True  # False: fine-tune a static cut instead (the baseline)
    steps: int = 200
    batch_size: int = 8
    seqlen: int = 128  # language modelling: tokens per training sequence
    lr: float = 5e-5
    threshold_lr: float = 2e-3
    warmup: float = 0.05
    task_weight: float = 1.0
    distill: float = 1.0
    distill_temperature: float = 2.0
    hidden_distill: float = 1.0  # weight of matching every layer's hidden states to the teacher's
    penalty: float = 10.0
    temperature: float = 0.01  # of the soft rank's sigmoid, relative to each layer's top singular value
    headroom: float = 2.0  # a soft layer can grow to headroom × its starting rank
    # after each step, raise thresholds until the hard count is within budget: "proportional" cuts
    # every layer's live directions by the same fraction, "shared" raises every relative threshold
    # by the same amount, "off" leaves the budget to the penalty alone
    project: str = "proportional"
    rank_phase: float = 0.5  # fraction of the steps that learn ranks; the rest heal the hard cut
    shrink: bool = True  # SoftLMs' soft threshold max(s − τ, 0); False: a gate that keeps s (see layers)
    # "scaled": every threshold steps by its gradient over the largest threshold gradient, so the
    # layers' relative pull survives; "adam": per-threshold Adam, which normalizes each gradient
    # away and moves every threshold at about the same rate whatever the pull
    threshold_step: str = "scaled"
    checkpoint_every: int = 50
    seed: int = 0
    precision: str = "fp32"  # "bf16": forward matmuls in bfloat16 (rankcut.train.loop.PRECISIONS)
    targets: Any = "all-linear"
    layers: Any = None
    calibration: Calibration | None = None

    def __post_init__(self) -> None:
        if not 0.0 < self.budget < 1.0:
            raise RankcutError(f"--budget {self.budget}: give the fraction of targeted parameters to keep, in (0, 1)")
        if self.init not in INITS:
            raise RankcutError(f"init {self.init!r}: use one of {', '.join(INITS)}")
        if self.fisher_examples < 1:
            raise RankcutError("--fisher-examples must be at least 1")
        check_run_settings(self)
        if self.threshold_step not in ("scaled", "adam"):
            raise RankcutError(f"threshold_step {self.threshold_step!r}: use 'scaled' or 'adam'")
        if self.project not in PROJECTIONS:
            raise RankcutError(f"project {self.project!r}: use one of {', '.join(PROJECTIONS)}")
        if not 0.0 < self.rank_phase <= 1.0:
            raise RankcutError(f"--rank-phase {self.rank_phase}: give the fraction of steps that learn ranks, in (0, 1]")

    def describe(self) -> dict[str, Any]:
        d = asdict(self)
        d["calibration"] = self.calibration.describe() if self.calibration is not None else None
        d["targets"], d["layers"] = str(self.targets), None if self.layers is None else str(self.layers)
        return d


@dataclass
class SoftRankResult:
    ranks: dict[str, int]
    target_params: int  # the targeted modules' parameters after the cut
    budget_params: int
    dense_target_params: int
    params: int  # the whole model's
    seconds: float
    history: list[dict[str, float]] = field(default_factory=list)
    # the fine-tuning steps alone (this process's, after a resume): what a "minutes of
    # fine-tuning" budget counts; `seconds` adds the teacher, calibration and the starting cut
    train_seconds: float = 0.0

    @property
    def budget_error(self) -> float:
        return self.target_params / self.budget_params - 1.0


# --------------------------------------------------------------------------- the student


class _GatedDirections(nn.Module):
    """A target at full rank from the method's factors, each direction times a gate at 1: the
    gate's gradient is the loss's first-order response to scaling that direction, so its mean
    square over examples (the gate's Fisher) estimates twice the loss increase of dropping it."""

    def __init__(self, out_factor: torch.Tensor, in_factor: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.out_factor, self.in_factor = out_factor.detach(), in_factor.detach()
        self.bias = None if bias is None else bias.detach()
        self.gate = nn.Parameter(torch.ones(in_factor.shape[0], dtype=in_factor.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.in_factor) * self.gate, self.out_factor, self.bias)


def direction_fisher(model: nn.Module, targets: list[Target], cache: Any, data: Any, examples: int,
                     progress: bool = True) -> dict[str, torch.Tensor]:
    """Each target's directions' Fisher information under the task loss, one example at a time
    (a batch's mean gradient would cancel the examples' disagreements), in the factors' order.
    Unlike the method's own singular values, which measure how much of a layer's output a
    direction carries, this measures what the task loses without it."""
    originals = {t.name: t.module for t in targets}
    gates: dict[str, _GatedDirections] = {}
    sums: dict[str, torch.Tensor] = {}
    wanted_grad = {p: p.requires_grad for p in model.parameters()}
    for p in wanted_grad:
        p.requires_grad_(False)  # only the gates need gradients
    was_training = model.training
    model.eval()
    try:
        for t in targets:
            out_f, in_f = cache.factors[t.name]
            gates[t.name] = _GatedDirections(out_f, in_f, getattr(t.module, "bias", None))
            swap_module(model, t.name, gates[t.name])
            sums[t.name] = torch.zeros(in_f.shape[0], dtype=torch.float64)
        params = [g.gate for g in gates.values()]
        seen, step = 0, 0
        bar = tqdm(total=examples, desc="fisher of directions", disable=not progress, unit="example")
        while seen < examples:
            inputs = data.batch(step)
            step += 1
            for i in range(next(iter(inputs.values())).shape[0]):
                if seen >= examples:
                    break
                one = {k: v[i:i + 1] for k, v in inputs.items()}
                loss = data.task_loss(model(**{k: v for k, v in one.items() if k != "labels"}), one)
                for name, g in zip(gates, torch.autograd.grad(loss, params)):
                    sums[name] += g.double().square()
                seen += 1
                bar.update()
        bar.close()
    finally:
        for name, module in originals.items():
            swap_module(model, name, module)
        for p, wanted in wanted_grad.items():
            p.requires_grad_(wanted)
        model.train(was_training)
    return {name: total / examples for name, total in sums.items()}


def _start_ranks(targets: list[Target], cache: Any, config: SoftRank,
                 fisher: dict[str, torch.Tensor] | None = None) -> dict[str, int]:
    budget = int(config.budget * sum(t.params for t in targets))
    if config.init == "fisher":
        if fisher is None:
            raise RankcutError("init 'fisher' needs the task's training data to measure the directions on")
        # a layer keeps its leading directions (best for its output), but how many is set by what
        # its directions are worth to the task: their Fisher values, most valuable first
        return allocate_targets(targets, {n: f.sort(descending=True).values for n, f in fisher.items()}, budget)
    if config.init == "budget":
        if not cache.importance:
            raise RankcutError(f"init 'budget' needs the method's direction worths; {config.method} has none")
        return allocate_targets(targets, cache.importance, budget)
    return {t.name: max(1, keep_rank(t.out_features, t.in_features, config.budget)) for t in targets}


def _singular_values(cache: Any, name: str) -> torch.Tensor:
    """Each direction's size in the method's metric (√importance), or its norm in weight space."""
    out_f, in_f = cache.factors[name]
    importance = cache.importance.get(name)
    if importance is not None and importance.numel() >= in_f.shape[0]:
        return importance[: in_f.shape[0]].clamp(min=0).sqrt().to(out_f.dtype)
    return out_f.norm(dim=0) * in_f.norm(dim=1)


def build_student(model: nn.Module, model_name: str, config: SoftRank, progress: bool = True,
                  data: Any = None) -> tuple[dict[str, nn.Module], list[Target], dict[str, int]]:
    """Swap every target for a soft-threshold layer (or, for the baseline, a static cut).
    `data` (the task's batches) is read only by init "fisher"."""

    targets = select_targets(model, config.targets, config.layers)
    cache = FactorCache(model, model_name, config.method, calibration=config.calibration, progress=progress)
    fisher = None
    if config.init == "fisher" and data is not None:
        fisher = direction_fisher(model, targets, cache, data, config.fisher_examples, progress)
    start = _start_ranks(targets, cache, config, fisher)
    layers: dict[str, nn.Module] = {}
    for t in targets:
        bias = getattr(t.module, "bias", None)
        bias = None if bias is None else bias.detach().clone()
        r = start[t.name]
        if config.init != "uniform" and r >= budget_cap(t.out_features, t.in_features):
            layers[t.name] = t.module  # the budget's allocation keeps it dense: exact, and not learned
            continue
        if not config.learn_ranks:
            layers[t.name] = cache.layer(t.name, r, bias)
        else:
            out_f, in_f = cache.factors[t.name]
            s = _singular_values(cache, t.name)
            r0 = min(s.numel(), max(r + 1, math.ceil(config.headroom * r)))
            s = s[:r0].clamp(min=1e-12)
            out_f, in_f = out_f[:, :r0], in_f[:r0]
            # each direction's weight-space size split evenly between its two factor vectors (as
            # every stored factor is), so both sides take Adam steps of the same relative size:
            # out_i·s_i·in_i = out_f_i·in_f_i
            out_f, in_f = balanced(out_f, in_f / s[:, None])
            tau = float((s[r - 1] + s[r]) / 2) if r < r0 else 0.0
            layers[t.name] = SoftThresholdLinear(out_f, in_f, s, tau, bias, config.temperature, config.shrink)
        swap_module(model, t.name, layers[t.name])
    return layers, targets, start


def soft_params(layers: dict[str, nn.Module], targets: list[Target]) -> torch.Tensor:
    """The differentiable parameter count of the targeted modules."""
    total = torch.zeros(())
    for t in targets:
        layer = layers[t.name]
        if isinstance(layer, SoftThresholdLinear):
            # the hard count's value with the soft count's gradient: the penalty pulls the number
            # the final cut will have, not the sigmoid's blur of it
            soft = layer.soft_rank()
            total = total + (layer.hard_rank() + soft - soft.detach()) * (t.out_features + t.in_features)
        else:
            total = total + module_params(t, layer)
    return total


@torch.no_grad()
def project_to_budget(layers: dict[str, nn.Module], targets: list[Target], budget_params: int,
                      mode: str = "proportional") -> float:
    """Raise thresholds, the least that brings the hard count within the budget, so the final
    cut has nothing live to trim. Returns how far (δ in relative threshold, or the fraction cut).

    "shared": every layer's relative threshold ρ rises by the same δ. Simple, but not neutral:
    a layer with a flat spectrum loses many directions per δ, a steep one few, so the shift
    itself reallocates ranks by spectrum shape (measured worse than proportional).
    "proportional": every layer loses the same fraction of its live directions (its smallest),
    so the allocation moves only where the learned thresholds moved it."""
    soft = [t for t in targets if isinstance(layers[t.name], SoftThresholdLinear)]
    fixed = sum(module_params(t, layers[t.name])
                for t in targets if not isinstance(layers[t.name], SoftThresholdLinear))
    if not soft or hard_params(layers, targets) <= budget_params:
        return 0.0
    if mode == "shared":
        return _shared_shift(layers, soft, fixed, budget_params)
    alive = {t.name: layers[t.name].hard_rank() for t in soft}
    cost = {t.name: t.out_features + t.in_features for t in soft}

    def ranks_at(fraction: float) -> dict[str, int]:
        return {n: max(1, k - math.ceil(fraction * k - 1e-12)) for n, k in alive.items()}

    def spent(fraction: float) -> int:
        return fixed + sum(r * cost[n] for n, r in ranks_at(fraction).items())

    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if spent(mid) <= budget_params else (mid, hi)
    for name, rank in ranks_at(hi).items():
        layer = layers[name]
        if rank < alive[name]:
            ordered = torch.sort(layer.s, descending=True).values
            tau = (ordered[rank - 1] + ordered[rank]) / 2
            layer.rho.copy_(tau / layer.scale)
    return hi


def _shared_shift(layers: dict[str, nn.Module], soft: list[Target], fixed: int, budget_params: int) -> float:
    margins, costs = [], []
    for t in soft:
        layer = layers[t.name]
        m = ((layer.s - layer.tau) / layer.scale).flatten()
        margins.append(m)
        costs.append(torch.full_like(m, float(t.out_features + t.in_features)))
    m, c = torch.cat(margins), torch.cat(costs)
    order = torch.argsort(m, descending=True)
    within = torch.nonzero(fixed + torch.cumsum(c[order], 0) > budget_params)
    delta = float(m[order[int(within[0])]]) if within.numel() else 0.0  # the first margin that does not fit
    for t in soft:
        layers[t.name].rho.add_(max(delta, 0.0) + 1e-7)
    return delta


def _rank(layer: nn.Module) -> int | None:
    """A factored layer's rank; None for a target the budget left dense."""
    return layer.rank if isinstance(layer, (*FACTORED, SoftThresholdLinear)) else None


def module_params(target: Target, layer: nn.Module) -> int:
    """Parameters a target holds now: its factors, or the dense matrix when left dense."""
    rank = _rank(layer)
    return target.params if rank is None else factor_params(target.out_features, target.in_features, rank)


def hard_params(layers: dict[str, nn.Module], targets: list[Target]) -> int:
    return sum(module_params(t, layers[t.name]) for t in targets)


@torch.no_grad()
def hard_cut(model: nn.Module, layers: dict[str, nn.Module], targets: list[Target], budget_params: int
             ) -> dict[str, int]:
    """Cut every soft layer to its surviving directions, trimmed or topped up (by margin over
    the threshold, relative to the layer's scale) so the targeted total lands on the budget.
    A layer whose cut moved past its threshold is soft-thresholded at the cut instead (its
    first dropped singular value), so the kept values shrink continuously to zero there."""
    soft = {t.name: t for t in targets if isinstance(layers[t.name], SoftThresholdLinear)}
    fixed = sum(module_params(t, layers[t.name])
                for t in targets if t.name not in soft)
    candidates = []
    for name, t in soft.items():
        layer = layers[name]
        margins = ((layer.s - layer.tau) / layer.scale).tolist()
        candidates += [(m, name, i) for i, m in enumerate(margins)]
    candidates.sort(key=lambda c: -c[0])
    kept: dict[str, list[int]] = {name: [] for name in soft}
    used = fixed
    for _, name, i in candidates:
        cost = soft[name].out_features + soft[name].in_features
        if used + cost > budget_params:
            continue
        kept[name].append(i)
        used += cost
    ranks = {}
    for name, t in soft.items():
        layer = layers[name]
        idx = torch.tensor(sorted(kept[name]) or [int(layer.s.argmax())], dtype=torch.long)
        dropped = torch.ones(layer.s.numel(), dtype=torch.bool)
        dropped[idx] = False
        natural = set(torch.nonzero(layer.s > layer.tau).flatten().tolist()) == set(idx.tolist())
        tau = float(layer.tau) if natural or not dropped.any() else float(layer.s[dropped].max())
        low = layer.to_low_rank(idx, tau)
        swap_module(model, name, low)
        layers[name] = low
        ranks[name] = low.rank
    for t in targets:
        ranks.setdefault(t.name, _rank(layers[t.name]))
    return ranks


@torch.no_grad()
def cut_to_ranks(model: nn.Module, layers: dict[str, nn.Module], targets: list[Target], ranks: dict[str, int]
                 ) -> dict[str, int]:
    """The hard cut's structure at known ranks (its values are about to be loaded over): a resume
    from a checkpoint written after the cut."""
    for t in targets:
        layer = layers[t.name]
        if isinstance(layer, SoftThresholdLinear):
            keep = torch.argsort(layer.s, descending=True)[: ranks[t.name]]
            low = layer.to_low_rank(keep, 0.0)
            swap_module(model, t.name, low)
            layers[t.name] = low
    return {t.name: _rank(layers[t.name]) for t in targets}


@torch.no_grad()
def _threshold_step(thresholds: list[nn.Parameter], lr: float) -> None:
    """Gradient descent on the thresholds, the gradients scaled by the largest of them: the step
    size is set by `lr`, the layers' relative pull by the loss. Stateless, so resuming is exact."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in thresholds]
    top = float(torch.stack([g.abs() for g in grads]).max())
    for p, g in zip(thresholds, grads):
        if top > 0:
            p.sub_(lr * g / top)
        p.grad = None


# --------------------------------------------------------------------------- the run


def softrank(model: nn.Module, task: str, config: SoftRank, model_name: str | None = None,
             checkpoint: str | Path | None = None, resume: bool = False, data_dir: Any = None,
             progress: bool = True, stop_after: int | None = None) -> SoftRankResult:
    """Learn per-layer ranks under the budget on `task`, then cut hard; `model` is changed in place.

    `checkpoint`: a folder written every `checkpoint_every` steps; `resume=True` continues from
    it. `stop_after`: end the loop early at that step (after checkpointing), as a kill would.
    """
    t_start = time.perf_counter()
    warn_if_emulated(model, config)
    model_name = model_name or str(record_of(model).source or type(model).__name__)
    data = task_data(model, task, config, data_dir)
    torch.manual_seed(config.seed)
    teacher = copy.deepcopy(model).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    layers, targets, start = build_student(model, model_name, config, progress, data)
    dense_targets = sum(t.params for t in targets)
    budget_params = int(config.budget * dense_targets)
    model.eval()  # dropout off: the run is a deterministic function of (seed, step)
    opt, thresholds, others = make_optimizer(model, config)
    # ranks are learned for the first rank_phase of the steps; then the cut is made and the
    # remaining steps heal the cut model at fixed ranks (as the static baseline heals all along)
    cut_step = max(1, round(config.rank_phase * config.steps)) if thresholds else None
    fingerprint = {"model": model_name, "task": task, "config": config.describe()}
    step, history, ranks = 0, [], None
    folder = checkpoint_folder(checkpoint, resume)
    if resume:
        cut = read_progress(folder).get("cut_ranks")
        if cut is not None:  # the checkpoint is past the cut: make the same cut before loading into it
            ranks = cut_to_ranks(model, layers, targets, cut)
            opt, thresholds, others = make_optimizer(model, config)
        step, history = load_checkpoint(folder, model, opt, fingerprint)
    bar = tqdm(total=config.steps, initial=step, desc=f"softrank {task}", disable=not progress, unit="step")
    t_loop = time.perf_counter()
    while step < config.steps:
        if stop_after is not None and step >= stop_after:
            break
        schedule_lr_(opt, config, step)
        task_loss, distill = step_losses(model, teacher, data, config, step)
        estimate = soft_params(layers, targets)
        penalty = ((estimate - budget_params) / budget_params) ** 2 if thresholds else torch.zeros(())
        loss = config.task_weight * task_loss + config.distill * distill + config.penalty * penalty
        loss.backward()
        torch.nn.utils.clip_grad_norm_(others, 1.0)
        if thresholds and config.threshold_step == "scaled":
            _threshold_step(thresholds, config.threshold_lr * lr_factor(config, step))
        opt.step()
        opt.zero_grad(set_to_none=True)
        if thresholds and config.project != "off":
            project_to_budget(layers, targets, budget_params, config.project)
        step += 1
        hard = hard_params(layers, targets)
        history.append({"step": step, "loss": loss.item(), "task": task_loss.item(), "distill": distill.item(),
                        "soft_params": estimate.item(), "params": hard})
        bar.update()
        bar.set_postfix(loss=f"{loss.item():.3f}", params=f"{hard / 1e6:.2f}M", budget=f"{budget_params / 1e6:.2f}M")
        if step == cut_step and ranks is None:
            ranks = hard_cut(model, layers, targets, budget_params)
            opt, thresholds, others = make_optimizer(model, config)
        if folder is not None and (step % config.checkpoint_every == 0 or step == config.steps):
            save_checkpoint(folder, model, opt, step, history, fingerprint, ranks)
    bar.close()
    train_seconds = time.perf_counter() - t_loop
    for p in model.parameters():
        p.requires_grad_(False)
    if step < config.steps:  # stopped early (tests): leave the soft layers in place
        return SoftRankResult({}, hard_params(layers, targets), budget_params, dense_targets, count_params(model),
                              time.perf_counter() - t_start, history, train_seconds)
    if ranks is None:
        ranks = hard_cut(model, layers, targets, budget_params)
    _record(model, targets, layers, ranks, config, start, budget_params, task)
    for p in model.parameters():
        p.requires_grad_(True)
    return SoftRankResult(ranks, hard_params(layers, targets), budget_params, dense_targets, count_params(model),
                          time.perf_counter() - t_start, history, train_seconds)


def _record(model: nn.Module, targets: list[Target], layers: dict[str, nn.Module], ranks: dict[str, int],
            config: SoftRank, start: dict[str, int], budget_params: int, task: str) -> None:
    """What the manifest keeps: each module's rank as for any compressed model, and the run."""
    state = record_of(model)
    method = {"method": "softrank" if config.learn_ranks else f"finetuned-{config.init}",
              "init_from": config.method, "budget": config.budget}

    for t in targets:
        state.modules[t.name] = module_record(t, layers[t.name], method)
    state.softrank = {"task": task, "settings": config.describe(), "budget_params": budget_params,
                         "start_ranks": start, "learned": config.learn_ranks}
