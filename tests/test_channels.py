"""Joint MLP channel cuts (Nyström): the refit against least squares, the model against dense,
and the saved result against a plain reload."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import rankcut
from rankcut import Calibration, Whiten
from rankcut.cli import main
from rankcut.compress.channels import cut_mlp_channels_
from rankcut.core.errors import RankcutError
from rankcut.core.targets import dense_weight
from rankcut.methods.nystrom import nystrom_channels, ridge_leverage

CAL = Calibration(text="gensim-news", samples=8, seqlen=32, batch_size=4)


def _activations(tokens: int = 400, channels: int = 24, rank: int | None = None, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(tokens, channels, generator=g, dtype=torch.float64)
    if rank is not None:  # correlated channels: only `rank` independent directions
        h = h[:, :rank] @ torch.randn(rank, channels, generator=g, dtype=torch.float64)
    return h * torch.linspace(0.1, 3.0, channels, dtype=torch.float64)


def test_keeping_every_channel_changes_nothing():
    h, down = _activations(), torch.randn(10, 24, dtype=torch.float64)
    cut = nystrom_channels(h.T @ h, down, keep=24)
    assert cut.kept.tolist() == list(range(24))
    torch.testing.assert_close(cut.down, down)


def test_the_refit_is_the_least_squares_map_from_the_kept_channels():
    h, down = _activations(), torch.randn(10, 24, dtype=torch.float64)
    cut = nystrom_channels(h.T @ h, down, keep=9, damp=0.0)
    kept = h[:, cut.kept]
    reference = torch.linalg.lstsq(kept, h @ down.T).solution.T  # argmin_M ‖H Wᵀ − H_S Mᵀ‖
    torch.testing.assert_close(cut.down, reference, rtol=1e-7, atol=1e-9)
    refit_error = (h @ down.T - kept @ cut.down.T).norm()
    sliced_error = (h @ down.T - kept @ down[:, cut.kept].T).norm()
    assert refit_error < sliced_error


def test_leverage_scores_sum_to_the_effective_dimension_and_rank_the_unexplained_channels_first():
    h = _activations(rank=6)
    h = torch.cat([h, torch.randn(400, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(1))], 1)
    gram = h.T @ h
    scores = ridge_leverage(gram, ridge=0.0)
    assert scores.sum().item() == pytest.approx(7.0, abs=1e-6)  # the rank: 6 mixed directions and one alone
    assert scores.argmax().item() == 24  # the independent channel is the least explained by the others


def test_output_greedy_picks_the_best_single_channel_and_beats_leverage_on_what_down_reads():
    h = _activations(rank=10)
    down = torch.zeros(6, 24, dtype=torch.float64)
    down[:, :4] = torch.randn(6, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    target = h @ down.T  # down reads four channels; leverage scores cannot know which

    def error(kept: list[int]) -> float:  # the least-squares refit's output error from these channels
        x = h[:, kept]
        return (target - x @ torch.linalg.lstsq(x, target).solution).norm().item()

    best = min(range(24), key=lambda j: error([j]))
    assert nystrom_channels(h.T @ h, down, 1, damp=0.0, select="output").kept.tolist() == [best]
    greedy = nystrom_channels(h.T @ h, down, 4, damp=0.0, select="output").kept.tolist()
    leverage = nystrom_channels(h.T @ h, down, 4, damp=0.0, select="leverage").kept.tolist()
    assert error(greedy) < error(leverage)


def test_a_rank_deficient_gram_gives_a_finite_refit():
    h = _activations(rank=3)
    h[:, 5] = 0.0  # a channel that never fires
    cut = nystrom_channels(h.T @ h, torch.randn(10, 24, dtype=torch.float64), keep=12)
    assert torch.isfinite(cut.down).all()
    with pytest.raises(RankcutError, match="cannot keep 30 of 24"):
        nystrom_channels(h.T @ h, torch.randn(10, 24, dtype=torch.float64), keep=30)


@pytest.mark.parametrize("alias", ["tiny-llama", "tiny-gpt2", "tiny-bert"])
def test_a_full_cut_reproduces_the_dense_model_and_a_half_cut_halves_the_mlps(alias):
    model = rankcut.load_model(alias)
    ids = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        dense = model(input_ids=ids)[0]
        full = copy.deepcopy(model)
        cut_mlp_channels_(full, 1.0, CAL, progress=False)
        torch.testing.assert_close(full(input_ids=ids)[0], dense, rtol=1e-4, atol=1e-5)
        report = cut_mlp_channels_(model, 0.5, CAL, progress=False)
        assert report.channels_after == report.channels_before // 2
        assert torch.isfinite(model(input_ids=ids)[0]).all()
    mlp_params = 0
    for group_name, module in model.named_modules():
        if group_name.endswith(("mlp.down_proj", "mlp.c_proj", "output.dense")) and "attention" not in group_name:
            mlp_params += 1
            assert dense_weight(module).shape[1] == report.channels_after
    assert mlp_params == len(report.layers)


def test_a_channel_cut_saves_as_the_smaller_architecture_and_reloads_the_same(tmp_path):
    from transformers import AutoModelForCausalLM

    ids = torch.randint(0, 100, (1, 12), generator=torch.Generator().manual_seed(1))
    done = rankcut.oneshot("tiny-llama", Whiten(keep=0.5, calibration=CAL), targets="q,k,v,o", out=tmp_path / "c",
                           mlp_channels=0.5, progress=False, plot=False)
    config = json.loads((tmp_path / "c" / "config.json").read_text())
    assert config["intermediate_size"] == 80  # tiny-llama's 160, halved: the same in every block
    manifest = json.loads((tmp_path / "c" / "rankcut.json").read_text())
    assert manifest["channels"]["intermediate_size_before"] == 160
    assert done.report.params_before == rankcut.count_params(rankcut.load_model("tiny-llama"))
    assert done.report.params_after == rankcut.count_params(done.model)
    with torch.no_grad():
        expected = done.model(input_ids=ids).logits
        torch.testing.assert_close(rankcut.load(tmp_path / "c")(input_ids=ids).logits, expected)
        plain = AutoModelForCausalLM.from_pretrained(tmp_path / "c")
        torch.testing.assert_close(plain(input_ids=ids).logits, expected)


def test_channel_cuts_refuse_what_they_cannot_do_in_one_line(tmp_path, capsys):
    argv = ["compress", "tiny-mamba", "--method", "svd", "--keep", "0.5", "--mlp-channels", "0.5",
            "--out", str(tmp_path / "m")]
    assert main([*argv, "--json"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "has no MLP of up/gate and down maps" in err, err
    assert not (tmp_path / "m").exists()
    with pytest.raises(RankcutError, match="give the fraction of MLP channels"):
        rankcut.oneshot("tiny-llama", Whiten(keep=0.5, calibration=CAL), mlp_channels=1.5, progress=False)


def test_the_command_line_cuts_channels_then_the_targets(tmp_path, capsys):
    out = tmp_path / "c"
    assert main(["compress", "tiny-llama", "--method", "svd", "--keep", "0.5", "--targets", "q,k,v,o",
                 "--mlp-channels", "0.25", "--mlp-select", "output", "--out", str(out), "--json"]) == 0
    payload = json.loads(capsys.readouterr().out)
    channels = json.loads((out / "rankcut.json").read_text())["channels"]
    assert channels["select"] == "output" and channels["intermediate_size"] == 40
    assert payload["params_after"] == rankcut.count_params(rankcut.load(out)) < payload["params_before"]
