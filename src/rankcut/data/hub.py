"""The same benchmarks from the Hugging Face hub (`--data-dir hub`), for machines online.

Each converter turns the hub's rows into exactly the records the local files hold (same
prompts, same choices, same gold), so a task scores the same from either source. Needs the
`datasets` package and network access.
"""

from __future__ import annotations

import re
from typing import Any, Callable

from ..core.errors import RankcutError
from .benchmarks import TRUTHFULQA_PROMPT, Question, _mmlu_prompt, _with_answer_cue

HUB = "hub"


def load_dataset(*args: Any, **kwargs: Any) -> Any:
    try:
        import datasets
    except ImportError:
        raise RankcutError("--data-dir hub needs the datasets package: pip install datasets") from None
    try:
        return datasets.load_dataset(*args, **kwargs)
    except Exception as exc:  # network, missing dataset: the hub's own message is the useful part
        raise RankcutError(f"could not load {args[0]} from the hub ({str(exc).splitlines()[0]}); "
                           "use --data-dir with local files instead") from None


def _hellaswag_clean(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def arc(config: str) -> Callable[[], list[Question]]:
    def load() -> list[Question]:
        out = []
        for r in load_dataset("allenai/ai2_arc", config, split="test"):
            labels = list(r["choices"]["label"])
            out.append(Question([f"Question: {r['question']}\nAnswer:"],
                                [f" {c}" for c in r["choices"]["text"]], labels.index(r["answerKey"])))
        return out
    return load


def hellaswag() -> list[Question]:
    out = []
    for r in load_dataset("Rowan/hellaswag", split="validation"):
        ctx = f"{r['ctx_a']} {r['ctx_b'].capitalize()}"
        out.append(Question([_hellaswag_clean(f"{r['activity_label']}: {ctx}")],
                            [f" {_hellaswag_clean(e)}" for e in r["endings"]], int(r["label"])))
    return out


def winogrande() -> list[Question]:
    out = []
    for r in load_dataset("allenai/winogrande", "winogrande_xl", split="validation"):
        cut = r["sentence"].index("_")
        contexts = [r["sentence"][:cut] + r[f"option{i}"] for i in (1, 2)]
        out.append(Question(contexts, [" " + r["sentence"][cut + 1:].strip()], int(r["answer"]) - 1))
    return out


def boolq() -> list[Question]:
    return [Question([_with_answer_cue(f"Passage: {r['passage']}\nQuestion: {r['question']}?")],
                     [" no", " yes"], int(r["label"]))
            for r in load_dataset("super_glue", "boolq", split="validation")]


def lambada() -> list[Question]:
    out = []
    for r in load_dataset("EleutherAI/lambada_openai", "default", split="test"):
        context, word = r["text"].rsplit(" ", 1)
        out.append(Question([context], [f" {word}"], 0))
    return out


def truthfulqa(which: str) -> Callable[[], list[Question]]:
    def load() -> list[Question]:
        out = []
        for r in load_dataset("truthfulqa/truthful_qa", "multiple_choice", split="validation"):
            targets = r[f"{which}_targets"]
            truths = [i for i, label in enumerate(targets["labels"]) if label == 1]
            out.append(Question([f"{TRUTHFULQA_PROMPT}\n\nQ: {r['question']}\nA:"],
                                [f" {c}" for c in targets["choices"]], truths[0] if which == "mc1" else truths))
        return out
    return load


def mmlu(shots: int = 0) -> Callable[[], list[Question]]:
    def load() -> list[Question]:
        dev: dict[str, list[Any]] = {}
        if shots:
            for r in load_dataset("cais/mmlu", "all", split="dev"):
                dev.setdefault(r["subject"], []).append(r)
        out = []
        for r in sorted(load_dataset("cais/mmlu", "all", split="test"), key=lambda r: r["subject"]):
            header = f"The following are multiple choice questions (with answers) about {r['subject'].replace('_', ' ')}.\n\n"
            header += "".join(_mmlu_prompt(d["question"], d["choices"]) + f" {'ABCD'[d['answer']]}\n\n"
                              for d in dev.get(r["subject"], [])[:shots])
            out.append(Question([header + _mmlu_prompt(r["question"], r["choices"])], [" A", " B", " C", " D"],
                                int(r["answer"]), {"subject": r["subject"]}))
        return out
    return load


HUB_READERS: dict[str, Callable[[], list[Question]]] = {
    "arc_easy": arc("ARC-Easy"), "arc_challenge": arc("ARC-Challenge"), "hellaswag": hellaswag,
    "winogrande": winogrande, "boolq": boolq, "lambada": lambada,
    "truthfulqa_mc1": truthfulqa("mc1"), "truthfulqa_mc2": truthfulqa("mc2"),
    "mmlu": mmlu(0), "mmlu_5shot": mmlu(5),
}


def wikitext2() -> str:
    """Equals the local file: the raw test rows joined as they are."""
    return "".join(load_dataset("wikitext", "wikitext-2-raw-v1", split="test")["text"])
