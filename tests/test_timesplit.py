"""The time split of `rankcut bench --breakdown`: targeted maps timed apart from the rest."""

import json
import time

import pytest
import torch

import rankcut
from rankcut.cli import main
from rankcut.core.errors import RankcutError
from rankcut.core.layers import LowRankLinear
from rankcut.speed.timesplit import (
    Split,
    SplitComparison,
    compare_splits,
    head_name,
    target_kinds,
    target_names,
    time_split,
)


def _cut(name: str = "tiny-llama", keep: float = 0.5) -> tuple[torch.nn.Module, torch.nn.Module]:
    dense, compressed = rankcut.load_model(name).eval(), rankcut.load_model(name).eval()
    rankcut.compress_(compressed, rankcut.SVD(keep=keep), progress=False)
    return dense, compressed


def _slowed(module: torch.nn.Module, seconds: float) -> None:
    forward = module.forward

    def slow(*args, **kwargs):
        time.sleep(seconds)
        return forward(*args, **kwargs)

    module.forward = slow


def test_time_inside_a_target_counts_as_target_time_and_the_rest_as_rest():
    _, model = _cut()
    names = target_names(rankcut.load_model("tiny-llama"), model)
    ids = torch.randint(0, model.config.vocab_size, (1, 8))
    modules = dict(model.named_modules())
    _slowed(modules[names[0]], 0.2)  # a factored module
    _slowed(model.model.norm, 0.5)  # the final norm: not a target
    _slowed(model.lm_head, 0.3)  # the head: not a target, clocked apart within the rest
    kinds = target_kinds(names)
    with torch.no_grad():
        split = time_split(model, names, lambda: model(input_ids=ids), kinds, head_name(model, names))
    assert 0.2 <= split.targets_s < 0.5  # the other targets of a tiny model take milliseconds
    assert 0.3 <= split.head_s < 0.5
    assert split.rest_s >= 0.8
    assert set(split.by_kind) == {"q", "k", "v", "o", "gate", "up", "down"}
    assert sum(split.by_kind.values()) == pytest.approx(split.targets_s)
    slowed_kind = kinds[names[0]]
    assert split.by_kind[slowed_kind] >= 0.2 > max(v for k, v in split.by_kind.items() if k != slowed_kind)
    assert split.total_s == pytest.approx(split.targets_s + split.rest_s)


def test_a_decoding_split_clocks_only_what_follows_the_prompts_forward():
    dense, _ = _cut()
    names = target_names(dense, dense)
    ids = torch.randint(0, dense.config.vocab_size, (1, 8))
    calls = []

    def slow_prompt(module, args, kwargs):  # only the first forward (the prompt's) is slow
        if not calls:
            time.sleep(0.3)
        calls.append(1)

    handle = dense.register_forward_pre_hook(slow_prompt, with_kwargs=True)
    with torch.no_grad():
        split = time_split(dense, names, lambda: dense.generate(ids, max_new_tokens=4, min_new_tokens=4,
                                                                do_sample=False, pad_token_id=0),
                           after_first_forward=True)
    handle.remove()
    assert len(calls) == 4  # the prompt's forward and three steps
    assert 0 < split.targets_s < split.total_s < 0.3
    assert not dense._forward_hooks


def test_hooks_are_removed_even_when_the_workload_fails():
    _, model = _cut()
    names = target_names(rankcut.load_model("tiny-llama"), model)

    def boom():
        raise ValueError("boom")

    with pytest.raises(ValueError):
        time_split(model, names, boom)
    for module in model.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks
        assert "_rankcut_t0" not in module.__dict__


def test_ceiling_is_amdahls_law_with_the_targets_at_their_parameter_ratio():
    dense, compressed = Split(total_s=10.0, targets_s=6.0), Split(total_s=7.5, targets_s=3.5)
    s = SplitComparison("w", dense, compressed, targets=3, targets_param_ratio=0.5)
    assert s.ceiling == pytest.approx(10.0 / (4.0 + 3.0))
    assert s.speedup == pytest.approx(10.0 / 7.5)
    assert s.targets_speedup == pytest.approx(6.0 / 3.5) and s.rest_speedup == pytest.approx(1.0)
    assert s.targets_efficiency == pytest.approx(6.0 / 3.5 * 0.5)
    # at ratio 1 (nothing cut) the ceiling is no speed-up at all
    assert SplitComparison("w", dense, dense, 3, 1.0).ceiling == pytest.approx(1.0)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])  # GPT-2's maps have biases: not multiplied
def test_compare_splits_on_a_compressed_model_and_its_source(name):
    dense, compressed = _cut(name)
    ids = torch.randint(0, dense.config.vocab_size, (1, 16))
    prefill, decode = compare_splits(dense, compressed, ids, decode=3, prompt=ids[:, :4], repeats=2)
    factored = [m for m in compressed.modules() if isinstance(m, LowRankLinear)]
    assert prefill.targets == decode.targets == len(factored)
    dense_params = sum(m.out_features * m.in_features for m in factored)
    factored_params = sum(m.rank * (m.out_features + m.in_features) for m in factored)
    assert prefill.targets_param_ratio == pytest.approx(factored_params / dense_params)
    by_kind = prefill.by_kind()
    assert sum(k["dense_s"] for k in by_kind.values()) == pytest.approx(prefill.dense.targets_s)
    assert all(0 < k["param_ratio"] < 1 for k in by_kind.values())
    for split in (prefill.dense, prefill.compressed):
        assert 0 < split.targets_s < split.total_s
    for split in (decode.dense, decode.compressed):
        assert 0 < split.targets_s < split.total_s
    assert prefill.ceiling > 1.0
    for split in (prefill.dense, prefill.compressed):  # the head is timed, inside the rest
        assert 0 < split.head_s < split.rest_s
    assert "decode step (3 new tokens after 4)" == decode.workload


def test_a_model_of_another_architecture_is_refused_with_the_fix():
    _, compressed = _cut("tiny-gpt2")
    with pytest.raises(RankcutError, match="cut from"):
        target_names(rankcut.load_model("tiny-llama"), compressed)


def test_cli_breakdown_prints_the_split_and_needs_vs(capsys, tmp_path):
    out = tmp_path / "c"
    assert main(["compress", "tiny-llama", "--keep", "0.5", "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["bench", "tiny-llama", "--vs", str(out), "--seqlen", "16", "--repeats", "2", "--decode", "3",
                 "--breakdown", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [b["workload"] for b in doc["breakdown"]] == ["prefill 1×16", "decode step (3 new tokens after 16)"]
    prefill = doc["breakdown"][0]
    assert set(prefill["by_kind"]) == {"q", "k", "v", "o", "gate", "up", "down"}
    assert 0 < prefill["dense"]["targets_s"] < prefill["dense"]["total_s"]
    assert prefill["ceiling"] == pytest.approx(prefill["dense"]["total_s"] / (
        prefill["dense"]["rest_s"] + prefill["dense"]["targets_s"] * prefill["targets_param_ratio"]))
    assert main(["bench", "tiny-llama", "--vs", str(out), "--seqlen", "16", "--repeats", "1", "--breakdown"]) == 0
    assert "ceiling:" in capsys.readouterr().out
    assert main(["bench", "tiny-llama", "--breakdown"]) == 2
    assert "--vs" in capsys.readouterr().err
    assert main(["bench", "tiny-llama", "--vs", str(out), "--seqlen", "16", "--repeats", "1", "--decode", "1",
                 "--breakdown"]) == 2
    assert "--decode 2 or more" in capsys.readouterr().err
