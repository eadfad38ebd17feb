"""Checkpoints of a fine-tune (weights, optimizer, step and history in one safetensors file
plus progress.json), so a killed heal or softrank run resumes to the same result."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.errors import RankcutError
from ..core.fsutil import atomic_dir, check_output
from .loop import trainable

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
