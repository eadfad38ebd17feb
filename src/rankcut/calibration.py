"""Calibration: the activation statistics that activation-aware methods need, gathered by hooks.

Kept apart from the methods (the llm-compressor shape): this module knows how to run a model
and what to record; the methods only read the records. Statistics are gathered block by block:
the inputs to the first repeated block are captured once, then each block is replayed alone,
so only one block's statistics are alive at a time (bounded memory) and, in sequential mode,
each block sees the outputs of the blocks already compressed.

Per target module:
- `gram`: XᵀX of its input, accumulated in float64 (whitening, SVD-LLM);
- `abs_mean`: mean |x| per input channel (ASVD's activation scaling);
- `out_fisher`: mean squared gradient of the loss w.r.t. each output channel (Fisher weighting).
Modules fed the same tensor (q, k, v; gate and up) share one record.
"""

from __future__ import annotations

import functools
import inspect
import random
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from tqdm.auto import tqdm

from .errors import RankcutError
from .models import check_fits_positions, get_tokenizer
from .targets import Target
from .texts import EMBEDDED, embedded_text


@dataclass(frozen=True)
class Calibration:
    """Where calibration text comes from and how much of it to use."""

    text: str = "gensim-wiki"  # embedded text, a benchmark's train split (sst2, gsm8k, ...) or a file
    samples: int = 32
    seqlen: int = 256
    seed: int = 0
    batch_size: int = 8
    sequential: bool = True  # calibrate each block on the compressed blocks' outputs
    correct: bool = False  # sequential: fit each block to the dense outputs (X_cᵀX_d); see RESULTS.md
    two_pass: bool = False  # budget: allocate in a read-only pass, then compress sequentially (≈2× time)
    staged: bool = False  # sequential: inside a block too, each input group on the cut groups' outputs
    fisher_samples: int | None = 8  # samples for the gradient pass (None: all)
    fisher_batch_size: int = 1  # the backward pass holds vocab-wide logits: keep batches small

    def __post_init__(self) -> None:
        if self.samples < 1 or self.seqlen < 2 or self.batch_size < 1:
            raise RankcutError("calibration needs samples ≥ 1, seqlen ≥ 2 and batch_size ≥ 1")

    def describe(self) -> dict[str, Any]:
        return {"text": self.text, "samples": self.samples, "seqlen": self.seqlen, "seed": self.seed,
                "sequential": self.sequential, "correct": self.correct, "two_pass": self.two_pass,
                "staged": self.staged,
                "fisher_samples": self.fisher_samples}


TRAIN_SPLITS = ("sst2", "mrpc", "rte", "stsb", "gsm8k")


def _train_split_documents(task: str) -> list[str]:
    """A benchmark's train split as calibration text (from the benchmark data folder)."""
    from .evaluate.data import find_data_dir, read_jsonl

    folder = find_data_dir()
    if task == "gsm8k":
        return [f"Question: {r['question']}\nAnswer: {r['answer']}"
                for _, r in read_jsonl(folder / "gsm8k" / "train.jsonl", "gsm8k")]
    from .evaluate.glue import read_glue

    return [" ".join(texts) for texts, _ in read_glue(folder, task, "train")]


def calibration_documents(source: str) -> list[str]:
    """The calibration text as documents (articles for the embedded texts, examples for a
    benchmark's train split, one document for a file)."""
    from .texts import news_articles, wiki_articles

    if source in TRAIN_SPLITS:
        return _train_split_documents(source)
    if source == "gensim-wiki":
        return list(wiki_articles())
    if source == "gensim-news":
        return list(news_articles())
    if source in EMBEDDED:
        return [embedded_text(source)]
    path = Path(source)
    if not path.is_file():
        raise RankcutError(f"calibration text '{source}' is neither an embedded text "
                           f"({', '.join(EMBEDDED)}), a train split ({', '.join(TRAIN_SPLITS)}) nor a file")
    text = path.read_text(encoding="utf-8", errors="replace")
    if not text.strip():
        raise RankcutError(f"calibration file {path} is empty; give a file with real text")
    return [text]


