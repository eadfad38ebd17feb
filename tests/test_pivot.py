"""The pivoted factor form: the same map as the plain factors in r² fewer numbers, so a budget
buys a higher rank; it must save, load, fuse and fall back like the plain form."""

import json

import pytest
import torch

import rankcut
from rankcut.core.errors import RankcutError
from rankcut.core.layers import LowRankLinear, PivotLowRankLinear
from rankcut.core.layout import fuse_shared_inputs_
from rankcut.core.ranks import factor_params, keep_rank
from rankcut.core.targets import dense_weight, select_targets
from rankcut.methods import SVD, Fisher, Tucker, Whiten
from rankcut.speed.layouts import dense_fallback_

from .conftest import full_rank_overrides, output, rel_err, sample_ids
from .test_calibrated import CAL


@pytest.mark.parametrize("m,n,r", [(48, 32, 7), (32, 48, 20), (40, 40, 40), (5, 9, 1)])
def test_pivoted_layer_is_the_plain_map_in_fewer_numbers(m, n, r):
    g = torch.Generator().manual_seed(m + n + r)
    plain = LowRankLinear.from_factors(torch.randn(m, r, generator=g), torch.randn(r, n, generator=g),
                                       bias=torch.randn(m, generator=g))
    pivoted = PivotLowRankLinear.from_low_rank(plain)
    x = torch.randn(3, 5, n, generator=g)
    assert rel_err(pivoted(x), plain(x)) <= 1e-5
    assert rel_err(pivoted.weight, plain.weight) <= 1e-5
    stored = sum(p.numel() for name, p in pivoted.named_parameters() if name != "bias")
    assert stored == factor_params(m, n, r, pivot=True) == r * (m + n) - r * r
    assert sorted(pivoted.rows.tolist()) == list(range(m))  # a permutation of the output rows
    pivoted(x).square().sum().backward()  # trainable like the plain factors
    assert pivoted.in_factor.grad is not None and pivoted.out_factor.grad is not None


@pytest.mark.parametrize("tokens", [1, 7])
def test_tokens_as_rows_or_columns_are_the_same_map_and_gradients(tokens):
    """The two layouts (see PivotLowRankLinear) give the same outputs and gradients; tokens as
    rows returns a contiguous tensor, as nn.Linear does, which attention's fast kernels need."""
    g = torch.Generator().manual_seed(tokens)
    plain = LowRankLinear.from_factors(torch.randn(24, 6, generator=g), torch.randn(6, 16, generator=g),
                                       bias=torch.randn(24, generator=g))
    x = torch.randn(2, tokens, 16, generator=g)
    results = []
    for as_columns in (False, True):
        layer = PivotLowRankLinear.from_low_rank(plain)
        layer.tokens_as_columns = as_columns
        out = layer(x)
        out.square().sum().backward()
        assert rel_err(out, plain(x)) <= 1e-5
        results.append((out, layer.in_factor.grad, layer.out_factor.grad))
    (rows_out, *rows_grads), (cols_out, *cols_grads) = results
    assert rows_out.is_contiguous()
    assert not cols_out.is_contiguous()  # a transposed view (2 × 7 tokens as columns)
    for a, b in zip(rows_grads, cols_grads):
        assert rel_err(a, b) <= 1e-5


def test_the_inverse_row_order_follows_loaded_rows():
    """`order` is derived, not saved: loading another layer's rows must bring it along."""
    g = torch.Generator().manual_seed(3)
    source = PivotLowRankLinear.from_low_rank(
        LowRankLinear.from_factors(torch.randn(20, 5, generator=g), torch.randn(5, 12, generator=g)))
    assert "order" not in source.state_dict()
    empty = PivotLowRankLinear(12, 20, 5, bias=False)
    empty.load_state_dict(source.state_dict())
    x = torch.randn(4, 12, generator=g)
    assert torch.equal(empty.order, torch.argsort(source.rows))
    assert rel_err(empty(x), source(x)) <= 1e-6


def test_pivoted_full_rank_is_dense_size_and_reproduces_the_model(tiny_name):
    model = rankcut.load_model(tiny_name)
    ids = sample_ids(model)
    dense = output(model, ids)
    before = rankcut.count_params(model)
    overrides = full_rank_overrides(model, SVD, pivot=True)
    rankcut.compress_(model, SVD(rank=1, pivot=True), overrides=overrides, progress=False)
    assert sum(isinstance(m, PivotLowRankLinear) for m in model.modules()) == len(overrides)
    assert rel_err(output(model, ids), dense) <= 1e-4
    assert rankcut.count_params(model) == before  # at full rank, exactly the dense matrices' size


def test_pivoted_keep_rank_is_the_largest_within_the_fraction():
    for m, n in [(576, 576), (1536, 576), (64, 160), (7, 3)]:
        for keep in (0.1, 0.5, 0.8, 1.0):
            r = keep_rank(m, n, keep, pivot=True)
            assert factor_params(m, n, r, pivot=True) <= max(keep * m * n, m + n - 1)
            assert r == min(m, n) or factor_params(m, n, r + 1, pivot=True) > keep * m * n
            assert r >= keep_rank(m, n, keep)  # never a lower rank than the plain form's


