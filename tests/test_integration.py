"""The real models from their wheels (no download). Marked so they can be run on their own:
`pytest -m integration`. The first SmolLM2 load converts its GGUF once (~40 s) into the cache."""

import pytest

import rankcut
from rankcut.cli import main
from rankcut.methods import SVD, Tucker

from .conftest import full_rank_overrides, output, rel_err

pytestmark = pytest.mark.integration

PROMPT = "The history of the city begins in the Roman period, when a small fort was built"


@pytest.fixture(scope="module")
def smollm2():
    return rankcut.load_model("smollm2-135m")


def _ids(model):
    return rankcut.get_tokenizer(model)(PROMPT, return_tensors="pt").input_ids


def test_smollm2_full_rank_reproduces_dense_logits(smollm2):
    ids = _ids(smollm2)
    dense = output(smollm2, ids)
    model = rankcut.load_model("smollm2-135m")
    overrides = full_rank_overrides(model, SVD)
    rankcut.compress_(model, SVD(rank=1, allow_growth=True), overrides=overrides, progress=False)
    assert len(overrides) == 30 * 7
    assert rel_err(output(model, ids), dense) <= 1e-4


@pytest.mark.parametrize("cls", [SVD, Tucker])
def test_minilm_full_rank_reproduces_dense_output(cls):
    model = rankcut.load_model("minilm-l6")
    ids = _ids(model)
    dense = output(model, ids)
    overrides = full_rank_overrides(model, cls)
    rankcut.compress_(model, cls(rank=1, allow_growth=True), overrides=overrides, progress=False)
    assert len(overrides) == 6 * 6
    assert rel_err(output(model, ids), dense) <= 1e-4


def test_cli_compress_smollm2_round_trip_is_exact(smollm2, tmp_path, capsys):
    out = tmp_path / "smol-svd-0.5"
    assert main(["compress", "smollm2-135m", "--method", "svd", "--keep", "0.5", "--out", str(out)]) == 0
    capsys.readouterr()
    loaded = rankcut.load(out)
    in_memory = rankcut.load_model("smollm2-135m")
    targets = rankcut.select_targets(in_memory)
    report = rankcut.compress_(in_memory, SVD(keep=0.5), progress=False)
    ids = _ids(smollm2)
    reference = output(in_memory, ids)  # loaded = the fast (fused) model: equal up to float rounding
    assert (output(loaded, ids) - reference).abs().max().item() <= 1e-5 * reference.abs().max().item()
    implied = (rankcut.count_params(smollm2) - sum(t.params for t in targets)
               + sum(r["rank"] * (r["out_features"] + r["in_features"]) for r in report.modules.values()))
    assert rankcut.count_params(loaded) == implied == report.params_after
    assert 0.5 * sum(t.params for t in targets) >= sum(r["params"] for r in report.modules.values())


def test_whitening_keeps_smollm2_usable_where_plain_svd_collapses(smollm2):
    """The reason calibrated methods exist: at 80% kept, plain SVD destroys the model."""
    from rankcut.data.embedded import embedded_text
    from rankcut.evaluate import perplexity
    from rankcut.evaluate.perplexity import tokenize_text

    ids = tokenize_text(smollm2, embedded_text("gensim-news"))[:1024]
    dense = perplexity(smollm2, ids, seqlen=512, progress=False).perplexity
    svd = rankcut.load_model("smollm2-135m")
    rankcut.compress_(svd, SVD(keep=0.8), progress=False)
    white = rankcut.load_model("smollm2-135m")
    cal = rankcut.Calibration(samples=8, seqlen=128)
    rankcut.compress_(white, rankcut.Whiten(keep=0.8, calibration=cal), progress=False)
    ppl_svd = perplexity(svd, ids, seqlen=512, progress=False).perplexity
    ppl_white = perplexity(white, ids, seqlen=512, progress=False).perplexity
    assert dense < ppl_white < ppl_svd / 100
