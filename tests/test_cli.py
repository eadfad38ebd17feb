import json

import pytest

from rankcut.cli import main


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("extra,message", [
    (["--rank", "100", "--allow-growth"], "larger than"),
    (["--rank", "40"], "allow-growth"),
    (["--keep", "1.5"], "outside (0, 1]"),
    (["--keep", "0.5", "--targets", "nothing_here"], "matches no module"),
    (["--keep", "0.5", "--layers", "9"], "past the last layer"),
    (["--keep", "0.5", "--targets", "lm_head"], "tied embeddings"),
    (["--keep", "0.5", "--method", "magic"], "unknown method"),
    (["--budget", "0.5", "--method", "whiten", "--staged"], "add --two-pass"),
    (["--budget", "0.5", "--method", "tucker"], "use --budget with --method svd"),
    (["--keep", "0.5", "--method", "whiten", "--staged", "--no-sequential"], "drop --no-sequential"),
    (["--keep", "0.5", "--anchor", "0.1"], "--anchor does not apply to --method svd"),
    (["--keep", "0.5", "--method", "fisher", "--shrink", "0.5"], "--shrink does not apply to --method fisher"),
    (["--budget", "0.5", "--method", "fisher", "--anchor", "0.1"], "add --two-pass"),
    (["--keep", "0.5", "--method", "kfac", "--shrink", "2"], "shrink 2.0 is outside [0, 1]"),
])
def test_bad_compress_input_is_one_line_and_writes_nothing(capsys, tmp_path, extra, message):
    out = tmp_path / "out"
    code, _, err = run(capsys, "compress", "tiny-llama", *extra, "--out", str(out))
    assert code == 2
    assert message in err and err.startswith("rankcut: error:") and err.count("\n") == 1
    assert not out.exists() and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("argv,message", [
    (["bench", "tiny-llama", "--batch", "0"], "--batch 0: give 1 or more"),
    (["bench", "tiny-llama", "--device", "gpu0"], "unknown device 'gpu0'; give auto, cpu, cuda or cuda:N"),
    (["bench", "tiny-llama", "--device", "mps"], "device 'mps' is not supported"),
    (["bench", "tiny-llama", "--seqlen", "-3"], "--seqlen -3: give 1 or more"),
    (["bench", "tiny-llama", "--repeats", "0"], "--repeats 0: give 1 or more"),
    (["bench", "tiny-llama", "--decode", "-2"], "--decode -2: give 0 or more"),
    (["bench", "tiny-gpt2", "--seqlen", "300"], "tiny-gpt2 has positions for 256 tokens; lower --seqlen"),
    (["bench", "tiny-gpt2", "--seqlen", "200", "--decode", "250"], "lower --decode (asked for 282)"),
    (["bench", "tiny-bert", "--seqlen", "32", "--decode", "4"], "tiny-bert is an encoder and does not generate"),
    (["bench", "tiny-llama", "--seqlen", "300", "--repeats", "1"], None),  # rotary: no position table
    (["eval", "tiny-llama", "--tasks", "wikitext2", "--seqlen", "0"], "--seqlen 0: give 1 or more"),
    (["eval", "tiny-llama", "--tasks", "arc_easy", "--limit", "-1"], "--limit -1: give 1 or more"),
    (["eval", "tiny-llama", "--tasks", "wikitext2", "--limit", "0"], "--limit 0: give 1 or more"),
    (["softrank", "tiny-gpt2", "--task", "lm", "--budget", "0.5", "--steps", "2", "--seqlen", "300", "--out", "x"],
     "--seqlen 300 is past the model's 256 positions"),
    (["softrank", "tiny-llama", "--budget", "0.5", "--distill", "-1", "--out", "x"], "--distill -1.0: give a weight"),
    (["heal", "x", "--hidden-distill", "-0.5", "--out", "y"], "--hidden-distill -0.5: give a weight"),
    (["heal", "x", "--task-weight", "0", "--distill", "0", "--out", "y"], "leaves nothing to train on"),
    (["heal", "x", "--distill-temperature", "0", "--out", "y"], "--distill-temperature 0.0: give a positive"),
])
def test_sizes_no_forward_can_run_are_one_line(capsys, argv, message):
    code, _, err = run(capsys, *argv)
    if message is None:
        assert code == 0, err
    else:
        assert code == 2 and message in err and err.count("\n") == 1


