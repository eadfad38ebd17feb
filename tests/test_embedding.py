"""Cutting the token embedding and its tied head (`--targets embed`)."""

import pytest
import torch

import rankcut
from rankcut import SVD, Calibration, Fisher, Whiten
from rankcut.calibration.sources import calibration_ids
from rankcut.compress.embedding import head_statistics
from rankcut.core.embedding import LowRankEmbedding, TiedLowRankHead
from rankcut.core.errors import RankcutError

from .conftest import rel_err, sample_ids

CAL = Calibration(text="gensim-news", samples=8, seqlen=64, batch_size=4)


def _logits(model, ids):  # noqa: ANN001, ANN202
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
@pytest.mark.parametrize("config", [SVD, Whiten, Fisher])
def test_a_factored_embedding_at_full_rank_gives_the_same_logits(name, config):
    model = rankcut.load_model(name)
    ids = sample_ids(model)
    dense = _logits(model, ids)
    full = min(model.get_input_embeddings().weight.shape)
    kwargs = {"calibration": CAL} if config.needs else {}
    rankcut.compress_(model, config(rank=full, allow_growth=True, **kwargs), targets="embed", progress=False)
    assert isinstance(model.get_input_embeddings(), LowRankEmbedding)
    assert isinstance(model.get_output_embeddings(), TiedLowRankHead)
    assert rel_err(_logits(model, ids), dense) <= 1e-4


def test_a_cut_embedding_holds_its_factors_once_and_shrinks_the_model():
    model = rankcut.load_model("tiny-llama")
    vocab, dim = model.get_input_embeddings().weight.shape
    before = rankcut.count_params(model)
    report = rankcut.compress_(model, Fisher(keep=0.5, calibration=CAL), targets="embed", progress=False)
    embedding = model.get_input_embeddings()
    assert embedding.rank * (vocab + dim) <= 0.5 * vocab * dim
    assert before - rankcut.count_params(model) == vocab * dim - embedding.rank * (vocab + dim)
    assert not list(model.get_output_embeddings().parameters())
    assert set(report.modules) == {"model.embed_tokens", "lm_head"}
    assert report.modules["lm_head"]["tied_to"] == "model.embed_tokens"


def test_the_head_fisher_is_the_loss_gradient_at_the_logits_squared():
    model = rankcut.load_model("tiny-llama")
    ids = calibration_ids(model, CAL)[:2]
    stats = head_statistics(model, model.get_output_embeddings(), ids, CAL, {"gram", "out_fisher"}, progress=False)
    logits = model(input_ids=ids).logits.detach().requires_grad_(True)
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                             reduction="sum")
    loss.backward()
    expected = logits.grad[:, :-1].reshape(-1, logits.shape[-1]).double().square().mean(0)
    torch.testing.assert_close(stats.out_fisher, expected, rtol=1e-5, atol=1e-12)
    hidden = []
    handle = model.get_output_embeddings().register_forward_pre_hook(lambda m, a: hidden.append(a[0]))
    model(input_ids=ids)
    handle.remove()
    h = hidden[0].reshape(-1, hidden[0].shape[-1]).double()
    assert rel_err(stats.gram, h.T @ h) <= 1e-5  # accumulated in float32 per batch, float64 across


def test_blocks_and_embedding_cut_together_save_and_reload_through_transformers(tmp_path):
    from transformers import AutoModelForCausalLM

    model = rankcut.load_model("tiny-llama")
    ids = sample_ids(model)
    report = rankcut.compress_(model, Fisher(keep=0.5, calibration=CAL), targets="all-linear,embed", progress=False)
    assert report.ratio < 0.55
    cut = _logits(model, ids)
    rankcut.save(model, tmp_path / "m")
    same = rankcut.load(tmp_path / "m")
    torch.testing.assert_close(_logits(same, ids), cut, rtol=0, atol=0)
    assert rankcut.count_params(same) == rankcut.count_params(model)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    torch.testing.assert_close(_logits(hf, ids), cut, rtol=0, atol=0)
    dense = hf.dequantize()
    assert dense.get_output_embeddings().weight is dense.get_input_embeddings().weight  # tied again
    assert rel_err(_logits(dense, ids), cut) <= 1e-5


def test_an_untied_head_or_a_cut_embedding_is_refused_with_one_line():
    model = rankcut.load_model("tiny-llama")
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())  # untie
    with pytest.raises(RankcutError, match="untied output head"):
        rankcut.compress_(model, SVD(keep=0.5), targets="head", progress=False)
    rankcut.compress_(model, SVD(keep=0.5), targets="embed", progress=False)  # the embedding alone, plain SVD
    assert isinstance(model.get_input_embeddings(), LowRankEmbedding)
    assert isinstance(model.lm_head, torch.nn.Linear)
    with pytest.raises(RankcutError, match="already cut"):
        rankcut.compress_(model, SVD(keep=0.5), targets="embed", progress=False)


def test_the_speed_breakdown_clocks_a_tied_factored_head_as_the_head(tmp_path):

    from rankcut.cli import main
    from rankcut.speed.timesplit import head_name, target_names

    model = rankcut.load_model("tiny-llama")
    dense = rankcut.load_model("tiny-llama")
    rankcut.compress_(model, SVD(keep=0.5), targets="all-linear,embed", progress=False)
    names = target_names(dense, model)
    assert "model.embed_tokens" not in names and "lm_head" not in names
    assert len(names) == len(rankcut.core.targets.select_targets(dense, "all-linear"))
    assert head_name(model, names) == "lm_head"
    rankcut.save(model, tmp_path / "m")
    assert main(["bench", "tiny-llama", "--vs", str(tmp_path / "m"), "--seqlen", "8", "--decode", "2",
                 "--repeats", "1", "--breakdown", "--json", "--device", "cpu"]) == 0
