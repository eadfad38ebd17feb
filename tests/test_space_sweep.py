import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

import rankcut
from rankcut.compress.factor_cache import FactorCache
from rankcut.core.errors import RankcutError
from rankcut.study.space import Configuration, ModelShape, Space, non_adjacent
from rankcut.study.sweep import ResultsFile, applied, build_context


@pytest.fixture(scope="module")
def llama():
    return rankcut.load_model("tiny-llama")


def test_exact_size_matches_the_built_model(llama):
    shape = ModelShape.of(llama)
    for config in [Configuration("svd", (1, 3), ("q", "down"), 4), Configuration("svd", (0,), ("gate",), 0.5),
                   Configuration("tucker", (2,), ("o",), (3, 5))]:
        model = rankcut.load_model("tiny-llama")
        cls = rankcut.Tucker if config.method == "tucker" else rankcut.SVD
        from rankcut.study.space import module_rank
        overrides = {f"^{t.name}$": cls(rank=module_rank(t, config.rank), three_factor=True)
                     if config.method == "tucker" else cls(rank=module_rank(t, config.rank))
                     for t in shape.selected(config)}
        rankcut.compress_(model, cls(rank=1), overrides=overrides, targets="|".join(overrides), progress=False)
        assert rankcut.count_params(model) == shape.size(config)


def test_space_count_enumeration_and_sampling(llama):
    shape = ModelShape.of(llama)
    space = Space.from_dict({"model": "tiny-llama", "layers": [0, 1, 2], "kinds": ["q", "k"], "ranks": [1, 2]}, shape)
    assert space.count() == 7 * 3 * 2
    configs = list(space.enumerate())
    assert len(configs) == space.count() == len({c.key() for c in configs})
    cells = Space.from_dict({"model": "tiny-llama", "ranks": [1], "max_layers": 1, "max_kinds": 1}, shape)
    assert cells.count() == 4 * 7 == len(list(cells.enumerate()))
    heur = Space.from_dict({"model": "tiny-llama", "ranks": [1], "sampler": "heuristic", "samples": 10,
                            "skip_early": 1, "seed": 3}, shape).sample()
    # layers 1-3, never two adjacent: exactly {1}, {2}, {3}, {1, 3} exist
    assert sorted(c.layers for c in heur) == [(1,), (1, 3), (2,), (3,)]
    for c in heur:
        assert min(c.layers) >= 1 and non_adjacent(c.layers) == list(c.layers) and len(c.kinds) == 7
    again = Space.from_dict({"model": "tiny-llama", "ranks": [1], "sampler": "heuristic", "samples": 10,
                             "skip_early": 1, "seed": 3}, shape).sample()
    assert [c.key() for c in again] == [c.key() for c in heur]


@pytest.mark.parametrize("raw,message", [
    ({"kinds": ["q", "zz"]}, "unknown kind 'zz'"),
    ({"ranks": [60]}, "break-even"),
    ({"layers": []}, "empty"),
    ({"ranks": [1.5]}, "outside"),
    ({"bogus": 1}, "unknown field"),
    ({"ranks": [-2]}, "rank -2: give a positive integer"),  # once sliced the SVD silently: the dense map
    ({"ranks": [[2, 0]]}, r"rank \(2, 0\)"),
    ({"ranks": ["abc"]}, "rank 'abc'"),
])
def test_bad_space_fails_before_any_work(llama, raw, message):
    with pytest.raises(RankcutError, match=message):
        Space.from_dict({"model": "tiny-llama", **raw}, ModelShape.of(llama))


def test_cached_truncation_equals_direct_compression(llama, tmp_path):
    ids = rankcut.get_tokenizer(llama)("the cache must not change the answer", return_tensors="pt").input_ids
    cache = FactorCache(llama, "tiny-llama", "svd", tmp_path)
    assert cache.file.is_file()
    config = Configuration("svd", (1, 2), ("q", "up"), 5)
    shape = ModelShape.of(llama)
    with torch.no_grad():
        dense = llama(input_ids=ids).logits
        with applied(llama, shape, config, cache):
            cached = llama(input_ids=ids).logits
        restored = llama(input_ids=ids).logits
    direct = rankcut.load_model("tiny-llama")
    rankcut.compress_(direct, rankcut.SVD(rank=5), targets="q,up", layers="1-2", progress=False)
    with torch.no_grad():
        assert torch.allclose(cached, direct(input_ids=ids).logits, atol=1e-5)
    assert torch.equal(restored, dense)
    reread = FactorCache(llama, "tiny-llama", "svd", tmp_path)  # from disk this time
    assert all(torch.equal(reread.factors[n][0], cache.factors[n][0]) for n in cache.factors)


