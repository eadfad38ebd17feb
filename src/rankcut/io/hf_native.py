"""A compressed model as an ordinary Hugging Face model: rankcut plugs into transformers'
quantizer registry the way torchao, HQQ and compressed-tensors do.

A saved folder's `config.json` is the dense model's config with two changes:
- `quantization_config` (`quant_method: "rankcut"`, the format version, the dense model type,
  and each targeted module's record: form, rank, shape, layout). The quantizer registered
  here swaps those modules for empty factored ones on the meta device before the weights load,
  so `AutoModelForCausalLM.from_pretrained(DIR)` returns the compressed model itself.
- `model_type: "rankcut"`, a type only rankcut registers, and an `auto_map` naming a one-line
  shim file beside it. Without this, transformers would only warn "Unknown quantization type"
  and fill a dense skeleton with random weights. With it, a process that has not imported
  rankcut stops: transformers asks for `trust_remote_code=True`, and the shim it would run
  imports rankcut (or transformers names the missing package: `pip install rankcut`).

`import rankcut` registers all of it; nothing else is needed to load, `save_pretrained`,
`dequantize` (the factors multiplied back into dense linears) or fine-tune.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, PretrainedConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.quantizers import HfQuantizer
from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    AUTO_QUANTIZER_MAPPING,
    register_quantization_config,
    register_quantizer,
)
from transformers.utils.quantization_config import QuantizationConfigMixin

from ..core.embedding import TIED_HEAD_FORM, LowRankEmbedding, TiedLowRankHead
from ..core.errors import RankcutError
from ..core.layers import PivotLowRankLinear
from ..core.layout import set_column_major_, storable
from ..core.module_records import MANIFEST, empty_factored
from ..core.modules import compressed_modules, dense_form, replaced_modules, swap_module
from ..core.record import record_of
from .pretrained import own_memory_

QUANT_METHOD = "rankcut"
MODEL_TYPE = "rankcut"
HF_FORMAT_VERSION = 1  # of the quantization_config block; the folder's own format is saved.FORMAT_VERSION
SHIM_FILE = "rankcut_config.py"
AUTO_MAP = {"AutoConfig": f"{Path(SHIM_FILE).stem}.RankcutConfig"}

_SHIM_SOURCE = '''"""This folder holds a model compressed by rankcut (low-rank factors in place of dense
weights). transformers loads it only with rankcut: `pip install rankcut`, then `import rankcut`
before `from_pretrained`, or pass `trust_remote_code=True` so that this file imports it.
`rankcut export DIR --dense --out DIR2` writes a plain folder that loads anywhere."""

from rankcut.io.hf_native import RankcutConfig

__all__ = ["RankcutConfig"]
'''


class RankcutQuantizationConfig(QuantizationConfigMixin):
    """The `quantization_config` block of a rankcut folder's config.json."""

    def __init__(self, modules: dict[str, dict[str, Any]] | None = None, base_model_type: str | None = None,
                 format_version: int = HF_FORMAT_VERSION, **kwargs: Any) -> None:
        self.quant_method = QUANT_METHOD
        self.format_version = int(format_version)
        self.base_model_type = base_model_type
        self.modules = dict(modules or {})
        if self.format_version > HF_FORMAT_VERSION:
            raise RankcutError(f"this model's quantization_config was written by a newer rankcut (format "
                               f"{self.format_version}); upgrade rankcut to load it")

    def to_dict(self) -> dict[str, Any]:
        return {"quant_method": QUANT_METHOD, "format_version": self.format_version,
                "base_model_type": self.base_model_type, "modules": self.modules}

    def to_diff_dict(self) -> dict[str, Any]:
        return self.to_dict()


class RankcutConfig(PretrainedConfig):
    """Stands for model type "rankcut" in transformers' config registry: it reads the folder's
    config as the dense model's own config class (LlamaConfig, GPT2Config, ...), so the Auto
    classes pick the dense architecture and the quantizer factors it."""

    model_type = MODEL_TYPE

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs: Any) -> Any:
        config_dict = dict(config_dict)
        quant = config_dict.get("quantization_config") or {}
        base = quant.get("base_model_type") if isinstance(quant, dict) else None
        if base not in CONFIG_MAPPING:
            raise RankcutError(f"config.json says model type 'rankcut' but its quantization_config names no known "
                               f"dense model type ({base!r}); save the model again with rankcut")
        config_dict["model_type"] = base
        config_dict.pop("auto_map", None)
        return CONFIG_MAPPING[base].from_dict(config_dict, **kwargs)


