"""Per-target statistics parked on disk while a compression runs.

The curvature method's output covariances are out × out per target: a whole model's worth (1.4
GB in float64 for SmolLM2, 80 GB for a 7B model) would dwarf the model, yet the block pass reads
only one block's at a time. Each is written to its own file as soon as it is complete and read
back when its block is cut; the folder goes when the object does.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


class SpilledStatistics(Mapping[str, torch.Tensor]):
    """A read-only mapping name → tensor whose values live in a temporary folder."""

    def __init__(self) -> None:
        self._dir = tempfile.TemporaryDirectory(prefix="rankcut-stats-")
        self._files: dict[str, Path] = {}

    def put(self, name: str, tensor: torch.Tensor) -> None:
        path = Path(self._dir.name) / f"{len(self._files)}.safetensors"
        save_file({"value": tensor.detach().contiguous().cpu()}, str(path))
        self._files[name] = path

    def __getitem__(self, name: str) -> torch.Tensor:
        return load_file(str(self._files[name]))["value"]

    def __iter__(self) -> Iterator[str]:
        return iter(self._files)

    def __len__(self) -> int:
        return len(self._files)
