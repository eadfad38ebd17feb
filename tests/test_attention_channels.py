"""Joint attention head-channel cuts (Q·K column-row selection, V·O whitened SVD): the math
against its definition, the model against dense, and the saved result against a reload."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import rankcut
from rankcut import SVD, Calibration
from rankcut.cli import main
from rankcut.compress.attention import attention_groups, cut_attention_channels_
from rankcut.core.channel_subset import ChannelSubsetLinear
from rankcut.core.errors import RankcutError
from rankcut.methods.attention_channels import channel_units, qk_kept_channels, value_output_cut

CAL = Calibration(text="gensim-news", samples=8, seqlen=32, batch_size=4)


def _inputs(tokens: int = 600, features: int = 20, rank: int | None = None, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, features, generator=g, dtype=torch.float64)
    if rank is not None:
        x = x[:, :rank] @ torch.randn(rank, features, generator=g, dtype=torch.float64)
    return x * torch.linspace(0.2, 2.0, features, dtype=torch.float64)


def _vo_error(x: torch.Tensor, value: torch.Tensor, outputs: list[torch.Tensor], cut) -> float:  # noqa: ANN001
    dense = sum(((x @ value.T) @ o.T).square().sum() for o in outputs)
    kept = x @ cut.value.T
    return sum(((x @ value.T) @ o.T - kept @ oc.T).square().sum() for o, oc in zip(outputs, cut.outputs)) / dense


def test_rope_pairs_are_the_units_of_a_head():
    assert channel_units(8, 8) == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert channel_units(8, 4) == [[0, 2], [1, 3], [4], [5], [6], [7]]  # RoPE over half the head
    assert channel_units(3, None) == [[0], [1], [2]]


def test_keeping_every_value_channel_is_exact():
    x = _inputs()
    g = torch.Generator().manual_seed(1)
    value = torch.randn(6, 20, generator=g, dtype=torch.float64)
    outputs = [torch.randn(20, 6, generator=g, dtype=torch.float64) for _ in range(3)]
    cut = value_output_cut(x.T @ x / len(x), value, None, outputs, keep=6, damp=0.0)
    for o, oc in zip(outputs, cut.outputs):
        torch.testing.assert_close(oc @ cut.value, o @ value)


def test_the_value_output_cut_leaves_exactly_the_tail_of_its_spectrum():
    """The relative output error is the dropped singular values' share of M^½ Σ_v^½, the
    least any k-channel cut of v can leave, and it beats keeping k of v's own channels."""
    x = _inputs()
    g = torch.Generator().manual_seed(2)
    value = torch.randn(8, 20, generator=g, dtype=torch.float64)
    outputs = [torch.randn(20, 8, generator=g, dtype=torch.float64) for _ in range(2)]
    gram = x.T @ x / len(x)
    sigma = value @ gram @ value.T
    mixed = sum(o.T @ o for o in outputs)

    def root(a: torch.Tensor) -> torch.Tensor:
        w, v = torch.linalg.eigh(a)
        return (v * w.clamp_min(0).sqrt()) @ v.T

    spectrum = torch.linalg.svdvals(root(mixed) @ root(sigma)).square()
    previous = float("inf")
    for keep in (2, 4, 6):
        cut = value_output_cut(gram, value, None, outputs, keep, damp=0.0)
        error = _vo_error(x, value, outputs, cut)
        assert error == pytest.approx((spectrum[keep:].sum() / spectrum.sum()).item(), rel=1e-6)
        assert error < previous
        previous = error
        # keeping v's first `keep` channels with each O refit by least squares does worse
        kept_rows = x @ value[:keep].T
        naive = sum((x @ value.T @ o.T - kept_rows @ torch.linalg.lstsq(kept_rows, x @ value.T @ o.T).solution)
                    .square().sum() for o in outputs)
        assert error < naive / sum(((x @ value.T) @ o.T).square().sum() for o in outputs)


def test_value_biases_ride_along_as_a_ones_column():
    x = _inputs()
    ones = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)
    g = torch.Generator().manual_seed(3)
    value, bias = torch.randn(4, 20, generator=g, dtype=torch.float64), torch.randn(4, generator=g, dtype=torch.float64)
    outputs = [torch.randn(20, 4, generator=g, dtype=torch.float64)]
    cut = value_output_cut(ones.T @ ones / len(x), value, bias, outputs, keep=4, damp=0.0)
    torch.testing.assert_close((x @ cut.value.T + cut.value_bias) @ cut.outputs[0].T,
                               (x @ value.T + bias) @ outputs[0].T)


def test_query_key_selection_keeps_rope_pairs_whole_and_drops_dead_channels_first():
    x = _inputs()
    gram = x.T @ x / len(x)
    g = torch.Generator().manual_seed(4)
    heads, kv_heads, d = 4, 2, 8
    query = torch.randn(heads * d, 20, generator=g, dtype=torch.float64)
    key = torch.randn(kv_heads * d, 20, generator=g, dtype=torch.float64)
    query[[1, 5, d + 1, d + 5]] = 0.0  # pair (1, 5) of both query heads of group 0 reads nothing
    kept = qk_kept_channels(gram, query, key, heads, kv_heads, d, keep_units=3, rotary_dim=d)
    assert [len(k) for k in kept] == [6, 6]
    for channels in kept:
        as_set = set(channels.tolist())
        assert all((c + 4) % 8 in as_set for c in as_set)  # each channel's RoPE partner is kept too
    assert 1 not in kept[0].tolist()


