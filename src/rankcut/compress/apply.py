"""`compress_`: one config, one in-place call (the torchao shape), with peft-style overrides.

Every module's rank is checked against its shape before the first factorization, so a bad
rank or pattern leaves the model untouched. Each swap is recorded in the model's record (`record_of`),
which `rankcut.save` writes into `rankcut.json`.
"""

from __future__ import annotations

import contextlib
import os
import re
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from ..calibration.fisher import collect_output_fisher, collect_output_fisher_blockwise
from ..calibration.hooks import BlockReplay, InputRecorder, ModuleStats
from ..calibration.sources import Calibration, calibration_documents, calibration_ids
from ..calibration.spill import SpilledStatistics
from ..core.allocator import release_freed_memory
from ..core.errors import RankcutError
from ..core.layers import LowRankLinear, PivotLowRankLinear
from ..core.machine import resolve_device
from ..core.module_records import empty_factored, module_record
from ..core.modules import count_params, swap_module
from ..core.ranks import (
    allocate_targets,
    allocation_cap,
    check_rank,
    forced_dense,
    keep_rank,
    limit_of,
)
from ..core.record import record_of
from ..core.targets import ALL_LINEAR, Target, dense_weight, find_blocks, select_targets
from ..io.residency import Residency, compute_dtype_for, model_dtype
from ..methods.base import MethodConfig, handler_for
from .checkpoint import CompressCheckpoint, run_fingerprint
from .embedding import check_embedding_targets, factor_embedding_, split_embedding_targets


@dataclass
class CompressionReport:
    """What a `compress_` call did: per-module ranks and the parameter counts around it."""

    params_before: int
    params_after: int
    modules: dict[str, dict[str, Any]] = field(default_factory=dict)
    # each module's direction worths (squared singular values in the method's metric)
    importance: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    # wall seconds by kind of work: "factorize" (the methods' arithmetic), "gradients" (the
    # Fisher's backward pass), "read" and "write" (a streamed model's blocks); the rest of a
    # calibrated compression is the calibration forwards and their statistics
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        return self.params_after / self.params_before


def _config_for(target: Target, config: MethodConfig,
                overrides: Mapping[str, MethodConfig] | None) -> MethodConfig:
    for pattern, override in (overrides or {}).items():
        if re.search(pattern, target.name):
            return override
    return config


def _check_overrides(overrides: Mapping[str, MethodConfig] | None, chosen: Sequence[Target]) -> None:
    """An override that matches no target is a typo that would silently compress with the default."""
    for pattern in overrides or {}:
        try:
            compiled = re.compile(pattern)
        except re.error as exc:
            raise RankcutError(f"override '{pattern}' is not a valid regex ({exc})") from None
        if not any(compiled.search(t.name) for t in chosen):
            raise RankcutError(f"override '{pattern}' matches none of the {len(chosen)} targeted modules "
                               f"(e.g. {chosen[0].name}); fix the pattern or drop it")


def _precheck(target: Target, config: MethodConfig) -> None:
    policy = config.policy
    if policy.pivot and (isinstance(policy.rank, tuple) or getattr(config, "three_factor", False)):
        raise RankcutError("the pivoted form stores two factors; drop --pivot, or give a single rank "
                           "without --three-factor")
    if policy.rank is not None:
        check_rank(target.name, target.out_features, target.in_features, policy.rank, policy.allow_growth,
                   policy.pivot)
    elif policy.keep is not None:
        rank = keep_rank(target.out_features, target.in_features, policy.keep, policy.pivot)
        check_rank(target.name, target.out_features, target.in_features, rank, policy.allow_growth, policy.pivot)


def _shared_weights(model: nn.Module) -> dict[int, list[str]]:
    """Parameter id → the names of the modules that hold it, for parameters held by more than one
    (tied input and output embeddings)."""
    holders: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        holders.setdefault(id(param), []).append(name.rpartition(".")[0])
    return {k: v for k, v in holders.items() if len(v) > 1}


