import pytest
import torch

import rankcut
from rankcut.core.errors import RankcutError
from rankcut.core.layers import LowRankLinear
from rankcut.core.targets import select_targets
from rankcut.methods import SVD, Tucker
from rankcut.methods.svd import svd_factorize
from rankcut.methods.tucker import tucker_factorize

from .conftest import full_rank_overrides, output, rel_err, sample_ids


@pytest.mark.parametrize("cls,kw", [(SVD, {}), (Tucker, {}), (Tucker, {"three_factor": True})])
def test_full_rank_reproduces_the_dense_model(tiny_name, cls, kw):
    model = rankcut.load_model(tiny_name)
    ids = sample_ids(model)
    dense = output(model, ids)
    overrides = full_rank_overrides(model, cls, **kw)
    rankcut.compress_(model, cls(rank=1, allow_growth=True), overrides=overrides, progress=False)
    assert sum(isinstance(m, LowRankLinear) for m in model.modules()) == len(overrides)
    assert rel_err(output(model, ids), dense) <= 1e-4


def test_compressed_module_drops_the_dense_weight_and_counts_exactly(tiny_name):
    model = rankcut.load_model(tiny_name)
    before = rankcut.count_params(model)
    targets = select_targets(model)
    report = rankcut.compress_(model, SVD(keep=0.5), progress=False)
    dense_targets = sum(t.params for t in targets)
    factors = sum(r["rank"] * (r["out_features"] + r["in_features"]) for r in report.modules.values())
    assert rankcut.count_params(model) == before - dense_targets + factors == report.params_after
    for name in report.modules:
        layer = model.get_submodule(name)
        assert isinstance(layer, LowRankLinear)
        assert "weight" not in dict(layer.named_parameters())


def _random_matrix(m: int, n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, n, generator=g, dtype=torch.float64) @ torch.diag(torch.rand(n, generator=g, dtype=torch.float64) + 0.01)


def test_svd_error_equals_the_singular_value_tail_and_falls_with_rank():
    w = _random_matrix(48, 32)
    s = torch.linalg.svdvals(w)
    errors = []
    for r in range(1, 33):
        f = svd_factorize(w, SVD(rank=r, allow_growth=True), "w")
        err = torch.linalg.norm(w - f.product()).item()
        assert err == pytest.approx(s[r:].square().sum().sqrt().item(), rel=1e-9, abs=1e-9)
        errors.append(err)
    assert all(a > b for a, b in zip(errors, errors[1:-1]))
    assert errors[-1] < 1e-10


@pytest.mark.parametrize("three_factor", [False, True])
def test_tucker_error_falls_with_rank_and_matches_svd_when_square(three_factor):
    w = _random_matrix(40, 24, seed=1)
    s = torch.linalg.svdvals(w)
    errors = []
    for r in range(1, 25):
        f = tucker_factorize(w, Tucker(rank=(r, r), allow_growth=True, three_factor=three_factor), "w")
        errors.append(torch.linalg.norm(w - f.product()).item())
        assert errors[-1] == pytest.approx(s[r:].square().sum().sqrt().item(), rel=1e-6, abs=1e-8)
    assert all(a >= b - 1e-12 for a, b in zip(errors, errors[1:]))


def test_tucker_rank_pair_folds_to_the_smaller_side():
    w = _random_matrix(40, 24, seed=2)
    folded = tucker_factorize(w, Tucker(rank=(6, 10)), "w")
    assert folded.core is None and folded.rank == 6
    three = tucker_factorize(w, Tucker(rank=(6, 10), three_factor=True), "w")
    assert three.rank == (6, 10) and three.core.shape == (6, 10)
    assert torch.allclose(folded.product(), three.product(), atol=1e-10)


def test_energy_policy_keeps_the_stated_share():
    w = _random_matrix(48, 32, seed=3)
    f = svd_factorize(w, SVD(energy=0.9, allow_growth=True), "w")
    s2 = torch.linalg.svdvals(w).square()
    r = f.rank
    assert s2[:r].sum() / s2.sum() >= 0.9 > s2[: r - 1].sum() / s2.sum()


