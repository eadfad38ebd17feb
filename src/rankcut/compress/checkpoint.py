"""Block-by-block checkpoints of a `compress_` call, so a long compression resumes where it stopped.

A large model's calibrated pass runs for an hour or more; without this, a crash or a killed job
at block 28 of 32 starts over from block 0. After each block the folder gets that block's factors
(or, in a two-pass budget's first pass, its direction worths) as one safetensors file, written
atomically, and `progress.json` lists the blocks done. A resumed call rebuilds the finished blocks
from disk and replays the calibration stream through them, so every later block sees exactly
the inputs it would have seen in an uninterrupted run: the result is the same, bit for bit.

What is drawn once per run (the calibration windows, the dense model's output Fisher) is stored
too, since a Fisher pass costs minutes on a large model. The run's fingerprint (the modules, each
one's config, and a sample of every dense weight) guards against resuming with other settings.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import nn

from ..core.errors import RankcutError
from ..core.fsutil import check_output, failed_write

PROGRESS = "progress.json"


def _is_checkpoint_file(name: str) -> bool:
    return name == PROGRESS or (name.endswith(".safetensors") and name.startswith(("block-", "run-")))


def run_fingerprint(model: nn.Module, plan: list[tuple[Any, Any]],
                    sample: Callable[[Any], torch.Tensor] | None = None) -> dict[str, Any]:
    """What a resumed call must share with the interrupted one: the targets, their configs, and
    the dense weights (a strided sample of each, hashed; a different fine-tune of the same
    architecture differs there). `sample`: where the weights are not in memory (a streamed
    model), what stands for each target's weight instead."""
    digest = hashlib.sha256()
    for target, _ in plan:
        weight = (sample(target) if sample is not None else target.module.weight).detach()
        digest.update(weight.reshape(-1)[::997].contiguous().float().cpu().numpy().tobytes())
    return {"modules": {t.name: cfg.to_dict() for t, cfg in plan}, "weights": digest.hexdigest(),
            "model_class": type(model).__name__}


def check_checkpoint_folder(folder: str | os.PathLike, resume: bool) -> bool:
    """Before any work: whether `folder` holds a checkpoint to resume (True) or may take a new one
    (False); a resume with nothing to resume, a fresh run over an old checkpoint, or a folder
    holding other files is refused."""
    folder = Path(folder)
    found = (folder / PROGRESS).is_file()
    if resume and not found:
        raise RankcutError(f"--resume: no compression checkpoint in {folder}; run without --resume to start")
    if not resume and found:
        raise RankcutError(f"{folder} holds a compression checkpoint already: pass --resume to continue it, "
                           "or delete it")
    if folder.exists() and not folder.is_dir():
        raise RankcutError(f"checkpoint {folder} is a file; give a folder for --checkpoint")
    if not found:
        foreign = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
        if foreign:
            raise RankcutError(f"checkpoint folder {folder} is not empty (e.g. {foreign[0]}); give a new "
                               "or empty folder")
        check_output(folder, overwrite=True)
    return found


def read_progress(folder: str | os.PathLike) -> dict[str, Any]:
    try:
        progress = json.loads((Path(folder) / PROGRESS).read_text())
        if not isinstance(progress["done"], dict) or not isinstance(progress["fingerprint"], dict):
            raise ValueError("bad progress record")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise RankcutError(f"checkpoint {folder} is unreadable ({exc}); delete it to start over") from None
    return progress


def recorded_speed_limits(folder: str | os.PathLike) -> dict[str, int] | None:
    """The speed limits an interrupted `--budget --speed` run measured: a resumed run must
    allocate under the same ones (timings differ from run to run)."""
    for cfg in read_progress(folder)["fingerprint"].get("modules", {}).values():
        return cfg.get("speed_limits")
    return None