def calibration_ids(model: nn.Module, calib: Calibration) -> torch.Tensor:
    """`samples` windows of `seqlen` tokens, drawn without overlap from the text (seeded).

    Documents are taken in a seeded random order and tokenized only until there are twice the
    tokens needed, so a large corpus costs no more than a small one.
    """
    check_fits_positions(model, calib.seqlen, "--calib-seqlen")
    tok = get_tokenizer(model)
    docs = calibration_documents(calib.text)
    rng = random.Random(calib.seed)
    rng.shuffle(docs)
    needed = 2 * calib.samples * calib.seqlen
    ids: list[int] = []
    for doc in docs:
        ids += tok(doc, add_special_tokens=False, return_attention_mask=False)["input_ids"]
        if len(ids) >= needed:
            break
    available = len(ids) // calib.seqlen
    if available < calib.samples:
        raise RankcutError(
            f"calibration text has {len(ids)} tokens, too short for {calib.samples} samples of "
            f"{calib.seqlen}; lower --calib-samples or --calib-seqlen, or give a longer text")
    starts = sorted(rng.sample(range(available), calib.samples))
    return torch.tensor([ids[s * calib.seqlen:(s + 1) * calib.seqlen] for s in starts], dtype=torch.long)


def batches(ids: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    return [ids[i:i + batch_size] for i in range(0, ids.shape[0], batch_size)]


# --------------------------------------------------------------------------- statistics

class InputStats:
    """Running XᵀX (float64) and mean |x| of one module input.

    With `keep=True` the raw inputs are kept too (the dense stream of an error-corrected pass);
    given a `reference` (those kept inputs), the cross-Gram X_cᵀX_d between this stream and the
    dense one is accumulated, batch by batch.
    """

    def __init__(self, features: int, keep: bool = False, reference: "InputStats | None" = None,
                 with_abs: bool = True) -> None:
        self.gram = torch.zeros(features, features, dtype=torch.float64)
        self.abs_sum = torch.zeros(features, dtype=torch.float64) if with_abs else None
        self.count = 0
        self.kept: list[torch.Tensor] | None = [] if keep else None
        self.reference = reference
        self.cross = torch.zeros(features, features, dtype=torch.float64) if reference is not None else None
        self._batches = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        # float32 per batch (fast), float64 across batches (no drift over many tokens)
        self.gram += (x.T @ x).double().cpu()
        if self.abs_sum is not None:
            self.abs_sum += x.abs().sum(0).double().cpu()
        self.count += x.shape[0]
        if self.kept is not None:
            self.kept.append(x.clone())
        if self.reference is not None and self.reference.kept is not None:
            dense = self.reference.kept[self._batches]
            self.cross += (x.T @ dense).double().cpu()
        self._batches += 1

    @property
    def abs_mean(self) -> torch.Tensor:
        if self.abs_sum is None:
            raise ValueError("mean |x| was not recorded (with_abs=False)")
        return self.abs_sum / max(1, self.count)


@dataclass
class ModuleStats:
    """What a method may read about one target."""

    inputs: InputStats | None = None
    out_fisher: torch.Tensor | None = None  # mean (∂L/∂y_k)² per output channel

    @property
    def gram(self) -> torch.Tensor | None:
        return None if self.inputs is None else self.inputs.gram

    @property
    def cross(self) -> torch.Tensor | None:
        """X_cᵀX_d: compressed-stream inputs against the dense model's inputs (or None)."""
        return None if self.inputs is None else self.inputs.cross


class InputRecorder:
    """Forward hooks that feed `InputStats`; modules called on the same tensor share a record."""

    def __init__(self, targets: Sequence[Target], keep: bool = False,
                 reference: "InputRecorder | None" = None, with_abs: bool = True) -> None:
        self.targets = list(targets)
        self.keep = keep
        self.with_abs = with_abs
        self.reference = reference
        self.stats: dict[str, InputStats] = {}
        self._current: dict[int, tuple[torch.Tensor, InputStats]] = {}
        self._handles: list[Any] = []

    def __enter__(self) -> "InputRecorder":
        for t in self.targets:
            self._handles.append(t.module.register_forward_hook(self._hook(t)))
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._current.clear()

    def step(self) -> None:
        """Call between forward passes: input tensors of the last pass are released."""
        self._current.clear()

    def _hook(self, target: Target):  # noqa: ANN202
        def hook(module: nn.Module, inputs: tuple, output: Any) -> None:
            x = inputs[0]
            # The tensor is held in _current for the whole pass, so its id cannot be reused.
            held = self._current.get(id(x))
            if held is None:
                record = self.stats.get(target.name)
                if record is None:
                    ref = self.reference.stats.get(target.name) if self.reference is not None else None
                    record = InputStats(x.shape[-1], keep=self.keep, reference=ref, with_abs=self.with_abs)
                record.add(x)
                self._current[id(x)] = (x, record)
            else:
                record = held[1]
            self.stats.setdefault(target.name, record)
        return hook


def _forward_kwargs(model: nn.Module) -> dict[str, Any]:
    params = inspect.signature(model.forward).parameters
    return {"use_cache": False} if "use_cache" in params else {}


def collect_output_fisher(model: nn.Module, targets: Sequence[Target], ids: torch.Tensor,
                          batch_size: int, progress: bool = True, lean: bool = True) -> dict[str, torch.Tensor]:
    """Mean squared loss gradient per output channel of each target (diagonal output Fisher).

    Weights get no gradients (requires_grad is switched off for the pass); the gradient flows
    from the input embeddings, so memory is activations only, not a second copy of the model.
    With `lean` (the default) even those are bounded: each block keeps only its input and is
    recomputed during the backward pass, and a plain language-model head scores the tokens a
    chunk at a time, so the vocabulary-wide logits never exist for the whole sequence at once.
    Both change memory, not the result.
    """
    if not any(k in inspect.signature(model.forward).parameters for k in ("labels",)):
        raise RankcutError("the fisher method needs a model with a loss (a language-modelling "
                           "or classification head); use whiten for a bare encoder")
    sums = {t.name: torch.zeros(t.out_features, dtype=torch.float64) for t in targets}
    counts = {t.name: 0 for t in targets}
    handles = []

    def out_hook(name: str):  # noqa: ANN202
        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            def grad_hook(g: torch.Tensor) -> None:
                g = g.detach().reshape(-1, g.shape[-1]).float()
                sums[name] += g.square().sum(0).double().cpu()
                counts[name] += g.shape[0]
            # Under recomputation a block runs twice; only the first run's outputs are part of
            # the graph being differentiated, so the second run's hooks never fire.
            if output.requires_grad:
                output.register_hook(grad_hook)
        return hook

    def embed_hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        return output.detach().requires_grad_(True)

    head = plain_lm_head(model) if lean else None
    flags = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    handles.append(model.get_input_embeddings().register_forward_hook(embed_hook))
    handles += [t.module.register_forward_hook(out_hook(t.name)) for t in targets]
    was_training = model.training
    model.eval()
    try:
        with recomputed_blocks(model, enabled=lean):
            for batch in tqdm(batches(ids, batch_size), desc="calibrate (gradients)", disable=not progress):
                with torch.enable_grad():
                    if head is not None:
                        chunked_lm_backward(model, head, batch)
                    else:
                        loss = model(input_ids=batch, labels=batch, **_forward_kwargs(model)).loss
                        # the mean over predicted tokens, made a sum: the Fisher is per token
                        (loss * batch.shape[0] * (batch.shape[1] - 1)).backward()
    finally:
        for h in handles:
            h.remove()
        for p, flag in flags.items():
            p.requires_grad_(flag)
        model.train(was_training)
    return {n: sums[n] / max(1, counts[n]) for n in sums}


# Configuration fields that put something between the head's output and the loss (soft caps,
# scales): where one is set, the chunked loss would not be the model's loss.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def plain_lm_head(model: nn.Module) -> nn.Linear | None:
    """The output embedding, when the model's loss is plain next-token cross-entropy on it."""
    if not type(model).__name__.endswith(("ForCausalLM", "LMHeadModel")):
        return None
    config = getattr(model, "config", None)
    if any(getattr(config, name, None) not in (None, 0, 1, 1.0) for name in _LOGIT_TRANSFORMS):
        return None
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if get_head is not None else None
    return head if isinstance(head, nn.Linear) else None


def chunked_lm_backward(model: nn.Module, head: nn.Linear, batch: torch.Tensor, chunk: int = 64) -> None:
    """Back-propagate the summed next-token loss with the head applied `chunk` positions at a time.

    The forward pass stops at the head's input; the loss gradient with respect to that hidden
    state is accumulated chunk by chunk (each chunk's logits freed before the next), then sent
    back through the model in one backward pass.
    """
    reached = run_until(model, head, batch)
    if reached is None:
        raise RankcutError(f"{type(model).__name__} never called its output head; cannot score tokens")
    hidden = BlockReplay._hidden(*reached)
    leaf = hidden.detach().requires_grad_(True)
    labels = batch[:, 1:]
    for start in range(0, labels.shape[1], chunk):
        stop = min(start + chunk, labels.shape[1])
        logits = head(leaf[:, start:stop]).float()
        loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                           labels[:, start:stop].reshape(-1), reduction="sum")
        loss.backward()
    hidden.backward(leaf.grad)