_SAVING_CLASSES: dict[type, type] = {}


def _saving_class(base: type) -> type:
    """The dense config class, writing itself as model type "rankcut" with the shim's auto_map.

    Only serialization changes: the model code still sees its own config class and model type."""
    if getattr(base, "_rankcut_saving", False):
        return base
    if base not in _SAVING_CLASSES:
        def to_dict(self: Any) -> dict[str, Any]:
            out = base.to_dict(self)
            out["model_type"] = MODEL_TYPE
            out["auto_map"] = dict(AUTO_MAP)
            return out

        def save_pretrained(self: Any, save_directory: str | os.PathLike, *args: Any, **kwargs: Any) -> Any:
            result = base.save_pretrained(self, save_directory, *args, **kwargs)
            write_shim(save_directory)
            return result

        _SAVING_CLASSES[base] = type(base.__name__, (base,), {
            "to_dict": to_dict, "save_pretrained": save_pretrained, "_rankcut_saving": True,
            "__module__": base.__module__, "__doc__": base.__doc__})
    return _SAVING_CLASSES[base]


def mark_compressed(config: Any, modules: dict[str, dict[str, Any]]) -> None:
    """Give a dense model's config the rankcut quantization block and saving behaviour."""
    base_type = type(config).model_type
    config.quantization_config = RankcutQuantizationConfig(modules=modules, base_model_type=base_type)
    config.__class__ = _saving_class(type(config))


def unmark_compressed(config: Any) -> None:
    """Back to the dense model's plain config (after `dequantize`)."""
    if getattr(type(config), "_rankcut_saving", False):
        config.__class__ = type(config).__mro__[1]
    if hasattr(config, "quantization_config"):
        del config.quantization_config


def write_shim(folder: str | os.PathLike) -> None:
    (Path(folder) / SHIM_FILE).write_text(_SHIM_SOURCE)


def build_factored_(model: nn.Module, modules: dict[str, Any], dtype: torch.dtype) -> None:
    """Swap each recorded module of `model` for an empty factored one of the recorded form and
    rank, on the meta device (dense records keep the skeleton's own module); checked before any
    tensor is made."""
    # a tied head reads the factored embedding, so it is built after it (records may come sorted by name)
    ordered = sorted(modules.items(), key=lambda item: isinstance(item[1], dict) and item[1].get("form") == TIED_HEAD_FORM)
    for name, rec in ordered:
        try:
            model.get_submodule(name)
        except AttributeError:
            raise RankcutError(f"{MANIFEST} entry names module {name}, which the model does not have") from None
        with torch.device("meta"):
            empty = empty_factored(name, rec, dtype, model)
        if empty is None:
            continue
        swap_module(model, name, empty)


@torch.no_grad()
def finish_factored_(model: nn.Module, modules: dict[str, Any]) -> None:
    """After the weights are in: each pivoted module's row order (derived, never stored), and the
    recorded memory layouts (files hold row-major tensors; `--speed` may have picked otherwise)."""
    for name, layer in compressed_modules(model).items():
        rec = modules.get(name) or {}
        if isinstance(layer, PivotLowRankLinear):
            layer.register_buffer("order", torch.argsort(layer.rows), persistent=False)
            if rec.get("tokens_as_columns"):
                layer.tokens_as_columns = True
        elif rec.get("tokens_as_columns"):
            raise RankcutError(f"{MANIFEST} entry for {name} lays out tokens as columns, which only a pivoted "
                               "module does; save the model again")
        for factor in rec.get("column_major", []):
            if factor not in ("in_factor", "out_factor") or getattr(layer, factor, None) is None:
                raise RankcutError(f"{MANIFEST} entry for {name} lists unknown factor '{factor}' as column-major; "
                                   "save the model again")
            set_column_major_(layer, factor)


def densify_(model: nn.Module, dtype: torch.dtype | None = None) -> list[str]:
    """Multiply every factored module of `model` back into its dense form, in place; the config
    loses its rankcut marks and the record its modules. Returns the names merged."""
    record = record_of(model)
    merged = []
    for name, layer in replaced_modules(model).items():
        swap_module(model, name, dense_form(layer, bool((record.modules.get(name) or {}).get("transposed")), dtype))
        merged.append(name)
    merged += _densify_embedding_(model, dtype)
    record.modules = {}
    record.speed = None
    config = getattr(model, "config", None)
    if config is not None:
        unmark_compressed(config)
    return merged


