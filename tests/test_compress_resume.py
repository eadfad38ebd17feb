"""A compression killed between or inside blocks and resumed from its checkpoint ends exactly where
an uninterrupted run ends: same factors, same records."""

import json

import pytest
import torch

import rankcut
from rankcut import KFAC, SVD, Calibration, Fisher, Whiten
from rankcut.core.errors import RankcutError
from rankcut.methods import ASVD

from .conftest import Killed, kill_at

CAL = Calibration(text="gensim-news", samples=8, seqlen=64, batch_size=4)


def _same_models(a, b) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key
    assert json.dumps(rankcut.record_of(a).manifest_sections(), sort_keys=True) == json.dumps(rankcut.record_of(b).manifest_sections(), sort_keys=True)


CASES = {
    "svd-keep": ("tiny-llama", SVD(keep=0.5), 9),
    "whiten-staged": ("tiny-llama", Whiten(keep=0.5, calibration=Calibration(**{**CAL.__dict__, "staged": True})), 12),
    "whiten-correct": ("tiny-llama", Whiten(keep=0.4, calibration=Calibration(**{**CAL.__dict__, "correct": True})), 9),
    "fisher-budget-pivot": ("tiny-llama", Fisher(budget=0.5, pivot=True, calibration=CAL), 16),
    "fisher-two-pass-allocate": ("tiny-llama", Fisher(budget=0.5, calibration=Calibration(
        **{**CAL.__dict__, "two_pass": True, "staged": True})), 10),
    "fisher-two-pass-compress": ("tiny-llama", Fisher(budget=0.5, calibration=Calibration(
        **{**CAL.__dict__, "two_pass": True})), 28 + 15),
    "kfac-anchor-two-pass": ("tiny-llama", KFAC(budget=0.5, shrink=0.5, anchor=0.1, calibration=Calibration(
        **{**CAL.__dict__, "two_pass": True})), 28 + 15),
    "asvd-gpt2": ("tiny-gpt2", ASVD(keep=0.5, calibration=CAL), 6),
    "whiten-mamba": ("tiny-mamba", Whiten(keep=0.5, calibration=CAL), 5),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_killed_compression_resumes_to_the_uninterrupted_result(case, tmp_path, monkeypatch):
    alias, config, dies_at = CASES[case]
    whole = rankcut.load_model(alias)
    with monkeypatch.context() as m:
        total = kill_at(m, None)
        rankcut.compress_(whole, config, progress=False)

    ck = tmp_path / "ck"
    first = rankcut.load_model(alias)
    with monkeypatch.context() as m:
        kill_at(m, dies_at)
        with pytest.raises(Killed):
            rankcut.compress_(first, config, progress=False, checkpoint=ck)
    progress = json.loads((ck / "progress.json").read_text())
    assert sum(len(v) for v in progress["done"].values()) >= 1  # some blocks were finished and kept

    resumed = rankcut.load_model(alias)
    with monkeypatch.context() as m:
        again = kill_at(m, None)
        rankcut.compress_(resumed, config, progress=False, checkpoint=ck, resume=True)
    _same_models(whole, resumed)
    # the finished blocks came from disk: only the rest was factorized again
    assert total["n"] - (dies_at - 1) <= again["n"] < total["n"]


def test_resume_checks_the_folder_and_the_settings(tmp_path, monkeypatch):
    ck = tmp_path / "ck"
    with pytest.raises(RankcutError, match="--resume needs --checkpoint"):
        rankcut.compress_(rankcut.load_model("tiny-llama"), SVD(keep=0.5), progress=False, resume=True)
    with pytest.raises(RankcutError, match="no compression checkpoint"):
        rankcut.compress_(rankcut.load_model("tiny-llama"), SVD(keep=0.5), progress=False, checkpoint=ck, resume=True)
    with monkeypatch.context() as m:
        kill_at(m, 10)
        with pytest.raises(Killed):
            rankcut.compress_(rankcut.load_model("tiny-llama"), SVD(keep=0.5), progress=False, checkpoint=ck)
    with pytest.raises(RankcutError, match="pass --resume to continue it"):
        rankcut.compress_(rankcut.load_model("tiny-llama"), SVD(keep=0.5), progress=False, checkpoint=ck)
    with pytest.raises(RankcutError, match="belongs to a different compression"):
        rankcut.compress_(rankcut.load_model("tiny-llama"), SVD(keep=0.4), progress=False, checkpoint=ck, resume=True)
    other = rankcut.load_model("tiny-llama")
    with torch.no_grad():
        other.model.layers[3].mlp.down_proj.weight.mul_(1.5)  # the same architecture, other weights
    with pytest.raises(RankcutError, match="belongs to a different compression"):
        rankcut.compress_(other, SVD(keep=0.5), progress=False, checkpoint=ck, resume=True)
    block = next(ck.glob("block-*.safetensors"))
    block.write_bytes(block.read_bytes()[:100])
    model = rankcut.load_model("tiny-llama")
    with pytest.raises(RankcutError, match="unreadable.*delete the checkpoint"):
        rankcut.compress_(model, SVD(keep=0.5), progress=False, checkpoint=ck, resume=True)


def test_a_fresh_checkpoint_needs_an_empty_folder(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(RankcutError, match="is not empty"):
        rankcut.compress_(rankcut.load_model("tiny-llama"), SVD(keep=0.5), progress=False, checkpoint=tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_cli_resumes_and_removes_the_checkpoint_once_saved(tmp_path, monkeypatch, capsys):
    from rankcut.cli import main

    argv = ["compress", "tiny-llama", "--method", "whiten", "--keep", "0.5", "--calib-samples", "8",
            "--calib-seqlen", "64", "--json"]
    assert main([*argv, "--out", str(tmp_path / "whole")]) == 0
    ck, out = tmp_path / "ck", tmp_path / "out"
    assert main([*argv, "--out", str(out), "--resume"]) == 2
    assert "--resume needs --checkpoint" in capsys.readouterr().err
    with monkeypatch.context() as m:
        kill_at(m, 20)
        with pytest.raises(Killed):
            main([*argv, "--out", str(out), "--checkpoint", str(ck)])
    assert not out.exists() and (ck / "progress.json").is_file()
    assert main([*argv, "--out", str(out), "--checkpoint", str(ck)]) == 2
    assert "pass --resume" in capsys.readouterr().err
    assert main([*argv, "--out", str(out), "--checkpoint", str(ck), "--resume"]) == 0
    assert not ck.exists()
    _same_models(rankcut.load(tmp_path / "whole"), rankcut.load(out))


def test_a_resumed_speed_budget_reads_the_limits_the_first_run_measured(tmp_path):
    from rankcut.compress.checkpoint import recorded_speed_limits

    limits = {"64x64": 30, "192x64": 40, "64x192": 40, "256x64": 50, "64x256": 50, "16x64": 10, "64x16": 10}
    model = rankcut.load_model("tiny-llama")
    shapes = {f"{t.out_features}x{t.in_features}" for t in rankcut.core.targets.select_targets(model)}
    config = SVD(budget=0.6, speed_limits={s: limits.get(s, 8) for s in shapes})
    rankcut.compress_(model, config, progress=False, checkpoint=tmp_path / "ck")
    assert recorded_speed_limits(tmp_path / "ck") == config.speed_limits