@contextmanager
def recomputed_blocks(model: nn.Module, enabled: bool = True) -> Iterator[None]:
    """Run each repeated block under activation checkpointing: a backward pass then holds one
    block's activations at a time instead of the whole model's."""
    found = find_blocks(model) if enabled else None
    if found is None:
        yield
        return
    blocks = list(found[1])
    for block in blocks:
        block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)
    try:
        yield
    finally:
        for block in blocks:
            del block.forward


def release_freed_memory() -> None:
    """Hand memory that tensors have freed back to the operating system (glibc only; a no-op
    elsewhere). glibc keeps freed heap blocks for reuse, so without this the resident size of a
    block-by-block pass only ever grows: each block's transient statistics and factorization
    buffers would stay counted long after they are gone."""
    global _MALLOC_TRIM
    if _MALLOC_TRIM is None:
        try:
            import ctypes
            import ctypes.util

            _MALLOC_TRIM = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _MALLOC_TRIM = False
    if _MALLOC_TRIM:
        _MALLOC_TRIM(0)


_MALLOC_TRIM: Any = None


# --------------------------------------------------------------------------- block replay

class _StopForward(Exception):
    pass


def run_until(model: nn.Module, module: nn.Module, batch: torch.Tensor) -> tuple[tuple, dict] | None:
    """Run `model` on `batch` only as far as `module`: the (args, kwargs) it was called with, or
    None if the forward pass never reached it. Nothing after `module` is computed."""
    reached: list[tuple[tuple, dict]] = []

    def grab(_: nn.Module, args: tuple, kwargs: dict) -> None:
        reached.append((args, dict(kwargs)))
        raise _StopForward

    hook = module.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        model(input_ids=batch, **_forward_kwargs(model))
    except _StopForward:
        pass
    finally:
        hook.remove()
    return reached[0] if reached else None


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """The model's repeated blocks: the longest ModuleList of layers."""
    best: tuple[str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) and name.rsplit(".", 1)[-1] in (
                "layers", "layer", "h", "blocks"):
            if best is None or len(module) > len(best[1]):
                best = (name, module)
    return best


