"""A rankcut folder is an ordinary Hugging Face model: the Auto classes load the compressed model,
`save_pretrained` round-trips, `dequantize` and `rankcut export --dense` multiply the factors
back, and a process without rankcut refuses the folder instead of filling a dense skeleton."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    BertConfig,
    BertForSequenceClassification,
)

import rankcut
from rankcut.cli import main
from rankcut.core.layers import FACTORED, PivotLowRankLinear
from rankcut.core.modules import compressed_modules
from rankcut.methods import SVD, Tucker, Whiten

from .conftest import output, rel_err, sample_ids

CAL = rankcut.Calibration(text="gensim-news", samples=8, seqlen=64, batch_size=4)
AUTO = {"tiny-llama": AutoModelForCausalLM, "tiny-gpt2": AutoModelForCausalLM, "tiny-mamba": AutoModelForCausalLM,
        "tiny-bert": AutoModel}

# every stored form: plain two-factor, pivoted, Tucker two- and three-factor, budgeted (dense
# modules among factored ones)
FORMS = {
    "svd": lambda: SVD(keep=0.5),
    "pivot": lambda: SVD(keep=0.5, pivot=True),
    "tucker": lambda: Tucker(keep=0.5),
    "tucker3": lambda: Tucker(keep=0.5, three_factor=True),
    "budget": lambda: Whiten(budget=0.6, calibration=CAL),
}


def _compressed(name: str, form: str) -> nn.Module:
    model = rankcut.load_model(name)
    rankcut.compress_(model, FORMS[form](), progress=False)
    return model


def _same(a: nn.Module, b: nn.Module, ids: torch.Tensor) -> None:
    assert type(a) is type(b)
    assert rankcut.count_params(a) == rankcut.count_params(b)
    assert torch.equal(output(a, ids), output(b, ids))


@pytest.mark.parametrize("form", sorted(FORMS))
def test_the_auto_class_loads_the_compressed_model(tiny_name, form, tmp_path):
    if form == "budget" and tiny_name == "tiny-bert":
        pytest.skip("calibration windows are a decoder's; the encoder's budget is covered by the plain forms")
    model = _compressed(tiny_name, form)
    rankcut.save(model, tmp_path / "c")
    config = json.loads((tmp_path / "c" / "config.json").read_text())
    assert config["model_type"] == "rankcut" and config["quantization_config"]["quant_method"] == "rankcut"
    assert config["quantization_config"]["modules"] == rankcut.record_of(model).modules

    ours = rankcut.load(tmp_path / "c")
    theirs = AUTO[tiny_name].from_pretrained(tmp_path / "c")
    _same(ours, theirs, sample_ids(model))
    assert rankcut.count_params(theirs) < rankcut.count_params(rankcut.load_model(tiny_name))
    assert {n: type(m) for n, m in compressed_modules(theirs).items()} == \
        {n: type(m) for n, m in compressed_modules(model).items()}
    assert torch.equal(output(theirs, sample_ids(model)), output(model, sample_ids(model)))


@pytest.mark.parametrize("form", ["svd", "pivot", "tucker3"])
def test_save_pretrained_round_trips(form, tmp_path):
    model = _compressed("tiny-llama", form)
    rankcut.save(model, tmp_path / "c")
    first = AutoModelForCausalLM.from_pretrained(tmp_path / "c")
    first.save_pretrained(tmp_path / "again")
    second = AutoModelForCausalLM.from_pretrained(tmp_path / "again")
    _same(first, second, sample_ids(model))
    assert json.loads((tmp_path / "again" / "config.json").read_text())["model_type"] == "rankcut"
    assert (tmp_path / "again" / "rankcut_config.py").is_file()
    # rankcut.load reads a save_pretrained folder too (it has no rankcut.json, so no checksum)
    _same(rankcut.load(tmp_path / "again"), second, sample_ids(model))


def test_a_model_compressed_in_memory_saves_with_save_pretrained(tmp_path):
    """`compress_` then `save_pretrained`, no rankcut.save in between."""
    model = _compressed("tiny-gpt2", "svd")
    rankcut.save(model, tmp_path / "via-rankcut")  # attaches the quantizer and marks the config
    model.save_pretrained(tmp_path / "direct")
    _same(AutoModelForCausalLM.from_pretrained(tmp_path / "direct"), rankcut.load(tmp_path / "via-rankcut"),
          sample_ids(model))


def test_layouts_and_fused_inputs_survive_save_pretrained(tmp_path):
    """Column-major factors, tokens-as-columns and stacked shared inputs are views and strides;
    the files hold whole row-major tensors and loading lays them out again."""
    model = _compressed("tiny-llama", "pivot")
    records = rankcut.record_of(model).modules
    first = next(iter(records))
    records[first]["column_major"] = ["out_factor"]
    records[first]["tokens_as_columns"] = True
    rankcut.save(model, tmp_path / "c")
    fast = rankcut.load(tmp_path / "c", fast=True)
    layer = fast.get_submodule(first)
    assert isinstance(layer, PivotLowRankLinear) and layer.tokens_as_columns
    assert not layer.out_factor.is_contiguous()
    fast.save_pretrained(tmp_path / "again")
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "again")
    assert back.get_submodule(first).tokens_as_columns
    ids = sample_ids(model)
    assert rel_err(output(back, ids), output(fast, ids)) < 1e-6


def test_sequence_classification_heads_load_with_their_auto_class(tmp_path):
    cfg = BertConfig(vocab_size=300, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=128, num_labels=3)
    torch.manual_seed(0)
    model = BertForSequenceClassification(cfg).eval()
    rankcut.compress_(model, SVD(keep=0.5), progress=False)
    rankcut.save(model, tmp_path / "c")
    back = AutoModelForSequenceClassification.from_pretrained(tmp_path / "c")
    ids = torch.randint(0, 300, (2, 12))
    assert type(back) is BertForSequenceClassification
    assert rankcut.count_params(back) == rankcut.count_params(model)
    assert torch.equal(back(input_ids=ids).logits, model(input_ids=ids).logits)


@pytest.mark.parametrize("form", ["svd", "pivot", "tucker3"])
def test_dequantize_merges_the_factors_into_dense_linears(tiny_name, form, tmp_path):
    model = _compressed(tiny_name, form)
    rankcut.save(model, tmp_path / "c")
    loaded = AUTO[tiny_name].from_pretrained(tmp_path / "c")
    ids = sample_ids(model)
    before = output(loaded, ids)
    dense = loaded.dequantize()
    assert not any(isinstance(m, FACTORED) for m in dense.modules())
    assert rankcut.count_params(dense) == rankcut.count_params(rankcut.load_model(tiny_name))
    assert rel_err(output(dense, ids), before) < 1e-5
    assert getattr(dense.config, "quantization_config", None) is None
    dense.save_pretrained(tmp_path / "dense")
    assert json.loads((tmp_path / "dense" / "config.json").read_text())["model_type"] != "rankcut"


def _without_rankcut(code: str, cwd: Path) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter where `import rankcut` fails, as if it were not installed."""
    prelude = textwrap.dedent("""
        import importlib.abc, sys
        class NotInstalled(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name.split(".")[0] == "rankcut":
                    raise ModuleNotFoundError(f"No module named '{name}'", name=name)
        sys.meta_path.insert(0, NotInstalled())
    """)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(cwd / "modules")}
    return subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, cwd=cwd, env=env, timeout=300)


