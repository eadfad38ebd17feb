"""Speed limits: the highest rank faster than dense, and a budget allocated under them."""

import json

import pytest
import torch

import rankcut
import rankcut.compress.pipeline
import rankcut.speed.limits as speedlimits
from rankcut.cli import main
from rankcut.core.errors import RankcutError
from rankcut.core.ranks import allocate_targets, factor_params, shape_key, size_limit
from rankcut.core.targets import select_targets

from .conftest import output, rel_err, sample_ids


def fake_ratio(slope_rank: int, calls: list | None = None):
    """A stand-in for the timing: the factored map takes rank/slope_rank of dense's time at every
    token count, so the highest faster rank is slope_rank − 1 (time grows with the rank, as it
    does on a real machine; the bisection relies on nothing else)."""
    def ratio(out_features, in_features, rank, tokens, *args, **kwargs):
        if calls is not None:
            calls.append(rank)
        return {t: rank / slope_rank for t in tokens}
    return ratio


@pytest.mark.parametrize("slope_rank,expected", [(30, 29), (1, 0), (10_000, size_limit(64, 160))])
def test_speed_limit_finds_the_highest_faster_rank(monkeypatch, slope_rank, expected):
    calls: list = []
    monkeypatch.setattr(speedlimits, "factored_to_dense_ratio", fake_ratio(slope_rank, calls))
    limit, timed = speedlimits.speed_limit(64, 160, (1, 512))
    assert limit == expected
    assert all((r < slope_rank) == (timed[r] < 1.0) for r in timed)
    assert len(calls) <= 2 + size_limit(64, 160).bit_length()  # a bisection, not a scan


def test_size_limit_is_the_highest_rank_smaller_than_dense():
    for m, n in [(576, 1536), (64, 64), (192, 576), (7, 3)]:
        r = size_limit(m, n)
        assert factor_params(m, n, r) < m * n
        assert factor_params(m, n, r + 2) >= m * n  # r + 1 is the allocation's cap: dense from there
        assert size_limit(m, n, pivot=True) == min(m, n) - 1


class _T:
    def __init__(self, name, m, n):
        self.name, self.out_features, self.in_features = name, m, n


def test_allocation_under_limits_keeps_every_module_under_its_limit_or_dense():
    torch.manual_seed(0)
    targets = [_T(f"a{i}", 96, 96) for i in range(4)] + [_T(f"b{i}", 96, 256) for i in range(4)]
    worths = {t.name: torch.rand(min(t.out_features, t.in_features)).sort(descending=True).values * (i + 1)
              for i, t in enumerate(targets)}
    limits = {"96x96": 20, "96x256": 50}
    total = sum(t.out_features * t.in_features for t in targets)
    for budget in (0.3, 0.5, 0.8):
        ranks = allocate_targets(targets, worths, int(budget * total), limits=limits)
        spent = 0
        for t in targets:
            cap = limits[shape_key(t.out_features, t.in_features)] + 1
            assert ranks[t.name] <= cap
            spent += t.out_features * t.in_features if ranks[t.name] == cap else factor_params(
                t.out_features, t.in_features, ranks[t.name])
        assert spent <= budget * total


def test_a_shape_never_faster_stays_dense_or_the_budget_says_it_cannot():
    targets = [_T("a", 64, 64), _T("b", 64, 256)]
    worths = {t.name: torch.linspace(1, 0.01, 64) for t in targets}
    ranks = allocate_targets(targets, worths, 4096 + 8000, limits={"64x64": 0, "64x256": 60})
    assert ranks["a"] == 1  # its cap: kept dense, 4,096 parameters taken off the top
    assert factor_params(64, 256, ranks["b"]) <= 8000 and ranks["b"] <= 60
    with pytest.raises(RankcutError, match="run no faster factored than dense here.*raise --budget"):
        allocate_targets(targets, worths, 4000, limits={"64x64": 0, "64x256": 60})


@pytest.mark.parametrize("limits,message", [
    ({"64x64": -1}, "an integer ≥ 0"),
    ({"64by64": 3}, "OUTxIN"),
    ({"64x64": 2.5}, "an integer ≥ 0"),
    ([("64x64", 3)], "maps a shape"),
])
def test_bad_limits_are_refused_by_the_config(limits, message):
    with pytest.raises(RankcutError, match=message):
        rankcut.SVD(budget=0.5, speed_limits=limits)


def test_limits_without_a_budget_are_refused():
    with pytest.raises(RankcutError, match="give budget=F"):
        rankcut.SVD(keep=0.5, speed_limits={"64x64": 3})


