"""Benchmark data from a local folder (the layout of `../shared/data`) or the Hugging Face hub.

A task becomes a list of `Question`s: a context, the candidate continuations, the gold index.
Partial-scoring tasks (WinoGrande) have one context per option and a shared continuation.
Every reader names the file and line of a malformed record.
"""

from __future__ import annotations

import csv
import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from ..core.errors import RankcutError

DATA_ENV = "RANKCUT_DATA_DIR"


@dataclass
class Question:
    contexts: list[str]  # one shared context, or one per option (partial scoring)
    continuations: list[str]  # one per option, or one shared (partial scoring)
    gold: int | list[int]  # index; a list of true indices for mc2
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def n_options(self) -> int:
        return max(len(self.contexts), len(self.continuations))

    def pairs(self) -> list[tuple[str, str]]:
        n = self.n_options
        ctx = self.contexts if len(self.contexts) == n else self.contexts * n
        cont = self.continuations if len(self.continuations) == n else self.continuations * n
        return list(zip(ctx, cont))


def find_data_dir(explicit: str | os.PathLike | None = None) -> Path:
    """--data-dir, else $RANKCUT_DATA_DIR, else a `shared/data` beside or above the working folder."""
    if explicit is not None:
        path = Path(explicit)
        if not path.is_dir():
            raise RankcutError(f"data folder {path} does not exist; pass --data-dir pointing at the "
                               "benchmark files (e.g. ../shared/data)")
        return path
    if os.environ.get(DATA_ENV):
        return find_data_dir(os.environ[DATA_ENV])
    for base in [Path.cwd(), *Path.cwd().parents]:
        for candidate in (base / "shared" / "data", base.parent / "shared" / "data"):
            if candidate.is_dir():
                return candidate
    raise RankcutError(f"no benchmark data folder found; pass --data-dir DIR or set {DATA_ENV}")


def require_file(path: Path, task: str) -> Path:
    if not path.is_file():
        raise RankcutError(f"{task}: data file {path} is missing; check --data-dir")
    if path.stat().st_size == 0:
        raise RankcutError(f"{task}: data file {path} is empty")
    return path


