import json

import pytest
import torch

import rankcut
from rankcut.core.errors import RankcutError
from rankcut.methods import SVD
from rankcut.train.data import LMData
from rankcut.train.heal import Heal, heal, load_teacher
from rankcut.train.loop import step_losses

IDS = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(5))


def small(**kw) -> Heal:
    return Heal(**{**dict(steps=12, batch_size=2, seqlen=32, lr=1e-3, checkpoint_every=4), **kw})


def saved_cut(name: str, tmp_path, pivot: bool = False) -> torch.nn.Module:
    model = rankcut.load_model(name)
    rankcut.compress_(model, SVD(keep=0.3, pivot=pivot), progress=False)
    rankcut.save(model, tmp_path / "cut", overwrite=True)
    return rankcut.load(tmp_path / "cut")


def distance_to_teacher(model, teacher, data: LMData, config: Heal, steps: range) -> float:
    """The distillation loss on a few training batches: what healing minimizes."""
    with torch.no_grad():
        return sum(float(step_losses(model, teacher, data, config, s)[1]) for s in steps)


@pytest.mark.parametrize("name,pivot,precision", [("tiny-llama", False, "fp32"), ("tiny-llama", True, "fp32"),
                                                  ("tiny-gpt2", False, "fp32"), ("tiny-mamba", False, "fp32"),
                                                  ("tiny-llama", True, "bf16")])
def test_healing_moves_the_cut_towards_its_teacher_at_the_same_size(name, pivot, precision, tmp_path):
    model = saved_cut(name, tmp_path, pivot)
    config = small(precision=precision)
    teacher = load_teacher(model, "lm")
    shapes = {n: p.shape for n, p in model.named_parameters()}
    data = LMData(model, config)  # tokenized once for both measurements
    before = distance_to_teacher(model, teacher, data, config, range(4))
    result = heal(model, "lm", config, progress=False)
    after = distance_to_teacher(model, teacher, data, config, range(4))
    assert result.steps == config.steps and len(result.history) == config.steps
    assert 0 < result.train_seconds < result.seconds  # the steps alone, inside the whole call
    assert after < before  # what healing minimizes fell: a no-op leaves it equal, a wrong sign raises it
    assert {n: p.shape for n, p in model.named_parameters()} == shapes  # no rank moved
    assert all(p.requires_grad and p.dtype == torch.float32 for p in model.parameters())  # bf16: forwards only
    rankcut.save(model, tmp_path / "healed")
    back = rankcut.load(tmp_path / "healed", fast=False)
    assert torch.equal(back(input_ids=IDS).logits, model(input_ids=IDS).logits)
    manifest = json.loads((tmp_path / "healed" / "rankcut.json").read_text())
    assert manifest["healed"]["steps"] == config.steps and manifest["source_model"] == name
    assert manifest["modules"] == json.loads((tmp_path / "cut" / "rankcut.json").read_text())["modules"]


@pytest.mark.parametrize("killed_at", [5, 8, 11])  # checkpoints every 4 steps
def test_killed_heal_resumes_to_the_same_model(tmp_path, killed_at):
    config = small()
    full = saved_cut("tiny-llama", tmp_path)
    expected = heal(full, "lm", config, checkpoint=tmp_path / "a", progress=False)
    killed = rankcut.load(tmp_path / "cut")
    partial = heal(killed, "lm", config, checkpoint=tmp_path / "b", progress=False, stop_after=killed_at)
    assert partial.steps == killed_at and rankcut.record_of(killed).healed is None
    resumed = rankcut.load(tmp_path / "cut")  # steps after the last checkpoint are lost and redone
    again = heal(resumed, "lm", config, checkpoint=tmp_path / "b", resume=True, progress=False)
    assert [h["loss"] for h in again.history] == pytest.approx([h["loss"] for h in expected.history], rel=1e-5)
    torch.testing.assert_close(resumed(input_ids=IDS).logits, full(input_ids=IDS).logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name,pivot", [("tiny-llama", False), ("tiny-llama", True), ("tiny-gpt2", False),
                                        ("tiny-mamba", False)])