def _check_not_tied(target: Target, config: MethodConfig, shared: Mapping[int, list[str]]) -> None:
    """A tied matrix stays whole in its twin (the input embedding) after the swap, so factoring it
    adds the factors to the model instead of saving anything: refuse unless growth is asked for."""
    twins = [n for n in shared.get(id(target.module.weight), []) if n != target.name]
    if not twins:
        return
    if config.budget is not None:
        raise RankcutError(f"{target.name} shares its weight with {twins[0]} (tied embeddings): under a budget "
                           "its factors would be counted as savings that never happen; leave it out of --targets")
    if not config.policy.allow_growth:
        raise RankcutError(f"{target.name} shares its weight with {twins[0]} (tied embeddings): factoring it "
                           f"unties the two, and {twins[0]} keeps the whole matrix, so the model grows; leave it "
                           "out of --targets, or pass --allow-growth to factor it anyway (e.g. for decode speed)")


def compress_(
    model: nn.Module,
    config: MethodConfig,
    targets: str | Sequence[str] = ALL_LINEAR,
    layers: str | Iterable[int] | None = None,
    overrides: Mapping[str, MethodConfig] | None = None,
    progress: bool = True,
    checkpoint: str | os.PathLike | None = None,
    resume: bool = False,
    device: str | torch.device = "auto",
    residency: Residency | None = None,
) -> CompressionReport:
    """Replace the selected linears of `model` by low-rank factors, in place.

    `overrides` maps a regex on module names to its own config (first match wins), like peft's
    `rank_pattern`. Methods that read activation statistics are calibrated block by block on
    `config.calibration`; with `budget=F`, every module is first factored at its break-even
    rank and the ranks are then cut so that the targets keep F of their parameters overall.
    `checkpoint`: a folder that receives each finished block, so that a call with `resume=True`
    (same model and settings) continues where an interrupted one stopped, to the same result.
    `device`: where each block is computed (`auto`: a GPU if there is one); the model stays
    where it is and one block at a time is moved there, in float32 if the model is stored in
    half precision. `residency`: where the blocks live instead (a streamed model's).
    `embed` or `head` among the targets also factors the token embedding and the head tied to
    it, after the blocks (`rankcut.compress.embedding`).
    The model is measured as it is used, in eval mode (no dropout), and left in the mode it came in.
    """
    was_training = model.training
    model.eval()
    try:
        return _compress_selected(model, config, targets, layers, overrides, progress, checkpoint, resume, device,
                                  residency)
    finally:
        model.train(was_training)


def _compress_selected(model: nn.Module, config: MethodConfig, targets: str | Sequence[str],
                       layers: str | Iterable[int] | None, overrides: Mapping[str, MethodConfig] | None,
                       progress: bool, checkpoint: str | os.PathLike | None, resume: bool,
                       device: str | torch.device, residency: Residency | None) -> CompressionReport:
    rest, embedding_named = split_embedding_targets(targets)
    if embedding_named:
        if residency is not None and residency.streamed:
            raise RankcutError("the embedding of a streamed model is not cut yet: drop embed/head from --targets, "
                               "or drop --offload disk")
        check_embedding_targets(model, embedding_named, config)
        before = count_params(model)
        report = CompressionReport(params_before=before, params_after=before) if rest is None else compress_(
            model, config, rest, layers, overrides, progress, checkpoint, resume, device, residency)
        report.modules.update(factor_embedding_(model, config, embedding_named, progress))
        report.params_after = count_params(model)
        record_of(model).config = config.to_dict()
        return report
    if residency is None:
        residency = default_residency(model, device)
    chosen = select_targets(model, targets, layers)
    _check_overrides(overrides, chosen)
    plan = [(t, _config_for(t, config, overrides)) for t in chosen]
    shared = _shared_weights(model)
    for target, cfg in plan:
        handler_for(cfg)
        _precheck(target, cfg)
        _check_not_tied(target, cfg, shared)
    budgeted = [cfg.budget is not None for _, cfg in plan]
    if any(budgeted) and not all(budgeted):
        raise RankcutError("a budget applies to every target at once; don't mix it with per-module ranks")
    calib = getattr(config, "calibration", None)
    if calib is not None and calib.staged and (not calib.sequential or (config.budget is not None
                                                                         and not calib.two_pass)):
        # a one-pass budget calibrates on dense activations, so there is nothing to stage
        raise RankcutError("staged calibration needs a sequential pass: drop --no-sequential, and "
                           "with --budget add --two-pass")
    if "cross" in config.needs and config.budget is not None and not (calib.two_pass and calib.sequential):
        # a one-pass budget's factors are cut after calibration: a refit at the cap would not hold
        raise RankcutError("anchor refits the factors at their final ranks: with --budget add --two-pass "
                           "(and keep the pass sequential)")
    if "cross" in config.needs and not calib.sequential:
        raise RankcutError("anchor needs the compressed model's inputs: drop --no-sequential")
    if config.speed_limits is not None:  # every shape has a measured limit and the budget can hold, before any work
        for target, _ in plan:
            limit_of(config.speed_limits, target.out_features, target.in_features, target.name)
        two_pass = calib is not None and calib.two_pass and bool(config.needs)
        forced_dense([t for t, _ in plan], int(config.budget * sum(t.params for t, _ in plan)),
                     config.pivot, full_range=two_pass, limits=config.speed_limits)
        record_of(model).speed_limits = dict(config.speed_limits)
    if resume and checkpoint is None:
        raise RankcutError("--resume needs --checkpoint FOLDER (where the interrupted compression wrote)")
    ck = CompressCheckpoint(checkpoint, run_fingerprint(model, plan, _weight_sample(residency)), resume) \
        if checkpoint is not None else None
    if config.budget is not None and calib is not None and calib.two_pass and config.needs:
        report = _two_pass_budget(model, plan, config, progress, ck, residency)
    else:
        report = _compress(model, plan, config, progress, ck=ck, residency=residency)
    record_of(model).config = config.to_dict()  # the whole call's config; each module keeps its own too
    return report