@pytest.mark.parametrize("extra,message", [
    (["--workers", "0"], "--workers 0"),
    (["--proxy-tokens", "1"], "--proxy-tokens 1: give 2 or more"),
    (["--limit", "-2", "--tasks", "arc_easy"], "--limit -2"),
])
def test_bad_sweep_sizes_fail_before_any_result_is_written(capsys, tmp_path, extra, message):
    space = tmp_path / "space.yaml"
    space.write_text("model: tiny-llama\nmethods: [svd]\nkinds: [q]\nranks: [2]\nmax_layers: 1\nmax_kinds: 1\n")
    results = tmp_path / "runs.jsonl"
    code, _, err = run(capsys, "sweep", "tiny-llama", "--space", str(space), "--results", str(results), *extra)
    assert code == 2 and message in err and err.count("\n") == 1
    assert not results.exists()


def test_unknown_model(capsys, tmp_path):
    code, _, err = run(capsys, "compress", "no-such-model", "--keep", "0.5", "--out", str(tmp_path / "o"))
    assert code == 2 and "unknown model 'no-such-model'" in err


def test_existing_output_needs_overwrite(capsys, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, _, err = run(capsys, "compress", "tiny-llama", "--keep", "0.5", "--out", str(out))
    assert code == 2 and "--overwrite" in err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    code, _, _ = run(capsys, "compress", "tiny-llama", "--keep", "0.5", "--out", str(out), "--overwrite")
    assert code == 0 and (out / "rankcut.json").is_file() and not (out / "keep.txt").exists()


def test_an_output_that_is_a_file_is_refused_even_with_overwrite(capsys, tmp_path):
    out = tmp_path / "notes.txt"
    out.write_text("mine")
    code, _, err = run(capsys, "compress", "tiny-llama", "--keep", "0.5", "--out", str(out), "--overwrite")
    assert code == 2 and "is a file, not a folder" in err
    assert out.read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_compress_then_info_shows_the_ranks(capsys, tmp_path):
    out = tmp_path / "t"
    code, stdout, _ = run(capsys, "compress", "tiny-gpt2", "--method", "tucker", "--rank", "8,4",
                          "--three-factor", "--targets", "up", "--layers", "0-1", "--out", str(out), "--json")
    assert code == 0
    summary = json.loads(stdout)
    assert summary["modules"] == 2 and summary["params_after"] < summary["params_before"]
    assert summary["peak_rss_mb"] >= summary["runtime_rss_mb"] > 0 and summary["peak_over_model"] >= 0
    code, stdout, _ = run(capsys, "info", str(out), "--json")
    info = json.loads(stdout)
    assert info["compressed"] and {r["name"]: r["rank"] for r in info["targets"]} == {
        "transformer.h.0.mlp.c_fc": [8, 4], "transformer.h.1.mlp.c_fc": [8, 4]}
    assert info["params"] == summary["params_after"]


def test_info_on_a_dense_model_lists_break_even_ranks(capsys):
    code, stdout, _ = run(capsys, "info", "tiny-bert", "--json")
    rows = json.loads(stdout)["targets"]
    assert code == 0
    assert {r["kind"] for r in rows if r["in_all_linear"]} == {
        "query", "key", "value", "attention-output", "intermediate", "output"}
    pooler = next(r for r in rows if r["name"] == "pooler.dense")
    assert not pooler["in_all_linear"] and pooler["break_even_rank"] == 32.0


def test_damaged_saved_folder(capsys, tmp_path):
    out = tmp_path / "t"
    assert run(capsys, "compress", "tiny-llama", "--keep", "0.5", "--out", str(out))[0] == 0
    (out / "model.safetensors").unlink()
    code, _, err = run(capsys, "info", str(out))
    assert code == 2 and "missing" in err and err.count("\n") == 1


def test_staged_two_pass_fisher_from_the_command_line(capsys, tmp_path):
    out = tmp_path / "k"
    code, _, err = run(capsys, "compress", "tiny-llama", "--method", "fisher", "--budget", "0.6", "--two-pass",
                       "--staged", "--calib", "gensim-news", "--calib-samples", "4",
                       "--calib-seqlen", "32", "--out", str(out))
    assert code == 0, err
    records = json.loads((out / "rankcut.json").read_text())["modules"]
    config = next(r["config"] for r in records.values() if r["form"] != "dense")
    assert config["calibration"]["staged"] is True


def test_compress_with_speed_records_layouts_and_fallback_and_loads_back(capsys, tmp_path):
    import torch

    import rankcut
    from rankcut.core.layout import is_column_major

    out = tmp_path / "fast"
    code, stdout, _ = run(capsys, "compress", "tiny-llama", "--keep", "0.5", "--speed", "--out", str(out), "--json")
    assert code == 0
    summary = json.loads(stdout)
    assert isinstance(summary["dense_fallback"], list) and isinstance(summary["column_major"], int)
    manifest = json.loads((out / "rankcut.json").read_text())
    recorded = {n: r["column_major"] for n, r in manifest["modules"].items() if "column_major" in r}
    assert len(recorded) == summary["column_major"]
    assert manifest["speed"]["layout_timings"]  # every factor shape was timed both ways
    model = rankcut.load(out)
    # the sizes printed are the saved model's, with any module put back dense counted again
    assert summary["params_after"] == rankcut.count_params(model) == manifest["params"]
    for name, factors in recorded.items():
        assert all(is_column_major(getattr(model.get_submodule(name), f)) for f in factors)
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=ids).logits).all()