def test_bf16_forwards_give_the_float32_losses_and_gradients_to_bfloat16_rounding(name, pivot, tmp_path):
    model = saved_cut(name, tmp_path, pivot)
    teacher = load_teacher(model, "lm")
    data = LMData(model, small())
    runs = {}
    for precision in ("fp32", "bf16"):
        model.zero_grad(set_to_none=True)
        task, kl = step_losses(model, teacher, data, small(precision=precision), 0)
        (task + kl).backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        runs[precision] = (task.item(), kl.item(), grads, {p.grad.dtype for p in model.parameters() if p.grad is not None})
    (task32, kl32, grad32, _), (task16, kl16, grad16, dtypes16) = runs["fp32"], runs["bf16"]
    # bfloat16 keeps 8 bits of mantissa: the same losses to about a percent, not bit for bit
    assert task16 == pytest.approx(task32, rel=2e-2) and kl16 == pytest.approx(kl32, rel=5e-2, abs=1e-3)
    assert (task16, kl16) != (task32, kl32)  # the forwards did run in bfloat16
    assert dtypes16 == {torch.float32}  # the parameters and their gradients stay float32
    assert torch.nn.functional.cosine_similarity(grad16, grad32, dim=0) > 0.95


def test_bad_heals_get_clear_errors(tmp_path):
    with pytest.raises(RankcutError, match="--steps"):
        Heal(steps=0)
    with pytest.raises(RankcutError, match="--precision 'fp16': use one of fp32, bf16"):
        Heal(precision="fp16")
    with pytest.raises(RankcutError, match="no compressed modules"):
        heal(rankcut.load_model("tiny-llama"), "lm", small(), progress=False)
    model = saved_cut("tiny-llama", tmp_path)
    with pytest.raises(RankcutError, match="choose one of"):
        heal(model, "translation", small(), progress=False)
    with pytest.raises(RankcutError, match="does not fit"):
        heal(model, "lm", small(), teacher="tiny-gpt2", progress=False)
    rankcut.record_of(model).source = None
    with pytest.raises(RankcutError, match="--teacher"):
        heal(model, "lm", small(), progress=False)
    heal(rankcut.load(tmp_path / "cut"), "lm", small(steps=4), checkpoint=tmp_path / "c", progress=False)
    with pytest.raises(RankcutError, match="pass --resume"):
        heal(rankcut.load(tmp_path / "cut"), "lm", small(steps=4), checkpoint=tmp_path / "c", progress=False)
    with pytest.raises(RankcutError, match="different run"):
        heal(rankcut.load(tmp_path / "cut"), "lm", small(steps=5), checkpoint=tmp_path / "c", resume=True,
             progress=False)


def test_heal_from_the_command_line(tmp_path, capsys):
    from rankcut.cli import main

    saved_cut("tiny-llama", tmp_path)
    main(["heal", str(tmp_path / "cut"), "--steps", "3", "--batch-size", "2", "--seqlen", "32", "--precision", "bf16",
          "--checkpoint", str(tmp_path / "ck"), "--out", str(tmp_path / "healed"), "--json"])
    payload = json.loads(capsys.readouterr().out)
    assert payload["steps"] == 3 and payload["teacher"] == "tiny-llama" and payload["settings"]["precision"] == "bf16"
    assert rankcut.record_of(rankcut.load(tmp_path / "healed")).healed["steps"] == 3
    assert main(["heal", str(tmp_path / "cut"), "--out", str(tmp_path / "healed")]) == 2
    assert "already exists" in capsys.readouterr().err
    # a checkpoint left in the folder fails before any evaluation or training, writing nothing
    assert main(["heal", str(tmp_path / "cut"), "--checkpoint", str(tmp_path / "ck"), "--eval",
                 "--out", str(tmp_path / "again")]) == 2
    assert "pass --resume" in capsys.readouterr().err and not (tmp_path / "again").exists()
    # a curve needs the scoring it is made of: refused before any work
    assert main(["heal", str(tmp_path / "cut"), "--eval-every", "2", "--out", str(tmp_path / "again")]) == 2
    assert "add --eval" in capsys.readouterr().err and not (tmp_path / "again").exists()