def default_residency(model: nn.Module, device: str | torch.device = "auto") -> Residency | None:
    """Blocks in memory, computed on `device` in the precision their arithmetic needs."""
    found = find_blocks(model)
    if found is None:
        return None
    stored = model_dtype(model)
    return Residency(found[1], found[0], resolve_device(device), compute_dtype_for(stored), stored)


def _weight_sample(residency: Residency | None) -> Callable[[Target], torch.Tensor] | None:
    """How a checkpoint fingerprints a streamed model's weights (its blocks are not in memory):
    each target's first row, read from the checkpoint."""
    if residency is None or not residency.streamed:
        return None
    return lambda t: next(iter(residency.source.first_rows([residency.names.get(t.name + ".weight",
                                                                                 t.name + ".weight")]).values()))


@dataclass
class CalibrationData:
    """What a calibrated pass drew and measured that a second pass over the same model may reuse:
    the calibration windows and the dense model's output Fisher."""

    ids: torch.Tensor | None = None
    fisher: Mapping[str, torch.Tensor] | None = None


@dataclass
class BlockStore:
    """How one pass over the blocks checkpoints: what a finished block leaves on disk (`save`,
    given its targets) and how a resumed pass puts it back (`restore`) instead of recomputing it."""

    ck: CompressCheckpoint
    stage: str
    save: Callable[[list[Target]], tuple[dict[str, torch.Tensor], dict[str, Any]]]
    restore: Callable[[list[tuple[Target, MethodConfig]], dict[str, torch.Tensor], dict[str, Any]], None]

    def done(self, block: int | None) -> bool:
        return self.ck.done(self.stage, _block_key(block))

    def put(self, block: int | None, targets: list[Target]) -> None:
        tensors, meta = self.save(targets)
        self.ck.save_block(self.stage, _block_key(block), tensors, meta)

    def take(self, block: int | None, todo: list[tuple[Target, MethodConfig]]) -> None:
        tensors, meta = self.ck.load_block(self.stage, _block_key(block))
        self.restore(todo, tensors, meta)


def _block_key(block: int | None) -> str:
    return "outside" if block is None else str(block)


def _by_block(plan: list[tuple[Target, MethodConfig]]) -> dict[int | None, list[tuple[Target, MethodConfig]]]:
    groups: dict[int | None, list[tuple[Target, MethodConfig]]] = {}
    for target, cfg in plan:
        groups.setdefault(target.layer, []).append((target, cfg))
    return groups


