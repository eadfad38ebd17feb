"""Safetensors checkpoints read and written one group of tensors at a time.

A model larger than memory is compressed block by block: each block's weights are read from
the checkpoint's shards only when the block is needed (`safe_open` maps the file and copies out
only the tensors asked for), and each finished block is written to an output shard at once. A
shard that is missing, truncated or unreadable is named in one line, at the block that needed it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable

import torch

from ..core.errors import RankcutError
from ..core.fsutil import failed_write

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"


class ShardSource:
    """The tensors of a safetensors checkpoint folder (one file, or shards with an index), by name."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        index = self.folder / INDEX
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise RankcutError(f"{index} is unreadable ({exc}); download or save the model again") from None
            self.files = {str(k): str(v) for k, v in weight_map.items()}
        elif (self.folder / SINGLE).is_file():
            self.files = {name: SINGLE for name in self._names(SINGLE)}
        else:
            raise RankcutError(f"{self.folder} holds no {SINGLE} or {INDEX}: streaming reads safetensors "
                               "checkpoints (load a .bin or .gguf model in memory, without --offload disk)")
        self._checked: set[str] = set()

    def _names(self, file: str) -> list[str]:
        from safetensors import safe_open

        try:
            with safe_open(str(self.folder / file), framework="pt") as handle:
                return list(handle.keys())
        except FileNotFoundError:
            raise RankcutError(f"shard {self.folder / file} is missing; download or copy the model again") from None
        except Exception as exc:  # safetensors raises its own error types for a cut or garbled header
            raise RankcutError(f"shard {self.folder / file} is unreadable or truncated "
                               f"({str(exc).splitlines()[0]}); download or copy the model again") from None

    def names(self) -> list[str]:
        return list(self.files)

    def file_of(self, name: str) -> Path:
        return self.folder / self.files[name]

    def check_files(self) -> None:
        """Every shard the index names is present, and its header is whole: checked before any work,
        so a missing shard is not found an hour into a run."""
        for file in sorted(set(self.files.values())):
            path = self.folder / file
            if not path.is_file():
                raise RankcutError(f"shard {path} is missing; download or copy the model again")
            self._check_size(file)

    def _check_size(self, file: str) -> None:
        """A shard cut short keeps its header; the tensors it promises then end past the file's end."""
        if file in self._checked:
            return
        import struct

        path = self.folder / file
        try:
            with open(path, "rb") as fh:
                header_len = struct.unpack("<Q", fh.read(8))[0]
                header = json.loads(fh.read(header_len))
        except (OSError, ValueError, struct.error) as exc:
            raise RankcutError(f"shard {path} is unreadable or truncated ({exc}); download or copy the model again") \
                from None
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
        if path.stat().st_size < 8 + header_len + end:
            raise RankcutError(f"shard {path} is truncated ({path.stat().st_size:,} bytes, its header promises "
                               f"{8 + header_len + end:,}); download or copy the model again")
        self._checked.add(file)

    def read(self, names: Iterable[str], device: str | torch.device = "cpu",
             copy: bool = False) -> dict[str, torch.Tensor]:
        """The named tensors of their shards (each shard opened once).

        On the CPU a tensor is a view of the shard's memory map: pages count in memory only once
        touched (an embedding's few looked-up rows, not the whole table), but the touched ones stay
        until every tensor of that shard is gone. With `copy`, each tensor is copied out and its map
        dropped at once, so a tensor's memory goes when the tensor does: what a block read for
        factorization needs, where each dense weight is replaced and freed in turn."""
        from safetensors import safe_open

        by_file: dict[str, list[str]] = {}
        for name in names:
            if name not in self.files:
                raise RankcutError(f"{self.folder} has no tensor {name}; the checkpoint does not fit its config")
            by_file.setdefault(self.files[name], []).append(name)
        out: dict[str, torch.Tensor] = {}
        for file, wanted in by_file.items():
            path = self.folder / file
            if not path.is_file():
                raise RankcutError(f"shard {path} is missing; download or copy the model again")
            self._check_size(file)
            try:
                if copy:
                    for name in wanted:
                        out[name] = _copy_of(path, name, device)
                else:
                    with safe_open(str(path), framework="pt", device=str(device)) as handle:
                        for name in wanted:
                            out[name] = handle.get_tensor(name)
            except Exception as exc:
                raise RankcutError(f"shard {path} is unreadable ({str(exc).splitlines()[0]}); "
                                   "download or copy the model again") from None
        return out

    def first_rows(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        """Each tensor's first row: a cheap sample that tells one checkpoint's weights from another's."""
        from safetensors import safe_open

        out: dict[str, torch.Tensor] = {}
        for name in names:
            with safe_open(str(self.file_of(name)), framework="pt") as handle:
                out[name] = handle.get_slice(name)[0:1]
        return out

    def nbytes(self) -> int:
        return sum((self.folder / f).stat().st_size for f in set(self.files.values()))


def _copy_of(path: Path, name: str, device: str | torch.device = "cpu") -> torch.Tensor:
    """One tensor, copied out of a map of its own that is closed before this returns."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device=str(device)) as handle:
        view = handle.get_tensor(name)
    return view.clone() if view.device.type == "cpu" else view


def read_copied(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every tensor of one safetensors file, each a copy (see `ShardSource.read`)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        keys = list(handle.keys())
    return {key: _copy_of(Path(path), key) for key in keys}


def save_shard(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Write one shard through a temporary sibling: a full disk leaves no partial file behind."""
    from safetensors.torch import save_file

    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with failed_write(path):
            save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp),
                      metadata={"format": "pt"})
            os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def shard_name(number: int, total: int) -> str:
    """Hugging Face's shard naming, so any loader that reads an index reads these."""
    return f"model-{number:05d}-of-{total:05d}.safetensors"


def write_index(folder: Path, weight_map: dict[str, str], total_bytes: int) -> None:
    text = json.dumps({"metadata": {"total_size": total_bytes}, "weight_map": dict(sorted(weight_map.items()))},
                      indent=2)
    with failed_write(folder / INDEX):
        (folder / INDEX).write_text(text + "\n")