def test_a_compressed_glue_classifier_heals_against_the_dense_classifier(tmp_path, capsys, small_sst2):
    """The teacher of a cut classifier is its source encoder fine-tuned by the GLUE recipe."""
    from rankcut.cli import main
    from rankcut.train.loop import prepare

    classifier, _ = prepare(rankcut.load_model("tiny-bert"), "sst2", progress=False)
    rankcut.compress_(classifier, SVD(keep=0.5), progress=False)
    rankcut.save(classifier, tmp_path / "cut")
    assert main(["heal", str(tmp_path / "cut"), "--task", "sst2", "--steps", "3", "--batch-size", "8",
                 "--eval", "--eval-limit", "32", "--eval-every", "2", "--out", str(tmp_path / "healed"), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["steps"] == 3 and "accuracy" in doc["eval"]["metrics"] and "accuracy" in doc["eval_before"]["metrics"]
    # the curve's last point is the final model, scored the same way as --eval scores it
    assert [c["step"] for c in doc["curve"]] == [2, 3]
    assert doc["curve"][-1]["accuracy"] == doc["eval"]["metrics"]["accuracy"]
    healed = rankcut.load(tmp_path / "healed")
    assert rankcut.count_params(healed) == rankcut.count_params(classifier)
    # under bf16 the classifier's logits come out bfloat16; its losses are still taken in float32
    from rankcut.train.data import GlueData

    teacher = load_teacher(healed, "sst2")
    data = GlueData(healed, "sst2", small(batch_size=8))
    losses = {p: step_losses(healed, teacher, data, small(batch_size=8, precision=p), 0) for p in ("fp32", "bf16")}
    assert {loss.dtype for pair in losses.values() for loss in pair} == {torch.float32}
    assert losses["bf16"][0].item() == pytest.approx(losses["fp32"][0].item(), rel=2e-2)


def unbalance_(model: torch.nn.Module, factor: float) -> None:
    """The same map with every output column `factor` times larger and input row that much smaller:
    the shape a whitened or Fisher-weighted truncation leaves (SmolLM2: ~1,000×)."""
    from rankcut.core.layers import LowRankLinear

    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LowRankLinear):
                m.out_factor.mul_(factor)
                m.in_factor.div_(factor)


def test_heal_does_not_depend_on_how_a_cut_splits_its_scale(tmp_path):
    # Adam steps every entry by about the lr: on factors 1,000× apart the small side would move
    # the map 1,000× faster than meant (the loss rose a million-fold here); heal balances first,
    # so a cut and the same cut unbalanced heal alike
    config = small(steps=6, lr=1e-3)
    ends = []
    for factor in (1.0, 1e3):
        model = saved_cut("tiny-llama", tmp_path)
        unbalance_(model, factor)
        teacher = load_teacher(model, "lm")
        data = LMData(model, config)
        before = distance_to_teacher(model, teacher, data, config, range(4))
        heal(model, "lm", config, progress=False)
        ends.append(distance_to_teacher(model, teacher, data, config, range(4)))
        assert ends[-1] < before
    assert ends[1] == pytest.approx(ends[0], rel=1e-3)


def test_logit_distillation_is_the_kl_divergence_whatever_the_slicing(monkeypatch):
    """The KL is taken in slices of positions (memory); the value and the gradient are the KL
    of the whole distributions, averaged over positions and scaled by T², whatever the slice."""
    import rankcut.train.loop as distill

    g = torch.Generator().manual_seed(0)
    student = torch.randn(3, 50, 40, generator=g, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(3, 50, 40, generator=g, dtype=torch.float64)
    temperature = 2.0
    p = torch.softmax(teacher / temperature, -1)
    expected = (p * (torch.log(p) - torch.log_softmax(student / temperature, -1))).sum(-1).mean() * temperature ** 2
    expected_grad, = torch.autograd.grad(expected, student)
    for rows in (7, 64, 1000):
        monkeypatch.setattr(distill, "KL_ROWS", rows)
        got = distill.distill_loss(student, teacher, temperature)
        grad, = torch.autograd.grad(got, student)
        assert got.item() == pytest.approx(expected.item(), rel=1e-5)
        assert torch.allclose(grad.double(), expected_grad, rtol=1e-4, atol=1e-7)


def test_pivoted_layers_train_with_tokens_as_columns_and_get_their_inference_layout_back(tmp_path, monkeypatch):
    """Healing runs every pivoted layer with its tokens as columns (faster to train) and leaves
    the layout rankcut.fast chose for inference as it found it."""
    from rankcut.core.layers import PivotLowRankLinear
    from rankcut.core.layout import set_tokens_as_columns_

    model = saved_cut("tiny-llama", tmp_path, pivot=True)
    pivots = {n: m for n, m in model.named_modules() if isinstance(m, PivotLowRankLinear)}
    chosen = {n for n in pivots if n.endswith("o_proj")}
    set_tokens_as_columns_(model, chosen)
    seen = set()
    columns_forward = PivotLowRankLinear._forward_tokens_as_columns

    def spy(self, x):
        if torch.is_grad_enabled():
            seen.add(id(self))
        return columns_forward(self, x)

    monkeypatch.setattr(PivotLowRankLinear, "_forward_tokens_as_columns", spy)
    heal(model, "lm", small(steps=2), progress=False)
    assert seen == {id(m) for m in pivots.values()}
    assert {n for n, m in pivots.items() if m.tokens_as_columns} == chosen


def test_a_cut_stored_in_bfloat16_trains_in_float32_and_comes_back_in_bfloat16(tmp_path):
    model = saved_cut("tiny-llama", tmp_path)
    model.to(torch.bfloat16)
    rankcut.save(model, tmp_path / "half")
    half = rankcut.load(tmp_path / "half", fast=False)
    widened = rankcut.load(tmp_path / "half", fast=False).float()  # the same values, exactly, in float32
    heal(half, "lm", small(steps=4), progress=False)
    heal(widened, "lm", small(steps=4), progress=False)
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}  # stored as it came
    trained = dict(half.named_parameters())
    # the same run as in float32, rounded once at the end: a run in bfloat16 would round every step
    assert all(torch.equal(trained[n], p.detach().to(torch.bfloat16)) for n, p in widened.named_parameters())
    assert any(not torch.equal(trained[n], p) for n, p in rankcut.load(tmp_path / "half").named_parameters())


@pytest.mark.parametrize("flags,expected", [("fpu avx2 avx512f avx512_bf16", True), ("fpu amx_bf16 amx_tile", True),
                                            ("fpu avx2 avx512f", False), (None, None)])
def test_bf16_hardware_is_read_from_the_cpu_flags(tmp_path, flags, expected):
    from rankcut.core.machine import cpu_multiplies_bf16

    info = tmp_path / "cpuinfo"
    if flags is not None:
        info.write_text(f"processor\t: 0\nmodel name\t: test\nflags\t\t: {flags}\n")
    assert cpu_multiplies_bf16(info) is expected


@pytest.mark.parametrize("hardware,warned", [(False, True), (True, False), (None, False)])
def test_bf16_on_a_cpu_that_emulates_it_is_warned_before_the_run(tmp_path, monkeypatch, caplog, hardware, warned):
    import rankcut.train.loop as distill

    monkeypatch.setattr(distill, "cpu_multiplies_bf16", lambda: hardware)
    model = saved_cut("tiny-llama", tmp_path)
    with caplog.at_level("WARNING", logger="rankcut.train.loop"):
        heal(model, "lm", small(steps=1, precision="bf16"), progress=False)
        heal(model, "lm", small(steps=1), progress=False)  # fp32: never a word
    assert sum("bfloat16 is emulated here" in r.message for r in caplog.records) == (1 if warned else 0)


def test_a_healing_curve_scores_the_run_without_changing_it(tmp_path):
    """Scores every `eval_every` steps and after the last; the run trains exactly as without them, and a
    resumed run keeps the scores taken before the kill."""
    config = small(steps=10)
    plain = saved_cut("tiny-llama", tmp_path)
    heal(plain, "lm", config, progress=False)
    teacher = load_teacher(plain, "lm")
    data = LMData(plain, config)
    seen = []

    def score(m):
        assert not torch.is_grad_enabled()  # no graph built for a score
        seen.append(1)
        return {"distance": distance_to_teacher(m, teacher, data, config, range(2))}

    scored = rankcut.load(tmp_path / "cut")
    result = heal(scored, "lm", config, progress=False, eval_every=4, evaluate=score)
    assert [c["step"] for c in result.curve] == [4, 8, 10] and len(seen) == 3
    with torch.no_grad():
        final = score(scored)["distance"]
    assert result.curve[-1]["distance"] == pytest.approx(final, rel=1e-6)  # the final model's
    for a, b in zip(plain.parameters(), scored.parameters()):
        assert torch.equal(a, b)  # scoring moved nothing, not even the random state
    killed = rankcut.load(tmp_path / "cut")
    heal(killed, "lm", config, checkpoint=tmp_path / "ck", progress=False, eval_every=4, evaluate=score, stop_after=9)
    resumed = heal(rankcut.load(tmp_path / "cut"), "lm", config, checkpoint=tmp_path / "ck", resume=True,
                   progress=False, eval_every=4, evaluate=score)
    assert [c["step"] for c in resumed.curve] == [4, 8, 10]
    assert [c["distance"] for c in resumed.curve] == pytest.approx([c["distance"] for c in result.curve], rel=1e-4)
    with pytest.raises(RankcutError, match="--eval-every -1"):
        heal(rankcut.load(tmp_path / "cut"), "lm", config, progress=False, eval_every=-1)
