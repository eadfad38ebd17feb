import json
import math

import pytest
import torch

import rankcut
from rankcut.cli import main
from rankcut.core.errors import RankcutError
from rankcut.data.benchmarks import Question, find_data_dir
from rankcut.evaluate import perplexity, run_task
from rankcut.evaluate.scoring import (
    Score,
    _score_full,
    _score_shared_context,
    encode_pair,
    loglikelihoods,
)
from rankcut.evaluate.tasks import score_multiple_choice


def direct_loglik(model, context, continuation):
    """Sum of log p(continuation token | everything before), one full forward, no cache."""
    ctx, cont = encode_pair(rankcut.get_tokenizer(model), context, continuation)
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
    return sum(logp[len(ctx) - 1 + i, t].item() for i, t in enumerate(cont))


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2", "tiny-mamba"])
def test_choice_scores_equal_a_direct_computation(name):
    model = rankcut.load_model(name)
    q = Question(["Question: Which is larger?\nAnswer:"], [" the sun", " a pebble on the beach", " x"], 1)
    scores = loglikelihoods(model, [q.pairs()], progress=False)[0]
    direct = [direct_loglik(model, c, x) for c, x in q.pairs()]
    assert [s.loglik for s in scores] == pytest.approx(direct, abs=1e-3)
    chosen = max(range(3), key=lambda i: direct[i])
    # lm-eval's acc_norm: divided by len(choice), characters, without the joining space
    norm_chosen = max(range(3), key=lambda i: direct[i] / len(q.continuations[i].removeprefix(" ")))
    metrics = score_multiple_choice([q], [scores], "arc_easy")
    assert metrics["acc"] == float(chosen == 1)
    assert metrics["acc_norm"] == float(norm_chosen == 1)


@pytest.mark.filterwarnings("error::FutureWarning")  # a deprecated cache keyword is drift too
@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_a_transformer_shares_its_context_cache(name):
    """Guards the fast path against cache API drift (transformers 5.24 renamed it `cache`):
    a silent fallback to full scoring would keep answers right and make evals slower."""
    model = rankcut.load_model(name)
    tok = rankcut.get_tokenizer(model)
    pairs = [encode_pair(tok, "The sky is", x) for x in (" blue and wide", " green")]
    ctx, conts = pairs[0][0], [c for _, c in pairs]
    shared = _score_shared_context(model, ctx, conts)
    assert shared is not None
    assert [s.loglik for s in shared] == pytest.approx([s.loglik for s in _score_full(model, ctx, conts)], abs=1e-4)


def test_partial_scoring_scores_the_shared_continuation():
    model = rankcut.load_model("tiny-llama")
    q = Question(["The trophy did not fit because the trophy", "The trophy did not fit because the case"],
                 [" was too big."], 0)
    scores = loglikelihoods(model, [q.pairs()], progress=False)[0]
    assert [s.loglik for s in scores] == pytest.approx([direct_loglik(model, c, x) for c, x in q.pairs()], abs=1e-3)


def test_trailing_space_moves_to_the_continuation():
    tok = rankcut.get_tokenizer(rankcut.load_model("tiny-llama"))
    ctx, cont = encode_pair(tok, "Answer: ", "yes")
    assert tok.decode(ctx) == "Answer:" and tok.decode(cont) == " yes"


def test_perplexity_of_a_uniform_model_is_the_vocabulary_size():
    model = rankcut.load_model("tiny-llama")
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()  # every logit 0: uniform over the vocabulary
    r = perplexity(model, "some text to score " * 40, seqlen=32, progress=False)
    assert r.perplexity == pytest.approx(model.config.vocab_size, rel=1e-5)
    assert r.windows == r.tokens // 32


def test_malformed_task_file_names_file_and_line(tmp_path):
    folder = tmp_path / "arc_easy"
    folder.mkdir()
    good = json.dumps({"query": "Question: q?", "choices": ["a", "b"], "gold": 0})
    (folder / "arc_easy.jsonl").write_text(f"{good}\n{good}\n{{broken\n")
    with pytest.raises(RankcutError, match=r"arc_easy.jsonl line 3"):
        run_task(rankcut.load_model("tiny-llama"), "arc_easy", data_dir=tmp_path, progress=False)


def test_missing_data_and_unknown_task(tmp_path, capsys):
    with pytest.raises(RankcutError, match="--data-dir"):
        find_data_dir(tmp_path / "nope")
    with pytest.raises(RankcutError, match="missing"):
        run_task(rankcut.load_model("tiny-llama"), "hellaswag", data_dir=tmp_path, progress=False)
    (tmp_path / "winogrande").mkdir()
    (tmp_path / "winogrande" / "winogrande.jsonl").write_text("")
    with pytest.raises(RankcutError, match="empty"):
        run_task(rankcut.load_model("tiny-llama"), "winogrande", data_dir=tmp_path, progress=False)
    assert main(["eval", "tiny-llama", "--tasks", "arc_medium"]) == 2
    assert "unknown task 'arc_medium'" in capsys.readouterr().err


@pytest.mark.parametrize("task", ["wikitext2", "arc_easy", "gsm8k"])
def test_an_encoder_is_refused_on_next_token_tasks(task, tmp_path):
    with pytest.raises(RankcutError, match=f"{task} needs next-token predictions, and BertModel has no"):
        run_task(rankcut.load_model("tiny-bert"), task, data_dir=tmp_path, progress=False)