class BlockReplay:
    """Runs the model once up to its first block, then lets the caller push the captured block
    inputs through one block at a time."""

    def __init__(self, model: nn.Module, ids: torch.Tensor, batch_size: int) -> None:
        found = find_blocks(model)
        if found is None:
            raise RankcutError("this model has no repeated blocks (layers) to calibrate block by block")
        self.prefix, self.blocks = found
        self.inputs: list[tuple[tuple, dict]] = []
        with torch.no_grad():
            for batch in batches(ids, batch_size):
                reached = run_until(model, self.blocks[0], batch)
                if reached is None:
                    raise RankcutError(f"{type(model).__name__} never called its first block")
                self.inputs.append(reached)

    @staticmethod
    def _hidden(args: tuple, kwargs: dict) -> torch.Tensor:
        return args[0] if args else kwargs["hidden_states"]

    @staticmethod
    def _with_hidden(args: tuple, kwargs: dict, hidden: torch.Tensor) -> tuple[tuple, dict]:
        if args:
            return (hidden, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": hidden}

    @torch.no_grad()
    def run(self, index: int, recorder: InputRecorder | None = None) -> Iterator[torch.Tensor]:
        """Push every captured input through block `index`; yields its outputs."""
        block = self.blocks[index]
        for args, kwargs in self.inputs:
            out = block(*args, **kwargs)
            if recorder is not None:
                recorder.step()
            yield out[0] if isinstance(out, tuple) else out

    def fork(self) -> "BlockReplay":
        """A second stream through the same blocks (the dense stream of an error-corrected pass)."""
        twin = object.__new__(BlockReplay)
        twin.prefix, twin.blocks, twin.inputs = self.prefix, self.blocks, list(self.inputs)
        return twin

    def advance(self, index: int) -> None:
        """Replace the stored inputs by block `index`'s outputs (the next block's inputs)."""
        self.set_hidden(list(self.run(index)))

    def set_hidden(self, outputs: list[torch.Tensor]) -> None:
        self.inputs = [self._with_hidden(a, k, h) for (a, k), h in zip(self.inputs, outputs)]
