"""Calibration: the activation statistics that activation-aware methods need, gathered by hooks.

Kept apart from the methods (the llm-compressor shape): this module knows how to run a model
and what to record; the methods only read the records. Statistics are gathered block by block:
the inputs to the first repeated block are captured once, then each block is replayed alone,
so only one block's statistics are alive at a time (bounded memory) and, in sequential mode,
each block sees the outputs of the blocks already compressed.

Per target module:
- `gram`: XᵀX of its input, accumulated in float64 (whitening, SVD-LLM);
- `abs_mean`: mean |x| per input channel (ASVD's activation scaling);
- `out_fisher`: mean squared gradient of the loss w.r.t. each output channel (Fisher weighting).
Modules fed the same tensor (q, k, v; gate and up) share one record.
"""

from __future__ import annotations

import functools
import inspect
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from tqdm.auto import tqdm

from ..core.errors import RankcutError
from ..core.targets import Target, find_blocks
from .sources import Calibration, batches, calibration_ids

# --------------------------------------------------------------------------- statistics

GRAM_BLOCK_NUMBERS = 1 << 22  # entries of one column block of a batch's product (16 MB in float32)


def _add_product_(total: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """total += (aᵀ·b) in float64, computed in float32 a block of columns at a time: the batch's
    product never exists whole beside the running sum (a 7B MLP input's is 485 MB in float32 and
    969 MB in float64, on top of the sum's own 969 MB)."""
    step = max(1, GRAM_BLOCK_NUMBERS // max(1, a.shape[1]))
    for start in range(0, b.shape[1], step):
        total[:, start:start + step] += (a.T @ b[:, start:start + step]).double()


class InputStats:
    """Running XᵀX (float64) and mean |x| of one module input.

    With `keep=True` the raw inputs are kept too (the dense stream of an error-corrected pass);
    given a `reference` (those kept inputs), the cross-Gram X_cᵀX_d between this stream and the
    dense one is accumulated, batch by batch.
    """

    def __init__(self, features: int, keep: bool = False, reference: "InputStats | None" = None,
                 with_abs: bool = True, device: torch.device | str = "cpu") -> None:
        # on the device the block runs on: a GPU accumulates its own statistics, and the
        # factorization that reads them runs there too
        self.gram = torch.zeros(features, features, dtype=torch.float64, device=device)
        self.abs_sum = torch.zeros(features, dtype=torch.float64, device=device) if with_abs else None
        self.sum = torch.zeros(features, dtype=torch.float64, device=device)  # Σx: the mean, for maps with a bias
        self.count = 0
        self.kept: list[torch.Tensor] | None = [] if keep else None
        self.reference = reference
        self.cross = torch.zeros(features, features, dtype=torch.float64, device=device) \
            if reference is not None else None
        self._batches = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        # float32 per batch (fast), float64 across batches (no drift over many tokens)
        _add_product_(self.gram, x, x)
        if self.abs_sum is not None:
            self.abs_sum += x.abs().sum(0).double()
        self.sum += x.sum(0).double()
        self.count += x.shape[0]
        if self.kept is not None:
            self.kept.append(x.clone())
        if self.reference is not None and self.reference.kept is not None:
            dense = self.reference.kept[self._batches]
            _add_product_(self.cross, x, dense)
        self._batches += 1

    @property
    def abs_mean(self) -> torch.Tensor:
        if self.abs_sum is None:
            raise ValueError("mean |x| was not recorded (with_abs=False)")
        return self.abs_sum / max(1, self.count)


@dataclass
class ModuleStats:
    """What a method may read about one target."""

    inputs: InputStats | None = None
    out_fisher: torch.Tensor | None = None  # mean (∂L/∂y_k)² per output channel
    last_use: bool = False  # no later target reads these input statistics: a method may consume them

    @property
    def gram(self) -> torch.Tensor | None:
        return None if self.inputs is None else self.inputs.gram

    @property
    def cross(self) -> torch.Tensor | None:
        """X_cᵀX_d: compressed-stream inputs against the dense model's inputs (or None)."""
        return None if self.inputs is None else self.inputs.cross


class InputRecorder:
    """Forward hooks that feed `InputStats`; modules called on the same tensor share a record."""

    def __init__(self, targets: Sequence[Target], keep: bool = False,
                 reference: "InputRecorder | None" = None, with_abs: bool = True) -> None:
        self.targets = list(targets)
        self.keep = keep
        self.with_abs = with_abs
        self.reference = reference
        self.stats: dict[str, InputStats] = {}
        self._current: dict[int, tuple[torch.Tensor, InputStats]] = {}
        self._handles: list[Any] = []

    def __enter__(self) -> "InputRecorder":
        for t in self.targets:
            self._handles.append(t.module.register_forward_hook(self._hook(t)))
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._current.clear()

    def step(self) -> None:
        """Call between forward passes: input tensors of the last pass are released."""
        self._current.clear()

    def _hook(self, target: Target):  # noqa: ANN202
        def hook(module: nn.Module, inputs: tuple, output: Any) -> None:
            x = inputs[0]
            # The tensor is held in _current for the whole pass, so its id cannot be reused.
            held = self._current.get(id(x))
            if held is None:
                record = self.stats.get(target.name)
                if record is None:
                    ref = self.reference.stats.get(target.name) if self.reference is not None else None
                    record = InputStats(x.shape[-1], keep=self.keep, reference=ref, with_abs=self.with_abs,
                                        device=x.device)
                record.add(x)
                self._current[id(x)] = (x, record)
            else:
                record = held[1]
            self.stats.setdefault(target.name, record)
        return hook


def _forward_kwargs(model: nn.Module) -> dict[str, Any]:
    params = inspect.signature(model.forward).parameters
    return {"use_cache": False} if "use_cache" in params else {}


@contextmanager
def recomputed_blocks(model: nn.Module, enabled: bool = True) -> Iterator[None]:
    """Run each repeated block under activation checkpointing: a backward pass then holds one
    block's activations at a time instead of the whole model's."""
    found = find_blocks(model) if enabled else None
    if found is None:
        yield
        return
    blocks = list(found[1])
    for block in blocks:
        block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)
    try:
        yield
    finally:
        for block in blocks:
            del block.forward


# --------------------------------------------------------------------------- block replay

class _StopForward(Exception):
    pass


def run_until(model: nn.Module, module: nn.Module, batch: torch.Tensor) -> tuple[tuple, dict] | None:
    """Run `model` on `batch` only as far as `module`: the (args, kwargs) it was called with, or
    None if the forward pass never reached it. Nothing after `module` is computed."""
    reached: list[tuple[tuple, dict]] = []

    def grab(_: nn.Module, args: tuple, kwargs: dict) -> None:
        reached.append((args, dict(kwargs)))
        raise _StopForward

    hook = module.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        model(input_ids=batch, **_forward_kwargs(model))
    except _StopForward:
        pass
    finally:
        hook.remove()
    return reached[0] if reached else None


def _device_of(model: nn.Module) -> torch.device:
    """Where the model's embeddings are (the parts outside the blocks run there)."""
    try:
        return model.get_input_embeddings().weight.device
    except (AttributeError, NotImplementedError):
        return next(p.device for p in model.parameters() if not p.is_meta)


class BlockReplay:
    """Runs the model once up to its first block, then lets the caller push the captured block
    inputs through one block at a time."""

    def __init__(self, model: nn.Module, ids: torch.Tensor, batch_size: int,
                 place: Callable[[Any], Any] | None = None) -> None:
        """`place`: moves the captured block inputs to where the blocks run (a `Residency`'s)."""
        found = find_blocks(model)
        if found is None:
            raise RankcutError("this model has no repeated blocks (layers) to calibrate block by block")
        self.prefix, self.blocks = found
        self.inputs: list[tuple[tuple, dict]] = []
        with torch.no_grad():
            for batch in batches(ids, batch_size):
                reached = run_until(model, self.blocks[0], batch.to(_device_of(model)))
                if reached is None:
                    raise RankcutError(f"{type(model).__name__} never called its first block")
                self.inputs.append(place(reached) if place is not None else reached)

    @staticmethod
    def _hidden(args: tuple, kwargs: dict) -> torch.Tensor:
        return args[0] if args else kwargs["hidden_states"]

    @staticmethod
    def _with_hidden(args: tuple, kwargs: dict, hidden: torch.Tensor) -> tuple[tuple, dict]:
        if args:
            return (hidden, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": hidden}

    @torch.no_grad()
    def run(self, index: int, recorder: InputRecorder | None = None) -> Iterator[torch.Tensor]:
        """Push every captured input through block `index`; yields its outputs."""
        block = self.blocks[index]
        for args, kwargs in self.inputs:
            out = block(*args, **kwargs)
            if recorder is not None:
                recorder.step()
            yield out[0] if isinstance(out, tuple) else out

    def fork(self) -> "BlockReplay":
        """A second stream through the same blocks (the dense stream of an error-corrected pass)."""
        twin = object.__new__(BlockReplay)
        twin.prefix, twin.blocks, twin.inputs = self.prefix, self.blocks, list(self.inputs)
        return twin

    def advance(self, index: int) -> None:
        """Replace the stored inputs by block `index`'s outputs (the next block's inputs)."""
        self.set_hidden(list(self.run(index)))

    def set_hidden(self, outputs: list[torch.Tensor]) -> None:
        self.inputs = [self._with_hidden(a, k, h) for (a, k), h in zip(self.inputs, outputs)]


def sequential_inputs(model: nn.Module, calibration: Calibration, targets: Mapping[int, Target], desc: str,
                      progress: bool = True) -> Iterator[tuple[int, InputStats]]:
    """For each block that has a target in `targets` (block index → target), the statistics of
    that target's input over the calibration windows, block by block in order; between one
    yield and the next the caller may replace the block's modules, and the next block is fed
    the outputs of the block as the caller left it (sequential calibration). The model is in
    eval mode for the span."""
    was_training = model.training
    model.eval()
    try:
        replay = BlockReplay(model, calibration_ids(model, calibration), calibration.batch_size)
        for index in tqdm(range(len(replay.blocks)), desc=desc, disable=not progress):
            target = targets.get(index)
            if target is not None:
                with InputRecorder([target], with_abs=False) as recorder:
                    for _ in replay.run(index, recorder):
                        pass
                yield index, recorder.stats[target.name]
                del recorder
            replay.advance(index)
    finally:
        model.train(was_training)