class CompressCheckpoint:
    """One compression run's progress on disk: the blocks done per stage, and their tensors."""

    def __init__(self, folder: str | os.PathLike, fingerprint: dict[str, Any], resume: bool) -> None:
        self.folder = Path(folder)
        found = check_checkpoint_folder(self.folder, resume)
        if not found:
            self.progress: dict[str, Any] = {"fingerprint": fingerprint, "done": {}}
            with failed_write(self.folder):
                self.folder.mkdir(parents=True, exist_ok=True)
            self._write_progress()
            return
        self.progress = read_progress(self.folder)
        saved = self.progress["fingerprint"]
        if saved != json.loads(json.dumps(fingerprint)):
            raise RankcutError(f"checkpoint {self.folder} belongs to a different compression (model, targets or "
                               "settings differ); run with the same ones, or delete it to start over")

    # ----------------------------------------------------------------- blocks

    def done(self, stage: str, block: str | int) -> bool:
        return str(block) in self.progress["done"].get(stage, [])

    def blocks_done(self, stage: str) -> int:
        return len(self.progress["done"].get(stage, []))

    def save_block(self, stage: str, block: str | int, tensors: Mapping[str, torch.Tensor],
                   meta: dict[str, Any] | None = None) -> None:
        """A finished block's tensors, and `meta` (JSON: e.g. the module records), then its mark."""
        self._save_tensors(f"block-{stage}-{block}.safetensors", tensors, meta)
        self.progress["done"].setdefault(stage, []).append(str(block))
        self._write_progress()

    def load_block(self, stage: str, block: str | int) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """A block's tensors and record. They are views of the file's memory map: copy what is kept
        beyond the restore, or the whole file stays mapped."""
        return self._load_tensors(f"block-{stage}-{block}.safetensors")

    # ----------------------------------------------------------------- once per run

    def once(self, key: str, make: Callable[[], Mapping[str, torch.Tensor]]) -> Mapping[str, torch.Tensor]:
        """`make()`'s tensors, computed and stored on the first call, read back on a resumed one."""
        name = f"run-{key}.safetensors"
        if key in self.progress.get("once", []):
            return self._load_tensors(name)[0]
        tensors = make()
        self._save_tensors(name, dict(tensors))  # a mapping spilled to disk is gathered to be stored
        self.progress.setdefault("once", []).append(key)
        self._write_progress()
        return tensors

    @staticmethod
    def remove_folder(folder: str | os.PathLike) -> None:
        """Delete a checkpoint once its result is saved elsewhere: only the files it wrote, and the
        folder if that leaves it empty."""
        folder = Path(folder)
        if not folder.is_dir():
            return
        for path in folder.iterdir():
            if _is_checkpoint_file(path.name) or path.name.startswith((f".{PROGRESS}.", ".block-", ".run-")):
                path.unlink()
        try:
            folder.rmdir()
        except OSError:
            pass

    # ----------------------------------------------------------------- files

    def _save_tensors(self, name: str, tensors: Mapping[str, torch.Tensor], meta: dict[str, Any] | None = None
                      ) -> None:
        from safetensors.torch import save_file

        with failed_write(self.folder / name):
            fd, tmp = tempfile.mkstemp(prefix=f".{name}.", dir=self.folder)
            os.close(fd)
            try:
                save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp,
                          metadata={"rankcut": json.dumps(meta or {})})
                os.replace(tmp, self.folder / name)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)

    def _load_tensors(self, name: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(self.folder / name), framework="pt") as f:
                tensors = {k: f.get_tensor(k) for k in f.keys()}
                meta = json.loads((f.metadata() or {}).get("rankcut", "{}"))
            return tensors, meta
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise RankcutError(f"checkpoint file {self.folder / name} is unreadable ({exc}); delete the checkpoint "
                               "to start over") from None

    def _write_progress(self) -> None:
        with failed_write(self.folder / PROGRESS):
            fd, tmp = tempfile.mkstemp(prefix=f".{PROGRESS}.", dir=self.folder)
            with os.fdopen(fd, "w") as f:
                json.dump(self.progress, f, indent=1)
            os.replace(tmp, self.folder / PROGRESS)