def test_a_rank_deficient_input_gives_a_finite_cut():
    x = _inputs(rank=3)
    g = torch.Generator().manual_seed(5)
    value = torch.randn(6, 20, generator=g, dtype=torch.float64)
    value[2] = 0.0  # a value channel no input reaches
    cut = value_output_cut(x.T @ x / len(x), value, None, [torch.randn(20, 6, generator=g, dtype=torch.float64)],
                           keep=4)
    assert torch.isfinite(cut.value).all() and all(torch.isfinite(o).all() for o in cut.outputs)
    with pytest.raises(ValueError, match="cannot keep 7 of 6"):
        value_output_cut(x.T @ x, value, None, cut.outputs, keep=7)


@pytest.mark.parametrize("alias", ["tiny-llama", "tiny-bert"])
def test_a_full_cut_reproduces_the_dense_model_and_a_half_cut_halves_attention(alias):
    model = rankcut.load_model(alias)
    ids = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(0))
    attention = sum(g.query.params + g.key.params + g.value.params + g.output.params for g in attention_groups(model))
    with torch.no_grad():
        dense = model(input_ids=ids)[0]
        full = copy.deepcopy(model)
        cut_attention_channels_(full, 1.0, CAL, progress=False)
        assert isinstance(full.get_submodule(attention_groups(model)[0].value.name), ChannelSubsetLinear)
        torch.testing.assert_close(full(input_ids=ids)[0], dense, rtol=1e-4, atol=1e-5)
        report = cut_attention_channels_(model, 0.5, CAL, progress=False)
        assert torch.isfinite(model(input_ids=ids)[0]).all()
    assert report.qk_channels_after == report.qk_channels_before / 2
    assert report.vo_channels_after == report.vo_channels_before // 2
    # the kept blocks are half of each weight (biases stay full width, the dropped rows' as zeros)
    assert report.params_before - report.params_after == attention // 2


def test_an_attention_cut_saves_and_reloads_the_same_everywhere(tmp_path):
    from transformers import AutoModelForCausalLM

    ids = torch.randint(0, 100, (1, 12), generator=torch.Generator().manual_seed(1))
    done = rankcut.oneshot("tiny-llama", SVD(keep=0.5), out=tmp_path / "a", attention_channels=0.5,
                           channel_calibration=CAL, progress=False, plot=False)
    manifest = json.loads((tmp_path / "a" / "rankcut.json").read_text())
    forms = {name: rec["form"] for name, rec in manifest["modules"].items()}
    assert {f for n, f in forms.items() if n.endswith(("q_proj", "k_proj", "v_proj", "o_proj"))} == {"channels"}
    assert {f for n, f in forms.items() if "mlp" in n} == {"two-factor"}
    assert manifest["attention"]["vo_channels"] == 8
    assert done.report.params_before == rankcut.count_params(rankcut.load_model("tiny-llama"))
    with torch.no_grad():
        expected = done.model(input_ids=ids).logits
        torch.testing.assert_close(rankcut.load(tmp_path / "a")(input_ids=ids).logits, expected)
        plain = AutoModelForCausalLM.from_pretrained(tmp_path / "a")
        torch.testing.assert_close(plain(input_ids=ids).logits, expected)
        assert rankcut.count_params(plain) == rankcut.count_params(done.model)
        torch.testing.assert_close(plain.dequantize()(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)


def test_the_command_line_cuts_attention_then_the_rest(tmp_path, capsys):
    out = tmp_path / "a"
    assert main(["compress", "tiny-llama", "--method", "svd", "--keep", "0.5", "--attn-channels", "0.75",
                 "--out", str(out), "--json"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["params_after"] == rankcut.count_params(rankcut.load(out)) < payload["params_before"]
    assert json.loads((out / "rankcut.json").read_text())["attention"]["qk_channels"] == 12


@pytest.mark.parametrize("alias,message", [("tiny-gpt2", "no attention blocks with separate query"),
                                           ("tiny-mamba", "no attention blocks with separate query")])
def test_attention_cuts_refuse_what_they_cannot_do_in_one_line(tmp_path, capsys, alias, message):
    argv = ["compress", alias, "--method", "svd", "--keep", "0.5", "--attn-channels", "0.5",
            "--out", str(tmp_path / "m"), "--json"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "m").exists()
    with pytest.raises(RankcutError, match="fraction of attention head channels"):
        rankcut.oneshot("tiny-llama", SVD(keep=0.5), attention_channels=0.0, progress=False)


def test_value_output_can_keep_a_different_fraction():
    model = rankcut.load_model("tiny-llama")
    group = attention_groups(model)[0]
    report = cut_attention_channels_(model, 1.0, CAL, progress=False, value_keep=0.25)
    assert (report.qk_channels_after, report.vo_channels_after) == (16, 4)
    assert model.get_submodule(group.query.name).kept.shape == (group.query.out_features, group.query.in_features)
    assert model.get_submodule(group.value.name).kept.shape[0] == group.value.out_features // 4
    assert model.get_submodule(group.output.name).kept.shape[1] == group.output.in_features // 4
