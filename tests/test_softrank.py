import json

import pytest
import torch

import rankcut
from rankcut.core.errors import RankcutError
from rankcut.core.layers import LowRankLinear, SoftThresholdLinear
from rankcut.train.softrank import SoftRank, build_student, hard_cut, softrank

IDS = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(3))


def small(**kw) -> SoftRank:
    base = dict(budget=0.5, method="svd", steps=8, batch_size=2, seqlen=32, checkpoint_every=3)
    return SoftRank(**{**base, **kw})


def test_soft_layer_at_zero_threshold_is_the_dense_map():
    w = torch.randn(12, 20, dtype=torch.float64)
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    layer = SoftThresholdLinear(u, vh, s, tau=0.0, bias=torch.ones(12, dtype=torch.float64))
    x = torch.randn(5, 20, dtype=torch.float64)
    torch.testing.assert_close(layer(x), x @ w.T + 1)
    torch.testing.assert_close(layer.weight, w)
    # a threshold between two singular values keeps exactly the directions above it
    layer.rho.data.fill_(float((s[3] + s[4]) / 2 / s[0]))
    assert layer.hard_rank() == 4 and 3.5 < layer.soft_rank().item() < 4.5


def test_gate_keeps_the_surviving_values_and_gives_the_threshold_a_gradient():
    w = torch.randn(12, 20, dtype=torch.float64)
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    tau = float((s[3] + s[4]) / 2)
    layer = SoftThresholdLinear(u, vh, s, tau=tau, shrink=False, temperature=0.5)
    x = torch.randn(5, 20, dtype=torch.float64)
    torch.testing.assert_close(layer(x), x @ (u[:, :4] * s[:4] @ vh[:4]).T)  # a plain rank-4 truncation
    layer(x).square().sum().backward()
    assert layer.rho.grad is not None and layer.rho.grad.abs() > 0  # dead directions near τ count too
    low = layer.to_low_rank(torch.arange(4), tau)
    torch.testing.assert_close(low(x), layer(x))


def test_hard_cut_of_the_surviving_directions_changes_nothing():
    model = rankcut.load_model("tiny-llama")
    layers, targets, start = build_student(model, "tiny-llama", small(), progress=False)
    assert all(layers[t.name].hard_rank() == start[t.name] for t in targets)
    before = model(input_ids=IDS).logits
    budget = sum(layers[t.name].hard_rank() * (t.out_features + t.in_features) for t in targets)
    ranks = hard_cut(model, layers, targets, budget)
    assert ranks == start
    assert all(isinstance(model.get_submodule(t.name), LowRankLinear) for t in targets)
    torch.testing.assert_close(model(input_ids=IDS).logits, before, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name,shrink,precision", [("tiny-llama", True, "fp32"), ("tiny-gpt2", True, "fp32"),
                                                   ("tiny-mamba", True, "fp32"), ("tiny-llama", False, "fp32"),
                                                   ("tiny-gpt2", True, "bf16")])
def test_learned_ranks_meet_the_budget_and_survive_save_and_load(name, shrink, precision, tmp_path):
    model = rankcut.load_model(name)
    result = softrank(model, "lm", small(shrink=shrink, precision=precision), model_name=name, progress=False)
    assert abs(result.budget_error) <= 0.01 and result.target_params <= result.budget_params
    assert len(result.history) == 8 and all(torch.isfinite(torch.tensor(h["loss"])) for h in result.history)
    assert not any(isinstance(m, SoftThresholdLinear) for m in model.modules())
    rankcut.save(model, tmp_path / "m")
    manifest = json.loads((tmp_path / "m" / "rankcut.json").read_text())
    assert {n: r["rank"] for n, r in manifest["modules"].items()} == result.ranks
    assert manifest["softrank"]["learned"] and manifest["softrank"]["budget_params"] == result.budget_params
    again = rankcut.load(tmp_path / "m")
    torch.testing.assert_close(again(input_ids=IDS).logits, model(input_ids=IDS).logits, rtol=1e-5, atol=1e-5)


def test_ranks_are_cut_after_the_rank_phase_and_then_held():
    model = rankcut.load_model("tiny-llama")
    result = softrank(model, "lm", small(steps=10, rank_phase=0.3, threshold_lr=5e-2), model_name="tiny-llama",
                      progress=False)
    after = [h["params"] for h in result.history[3:]]
    assert len(set(after)) == 1 and after[0] == result.target_params <= result.budget_params
    assert not any(isinstance(m, SoftThresholdLinear) for m in model.modules())