def test_same_fraction_buys_a_higher_rank_and_a_smaller_error():
    model, plain_model = rankcut.load_model("tiny-llama"), rankcut.load_model("tiny-llama")
    dense = {t.name: dense_weight(t.module).detach().clone() for t in select_targets(model)}
    before = rankcut.count_params(model)
    pivoted = rankcut.compress_(model, SVD(keep=0.5, pivot=True), progress=False)
    plain = rankcut.compress_(plain_model, SVD(keep=0.5), progress=False)
    assert pivoted.params_after <= before - sum(w.numel() // 2 for w in dense.values())
    for name, w in dense.items():
        assert pivoted.modules[name]["rank"] > plain.modules[name]["rank"]
        assert pivoted.modules[name]["params"] <= 0.5 * w.numel()
        err_pivot = torch.linalg.norm(w - model.get_submodule(name).weight.detach())
        err_plain = torch.linalg.norm(w - plain_model.get_submodule(name).weight.detach())
        assert err_pivot < err_plain  # a longer prefix of the same singular values


@pytest.mark.parametrize("cls,two_pass", [(SVD, False), (Fisher, False), (Fisher, True)])
def test_pivoted_budget_is_met_and_round_trips(cls, two_pass, tmp_path):
    model = rankcut.load_model("tiny-llama")
    targets = select_targets(model)
    dense = sum(t.params for t in targets)
    kw = {} if cls is SVD else {"calibration": rankcut.Calibration(**{**CAL.__dict__, "two_pass": two_pass})}
    report = rankcut.compress_(model, cls(budget=0.5, pivot=True, **kw), progress=False)
    kept = sum(r["params"] for r in report.modules.values())
    assert 0.5 * dense - max(t.out_features + t.in_features for t in targets) <= kept <= 0.5 * dense
    forms = {r["form"] for r in report.modules.values()}
    assert "pivot" in forms and forms <= {"pivot", "dense"}
    ids = sample_ids(model)
    rankcut.save(model, tmp_path / "p")
    manifest = json.loads((tmp_path / "p" / "rankcut.json").read_text())
    assert {n: r["form"] for n, r in manifest["modules"].items()} == {n: r["form"] for n, r in report.modules.items()}
    back = rankcut.load(tmp_path / "p", fast=False)
    assert torch.equal(output(back, ids), output(model, ids))
    assert rankcut.count_params(back) == rankcut.count_params(model)
    fused = rankcut.load(tmp_path / "p", fast=True)
    assert rel_err(output(fused, ids), output(model, ids)) <= 1e-4


def test_pivoted_siblings_fuse_and_fall_back_dense():
    model = rankcut.load_model("tiny-llama")
    ids = sample_ids(model)
    rankcut.compress_(model, Whiten(keep=0.6, pivot=True, calibration=CAL), progress=False)
    reference = output(model, ids)
    assert fuse_shared_inputs_(model)
    assert rel_err(output(model, ids), reference) <= 1e-4
    fallback, timings = dense_fallback_(model, tokens=(1, 4), repeats=1)
    assert all(key.endswith("p") for key in timings)  # the pivoted form is what was timed
    assert rel_err(output(model, ids), reference) <= 1e-4


def test_pivot_refuses_three_factors():
    model = rankcut.load_model("tiny-llama")
    with pytest.raises(RankcutError, match="pivoted form stores two factors"):
        rankcut.compress_(model, Tucker(rank=(3, 2), three_factor=True, pivot=True), progress=False)
    assert not any(isinstance(m, (LowRankLinear, PivotLowRankLinear)) for m in model.modules())


def test_cli_compress_pivot_and_info(capsys, tmp_path):
    from rankcut.cli import main

    out = tmp_path / "p"
    assert main(["compress", "tiny-llama", "--method", "svd", "--keep", "0.5", "--pivot", "--out", str(out),
                 "--json"]) == 0
    capsys.readouterr()
    assert main(["info", str(out), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["targets"]
    assert rows and all(r["form"] == "pivot" and r["params"] <= 0.5 * r["dense_params"] for r in rows)
    assert main(["info", str(out)]) == 0
    text = capsys.readouterr().out
    assert "stored pivoted" in text and "speed: no decisions recorded" in text
    fast = tmp_path / "f"
    assert main(["compress", "tiny-llama", "--method", "svd", "--keep", "0.5", "--pivot", "--speed",
                 "--out", str(fast), "--json"]) == 0
    capsys.readouterr()
    assert main(["info", str(fast), "--json"]) == 0
    speed = json.loads(capsys.readouterr().out)["speed"]
    manifest = json.loads((fast / "rankcut.json").read_text())
    assert speed["timed"] and speed["pivot_outputs"] == manifest["speed"]["pivot_outputs"]["chosen"]
    assert speed["tokens_as_columns"] == sum(1 for r in manifest["modules"].values() if r.get("tokens_as_columns"))
    assert main(["info", str(fast)]) == 0
    assert f"pivoted layers: {speed['pivot_outputs']}" in capsys.readouterr().out
