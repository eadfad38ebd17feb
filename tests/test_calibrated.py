"""Activation-aware methods, calibration and budgeted allocation on tiny models."""

import pytest
import torch

import rankcut
from rankcut import ASVD, SVD, Calibration, Fisher, Whiten
from rankcut.calibration.hooks import InputRecorder
from rankcut.calibration.sources import calibration_ids
from rankcut.core.errors import RankcutError
from rankcut.core.ranks import AllocationItem, RankPolicy, allocate_budget
from rankcut.core.targets import select_targets
from rankcut.methods.weighted import weighted_svd, whitening

from .conftest import TINY, full_rank_error, full_rank_overrides, output, rel_err, sample_ids

CAL = Calibration(text="gensim-news", samples=8, seqlen=64, batch_size=4)


@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("cls", [Whiten, ASVD])
def test_full_rank_calibrated_reproduces_dense(name, cls):
    assert full_rank_error(name, cls, calibration=CAL) <= 1e-4


def test_whitening_minimizes_output_error_on_the_calibration_data():
    torch.manual_seed(0)
    x = torch.randn(400, 32, dtype=torch.float64) * torch.logspace(-2, 1, 32, dtype=torch.float64)
    w = torch.randn(24, 32, dtype=torch.float64)
    for r in (2, 8, 16):
        plain = weighted_svd(w, RankPolicy(rank=r, allow_growth=True), "w")
        white = weighted_svd(w, RankPolicy(rank=r, allow_growth=True), "w", input_weight=whitening(x.T @ x, 1e-12))
        err = lambda f: torch.linalg.norm(x @ (w - f.product()).T).item()  # noqa: E731
        assert err(white) < err(plain)
        # the output error equals the tail of the whitened spectrum (Eckart–Young in that metric)
        assert err(white) ** 2 == pytest.approx(white.importance[r:].sum().item(), rel=1e-6)


@pytest.mark.parametrize("output_side", [None, "vector", "matrix"])
def test_overwriting_the_weight_copy_gives_the_same_factors(output_side, monkeypatch):
    """The in-place path (the compression's own float64 copy becomes D·W·S) must give what the
    copying path gives, and without `overwrite` the weight must be left as it was."""
    import rankcut.methods.weighted as weighted

    monkeypatch.setattr(weighted, "CHUNK_NUMBERS", 64)  # several row and column blocks on a 24 × 40 matrix
    torch.manual_seed(0)
    x = torch.randn(300, 40, dtype=torch.float64)
    w = torch.randn(24, 40, dtype=torch.float64)
    g = torch.randn(200, 24, dtype=torch.float64)
    d = {None: None, "vector": (g * g).sum(0).sqrt(), "matrix": torch.linalg.cholesky(g.T @ g).T}[output_side]
    policy = RankPolicy(rank=7)
    kept = w.clone()
    plain = weighted_svd(w, policy, "w", whitening(x.T @ x, 1e-6), d)
    assert torch.equal(w, kept)
    own = w.clone()
    moved = weighted_svd(own, policy, "w", whitening(x.T @ x, 1e-6), d, overwrite=True)
    assert not torch.equal(own, kept)  # the copy was written over
    assert rel_err(moved.product(), plain.product()) <= 1e-12
    assert torch.allclose(moved.importance, plain.importance, rtol=1e-10)


