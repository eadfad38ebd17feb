import pytest

import rankcut
from rankcut.core.errors import RankcutError
from rankcut.core.targets import parse_layers, select_targets

EXPECTED_KINDS = {
    "tiny-llama": {"q", "k", "v", "o", "gate", "up", "down"},
    "tiny-gpt2": {"c_attn", "attn_proj", "c_fc", "mlp_proj"},
    "tiny-bert": {"query", "key", "value", "attention-output", "intermediate", "output"},
    "tiny-mamba": {"in_proj", "x_proj", "out_proj"},
}


def test_all_linear_finds_every_kind_in_every_layer(tiny_name):
    model = rankcut.load_model(tiny_name)
    targets = select_targets(model)
    assert {t.kind for t in targets} == EXPECTED_KINDS[tiny_name]
    assert {t.layer for t in targets} == {0, 1, 2, 3}
    assert len(targets) == 4 * len(EXPECTED_KINDS[tiny_name])
    assert not any("lm_head" in t.name or "embed" in t.name or "pooler" in t.name for t in targets)


def test_generic_aliases_pick_the_same_role_across_architectures():
    bert = select_targets(rankcut.load_model("tiny-bert"), "q,o", layers="1")
    assert [t.kind for t in bert] == ["query", "attention-output"]
    gpt2 = select_targets(rankcut.load_model("tiny-gpt2"), "up,down", layers=[2])
    assert [t.kind for t in gpt2] == ["c_fc", "mlp_proj"]
    assert all(t.transposed for t in gpt2)


def test_layers_and_regex_selection():
    model = rankcut.load_model("tiny-llama")
    chosen = select_targets(model, "q,down", layers="0-1,3")
    assert [(t.layer, t.kind) for t in chosen] == [(0, "q"), (0, "down"), (1, "q"), (1, "down"), (3, "q"), (3, "down")]
    by_regex = select_targets(model, r"layers\.2\.mlp\.")
    assert [t.kind for t in by_regex] == ["gate", "up", "down"]
    head = select_targets(model, r"^lm_head$")
    assert [t.name for t in head] == ["lm_head"]


def test_mamba_dt_proj_only_when_named():
    model = rankcut.load_model("tiny-mamba")
    assert [t.kind for t in select_targets(model, "dt_proj", layers="0")] == ["dt_proj"]


def test_break_even_rank():
    t = select_targets(rankcut.load_model("tiny-llama"), "gate", layers="0")[0]
    assert (t.out_features, t.in_features) == (160, 64)
    assert t.break_even_rank == pytest.approx(160 * 64 / 224)


def test_none_selects_the_default_all_linear():
    model = rankcut.load_model("tiny-llama")
    assert [t.name for t in select_targets(model, None)] == [t.name for t in select_targets(model)]


@pytest.mark.parametrize("spec,layers,message", [
    ("nothing_here", None, "matches no module"),
    ("q", "7", "past the last layer"),
    ("q", "a-b", "bad layer list"),
    ("([", None, "neither a kind nor a valid regex"),
    ("", None, "names nothing"),  # an empty regex matched every module, the head included
    ("  ", None, "names nothing"),
    ([], None, "names nothing"),
    (["q", ""], None, "names nothing"),
])
def test_bad_selection_names_the_fix(spec, layers, message):
    with pytest.raises(RankcutError, match=message):
        select_targets(rankcut.load_model("tiny-llama"), spec, layers)


def test_compressing_a_compressed_model_says_its_maps_are_factored_already():
    model = rankcut.load_model("tiny-llama")
    rankcut.compress_(model, rankcut.SVD(keep=0.5), targets="q", progress=False)
    with pytest.raises(RankcutError, match=r"'q' matches no module that is still dense \(4 are factored already"):
        select_targets(model, "q")
    assert {t.kind for t in select_targets(model, "all-linear")} == EXPECTED_KINDS["tiny-llama"] - {"q"}
    rankcut.compress_(model, rankcut.SVD(keep=0.5), progress=False)
    with pytest.raises(RankcutError) as caught:  # nothing dense is left: no empty list of kinds after it
        select_targets(model, "all-linear")
    assert str(caught.value).endswith("(28 are factored already: to cut those again, compress the dense model)")


def test_parse_layers():
    assert parse_layers("0-2,5") == [0, 1, 2, 5]
    assert parse_layers(None) is None
    assert parse_layers([3, 1, 3]) == [1, 3]
