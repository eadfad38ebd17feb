"""`load_model`: a dense model (or a saved compressed one) by zoo alias, folder, `.gguf` file or
Hugging Face hub id, with its tokenizer attached; a typo gets one line naming what exists."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from ..core.errors import RankcutError
from ..core.record import record_of
from .pretrained import DTYPE_NAMES, _load_pretrained_folder, load_gguf
from .saved import is_saved_folder, load
from .zoo import ZOO


def load_model(name: str | os.PathLike, dtype: torch.dtype | str | None = None) -> nn.Module:
    """Load a model by zoo alias, local folder (plain or rankcut-compressed), `.gguf` file or hub id.

    `dtype`: the precision to load in; by default the one the checkpoint was saved in (a GGUF
    file is dequantized to float32, tiny test models are float32). Returns the model in eval
    mode, with its record's tokenizer and source set (`record_of`).
    """
    name = str(name)
    path = Path(name)
    dtype = parse_dtype(dtype)
    if name in ZOO:
        model = ZOO[name](dtype=dtype)
    elif path.is_dir() and is_saved_folder(path):
        model = load(path)
        if dtype is not None:
            model.to(dtype)
        return model
    elif path.is_dir():
        if not (path / "config.json").is_file():
            raise RankcutError(f"folder {path} has no config.json: not a saved model")
        model = _load_pretrained_folder(name, dtype=dtype)
    elif name.endswith(".gguf"):
        model = load_gguf(path)
        if dtype is not None:
            model.to(dtype)
    else:
        model = _load_from_hub(name, dtype)
    model.eval()
    record_of(model).source = name
    return model


def parse_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """`--dtype`'s value: None or "auto" for the checkpoint's own precision."""
    if dtype is None or isinstance(dtype, torch.dtype) or dtype == "auto":
        return None if dtype == "auto" else dtype
    if dtype not in DTYPE_NAMES:
        raise RankcutError(f"dtype '{dtype}' is not one rankcut computes in; give auto, {', '.join(DTYPE_NAMES)}")
    return getattr(torch, dtype)


def _load_from_hub(name: str, dtype: torch.dtype | None = None) -> nn.Module:
    if name.count("/") != 1 or name.startswith((".", "/", "~")):
        raise RankcutError(_unknown(name))
    offline = not _hub_reachable()
    parent = Path(name).parent
    if offline and parent.is_dir():  # `out/smol-svd` with `out/` here: a path with a typo
        raise RankcutError(_no_folder(name, parent))
    try:
        # with no route to the hub only the local cache can answer, and it answers at once instead
        # of after the hub client's half a minute of retries
        return _load_pretrained_folder(name, dtype=dtype, **({"local_files_only": True} if offline else {}))
    except (OSError, ValueError) as exc:
        if parent.is_dir():
            raise RankcutError(f"{_no_folder(name, parent)}; nor is it on the hub") from None
        said = "the hub is unreachable from here and the id is not in the local cache" if offline \
            else f"hub said: {str(exc).splitlines()[0]}"
        raise RankcutError(f"{_unknown(name)} ({said})") from None


def _no_folder(name: str, parent: Path) -> str:
    return f"folder {name} does not exist ({parent}/ holds: {_listing(parent)})"


def _listing(folder: Path, most: int = 8) -> str:
    names = sorted(p.name for p in folder.iterdir())
    if not names:
        return "nothing"
    return ", ".join(names[:most]) + (f" and {len(names) - most} more" if len(names) > most else "")


def _hub_reachable() -> bool:
    """Whether the hub's host name resolves: offline, the hub client retries every request for
    about 25 s before giving up, printing a warning each time."""
    import socket
    from urllib.parse import urlparse

    try:
        from huggingface_hub import constants
    except ImportError:
        return False
    if constants.HF_HUB_OFFLINE:
        return False
    host = urlparse(constants.ENDPOINT).hostname
    try:
        socket.getaddrinfo(host, 443)
    except (OSError, UnicodeError):
        return False
    return True


def _unknown(name: str) -> str:
    return (
        f"unknown model '{name}': not a zoo alias ({', '.join(ZOO)}), an existing folder, "
        "a .gguf file, or a reachable Hugging Face id"
    )
