"""Where a model's repeated blocks live while a block-by-block pass works on them.

The sequential pipeline of GPTQ-style tools and llm-compressor: the model stays on the CPU and
one block at a time is made resident on the compute device, in the precision its arithmetic
needs. Three cases share one interface, so calibration, factorization and the budget's cut are
written once:

- in memory, computed where it is (CPU, the model's precision): loading is a no-op, so the
  in-memory path is exactly what it always was;
- in memory, computed elsewhere (`--device cuda`) or in another precision (a bfloat16 model's
  block is computed in float32): the block is moved there and back;
- streamed from disk (`--offload disk`): the block's weights are read from the checkpoint's
  shards when it is needed, and written to a scratch shard and dropped when it is done, so
  memory holds a block or two whatever the depth.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from ..core.errors import RankcutError
from .shards import ShardSource, read_copied, save_shard

HALF = (torch.float16, torch.bfloat16)


def compute_dtype_for(dtype: torch.dtype) -> torch.dtype:
    """The precision a block is computed in while resident: float32 for a half-precision model,
    whose activations and Gram statistics would otherwise carry three significant digits (and
    whose matmuls many CPUs only emulate); the model's own otherwise."""
    return torch.float32 if dtype in HALF else dtype


def model_dtype(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


class StoredPrecisionLinear(nn.Linear):
    """A dense linear of a resident half-precision block: its tensors stay as stored, and reading
    `weight` or `bias` (its own forward, or a model's code that reads them directly, as Mamba's
    does) gives them in the compute precision. The block is computed in float32 one matrix at a
    time, the same numbers as a block cast whole, without the block's float32 copy in memory
    (808 MB for a 7B block)."""

    @property  # type: ignore[override]
    def weight(self) -> torch.Tensor:
        return self._parameters["weight"].to(self.compute_dtype)

    @property  # type: ignore[override]
    def bias(self) -> torch.Tensor | None:
        bias = self._parameters["bias"]
        return None if bias is None else bias.to(self.compute_dtype)


def plain_linears(block: nn.Module) -> list[nn.Linear]:
    """The block's dense linears (a factored module is not one)."""
    return [m for m in block.modules() if type(m) is nn.Linear]


def compute_on_the_fly(block: nn.Module, dtype: torch.dtype | None) -> None:
    """Make the block's dense linears `StoredPrecisionLinear`s computing in `dtype`; with None, plain
    linears again."""
    if dtype is None:
        for linear in block.modules():
            if type(linear) is StoredPrecisionLinear:
                linear.__class__ = nn.Linear
                del linear.compute_dtype
        return
    for linear in plain_linears(block):
        linear.__class__ = StoredPrecisionLinear
        linear.compute_dtype = dtype


def _to_compute(block: nn.Module, device: torch.device, dtype: torch.dtype | None) -> None:
    """The block on `device`; its floating tensors in `dtype`, except the dense linears' weights,
    which keep their stored precision and are cast per call (`compute_on_the_fly`)."""
    if dtype is None:
        block.to(device)
        return
    exact = {id(m) for m in plain_linears(block)}
    for sub in block.modules():
        keep = id(sub) in exact
        sub._apply(lambda t, keep=keep: t.to(device=device, dtype=None if keep or not t.is_floating_point()
                                             else dtype), recurse=False)
    compute_on_the_fly(block, dtype)


def _cast(value: Any, device: torch.device, dtype: torch.dtype | None) -> Any:
    if isinstance(value, torch.Tensor):
        if dtype is not None and value.is_floating_point():
            return value.to(device=device, dtype=dtype)
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(_cast(v, device, dtype) for v in value)
    if isinstance(value, list):
        return [_cast(v, device, dtype) for v in value]
    if isinstance(value, dict):
        return {k: _cast(v, device, dtype) for k, v in value.items()}
    return value


class Residency:
    """Blocks kept in memory; each is moved to `device` (and cast to `compute_dtype`) while worked on.

    `compute_dtype=None`: as stored. Loading and unloading are no-ops when neither differs from
    where the block is, which is the plain CPU path.
    """

    streamed = False

    def __init__(self, blocks: nn.ModuleList, prefix: str, device: torch.device | str = "cpu",
                 compute_dtype: torch.dtype | None = None, storage_dtype: torch.dtype | None = None) -> None:
        self.blocks = blocks
        self.prefix = prefix  # the blocks' module path, e.g. "model.layers"
        self.device = torch.device(device)
        self.storage_dtype = storage_dtype
        self.compute_dtype = compute_dtype if compute_dtype != storage_dtype else None
        self.home = torch.device("cpu")

    @property
    def moves(self) -> bool:
        return self.device != self.home or self.compute_dtype is not None

    def place(self, value: Any) -> Any:
        """Tensors (in tuples, lists and dicts) on the compute device, floating ones in the compute precision."""
        if not self.moves:
            return value
        return _cast(value, self.device, self.compute_dtype)

    def load(self, index: int) -> nn.Module:
        block = self.blocks[index]
        if self.moves:
            _to_compute(block, self.device, self.compute_dtype)
        return block

    def unload(self, index: int, changed: bool = True) -> None:
        if self.moves:
            compute_on_the_fly(self.blocks[index], None)
            self.blocks[index].to(device=self.home, dtype=self.storage_dtype)

    @contextmanager
    def resident(self, index: int, changed: bool = True) -> Iterator[nn.Module]:
        """The block, resident for the span; put back after (written back if `changed`)."""
        block = self.load(index)
        yield block
        self.unload(index, changed)

    def close(self) -> None:
        pass


class StreamedResidency(Residency):
    """Blocks that live on disk: their tensors are meta (shape only) except while resident.

    A block is read from the checkpoint's shards the first time, and from its scratch shard (in
    `scratch`, keyed by the model's own tensor names) once a pass has changed it. The scratch
    shards are the output's block shards: saving moves them into the output folder.
    """

    streamed = True

    def __init__(self, blocks: nn.ModuleList, prefix: str, source: ShardSource, names: dict[str, str],
                 scratch: str | os.PathLike, device: torch.device | str = "cpu",
                 compute_dtype: torch.dtype | None = None, storage_dtype: torch.dtype | None = None) -> None:
        super().__init__(blocks, prefix, device, compute_dtype, storage_dtype)
        self.source = source
        self.names = names  # the model's tensor name → the checkpoint's
        self.scratch = Path(scratch)
        self.scratch.mkdir(parents=True, exist_ok=True)
        self.seconds = {"read": 0.0, "write": 0.0}  # wall time spent reading and writing blocks
        # buffers the model derives from its config (not in the checkpoint) stay as built
        self.derived = {f"{prefix}.{i}.{k}" for i, b in enumerate(blocks) for k in b.state_dict()
                        if f"{prefix}.{i}.{k}" not in names}

    @property
    def moves(self) -> bool:
        return True

    def scratch_file(self, index: int) -> Path:
        return self.scratch / f"block-{index:05d}.safetensors"

    def block_names(self, index: int) -> list[str]:
        """The model's names of block `index`'s stored tensors: its parameters and the buffers the
        checkpoint holds (buffers derived from the config stay as the model built them)."""
        return [name for key in self.blocks[index].state_dict()
                if (name := f"{self.prefix}.{index}.{key}") not in self.derived]

    def load(self, index: int) -> nn.Module:
        clock = time.perf_counter()
        block = self.blocks[index]
        names = self.block_names(index)
        own = self.scratch_file(index)
        if own.is_file():
            try:
                # copies, so that each dense weight's memory goes when it is factorized: a view
                # of the shard's map would keep the whole block's pages until the block goes
                found = read_copied(own)
            except Exception as exc:
                raise RankcutError(f"scratch shard {own} is unreadable ({str(exc).splitlines()[0]}); "
                                   "delete it and run again") from None
        else:
            checkpoint_names = {name: self.names.get(name, name) for name in names}
            read = self.source.read(checkpoint_names.values(), copy=True)
            found = {name: read.pop(checkpoint_names[name]) for name in names}
        cut = len(self.prefix) + len(str(index)) + 2
        found = {name[cut:]: found.pop(name) for name in list(found)}
        exact = set()
        if self.compute_dtype is not None:  # dense linears stay as stored and are cast per call
            exact = {f"{n}.{leaf}" for n, m in block.named_modules() if type(m) is nn.Linear for leaf in m._parameters}
        fill_(block, found, self.device, self.compute_dtype or self.storage_dtype, exact=exact)
        if self.compute_dtype is not None:
            compute_on_the_fly(block, self.compute_dtype)
        self.seconds["read"] += time.perf_counter() - clock
        return block

    def unload(self, index: int, changed: bool = True) -> None:
        clock = time.perf_counter()
        block = self.blocks[index]
        if changed:
            keep = set(self.block_names(index))
            state = {name: v.to(self.storage_dtype) if v.is_floating_point() and self.storage_dtype is not None
                     else v for k, v in block.state_dict().items() if (name := f"{self.prefix}.{index}.{k}") in keep}
            save_shard(state, self.scratch_file(index))
        compute_on_the_fly(block, None)
        empty_(block, self.storage_dtype)
        self.seconds["write"] += time.perf_counter() - clock

    def close(self) -> None:
        shutil.rmtree(self.scratch, ignore_errors=True)


def fill_(module: nn.Module, tensors: dict[str, torch.Tensor], device: torch.device,
          dtype: torch.dtype | None, check: bool = True, exact: set[str] | frozenset[str] = frozenset()) -> None:
    """Give stored tensors of `module` their values (by state-dict key), on `device` in `dtype`
    (the keys in `exact` in the precision they are stored in); with `check`, every parameter
    must have one. `tensors` is emptied as it is used."""
    for key in list(tensors):
        value = tensors.pop(key)  # the stored copy goes as its computed copy arrives: one block in memory, not two
        owner_name, _, leaf = key.rpartition(".")
        owner = module.get_submodule(owner_name) if owner_name else module
        cast = dtype is not None and value.is_floating_point() and key not in exact
        value = value.to(device=device, dtype=dtype if cast else None)
        if leaf in owner._parameters:
            old = owner._parameters[leaf]
            if old is not None and tuple(old.shape) != tuple(value.shape):
                raise RankcutError(f"tensor {key} has shape {list(value.shape)} in the checkpoint, the model's "
                                   f"config makes {list(old.shape)}; the checkpoint does not fit its config")
            owner._parameters[leaf] = nn.Parameter(value, requires_grad=False)
        elif leaf in owner._buffers:
            owner._buffers[leaf] = value
        else:
            raise RankcutError(f"the checkpoint holds {key}, which the model does not have")
    missing = [n for n, p in module.named_parameters() if p.is_meta] if check else []
    if missing:
        raise RankcutError(f"the checkpoint lacks {missing[0]}; it does not fit the model's config")


def empty_(module: nn.Module, dtype: torch.dtype | None = None) -> None:
    """Drop every parameter's storage (meta tensors keep the shapes the next load fills, in the
    precision `dtype` the block is stored in, so that sizes count what is on disk); buffers,
    small and partly derived from the config rather than stored, stay."""
    for sub in module.modules():
        for leaf, param in list(sub._parameters.items()):
            if param is not None and not param.is_meta:
                kind = dtype if dtype is not None and param.is_floating_point() else param.dtype
                sub._parameters[leaf] = nn.Parameter(torch.empty_like(param, device="meta", dtype=kind),
                                                     requires_grad=param.requires_grad)


def scratch_beside(out: str | os.PathLike) -> Path:
    """A scratch folder on the output's file system, so finished shards move into place by rename."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in out.parent.glob(f".{out.name}.blocks-*"):  # a killed run's blocks; its checkpoint has them
        shutil.rmtree(stale, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.blocks-", dir=out.parent))
