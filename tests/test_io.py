import json
import re

import pytest
import torch

import rankcut
from rankcut.core.errors import RankcutError
from rankcut.methods import SVD, Tucker

from .conftest import output, sample_ids


@pytest.mark.parametrize("config", [SVD(keep=0.5), Tucker(keep=0.5), Tucker(rank=(3, 2), three_factor=True)],
                         ids=["svd", "tucker", "tucker3"])
def test_save_load_round_trip(tiny_name, config, tmp_path):
    model = rankcut.load_model(tiny_name)
    ids = sample_ids(model)
    rankcut.compress_(model, config, progress=False)
    rankcut.save(model, tmp_path / "m")
    back = rankcut.load(tmp_path / "m", fast=False)  # the format itself round-trips exactly
    assert torch.equal(output(back, ids), output(model, ids))
    fast = rankcut.load(tmp_path / "m")  # the default: siblings fused, equal up to float rounding
    reference = output(model, ids)
    assert (output(fast, ids) - reference).abs().max() <= 1e-4 * reference.abs().max()
    assert rankcut.count_params(back) == rankcut.count_params(model)
    manifest = json.loads((tmp_path / "m" / "rankcut.json").read_text())
    assert manifest["source_model"] == tiny_name
    assert set(manifest["modules"]) == {n for n, m in back.named_modules() if isinstance(m, rankcut.LowRankLinear)}
    assert rankcut.get_tokenizer(back)("abc")["input_ids"] == rankcut.get_tokenizer(model)("abc")["input_ids"]


def test_load_model_dispatches_to_a_saved_folder(tmp_path):
    model = rankcut.load_model("tiny-llama")
    rankcut.compress_(model, SVD(rank=3), targets="q", progress=False)
    rankcut.save(model, tmp_path / "m")
    again = rankcut.load_model(str(tmp_path / "m"))
    assert again.get_submodule("model.layers.0.self_attn.q_proj").rank == 3


@pytest.fixture
def saved(tmp_path):
    model = rankcut.load_model("tiny-llama")
    rankcut.compress_(model, SVD(rank=3), progress=False)
    return rankcut.save(model, tmp_path / "m")


def test_corrupted_weights_are_named(saved):
    weights = saved / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(RankcutError, match="corrupted"):
        rankcut.load(saved)


def test_truncated_weights_without_checksum_are_named(saved):
    manifest = json.loads((saved / "rankcut.json").read_text())
    manifest["weights"].pop("sha256")
    (saved / "rankcut.json").write_text(json.dumps(manifest))
    weights = saved / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(RankcutError, match="unreadable"):
        rankcut.load(saved)


def test_a_manifest_rank_the_weights_do_not_hold_names_the_tensor(saved):
    manifest = json.loads((saved / "rankcut.json").read_text())
    name = next(iter(manifest["modules"]))
    manifest["modules"][name]["rank"] = 5
    (saved / "rankcut.json").write_text(json.dumps(manifest))
    with pytest.raises(RankcutError, match=rf"does not fit rankcut.json \(size mismatch for {name}\."):
        rankcut.load(saved)


@pytest.mark.parametrize("damage,message", [
    (lambda m, k: m["modules"][k].update(rank=-3), "records rank -3, not a valid rank for form two-factor"),
    (lambda m, k: m["modules"][k].update(rank=[3, 3]), "records rank [3, 3]"),
    (lambda m, k: m["modules"][k].update(rank=True), "records rank True"),
    (lambda m, k: m["modules"][k].update(form="weird"), "has form 'weird', not one of"),
    (lambda m, k: m.update(modules=[]), "not a rankcut manifest"),
    (lambda m, k: m.update(dtype="float77"), "dtype 'float77', not a torch floating dtype"),
    (lambda m, k: m.update(dtype="int64"), "dtype 'int64'"),
])
def test_a_damaged_manifest_is_refused_before_any_tensor_is_made(saved, damage, message):
    manifest = json.loads((saved / "rankcut.json").read_text())
    damage(manifest, next(iter(manifest["modules"])))
    (saved / "rankcut.json").write_text(json.dumps(manifest))
    with pytest.raises(RankcutError, match=re.escape(message)):
        rankcut.load(saved)


def test_missing_weights_and_manifest(saved, tmp_path):
    (saved / "model.safetensors").unlink()
    with pytest.raises(RankcutError, match="missing"):
        rankcut.load(saved)
    (saved / "rankcut.json").write_text("{not json")
    with pytest.raises(RankcutError, match="corrupted"):
        rankcut.load(saved)
    with pytest.raises(RankcutError, match="does not exist"):
        rankcut.load(tmp_path / "nowhere")
    with pytest.raises(RankcutError, match="is a file, not a saved model folder"):
        rankcut.load(saved / "rankcut.json")


def test_loading_a_dense_model_name_says_to_compress_it_first():
    with pytest.raises(RankcutError, match="dense model, not a saved compressed one.*rankcut compress tiny-llama"):
        rankcut.load("tiny-llama")


def test_existing_folder_is_not_overwritten_and_failed_save_leaves_nothing(saved, tmp_path):
    model = rankcut.load_model("tiny-llama")
    with pytest.raises(RankcutError, match="already exists"):
        rankcut.save(model, saved)

    class Boom(Exception):
        pass

    def broken(*a, **k):
        raise Boom

    model.config.save_pretrained = broken
    with pytest.raises(Boom):
        rankcut.save(model, tmp_path / "half")
    assert not (tmp_path / "half").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["m"]


def test_a_refused_final_rename_keeps_the_earlier_output_whole(saved, tmp_path, monkeypatch):
    """Overwriting swaps the folders by two renames; if the second is refused, the first is undone,
    so the earlier model is still there and loads, and no temporary folder is left beside it."""
    import os

    import rankcut.core.fsutil as fsutil

    before = rankcut.load(saved)
    real_replace, calls = os.replace, []

    def second_refused(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(fsutil.os, "replace", second_refused)
    with pytest.raises(RankcutError, match="No space left on device"):
        rankcut.save(before, saved, overwrite=True)
    monkeypatch.setattr(fsutil.os, "replace", real_replace)
    assert len(calls) == 3  # out of the way, refused, put back
    assert sorted(p.name for p in saved.parent.iterdir()) == [saved.name]
    rankcut.load(saved)