def test_proxy_is_zero_for_the_dense_model_and_grows_with_damage(llama, tmp_path):
    ids = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))
    ctx = build_context(llama, "tiny-llama", ["svd"], ids, cache_dir=tmp_path, progress=False)
    assert ctx.proxy(llama)["kl"] == pytest.approx(0.0, abs=1e-6)
    kls = []
    for rank in (16, 8, 1):
        with applied(llama, ctx.shape, Configuration("svd", (0, 1, 2, 3), ("gate", "up", "down"), rank), ctx.caches["svd"]):
            kls.append(ctx.proxy(llama)["kl"])
    assert 0 < kls[0] < kls[1] < kls[2]


def test_results_file_skips_duplicates_and_repairs_a_torn_line(tmp_path):
    results = ResultsFile(tmp_path / "r.jsonl")
    assert results.append({"key": "a", "v": 1}) and not results.append({"key": "a", "v": 2})
    with open(results.path, "a") as fh:
        fh.write('{"key": "b", "v"')  # a writer killed mid-line
    assert results.keys() == {"a"}
    assert results.append({"key": "c", "v": 3})
    assert [r["key"] for r in results.rows()] == ["a", "c"]


SWEEP_SCRIPT = textwrap.dedent("""
    import sys, time, torch, rankcut
    from rankcut.study.space import Space, ModelShape
    from rankcut.study.sweep import ResultsFile, build_context, run_local
    model = rankcut.load_model("tiny-llama")
    shape = ModelShape.of(model)
    space = Space.from_dict({"model": "tiny-llama", "methods": ["svd"], "layers": [0, 1], "kinds": ["q", "up"],
                             "ranks": [1, 4]}, shape)
    ids = torch.randint(0, 256, (1, 32), generator=torch.Generator().manual_seed(0))
    ctx = build_context(model, "tiny-llama", ["svd"], ids, cache_dir=sys.argv[2], progress=False)
    slow = float(sys.argv[3])
    def pause(row):
        time.sleep(slow)
    run_local(ctx, space.sample(), ResultsFile(sys.argv[1]), progress=False, after_each=pause)
""")


def test_killed_sweep_resumes_to_exactly_the_uninterrupted_rows(tmp_path):
    script = tmp_path / "sweep.py"
    script.write_text(SWEEP_SCRIPT)
    env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error"}
    full = tmp_path / "full.jsonl"
    subprocess.run([sys.executable, str(script), str(full), str(tmp_path / "c"), "0"], check=True, env=env)
    killed = tmp_path / "killed.jsonl"
    proc = subprocess.Popen([sys.executable, str(script), str(killed), str(tmp_path / "c"), "0.2"], env=env)
    deadline = time.time() + 120
    while time.time() < deadline and (not killed.exists() or len(killed.read_text().splitlines()) < 3):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = len(ResultsFile(killed).rows())
    subprocess.run([sys.executable, str(script), str(killed), str(tmp_path / "c"), "0"], check=True, env=env)
    strip = lambda rows: sorted((r["key"], r["params"], round(r["proxy"]["kl"], 6)) for r in rows)  # noqa: E731
    a, b = ResultsFile(full).rows(), ResultsFile(killed).rows()
    assert 3 <= partial < len(a) == 3 * 3 * 2
    assert strip(a) == strip(b) and len({r["key"] for r in b}) == len(b)


def test_sweep_and_report_from_the_command_line(tmp_path, capsys, monkeypatch):
    from rankcut.cli import main

    monkeypatch.setenv("RANKCUT_CACHE", str(tmp_path / "cache"))
    space = tmp_path / "space.yaml"
    space.write_text("model: tiny-llama\nmethods: [svd]\nlayers: [0-3]\nkinds: [q, up]\nranks: [1]\n"
                     "max_layers: 1\n")
    results = tmp_path / "runs.jsonl"
    args = ["sweep", "tiny-llama", "--space", str(space), "--results", str(results), "--proxy-tokens", "64",
            "--tasks", "arc_easy", "--limit", "4", "--baselines", "--baseline-method", "svd", "--json"]
    assert main(args) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["configurations"] == doc["space_size"] == 4 * 3 and doc["written"] == 12
    rows = ResultsFile(results).rows()
    front = [r for r in rows if r["kind"] == "front"]
    assert sum(r["config"] is not None for r in front) >= 1 and any(r["config"] is None for r in front)
    configs = {r["params"] for r in front if r["config"] is not None}
    by_baseline = [r for r in front if r.get("baseline")]  # baselines benchmarked at the front's sizes
    assert by_baseline and all(r["params"] <= max(configs) for r in by_baseline)
    assert all("acc_norm" in r["tasks"]["arc_easy"] for r in front)
    timing = {r["front_key"]: r for r in rows if r["kind"] == "timing"}  # every benchmarked cut, against dense
    assert set(timing) == {r["key"] for r in front if r["config"] is not None or r.get("baseline")}
    assert all(t["prefill_ms"] > 0 and t["dense_prefill_ms"] > 0 for t in timing.values())
    assert all(t["prefill_speedup"] == pytest.approx(t["dense_prefill_ms"] / t["prefill_ms"]) for t in timing.values())
    assert main(args) == 0 and json.loads(capsys.readouterr().out)["written"] == 0  # resumed: nothing new
    assert ResultsFile(results).rows() == rows
    # a sweep benchmarked before timings were paired gets them on a rerun, and nothing else
    results.write_text("".join(json.dumps(r) + "\n" for r in rows if r["kind"] != "timing"))
    assert main(args) == 0
    again = ResultsFile(results).rows()
    assert [r for r in again if r["kind"] != "timing"] == [r for r in rows if r["kind"] != "timing"]
    assert {r["front_key"] for r in again if r["kind"] == "timing"} == set(timing)
    capsys.readouterr()
    assert main(["report", str(results), "--out", str(tmp_path / "rep")]) == 0
    assert {p.name for p in (tmp_path / "rep").iterdir()} >= {"table.md", "pareto.png", "sensitivity.png"}
    table = (tmp_path / "rep" / "table.md").read_text()
    assert "Pareto front" in table and "each model timed in turn with dense" in table
    assert "| 1.00× |" in table  # the dense row


