"""A model opened for streaming: its architecture built without weights, only the parts outside the
repeated blocks (embeddings, final norm, head) read into memory, and each block's weights left in
the checkpoint's safetensors shards until a pass needs them (`StreamedResidency`).

This is how a model larger than memory is compressed (`--offload disk`), and how one that would
fit but barely is kept within bounds: peak memory is the embeddings, a block or two and the
calibration activations, whatever the depth.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..core.allocator import map_large_allocations
from ..core.errors import RankcutError
from ..core.record import record_of
from ..core.targets import find_blocks
from .models import _hub_reachable
from .pretrained import _auto_class_for, check_dtype, checkpoint_dtype
from .residency import StreamedResidency, compute_dtype_for, fill_, scratch_beside
from .saved import is_saved_folder
from .shards import ShardSource
from .zoo import STREAMABLE, TINY_BUILDERS, ZOO

log = logging.getLogger(__name__)

@dataclass
class StreamedModel:
    """A model whose blocks are on disk, and what streams them."""

    model: nn.Module
    source: ShardSource
    names: dict[str, str]  # the model's tensor name → the checkpoint's
    prefix: str
    blocks: nn.ModuleList
    dtype: torch.dtype

    def residency(self, out: str | os.PathLike, device: torch.device | str = "cpu") -> StreamedResidency:
        return StreamedResidency(self.blocks, self.prefix, self.source, self.names, scratch_beside(out),
                                 device=device, compute_dtype=compute_dtype_for(self.dtype), storage_dtype=self.dtype)


def open_streamed(folder: str | os.PathLike, dtype: torch.dtype | None = None) -> StreamedModel:
    """Build the model of a safetensors checkpoint folder with only its non-block tensors in memory."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoTokenizer

    # bounded memory is the point of streaming: a freed tensor must leave the resident size at once,
    # from the first one on (set once the heap is fragmented, it saves much less)
    map_large_allocations()
    folder = Path(folder)
    source = ShardSource(folder)
    source.check_files()
    try:
        config = AutoConfig.from_pretrained(folder)
    except (OSError, ValueError) as exc:
        raise RankcutError(f"{folder}/config.json is missing or unreadable ({str(exc).splitlines()[0]})") from None
    dtype = check_dtype(dtype or checkpoint_dtype(config))
    cls = _auto_class_for(config)
    with init_empty_weights(include_buffers=False):  # rotary tables and other derived buffers are made for real
        model = cls._from_config(config, dtype=dtype)
    model.eval()
    found = find_blocks(model)
    if found is None:
        raise RankcutError(f"{type(model).__name__} has no repeated blocks to stream; load it in memory "
                           "(drop --offload disk)")
    prefix, blocks = found
    names = _checkpoint_names(model, source)
    outside = {k: names[k] for k in model.state_dict() if not k.startswith(prefix + ".") and k in names}
    read = source.read(outside.values())
    fill_(model, {k: read.pop(v) for k, v in outside.items()}, torch.device("cpu"), dtype, check=False)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    stray = [n for n, p in model.named_parameters() if p.is_meta and not n.startswith(prefix + ".")]
    if stray:
        raise RankcutError(f"{folder} lacks {stray[0]}; the checkpoint does not fit its config")
    try:
        record_of(model).tokenizer = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError, TypeError) as exc:
        log.warning("no tokenizer found for %s (%s)", folder, exc)
        record_of(model).tokenizer = None
    record_of(model).source = str(folder)
    return StreamedModel(model, source, names, prefix, blocks, dtype)


def _checkpoint_names(model: nn.Module, source: ShardSource) -> dict[str, str]:
    """Each of the model's tensor names → the checkpoint's: the same, or with the base model's
    prefix added or dropped (a bare `LlamaModel` checkpoint read into `LlamaForCausalLM`). A
    tied output embedding has no name of its own in the checkpoint and is left out."""
    have = set(source.names())
    base = getattr(model, "base_model_prefix", "") or ""
    tied = set((getattr(model, "_tied_weights_keys", None) or {}) if getattr(model.config, "tie_word_embeddings",
                                                                             False) else ())
    names: dict[str, str] = {}
    for key in model.state_dict():
        for candidate in (key, key.removeprefix(base + ".") if base else key, f"{base}.{key}" if base else key):
            if candidate in have:
                names[key] = candidate
                break
        else:
            if key not in tied and not _derived_buffer(model, key):
                raise RankcutError(f"{source.folder} has no tensor for {key}; the checkpoint does not fit its "
                                   "config (or names its tensors in a way streaming does not map: load it in memory)")
    return names


def _derived_buffer(model: nn.Module, key: str) -> bool:
    owner, _, leaf = key.rpartition(".")
    module = model.get_submodule(owner) if owner else model
    return leaf in module._buffers


def streamable_folder(name: str) -> Path:
    """The safetensors folder a model name streams from: a zoo alias's cache, a local folder, or a
    hub id's downloaded snapshot."""

    path = Path(name)
    if name in STREAMABLE:
        return STREAMABLE[name]()
    if name in TINY_BUILDERS:
        raise RankcutError(f"'{name}' is built in memory and has no checkpoint to stream; save it with "
                           "save_pretrained and give that folder, or drop --offload disk")
    if name in ZOO:
        raise RankcutError(f"'{name}' ships as one small file, not safetensors shards; drop --offload disk")
    if path.is_dir():
        if is_saved_folder(path):
            raise RankcutError(f"{path} is a compressed model; streaming reads a dense checkpoint "
                               "(drop --offload disk to load it in memory)")
        return path
    if name.endswith(".gguf"):
        raise RankcutError("a .gguf file cannot be streamed; drop --offload disk (it is dequantized in memory)")
    if name.count("/") != 1:
        raise RankcutError(f"unknown model '{name}': not a zoo alias, an existing folder, or a Hugging Face id")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(name, allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model"],
                                      local_files_only=not _hub_reachable()))
    except Exception as exc:  # the hub client's errors name the repository already
        raise RankcutError(f"cannot fetch {name} from the hub or its cache ({str(exc).splitlines()[0]})") from None


def memory_available() -> int | None:
    """Bytes the kernel says a new allocation can take without swapping (MemAvailable); None off Linux."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def needs_streaming(folder: Path, dtype: torch.dtype | None, share: float = 0.6) -> bool:
    """Whether loading the checkpoint whole would take more than `share` of the memory available
    (compression needs room beside the model for statistics and factors)."""
    available = memory_available()
    if available is None:
        return False
    try:
        source = ShardSource(folder)
    except RankcutError:
        return False
    size = source.nbytes()
    if dtype is not None:
        from transformers import AutoConfig

        stored = checkpoint_dtype(AutoConfig.from_pretrained(folder))
        size = size * torch.tensor([], dtype=dtype).element_size() // torch.tensor([], dtype=stored).element_size()
    return size > share * available