@pytest.mark.parametrize("argv", [
    ["demo", "--model", "tiny-llama"],
    ["softrank", "tiny-llama", "--task", "lm", "--budget", "0.5", "--steps", "2", "--out", "{tmp}/s", "--checkpoint"],
    ["report", "{tmp}/runs.jsonl"],
])
def test_a_folder_holding_other_files_is_never_replaced(capsys, tmp_path, argv):
    """demo's --out, report's --out and a --checkpoint are replaced on a rerun, so a folder that
    holds anything they did not write is refused before any work (it would have been deleted)."""
    (tmp_path / "runs.jsonl").write_text(json.dumps({"key": "a", "kind": "config"}) + "\n")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    argv = [a.format(tmp=tmp_path) for a in argv]
    flag = [] if argv[-1] == "--checkpoint" else ["--out"]
    code, _, err = run(capsys, *argv, *flag, str(mine))
    assert code == 2 and "holds files rankcut did not write there (e.g. notes.txt)" in err
    assert [p.name for p in mine.iterdir()] == ["notes.txt"] and not (tmp_path / "s").exists()


def spy_on_oneshot(monkeypatch, module) -> list:
    """Record every call the command module makes to the library's one entry point."""
    import rankcut.compress.pipeline as pipeline

    calls = []

    def spy(*args, **kwargs):
        calls.append(args)
        return pipeline.oneshot(*args, **kwargs)

    monkeypatch.setattr(module, "oneshot", spy)
    return calls


def test_compress_is_a_thin_caller_of_oneshot(capsys, tmp_path, monkeypatch):
    import rankcut.cli.compress

    calls = spy_on_oneshot(monkeypatch, rankcut.cli.compress)
    assert main(["compress", "tiny-llama", "--keep", "0.5", "--out", str(tmp_path / "m"), "--json"]) == 0
    assert [c[0] for c in calls] == ["tiny-llama"]
    stages = json.loads(capsys.readouterr().out)["stage_seconds"]
    assert {k for k in stages if "." not in k} == {"load", "compress", "save"} and "compress.factorize" in stages


