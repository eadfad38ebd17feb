import json

import pytest
import torch

import rankcut
from rankcut.fast import Speed, fold_cores_, fuse_shared_inputs_, speed_up_
from rankcut.layers import LowRankLinear

IDS = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(5))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-bert", "tiny-gpt2"])
def test_fused_siblings_give_the_plain_factored_outputs(name):
    model = rankcut.load_model(name)
    rankcut.compress_(model, rankcut.SVD(keep=0.5))
    with torch.no_grad():
        plain = model(input_ids=IDS)[0]
    groups = fuse_shared_inputs_(model)
    if name != "tiny-gpt2":  # GPT-2's c_attn is one matrix already: nothing to fuse
        assert groups and all(len(g) >= 2 for g in groups)
    with torch.no_grad():
        fused = model(input_ids=IDS)[0]
    assert rel_err(fused, plain) <= 1e-4
    # the stack is the only copy: members' first factors are views into it
    for g in groups:
        first = model.get_submodule(g[0])
        assert all(model.get_submodule(n).in_factor.untyped_storage().data_ptr()
                   == first.shared_input.stacked.untyped_storage().data_ptr() for n in g)


def test_folded_core_gives_the_three_factor_outputs():
    model = rankcut.load_model("tiny-llama")
    rankcut.compress_(model, rankcut.Tucker(rank=(12, 8), three_factor=True), targets="q,up")
    with torch.no_grad():
        plain = model(input_ids=IDS).logits
    folded = fold_cores_(model)
    assert folded and all(model.get_submodule(n).core is None for n in folded)
    with torch.no_grad():
        assert rel_err(model(input_ids=IDS).logits, plain) <= 1e-4


def test_dense_fallback_where_factors_are_not_faster(tmp_path):
    model = rankcut.load_model("tiny-llama")
    # rank near the full rank: more work factored than dense at any size
    rankcut.compress_(model, rankcut.SVD(keep=0.95), targets="q,k,v,o")
    with torch.no_grad():
        plain = model(input_ids=IDS).logits
    report = speed_up_(model, Speed(repeats=3))
    assert report.dense_fallback, report.timings
    assert all(type(model.get_submodule(n)) is torch.nn.Linear for n in report.dense_fallback)
    with torch.no_grad():
        fast = model(input_ids=IDS).logits
    assert rel_err(fast, plain) <= 1e-4
    rankcut.save(model, tmp_path / "m")
    manifest = json.loads((tmp_path / "m" / "rankcut.json").read_text())
    assert {n for n, r in manifest["modules"].items() if r["form"] == "dense-fallback"} == set(report.dense_fallback)
    again = rankcut.load(tmp_path / "m")
    assert all(type(again.get_submodule(n)) is torch.nn.Linear for n in report.dense_fallback)
    with torch.no_grad():
        assert rel_err(again(input_ids=IDS).logits, fast) <= 1e-5


def test_saved_model_loads_fused_on_request(tmp_path):
    model = rankcut.load_model("tiny-llama")
    rankcut.compress_(model, rankcut.SVD(keep=0.5))
    with torch.no_grad():
        plain = model(input_ids=IDS).logits
    fuse_shared_inputs_(model)
    rankcut.save(model, tmp_path / "m")  # the views are saved whole; the format is unchanged
    again = rankcut.load(tmp_path / "m", fast=True)
    q = again.get_submodule("model.layers.0.self_attn.q_proj")
    assert isinstance(q, LowRankLinear) and q.shared_input is not None
    with torch.no_grad():
        assert rel_err(again(input_ids=IDS).logits, plain) <= 1e-4
    plain_load = rankcut.load(tmp_path / "m")  # the default: plain factors
    assert plain_load.get_submodule("model.layers.0.self_attn.q_proj").shared_input is None


def test_fused_model_still_trains():
    """With gradients on, members use their own views: autograd sees the usual graph."""
    model = rankcut.load_model("tiny-llama")
    rankcut.compress_(model, rankcut.SVD(keep=0.5))
    fuse_shared_inputs_(model)
    loss = model(input_ids=IDS, labels=IDS).loss
    loss.backward()
    q = model.get_submodule("model.layers.0.self_attn.q_proj")
    assert q.in_factor.grad is not None and torch.isfinite(q.in_factor.grad).all()
