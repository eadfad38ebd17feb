"""lm-evaluation-harness for real, offline: lm-eval scores the in-memory model on the local
benchmark files through task configs with its own templates, and its numbers equal rankcut's
scorer on the same strings."""

from __future__ import annotations

import json
import math

import pytest

import rankcut
from rankcut.cli import main
from rankcut.core.errors import RankcutError
from rankcut.data.benchmarks import read_jsonl
from rankcut.evaluate.harness import LOCAL_TASKS, run_lm_eval, task_specs
from rankcut.evaluate.scoring import loglikelihoods
from rankcut.evaluate.tasks import run_task

N = 10


@pytest.fixture(scope="module")
def tiny():
    return rankcut.load_model("tiny-llama")


@pytest.fixture(scope="module")
def harness(tiny, data_dir):
    return run_lm_eval(tiny, ["arc_easy", "boolq", "winogrande", "lambada", "mmlu", "truthfulqa_mc2"],
                       limit=N)["results"]


def _first(data_dir, folder: str, file: str) -> list[dict]:
    return [r for _, r in read_jsonl(data_dir / folder / file, folder)][:N]


def _picks(model, records, context, choices) -> list[list[float]]:
    scores = loglikelihoods(model, [[(context(r), c) for c in choices(r)] for r in records], progress=False)
    return [[s.loglik for s in row] for row in scores]


def _argmax(xs) -> int:
    return max(range(len(xs)), key=xs.__getitem__)


def test_lm_eval_scores_the_first_items_of_the_local_files(harness):
    assert {k: v["sample_len"] for k, v in harness.items()} == \
        {"arc_easy": N, "boolq": N, "winogrande": N, "lambada_openai": N, "mmlu": N, "truthfulqa_mc2": N}


def test_lm_eval_arc_equals_rankcuts_scorer_on_the_same_strings(tiny, data_dir, harness):
    """acc picks the best log-likelihood; acc_norm divides it by the choice's character length."""
    records = _first(data_dir, "arc_easy", "arc_easy.jsonl")
    lls = _picks(tiny, records, lambda r: r["query"] + "\nAnswer:", lambda r: [" " + c for c in r["choices"]])
    acc = sum(_argmax(row) == r["gold"] for row, r in zip(lls, records)) / N
    norm = sum(_argmax([ll / len(c) for ll, c in zip(row, r["choices"])]) == r["gold"]
               for row, r in zip(lls, records)) / N
    assert harness["arc_easy"]["acc,none"] == pytest.approx(acc)
    assert harness["arc_easy"]["acc_norm,none"] == pytest.approx(norm)


def test_lm_eval_boolq_uses_its_own_template(tiny, data_dir, harness):
    """lm-eval's BoolQ prompt is "passage\\nQuestion: ...?\\nAnswer:", without the file's "Passage: "."""
    records = _first(data_dir, "boolq", "boolq.jsonl")
    assert all(r["query"].startswith("Passage: ") for r in records)
    lls = _picks(tiny, records, lambda r: r["query"][len("Passage: "):] + "\nAnswer:", lambda r: [" no", " yes"])
    acc = sum(_argmax(row) == r["gold"] for row, r in zip(lls, records)) / N
    assert harness["boolq"]["acc,none"] == pytest.approx(acc)


def test_tasks_without_a_faithful_local_form_are_refused_before_any_work(capsys):
    with pytest.raises(RankcutError, match="reads hellaswag from the hub only"):
        task_specs(["arc_easy", "hellaswag", "mmlu"])
    assert task_specs(["wikitext2", "hellaswag"], "hub") == ["wikitext", "hellaswag"]
    assert main(["eval", "no-such-model", "--tasks", "hellaswag", "--harness", "lm-eval"]) == 2
    assert "from the hub only" in capsys.readouterr().err  # not "unknown model": refused first


def test_cli_runs_lm_eval_offline(capsys, data_dir, tmp_path):
    out = tmp_path / "r.json"
    assert main(["eval", "tiny-llama", "--tasks", "arc_challenge,lambada", "--harness", "lm-eval",
                 "--limit", "3", "--out", str(out), "--json"]) == 0
    doc = json.loads(out.read_text())
    assert doc["results"]["harness"] == "lm-eval" and doc["results"]["lm_eval_version"].startswith("0.4.")
    assert set(doc["results"]["results"]) == {"arc_challenge", "lambada_openai"}
    assert set(LOCAL_TASKS) == {"arc_easy", "arc_challenge", "boolq", "winogrande", "lambada", "mmlu",
                                "truthfulqa_mc1", "truthfulqa_mc2"}


@pytest.mark.integration
def test_lm_eval_on_smollm2(capsys, data_dir):
    assert main(["eval", "smollm2-135m", "--tasks", "arc_easy,winogrande", "--harness", "lm-eval",
                 "--limit", "5", "--json"]) == 0
    results = json.loads(capsys.readouterr().out)["results"]["results"]
    assert results["arc_easy"]["sample_len"] == 5 and 0 <= results["winogrande"]["acc,none"] <= 1


@pytest.mark.parametrize("task, theirs", [("arc_easy", "arc_easy"), ("boolq", "boolq"), ("winogrande", "winogrande"),
                                          ("lambada", "lambada_openai"), ("mmlu", "mmlu"),
                                          ("truthfulqa_mc2", "truthfulqa_mc2")])
def test_rankcuts_scorer_gives_lm_evals_numbers(tiny, data_dir, harness, task, theirs):
    """The same first N items, rankcut's own templates and metrics: lm-eval's acc, acc_norm, perplexity."""
    ours = run_task(tiny, task, data_dir, limit=N, progress=False)
    assert ours.items == {"how": "first", "n": N, "of": ours.items["of"]}
    compared = [m for m in ("acc", "acc_norm", "perplexity") if f"{m},none" in harness[theirs]]
    assert "acc" in compared
    for metric in compared:
        if metric == "perplexity":  # exp(-mean log-likelihood): compare the mean, to float32 batching noise
            assert math.log(ours.metrics[metric]) == pytest.approx(math.log(harness[theirs][f"{metric},none"]),
                                                                   rel=1e-3)
        else:
            assert ours.metrics[metric] == pytest.approx(harness[theirs][f"{metric},none"], rel=1e-6), metric


def test_mmlu_and_truthfulqa_use_lm_evals_own_yaml(data_dir):
    """The templates come from lm-eval's installed task files, not from rankcut's copy of them."""
    from rankcut.evaluate.harness import lm_eval_task_config

    mmlu, = task_specs(["mmlu"], data_dir)
    assert mmlu["doc_to_text"].endswith(lm_eval_task_config("mmlu/default/_default_template_yaml")["doc_to_text"])
    rows = mmlu["custom_dataset"]()["test"]
    assert rows[0]["description"] == lm_eval_task_config(f"mmlu/default/mmlu_{rows[0]['subject']}.yaml")["description"]
    tqa, = task_specs(["truthfulqa_mc2"], data_dir)
    assert tqa["process_results"].__module__.endswith("truthfulqa.utils")
