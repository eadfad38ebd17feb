"""Task definitions: which data, how a question is scored, which metrics come out.

Metrics follow lm-evaluation-harness: `acc` picks the highest log-likelihood; `acc_norm`
divides it by the choice's length in characters, without the space that joins it to the
context (ARC, HellaSwag: lm-eval's `len(choice)`); TruthfulQA mc2 is the
normalized probability mass on the true answers; LAMBADA reports greedy accuracy and the
perplexity of the last word. Each metric comes with its standard error.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from ..core.errors import RankcutError
from ..data import hub
from ..data.benchmarks import (
    READERS,
    Question,
    find_data_dir,
    read_task_file,
    read_text_file,
    sample,
    sample_indices,
    wikitext2,
)
from ..data.embedded import embedded_text
from .generation import run_gsm8k
from .glue import evaluate_glue, glue_model
from .perplexity import perplexity
from .scoring import Score, loglikelihoods
from .stats import mean_stderr

NORM_TASKS = {"arc_easy", "arc_challenge", "hellaswag"}
ZERO_SHOT_SIX = ["arc_easy", "arc_challenge", "hellaswag", "winogrande", "mmlu", "truthfulqa_mc2"]
PERPLEXITY_TASKS = {"wikitext2", "gensim-wiki", "gensim-news"}
GLUE_TASKS = {"sst2", "mrpc", "rte", "stsb"}


def _argmax(xs: list[float]) -> int:
    return max(range(len(xs)), key=lambda i: xs[i])


def score_multiple_choice(questions: list[Question], scores: list[list[Score]], task: str,
                          normalize: bool | None = None) -> dict[str, float]:
    """acc, and acc_norm where the task reports it (`normalize`: force it on or off)."""
    normalize = task in NORM_TASKS if normalize is None else normalize
    acc, acc_norm = [], []
    for q, row in zip(questions, scores):
        lls = [s.loglik for s in row]
        acc.append(float(_argmax(lls) == q.gold))
        if normalize:
            lengths = [max(1, len(cont.removeprefix(" "))) for _, cont in q.pairs()]
            acc_norm.append(float(_argmax([ll / n for ll, n in zip(lls, lengths)]) == q.gold))
    out = dict(zip(("acc", "acc_stderr"), mean_stderr(acc)))
    if acc_norm:
        out.update(zip(("acc_norm", "acc_norm_stderr"), mean_stderr(acc_norm)))
    return out


def score_mc2(questions: list[Question], scores: list[list[Score]]) -> dict[str, float]:
    values = []
    for q, row in zip(questions, scores):
        probs = [math.exp(s.loglik) for s in row]
        true = sum(probs[i] for i in q.gold)  # type: ignore[union-attr]
        total = sum(probs)
        values.append(true / total if total > 0 else 0.0)
    return dict(zip(("acc", "acc_stderr"), mean_stderr(values)))


def score_lambada(scores: list[list[Score]]) -> dict[str, float]:
    acc = [float(row[0].greedy) for row in scores]
    lls = [row[0].loglik for row in scores]
    mean_ll, ll_err = mean_stderr(lls)
    ppl = math.exp(-mean_ll)
    out = dict(zip(("acc", "acc_stderr"), mean_stderr(acc)))
    out.update({"perplexity": ppl, "perplexity_stderr": ppl * ll_err})
    return out


@dataclass
class TaskResult:
    task: str
    metrics: dict[str, float]
    n: int
    limit: int | None
    source: str
    items: dict[str, Any] | None = None  # which items were scored (see `items_scored`)

    def to_dict(self) -> dict[str, Any]:
        out = {"task": self.task, "metrics": self.metrics, "n": self.n, "limit": self.limit, "source": self.source}
        if self.items is not None:
            out["items"] = self.items
        return out


def items_scored(total: int, limit: int | None, sample_seed: int | None) -> dict[str, Any]:
    """The record of which items a score covers: the first n of the file (lm-eval's `--limit`), or
    a seeded sample, listed by 0-based position in the file's order."""
    picked = sample_indices(total, limit, sample_seed)
    if sample_seed is None or len(picked) == total:
        return {"how": "first" if len(picked) < total else "all", "n": len(picked), "of": total}
    return {"how": "seeded sample", "seed": sample_seed, "n": len(picked), "of": total, "indices": picked}


def check_limit(limit: int | None) -> None:
    """A sweep checks this before its configurations run, not after."""
    if limit is not None and limit < 1:
        raise RankcutError(f"--limit {limit}: give 1 or more (tokens for perplexity, questions for the other "
                           "tasks), or leave it out for the whole set")


def check_language_model(model: nn.Module, task: str) -> None:
    """Perplexity, multiple choice and generation read next-token logits, which an encoder (or a
    classifier) does not make."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        raise RankcutError(f"{task} needs next-token predictions, and {type(model).__name__} has no "
                           "language-model head; use an encoder with sst2, mrpc, rte or stsb")


def run_task(model: nn.Module, task: str, data_dir: Path | str | None = None, limit: int | None = None,
             seqlen: int = 2048, progress: bool = True, sample_seed: int | None = None) -> TaskResult:
    """Evaluate one task. For perplexity tasks `limit` is a token count (the first ones); else a
    question count: the first `limit` questions, as lm-eval takes them, or with `sample_seed` a
    seeded random sample of that many."""
    check_limit(limit)
    if sample_seed is not None and (limit is None or task in PERPLEXITY_TASKS):
        raise RankcutError("--sample-seed draws --limit questions at random: give --limit too "
                           "(perplexity tasks always read the first --limit tokens)")
    if task not in GLUE_TASKS and task in known_tasks():
        check_language_model(model, task)
    if str(data_dir) == "hub" and task not in ("gensim-wiki", "gensim-news"):
        return _run_from_hub(model, task, limit, seqlen, progress, sample_seed)
    if task in PERPLEXITY_TASKS:
        if task == "wikitext2":
            folder = find_data_dir(data_dir)
            text, source = wikitext2(folder), str(folder / "wikitext-2-raw" / "wiki.test.raw")
        else:
            text, source = embedded_text(task), f"embedded:{task}"
        return _perplexity_result(model, task, text, source, limit, seqlen, progress)
    if task in GLUE_TASKS:
        folder = find_data_dir(data_dir)
        scored, how = glue_model(model, task, folder, progress=progress)
        metrics, n = evaluate_glue(scored, task, folder, limit=limit, progress=progress, sample_seed=sample_seed)
        return TaskResult(task, metrics, n, limit, f"{folder / 'glue'} ({how})")
    if task == "gsm8k":
        folder = find_data_dir(data_dir)
        metrics, n = run_gsm8k(model, folder, limit=limit, progress=progress, sample_seed=sample_seed)
        return TaskResult(task, metrics, n, limit, str(folder / "gsm8k"))
    if task not in READERS:
        raise RankcutError(f"unknown task '{task}'; choose from {', '.join(sorted(known_tasks()))}")
    folder = find_data_dir(data_dir)
    return _score_questions(model, task, READERS[task](folder), limit, str(folder), progress, sample_seed)


def _perplexity_result(model: nn.Module, task: str, text: str, source: str, limit: int | None, seqlen: int,
                       progress: bool) -> TaskResult:
    r = perplexity(model, text, seqlen=seqlen, limit=limit, progress=progress)
    return TaskResult(task, {"perplexity": r.perplexity, "perplexity_stderr": r.perplexity_stderr,
                             "nll": r.nll, "seqlen": r.seqlen, "tokens": r.tokens}, r.windows, limit, source)


def _run_from_hub(model: nn.Module, task: str, limit: int | None, seqlen: int, progress: bool,
                  sample_seed: int | None = None) -> TaskResult:
    if task == "wikitext2":
        return _perplexity_result(model, task, hub.wikitext2(), "hub:wikitext/wikitext-2-raw-v1", limit, seqlen,
                                  progress)
    if task not in hub.HUB_READERS:
        raise RankcutError(f"task '{task}' has no hub source here; use --data-dir with local files")
    return _score_questions(model, task, hub.HUB_READERS[task](), limit, f"hub:{task}", progress, sample_seed)


def _score_questions(model: nn.Module, task: str, questions: list[Question], limit: int | None,
                     source: str, progress: bool, sample_seed: int | None = None,
                     normalize: bool | None = None) -> TaskResult:
    items = items_scored(len(questions), limit, sample_seed)
    questions = sample(questions, limit, sample_seed)
    if not questions:
        raise RankcutError(f"{task}: no questions found in {source}")
    scores = loglikelihoods(model, [q.pairs() for q in questions], progress=progress, desc=task)
    if task == "truthfulqa_mc2":
        metrics = score_mc2(questions, scores)
    elif task == "lambada":
        metrics = score_lambada(scores)
    else:
        metrics = score_multiple_choice(questions, scores, task, normalize)
    return TaskResult(task, metrics, len(questions), limit, source, items)


def run_text_file(model: nn.Module, path: str, limit: int | None = None, seqlen: int = 2048,
                  progress: bool = True) -> TaskResult:
    """Perplexity of a user's text file (`rankcut eval --text FILE`), as on wikitext2."""
    check_limit(limit)
    text = read_text_file(path)
    check_language_model(model, f"--text {path}")
    return _perplexity_result(model, f"text:{path}", text, str(path), limit, seqlen, progress)


def run_task_file(model: nn.Module, path: str, limit: int | None = None, progress: bool = True,
                  sample_seed: int | None = None) -> TaskResult:
    """A user's multiple-choice questions (`rankcut eval --task-file FILE.jsonl`): acc, and acc_norm
    by the choice's length in characters, as lm-eval scores ARC."""
    check_limit(limit)
    questions = read_task_file(path)
    check_language_model(model, f"--task-file {path}")
    return _score_questions(model, f"file:{path}", questions, limit, str(path), progress, sample_seed,
                            normalize=True)


def known_tasks() -> list[str]:
    return sorted([*READERS, *PERPLEXITY_TASKS, *GLUE_TASKS, "gsm8k"])


def parse_tasks(spec: str) -> list[str]:
    tasks: list[str] = []
    for name in filter(None, (t.strip() for t in spec.split(","))):
        if name == "zero-shot-six":
            tasks += ZERO_SHOT_SIX
        elif name in known_tasks():
            tasks.append(name)
        else:
            raise RankcutError(f"unknown task '{name}'; choose from {', '.join(known_tasks())} or zero-shot-six")
    if not tasks:
        raise RankcutError("no task given; e.g. --tasks wikitext2,arc_easy")
    return tasks