def _densify_embedding_(model: nn.Module, dtype: torch.dtype | None) -> list[str]:
    """A factored embedding back to nn.Embedding, and a head that read its factors tied to it again."""
    names = {id(m): n for n, m in model.named_modules()}
    merged = []
    for module in list(model.modules()):
        if not isinstance(module, LowRankEmbedding):
            continue
        weight = module.weight.detach().to(dtype or module.in_factor.dtype)
        dense = nn.Embedding(module.num_embeddings, module.embedding_dim, module.padding_idx,
                             device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            dense.weight.copy_(weight)
        swap_module(model, names[id(module)], dense)
        merged.append(names[id(module)])
        for name, head in list(model.named_modules()):
            if isinstance(head, TiedLowRankHead) and head.embedding is module:
                linear = nn.Linear(module.embedding_dim, module.num_embeddings, bias=False, device="meta")
                linear.weight = dense.weight  # tied again, as the dense model was
                swap_module(model, name, linear)
                merged.append(name)
                config = getattr(model, "config", None)
                if config is not None and hasattr(config, "tie_word_embeddings"):
                    config.tie_word_embeddings = True
    return merged


class RankcutHfQuantizer(HfQuantizer):
    """Loads rankcut folders through `from_pretrained`: factored modules before the weights,
    their layouts and rankcut's record after."""

    requires_calibration = True  # only ever loads what rankcut compressed; it does not compress

    def _process_model_before_weight_loading(self, model: Any, **kwargs: Any) -> Any:
        dtype = kwargs.get("dtype") or next(model.parameters()).dtype
        build_factored_(model, self.quantization_config.modules, dtype)
        return model

    def _process_model_after_weight_loading(self, model: Any, **kwargs: Any) -> Any:
        modules = self.quantization_config.modules
        own_memory_(model)  # off the file's mapping, into aligned memory: the same bits as a model built here
        finish_factored_(model, modules)
        record = record_of(model)
        record.modules = {k: dict(v) for k, v in modules.items()}
        # the factors are ordinary float parameters: `.float()`, `.half()` and training work on them as on
        # any model (transformers refuses the first two on a model flagged quantized)
        model.is_quantized = False
        if not getattr(type(model.config), "_rankcut_saving", False):
            model.config.__class__ = _saving_class(type(model.config))
        return model

    def get_state_dict_and_metadata(self, model: Any) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Every factor as its own whole, row-major tensor (the files never hold a view); called by
        `save_pretrained` before it writes the config, whose module records are brought up to date."""
        self.quantization_config.modules = record_of(model).modules
        with storable(model):
            state = {k: v for k, v in model.state_dict().items()}
        return state, {}

    def _dequantize(self, model: Any, dtype: torch.dtype | None = None) -> Any:
        densify_(model, dtype if dtype is not None and dtype.is_floating_point else None)
        return model

    def remove_quantization_config(self, model: Any) -> None:
        super().remove_quantization_config(model)
        unmark_compressed(model.config)

    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return True


# what `import rankcut` registers with transformers (once per process)
if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
    register_quantization_config(QUANT_METHOD)(RankcutQuantizationConfig)
if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
    register_quantizer(QUANT_METHOD)(RankcutHfQuantizer)
if MODEL_TYPE not in CONFIG_MAPPING:
    AutoConfig.register(MODEL_TYPE, RankcutConfig)


def is_rankcut_config(config_dict: dict[str, Any]) -> bool:
    quant = config_dict.get("quantization_config")
    return isinstance(quant, dict) and quant.get("quant_method") == QUANT_METHOD


def attach(model: nn.Module) -> None:
    """Make a model rankcut compressed in memory behave as one loaded by `from_pretrained`: its
    config carries the current module records (so `save_pretrained` writes a loadable folder)
    and it holds the quantizer (for `save_pretrained`'s tensors and `dequantize`). A model with
    no factored module is left, or put back, plain."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        return
    if not replaced_modules(model):
        unmark_compressed(config)
        if getattr(model, "hf_quantizer", None) is not None and isinstance(model.hf_quantizer, RankcutHfQuantizer):
            model.hf_quantizer = None
        return
    mark_compressed(config, record_of(model).modules)
    model.hf_quantizer = RankcutHfQuantizer(config.quantization_config, pre_quantized=True)
    model.quantization_method = QUANT_METHOD
