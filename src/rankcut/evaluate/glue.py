"""GLUE for encoders: a fixed, documented fine-tune recipe, then the GLUE dev-set metrics.

Recipe (the same for every encoder, so dense and compressed models are comparable): a fresh
classification (or, for STS-B, regression) head on the encoder's pooled output; word
embeddings frozen (they are half of MiniLM's weights and barely move in a short fine-tune);
AdamW, lr 1e-4, weight decay 0.01, batch 32, max 128 tokens, batches bucketed by length (less
padding), linear warm-up over the first 10% of steps then linear decay, seed 0; SST-2: one
epoch over a fixed seeded sample of 20,000 of its 67,349 training sentences; MRPC, RTE, STS-B:
2 epochs over the full train split. Sized to run on a 2-core CPU. The fine-tuned dense model
is saved (rankcut format) so that compressed variants start from it.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..core.errors import RankcutError
from ..core.fsutil import cache_root
from ..core.model_facts import get_tokenizer
from ..core.record import record_of
from ..data.benchmarks import sample
from ..data.glue import GLUE, Example, read_glue
from ..io.saved import load, save
from .stats import mean_stderr


@dataclass(frozen=True)
class Recipe:
    lr: float = 1e-4
    weight_decay: float = 0.01
    batch_size: int = 32
    max_length: int = 128
    warmup: float = 0.1
    seed: int = 0
    epochs: int | None = None  # None: the task's own


def is_classifier(model: nn.Module) -> bool:
    return type(model).__name__.endswith("ForSequenceClassification")


def classifier_from_encoder(encoder: nn.Module, num_labels: int) -> nn.Module:
    """A sequence classifier whose encoder is `encoder`'s weights, head freshly initialized."""
    from transformers import AutoModelForSequenceClassification

    config = encoder.config.__class__.from_dict(encoder.config.to_dict())
    config.num_labels = num_labels
    config.problem_type = "regression" if num_labels == 1 else "single_label_classification"
    torch.manual_seed(0)
    try:
        model = AutoModelForSequenceClassification.from_config(config)
    except ValueError:  # transformers lists every architecture it has a classifier for
        raise RankcutError(f"transformers has no sequence classifier for {type(config).__name__}, so GLUE tasks "
                           "cannot fine-tune it; score it on language-modelling tasks instead") from None
    base = getattr(encoder, "base_model", encoder)
    missing, unexpected = model.base_model.load_state_dict(base.state_dict(), strict=False)
    if unexpected or any(not k.startswith("pooler") for k in missing):
        raise RankcutError("this encoder's weights do not fit a sequence classifier of its own architecture")
    record_of(model).tokenizer = get_tokenizer(encoder)
    record_of(model).source = record_of(encoder).source
    return model


def _batches(tok: Any, examples: list[Example], batch_size: int, max_length: int,
             shuffle: bool, seed: int) -> list[tuple[dict, torch.Tensor]]:
    """Batches of similar length (sorted within windows of 50 batches), in shuffled order."""
    order = list(range(len(examples)))
    rng = random.Random(seed)
    if shuffle:
        rng.shuffle(order)
    length = lambda j: sum(len(t) for t in examples[j][0])  # noqa: E731
    window = batch_size * 50
    order = [j for i in range(0, len(order), window) for j in sorted(order[i:i + window], key=length)]
    starts = list(range(0, len(order), batch_size))
    if shuffle:
        rng.shuffle(starts)
    out = []
    for i in starts:
        chunk = [examples[j] for j in order[i:i + batch_size]]
        columns = list(zip(*[texts for texts, _ in chunk]))
        enc = tok(*[list(c) for c in columns], padding=True, truncation=True, max_length=max_length,
                  return_tensors="pt")
        out.append((dict(enc), torch.tensor([label for _, label in chunk])))
    return out