@pytest.mark.parametrize("learn", [True, False])
def test_modules_the_budget_keeps_dense_stay_dense(learn, tmp_path):
    model = rankcut.load_model("tiny-llama")
    config = small(budget=0.9, init="budget", learn_ranks=learn, method="whiten",
                   calibration=rankcut.Calibration(samples=4, seqlen=64))
    result = softrank(model, "lm", config, model_name="tiny-llama", progress=False)
    dense = [n for n, r in result.ranks.items() if r is None]
    assert dense and len(dense) < len(result.ranks)
    assert all(type(model.get_submodule(n)) is torch.nn.Linear for n in dense)
    assert result.target_params <= result.budget_params
    rankcut.save(model, tmp_path / "m")
    again = rankcut.load(tmp_path / "m")
    torch.testing.assert_close(again(input_ids=IDS).logits, model(input_ids=IDS).logits, rtol=1e-5, atol=1e-5)


def test_static_baseline_keeps_its_uniform_ranks():
    model = rankcut.load_model("tiny-llama")
    result = softrank(model, "lm", small(learn_ranks=False), model_name="tiny-llama", progress=False)
    assert result.ranks["model.layers.0.self_attn.q_proj"] == 16  # 64×64 at half: 64·64/2/128
    assert result.target_params <= result.budget_params
    assert 0 < result.train_seconds < result.seconds  # the steps alone, without the starting cut


@pytest.mark.parametrize("killed_at,init,precision", [(5, "uniform", "fp32"), (8, "uniform", "fp32"),
                                                       (5, "fisher", "fp32"), (8, "uniform", "bf16")])
def test_killed_run_resumes_to_the_same_ranks(tmp_path, killed_at, init, precision):
    # checkpoints at 3 (before the cut at 4) and 6 (after it); a Fisher start is measured again
    config = small(steps=9, threshold_lr=5e-2, init=init, fisher_examples=4, precision=precision)
    full = rankcut.load_model("tiny-llama")
    expected = softrank(full, "lm", config, model_name="tiny-llama", checkpoint=tmp_path / "a", progress=False)
    killed = rankcut.load_model("tiny-llama")
    partial = softrank(killed, "lm", config, model_name="tiny-llama", checkpoint=tmp_path / "b",
                       progress=False, stop_after=killed_at)  # steps after the last checkpoint are lost
    assert partial.ranks == {} and len(partial.history) == killed_at
    resumed_model = rankcut.load_model("tiny-llama")
    resumed = softrank(resumed_model, "lm", config, model_name="tiny-llama", checkpoint=tmp_path / "b",
                       resume=True, progress=False)
    assert resumed.ranks == expected.ranks
    assert [h["loss"] for h in resumed.history] == pytest.approx([h["loss"] for h in expected.history], rel=1e-5)
    torch.testing.assert_close(resumed_model(input_ids=IDS).logits, full(input_ids=IDS).logits,
                               rtol=1e-4, atol=1e-4)


def test_bad_runs_get_clear_errors(tmp_path):
    with pytest.raises(RankcutError, match="in \\(0, 1\\)"):
        SoftRank(budget=1.5)
    with pytest.raises(RankcutError, match="--batch-size"):  # the checks every fine-tune shares
        SoftRank(batch_size=0)
    model = rankcut.load_model("tiny-llama")
    with pytest.raises(RankcutError, match="--resume: no checkpoint"):
        softrank(model, "lm", small(), checkpoint=tmp_path / "none", resume=True, progress=False)
    with pytest.raises(RankcutError, match="choose one of"):
        softrank(model, "translation", small(), progress=False)
    with pytest.raises(RankcutError, match="BertModel has no language-model head"):
        softrank(rankcut.load_model("tiny-bert"), "lm", small(), progress=False)
    with pytest.raises(RankcutError, match="--seqlen 300 is past the model's 256 positions"):
        softrank(rankcut.load_model("tiny-gpt2"), "lm", small(seqlen=300), progress=False)
    softrank(rankcut.load_model("tiny-llama"), "lm", small(steps=3), model_name="tiny-llama",
             checkpoint=tmp_path / "c", progress=False)
    with pytest.raises(RankcutError, match="pass --resume"):
        softrank(rankcut.load_model("tiny-llama"), "lm", small(steps=3), model_name="tiny-llama",
                 checkpoint=tmp_path / "c", progress=False)
    with pytest.raises(RankcutError, match="different run"):
        softrank(rankcut.load_model("tiny-llama"), "lm", small(steps=4), model_name="tiny-llama",
                 checkpoint=tmp_path / "c", resume=True, progress=False)