def test_front_timing_alternates_the_cut_and_dense_model(llama, tmp_path, monkeypatch):
    """Each timed forward of the cut is followed by one of dense, so a change in the machine's load
    falls on both; the swaps happen outside the clock."""
    import contextlib

    import rankcut.study.sweep as sweep

    states = []
    applied_now = [False]

    @contextlib.contextmanager
    def marked(ctx, row):
        applied_now[0] = True
        try:
            yield
        finally:
            applied_now[0] = False

    monkeypatch.setattr(sweep, "_applied_row", marked)
    ctx = sweep.build_context(llama, "tiny-llama", ["svd"], sweep.proxy_ids(llama, 64), cache_dir=tmp_path,
                              progress=False)
    ctx.model.register_forward_pre_hook(lambda m, a: states.append(applied_now[0]))
    compressed_ms, dense_ms = sweep.paired_prefill_ms(ctx, {"key": "k"}, repeats=3)
    assert states == [True, False] * 4 and compressed_ms > 0 and dense_ms > 0


def test_report_of_a_sweep_timed_before_pairing_says_its_timings_are_one_off(tmp_path):
    from rankcut.study.report import write_report

    results = ResultsFile(tmp_path / "r.jsonl")
    config = {"method": "svd", "layers": [0], "kinds": ["q"], "rank": 1}
    results.append({"key": "c", "kind": "config", "config": config, "params": 90, "dense_params": 100,
                    "proxy": {"kl": 0.1, "perplexity": 2.0}})
    results.append({"key": "front|dense", "kind": "front", "config": None, "params": 100,
                    "tasks": {"arc_easy": {"acc": 0.5}}, "prefill_ms": 10.0})
    results.append({"key": "front|c", "kind": "front", "config": config, "params": 90,
                    "proxy": {"kl": 0.1, "perplexity": 2.0}, "tasks": {"arc_easy": {"acc": 0.4}}, "prefill_ms": 12.0})
    write_report(results.path, tmp_path / "rep")
    table = (tmp_path / "rep" / "table.md").read_text()
    assert "one-off timings of each model alone, not paired with dense" in table and "×" not in table


def test_a_damaged_results_line_names_its_place(tmp_path):
    results = ResultsFile(tmp_path / "r.jsonl")
    results.append({"key": "a"})
    with open(results.path, "a") as fh:
        fh.write("not json\n[1]\n")
    with pytest.raises(RankcutError, match="result 2 is not a JSON row"):
        results.rows()


@pytest.mark.parametrize("text,message", [("model: [unclosed\n", "is not valid YAML"),
                                          ("[1, 2]\n", "give a mapping of fields"),  # was a TypeError
                                          ("just words\n", "give a mapping of fields")])
def test_unparsable_space_yaml_is_one_line(tmp_path, capsys, text, message):
    from rankcut.cli import main

    space = tmp_path / "space.yaml"
    space.write_text(text)
    code = main(["sweep", "tiny-llama", "--space", str(space), "--results", str(tmp_path / "r.jsonl")])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1
    assert not (tmp_path / "r.jsonl").exists()


def test_bad_space_file_from_the_command_line(tmp_path, capsys):
    from rankcut.cli import main

    space = tmp_path / "space.yaml"
    space.write_text("model: tiny-llama\nkinds: [q, nonsense]\n")
    code = main(["sweep", "tiny-llama", "--space", str(space), "--results", str(tmp_path / "r.jsonl")])
    assert code == 2 and "unknown kind 'nonsense'" in capsys.readouterr().err
    assert not (tmp_path / "r.jsonl").exists()


