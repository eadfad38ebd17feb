"""The batches a fine-tune trains on: language-model windows from the embedded text, or GLUE
training examples, drawn by the run's seed."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..core.errors import RankcutError
from ..core.model_facts import check_fits_positions, get_tokenizer, leading_special_ids, prefixed_windows
from ..data.benchmarks import find_data_dir, sample
from ..data.embedded import embedded_text
from ..data.glue import GLUE, read_glue
from ..evaluate.glue import _batches, is_classifier
from ..evaluate.perplexity import tokenize_text
from ..evaluate.tasks import check_language_model

LM_TASKS = ("lm", "wikitext2")  # the same: train on the gensim extract, score on wikitext2 (DESIGN.md names it wikitext2)
GLUE_TASKS = ("sst2", "mrpc")


# --------------------------------------------------------------------------- data


class LMData:
    """Next-token prediction on the gensim Wikipedia extract (calibration's text, not the eval set)."""

    def __init__(self, model: nn.Module, config: Any) -> None:
        check_language_model(model, "--task lm")
        check_fits_positions(model, config.seqlen, "--seqlen")
        ids = tokenize_text(model, embedded_text("gensim-wiki"))
        # each window opens as the tokenizer opens any text (BOS where it adds one)
        self.chunks = prefixed_windows(ids, config.seqlen, leading_special_ids(get_tokenizer(model)))
        if self.chunks.shape[0] < config.batch_size:
            raise RankcutError(f"the training text has {ids.numel()} tokens: too few for --batch-size "
                               f"{config.batch_size} × --seqlen {config.seqlen}")
        self.config = config

    def _order(self, epoch: int) -> torch.Tensor:
        return torch.randperm(self.chunks.shape[0], generator=torch.Generator().manual_seed(self.config.seed + epoch))

    def batch(self, step: int) -> dict[str, torch.Tensor]:
        """Sequences step·bs … step·bs + bs − 1 of an endless stream of seeded epoch shuffles."""
        n = self.chunks.shape[0]
        positions = range(step * self.config.batch_size, (step + 1) * self.config.batch_size)
        return {"input_ids": torch.stack([self.chunks[self._order(p // n)[p % n]] for p in positions])}

    def task_loss(self, out: Any, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = out.logits[:, :-1].float()
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), inputs["input_ids"][:, 1:].reshape(-1))


class GlueData:
    """A GLUE task's train split, bucketed batches as the fine-tune recipe makes them."""

    def __init__(self, model: nn.Module, task: str, config: Any, data_dir: Any = None) -> None:
        spec = GLUE[task]
        train = sample(read_glue(find_data_dir(data_dir), task, "train"), spec.train_examples, seed=config.seed)
        self.batches = _batches(get_tokenizer(model), train, config.batch_size, 128, True, config.seed)
        self.regression = spec.num_labels == 1

    def batch(self, step: int) -> dict[str, torch.Tensor]:
        inputs, labels = self.batches[step % len(self.batches)]
        return {**inputs, "labels": labels.float() if self.regression else labels.long()}

    def task_loss(self, out: Any, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = out.logits.float()  # bfloat16 under --precision bf16: the loss is taken in float32
        if self.regression:
            return F.mse_loss(logits[:, 0], inputs["labels"])
        return F.cross_entropy(logits, inputs["labels"])


# --------------------------------------------------------------------------- tasks


def task_data(model: nn.Module, task: str, config: Any, data_dir: Any) -> Any:
    if task in LM_TASKS:
        return LMData(model, config)
    if task in GLUE_TASKS:
        if not is_classifier(model):
            raise RankcutError(f"--task {task} needs a sequence classifier; give the encoder's fine-tuned "
                               "classifier (rankcut.softrank does this for an encoder name)")
        return GlueData(model, task, config, data_dir)
    raise RankcutError(f"--task {task!r}: choose one of {', '.join(LM_TASKS + GLUE_TASKS)}")
