"""Export for tools that know nothing of rankcut: a plain Hugging Face folder, the factors
multiplied back into dense weights.

What it keeps is the quality: the outputs are the compressed model's (up to float rounding of
the products). What it gives up is what the factors bought: the folder is the dense model's
size and runs at the dense model's speed. It loads anywhere a dense checkpoint does
(transformers without rankcut, llama.cpp's converter, vLLM, ONNX export)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..core.fsutil import atomic_dir, check_output
from ..core.modules import count_bytes, count_params, replaced_modules
from ..core.record import record_of
from .hf_native import densify_
from .saved import load


@dataclass
class Exported:
    out: Path
    params: int  # of the dense model written
    bytes: int


def export_dense(folder: str | os.PathLike, out_dir: str | os.PathLike, overwrite: bool = False) -> Exported:
    """Write `folder`'s model (a rankcut-saved folder) to `out_dir` as a plain dense Hugging Face
    folder with its tokenizer. Checked before the model loads; written atomically."""
    out_dir = Path(out_dir)
    check_output(out_dir, overwrite)
    model = load(folder)
    tokenizer = record_of(model).tokenizer
    if getattr(model, "hf_quantizer", None) is not None:
        model.dequantize()
    else:
        densify_(model)
    if replaced_modules(model):  # every factored module has a dense form; this would be a rankcut bug
        raise RuntimeError("factored modules remain after merging")
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return Exported(out_dir, count_params(model), count_bytes(model))
