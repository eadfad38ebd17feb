"""Save and reload compressed models: safetensors weights, the model's own config and
tokenizer, and `rankcut.json` (method, per-module ranks and form, source, version, checksum).

Loading never unpickles: the architecture is rebuilt from its config, the recorded modules are
swapped for empty `LowRankLinear`s (or pivoted ones) of the recorded ranks, and the safetensors file fills them.
A folder is written to a temporary sibling and renamed into place, so it is whole or absent.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.errors import RankcutError
from ..core.fsutil import atomic_dir, sha256_file
from ..core.layers import PivotLowRankLinear
from ..core.layout import fuse_shared_inputs_, set_column_major_, storable
from ..core.machine import describe_machine, differences
from ..core.module_records import MANIFEST, empty_factored
from ..core.modules import count_bytes, count_params, dtype_name, swap_module
from ..core.record import ModelRecord, record_of, set_record
from ..core.version import __version__
from .zoo import ZOO

log = logging.getLogger(__name__)


FORMAT = "rankcut"
FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"


def save(model: nn.Module, out_dir: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write `model` (compressed or not) to `out_dir`; returns the folder."""
    from safetensors.torch import save_model

    out_dir = Path(out_dir)
    record = record_of(model)

    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        with storable(model):  # fused views and column-major factors are saved as whole row-major tensors
            save_model(model, str(tmp / WEIGHTS), metadata={"format": "pt"})
        model.config.save_pretrained(tmp)
        if record.tokenizer is not None:
            record.tokenizer.save_pretrained(tmp)
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "rankcut_version": __version__,
            "source_model": record.source,
            "model_class": type(model).__name__,
            "dtype": dtype_name(model),
            "weights": {"file": WEIGHTS, "sha256": sha256_file(tmp / WEIGHTS)},
            "params": count_params(model),
            "bytes": count_bytes(model),
            **record.manifest_sections(),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
    return out_dir


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


def _model_class(name: str) -> type:
    import transformers
    from transformers import PreTrainedModel

    cls = getattr(transformers, str(name), None)
    if not (isinstance(cls, type) and issubclass(cls, PreTrainedModel)):
        raise RankcutError(f"{MANIFEST} names model class '{name}', which this transformers does not have")
    return cls


def _empty_model(cls: type, config: Any) -> nn.Module:
    """Build the architecture without spending time on random initialisation."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older layout
        from transformers.modeling_utils import no_init_weights
    with no_init_weights():
        model = cls(config)
    model.tie_weights()  # skipped under no_init_weights; the file stores tied tensors once
    return model


def load(folder: str | os.PathLike, verify: bool = True, fast: bool = False) -> nn.Module:
    """Rebuild a model saved by `save`; the checksum catches a truncated or altered weight file.

    `fast=True`: siblings that share an input get one stacked first-factor matmul
    (rankcut.core.layout); the outputs are the plain factors' up to float rounding. Off by default:
    on a 2-core CPU it measured no faster."""
    from safetensors import SafetensorError
    from safetensors.torch import load_model
    from transformers import AutoConfig

    folder = Path(folder)
    manifest = read_manifest(folder)
    weights = folder / manifest.get("weights", {}).get("file", WEIGHTS)
    if not weights.is_file():
        raise RankcutError(f"weight file {weights} is missing; the saved model is incomplete, save it again")
    expected = manifest.get("weights", {}).get("sha256")
    if verify and expected and sha256_file(weights) != expected:
        raise RankcutError(f"weight file {weights} is corrupted (checksum mismatch); save the model again")
    try:
        config = AutoConfig.from_pretrained(folder)
    except (OSError, ValueError) as exc:
        raise RankcutError(f"{folder}/config.json is missing or unreadable ({exc}); save the model again") from None
    model = _empty_model(_model_class(manifest["model_class"]), config)
    dtype = getattr(torch, str(manifest.get("dtype", "float32")), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise RankcutError(f"{MANIFEST} records dtype {manifest.get('dtype')!r}, not a torch floating dtype; "
                           "save the model again")
    model.to(dtype)
    for name, rec in manifest["modules"].items():
        try:
            model.get_submodule(name)
        except AttributeError:
            raise RankcutError(f"{MANIFEST} names module {name}, which the model does not have") from None
        empty = empty_factored(name, rec, dtype)
        if empty is None:  # left or put back dense: the skeleton's own module
            continue
        _restore_layout(empty, name, rec.get("column_major", []))
        if rec.get("tokens_as_columns"):
            if not isinstance(empty, PivotLowRankLinear):
                raise RankcutError(f"{MANIFEST} entry for {name} lays out tokens as columns, which only a pivoted "
                                   "module does; save the model again")
            empty.tokens_as_columns = True
        swap_module(model, name, empty)
    try:
        missing, unexpected = load_model(model, str(weights), strict=False)
    except (SafetensorError, OSError, RuntimeError, ValueError) as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        mismatch = next((line for line in lines if line.startswith("size mismatch")), None)
        if mismatch:  # the manifest's shapes and the weights disagree: name the tensor, not torch's header
            raise RankcutError(f"weight file {weights} does not fit {MANIFEST} ({mismatch.rstrip('.')}); "
                               "save the model again") from None
        raise RankcutError(f"weight file {weights} is unreadable ({lines[0] if lines else type(exc).__name__}); "
                           "save the model again") from None
    missing_set = set(missing)
    problems = [k for k in missing if not _shares_storage_with_loaded(model, k, missing_set)]
    problems += list(unexpected)
    if problems:
        raise RankcutError(f"weight file {weights} does not fit the recorded model "
                           f"(e.g. {problems[0]}); save the model again")
    model.eval()
    set_record(model, ModelRecord.from_manifest(manifest, _load_tokenizer(folder)))
    _warn_if_timed_elsewhere(folder, manifest)
    if fast:
        fuse_shared_inputs_(model)
    return model


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


def _restore_layout(layer: nn.Module, name: str, column_major: list[str]) -> None:
    """`speed_up_` stored these factors column-major (faster here); the file holds them row-major,
    and loading copies the values into whatever layout the empty parameter has."""

    for factor in column_major:
        if factor not in ("in_factor", "out_factor") or getattr(layer, factor, None) is None:
            raise RankcutError(f"{MANIFEST} entry for {name} lists unknown factor '{factor}' as column-major; "
                               "save the model again")
        set_column_major_(layer, factor)


def _shares_storage_with_loaded(model: nn.Module, key: str, missing: set[str]) -> bool:
    """safetensors stores a tied tensor once; its twin is missing from the file but filled."""
    params = model.state_dict(keep_vars=True)
    target = params.get(key)
    if target is None:
        return False
    return any(other is not key and other not in missing and value.data_ptr() == target.data_ptr()
               for other, value in params.items())


def _load_tokenizer(folder: Path) -> Any:
    from transformers import AutoTokenizer

    if not any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt")):
        return None
    return AutoTokenizer.from_pretrained(folder)
