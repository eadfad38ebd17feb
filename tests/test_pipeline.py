"""`oneshot` (the whole job), the model's record, and method configs as data."""

from __future__ import annotations

import json

import pytest
import torch

import rankcut
from rankcut.core.errors import RankcutError
from rankcut.methods import MethodConfig
from rankcut.speed.layouts import Speed

from .conftest import output, sample_ids


@pytest.mark.parametrize("config", [
    rankcut.SVD(keep=0.5), rankcut.SVD(rank=3, pivot=True), rankcut.Tucker(rank=(4, 3), three_factor=True),
    rankcut.Whiten(keep=0.7, calibration="gensim-news"),
    rankcut.Fisher(budget=0.6, pivot=True, calibration=rankcut.Calibration(samples=4, seqlen=64, two_pass=True)),
    rankcut.ASVD(energy=0.9, calibration=rankcut.Calibration(text="gensim-news", batch_size=2)),
    rankcut.Whiten(budget=0.5, speed_limits={"64x64": 10}),
])
def test_a_config_round_trips_through_its_dict(config):
    data = json.loads(json.dumps(config.to_dict()))  # as a manifest stores it
    assert data["version"] == type(config).version
    again = MethodConfig.from_dict(data)
    assert type(again) is type(config) and again == config
    assert type(config).from_dict(data) == config


def test_a_config_dict_from_elsewhere_is_refused_in_one_line():
    svd = rankcut.SVD(keep=0.5).to_dict()
    with pytest.raises(RankcutError, match="newer than this rankcut"):
        MethodConfig.from_dict({**svd, "version": 99})
    with pytest.raises(RankcutError, match="unknown field"):
        MethodConfig.from_dict({**svd, "sharpness": 2})
    with pytest.raises(RankcutError, match="unknown method"):
        MethodConfig.from_dict({**svd, "method": "magic"})
    with pytest.raises(RankcutError, match="use MethodConfig.from_dict"):
        rankcut.Whiten.from_dict(svd)


def test_a_saved_manifest_names_its_config_and_rebuilds_it(tmp_path):
    model = rankcut.load_model("tiny-llama")
    config = rankcut.SVD(keep=0.4, pivot=True)
    rankcut.compress_(model, config, progress=False)
    rankcut.save(model, tmp_path / "m")
    manifest = json.loads((tmp_path / "m" / "rankcut.json").read_text())
    assert MethodConfig.from_dict(manifest["config"]) == config
    back = rankcut.load(tmp_path / "m")
    assert rankcut.record_of(back).config == config.to_dict()
    assert all(MethodConfig.from_dict(r["config"]) == config for r in manifest["modules"].values())


def test_the_record_travels_with_the_model_and_through_a_save(tmp_path):
    model = rankcut.load_model("tiny-llama")
    record = rankcut.record_of(model)
    assert record.source == "tiny-llama" and record.tokenizer is not None and record.modules == {}
    rankcut.compress_(model, rankcut.SVD(keep=0.5), targets="q,v", progress=False)
    assert set(record.modules) and all(n.endswith(("q_proj", "v_proj")) for n in record.modules)
    record.other["note"] = {"kept": True}  # a section a newer rankcut wrote survives a round trip
    rankcut.save(model, tmp_path / "m")
    back = rankcut.record_of(rankcut.load(tmp_path / "m"))
    assert back.modules == record.modules and back.source == "tiny-llama" and back.other == {"note": {"kept": True}}
    assert not any(k.startswith("rankcut_") and k != "rankcut_record" for k in vars(model))


def test_oneshot_is_compress_then_save(tmp_path):
    by_hand = rankcut.load_model("tiny-llama")
    rankcut.compress_(by_hand, rankcut.SVD(keep=0.5), targets="q,k,v,o", progress=False)
    done = rankcut.oneshot("tiny-llama", rankcut.SVD(keep=0.5), targets="q,k,v,o", out=tmp_path / "m",
                           progress=False)
    assert done.out == tmp_path / "m" and _stages(done) == ["load", "compress", "save"]
    assert done.report.params_after == rankcut.count_params(by_hand) < done.report.params_before
    ids = sample_ids(by_hand)
    assert torch.equal(output(rankcut.load(done.out), ids), output(by_hand, ids))


def test_oneshot_with_speed_and_a_budget_allocates_under_limits(tmp_path, monkeypatch):
    import rankcut.compress.pipeline as pipeline

    limits = {"64x64": 20, "32x64": 0, "64x160": 30, "160x64": 25}
    monkeypatch.setattr(pipeline, "speed_limits", lambda *a, **k: dict(limits))
    done = rankcut.oneshot("tiny-llama", rankcut.SVD(budget=0.6), speed=Speed(repeats=1), dtype="bfloat16",
                           progress=False)
    assert done.speed_limits == limits and done.config.speed_limits == limits
    assert done.speed.dense_fallback == []  # the allocation already chose: nothing put back
    assert next(done.model.parameters()).dtype == torch.bfloat16
    assert _stages(done) == ["load", "speed_limits", "compress", "speed"]
    assert done.seconds["compress.factorize"] <= done.seconds["compress"]  # the stage's work, split


def test_oneshot_refuses_before_loading(tmp_path, monkeypatch):
    import rankcut.compress.pipeline as pipeline

    monkeypatch.setattr(pipeline, "load_model", lambda *a: pytest.fail("loaded before checking"))
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("mine")
    with pytest.raises(RankcutError, match="exists"):
        rankcut.oneshot("tiny-llama", rankcut.SVD(keep=0.5), out=tmp_path / "taken")
    with pytest.raises(RankcutError, match="--resume needs --checkpoint"):
        rankcut.oneshot("tiny-llama", rankcut.SVD(keep=0.5), resume=True)
    with pytest.raises(RankcutError, match="dtype 'int8'"):
        rankcut.oneshot("tiny-llama", rankcut.SVD(keep=0.5), dtype="int8")


def _stages(done) -> list[str]:
    """The stages `oneshot` timed, in order (without the compression's split by kind of work)."""
    return [k for k in done.seconds if "." not in k]