def test_bad_rank_leaves_the_model_untouched():
    model = rankcut.load_model("tiny-llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RankcutError, match="larger than"):
        rankcut.compress_(model, SVD(rank=100, allow_growth=True), progress=False)  # q is 64×64
    with pytest.raises(RankcutError, match="allow-growth"):
        rankcut.compress_(model, SVD(rank=40), progress=False)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_overrides_and_layer_selection():
    model = rankcut.load_model("tiny-llama")
    report = rankcut.compress_(model, SVD(rank=4), targets="q,v", layers="1-2",
                               overrides={r"\.v_proj$": SVD(rank=2)}, progress=False)
    ranks = {n: r["rank"] for n, r in report.modules.items()}
    assert ranks == {"model.layers.1.self_attn.q_proj": 4, "model.layers.1.self_attn.v_proj": 2,
                     "model.layers.2.self_attn.q_proj": 4, "model.layers.2.self_attn.v_proj": 2}


@pytest.mark.parametrize("overrides,message", [
    ({r"\.vv_proj$": SVD(rank=2)}, r"override '\\.vv_proj\$' matches none of the 4 targeted modules"),
    ({r"\.up_proj$": SVD(rank=2)}, "matches none"),  # a real module, but not among the targets
    ({"([": SVD(rank=2)}, "is not a valid regex"),
])
def test_an_override_that_selects_nothing_is_refused_before_any_work(overrides, message):
    model = rankcut.load_model("tiny-llama")
    with pytest.raises(RankcutError, match=message):
        rankcut.compress_(model, SVD(rank=4), targets="q,v", layers="1-2", overrides=overrides, progress=False)
    assert not any(isinstance(m, LowRankLinear) for m in model.modules())


def test_mamba_modules_that_read_weight_directly_still_see_the_product():
    model = rankcut.load_model("tiny-mamba")
    rankcut.compress_(model, SVD(rank=2), targets="dt_proj", progress=False)
    layer = model.get_submodule("backbone.layers.0.mixer.dt_proj")
    assert torch.allclose(layer.weight, layer.out_factor @ layer.in_factor)


def test_balanced_factors_keep_the_product_and_split_the_scale_evenly():
    from rankcut.core.layers import balanced

    g = torch.Generator().manual_seed(0)
    out_f = torch.randn(40, 6, generator=g, dtype=torch.float64) * torch.logspace(-3, 3, 6, dtype=torch.float64)
    in_f = torch.randn(6, 30, generator=g, dtype=torch.float64) / 50
    in_f[2] = 0.0  # a dead direction is left alone, not divided by zero
    b, a = balanced(out_f, in_f)
    torch.testing.assert_close(b @ a, out_f @ in_f, rtol=1e-12, atol=1e-12)
    live = torch.arange(6) != 2
    torch.testing.assert_close(b.norm(dim=0)[live], a.norm(dim=1)[live])
    assert torch.equal(b[:, 2], out_f[:, 2]) and torch.isfinite(b).all() and torch.isfinite(a).all()


def test_weighted_truncations_store_balanced_factors():
    model = rankcut.load_model("tiny-llama")
    rankcut.compress_(model, rankcut.Whiten(keep=0.5, calibration=rankcut.Calibration(samples=4, seqlen=32)),
                      progress=False)
    layers = [m for m in model.modules() if isinstance(m, LowRankLinear)]
    assert layers
    for m in layers:
        torch.testing.assert_close(m.out_factor.norm(dim=0), m.in_factor.norm(dim=1), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("alias", ["tiny-llama", "tiny-gpt2"])
def test_tied_head_is_refused_unless_growth_is_allowed(alias: str) -> None:
    """The tied twin keeps the whole matrix, so factoring the head can only grow the model."""
    model = rankcut.load_model(alias)
    before = rankcut.count_params(model)
    with pytest.raises(RankcutError, match="tied embeddings.*--allow-growth"):
        rankcut.compress_(model, SVD(keep=0.5), targets="lm_head", progress=False)
    with pytest.raises(RankcutError, match="tied embeddings.*budget"):
        rankcut.compress_(model, SVD(budget=0.5), targets="lm_head|q_proj|c_attn", progress=False)
    assert rankcut.count_params(model) == before and not isinstance(model.lm_head, LowRankLinear)
    rankcut.compress_(model, SVD(keep=0.5, allow_growth=True), targets="lm_head", progress=False)
    assert isinstance(model.lm_head, LowRankLinear)
    assert rankcut.count_params(model) > before  # what the refusal warned of
