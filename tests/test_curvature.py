"""Two-sided curvature whitening (kfac): the metric it minimizes, its limits, and the model path."""

import pytest
import torch

import rankcut
from rankcut import KFAC, Calibration, Fisher
from rankcut.calibration.fisher import collect_output_fisher
from rankcut.calibration.sources import calibration_ids
from rankcut.core.errors import RankcutError
from rankcut.core.ranks import RankPolicy
from rankcut.core.targets import select_targets
from rankcut.methods.weighted import curvature_weight, fisher_weight, weighted_svd, whitening

from .conftest import full_rank_error, output, rel_err, sample_ids

CAL = Calibration(text="gensim-news", samples=8, seqlen=64, batch_size=4)


def _problem(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    x = torch.randn(500, 20, dtype=torch.float64) * torch.logspace(-1, 1, 20, dtype=torch.float64)
    g = torch.randn(600, 12, dtype=torch.float64) @ torch.randn(12, 12, dtype=torch.float64)  # correlated outputs
    w = torch.randn(12, 20, dtype=torch.float64)
    return x, g, w


def _loss_estimate(e: torch.Tensor, x: torch.Tensor, g: torch.Tensor) -> float:
    """tr(G·E·XᵀX·Eᵀ): the Kronecker-factored second-order loss change of an output error E."""
    return float(torch.trace((g.T @ g) @ e @ (x.T @ x) @ e.T))


def test_kfac_truncation_minimizes_the_kronecker_metric_and_its_tail_is_the_error():
    x, g, w = _problem()
    input_weight = whitening(x.T @ x, 1e-12)
    for rank in (2, 5, 9):
        policy = RankPolicy(rank=rank, allow_growth=True)
        kfac = weighted_svd(w, policy, "w", input_weight, curvature_weight(g.T @ g, 1e-12))
        diagonal = weighted_svd(w, policy, "w", input_weight, fisher_weight((g * g).sum(0), 1e-12))
        err = _loss_estimate(w - kfac.product(), x, g)
        assert err < _loss_estimate(w - diagonal.product(), x, g)
        assert err == pytest.approx(float(kfac.importance[rank:].sum()), rel=1e-6)


def test_full_shrink_is_the_diagonal_fisher_metric():
    _, g, _ = _problem(1)
    cov = g.T @ g
    d = curvature_weight(cov, 0.01, shrink=1.0)
    diag = fisher_weight(cov.diagonal(), 0.01)
    torch.testing.assert_close(d.T @ d, torch.diag(diag.square()))


def test_rank_deficient_or_empty_covariance_stays_finite():
    g = torch.randn(3, 16, dtype=torch.float64)  # three gradient rows for a 16 × 16 covariance
    w = torch.randn(16, 10, dtype=torch.float64)
    for cov, damp in ((g.T @ g, 0.0), (g.T @ g, 1e-2), (torch.zeros(16, 16), 1e-2)):
        d = curvature_weight(cov, damp)
        f = weighted_svd(w, RankPolicy(rank=4), "w", None, d)
        assert torch.isfinite(d).all() and torch.isfinite(f.product()).all()


def test_full_gradient_covariance_has_the_diagonal_fisher_on_its_diagonal():
    model = rankcut.load_model("tiny-llama")
    targets = select_targets(model, "all-linear")
    ids = calibration_ids(model, CAL)
    diagonal = collect_output_fisher(model, targets, ids, 4, progress=False)
    full = collect_output_fisher(model, targets, ids, 4, progress=False, full=True)
    for name in diagonal:
        assert full[name].shape == (len(diagonal[name]),) * 2
        torch.testing.assert_close(full[name].diagonal(), diagonal[name], rtol=1e-9, atol=0)
        torch.testing.assert_close(full[name], full[name].T)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_kfac_at_full_rank_reproduces_the_dense_model(name):
    assert full_rank_error(name, KFAC, calibration=CAL) <= 1e-4


def test_kfac_with_full_shrink_cuts_as_the_fisher_method_does():
    cut = {}
    for cls, extra in ((Fisher, {}), (KFAC, {"shrink": 1.0})):
        model = rankcut.load_model("tiny-llama")
        report = rankcut.compress_(model, cls(budget=0.6, calibration=CAL, **extra), progress=False)
        cut[cls.method_name] = ({n: r["rank"] for n, r in report.modules.items()}, output(model, sample_ids(model)))
    assert cut["kfac"][0] == cut["fisher"][0]
    assert rel_err(cut["kfac"][1], cut["fisher"][1]) <= 1e-5


def test_kfac_config_round_trips_and_refuses_a_bad_shrink():
    config = KFAC(budget=0.8, shrink=0.5, calibration=CAL)
    assert rankcut.MethodConfig.from_dict(config.to_dict()) == config
    with pytest.raises(RankcutError, match="shrink"):
        KFAC(budget=0.8, shrink=1.5)


def _anchored_problem(seed: int = 0):  # noqa: ANN202
    torch.manual_seed(seed)
    x_dense = torch.randn(300, 24, dtype=torch.float64) * torch.logspace(-1, 1, 24, dtype=torch.float64)
    x_cut = x_dense + 0.3 * torch.randn_like(x_dense)  # the inputs a cut model sends: the dense ones, perturbed
    w = torch.randn(16, 24, dtype=torch.float64)
    return x_dense, x_cut, w


@pytest.mark.parametrize("output", ["none", "diagonal", "full"])
def test_anchored_refit_never_raises_the_calibration_error(output):
    from rankcut.methods.weighted import anchored_refit

    x_dense, x_cut, w = _anchored_problem()
    g = torch.randn(200, 16, dtype=torch.float64)
    d = {"none": None, "diagonal": fisher_weight((g * g).sum(0), 1e-3), "full": curvature_weight(g.T @ g, 1e-3)}[output]
    metric = torch.eye(16, dtype=torch.float64) if d is None else (torch.diag(d.square()) if d.ndim == 1 else d.T @ d)
    gram, cross = x_cut.T @ x_cut, x_cut.T @ x_dense

    def error(factors_in: torch.Tensor, factors_out: torch.Tensor) -> float:
        e = factors_out @ factors_in @ x_cut.T - w @ x_dense.T
        return float(torch.trace(metric @ e @ e.T))

    for rank in (3, 8, 15):
        base = weighted_svd(w, RankPolicy(rank=rank, allow_growth=True), "w", whitening(gram, 1e-6), d)
        before = error(base.in_factor, base.out_factor)
        for ridge in (1e-4, 1e-2, 1.0, 100.0):
            refit = anchored_refit(w, base.out_factor, base.in_factor, gram, cross, ridge, d)
            assert error(refit, base.out_factor) <= before * (1 + 1e-9)
        # a weak ridge reaches the least-squares optimum for this A, strictly better than B₀ here
        assert error(anchored_refit(w, base.out_factor, base.in_factor, gram, cross, 1e-8, d),
                     base.out_factor) < before


def test_anchored_refit_is_the_identity_when_the_streams_agree():
    from rankcut.methods.weighted import anchored_refit

    x_dense, _, w = _anchored_problem(2)
    gram = x_dense.T @ x_dense
    base = weighted_svd(w, RankPolicy(rank=6), "w", whitening(gram, 1e-12))
    refit = anchored_refit(w, base.out_factor, base.in_factor, gram, gram, 0.1)
    torch.testing.assert_close(refit, base.in_factor, rtol=1e-6, atol=1e-9)


def test_anchored_refit_stays_finite_on_rank_deficient_inputs():
    from rankcut.methods.weighted import anchored_refit

    x = torch.randn(5, 24, dtype=torch.float64)  # five tokens for 24 input dimensions
    w = torch.randn(16, 24, dtype=torch.float64)
    base = weighted_svd(w, RankPolicy(rank=4), "w", whitening(x.T @ x, 1e-3))
    refit = anchored_refit(w, base.out_factor, base.in_factor, x.T @ x, x.T @ (x + 0.1), 0.01)
    assert torch.isfinite(refit).all()


@pytest.mark.parametrize("cls", [rankcut.Whiten, Fisher, KFAC])
def test_anchored_methods_at_full_rank_reproduce_dense_and_refit_below_it(cls):
    assert full_rank_error("tiny-llama", cls, calibration=CAL, anchor=0.1) <= 1e-4
    ids = sample_ids(rankcut.load_model("tiny-llama"))
    cut = {}
    for anchor in (None, 0.1):
        model = rankcut.load_model("tiny-llama")
        rankcut.compress_(model, cls(keep=0.5, calibration=CAL, anchor=anchor), progress=False)
        cut[anchor] = output(model, ids)
    assert rel_err(cut[0.1], cut[None]) > 1e-4  # the refit changed the factors


def test_anchor_with_a_one_pass_budget_is_refused():
    model = rankcut.load_model("tiny-llama")
    with pytest.raises(RankcutError, match="--two-pass"):
        rankcut.compress_(model, Fisher(budget=0.5, calibration=CAL, anchor=0.1), progress=False)
    with pytest.raises(RankcutError, match="positive"):
        Fisher(budget=0.5, anchor=0.0)
    two_pass = Calibration(**{**CAL.__dict__, "two_pass": True})
    report = rankcut.compress_(model, Fisher(budget=0.5, calibration=two_pass, anchor=0.1), progress=False)
    assert report.ratio < 0.9


def test_block_by_block_covariances_spilled_to_disk_equal_the_whole_model_pass():
    from rankcut.calibration.fisher import collect_output_fisher_blockwise
    from rankcut.calibration.spill import SpilledStatistics
    from rankcut.compress.apply import default_residency

    model = rankcut.load_model("tiny-llama")
    targets = select_targets(model, "all-linear")
    ids = calibration_ids(model, CAL)
    whole = collect_output_fisher(model, targets, ids, 4, progress=False, full=True)
    spilled = SpilledStatistics()
    left = collect_output_fisher_blockwise(model, default_residency(model, "cpu"), targets, ids, 4, progress=False,
                                           full=True, sink=spilled.put)
    assert left == {} and set(spilled) == set(whole)
    for name, value in whole.items():
        assert rel_err(spilled[name], value) <= 1e-5


def _tiny_classifier(num_labels: int) -> torch.nn.Module:
    from rankcut.evaluate.glue import classifier_from_encoder

    return classifier_from_encoder(rankcut.load_model("tiny-bert"), num_labels).eval()


def test_sampled_labels_give_the_true_fisher_of_the_prediction():
    """Labels drawn from softmax(z): E[g gᵀ] at the logits is diag(p) − p pᵀ, the Fisher of the
    model's own predictive distribution; a regression output gets unit-variance gradients."""
    from rankcut.calibration.fisher import sampled_label_loss

    p = torch.tensor([0.6, 0.3, 0.1])
    logits = p.log().repeat(40000, 1).requires_grad_(True)
    sampled_label_loss(logits, 0).backward()
    g = logits.grad.double()
    expected = torch.diag(p.double()) - torch.outer(p.double(), p.double())
    assert (g.T @ g / g.shape[0] - expected).abs().max() < 0.01
    single = torch.zeros(40000, 1, requires_grad=True)
    sampled_label_loss(single, 0).backward()
    assert float(single.grad.square().mean()) == pytest.approx(1.0, abs=0.03)


@pytest.mark.parametrize("num_labels", [2, 1])
def test_a_sequence_classifier_calibrates_on_its_own_predictions(num_labels):
    """The gradient methods need a loss; a classifier's calibration text has no labels, so it is
    scored against labels drawn from its own prediction: the block-by-block pass gives the whole
    model's statistics, and kfac at full rank reproduces the classifier."""
    from rankcut.calibration.fisher import collect_output_fisher_blockwise
    from rankcut.compress.apply import default_residency

    model = _tiny_classifier(num_labels)
    targets = select_targets(model, "all-linear")
    ids = calibration_ids(model, CAL)
    whole = collect_output_fisher(model, targets, ids, 4, progress=False, full=True)
    blockwise = collect_output_fisher_blockwise(model, default_residency(model, "cpu"), targets, ids, 4,
                                                progress=False, full=True)
    assert whole.keys() == blockwise.keys()
    for name, value in whole.items():
        assert value.abs().max() > 0
        assert rel_err(blockwise[name], value) <= 1e-5
    ids = sample_ids(model)
    dense = model(input_ids=ids).logits.detach()
    full = {t.name: KFAC(rank=min(t.out_features, t.in_features), allow_growth=True, calibration=CAL)
            for t in targets}
    model.train()  # calibrated in eval mode (no dropout), handed back in the mode it came in
    rankcut.compress_(model, KFAC(rank=1, allow_growth=True, calibration=CAL), overrides=full, progress=False)
    assert model.training
    assert rel_err(model.eval()(input_ids=ids).logits.detach(), dense) <= 1e-4