def test_glue_classifier_from_the_command_line(tmp_path, capsys, small_sst2):
    """An encoder's classifier on SST-2: a few steps on the real train split, scored on dev."""
    from rankcut.cli import main

    code = main(["softrank", "tiny-bert", "--task", "sst2", "--method", "svd", "--steps", "4", "--batch-size", "8",
                 "--eval", "--eval-limit", "32", "--out", str(tmp_path / "out"), "--json"])
    assert code == 0
    doc = json.loads(capsys.readouterr().out)
    assert abs(doc["budget_error"]) <= 0.01 and "accuracy" in doc["eval"]["metrics"]
    assert (tmp_path / "out" / "ranks.png").stat().st_size > 0
    assert main(["info", str(tmp_path / "out")]) == 0


@pytest.mark.parametrize("mode", ["proportional", "shared"])
def test_projection_keeps_the_hard_count_within_budget_at_every_step(mode):
    from rankcut.train.softrank import hard_params, project_to_budget

    model = rankcut.load_model("tiny-llama")
    layers, targets, _ = build_student(model, "tiny-llama", small(), progress=False)
    for t in targets:  # thresholds far too low: every direction alive, far over budget
        layers[t.name].rho.data.fill_(0.0)
    alive = {t.name: layers[t.name].hard_rank() for t in targets}
    budget = hard_params(layers, targets) // 3
    relative = {t.name: layers[t.name].rho.item() for t in targets}
    delta = project_to_budget(layers, targets, budget, mode)
    assert delta > 0 and budget * 0.97 <= hard_params(layers, targets) <= budget
    if mode == "shared":  # one shift of every relative threshold
        assert all(abs(layers[t.name].rho.item() - relative[t.name] - delta) < 1e-5 for t in targets)
    else:  # every layer keeps the same fraction of its live directions (to within one direction)
        kept = [layers[t.name].hard_rank() / alive[t.name] for t in targets]
        assert max(kept) - min(kept) <= 1 / min(alive.values()) + 1e-9
    assert project_to_budget(layers, targets, budget, mode) == 0.0  # within budget: untouched
    result = softrank(rankcut.load_model("tiny-llama"), "lm", small(threshold_lr=5e-2, project=mode),
                      model_name="tiny-llama", progress=False)
    assert all(h["params"] <= result.budget_params for h in result.history)


def test_direction_fisher_is_the_squared_loss_slope_of_scaling_that_direction():
    from rankcut.compress.factor_cache import FactorCache
    from rankcut.core.targets import select_targets
    from rankcut.train.data import LMData
    from rankcut.train.softrank import direction_fisher

    model = rankcut.load_model("tiny-llama").double()
    config = small(seqlen=16, batch_size=1)
    data = LMData(model, config)
    targets = select_targets(model)
    cache = FactorCache(model, "tiny-llama-double", "svd", folder=None, progress=False)
    fisher = direction_fisher(model, targets, cache, data, examples=1, progress=False)
    assert all(type(model.get_submodule(t.name)) is torch.nn.Linear for t in targets)  # put back
    target = targets[3]
    out_f, in_f = cache.factors[target.name]
    inputs = data.batch(0)

    def loss_at(eps: float, k: int) -> float:
        weight = target.module.weight
        original = weight.detach().clone()
        with torch.no_grad():
            weight += eps * torch.outer(out_f[:, k], in_f[k]).to(weight.dtype)
            logits = model(input_ids=inputs["input_ids"]).logits[0, :-1]  # float64 (task_loss casts down)
            loss = torch.nn.functional.cross_entropy(logits, inputs["input_ids"][0, 1:]).item()
            weight.copy_(original)
        return loss

    for k in (0, 5):
        # a wide central step: the norms compute in float32 even in a float64 model
        slope = (loss_at(1e-2, k) - loss_at(-1e-2, k)) / 2e-2
        assert fisher[target.name][k].item() == pytest.approx(slope ** 2, rel=2e-3, abs=1e-12)


def test_fisher_start_meets_the_budget_with_uneven_ranks(tmp_path):
    model = rankcut.load_model("tiny-llama")
    result = softrank(model, "lm", small(init="fisher", learn_ranks=False, fisher_examples=4),
                      model_name="tiny-llama", progress=False)
    assert result.target_params <= result.budget_params and abs(result.budget_error) <= 0.01
    assert len(set(result.ranks.values())) > 3
    rankcut.save(model, tmp_path / "m")
    again = rankcut.load(tmp_path / "m")
    torch.testing.assert_close(again(input_ids=IDS).logits, model(input_ids=IDS).logits, rtol=1e-5, atol=1e-5)