def test_a_missing_shape_is_refused_before_any_module_is_swapped():
    model = rankcut.load_model("tiny-llama")
    with pytest.raises(RankcutError, match="no entry for .* shape 160x64.*rankcut.speed_limits"):
        rankcut.compress_(model, rankcut.SVD(budget=0.6, speed_limits={"64x64": 10, "32x64": 5, "64x160": 9}),
                          progress=False)
    assert not rankcut.record_of(model).modules


def test_compress_under_limits_meets_the_budget_and_round_trips(tmp_path):
    model = rankcut.load_model("tiny-llama")
    ids = sample_ids(model)
    limits = {"64x64": 20, "32x64": 0, "64x160": 30, "160x64": 25}
    rankcut.compress_(model, rankcut.SVD(budget=0.6, speed_limits=limits), progress=False)
    records = rankcut.record_of(model).modules
    for name, r in records.items():
        limit = limits[shape_key(r["out_features"], r["in_features"])]
        assert r["rank"] is None or r["rank"] <= limit, name
        if r["out_features"] == 32:
            assert r["rank"] is None  # never faster: dense
    assert sum(r["params"] for r in records.values()) <= 0.6 * sum(r["dense_params"] for r in records.values())
    rankcut.save(model, tmp_path / "m")
    same = rankcut.load(tmp_path / "m")
    assert rankcut.record_of(same).speed_limits == limits
    assert rel_err(output(same, ids), output(model, ids)) < 1e-5


def test_limits_at_the_size_limit_change_nothing():
    """Limits as high as the size break-even leave the allocation exactly as without them."""
    a, b = rankcut.load_model("tiny-llama"), rankcut.load_model("tiny-llama")
    limits = {shape_key(t.out_features, t.in_features): size_limit(t.out_features, t.in_features)
              for t in select_targets(a)}
    rankcut.compress_(a, rankcut.SVD(budget=0.5), progress=False)
    rankcut.compress_(b, rankcut.SVD(budget=0.5, speed_limits=limits), progress=False)
    assert {n: r["rank"] for n, r in rankcut.record_of(a).modules.items()} == \
        {n: r["rank"] for n, r in rankcut.record_of(b).modules.items()}


