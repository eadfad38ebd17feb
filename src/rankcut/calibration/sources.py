"""Where calibration text comes from and how it becomes token windows: an embedded gensim text,
a train split of a benchmark, or a text file."""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.errors import RankcutError
from ..core.model_facts import check_fits_positions, get_tokenizer, leading_special_ids
from ..data.benchmarks import find_data_dir, read_jsonl
from ..data.embedded import EMBEDDED, embedded_text, news_articles, wiki_articles
from ..data.glue import read_glue


DRAWS = ("spread", "contiguous")


@dataclass(frozen=True)
class Calibration:
    """Where calibration text comes from and how much of it to use."""

    text: str = "gensim-wiki"  # embedded text, a benchmark's train split (sst2, gsm8k, ...) or a file
    samples: int = 32
    seqlen: int = 256
    seed: int = 0
    batch_size: int = 8
    sequential: bool = True  # calibrate each block on the compressed blocks' outputs
    correct: bool = False  # sequential: fit each block to the dense outputs (X_cᵀX_d)
    two_pass: bool = False  # budget: allocate in a read-only pass, then compress sequentially (≈2× time)
    staged: bool = False  # sequential: inside a block too, each input group on the cut groups' outputs
    fisher_samples: int | None = 8  # samples for the gradient pass (None: all)
    fisher_batch_size: int = 1  # the backward pass holds vocab-wide logits: keep batches small
    # how windows are drawn: "spread" takes each from a different document where documents are
    # long enough (the whole corpus is sampled); "contiguous" cuts them from the first documents
    # of the shuffled order (a few articles)
    draw: str = "spread"

    def __post_init__(self) -> None:
        if self.samples < 1 or self.seqlen < 2 or self.batch_size < 1:
            raise RankcutError("calibration needs samples ≥ 1, seqlen ≥ 2 and batch_size ≥ 1")
        if self.draw not in DRAWS:
            raise RankcutError(f"calibration draw '{self.draw}' is unknown; use one of {', '.join(DRAWS)}")

    def describe(self) -> dict[str, Any]:
        """Every field, as manifests, checkpoints and factor caches record it."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Calibration:
        unknown = sorted(set(data) - {f.name for f in fields(cls)})
        if unknown:
            raise RankcutError(f"calibration has unknown field(s) {', '.join(unknown)}")
        return cls(**data)


TRAIN_SPLITS = ("sst2", "mrpc", "rte", "stsb", "gsm8k")


def _train_split_documents(task: str) -> list[str]:
    """A benchmark's train split as calibration text (from the benchmark data folder)."""

    folder = find_data_dir()
    if task == "gsm8k":
        return [f"Question: {r['question']}\nAnswer: {r['answer']}"
                for _, r in read_jsonl(folder / "gsm8k" / "train.jsonl", "gsm8k")]

    return [" ".join(texts) for texts, _ in read_glue(folder, task, "train")]


def calibration_documents(source: str) -> list[str]:
    """The calibration text as documents (articles for the embedded texts, examples for a
    benchmark's train split, one document for a file)."""

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
    """`samples` windows of `seqlen` tokens, drawn without overlap from the text (seeded), each
    opening with the tokens the tokenizer puts before any text (BOS where it adds one).

    Documents are taken in a seeded random order and tokenized only as far as the draw needs, so a
    large corpus costs no more than a small one. The "spread" draw takes ⌈samples / documents⌉
    windows at random places from each document long enough, so the windows cover as many
    documents as they can; the rest of the text (short documents, a single-document text, the
    unchosen places) is pooled and cut into consecutive windows when more are needed, which is
    how the "contiguous" draw takes them all.
    """
    check_fits_positions(model, calib.seqlen, "--calib-seqlen")
    tok = get_tokenizer(model)
    docs = calibration_documents(calib.text)
    rng = random.Random(calib.seed)
    rng.shuffle(docs)
    prefix = leading_special_ids(tok)
    body = calib.seqlen - len(prefix)
    if body < 1:
        raise RankcutError(f"--calib-seqlen {calib.seqlen} holds only the tokenizer's {len(prefix)} leading "
                           "special token(s); give a longer window")
    spread = calib.draw == "spread"  # one document: its places drawn as the contiguous draw draws them
    per_document = math.ceil(calib.samples / len(docs))
    windows: list[list[int]] = []
    pool: list[int] = []
    for doc in docs:
        ids = tok(doc, add_special_tokens=False, return_attention_mask=False)["input_ids"]
        places = len(ids) // body
        if spread and places:
            chosen = set(rng.sample(range(places), min(per_document, places)))
            windows += [ids[p * body:(p + 1) * body] for p in sorted(chosen)]
            for p in range(places):
                if p not in chosen:
                    pool += ids[p * body:(p + 1) * body]
            if len(windows) >= calib.samples:
                break
        else:
            pool += ids
            if len(windows) + len(pool) // body >= 2 * calib.samples:
                break
    wanted = calib.samples - len(windows)
    available = len(pool) // body
    if wanted > 0:
        if available < wanted:
            total = len(pool) + body * len(windows)
            raise RankcutError(
                f"calibration text has {total} tokens, too short for {calib.samples} samples of "
                f"{calib.seqlen}; lower --calib-samples or --calib-seqlen, or give a longer text")
        windows += [pool[s * body:(s + 1) * body] for s in sorted(rng.sample(range(available), wanted))]
    return torch.tensor([prefix + w for w in windows[:calib.samples]], dtype=torch.long)


def batches(ids: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    return [ids[i:i + batch_size] for i in range(0, ids.shape[0], batch_size)]