def test_the_gram_accumulates_in_column_blocks_to_the_whole_product(monkeypatch):
    """XᵀX and the cross-Gram are summed a block of columns at a time (no batch-sized product
    beside the running sum): the result is the product's, batch by batch."""
    import rankcut.calibration.hooks as hooks

    monkeypatch.setattr(hooks, "GRAM_BLOCK_NUMBERS", 40)  # several column blocks of a 13-wide input
    torch.manual_seed(0)
    batches = [torch.randn(2, 7, 13) for _ in range(3)]
    dense = hooks.InputStats(13, keep=True, with_abs=False)
    for x in batches:
        dense.add(x)
    cut = hooks.InputStats(13, reference=dense, with_abs=False)
    for x in batches:
        cut.add(x * 0.5)
    rows = torch.cat([x.reshape(-1, 13) for x in batches]).double()
    torch.testing.assert_close(dense.gram, rows.T @ rows, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(cut.cross, 0.5 * rows.T @ rows, rtol=1e-6, atol=1e-6)


def test_rank_deficient_calibration_gives_finite_factors():
    gram = torch.ones(16, 16, dtype=torch.float64)  # one repeated direction: rank 1
    w = torch.randn(8, 16, dtype=torch.float64)
    f = weighted_svd(w, RankPolicy(rank=4), "w", input_weight=whitening(gram, 0.0))
    assert torch.isfinite(f.out_factor).all() and torch.isfinite(f.in_factor).all()
    zero = weighted_svd(w, RankPolicy(rank=4), "w", input_weight=whitening(torch.zeros(16, 16), 1e-4))
    assert torch.isfinite(zero.product()).all()


def test_repeated_token_calibration_file(tmp_path):
    text = tmp_path / "same.txt"
    text.write_text("a" * 4000)
    model = rankcut.load_model("tiny-llama")
    rankcut.compress_(model, Whiten(keep=0.5, calibration=Calibration(text=str(text), samples=4, seqlen=32)),
                      progress=False)
    assert torch.isfinite(output(model, sample_ids(model))).all()


def test_empty_or_short_calibration_text_is_a_clear_error(tmp_path):
    model = rankcut.load_model("tiny-llama")
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(RankcutError, match="empty"):
        calibration_ids(model, Calibration(text=str(empty)))
    short = tmp_path / "short.txt"
    short.write_text("too short")
    with pytest.raises(RankcutError, match="too short"):
        calibration_ids(model, Calibration(text=str(short), samples=4, seqlen=32))
    with pytest.raises(RankcutError, match="neither an embedded text"):
        calibration_ids(model, Calibration(text=str(tmp_path / "absent.txt")))


def test_calibration_windows_past_a_position_table_are_refused():
    gpt2 = rankcut.load_model("tiny-gpt2")  # a learned table of 256 positions
    with pytest.raises(RankcutError, match="past the model's 256 positions; give --calib-seqlen 256 or less"):
        calibration_ids(gpt2, Calibration(samples=1, seqlen=257))
    assert calibration_ids(gpt2, Calibration(samples=1, seqlen=256)).shape == (1, 256)


def test_shared_inputs_are_recorded_once():
    model = rankcut.load_model("tiny-llama")
    targets = select_targets(model, layers="0")
    with InputRecorder(targets) as rec:
        model(input_ids=calibration_ids(model, CAL))
    stats = rec.stats
    q, k, v = (stats[f"model.layers.0.self_attn.{p}_proj"] for p in "qkv")
    gate, up = stats["model.layers.0.mlp.gate_proj"], stats["model.layers.0.mlp.up_proj"]
    assert q is k is v and gate is up and q is not gate
    assert len({id(s) for s in stats.values()}) == 4


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_error_corrected_full_rank_stays_exact(name):
    """With equal streams the ridge-corrected target is W itself, so full rank is lossless."""
    model = rankcut.load_model(name)
    ids = sample_ids(model)
    dense = output(model, ids)
    cal = Calibration(text="gensim-news", samples=8, seqlen=64, batch_size=4, correct=True)
    overrides = full_rank_overrides(model, Whiten, calibration=cal)
    rankcut.compress_(model, Whiten(rank=1, allow_growth=True, calibration=cal), overrides=overrides, progress=False)
    assert rel_err(output(model, ids), dense) <= 1e-4


def test_corrected_target_is_the_reduced_rank_regression_optimum():
    torch.manual_seed(0)
    xd = torch.randn(500, 24, dtype=torch.float64) @ torch.randn(24, 24, dtype=torch.float64)
    xc = xd + 0.3 * torch.randn(500, 24, dtype=torch.float64)
    w = torch.randn(16, 24, dtype=torch.float64)
    y = xd @ w.T
    f = weighted_svd(w, RankPolicy(rank=6), "w", input_weight=whitening(xc.T @ xc, 0.0), cross=xc.T @ xd)
    plain = weighted_svd(w, RankPolicy(rank=6), "w", input_weight=whitening(xc.T @ xc, 0.0))
    fitted = xc @ torch.linalg.lstsq(xc, y).solution  # best unconstrained fit, then best rank 6
    u, s, vh = torch.linalg.svd(fitted, full_matrices=False)
    optimum = torch.linalg.norm((u[:, :6] * s[:6]) @ vh[:6] - y)
    assert torch.linalg.norm(xc @ f.product().T - y) == pytest.approx(optimum.item(), rel=1e-9)
    assert torch.linalg.norm(xc @ plain.product().T - y) > optimum


def test_allocation_takes_the_most_valuable_directions_within_budget():
    items = [AllocationItem("a", 10, 10, torch.tensor([100.0, 90.0, 80.0, 1.0]), cap=4),
             AllocationItem("b", 10, 10, torch.tensor([50.0, 0.5, 0.4, 0.3]), cap=4)]
    ranks = allocate_budget(items, budget_params=5 * 20)
    assert ranks == {"a": 3, "b": 1} or ranks == {"a": 4, "b": 1}
    assert sum(r * 20 for r in ranks.values()) <= 100
    with pytest.raises(RankcutError, match="below the minimum"):
        allocate_budget(items, budget_params=30)


def test_allocation_sees_the_whole_tail_a_dense_module_keeps():
    """Going dense buys a's three remaining directions (1.5) for 8 more parameters; the
    one-at-a-time greedy would price that step at one direction (0.5) and buy c's 1.2 for 16."""
    a = AllocationItem("a", 4, 4, torch.tensor([1.0, 0.5, 0.5, 0.5]), cap=2, dense_at_cap=True)
    c = AllocationItem("c", 8, 8, torch.tensor([2.0, 1.2] + [0.1] * 6), cap=4, dense_at_cap=True)
    ranks = allocate_budget([a, c], budget_params=40)
    assert ranks == {"a": 2, "c": 1}  # a at its cap: kept dense (16) + c at rank 1 (16) = 32 ≤ 40
    assert a.step_cost(1) == 16 - 8 and c.step_cost(0) == 16


@pytest.mark.parametrize("cls", [SVD, Whiten, Fisher])
def test_budget_is_met_and_ranks_are_uneven(cls, tmp_path):
    model = rankcut.load_model("tiny-llama")
    targets = select_targets(model)
    dense = sum(t.params for t in targets)
    kw = {} if cls is SVD else {"calibration": CAL}
    report = rankcut.compress_(model, cls(budget=0.5, **kw), progress=False)
    kept = sum(r["params"] for r in report.modules.values())
    assert 0.5 * dense - max(t.out_features + t.in_features for t in targets) <= kept <= 0.5 * dense
    ranks = [r["rank"] for r in report.modules.values()]
    assert len(set(ranks)) > 3
    rankcut.save(model, tmp_path / "b")
    back = rankcut.load(tmp_path / "b", fast=False)
    assert {n: r["rank"] for n, r in rankcut.record_of(back).modules.items()} == \
        {n: r["rank"] for n, r in report.modules.items()}
    assert torch.equal(output(back, sample_ids(back)), output(model, sample_ids(model)))


@pytest.mark.parametrize("name,two_pass", [("tiny-llama", False), ("tiny-gpt2", False), ("tiny-llama", True)])
def test_modules_given_their_break_even_rank_are_left_dense(name, two_pass, tmp_path):
    from rankcut.core.ranks import budget_cap

    model, dense = rankcut.load_model(name), rankcut.load_model(name)
    targets = select_targets(dense)
    cal = Calibration(**{**CAL.__dict__, "two_pass": two_pass})
    report = rankcut.compress_(model, Whiten(budget=0.9, calibration=cal), progress=False)
    kept = [n for n, r in report.modules.items() if r["form"] == "dense"]
    assert kept and len(kept) < len(targets)  # a high budget gives some modules their break-even rank
    for t in targets:
        module = model.get_submodule(t.name)
        if t.name in kept:  # the original module, weights and all: exact, at the same size
            assert type(module) is type(t.module)
            assert torch.equal(module.weight, t.module.weight)
        else:
            assert module.rank < budget_cap(t.out_features, t.in_features)
    assert sum(r["params"] for r in report.modules.values()) <= 0.9 * sum(t.params for t in targets)
    rankcut.save(model, tmp_path / "m")
    back = rankcut.load(tmp_path / "m")
    assert [n for n, r in rankcut.record_of(back).modules.items() if r["form"] == "dense"] == kept
    ids = sample_ids(back)
    torch.testing.assert_close(output(back, ids), output(model, ids), rtol=1e-5, atol=1e-5)


def test_fisher_needs_a_loss():
    model = rankcut.load_model("tiny-bert")
    with pytest.raises(RankcutError, match="needs a model with a loss"):
        rankcut.compress_(model, Fisher(keep=0.5, calibration=CAL), progress=False)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2", "tiny-mamba"])
def test_lean_gradient_pass_gives_the_same_fisher(name, monkeypatch):
    """Block recomputation and the chunked head change memory only: the Fisher is the plain one."""
    from rankcut.calibration import fisher as calibration

    model = rankcut.load_model(name)
    targets = select_targets(model, "all-linear")
    ids = calibration_ids(model, CAL)
    plain = calibration.collect_output_fisher(model, targets, ids, 4, progress=False, lean=False)
    chunks = []
    real = calibration.chunked_lm_backward
    monkeypatch.setattr(calibration, "chunked_lm_backward", lambda *a, **k: (chunks.append(1), real(*a, **k))[1])
    monkeypatch.setattr(calibration, "HEAD_SLICE_NUMBERS", 1000)  # slices of a few rows, the last one short
    lean = calibration.collect_output_fisher(model, targets, ids, 4, progress=False, lean=True)
    assert chunks, "the chunked head was not used"
    assert lean.keys() == plain.keys()
    for key in plain:
        assert plain[key].abs().max() > 0
        torch.testing.assert_close(lean[key], plain[key], rtol=1e-5, atol=1e-12)


@pytest.mark.parametrize("with_bias", [False, True])
def test_the_sliced_head_gradient_is_the_cross_entropy_gradient(with_bias, monkeypatch):
    """Against autograd on the whole logits, with a half-precision head read a slice at a time."""
    from rankcut.calibration import fisher as calibration

    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(37, 24, generator=g)
    weight = (torch.randn(101, 24, generator=g) / 4).to(torch.bfloat16)
    bias = torch.randn(101, generator=g).to(torch.bfloat16) if with_bias else None
    labels = torch.randint(0, 101, (37,), generator=g)
    monkeypatch.setattr(calibration, "HEAD_SLICE_NUMBERS", 37 * 10)  # ten rows a slice (37 tokens): eleven slices
    got = calibration.next_token_loss_gradient(hidden, weight, bias, labels)
    leaf = hidden.clone().requires_grad_(True)
    logits = leaf @ weight.float().T + (0 if bias is None else bias.float())
    torch.nn.functional.cross_entropy(logits, labels, reduction="sum").backward()
    torch.testing.assert_close(got, leaf.grad, rtol=1e-5, atol=1e-6)


def test_calibrated_methods_refuse_heads():
    model = rankcut.load_model("tiny-llama")
    with pytest.raises(RankcutError, match="outside the repeated blocks"):
        rankcut.compress_(model, Whiten(rank=4, allow_growth=True, calibration=CAL), targets="^lm_head$", progress=False)


@pytest.mark.integration
def test_calibration_from_a_benchmark_train_split():
    model = rankcut.load_model("tiny-llama")
    ids = calibration_ids(model, Calibration(text="sst2", samples=4, seqlen=64))
    assert ids.shape == (4, 64)
    text = rankcut.get_tokenizer(model).decode(ids[0])
    assert text.strip() and all(ord(c) < 0x110000 for c in text)


def test_two_pass_budget_keeps_the_allocation_and_calibrates_sequentially(monkeypatch):
    from rankcut.compress import apply as compress_module

    one = rankcut.load_model("tiny-llama")
    r1 = rankcut.compress_(one, Fisher(budget=0.5, calibration=CAL), progress=False)
    two = rankcut.load_model("tiny-llama")
    cal2 = Calibration(**{**CAL.__dict__, "two_pass": True})
    gradient_passes = []
    real = compress_module.collect_output_fisher
    monkeypatch.setattr(compress_module, "collect_output_fisher",
                        lambda *a, **k: (gradient_passes.append(1), real(*a, **k))[1])
    r2 = rankcut.compress_(two, Fisher(budget=0.5, calibration=cal2), progress=False)
    assert len(gradient_passes) == 1  # the second pass reuses the first pass's Fisher
    assert {n: r["rank"] for n, r in r2.modules.items()} == {n: r["rank"] for n, r in r1.modules.items()}
    assert rankcut.record_of(two).budget["passes"] == 2
    assert all(r["config"]["calibration"]["sequential"] for r in r2.modules.values())
    ids = sample_ids(one)
    assert not torch.equal(output(one, ids), output(two, ids))  # different calibration streams


@pytest.mark.parametrize("name", TINY)
def test_staged_calibration_at_full_rank_reproduces_dense(name):
    model = rankcut.load_model(name)
    ids = sample_ids(model)
    dense = output(model, ids)
    cal = Calibration(**{**CAL.__dict__, "staged": True})
    overrides = full_rank_overrides(model, Whiten, calibration=cal)
    rankcut.compress_(model, Whiten(rank=1, allow_growth=True, calibration=cal), overrides=overrides, progress=False)
    assert rel_err(output(model, ids), dense) <= 1e-4


def test_staged_calibration_groups_a_block_by_shared_input_and_records_cut_inputs(monkeypatch):
    from rankcut.calibration.hooks import BlockReplay
    from rankcut.compress import apply as compress_module
    from rankcut.compress.apply import _input_stages

    model = rankcut.load_model("tiny-llama")
    block0 = [t for t in select_targets(model) if t.layer == 0]
    replay = BlockReplay(model, calibration_ids(model, CAL), CAL.batch_size)
    with InputRecorder(block0) as recorder:
        list(replay.run(0, recorder))
    stages = _input_stages([(t, None) for t in reversed(block0)], recorder)
    assert [[t.name.rsplit(".", 1)[-1] for t, _ in s] for s in stages] == \
        [["q_proj", "k_proj", "v_proj"], ["o_proj"], ["gate_proj", "up_proj"], ["down_proj"]]
    # staged, down_proj is whitened on the inputs the cut gate/up give it, not on the dense ones
    seen: dict[bool, torch.Tensor] = {}
    real = compress_module.handler_for
    for staged in (False, True):
        def spy(cfg, staged=staged):
            def run(weight, c, name, stats, **kwargs):
                if name.endswith("layers.0.mlp.down_proj"):
                    seen[staged] = stats.gram.clone()
                return real(cfg)(weight, c, name, stats, **kwargs)
            return run
        monkeypatch.setattr(compress_module, "handler_for", spy)
        cal = Calibration(**{**CAL.__dict__, "staged": staged})
        rankcut.compress_(rankcut.load_model("tiny-llama"), Whiten(keep=0.3, calibration=cal), progress=False)
    assert seen[False].shape == seen[True].shape and not torch.allclose(seen[False], seen[True])

