import json

import pytest
import torch

import rankcut
from rankcut.cli import main
from rankcut.core.errors import RankcutError
from rankcut.data.glue import read_glue
from rankcut.evaluate import run_task
from rankcut.evaluate.glue import (
    Recipe,
    _pearson,
    _ranks,
    classifier_from_encoder,
    evaluate_glue,
    finetune,
)
from rankcut.speed.bench import benchmark, ratios, static_figures


def write_sst2(root, n_train=64, n_dev=16):
    folder = root / "glue" / "SST-2"
    folder.mkdir(parents=True)
    good, bad = "a truly moving film", "a truly boring film"  # equal length: buckets mix labels
    rows = lambda n: "".join(f"{good if i % 2 else bad}\t{i % 2}\n" for i in range(n))  # noqa: E731
    (folder / "train.tsv").write_text("sentence\tlabel\n" + rows(n_train))
    (folder / "dev.tsv").write_text("sentence\tlabel\n" + rows(n_dev))


def test_finetune_learns_a_separable_task(tmp_path):
    write_sst2(tmp_path, n_train=256)
    model = classifier_from_encoder(rankcut.load_model("tiny-bert"), 2)
    before, _ = evaluate_glue(model, "sst2", tmp_path, progress=False)
    finetune(model, "sst2", tmp_path, Recipe(lr=1e-3, epochs=6), progress=False)
    after, n = evaluate_glue(model, "sst2", tmp_path, progress=False)
    assert n == 16 and after["accuracy"] == 1.0 > before["accuracy"] - 1e-9


def test_glue_eval_fine_tunes_once_and_caches_the_model(tmp_path, monkeypatch):
    monkeypatch.setenv("RANKCUT_CACHE", str(tmp_path / "cache"))
    write_sst2(tmp_path / "data")
    model = rankcut.load_model("tiny-bert")
    result = run_task(model, "sst2", data_dir=tmp_path / "data", progress=False)
    assert result.n == 16 and 0.0 <= result.metrics["accuracy"] <= 1.0
    cached = tmp_path / "cache" / "glue" / "tiny-bert-sst2"
    assert (cached / "rankcut.json").is_file()
    again = run_task(rankcut.load_model("tiny-bert"), "sst2", data_dir=tmp_path / "data", progress=False)
    assert "cached" in again.source and again.metrics == result.metrics


def test_classifier_keeps_the_encoder_weights():
    enc = rankcut.load_model("tiny-bert")
    clf = classifier_from_encoder(enc, 2)
    a = enc.encoder.layer[0].attention.self.query.weight
    assert torch.equal(clf.bert.encoder.layer[0].attention.self.query.weight, a)


def test_glue_metrics_against_hand_computation():
    x = torch.tensor([1.0, 2.0, 3.0, 10.0], dtype=torch.float64)
    assert _pearson(_ranks(x), _ranks(x ** 3)) == pytest.approx(1.0)  # Spearman of a monotone map
    assert _pearson(x, -2 * x + 1) == pytest.approx(-1.0)
    assert _ranks(torch.tensor([5.0, 1.0, 5.0])).tolist() == [1.5, 0.0, 1.5]


def test_glue_file_errors(tmp_path):
    folder = tmp_path / "glue" / "SST-2"
    folder.mkdir(parents=True)
    (folder / "dev.tsv").write_text("sentence\tlabel\nonly one column\n")
    with pytest.raises(RankcutError, match="line 2"):
        read_glue(tmp_path, "sst2", "dev")
    with pytest.raises(RankcutError, match="missing"):
        read_glue(tmp_path, "sst2", "train")


def test_static_figures_follow_the_ranks():
    dense = rankcut.load_model("tiny-llama")
    small = rankcut.load_model("tiny-llama")
    report = rankcut.compress_(small, rankcut.SVD(rank=4), progress=False)
    a, b = static_figures(dense), static_figures(small)
    saved = sum(r["dense_params"] - r["params"] for r in report.modules.values())
    assert a.params - b.params == saved
    assert a.linear_flops_per_token - b.linear_flops_per_token == 2 * saved
    assert b.bytes_by_dtype == {"float32": b.bytes}


def test_bench_side_by_side_reports_ratios(capsys, tmp_path):
    out = tmp_path / "c"
    assert main(["compress", "tiny-llama", "--rank", "4", "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["bench", "tiny-llama", "--vs", str(out), "--seqlen", "32", "--repeats", "2",
                 "--decode", "4", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    r = doc["ratios"]
    assert r["params"] < 1 and r["prefill_speedup"] > 0 and r["decode_speedup"] > 0
    assert set(doc["models"]) == {"tiny-llama", str(out)}
    for what in ("prefill", "decode"):  # a ratio of medians lies within its paired runs' range
        assert r[f"{what}_speedup_low"] <= r[f"{what}_speedup"] <= r[f"{what}_speedup_high"]


def test_speedup_range_pairs_each_repeat_with_its_partner():
    from rankcut.speed.bench import BenchResult, StaticFigures

    def result(prefill, decode):
        return BenchResult("m", StaticFigures(10, 40, {}, 20), prefill_s=prefill, decode_tokens_per_s=decode)

    dense, fast = result([2.0, 3.0, 1.0], [10.0, 10.0]), result([1.0, 1.0, 2.0], [12.0, 20.0])
    r = ratios(dense, fast)
    assert (r["prefill_speedup_low"], r["prefill_speedup"], r["prefill_speedup_high"]) == (0.5, 2.0, 3.0)
    assert (r["decode_speedup_low"], r["decode_speedup"], r["decode_speedup_high"]) == (1.2, 1.6, 2.0)
    r = ratios(dense, result([1.0], [12.0]))  # not paired one to one: no range is claimed
    assert "prefill_speedup_low" not in r and "decode_speedup_low" not in r


def test_benchmark_interleaves_and_takes_medians():
    models = {"a": rankcut.load_model("tiny-gpt2"), "b": rankcut.load_model("tiny-gpt2")}
    res = benchmark(models, seqlen=16, repeats=3)
    assert len(res["a"].prefill_s) == 3 == len(res["b"].prefill_s)
    assert ratios(res["a"], res["b"])["params"] == 1.0