def test_an_architecture_without_a_classifier_is_refused_on_glue():
    from rankcut.evaluate.glue import classifier_from_encoder

    with pytest.raises(RankcutError, match="no sequence classifier for MambaConfig"):
        classifier_from_encoder(rankcut.load_model("tiny-mamba"), 2)


def test_an_answer_longer_than_a_position_table_is_refused():
    with pytest.raises(RankcutError, match="an answer of 300 tokens leaves no room"):
        loglikelihoods(rankcut.load_model("tiny-gpt2"), [[("Q:", " " + "x" * 299)]], progress=False)


def test_gsm8k_prompts_lose_their_start_to_fit_the_positions(tmp_path, caplog):
    from rankcut.evaluate.generation import run_gsm8k

    folder = tmp_path / "gsm8k"
    folder.mkdir()
    rec = {"question": "How many apples? " * 20, "answer": "Two and two make four. #### 4"}
    for split, n in (("train", 5), ("test", 2)):
        (folder / f"{split}.jsonl").write_text("\n".join(json.dumps(rec) for _ in range(n)) + "\n")
    model = rankcut.load_model("tiny-gpt2")  # 256 learned positions: a longer input fails in the embedding
    lengths = []
    generate = model.generate

    def recording(ids, **kwargs):
        lengths.append(ids.shape[1] + kwargs["max_new_tokens"])
        return generate(ids, **kwargs)

    model.generate = recording
    with caplog.at_level("WARNING"):
        metrics, n = run_gsm8k(model, tmp_path, progress=False)
    assert n == 2 and 0 <= metrics["exact_match"] <= 1
    assert lengths == [256, 256] and "2 of 2 prompts lost their start" in caplog.text


def test_model_without_tokenizer(tmp_path):
    model = rankcut.load_model("tiny-llama")
    rankcut.record_of(model).tokenizer = None
    with pytest.raises(RankcutError, match="no tokenizer"):
        perplexity(model, "text", progress=False)


@pytest.mark.integration
def test_eval_writes_one_document_from_the_shared_data(tmp_path, capsys):
    out = tmp_path / "r.json"
    assert main(["eval", "tiny-llama", "--tasks", "arc_easy,winogrande", "--limit", "8", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert [r["task"] for r in doc["results"]] == ["arc_easy", "winogrande"]
    for r in doc["results"]:
        assert r["limit"] == 8 and r["n"] == 8 and r["source"]
        assert all(math.isfinite(v) for v in r["metrics"].values())
    assert "acc_norm_stderr" in doc["results"][0]["metrics"]
    assert main(["eval", "tiny-llama", "--tasks", "wikitext2", "--limit", "256", "--seqlen", "64",
                 "--out", str(out)]) == 0
    ppl = json.loads(out.read_text())["results"][0]
    assert ppl["source"].endswith("wiki.test.raw") and ppl["n"] == 4 and ppl["metrics"]["tokens"] == 256


def test_hub_rows_convert_to_the_local_records(monkeypatch):
    """The hub converters must produce the records the local files hold (same prompt, gold)."""
    from rankcut.data import hub
    from rankcut.data.benchmarks import READERS

    rows = {
        "allenai/ai2_arc": [{"question": "Which is a gas?", "choices": {"text": ["ice", "steam"], "label": ["A", "B"]},
                             "answerKey": "B"}],
        "allenai/winogrande": [{"sentence": "Sarah beat Maria so _ won.", "option1": "Sarah", "option2": "Maria",
                                "answer": "1"}],
    }
    monkeypatch.setattr(hub, "load_dataset", lambda name, *a, **k: rows[name])
    (arc,) = hub.HUB_READERS["arc_easy"]()
    assert arc.contexts == ["Question: Which is a gas?\nAnswer:"] and arc.continuations == [" ice", " steam"]
    assert arc.gold == 1
    (wino,) = hub.HUB_READERS["winogrande"]()
    assert wino.contexts == ["Sarah beat Maria so Sarah", "Sarah beat Maria so Maria"]
    assert wino.continuations == [" won."] and wino.gold == 0
    assert set(hub.HUB_READERS) == set(READERS)


def test_hub_without_datasets_is_a_clear_error(monkeypatch):
    import builtins

    from rankcut.data import hub

    real_import = builtins.__import__
    monkeypatch.setattr(builtins, "__import__",
                        lambda name, *a, **k: (_ for _ in ()).throw(ImportError()) if name == "datasets"
                        else real_import(name, *a, **k))
    with pytest.raises(RankcutError, match="pip install datasets"):
        hub.load_dataset("wikitext")


def test_acc_norm_divides_by_the_choice_in_characters_without_its_space():
    """Two choices whose order flips between lm-eval's length (characters of the choice) and the
    byte length of " " + choice: "é" is two bytes, and the space weighs most on short choices."""
    q = Question(["Q"], [" éé", " abcd"], 0)
    scores = [[Score(-2.1, False), Score(-4.0, False)]]
    # lm-eval: -2.1/2 = -1.05 against -4.0/4 = -1.0 → choice 1; bytes: -2.1/5 against -4.0/5 → choice 0
    assert score_multiple_choice([q], scores, "arc_easy")["acc_norm"] == 0.0
    assert score_multiple_choice([q], scores, "arc_easy")["acc"] == 1.0