def _compress(model: nn.Module, plan: list[tuple[Target, MethodConfig]], config: MethodConfig,
              progress: bool, data: CalibrationData | None = None, ck: CompressCheckpoint | None = None,
              stage: str = "compress", residency: Residency | None = None) -> CompressionReport:
    before = count_params(model)
    state = record_of(model)
    report = CompressionReport(params_before=before, params_after=before)
    needs = set().union(*(cfg.needs for _, cfg in plan))
    importance = report.importance
    # Under a budget a module may be given its break-even rank: as many numbers as the dense
    # matrix, yet only an approximation of it. Such modules are put back dense (exact, same
    # size), so each dense weight waits on disk until the cut, not in memory beside the factors.
    spill = DenseSpill() if config.budget is not None else None

    def install(target: Target, cfg: MethodConfig, new: nn.Module, worth: torch.Tensor | None) -> None:
        module = target.module
        if worth is not None:
            importance[target.name] = worth.cpu()
        new = new.to(module.weight.device)
        swap_module(model, target.name, new)
        if spill is not None:
            spill.put(target.name, module)
        # The plan must not keep the dense weight alive: that would hold the whole dense
        # model beside its factors until the call returns (twice the memory).
        target.module = new
        del module
        record = module_record(target, new, cfg)
        state.modules[target.name] = record
        report.modules[target.name] = record

    def factorize(target: Target, cfg: MethodConfig, stats: Any) -> None:
        module = target.module
        weight = dense_weight(module).detach().to(torch.float64, copy=True)  # the handler may overwrite it
        if stats is not None and stats.out_fisher is not None:
            stats.out_fisher = stats.out_fisher.to(weight.device)
        clock = time.perf_counter()
        factors = handler_for(cfg)(weight, cfg, target.name, stats, overwrite=True)
        _add_seconds(report.seconds, "factorize", clock)
        bias = module.bias.detach() if getattr(module, "bias", None) is not None else None
        # a resident half-precision block is computed in float32 (its dense weights cast per call):
        # its factors are made in that precision too, and stored in the model's at unload
        compute = residency.compute_dtype if residency is not None and target.layer is not None else None
        dtype = compute or module.weight.dtype
        del module, weight
        if cfg.pivot and cfg.budget is None:
            out_factor = factors.out_factor if factors.core is None else factors.out_factor @ factors.core
            new = PivotLowRankLinear.from_factors(out_factor, factors.in_factor, bias=bias, dtype=dtype)
        else:  # a budgeted module is truncated first and pivoted at the cut
            new = LowRankLinear.from_factors(factors.out_factor, factors.in_factor, bias=bias,
                                             core=factors.core, dtype=dtype)
        install(target, cfg, new, factors.importance)

    def save(targets: list[Target]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors = {f"{t.name}|{k}": v for t in targets for k, v in t.module.state_dict().items()}
        tensors.update({f"{t.name}|importance": importance[t.name] for t in targets if t.name in importance})
        return tensors, {"records": {t.name: state.modules[t.name] for t in targets}}

    def restore(todo: list[tuple[Target, MethodConfig]], tensors: dict[str, torch.Tensor],
                meta: dict[str, Any]) -> None:
        for target, cfg in todo:
            try:
                own = {k.split("|", 1)[1]: v for k, v in tensors.items() if k.startswith(f"{target.name}|")}
                # a copy: a tensor read from the checkpoint maps its whole file, and keeping one
                # small tensor would keep every page of the block's factors resident
                worth = own.pop("importance", None)
                worth = None if worth is None else worth.clone()
                new = empty_factored(target.name, meta["records"][target.name], own["in_factor"].dtype)
                new.load_state_dict(own)
            except (RankcutError, KeyError, TypeError, RuntimeError) as exc:
                raise RankcutError(f"checkpoint {store.ck.folder} does not hold {target.name} as this run made it "
                                   f"({str(exc).splitlines()[0]}); delete it to start over") from None
            install(target, cfg, new, worth)

    store = BlockStore(ck, stage, save, restore) if ck is not None else None
    if needs:  # a bad calibration source fails here, before any progress is shown
        calibration_documents((getattr(config, "calibration", None) or Calibration()).text)
    bar = tqdm(total=len(plan), desc=f"compress ({config.method_name})", disable=not progress, unit="module")
    if needs:
        _calibrated_pass(model, plan, config, needs, factorize, bar, progress, data, store, residency,
                         seconds=report.seconds)
    else:
        for block, todo in _by_block(plan).items():
            with _resident(residency, block):
                if store is not None and store.done(block):
                    store.take(block, todo)
                    bar.update(len(todo))
                    continue
                for target, cfg in todo:
                    factorize(target, cfg, None)
                    bar.update()
                if store is not None:
                    store.put(block, [t for t, _ in todo])
    bar.close()
    if config.budget is not None:
        try:
            _cut_to_budget(model, plan, config.budget, importance, state, report, spill, config.pivot,
                           config.speed_limits, residency)
        finally:
            spill.close()
        release_freed_memory()  # the cut freed the factors' truncated tails
    report.params_after = count_params(model)
    return report


class DenseSpill:
    """Dense modules parked on disk while a budgeted compression runs: the module objects stay
    (their class and layout, e.g. GPT-2's transposed Conv1D) with their weights moved to a
    temporary file, and come back only if the budget gives them their break-even rank."""

    def __init__(self) -> None:
        import tempfile

        self._dir = tempfile.TemporaryDirectory(prefix="rankcut-spill-")
        self._modules: dict[str, tuple[nn.Module, str]] = {}

    def put(self, name: str, module: nn.Module) -> None:
        from safetensors.torch import save_file

        path = f"{self._dir.name}/{len(self._modules)}.safetensors"
        save_file({k: v.detach().contiguous() for k, v in module.state_dict().items()}, path)
        for tensor in module.parameters():
            tensor.data = torch.empty(0, dtype=tensor.dtype, device=tensor.device)
        self._modules[name] = (module, path)

    @torch.no_grad()
    def take(self, name: str) -> nn.Module:
        from safetensors.torch import load_file

        module, path = self._modules[name]
        for key, value in load_file(path).items():
            owner, _, leaf = key.rpartition(".")  # by the parameter table: a resident block's linear
            (module.get_submodule(owner) if owner else module)._parameters[leaf].data = value  # casts `weight`
        return module

    def close(self) -> None:
        self._modules.clear()
        self._dir.cleanup()


def _add_seconds(seconds: dict[str, float], kind: str, since: float) -> None:
    seconds[kind] = seconds.get(kind, 0.0) + time.perf_counter() - since


def _resident(residency: Residency | None, block: int | None, changed: bool = True) -> Any:
    """The block resident for the span (a no-op outside the blocks, or with nowhere to move it)."""
    if residency is None or block is None:
        return contextlib.nullcontext()
    return residency.resident(block, changed)


def _calibrated_pass(model: nn.Module, plan: list[tuple[Target, MethodConfig]], config: MethodConfig,
                     needs: set[str], factorize: Any, bar: Any, progress: bool,
                     data: CalibrationData | None = None, store: BlockStore | None = None,
                     residency: Residency | None = None, changes: bool = True,
                     seconds: dict[str, float] | None = None) -> CalibrationData:
    """Gather statistics block by block and factorize each block's targets as soon as they exist.

    `data` carries windows and a dense Fisher from an earlier pass over the same model (the
    two-pass budget), so they are not drawn and measured twice; what was used is returned.
    `store` checkpoints each finished block; a block it already holds is put back from disk and
    the streams are pushed through it as the interrupted pass pushed them.
    """
    calib: Calibration = getattr(config, "calibration", None) or Calibration()
    seconds = {} if seconds is None else seconds
    outside = [t.name for t, _ in plan if t.layer is None]
    if outside:
        raise RankcutError(f"{outside[0]} is outside the repeated blocks; calibrated methods compress "
                           "block modules only (use --method svd for heads)")
    data = data or CalibrationData()

    def once(key: str, make: Callable[[], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        return store.ck.once(key, make) if store is not None else make()

    ids = data.ids if data.ids is not None else once("ids", lambda: {"ids": calibration_ids(model, calib)})["ids"]
    fisher: Mapping[str, torch.Tensor] = {}
    if needs & {"out_fisher", "out_covariance"}:
        fisher = data.fisher or {}
        missing = [t for t, _ in plan if t.name not in fisher]
        full = "out_covariance" in needs  # the gradients' out × out covariance, not only its diagonal
        if missing:
            n = calib.fisher_samples or ids.shape[0]
            if residency is not None and full:
                # out × out per target: each block's go to disk as they are done, read back by their block
                spilled = SpilledStatistics()
                measured = lambda: (collect_output_fisher_blockwise(  # noqa: E731
                    model, residency, missing, ids[:n], calib.fisher_batch_size, progress, full=True,
                    sink=spilled.put), spilled)[1]
            elif residency is not None and residency.moves:
                measured = lambda: collect_output_fisher_blockwise(  # noqa: E731
                    model, residency, missing, ids[:n], calib.fisher_batch_size, progress)
            else:
                measured = lambda: collect_output_fisher(  # noqa: E731
                    model, missing, ids[:n], calib.fisher_batch_size, progress, full=full)
            clock = time.perf_counter()
            fresh = once("fisher-full" if full else "fisher", measured)
            fisher = fresh if not fisher else {**fisher, **fresh}
            _add_seconds(seconds, "gradients", clock)
            release_freed_memory()  # the backward pass's buffers, before the block pass starts
    replay = BlockReplay(model, ids, calib.batch_size, place=residency.place if residency is not None else None)
    # Budgeted factors sit at their break-even rank until the final cut, so a "compressed"
    # stream would be the dense one: calibrate on dense outputs and skip the second pass.
    sequential = calib.sequential and config.budget is None
    # Error-corrected sequential mode: a second, dense stream gives each block the dense
    # model's inputs, so a block's factors aim at the dense outputs, not at its own.
    correct = sequential and (calib.correct or "cross" in needs) and "gram" in needs
    with_abs = "abs_mean" in needs
    dense_stream = replay.fork() if correct else None
    by_layer: dict[int, list[tuple[Target, MethodConfig]]] = {}
    for target, cfg in plan:
        by_layer.setdefault(target.layer, []).append((target, cfg))
    last = max(by_layer)
    def calibrate_block(index: int, todo: list[tuple[Target, MethodConfig]]) -> None:
        if not todo:
            replay.advance(index)
            if dense_stream is not None:
                dense_stream.advance(index)
            return
        if store is not None and store.done(index):
            # the order of the interrupted pass: a dense stream through the dense block, the
            # compressed stream through the block as it was left (factored if sequential)
            if dense_stream is not None:
                dense_stream.advance(index)
            if not sequential and index < last:
                replay.advance(index)
            store.take(index, todo)
            if sequential and index < last:
                replay.advance(index)
            bar.update(len(todo))
            return
        block_targets = [t for t, _ in todo]
        reference = None
        if dense_stream is not None:
            with InputRecorder(block_targets, keep=True, with_abs=with_abs) as reference:
                dense_stream.set_hidden(list(dense_stream.run(index, reference)))
        with InputRecorder(block_targets, reference=reference, with_abs=with_abs) as recorder:
            outputs = list(replay.run(index, recorder))
        stages = _input_stages(todo, recorder) if sequential and calib.staged else [todo]
        for number, stage in enumerate(stages):
            if number:  # the earlier stages of this block are cut: record this stage's inputs again
                del recorder
                with InputRecorder([t for t, _ in stage], reference=reference, with_abs=with_abs) as recorder:
                    for _ in replay.run(index, recorder):
                        pass
            for target, cfg in stage:
                record = recorder.stats.pop(target.name, None)  # each record is freed after its last reader
                only = record is not None and all(r is not record for r in recorder.stats.values())
                stats = ModuleStats(inputs=record, out_fisher=fisher.get(target.name), last_use=only)
                del record
                factorize(target, cfg, stats)
                del stats
                bar.update()
        del recorder, reference
        if store is not None:
            store.put(index, block_targets)
        if index < last:
            if sequential:
                replay.advance(index)
            else:
                replay.set_hidden(outputs)

    for index in range(last + 1):
        todo = by_layer.get(index, [])
        with _resident(residency, index, changed=changes and bool(todo)):
            calibrate_block(index, todo)
        release_freed_memory()  # this block's statistics and factorization buffers
    return CalibrationData(ids=ids, fisher=fisher or None)


def _input_stages(todo: list[tuple[Target, MethodConfig]],
                  recorder: InputRecorder) -> list[list[tuple[Target, MethodConfig]]]:
    """A block's targets grouped by the input they share (q/k/v, then o, then gate/up, then down),
    in the order the forward pass reached them, so that each group can be calibrated on the
    outputs of the groups before it once those are cut."""
    order = {name: i for i, name in enumerate(recorder.stats)}
    groups: dict[int, list[tuple[Target, MethodConfig]]] = {}
    for target, cfg in sorted(todo, key=lambda tc: order.get(tc[0].name, -1)):
        record = recorder.stats.get(target.name)
        groups.setdefault(id(record) if record is not None else 0, []).append((target, cfg))
    return list(groups.values())


def _two_pass_budget(model: nn.Module, plan: list[tuple[Target, MethodConfig]], config: MethodConfig,
                     progress: bool, ck: CompressCheckpoint | None = None,
                     residency: Residency | None = None) -> CompressionReport:
    """Allocate the budget from a first, read-only pass; then compress sequentially at those ranks.

    The one-pass budget calibrates every block on dense activations (its factors sit at the
    break-even rank until the final cut). Here the ranks are known before the second pass, so
    each block is calibrated on the outputs of the blocks already cut, at about twice the time.
    """
    worths: dict[str, torch.Tensor] = {}

    def measure(target: Target, cfg: MethodConfig, stats: Any) -> None:
        weight = dense_weight(target.module).detach().to(torch.float64, copy=True)
        if stats is not None and stats.out_fisher is not None:
            stats.out_fisher = stats.out_fisher.to(weight.device)
        worths[target.name] = handler_for(cfg)(weight, cfg, target.name, stats, overwrite=True).importance.cpu()

    def save(targets: list[Target]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return {f"{t.name}|worth": worths[t.name] for t in targets}, {}

    def restore(todo: list[tuple[Target, MethodConfig]], tensors: dict[str, torch.Tensor], _: Any) -> None:
        for target, _cfg in todo:
            worths[target.name] = tensors[f"{target.name}|worth"].clone()  # not a view that pins the file

    store = BlockStore(ck, "allocate", save, restore) if ck is not None else None
    bar = tqdm(total=len(plan), desc=f"allocate ({config.method_name})", disable=not progress, unit="module")
    data = _calibrated_pass(model, plan, config, set(config.needs), measure, bar, progress, store=store,
                            residency=residency, changes=False)
    bar.close()
    # the factors are computed after the allocation here, so a pivoted module may take any rank
    ranks = allocate_targets([t for t, _ in plan], worths, int(config.budget * sum(t.params for t, _ in plan)),
                             pivot=config.pivot, full_range=True, limits=config.speed_limits)
    calib = replace(config.calibration, sequential=True, two_pass=False)
    dense = [(t, cfg) for t, cfg in plan
             if ranks[t.name] >= allocation_cap(t, config.pivot, full_range=True, limits=config.speed_limits)]
    # the second pass gives each module its rank: the budget and its speed limits are spent
    fixed = [(t, replace(cfg, budget=None, speed_limits=None, rank=ranks[t.name], calibration=calib))
             for t, cfg in plan if (t, cfg) not in dense]
    if fixed:
        # the same windows, and the first pass's Fisher: the second pass would measure it again
        # on the same windows of the same, still dense model before cutting its first block
        report = _compress(model, fixed, replace(config, budget=None, speed_limits=None, rank=1, calibration=calib),
                           progress, data, ck, residency=residency)
    else:
        report = CompressionReport(params_before=count_params(model), params_after=count_params(model))
    state = record_of(model)
    for target, cfg in dense:
        state.modules[target.name] = report.modules[target.name] = \
            module_record(target, target.module, replace(cfg, calibration=calib))
    # records in the model's order (the dense ones were added last), as a one-pass budget leaves them
    planned = {t.name for t, _ in plan}
    state.modules = {**{n: r for n, r in state.modules.items() if n not in planned},
                        **{t.name: state.modules[t.name] for t, _ in plan}}
    report.modules = {t.name: report.modules[t.name] for t, _ in plan}
    state.budget = {"fraction": config.budget, "passes": 2}
    return report


def _cut_to_budget(model: nn.Module, plan: list[tuple[Target, MethodConfig]], budget: float,
                   importance: Mapping[str, torch.Tensor], state: dict, report: CompressionReport,
                   spill: DenseSpill, pivot: bool = False, limits: Mapping[str, int] | None = None,
                   residency: Residency | None = None) -> None:
    ranks = allocate_targets([t for t, _ in plan], importance, int(budget * sum(t.params for t, _ in plan)),
                             pivot=pivot, limits=limits)
    for block, todo in _by_block(plan).items():
        with _resident(residency, block):
            for target, cfg in todo:
                _cut_one(model, target, cfg, ranks[target.name], state, report, spill, pivot, limits)


def _cut_one(model: nn.Module, target: Target, cfg: MethodConfig, rank: int, state: dict,
             report: CompressionReport, spill: DenseSpill, pivot: bool, limits: Mapping[str, int] | None) -> None:
    if rank >= allocation_cap(target, pivot, limits=limits):
        dense = spill.take(target.name)
        swap_module(model, target.name, dense.to(model.get_submodule(target.name).in_factor.device))
        state.modules[target.name] = report.modules[target.name] = module_record(target, dense, cfg)
        return
    layer = model.get_submodule(target.name)
    layer.truncate_(rank)
    if pivot:
        layer = PivotLowRankLinear.from_low_rank(layer)
        swap_module(model, target.name, layer)
    record = module_record(target, layer, cfg)
    state.modules[target.name] = record
    report.modules[target.name] = record