def test_cli_budget_with_speed_allocates_under_limits_and_puts_nothing_back(capsys, tmp_path, monkeypatch):
    limits = {"64x64": 20, "32x64": 0, "64x160": 30, "160x64": 25}
    monkeypatch.setattr(rankcut.compress.pipeline, "speed_limits", lambda *a, **k: dict(limits))
    out = tmp_path / "m"
    assert main(["compress", "tiny-llama", "--budget", "0.6", "--speed", "--out", str(out), "--json"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["speed_limits"] == limits and payload["dense_fallback"] == []
    manifest = json.loads((out / "rankcut.json").read_text())
    kept = sum(r["params"] for r in manifest["modules"].values())
    assert kept <= 0.6 * sum(r["dense_params"] for r in manifest["modules"].values())
    assert all(r["form"] != "dense-fallback" for r in manifest["modules"].values())
    assert main(["info", str(out)]) == 0
    assert "under speed limits (highest rank faster than dense here: 160×64 25" in capsys.readouterr().out


def test_info_speed_times_each_shape_once(capsys, monkeypatch):
    seen: list = []
    real = speedlimits.speed_limit

    def spy(m, n, *args, **kwargs):
        seen.append((m, n))
        return real(m, n, *args, **kwargs)

    monkeypatch.setattr(speedlimits, "speed_limit", spy)
    assert main(["info", "tiny-bert", "--speed", "--targets", "all-linear", "--json"]) == 0
    payload = json.loads(capsys.readouterr().out)
    shapes = {tuple(r["shape"]) for r in payload["targets"]}
    assert sorted(seen) == sorted(shapes)
    for r in payload["targets"]:
        assert 0 <= r["speed_limit"] <= size_limit(*r["shape"])
    assert main(["info", "tiny-bert", "--speed", "--targets", "all-linear"]) == 0
    assert "fast r" in capsys.readouterr().out


def test_two_pass_budget_under_limits():
    """The second pass compresses at the allocated ranks: the limits must not follow it there."""
    model = rankcut.load_model("tiny-llama")
    limits = {"64x64": 20, "32x64": 0, "64x160": 30, "160x64": 25}
    calib = rankcut.Calibration(samples=2, seqlen=32, two_pass=True)
    rankcut.compress_(model, rankcut.Whiten(budget=0.6, speed_limits=limits, calibration=calib), progress=False)
    records = rankcut.record_of(model).modules
    assert all(r["rank"] is None or r["rank"] <= limits[shape_key(r["out_features"], r["in_features"])]
               for r in records.values())
    assert any(r["rank"] is not None for r in records.values())
    assert list(records) == [t.name for t in select_targets(rankcut.load_model("tiny-llama"))]  # model order
    assert sum(r["params"] for r in records.values()) <= 0.6 * sum(r["dense_params"] for r in records.values())


def test_info_sums_up_each_kinds_ranks(capsys, tmp_path):
    model = rankcut.load_model("tiny-llama")
    rankcut.compress_(model, rankcut.SVD(budget=0.5), progress=False)
    rankcut.save(model, tmp_path / "m")
    assert main(["info", str(tmp_path / "m"), "--json"]) == 0
    payload = json.loads(capsys.readouterr().out)
    records = rankcut.record_of(model).modules
    for kind, k in payload["by_kind"].items():
        mine = [r for r in records.values() if r["kind"] == kind]
        ranks = sorted(r["rank"] for r in mine if r["rank"] is not None)
        assert k["modules"] == len(mine) and k["dense"] == len(mine) - len(ranks)
        assert (k["rank_min"], k["rank_max"]) == ((ranks[0], ranks[-1]) if ranks else (None, None))
        assert k["kept"] == pytest.approx(sum(r["params"] for r in mine) / sum(r["dense_params"] for r in mine))


def test_info_speed_on_a_saved_model_times_its_dense_shapes(capsys, tmp_path, monkeypatch):
    limits = {"64x64": 20, "32x64": 0, "64x160": 30, "160x64": 25}
    monkeypatch.setattr(speedlimits, "speed_limit", lambda m, n, *a, **k: (limits[shape_key(m, n)], {}))
    model = rankcut.load_model("tiny-llama")
    rankcut.compress_(model, rankcut.SVD(keep=0.5), progress=False)
    rankcut.save(model, tmp_path / "m")
    assert main(["info", str(tmp_path / "m"), "--speed", "--json"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["speed_limits"] == limits
    assert all(r["speed_limit"] == limits[shape_key(*r["shape"])] for r in payload["targets"])
    assert main(["info", str(tmp_path / "m"), "--pivot"]) == 2
    assert "add --speed" in capsys.readouterr().err


def test_without_limits_the_budget_error_does_not_blame_speed():
    with pytest.raises(RankcutError, match="too small to factor") as caught:
        allocate_targets([_T("a", 1, 64)], {"a": torch.ones(1)}, 10)
    assert "--speed" not in str(caught.value)


def test_info_on_a_saved_model_takes_targets_and_layers(capsys, tmp_path):
    model = rankcut.load_model("tiny-llama")
    rankcut.compress_(model, rankcut.SVD(keep=0.5), progress=False)
    rankcut.save(model, tmp_path / "m")
    assert main(["info", str(tmp_path / "m"), "--targets", "q,up", "--layers", "1-2", "--json"]) == 0
    names = [r["name"] for r in json.loads(capsys.readouterr().out)["targets"]]
    assert names == [f"model.layers.{i}.{m}" for i in (1, 2) for m in ("self_attn.q_proj", "mlp.up_proj")]
    assert main(["info", str(tmp_path / "m"), "--targets", r"mlp\.down", "--json"]) == 0
    assert {r["kind"] for r in json.loads(capsys.readouterr().out)["targets"]} == {"down"}
    assert main(["info", str(tmp_path / "m"), "--targets", "nothing"]) == 2
    assert "matches none of the saved model's compressed modules" in capsys.readouterr().err


def test_python_api_types_are_checked_up_front():
    """A calibration source may be named by a string; wrong types are one clear error, not a
    traceback from inside a run."""
    assert rankcut.Whiten(keep=0.5, calibration="gensim-news").calibration.text == "gensim-news"
    with pytest.raises(RankcutError, match="give a text source"):
        rankcut.Whiten(keep=0.5, calibration=["raw text"])
    model = rankcut.load_model("tiny-llama")
    rankcut.compress_(model, rankcut.SVD(keep=0.5), progress=False)
    with pytest.raises(RankcutError, match=r"steps = '3': give a whole number \(--steps\)"):
        rankcut.heal(model, rankcut.Heal(steps="3"))
    with pytest.raises(RankcutError, match="lr = '1e-4': give a number"):
        rankcut.heal(model, rankcut.Heal(lr="1e-4"))


def test_compress_dtype_times_the_limits_at_the_stored_precision(capsys, tmp_path, monkeypatch):
    dtypes: set = set()

    def spy(m, n, tokens, repeats, dtype, *args, **kwargs):
        dtypes.add(dtype)
        return size_limit(m, n) // 2, {}

    monkeypatch.setattr(speedlimits, "speed_limit", spy)
    assert main(["compress", "tiny-llama", "--budget", "0.6", "--speed", "--dtype", "bfloat16",
                 "--out", str(tmp_path / "m"), "--json"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert dtypes == {torch.bfloat16} and payload["dtype"] == "bfloat16"
    assert json.loads((tmp_path / "m" / "rankcut.json").read_text())["dtype"] == "bfloat16"