def test_demo_builds_both_forms_saves_them_and_reports_every_figure(capsys, tmp_path, monkeypatch):
    """The demo on a tiny model: the accurate (pivoted) and fast (timed) forms are both saved,
    reload to the same outputs, keep the budget where they should, and every figure is printed.
    Each form is built by the library's `oneshot`, not by a pipeline of the demo's own."""
    import rankcut
    import rankcut.cli.demo
    from rankcut.core.modules import count_params

    calls = spy_on_oneshot(monkeypatch, rankcut.cli.demo)

    out = tmp_path / "demo"
    (out / "accurate").mkdir(parents=True)  # an earlier demo's form is replaced whole
    (out / "accurate" / "stale.txt").write_text("old")
    assert main(["demo", "--model", "tiny-llama", "--out", str(out), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert [c[0] for c in calls] == ["tiny-llama", "tiny-llama"]
    assert sorted(p.name for p in out.iterdir()) == ["accurate", "fast"]
    dense = result["dense"]
    accurate, fast = result["variants"]["accurate"], result["variants"]["fast"]
    for name, v in result["variants"].items():
        assert v["reload_max_abs_diff"] == 0.0
        assert v["params"] == count_params(rankcut.load(out / name))
        assert v["params"] <= dense["params"]
        assert v["vs_dense"]["prefill_speedup"] > 0 and v["vs_dense"]["decode_speedup"] > 0
        assert v["perplexity"] > 1
    assert accurate["config"]["pivot"] is True and fast["config"]["pivot"] is False
    # the accurate form holds the budget; the fast one only grows by the modules it put back dense
    targeted = sum(m["dense_params"] for m in rankcut.record_of(rankcut.load(out / "accurate")).modules.values())
    kept = sum(m["params"] for m in rankcut.record_of(rankcut.load(out / "accurate")).modules.values())
    assert kept <= 0.8 * targeted * 1.01
    fast_modules = rankcut.record_of(rankcut.load(out / "fast")).modules
    assert sorted(n for n, m in fast_modules.items() if m.get("form") == "dense-fallback") == sorted(fast["dense_fallback"])


def test_softrank_takes_the_wikitext2_task_name_design_md_gives(capsys, tmp_path):
    """DESIGN.md writes `softrank MODEL --task wikitext2`; it is the same run as `--task lm`."""
    code, out, err = run(capsys, "softrank", "tiny-llama", "--task", "wikitext2", "--budget", "0.5", "--steps", "2",
                         "--seqlen", "32", "--batch-size", "2", "--out", str(tmp_path / "s"), "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["task"] == "wikitext2" and (tmp_path / "s" / "rankcut.json").exists()
    assert result["settings"]["distill_temperature"] == 2.0  # softrank's own default (its GLUE recipe)


@pytest.mark.parametrize("extra,temperature", [([], 1.0), (["--distill-temperature", "3"], 3.0)])
def test_heal_distils_at_its_own_default_temperature_unless_told(capsys, tmp_path, extra, temperature):
    import rankcut

    model = rankcut.load_model("tiny-llama")
    rankcut.compress_(model, rankcut.SVD(keep=0.5), progress=False)
    rankcut.save(model, tmp_path / "cut")
    code, out, err = run(capsys, "heal", str(tmp_path / "cut"), "--steps", "1", "--seqlen", "16", "--batch-size", "1",
                         *extra, "--out", str(tmp_path / "h"), "--json")
    assert code == 0, err
    assert json.loads(out)["settings"]["distill_temperature"] == temperature


def test_a_mistyped_folder_is_named_as_a_folder_not_sent_to_the_hub(capsys, tmp_path, monkeypatch):
    """`out/smol-svd` with `out/` present is a path with a typo: say so and list what is there,
    instead of asking the hub for an organisation called `out`."""
    import rankcut.io.models as models

    (tmp_path / "out" / "smol-svd2").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(models, "_hub_reachable", lambda: False)
    monkeypatch.setattr(models, "_load_pretrained_folder", lambda *a, **k: pytest.fail("asked the hub"))
    code, _, err = run(capsys, "info", "out/smol-svd")
    assert code == 2 and "folder out/smol-svd does not exist (out/ holds: smol-svd2)" in err

    def not_on_the_hub(*a, **k):  # online, the hub is asked first: `out` may be an organisation
        raise OSError("404")

    monkeypatch.setattr(models, "_hub_reachable", lambda: True)
    monkeypatch.setattr(models, "_load_pretrained_folder", not_on_the_hub)
    code, _, err = run(capsys, "info", "out/smol-svd")
    assert code == 2 and "does not exist (out/ holds: smol-svd2); nor is it on the hub" in err


def test_with_no_route_to_the_hub_only_the_local_cache_is_asked(capsys, monkeypatch):
    import rankcut.io.models as models

    asked = {}

    def cache_only(name, **kwargs):
        asked.update(kwargs)
        raise OSError("not in the cache")

    monkeypatch.setattr(models, "_hub_reachable", lambda: False)
    monkeypatch.setattr(models, "_load_pretrained_folder", cache_only)
    code, _, err = run(capsys, "info", "some-org/some-model")
    assert code == 2 and asked.get("local_files_only") is True
    assert "the hub is unreachable from here and the id is not in the local cache" in err and err.count("\n") == 1


@pytest.mark.parametrize("argv,message", [
    (["eval", "tiny-llama", "--tasks", "wikitext2", "--out", "{tmp}/folder"], "folder is a folder; give a file path"),
    (["eval", "tiny-llama", "--tasks", "wikitext2", "--out", "{tmp}/new/"], "new/ is a folder; give a file path"),
    (["eval", "tiny-llama", "--tasks", "wikitext2", "--out", "{tmp}/file.txt/r.json"], "file.txt is a file, not a folder"),
    (["sweep", "tiny-llama", "--space", "{tmp}/s.yaml", "--results", "{tmp}/folder"], "folder is a folder"),
    (["compress", "tiny-llama", "--keep", "0.5", "--out", "{tmp}/file.txt/cut"], "file.txt is a file, not a folder"),
])
def test_an_output_path_that_cannot_be_written_is_refused_before_any_work(capsys, tmp_path, argv, message):
    """These used to end, after the work, in IsADirectoryError or NotADirectoryError tracebacks."""
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "keep.txt").write_text("mine")
    (tmp_path / "file.txt").write_text("mine")
    before = sorted(p.name for p in tmp_path.rglob("*"))
    code, _, err = run(capsys, *[a.format(tmp=tmp_path) for a in argv])
    assert code == 2 and message in err and err.count("\n") == 1
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


def test_a_folder_that_refuses_new_files_is_named_before_any_work(capsys, tmp_path, monkeypatch):
    import tempfile

    def refuse(*a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "mkdtemp", refuse)
    code, _, err = run(capsys, "compress", "tiny-llama", "--keep", "0.5", "--out", str(tmp_path / "a" / "cut"))
    assert code == 2 and f"{tmp_path} refuses new files (Permission denied)" in err and not (tmp_path / "a").exists()


@pytest.mark.parametrize("argv,module,message", [
    (["report", "{tmp}/runs.jsonl", "--out", "{tmp}/rep"], "matplotlib", "rankcut report needs matplotlib: "
                                                                           "pip install 'rankcut[plot]'"),
    (["compress", "tiny-llama", "--method", "tucker", "--rank", "2", "--out", "{tmp}/t"], "tensorly",
     "--method tucker needs tensorly: pip install 'rankcut[tucker]'"),
    (["sweep", "tiny-llama", "--space", "{tmp}/s.yaml", "--results", "{tmp}/r.jsonl", "--executor", "ray"], "ray",
     "--executor ray needs ray: pip install 'rankcut[ray]'"),
    (["eval", "tiny-llama", "--tasks", "arc_easy", "--harness", "lm-eval"], "lm_eval",
     "--harness lm-eval needs lm_eval: pip install 'rankcut[lmeval]'"),
])
def test_a_missing_optional_dependency_is_named_with_its_extra_before_any_work(capsys, tmp_path, monkeypatch,
                                                                               argv, module, message):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == module else real(name, *a))
    (tmp_path / "runs.jsonl").write_text(json.dumps({"key": "a", "kind": "config"}) + "\n")
    code, _, err = run(capsys, *[a.format(tmp=tmp_path) for a in argv])
    assert code == 2 and message in err and err.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs.jsonl"]


def test_softrank_without_matplotlib_saves_the_model_and_says_how_to_get_the_plot(capsys, tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    code, out, err = run(capsys, "softrank", "tiny-llama", "--budget", "0.5", "--steps", "2", "--seqlen", "32",
                         "--batch-size", "2", "--out", str(tmp_path / "s"))
    assert code == 0, err
    assert "no ranks.png: pip install 'rankcut[plot]'" in out
    assert (tmp_path / "s" / "rankcut.json").exists() and not (tmp_path / "s" / "ranks.png").exists()


@pytest.mark.parametrize("policy,plotted", [(["--budget", "0.5"], True), (["--energy", "0.9"], True),
                                            (["--keep", "0.5"], False)])
def test_compress_plots_the_ranks_a_budget_or_energy_share_chose(capsys, tmp_path, policy, plotted):
    out = tmp_path / "cut"
    code, stdout, err = run(capsys, "compress", "tiny-llama", "--method", "svd", *policy, "--out", str(out), "--json")
    assert code == 0, err
    assert (out / "ranks.png").exists() is plotted and (json.loads(stdout)["ranks_plot"] is not None) is plotted
    import rankcut

    rankcut.load(out)  # the plot beside the weights does not trouble the loader


def test_rank_fraction_reads_every_form_a_manifest_records():
    from rankcut.compress.rank_plot import rank_fraction

    shape = {"out_features": 8, "in_features": 4}
    assert rank_fraction({**shape, "rank": 2}) == 0.5
    assert rank_fraction({**shape, "rank": [3, 2]}) == 0.75  # a Tucker pair: the larger bounds the rank
    assert rank_fraction({**shape, "rank": None}) == 1.0  # left or put back dense


def test_a_gpu_this_build_cannot_reach_is_one_line(capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, _, err = run(capsys, "bench", "tiny-llama", "--device", "cuda")
    assert code == 2 and "device 'cuda' is not available" in err and "--device cpu" in err
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    code, _, err = run(capsys, "bench", "tiny-llama", "--device", "cuda:3")
    assert code == 2 and "1 GPU(s) are visible (cuda:0 to cuda:0)" in err


def test_compress_dtype_stores_the_model_in_that_precision(capsys, tmp_path):
    import torch

    import rankcut

    argv = ["compress", "tiny-llama", "--method", "whiten", "--keep", "0.5", "--calib-samples", "8",
            "--calib-seqlen", "64", "--json"]
    assert main([*argv, "--out", str(tmp_path / "f32")]) == 0
    f32 = json.loads(capsys.readouterr().out)
    assert main([*argv, "--dtype", "bfloat16", "--out", str(tmp_path / "bf16")]) == 0
    bf16 = json.loads(capsys.readouterr().out)
    assert bf16["dtype"] == "bfloat16" and bf16["bytes_after"] * 2 == f32["bytes_after"]
    assert bf16["params_after"] == f32["params_after"]
    full, half = rankcut.load(tmp_path / "f32"), rankcut.load(tmp_path / "bf16")
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    assert main(["info", str(tmp_path / "bf16")]) == 0
    assert "MiB (bfloat16)" in capsys.readouterr().out.splitlines()[0]
    ids = torch.randint(0, 250, (2, 24))
    with torch.no_grad():
        ref, out = full(input_ids=ids).logits, half(input_ids=ids).logits.float()
    assert 0 < (out - ref).norm() / ref.norm() < 3e-2  # rounded once, not a different model


def test_bench_says_when_two_precisions_are_compared_and_dtype_casts_both(capsys, tmp_path):
    cut = tmp_path / "half"
    assert main(["compress", "tiny-llama", "--method", "svd", "--keep", "0.5", "--dtype", "bfloat16",
                 "--out", str(cut), "--json"]) == 0
    capsys.readouterr()
    bench = ["bench", "tiny-llama", "--vs", str(cut), "--seqlen", "16", "--repeats", "1"]
    assert main(bench) == 0
    assert "runs in bfloat16 and tiny-llama in float32: the ratio mixes" in capsys.readouterr().out
    assert main([*bench, "--dtype", "bfloat16", "--json"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert {m["dtype"] for m in payload["models"].values()} == {"bfloat16"}
    assert payload["models"]["tiny-llama"]["bytes"] == 2 * payload["models"]["tiny-llama"]["params"]  # the dense one cast
    assert main([*bench, "--dtype", "bfloat16"]) == 0
    assert "the ratio mixes" not in capsys.readouterr().out


def test_compress_cuts_blocks_and_the_tied_embedding_with_the_curvature_method(capsys, tmp_path):
    code, out, _ = run(capsys, "compress", "tiny-llama", "--method", "kfac", "--budget", "0.5", "--shrink", "0.5",
                       "--targets", "all-linear,embed", "--calib-samples", "4", "--calib-seqlen", "64",
                       "--out", str(tmp_path / "m"), "--json")
    assert code == 0
    payload = json.loads(out)
    assert payload["config"]["method"] == "kfac" and payload["config"]["shrink"] == 0.5
    assert payload["ratio"] < 0.55
    manifest = json.loads((tmp_path / "m" / "rankcut.json").read_text())
    assert manifest["modules"]["model.embed_tokens"]["form"] == "embedding"
    assert manifest["modules"]["lm_head"]["tied_to"] == "model.embed_tokens"
