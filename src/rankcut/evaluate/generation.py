"""GSM8K: greedy chain-of-thought generation with few-shot examples from the train split,
scored by exact match of the final number (lm-eval's strict 'The answer is N' or '#### N'
extraction, falling back to the last number in the output)."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from ..core.model_facts import context_length, get_tokenizer, leading_special_ids, with_leading_specials
from ..data.benchmarks import read_jsonl, sample
from .stats import mean_stderr

log = logging.getLogger(__name__)


NUMBER = re.compile(r"-?[\d,]*\.?\d+")
STOP = ("\n\nQuestion:", "Question:", "</s>", "<|im_end|>")


def normalize_number(text: str) -> str:
    return text.replace(",", "").replace("$", "").rstrip(".").strip()


def extract_answer(text: str) -> str | None:
    strict = re.search(r"(?:####|The answer is)\s*\$?(-?[\d,]*\.?\d+)", text)
    if strict:
        return normalize_number(strict.group(1))
    numbers = NUMBER.findall(text)
    return normalize_number(numbers[-1]) if numbers else None


def few_shot_prompt(train: list[dict], shots: int) -> str:
    parts = []
    for rec in train[:shots]:
        reasoning, _, final = rec["answer"].partition("####")
        reasoning = re.sub(r"<<[^>]*>>", "", reasoning).strip()
        parts.append(f"Question: {rec['question']}\nAnswer: {reasoning} The answer is {final.strip()}.")
    return "\n\n".join(parts) + "\n\n"


@torch.no_grad()
def run_gsm8k(model: nn.Module, data_dir: Path, limit: int | None = None, shots: int = 5,
              max_new_tokens: int = 256, progress: bool = True,
              sample_seed: int | None = None) -> tuple[dict[str, float], int]:
    tok = get_tokenizer(model)
    train = [r for _, r in read_jsonl(data_dir / "gsm8k" / "train.jsonl", "gsm8k")]
    test = sample([r for _, r in read_jsonl(data_dir / "gsm8k" / "test.jsonl", "gsm8k")], limit, sample_seed)
    prefix = few_shot_prompt(train, shots)
    cap = context_length(model)
    if cap is not None and max_new_tokens > cap // 2:  # leave the prompt at least half the context
        max_new_tokens = cap // 2
    correct = []
    truncated = 0
    prefix = leading_special_ids(tok)  # the prompt opens as the tokenizer opens any text
    for rec in tqdm(test, desc="gsm8k", disable=not progress, unit="q"):
        prompt = f"{prefix}Question: {rec['question']}\nAnswer:"
        ids = torch.tensor([with_leading_specials(tok(prompt, add_special_tokens=False)["input_ids"], prefix)])
        if cap is not None and ids.shape[1] + max_new_tokens > cap:  # as lm-eval: drop the prompt's start
            ids = ids[:, -(cap - max_new_tokens):]
            truncated += 1
        out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tok.pad_token_id or tok.eos_token_id)
        text = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        for stop in STOP:
            text = text.split(stop)[0]
        gold = normalize_number(rec["answer"].split("####")[-1])
        correct.append(float(extract_answer(text) == gold))
    if truncated:
        log.warning("gsm8k: %d of %d prompts lost their start to fit %d positions with %d new tokens",
                    truncated, len(test), cap, max_new_tokens)
    acc, err = mean_stderr(correct)
    return {"exact_match": acc, "exact_match_stderr": err}, len(test)