def finetune(model: nn.Module, task: str, data_dir: Path, recipe: Recipe = Recipe(),
             progress: bool = True) -> nn.Module:
    """Fine-tune a sequence classifier on the task's train split, in place, by the recipe."""
    spec = GLUE[task]
    tok = get_tokenizer(model)

    train = sample(read_glue(data_dir, task, "train"), spec.train_examples, seed=recipe.seed)
    epochs = recipe.epochs or spec.epochs
    embeddings = model.get_input_embeddings()
    embeddings.weight.requires_grad_(False)
    torch.manual_seed(recipe.seed)
    steps_per_epoch = math.ceil(len(train) / recipe.batch_size)
    total = steps_per_epoch * epochs
    warm = max(1, int(recipe.warmup * total))
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or "norm" in name.lower() else decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": recipe.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=recipe.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warm, max(0.0, (total - s) / max(1, total - warm))))
    model.train()
    bar = tqdm(total=total, desc=f"fine-tune {task}", disable=not progress, unit="step")
    for epoch in range(epochs):
        for inputs, labels in _batches(tok, train, recipe.batch_size, recipe.max_length, True, recipe.seed + epoch):
            labels = labels.float() if spec.num_labels == 1 else labels.long()
            loss = model(**inputs, labels=labels).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    embeddings.weight.requires_grad_(True)
    model.eval()
    return model


def _ranks(x: torch.Tensor) -> torch.Tensor:
    order = x.argsort()
    ranks = torch.empty_like(x)
    ranks[order] = torch.arange(len(x), dtype=x.dtype)
    # average ranks over ties
    for value in x.unique():
        mask = x == value
        if mask.sum() > 1:
            ranks[mask] = ranks[mask].mean()
    return ranks


def _pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / (a.norm() * b.norm()))


@torch.no_grad()
def evaluate_glue(model: nn.Module, task: str, data_dir: Path, limit: int | None = None,
                  progress: bool = True, sample_seed: int | None = None) -> tuple[dict[str, float], int]:
    """`limit`: the first N dev examples (or, with `sample_seed`, a seeded sample of N)."""
    spec = GLUE[task]
    dev = sample(read_glue(data_dir, task, "dev"), limit, sample_seed)
    tok = get_tokenizer(model)
    model.eval()
    preds, golds = [], []
    for inputs, labels in tqdm(_batches(tok, dev, 64, 128, False, 0), desc=f"eval {task}", disable=not progress):
        logits = model(**inputs).logits
        preds.append(logits[:, 0] if spec.num_labels == 1 else logits.argmax(-1).float())
        golds.append(labels)
    pred, gold = torch.cat(preds).double(), torch.cat(golds).double()
    if spec.num_labels == 1:
        return {"pearson": _pearson(pred, gold), "spearman": _pearson(_ranks(pred), _ranks(gold))}, len(dev)
    correct = (pred == gold).double().tolist()
    acc, err = mean_stderr(correct)
    metrics = {"accuracy": acc, "accuracy_stderr": err}
    if task == "mrpc":
        tp = float(((pred == 1) & (gold == 1)).sum())
        fp = float(((pred == 1) & (gold == 0)).sum())
        fn = float(((pred == 0) & (gold == 1)).sum())
        metrics["f1"] = 2 * tp / max(1.0, 2 * tp + fp + fn)
    return metrics, len(dev)


def glue_model(model: nn.Module, task: str, data_dir: Path, progress: bool = True) -> tuple[nn.Module, str]:
    """The model to score on `task`: itself if it is a classifier already, else the encoder
    fine-tuned by the recipe (cached, rankcut format, so later runs and compressions reuse it)."""

    if is_classifier(model):
        return model, "as given"
    source = str(record_of(model).source or "model").replace("/", "_")
    folder = cache_root() / "glue" / f"{source}-{task}"
    if (folder / "rankcut.json").is_file():
        return load(folder), f"fine-tuned by the recipe, cached in {folder}"
    tuned = finetune(classifier_from_encoder(model, GLUE[task].num_labels), task, data_dir, progress=progress)
    save(tuned, folder, overwrite=True)
    return tuned, f"fine-tuned by the recipe, saved to {folder}"
