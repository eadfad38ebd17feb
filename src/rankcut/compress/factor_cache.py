"""Full-rank factors cached on disk per model, method and calibration, so a sweep's
configuration costs a truncation and not a factorization."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..calibration.sources import Calibration
from ..core.fsutil import atomic_dir, cache_root
from ..core.layers import LowRankLinear
from ..core.modules import swap_module
from ..core.record import record_of
from ..core.targets import select_targets
from ..methods.base import config_class
from .apply import compress_

# --------------------------------------------------------------------------- factor cache


def cache_key(model_name: str, method: str, calibration: dict[str, Any] | None) -> str:
    blob = json.dumps({"model": model_name, "method": method, "calibration": calibration}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


class FactorCache:
    """Full-rank factors of every target, on disk (safetensors), sliced per configuration."""

    def __init__(self, model: nn.Module, model_name: str, method: str, folder: Path | None = None,
                 calibration: Any = None, progress: bool = True) -> None:
        self.method = "svd" if method == "tucker" else method
        cls = config_class(self.method)
        calib_desc = calibration.describe() if calibration is not None else None
        self.folder = Path(folder or cache_root() / "factors") / cache_key(model_name, self.method, calib_desc)
        self.file = self.folder / "factors.safetensors"
        self.factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.importance: dict[str, torch.Tensor] = {}
        if self.file.is_file():
            self._read()
        else:
            self._build(model, cls, calibration, progress)

    def _read(self) -> None:
        from safetensors.torch import load_file

        tensors = load_file(str(self.file))
        names = {k.rsplit(".", 1)[0] for k in tensors}
        self.factors = {n: (tensors[f"{n}.out"], tensors[f"{n}.in"]) for n in names}
        self.importance = {n: tensors[f"{n}.importance"] for n in names if f"{n}.importance" in tensors}

    def _build(self, model: nn.Module, cls: type, calibration: Any, progress: bool) -> None:
        """Factor a throwaway copy of every target at full rank, then put the dense modules back."""
        from safetensors.torch import save_file


        targets = select_targets(model)
        originals = {t.name: t.module for t in targets}
        kwargs: dict[str, Any] = {}
        if cls.needs:
            base = calibration or Calibration()
            kwargs["calibration"] = Calibration(**{**base.__dict__, "sequential": False})
        overrides = {f"^{t.name}$": cls(rank=t.max_rank, allow_growth=True, **kwargs) for t in targets}
        record = record_of(model)
        kept_modules, kept_config = dict(record.modules), record.config
        report = compress_(model, cls(rank=1, allow_growth=True, **kwargs), overrides=overrides, progress=progress)
        self.importance = {n: v.float() for n, v in report.importance.items()}
        try:
            for name in originals:
                layer = model.get_submodule(name)
                self.factors[name] = (layer.out_factor.detach().clone(), layer.in_factor.detach().clone())
        finally:
            for name, module in originals.items():
                swap_module(model, name, module)
            record.modules, record.config = kept_modules, kept_config
        with atomic_dir(self.folder, overwrite=True) as tmp:
            tensors = {f"{n}.{side}": t.contiguous() for n, (o, i) in self.factors.items()
                       for side, t in (("out", o), ("in", i))}
            tensors.update({f"{n}.importance": v.contiguous() for n, v in self.importance.items()})
            save_file(tensors, str(tmp / "factors.safetensors"))

    def layer(self, name: str, rank: int, bias: torch.Tensor | None) -> LowRankLinear:
        out_f, in_f = self.factors[name]
        return LowRankLinear.from_factors(out_f[:, :rank], in_f[:rank], bias=bias, dtype=out_f.dtype)
