"""rankcut's scorer follows lm-eval's protocol: `--limit N` is the first N items (a seeded sample
only when asked, and the JSON says which items), BoolQ and HellaSwag prompts as lm-eval's
templates make them, an empty context opens with BOS; and a user's own text and questions are
scored from files, with bad files named by file and line."""

from __future__ import annotations

import json

import pytest

import rankcut
from rankcut.cli import main
from rankcut.data.benchmarks import (
    READERS,
    boolq_text,
    hellaswag_text,
    read_task_file,
    sample,
    sample_indices,
)
from rankcut.evaluate.perplexity import perplexity
from rankcut.evaluate.tasks import run_task, run_task_file, run_text_file


def test_limit_takes_the_first_items_and_a_seed_samples():
    items = list(range(100))
    assert sample(items, 5) == [0, 1, 2, 3, 4]
    drawn = sample(items, 5, seed=7)
    assert drawn == sorted(drawn) and drawn != [0, 1, 2, 3, 4] and drawn == sample(items, 5, seed=7)
    assert sample_indices(3, 10) == [0, 1, 2]


def test_the_json_names_the_items_scored(data_dir, capsys, tmp_path):
    out = tmp_path / "r.json"
    assert main(["eval", "tiny-llama", "--tasks", "arc_easy", "--limit", "4", "--sample-seed", "3",
                 "--out", str(out), "--json"]) == 0
    items = json.loads(out.read_text())["results"][0]["items"]
    assert items["how"] == "seeded sample" and items["indices"] == sample_indices(items["of"], 4, 3)
    model = rankcut.load_model("tiny-llama")
    first = run_task(model, "arc_easy", data_dir, limit=4, progress=False)
    assert first.items == {"how": "first", "n": 4, "of": items["of"]}


def test_boolq_prompt_is_lm_evals_template(data_dir):
    question = READERS["boolq"](data_dir)[0]
    assert not question.contexts[0].startswith("Passage: ")
    assert question.contexts[0].endswith("?\nAnswer:") and question.continuations == [" no", " yes"]
    assert boolq_text("Passage: Some text.\nQuestion: is it?") == "Some text.\nQuestion: is it?\nAnswer:"


def test_hellaswag_capitalizes_the_second_fragment_as_lm_eval_does():
    assert hellaswag_text("Roof shingle removal: A man is sitting on a roof. he") == \
        "Roof shingle removal: A man is sitting on a roof. He"
    # ctx_b.capitalize(): the first letter up, the rest down
    assert hellaswag_text("Clean and jerk: A lady walks. the lady of Rome") == "Clean and jerk: A lady walks. The lady of rome"
    assert hellaswag_text("Label: he walks") == "Label: He walks"  # no ctx_a sentence: the fragment after the label
    assert hellaswag_text("Label: A man walks. The dog") == "Label: A man walks. The dog"


def test_an_empty_context_opens_with_bos_as_lm_eval_does():
    from rankcut.evaluate.scoring import encode_pair

    tok = rankcut.get_tokenizer(rankcut.load_model("tiny-llama"))
    ids = tok("Hello", add_special_tokens=False)["input_ids"]
    assert tok.bos_token_id is not None and tok.bos_token_id != tok.eos_token_id
    ctx, cont = encode_pair(tok, "", "Hello", prefix=[])
    assert (ctx, cont) == ([tok.bos_token_id], ids)


def test_text_file_perplexity_equals_the_perplexity_of_its_text(tmp_path):
    model = rankcut.load_model("tiny-llama")
    text = ("Low-rank factors make a model smaller. " * 40).strip()
    (tmp_path / "t.txt").write_text(text)
    got = run_text_file(model, str(tmp_path / "t.txt"), seqlen=64, progress=False)
    assert got.metrics["perplexity"] == pytest.approx(perplexity(model, text, seqlen=64, progress=False).perplexity)


def test_task_file_scores_each_choice_after_the_query(tmp_path):
    model = rankcut.load_model("tiny-llama")
    lines = [{"query": "The sky is", "choices": ["blue", "green"], "gold": 0},
             {"query": "Grass is", "choices": ["green", "red", "blue"], "gold": 0}]
    (tmp_path / "q.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    questions = read_task_file(tmp_path / "q.jsonl")
    assert questions[0].pairs() == [("The sky is", " blue"), ("The sky is", " green")]
    result = run_task_file(model, str(tmp_path / "q.jsonl"), progress=False)
    assert result.n == 2 and {"acc", "acc_norm"} <= set(result.metrics)


@pytest.mark.parametrize("content, said", [
    ('{"query": "a", "choices": ["x", "y"], "gold": 0}\nnot json\n', "line 2 is not valid JSON"),
    ('{"query": "a", "choices": ["x", "y"], "gold": 2}\n', "line 1: gold 2 is not an index into its 2 choices"),
    ('{"query": "a", "choices": ["x", "y"]}\n', "line 1 needs the fields query, choices and gold"),
])
def test_a_bad_task_file_is_named_by_file_and_line_before_the_model_loads(content, said, tmp_path, capsys):
    path = tmp_path / "q.jsonl"
    path.write_text(content)
    assert main(["eval", "no-such-model", "--task-file", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert str(path) in err and said in err and len(err.splitlines()) == 1


def test_an_empty_text_file_is_named(tmp_path, capsys):
    (tmp_path / "empty.txt").write_text("  \n")
    assert main(["eval", "no-such-model", "--text", str(tmp_path / "empty.txt")]) == 2
    err = capsys.readouterr().err.strip()
    assert "empty.txt is empty" in err and len(err.splitlines()) == 1