def _in_fresh_process(code: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(cwd / "modules")}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, cwd=cwd, env=env, timeout=300)


def test_without_rankcut_the_folder_is_refused_not_filled_at_random(tmp_path):
    model = _compressed("tiny-llama", "svd")
    rankcut.save(model, tmp_path / "c")
    plain = _without_rankcut("""
        from transformers import AutoModelForCausalLM
        AutoModelForCausalLM.from_pretrained("c")
        print("LOADED")
    """, tmp_path)
    assert plain.returncode != 0 and "LOADED" not in plain.stdout
    assert "trust_remote_code=True" in plain.stderr
    trusted = _without_rankcut("""
        from transformers import AutoModelForCausalLM
        AutoModelForCausalLM.from_pretrained("c", trust_remote_code=True)
        print("LOADED")
    """, tmp_path)
    assert trusted.returncode != 0 and "LOADED" not in trusted.stdout
    assert "rankcut" in trusted.stderr.splitlines()[-1] and "pip install rankcut" in trusted.stderr


def test_trust_remote_code_imports_rankcut_for_the_user(tmp_path):
    model = _compressed("tiny-llama", "svd")
    rankcut.save(model, tmp_path / "c")
    torch.save(output(model, sample_ids(model)), tmp_path / "expected.pt")
    torch.save(sample_ids(model), tmp_path / "ids.pt")
    run = _in_fresh_process("""
        import torch
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained("c", trust_remote_code=True)
        with torch.no_grad():
            got = model(input_ids=torch.load("ids.pt")).logits
        assert torch.equal(got, torch.load("expected.pt")), (got - torch.load("expected.pt")).abs().max()
        print("SAME", type(model.model.layers[0].self_attn.q_proj).__name__)
    """, tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "SAME LowRankLinear" in run.stdout


def test_export_dense_writes_a_folder_that_loads_without_rankcut(tiny_name, tmp_path, capsys):
    model = _compressed(tiny_name, "tucker3")
    rankcut.save(model, tmp_path / "c")
    assert main(["export", str(tmp_path / "c"), "--dense", "--out", str(tmp_path / "d"), "--json"]) in (0, None)
    report = json.loads(capsys.readouterr().out)
    assert report["params"] == rankcut.count_params(rankcut.load_model(tiny_name))
    config = json.loads((tmp_path / "d" / "config.json").read_text())
    assert "quantization_config" not in config and "auto_map" not in config
    assert not (tmp_path / "d" / "rankcut_config.py").exists()
    ids = sample_ids(model)
    torch.save(ids, tmp_path / "ids.pt")
    torch.save(output(model, ids), tmp_path / "expected.pt")
    auto = AUTO[tiny_name].__name__
    run = _without_rankcut(f"""
        import torch
        from transformers import {auto}
        model = {auto}.from_pretrained("d")
        with torch.no_grad():
            out = model(input_ids=torch.load("ids.pt"))
        got = out.logits if hasattr(out, "logits") else out.last_hidden_state
        want = torch.load("expected.pt")
        print("ERR", ((got - want).abs().max() / want.abs().max()).item())
    """, tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    assert float(run.stdout.split("ERR")[1]) < 1e-5


def test_export_refuses_bad_input_in_one_line_and_writes_nothing(tmp_path, capsys):
    model = _compressed("tiny-llama", "svd")
    rankcut.save(model, tmp_path / "c")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    for argv, said in [
        (["export", str(tmp_path / "nowhere"), "--dense", "--out", str(tmp_path / "x")], "does not exist"),
        (["export", str(tmp_path / "c"), "--dense", "--out", str(tmp_path / "taken")], "already exists"),
    ]:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert said in err and len(err.splitlines()) == 1
    assert not (tmp_path / "x").exists()
    assert (tmp_path / "taken" / "keep.txt").read_text() == "mine"


@pytest.mark.integration
@pytest.mark.parametrize("name, auto", [("smollm2-135m", AutoModelForCausalLM), ("minilm-l6", AutoModel)])
def test_the_real_models_load_with_their_auto_class(name, auto, tmp_path):
    model = rankcut.load_model(name)
    rankcut.compress_(model, SVD(keep=0.5, pivot=True), progress=False)
    rankcut.save(model, tmp_path / "c")
    theirs = auto.from_pretrained(tmp_path / "c")
    ids = sample_ids(model)
    assert rankcut.count_params(theirs) == rankcut.count_params(model) < rankcut.count_params(rankcut.load_model(name))
    assert torch.equal(output(theirs, ids), output(rankcut.load(tmp_path / "c"), ids))
    assert torch.equal(output(theirs, ids), output(model, ids))


def test_learned_ranks_load_with_the_auto_class(tmp_path):
    from rankcut.train.softrank import SoftRank, softrank

    model = rankcut.load_model("tiny-llama")
    result = softrank(model, "lm", SoftRank(budget=0.5, method="svd", steps=4, batch_size=2, seqlen=32),
                      model_name="tiny-llama", progress=False)
    assert len(set(result.ranks.values())) > 1  # learned, so uneven
    rankcut.save(model, tmp_path / "c")
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "c")
    assert {n: m.rank for n, m in compressed_modules(back).items()} == \
        {n: r for n, r in result.ranks.items() if isinstance(r, int)}
    ids = sample_ids(model)
    assert torch.equal(output(back, ids), output(model, ids))


def test_dense_fallbacks_load_with_the_auto_class(tmp_path, monkeypatch):
    """`--speed` puts back dense the modules its clock finds slower factored (form "dense-fallback")."""
    import rankcut.speed.layouts as layouts

    model = _compressed("tiny-llama", "svd")
    # the clock here: every MLP module (intermediate size 160) slower factored, every attention one faster
    monkeypatch.setattr(layouts, "factored_to_dense_ratio",
                        lambda out_f, in_f, *a, **k: {1: 2.0} if in_f == 160 or out_f == 160 else {1: 0.5})
    fallback, _ = layouts.dense_fallback_(model, tokens=(1,), repeats=1)
    assert fallback and all(".mlp." in n for n in fallback)
    rankcut.save(model, tmp_path / "c")
    forms = {r["form"] for r in json.loads((tmp_path / "c" / "config.json").read_text())
             ["quantization_config"]["modules"].values()}
    assert forms == {"two-factor", "dense-fallback"}
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "c")
    assert all(type(back.get_submodule(n)) is nn.Linear for n in fallback)
    _same(back, rankcut.load(tmp_path / "c"), sample_ids(model))
    assert torch.equal(output(back, sample_ids(model)), output(model, sample_ids(model)))