def test_baselines_at_the_same_sizes(llama, tmp_path):
    from rankcut.study.sweep import budget_ranks, dropped, run_baselines

    ids = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(1))
    ctx = build_context(llama, "tiny-llama", ["svd"], ids, cache_dir=tmp_path, progress=False)
    before = llama(input_ids=ids).logits
    with dropped(llama, [1, 2]):
        assert not torch.equal(llama(input_ids=ids).logits, before)
    assert torch.equal(llama(input_ids=ids).logits, before)  # restored
    target = ctx.shape.total_params - 40_000
    ranks = budget_ranks(ctx.caches["svd"], ctx.shape, target)
    from rankcut.core.ranks import factor_params
    kept = sum(factor_params(t.out_features, t.in_features, ranks[t.name]) if t.name in ranks else t.params
               for t in ctx.shape.targets)  # a module left out stays dense
    assert ctx.shape.total_params - sum(t.params for t in ctx.shape.targets) + kept <= target
    results = ResultsFile(tmp_path / "b.jsonl")
    run_baselines(ctx, [target], results, "svd", progress=False)
    rows = results.rows()
    assert sum(r["key"].startswith("baseline|drop|L") for r in rows) >= 4  # every single layer, then the set
    budget = [r for r in rows if r["baseline"] == "budget-svd"]
    assert len(budget) == 1 and budget[0]["params"] <= target
    assert run_baselines(ctx, [target], results, "svd", progress=False) == 0  # resumes, no duplicates


def test_ray_executor_writes_the_rows_of_the_local_executor(tmp_path):
    ray = pytest.importorskip("ray")
    from rankcut.study.sweep import SweepSpec, context_from_spec, run_local, run_ray

    spec = SweepSpec(model="tiny-llama", methods=["svd"], proxy_tokens=64, cache_dir=str(tmp_path / "c"))
    ctx = context_from_spec(spec)  # builds the factor cache the Ray workers read
    space = Space.from_dict({"model": "tiny-llama", "methods": ["svd"], "layers": ["0-3"], "kinds": ["q", "up"],
                             "ranks": [1, 2], "max_layers": 1}, ctx.shape)
    configs = list(space.sample())
    local, remote = ResultsFile(tmp_path / "local.jsonl"), ResultsFile(tmp_path / "ray.jsonl")
    run_local(ctx, configs, local, progress=False)
    try:
        assert run_ray(spec, configs, remote, workers=2, progress=False) == len(configs)
        assert run_ray(spec, configs, remote, workers=2, progress=False) == 0  # resumed: nothing new
    finally:
        ray.shutdown()
    strip = lambda rows: sorted((r["key"], r["params"], round(r["proxy"]["kl"], 6)) for r in rows)  # noqa: E731
    assert strip(local.rows()) == strip(remote.rows())


def test_greedy_sampler_grows_the_cut_least_sensitive_first(llama, tmp_path, capsys, monkeypatch):
    from rankcut.cli import main

    monkeypatch.setenv("RANKCUT_CACHE", str(tmp_path / "cache"))
    space = tmp_path / "space.yaml"
    space.write_text("model: tiny-llama\nmethods: [svd]\nlayers: [1-3]\nkinds: [q, v, up]\nranks: [1]\n"
                     "sampler: greedy\nsamples: 4\n")
    results = tmp_path / "runs.jsonl"
    args = ["sweep", "tiny-llama", "--space", str(space), "--results", str(results), "--proxy-tokens", "64", "--json"]
    assert main(args) == 0
    assert json.loads(capsys.readouterr().out)["written"] == 9 + 4
    rows = ResultsFile(results).rows()
    singles = sorted((r for r in rows if "cells" not in r["config"]), key=lambda r: r["proxy"]["kl"])
    cuts = [r for r in rows if "cells" in r["config"]]
    assert [len(r["config"]["cells"]) for r in cuts] == [2, 3, 4, 5]
    first = {(r["config"]["layers"][0], r["config"]["kinds"][0]) for r in singles[:2]}
    assert {tuple(c) for c in cuts[0]["config"]["cells"]} == first
    assert all(a["params"] > b["params"] for a, b in zip(cuts, cuts[1:]))  # each step cuts more
    shape = ModelShape.of(llama)
    cache = FactorCache(llama, "tiny-llama", "svd", tmp_path / "cache" / "factors", progress=False)
    config = Configuration.from_dict(cuts[-1]["config"])
    with applied(llama, shape, config, cache):
        assert rankcut.count_params(llama) == shape.size(config) == cuts[-1]["params"]
    assert main(args) == 0 and json.loads(capsys.readouterr().out)["written"] == 0  # resumed
