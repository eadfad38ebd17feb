"""Save and reload compressed models: safetensors weights, the model's config (Hugging Face-native,
with rankcut's quantization block) and tokenizer, and `rankcut.json` (method, per-module ranks
and form, source, version, checksum).

Loading never unpickles: transformers rebuilds the architecture from its config, rankcut's
quantizer swaps the recorded modules for empty factored ones of the recorded ranks, and the
safetensors file fills them. A folder is written to a temporary sibling and renamed into place,
so it is whole or absent.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from ..core.errors import RankcutError
from ..core.fsutil import atomic_dir, failed_write, sha256_file
from ..core.layout import fuse_shared_inputs_, storable
from ..core.machine import describe_machine, differences
from ..core.module_records import DENSE_FORMS, MANIFEST
from ..core.modules import count_bytes, count_params, dtype_name
from ..core.record import ModelRecord, record_of, set_record
from ..core.version import __version__
from .hf_native import RankcutQuantizationConfig, attach, is_rankcut_config
from .residency import StreamedResidency
from .shards import INDEX, save_shard, shard_name, write_index
from .zoo import ZOO

log = logging.getLogger(__name__)


FORMAT = "rankcut"
FORMAT_VERSION = 2  # 2: config.json is Hugging Face-native (rankcut.io.hf_native); 1 loads too
WEIGHTS = "model.safetensors"


def save(model: nn.Module, out_dir: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write `model` (compressed or not) to `out_dir`; returns the folder.

    The folder is a Hugging Face folder (see `rankcut.io.hf_native`): `from_pretrained` gives the
    compressed model back wherever rankcut is imported. `rankcut.json` adds what transformers has
    no place for: the weights' checksum and rankcut's record (method, budget, speed, training)."""
    from safetensors.torch import save_model

    out_dir = Path(out_dir)
    record = record_of(model)
    attach(model)

    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        with storable(model):  # fused views and column-major factors are saved as whole row-major tensors
            save_model(model, str(tmp / WEIGHTS), metadata={"format": "pt"})
        _write_beside_weights(model, record, tmp, dtype_name(model),
                              {"file": WEIGHTS, "sha256": sha256_file(tmp / WEIGHTS)})
    return out_dir


def _write_beside_weights(model: nn.Module, record: ModelRecord, folder: Path, dtype: str,
                          weights: dict[str, Any]) -> None:
    """Everything a saved folder holds besides its weights: the model's (and generation) config, the
    tokenizer, and `rankcut.json`, which names the weight files (`weights`) with their checksums."""
    model.config.save_pretrained(folder)
    generation = getattr(model, "generation_config", None)
    if generation is not None and getattr(model, "can_generate", lambda: False)():
        generation.save_pretrained(folder)
    if record.tokenizer is not None:
        record.tokenizer.save_pretrained(folder)
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "rankcut_version": __version__,
        "source_model": record.source,
        "model_class": type(model).__name__,
        "dtype": dtype,
        "weights": weights,
        "params": count_params(model),
        "bytes": count_bytes(model),
        **record.manifest_sections(),
    }
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")


def save_streamed(model: nn.Module, residency: StreamedResidency, out_dir: str | os.PathLike,
                  overwrite: bool = False) -> Path:
    """Write a streamed model (blocks on disk) as `save` writes one in memory, shard by shard.

    The parts outside the blocks go to the first shard; each block's shard is its scratch shard,
    moved into place (a block no pass changed is copied from the checkpoint). Peak memory is one
    block. The manifest holds each shard's checksum; an index names every tensor's shard, as
    Hugging Face's sharded folders do."""
    out_dir = Path(out_dir)
    record = record_of(model)
    attach(model)
    prefix = residency.prefix + "."
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        total = len(residency.blocks) + 1
        weight_map: dict[str, str] = {}
        held: set[int] = set()
        outside = {}
        for key, value in model.state_dict().items():
            if key.startswith(prefix) or value.is_meta or (value.numel() and value.data_ptr() in held):
                continue  # a tied head is the embedding's tensor under a second name
            held.add(value.data_ptr())
            outside[key] = value
        shards = [shard_name(1, total)]
        save_shard(outside, tmp / shards[0])
        weight_map.update(dict.fromkeys(outside, shards[0]))
        for index in range(len(residency.blocks)):
            file = shard_name(index + 2, total)
            scratch = residency.scratch_file(index)
            if not scratch.is_file():  # untouched: read from the checkpoint, written as the model names it
                residency.load(index)
                residency.unload(index, changed=True)
            with failed_write(tmp / file):
                os.replace(scratch, tmp / file)
            weight_map.update(dict.fromkeys(residency.block_names(index), file))
            shards.append(file)
        write_index(tmp, weight_map, sum((tmp / f).stat().st_size for f in shards))
        _write_beside_weights(model, record, tmp, str(residency.storage_dtype).replace("torch.", ""),
                              {"index": INDEX, "sha256": {f: sha256_file(tmp / f) for f in shards}})
    return out_dir