def read_jsonl(path: Path, task: str) -> Iterator[tuple[int, dict]]:
    with open(require_file(path, task), encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise RankcutError(f"{task}: {path} line {lineno} is not valid JSON ({exc.msg})") from None
            if not isinstance(record, dict):
                raise RankcutError(f"{task}: {path} line {lineno} is not a JSON object")
            yield lineno, record


def _field(record: dict, key: str, path: Path, lineno: int, task: str) -> Any:
    if key not in record:
        raise RankcutError(f"{task}: {path} line {lineno} has no '{key}' field")
    return record[key]


def _with_answer_cue(query: str) -> str:
    return query if query.rstrip().endswith("Answer:") else f"{query}\nAnswer:"


# --------------------------------------------------------------------------- readers

def wikitext2(data_dir: Path) -> str:
    path = require_file(data_dir / "wikitext-2-raw" / "wiki.test.raw", "wikitext2")
    return path.read_text(encoding="utf-8").replace("\r\n", "\n")


def boolq_text(query: str) -> str:
    """lm-eval's BoolQ prompt, "{passage}\nQuestion: {question}?\nAnswer:", from the file's
    "Passage: {passage}\nQuestion: {question}?" (lm-eval's template has no "Passage: ")."""
    return _with_answer_cue(query.removeprefix("Passage: "))


def hellaswag_text(line: str) -> str:
    """lm-eval's HellaSwag context from the file's line.

    lm-eval builds `activity_label + ": " + ctx_a + " " + ctx_b.capitalize()`; the file joined
    ctx_a and ctx_b as they were, so the second fragment starts lowercase ("... on a roof. he").
    ctx_b is the fragment after the last sentence end: where it starts lowercase it is
    capitalized as lm-eval does (first letter up, the rest down). A ctx_b that already starts
    uppercase cannot be told apart from ctx_a and is left as it is (lm-eval would lowercase any
    later capitals in it)."""
    head, sep, tail = line.rpartition(". ")
    if not sep:
        head, sep, tail = line.partition(": ")
    if sep and tail[:1].islower():
        return head + sep + tail.capitalize()
    return line


def _query_choices(folder: str, file: str, prompt: Callable[[str], str] = _with_answer_cue
                   ) -> Callable[[Path], list[Question]]:
    """ARC and BoolQ: {query, choices, gold}; scored as lm-eval does, ' ' + choice after 'Answer:'."""
    def load(data_dir: Path) -> list[Question]:
        path = data_dir / folder / file
        out = []
        for lineno, rec in read_jsonl(path, folder):
            choices = _field(rec, "choices", path, lineno, folder)
            gold = _field(rec, "gold", path, lineno, folder)
            if not isinstance(choices, list) or not isinstance(gold, int) or not 0 <= gold < len(choices):
                raise RankcutError(f"{folder}: {path} line {lineno} has bad choices or gold")
            query = prompt(_field(rec, "query", path, lineno, folder))
            out.append(Question([query], [f" {c}" for c in choices], gold, {"line": lineno}))
        return out
    return load


def hellaswag(data_dir: Path) -> list[Question]:
    path = require_file(data_dir / "hellaswag" / "hellaswag_val_full.txt", "hellaswag")
    lines = path.read_text(encoding="utf-8").split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if len(lines) % 6:
        raise RankcutError(f"hellaswag: {path} has {len(lines)} lines, not a multiple of 6 "
                           f"(the last record starts at line {len(lines) - len(lines) % 6 + 1})")
    out = []
    for i in range(0, len(lines), 6):
        try:
            gold = int(lines[i + 1])
        except ValueError:
            raise RankcutError(f"hellaswag: {path} line {i + 2} should be the gold index 0-3") from None
        out.append(Question([hellaswag_text(lines[i])], [f" {e}" for e in lines[i + 2:i + 6]], gold,
                            {"line": i + 1, "raw": lines[i]}))
    return out


def winogrande(data_dir: Path) -> list[Question]:
    path = data_dir / "winogrande" / "winogrande.jsonl"
    return [Question(_field(r, "context_options", path, n, "winogrande"),
                     [" " + _field(r, "continuation", path, n, "winogrande")],
                     _field(r, "gold", path, n, "winogrande"), {"line": n})
            for n, r in read_jsonl(path, "winogrande")]


def lambada(data_dir: Path) -> list[Question]:
    path = data_dir / "lambada" / "lambada_openai.jsonl"
    return [Question([_field(r, "context", path, n, "lambada")], [" " + _field(r, "continuation", path, n, "lambada")],
                     0, {"line": n}) for n, r in read_jsonl(path, "lambada")]


TRUTHFULQA_PROMPT = (
    "Q: What is human life expectancy in the United States?\n"
    "A: Human life expectancy in the United States is 78 years.\n\n"
    "Q: Who was president of the United States in 1955?\n"
    "A: Dwight D. Eisenhower was president of the United States in 1955.\n\n"
    "Q: Which party did he belong to?\nA: He belonged to the Republican Party.\n\n"
    "Q: What is the square root of banana?\nA: I have no comment.\n\n"
    "Q: How does a telescope work?\n"
    "A: Telescopes use lenses or mirrors to focus light and make objects appear closer.\n\n"
    "Q: Where were the 1992 Olympics held?\nA: The 1992 Olympics were held in Barcelona, Spain."
)


def _truthfulqa_json(data_dir: Path) -> list[dict[str, Any]]:
    """mc_task.json's records, each checked to hold a question and both target maps."""
    path = require_file(data_dir / "truthfulqa" / "mc_task.json", "truthfulqa")
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise RankcutError(f"truthfulqa: {path} line {exc.lineno} is not valid JSON ({exc.msg})") from None
    for i, rec in enumerate(records):
        if "question" not in rec or not all(isinstance(rec.get(f"{w}_targets"), dict) for w in ("mc1", "mc2")):
            raise RankcutError(f"truthfulqa: {path} record {i} lacks question or its targets")
    return records


def _truthfulqa(which: str) -> Callable[[Path], list[Question]]:
    def load(data_dir: Path) -> list[Question]:
        out = []
        for i, rec in enumerate(_truthfulqa_json(data_dir)):
            targets = rec[f"{which}_targets"]
            answers = list(targets)
            truths = [j for j, a in enumerate(answers) if targets[a] == 1]
            context = f"{TRUTHFULQA_PROMPT}\n\nQ: {rec['question']}\nA:"
            gold: int | list[int] = truths[0] if which == "mc1" else truths
            out.append(Question([context], [f" {a}" for a in answers], gold, {"record": i}))
        return out
    return load


def _mmlu_test_files(data_dir: Path) -> list[tuple[str, Path]]:
    """(subject, test file) for every subject, in sorted order."""
    test_dir = data_dir / "mmlu" / "test"
    if not test_dir.is_dir():
        raise RankcutError(f"mmlu: folder {test_dir} is missing; check --data-dir")
    return [(path.name[: -len("_test.csv")], path) for path in sorted(test_dir.glob("*_test.csv"))]


def mmlu(data_dir: Path, shots: int = 0) -> list[Question]:
    out = []
    for subject, path in _mmlu_test_files(data_dir):
        header = f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"
        if shots:
            dev = _mmlu_rows(data_dir / "mmlu" / "dev" / f"{subject}_dev.csv")[:shots]
            header += "".join(_mmlu_prompt(q, c) + f" {'ABCD'[a]}\n\n" for q, c, a, _ in dev)
        for question, choices, answer, lineno in _mmlu_rows(path):
            out.append(Question([header + _mmlu_prompt(question, choices)], [" A", " B", " C", " D"], answer,
                                {"subject": subject, "line": lineno}))
    return out


def _mmlu_prompt(question: str, choices: list[str]) -> str:
    return question.strip() + "".join(f"\n{letter}. {c}" for letter, c in zip("ABCD", choices)) + "\nAnswer:"


def _mmlu_rows(path: Path) -> list[tuple[str, list[str], int, int]]:
    rows = []
    with open(require_file(path, "mmlu"), encoding="utf-8", newline="") as fh:
        reader = csv.reader(fh)
        header = next(reader, None)
        if header is None or header[:1] != ["question"]:
            raise RankcutError(f"mmlu: {path} line 1 should be the header question,choice0..3,answer")
        for row in reader:
            lineno = reader.line_num
            try:
                rows.append((row[0], row[1:5], int(row[5]), lineno))
            except (IndexError, ValueError):
                raise RankcutError(f"mmlu: {path} line {lineno} should have 6 fields ending in 0-3") from None
    return rows


READERS: dict[str, Callable[[Path], list[Question]]] = {
    "arc_easy": _query_choices("arc_easy", "arc_easy.jsonl"),
    "arc_challenge": _query_choices("arc_challenge", "arc_challenge.jsonl"),
    "boolq": _query_choices("boolq", "boolq.jsonl", boolq_text),
    "hellaswag": hellaswag,
    "winogrande": winogrande,
    "lambada": lambada,
    "truthfulqa_mc1": _truthfulqa("mc1"),
    "truthfulqa_mc2": _truthfulqa("mc2"),
    "mmlu": mmlu,
    "mmlu_5shot": lambda d: mmlu(d, shots=5),
}


def sample(items: list, limit: int | None, seed: int | None = None) -> list:
    """The first `limit` items, as lm-eval's `--limit` takes them; with a `seed`, a fixed random
    sample of `limit` items instead, in their order (all of them, in order, without a limit)."""
    return [items[i] for i in sample_indices(len(items), limit, seed)]


def sample_indices(n: int, limit: int | None, seed: int | None = None) -> list[int]:
    """Which of `n` items `sample` takes (0-based positions in the file's order)."""
    if limit is None or limit >= n:
        return list(range(n))
    if seed is None:
        return list(range(limit))
    return sorted(random.Random(seed).sample(range(n), limit))


# --------------------------------------------------------------------------- a user's own files

def read_text_file(path: str | os.PathLike) -> str:
    """`rankcut eval --text FILE`: UTF-8 text whose perplexity is measured."""
    path = Path(path)
    if not path.is_file():
        raise RankcutError(f"--text {path}: no such file")
    try:
        text = path.read_text(encoding="utf-8").replace("\r\n", "\n")
    except UnicodeDecodeError as exc:
        line = path.read_bytes()[: exc.start].count(b"\n") + 1
        raise RankcutError(f"--text {path} line {line} is not UTF-8 text; save the file as UTF-8") from None
    if not text.strip():
        raise RankcutError(f"--text {path} is empty; give a file with the text to measure")
    return text


def read_task_file(path: str | os.PathLike) -> list[Question]:
    """`rankcut eval --task-file FILE.jsonl`: one multiple-choice question per line,
    {"query": str, "choices": [str, ...], "gold": int}, scored as lm-eval scores its own
    multiple-choice tasks (each choice after the query and a space)."""
    path = Path(path)
    if not path.is_file():
        raise RankcutError(f"--task-file {path}: no such file")
    out = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            where = f"--task-file {path} line {lineno}"
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise RankcutError(f"{where} is not valid JSON ({exc.msg}); each line is "
                                   '{"query": ..., "choices": [...], "gold": N}') from None
            if not isinstance(rec, dict) or not {"query", "choices", "gold"} <= set(rec):
                raise RankcutError(f"{where} needs the fields query, choices and gold")
            query, choices, gold = rec["query"], rec["choices"], rec["gold"]
            if not isinstance(query, str) or not isinstance(choices, list) or len(choices) < 2 \
                    or not all(isinstance(c, str) and c for c in choices):
                raise RankcutError(f"{where}: query must be text and choices a list of two or more non-empty texts")
            if type(gold) is not int or not 0 <= gold < len(choices):
                raise RankcutError(f"{where}: gold {gold!r} is not an index into its {len(choices)} choices "
                                   f"(0 to {len(choices) - 1})")
            out.append(Question([query], [f" {c}" for c in choices], gold, {"line": lineno}))
    if not out:
        raise RankcutError(f"--task-file {path} has no questions")
    return out


# --------------------------------------------------------------------------- rows in the hub datasets' shape

def mmlu_records(data_dir: Path) -> list[dict[str, Any]]:
    """MMLU's test rows as the hub's `cais/mmlu` holds them (question, subject, choices, answer),
    subjects in sorted order: what `--harness lm-eval` hands lm-eval offline."""
    return [{"question": q, "subject": subject, "choices": c, "answer": a}
            for subject, path in _mmlu_test_files(data_dir) for q, c, a, _ in _mmlu_rows(path)]


def truthfulqa_records(data_dir: Path) -> list[dict[str, Any]]:
    """TruthfulQA's multiple-choice rows as the hub's `truthful_qa/multiple_choice` holds them
    (question; mc1_targets and mc2_targets as choices and labels)."""
    return [{"question": rec["question"],
             **{f"{w}_targets": {"choices": list(rec[f"{w}_targets"]),
                                 "labels": [int(v) for v in rec[f"{w}_targets"].values()]} for w in ("mc1", "mc2")}}
            for rec in _truthfulqa_json(data_dir)]


def hellaswag_records(data_dir: Path) -> list[dict[str, Any]]:
    """HellaSwag's rows in the hub's shape, with the context split back into its fields as well as
    the local file allows: activity_label before the first ": ", ctx_b the fragment after the last
    sentence end (see `hellaswag_text`), ctx_a the rest. The split is a reconstruction, not data."""
    out = []
    for q in hellaswag(data_dir):
        line = q.meta["raw"]
        label, _, ctx = line.partition(": ")
        head, sep, tail = ctx.rpartition(". ")
        ctx_a, ctx_b = (head + ".", tail) if sep else ("", ctx)
        out.append({"activity_label": label, "ctx_a": ctx_a, "ctx_b": ctx_b,
                    "endings": [e.removeprefix(" ") for e in q.continuations], "label": str(q.gold)})
    return out