def _weight_files(folder: Path, manifest: dict[str, Any]) -> dict[Path, str | None]:
    """Each weight file of a saved folder → its recorded checksum (None where none was recorded)."""
    weights = manifest.get("weights", {})
    if "index" in weights:
        sums = weights.get("sha256") or {}
        try:
            files = sorted(set(json.loads((folder / weights["index"]).read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError) as exc:
            raise RankcutError(f"{folder / weights['index']} is missing or unreadable ({exc}); save the model "
                               "again") from None
        return {folder / f: sums.get(f) for f in files}
    return {folder / weights.get("file", WEIGHTS): weights.get("sha256")}


def read_manifest(folder: str | os.PathLike) -> dict[str, Any]:
    folder = Path(folder)
    path = folder / MANIFEST
    if not folder.is_dir():
        if str(folder) in ZOO:  # a dense model's name where a compressed one was meant
            raise RankcutError(f"'{folder}' is a dense model, not a saved compressed one: compress it first "
                               f"(`rankcut compress {folder} ... --out DIR`) and give DIR")
        what = f"{folder} is a file, not a saved model folder" if folder.exists() else \
            f"saved model folder {folder} does not exist"
        raise RankcutError(f"{what}; give the --out folder of `rankcut compress` (or of rankcut.save)")
    if not path.is_file():
        from_hf = _manifest_of_hf_folder(folder)
        if from_hf is not None:
            return from_hf
        raise RankcutError(f"{folder} has no {MANIFEST}: not a rankcut-saved model (save it with rankcut.save)")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RankcutError(f"{path} is corrupted ({exc}); save the model again") from None
    if manifest.get("format") != FORMAT or not isinstance(manifest.get("modules"), dict):
        raise RankcutError(f"{path} is not a rankcut manifest; save the model again")
    if manifest.get("format_version", 0) > FORMAT_VERSION:
        raise RankcutError(f"{folder} was written by a newer rankcut (format "
                           f"{manifest['format_version']}); upgrade rankcut to load it")
    return manifest


def _manifest_of_hf_folder(folder: Path) -> dict[str, Any] | None:
    """What a folder written by `save_pretrained` of a rankcut model says of itself, in the
    manifest's terms (it has no checksum to check); None for any other folder."""
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(config, dict) or not is_rankcut_config(config):
        return None
    classes = config.get("architectures") or []
    sharded = (folder / INDEX).is_file()
    if not classes or not (sharded or (folder / WEIGHTS).is_file()):
        raise RankcutError(f"{folder} is a rankcut model saved with save_pretrained but "
                           f"{'has no architectures in config.json' if not classes else 'has no ' + WEIGHTS}"
                           "; load it with transformers' from_pretrained")
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "model_class": classes[0],
            "dtype": config.get("dtype") or config.get("torch_dtype") or "float32",
            "weights": {"index": INDEX} if sharded else {"file": WEIGHTS},
            "modules": config["quantization_config"].get("modules") or {}}


def _model_class(name: str) -> type:
    import transformers
    from transformers import PreTrainedModel

    cls = getattr(transformers, str(name), None)
    if not (isinstance(cls, type) and issubclass(cls, PreTrainedModel)):
        raise RankcutError(f"{MANIFEST} names model class '{name}', which this transformers does not have")
    return cls


def load(folder: str | os.PathLike, verify: bool = True, fast: bool = False) -> nn.Module:
    """Rebuild a model saved by `save` (or by `save_pretrained` of a rankcut model).

    transformers' `from_pretrained` does the loading, through rankcut's quantizer; this adds the
    checks it does not make: the weights' checksum (a truncated or altered file), and every tensor
    present, none left over (transformers would fill a missing one at random and warn). Folders of
    the first format, whose config.json is the dense model's own, load the same way: the records
    come from rankcut.json.

    `fast=True`: siblings that share an input get one stacked first-factor matmul
    (rankcut.core.layout); the outputs are the plain factors' up to float rounding. Off by default:
    on a 2-core CPU it measured no faster."""
    from transformers import AutoConfig

    folder = Path(folder)
    manifest = read_manifest(folder)
    files = _weight_files(folder, manifest)
    for weights, expected in files.items():
        if not weights.is_file():
            raise RankcutError(f"weight file {weights} is missing; the saved model is incomplete, save it again")
        if verify and expected and sha256_file(weights) != expected:
            raise RankcutError(f"weight file {weights} is corrupted (checksum mismatch); save the model again")
    weights = next(iter(files)) if len(files) == 1 else folder
    try:
        config = AutoConfig.from_pretrained(folder)
    except (OSError, ValueError) as exc:
        raise RankcutError(f"{folder}/config.json is missing or unreadable ({exc}); save the model again") from None
    if any(isinstance(rec, dict) and rec.get("form") not in DENSE_FORMS for rec in manifest["modules"].values()):
        # rankcut.json's records are the ones checked against the weights (the first format has no others)
        config.quantization_config = RankcutQuantizationConfig(
            modules=manifest["modules"], base_model_type=type(config).model_type).to_dict()
    dtype = getattr(torch, str(manifest.get("dtype", "float32")), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise RankcutError(f"{MANIFEST} records dtype {manifest.get('dtype')!r}, not a torch floating dtype; "
                           "save the model again")
    model = _from_pretrained(_model_class(manifest["model_class"]), folder, config, dtype, weights)
    set_record(model, ModelRecord.from_manifest(manifest, _load_tokenizer(folder)))
    _warn_if_timed_elsewhere(folder, manifest)
    if fast:
        fuse_shared_inputs_(model)
    return model


def _from_pretrained(cls: type, folder: Path, config: Any, dtype: torch.dtype, weights: Path) -> nn.Module:
    """`cls.from_pretrained`, with every way the weights can fail to fit named in one line."""
    from safetensors import SafetensorError

    try:
        with _quiet_transformers():
            model, info = cls.from_pretrained(folder, config=config, dtype=dtype, output_loading_info=True,
                                               ignore_mismatched_sizes=True)  # named below, in one line
    except RankcutError:
        raise
    except (SafetensorError, OSError, RuntimeError, ValueError) as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        mismatch = next((line for line in lines if "size mismatch" in line or "shape" in line), None)
        if mismatch:  # the records' shapes and the weights disagree: name the tensor, not torch's header
            raise RankcutError(f"weight file {weights} does not fit {MANIFEST} ({mismatch.rstrip('.')}); "
                               "save the model again") from None
        raise RankcutError(f"weight file {weights} is unreadable ({lines[0] if lines else type(exc).__name__}); "
                           "save the model again") from None
    for mismatch in sorted(info.get("mismatched_keys") or [], key=str):
        key, *shapes = mismatch if isinstance(mismatch, (tuple, list)) else (mismatch,)
        said = f": the file holds {list(shapes[0])}, the records make {list(shapes[1])}" if len(shapes) == 2 else ""
        raise RankcutError(f"weight file {weights} does not fit {MANIFEST} (size mismatch for {key}{said}); "
                           "save the model again")
    problems = [*info.get("missing_keys", []), *info.get("unexpected_keys", [])]
    if problems:
        raise RankcutError(f"weight file {weights} does not fit the recorded model "
                           f"(e.g. {sorted(problems)[0]}); save the model again")
    model.eval()
    return model


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """transformers' own loading report and progress bar: rankcut checks the same and says it in one line."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def _warn_if_timed_elsewhere(folder: Path, manifest: dict[str, Any]) -> None:
    """The layouts, dense modules and rank caps of `--speed` are this machine's measurements;
    on another one the model is the same map but may run slower than a cut timed there."""

    recorded = (manifest.get("speed") or {}).get("machine")
    if not isinstance(recorded, dict):
        return
    changed = differences(recorded, describe_machine("cpu"))
    if changed:
        log.warning("%s: its --speed decisions (layouts, modules kept dense%s) were timed on another machine "
                    "(%s); the model computes the same, but `rankcut compress ... --speed` on this machine picks "
                    "for it", folder, ", speed limits" if manifest.get("speed_limits") else "", "; ".join(changed))


def _load_tokenizer(folder: Path) -> Any:
    from transformers import AutoTokenizer

    if not any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt")):
        return None
    return AutoTokenizer.from_pretrained(folder)


def is_saved_folder(folder: Path) -> bool:
    """A folder `rankcut.load` reads: one `rankcut.save` wrote, or `save_pretrained` of a rankcut model."""
    if (folder / MANIFEST).is_file():
        return True
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and is_rankcut_config(config)
