import json

import pytest
import torch
from torch import nn

import rankcut
from rankcut.core.layers import LowRankLinear, PivotLowRankLinear
from rankcut.core.layout import fold_cores_, fuse_shared_inputs_
from rankcut.speed.layouts import Speed, speed_up_
from rankcut.speed.timing import DECODER_TOKENS, ENCODER_TOKENS

IDS = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(5))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-bert", "tiny-gpt2"])
def test_fused_siblings_give_the_plain_factored_outputs(name):
    model = rankcut.load_model(name)
    rankcut.compress_(model, rankcut.SVD(keep=0.5))
    with torch.no_grad():
        plain = model(input_ids=IDS)[0]
    groups = fuse_shared_inputs_(model)
    if name != "tiny-gpt2":  # GPT-2's c_attn is one matrix already: nothing to fuse
        assert groups and all(len(g) >= 2 for g in groups)
    with torch.no_grad():
        fused = model(input_ids=IDS)[0]
    assert rel_err(fused, plain) <= 1e-4
    # the stack is the only copy: members' first factors are views into it
    for g in groups:
        first = model.get_submodule(g[0])
        assert all(model.get_submodule(n).in_factor.untyped_storage().data_ptr()
                   == first.shared_input.stacked.untyped_storage().data_ptr() for n in g)


def test_folded_core_gives_the_three_factor_outputs():
    model = rankcut.load_model("tiny-llama")
    rankcut.compress_(model, rankcut.Tucker(rank=(12, 8), three_factor=True), targets="q,up")
    with torch.no_grad():
        plain = model(input_ids=IDS).logits
    folded = fold_cores_(model)
    assert folded and all(model.get_submodule(n).core is None for n in folded)
    with torch.no_grad():
        assert rel_err(model(input_ids=IDS).logits, plain) <= 1e-4


@pytest.mark.parametrize("name, tokens", [("tiny-llama", DECODER_TOKENS), ("tiny-bert", ENCODER_TOKENS)])
def test_decisions_are_timed_at_the_models_own_workloads(name, tokens):
    model = rankcut.load_model(name)
    rankcut.compress_(model, rankcut.SVD(keep=0.5))
    report = speed_up_(model, Speed(repeats=1))
    assert rankcut.record_of(model).speed["tokens"] == list(tokens)
    timed = report.timings | report.layout_timings
    assert timed and all(set(t) == {str(k) for k in tokens} for t in timed.values())
    assert 1 not in ENCODER_TOKENS  # an encoder never multiplies one token at a time


def test_dense_fallback_where_factors_are_not_faster(tmp_path):
    model = rankcut.load_model("tiny-llama")
    # rank near the full rank: more work factored than dense at any size
    rankcut.compress_(model, rankcut.SVD(keep=0.95), targets="q,k,v,o")
    with torch.no_grad():
        plain = model(input_ids=IDS).logits
    report = speed_up_(model, Speed(repeats=3))
    assert report.dense_fallback, report.timings
    assert all(type(model.get_submodule(n)) is torch.nn.Linear for n in report.dense_fallback)
    with torch.no_grad():
        fast = model(input_ids=IDS).logits
    assert rel_err(fast, plain) <= 1e-4
    rankcut.save(model, tmp_path / "m")
    manifest = json.loads((tmp_path / "m" / "rankcut.json").read_text())
    assert {n for n, r in manifest["modules"].items() if r["form"] == "dense-fallback"} == set(report.dense_fallback)
    again = rankcut.load(tmp_path / "m")
    assert all(type(again.get_submodule(n)) is torch.nn.Linear for n in report.dense_fallback)
    with torch.no_grad():
        assert rel_err(again(input_ids=IDS).logits, fast) <= 1e-5


def test_saved_model_loads_fused_on_request(tmp_path):
    model = rankcut.load_model("tiny-llama")
    rankcut.compress_(model, rankcut.SVD(keep=0.5))
    with torch.no_grad():
        plain = model(input_ids=IDS).logits
    fuse_shared_inputs_(model)
    rankcut.save(model, tmp_path / "m")  # the views are saved whole; the format is unchanged
    again = rankcut.load(tmp_path / "m", fast=True)
    q = again.get_submodule("model.layers.0.self_attn.q_proj")
    assert isinstance(q, LowRankLinear) and q.shared_input is not None
    with torch.no_grad():
        assert rel_err(again(input_ids=IDS).logits, plain) <= 1e-4
    plain_load = rankcut.load(tmp_path / "m")  # the default: plain factors
    assert plain_load.get_submodule("model.layers.0.self_attn.q_proj").shared_input is None


def test_fused_model_still_trains():
    """With gradients on, members use their own views: autograd sees the usual graph."""
    model = rankcut.load_model("tiny-llama")
    rankcut.compress_(model, rankcut.SVD(keep=0.5))
    fuse_shared_inputs_(model)
    loss = model(input_ids=IDS, labels=IDS).loss
    loss.backward()
    q = model.get_submodule("model.layers.0.self_attn.q_proj")
    assert q.in_factor.grad is not None and torch.isfinite(q.in_factor.grad).all()


@pytest.mark.parametrize("pivot, as_columns", [(False, False), (True, False), (True, True)])
def test_column_major_factors_give_the_same_outputs_and_survive_save_load(tmp_path, monkeypatch, pivot,
                                                                          as_columns):
    """The layout changes strides only: the map is the same, and loading stores it the same way
    (for the pivoted form too, with its tokens as rows or as columns: the layout is timed for the
    product the layer runs)."""
    import rankcut.core.layout as layout
    import rankcut.speed.layouts as layouts

    model = rankcut.load_model("tiny-llama")
    rankcut.compress_(model, rankcut.SVD(keep=0.5, pivot=pivot))
    if as_columns:
        layout.set_tokens_as_columns_(model, [n for n, m in model.named_modules() if isinstance(m, PivotLowRankLinear)])
    products = []

    def column_major_always_faster(rows, cols, tokens, *args, product="linear", **kwargs):
        products.append(product)
        return {t: 0.5 for t in tokens}

    with torch.no_grad():
        plain = model(input_ids=IDS).logits
    # whatever the clock says, make every factor "faster" column-major, so the path is taken
    monkeypatch.setattr(layouts, "column_to_row_time", column_major_always_faster)
    report = speed_up_(model, Speed(dense_fallback=False, pivot_outputs=False, repeats=1))
    assert report.column_major and all(set(c) == {"in_factor", "out_factor"} for c in report.column_major.values())
    assert set(products) == ({"pivot-in", "pivot-out"} if as_columns else {"linear"})
    q = model.get_submodule("model.layers.0.self_attn.q_proj")
    assert isinstance(q, PivotLowRankLinear) == pivot
    assert layout.is_column_major(q.out_factor) and not q.out_factor.is_contiguous()
    with torch.no_grad():
        laid_out = model(input_ids=IDS).logits
    assert rel_err(laid_out, plain) <= 1e-5
    rankcut.save(model, tmp_path / "m")
    assert layout.is_column_major(q.out_factor)  # saving copies out row-major and puts the layout back
    manifest = json.loads((tmp_path / "m" / "rankcut.json").read_text())
    assert manifest["modules"]["model.layers.0.self_attn.q_proj"]["column_major"] == ["in_factor", "out_factor"]
    again = rankcut.load(tmp_path / "m")
    q2 = again.get_submodule("model.layers.0.self_attn.q_proj")
    assert layout.is_column_major(q2.in_factor) and layout.is_column_major(q2.out_factor)
    with torch.no_grad():
        assert rel_err(again(input_ids=IDS).logits, laid_out) <= 1e-6
    fused = rankcut.load(tmp_path / "m", fast=True)  # stacking still works on column-major factors
    with torch.no_grad():
        assert rel_err(fused(input_ids=IDS).logits, laid_out) <= 1e-4


def test_layout_stays_row_major_where_column_major_is_slower(monkeypatch):
    import rankcut.speed.layouts as layouts

    model = rankcut.load_model("tiny-llama")
    rankcut.compress_(model, rankcut.SVD(keep=0.5))
    monkeypatch.setattr(layouts, "column_to_row_time", lambda rows, cols, tokens, *a, **k: {t: 2.0 for t in tokens})
    report = speed_up_(model, Speed(dense_fallback=False, repeats=1))
    assert report.column_major == {}
    from rankcut.core.modules import compressed_modules

    assert all(m.in_factor.is_contiguous() and m.out_factor.is_contiguous()
               for m in compressed_modules(model).values())


def test_layout_timing_reads_weights_from_memory_at_decode_sizes():
    """At one token the timed copies overflow the cache; at prefill sizes one copy is timed."""
    import rankcut.speed.layouts as layouts
    import rankcut.speed.timing as timing

    device = torch.device("cpu")
    assert len(timing._copies(lambda: torch.empty(64, 64), 64 * 64 * 4, 1, device)) == timing.COLD_BYTES["cpu"] // (64 * 64 * 4)
    assert len(timing._copies(lambda: torch.empty(64, 64), 64 * 64 * 4, 512, device)) == 1
    ratios = layouts.column_to_row_time(48, 16, (1, 64), repeats=1)
    assert set(ratios) == {1, 64} and all(r > 0 for r in ratios.values())
    # a model that fits in cache is read from cache while it decodes: it is timed that way
    tiny = rankcut.load_model("tiny-llama")
    tiny_bytes = sum(p.numel() * p.element_size() for p in tiny.parameters())
    assert tiny_bytes < timing.COLD_BYTES["cpu"]
    assert timing.cold_bytes(tiny, device) == tiny_bytes
    assert len(timing._copies(lambda: torch.empty(64, 64), 64 * 64 * 4, 1, device, timing.cold_bytes(tiny, device))) \
        == tiny_bytes // (64 * 64 * 4)


def test_a_manifest_naming_an_unknown_column_major_factor_is_refused(tmp_path):
    model = rankcut.load_model("tiny-llama")
    rankcut.compress_(model, rankcut.SVD(keep=0.5), targets="q")
    rankcut.save(model, tmp_path / "m")
    path = tmp_path / "m" / "rankcut.json"
    manifest = json.loads(path.read_text())
    manifest["modules"]["model.layers.0.self_attn.q_proj"]["column_major"] = ["weight"]
    path.write_text(json.dumps(manifest))
    with pytest.raises(rankcut.RankcutError, match="column-major"):
        rankcut.load(tmp_path / "m")


def test_fallback_times_a_pivoted_module_in_its_own_layout(monkeypatch):
    """The dense-fallback decision times the module as it will run: pivoted, with the factors
    column-major that the layout pass stored so (they were once timed row-major by mistake)."""
    import rankcut.core.layout as layout
    import rankcut.speed.layouts as layouts

    seen = []

    def record(fn, copies, repeats, device=None):
        if isinstance(copies[0], nn.Module):
            seen.append(copies[0])
        return 1.0

    monkeypatch.setattr(layouts, "_time_each", record)
    layouts.factored_to_dense_ratio(48, 32, 8, (1, 64), repeats=1, pivot=True, column_major_factors=("out_factor",))
    assert seen and all(isinstance(m, PivotLowRankLinear) for m in seen)
    assert all(layout.is_column_major(m.out_factor) and m.in_factor.is_contiguous() for m in seen)


def test_fallback_times_a_pivoted_module_with_its_tokens_as_it_runs(monkeypatch):
    import rankcut.speed.layouts as layouts

    seen = []

    def record(fn, copies, repeats, device=None):
        if isinstance(copies[0], nn.Module):
            seen.append(copies[0].tokens_as_columns)
        return 1.0

    monkeypatch.setattr(layouts, "_time_each", record)
    for as_columns in (False, True):
        seen.clear()
        layouts.factored_to_dense_ratio(48, 32, 8, (1, 64), repeats=1, pivot=True, tokens_as_columns=as_columns)
        assert seen == [as_columns, as_columns]


def test_pivot_outputs_chosen_by_timing_the_whole_model_kept_on_reload(tmp_path, monkeypatch):
    """The fastest whole-model candidate wins; "columns outside attention" leaves every module
    that attention reads with its tokens as rows; the choice survives save and load, and no
    candidate changes the outputs."""
    import time as clock

    import rankcut.core.targets as targets
    import rankcut.speed.layouts as layouts

    model = rankcut.load_model("tiny-llama")
    rankcut.compress_(model, rankcut.SVD(keep=0.5, pivot=True))
    with torch.no_grad():
        before = model(input_ids=IDS).logits
    pivots = {n: m for n, m in model.named_modules() if isinstance(m, PivotLowRankLinear)}
    names = {id(m): n for n, m in pivots.items()}
    rows_forward, columns_forward = PivotLowRankLinear.forward, PivotLowRankLinear._forward_tokens_as_columns

    def forward(self, x):  # what the clock sees: strided outputs that attention reads cost most
        if self.tokens_as_columns and x.numel() > self.in_features:
            clock.sleep(0.016 if targets.feeds_attention(names[id(self)]) else 0.0)
            return columns_forward(self, x)
        clock.sleep(0.008)  # margins of many milliseconds per module: the choice holds on a loaded machine
        return rows_forward(self, x)

    monkeypatch.setattr(PivotLowRankLinear, "forward", forward)
    chosen, seconds = layouts.choose_pivot_outputs_(model, tokens=(16,), repeats=2)
    monkeypatch.undo()
    assert chosen == "columns-outside-attention" and set(seconds) == set(layouts.PIVOT_OUTPUTS)
    assert seconds["columns-outside-attention"] < min(seconds["rows"], seconds["columns"])
    assert {n for n, m in pivots.items() if m.tokens_as_columns} == {n for n in pivots if not targets.feeds_attention(n)}
    assert any(targets.feeds_attention(n) for n in pivots) and not all(targets.feeds_attention(n) for n in pivots)
    with torch.no_grad():
        assert rel_err(model(input_ids=IDS).logits, before) <= 1e-5
    rankcut.save(model, tmp_path / "m")
    again = rankcut.load(tmp_path / "m")
    assert {n for n, m in again.named_modules() if getattr(m, "tokens_as_columns", False)} == \
        {n for n, m in pivots.items() if m.tokens_as_columns}
    with torch.no_grad():
        assert rel_err(again(input_ids=IDS).logits, before) <= 1e-5


def test_speed_up_records_the_pivot_output_choice_and_skips_models_without_pivots():
    model = rankcut.load_model("tiny-llama")
    rankcut.compress_(model, rankcut.SVD(keep=0.5, pivot=True))
    report = speed_up_(model, Speed(dense_fallback=False, choose_layout=False, repeats=1))
    assert report.pivot_outputs in {"rows", "columns-outside-attention", "columns"}
    assert rankcut.record_of(model).speed["pivot_outputs"]["chosen"] == report.pivot_outputs
    plain = rankcut.load_model("tiny-llama")
    rankcut.compress_(plain, rankcut.SVD(keep=0.5))
    report = speed_up_(plain, Speed(dense_fallback=False, choose_layout=False, repeats=1))
    assert report.pivot_outputs is None and "pivot_outputs" not in rankcut.record_of(plain).speed


def test_a_manifest_laying_out_a_plain_module_with_tokens_as_columns_is_refused(tmp_path):
    model = rankcut.load_model("tiny-llama")
    rankcut.compress_(model, rankcut.SVD(keep=0.5))
    rankcut.save(model, tmp_path / "m")
    path = tmp_path / "m" / "rankcut.json"
    manifest = json.loads(path.read_text())
    manifest["modules"]["model.layers.0.self_attn.q_proj"]["tokens_as_columns"] = True
    path.write_text(json.dumps(manifest))
    with pytest.raises(rankcut.RankcutError, match="tokens as columns"):
        rankcut.load(tmp_path / "m", verify=False)


def test_layout_timing_multiplies_one_token_as_rows_whatever_the_pivot_layout(monkeypatch):
    """A pivoted layer with its tokens as columns still multiplies a single token as rows, so the
    layout timing at one token runs x·Wᵀ, and tokens-as-columns products above it."""
    import rankcut.speed.layouts as layouts

    shapes = []

    def record(fn, copies, repeats, device=None):
        shapes.append(tuple(fn(copies[0]).shape))
        return 1.0

    monkeypatch.setattr(layouts, "_time_each", record)
    layouts.column_to_row_time(12, 8, (1, 5), repeats=1, product="pivot-out")
    assert shapes[:2] == [(1, 1, 12)] * 2 and shapes[2:] == [(12, 5)] * 2


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-bert", "tiny-gpt2", "tiny-mamba"])
def test_pivot_output_choice_runs_on_every_architecture_within_its_context(name):
    """The whole-model timing fits the model's own context (tiny-bert has 256 positions, the
    prefill workload 512 tokens) and whatever it picks leaves the outputs unchanged."""
    model = rankcut.load_model(name)
    rankcut.compress_(model, rankcut.SVD(keep=0.5, pivot=True), progress=False)
    with torch.no_grad():
        before = model(input_ids=IDS)[0]
    report = speed_up_(model, Speed(dense_fallback=False, choose_layout=False, repeats=1))
    assert report.pivot_outputs in {"rows", "columns-outside-attention", "columns"}
    with torch.no_grad():
        assert rel_err(model(input_ids=IDS)[0], before) <= 1e-5


def test_a_failed_pivot_output_timing_leaves_the_layout_as_it_was(monkeypatch):
    import rankcut.core.layout as layout
    import rankcut.core.targets as targets
    import rankcut.speed.layouts as layouts

    model = rankcut.load_model("tiny-llama")
    rankcut.compress_(model, rankcut.SVD(keep=0.5, pivot=True), progress=False)
    pivots = {n: m for n, m in model.named_modules() if isinstance(m, PivotLowRankLinear)}
    chosen = {n for n in pivots if n.endswith("down_proj")}
    layout.set_tokens_as_columns_(model, chosen)
    columns_forward = PivotLowRankLinear._forward_tokens_as_columns
    attention_inputs = {id(m) for n, m in pivots.items() if targets.feeds_attention(n)}

    def fails_when_attention_reads_columns(self, x):  # only the "columns" candidate gets here
        if id(self) in attention_inputs:
            raise RuntimeError("out of memory")
        return columns_forward(self, x)

    monkeypatch.setattr(PivotLowRankLinear, "_forward_tokens_as_columns", fails_when_attention_reads_columns)
    with pytest.raises(RuntimeError, match="out of memory"):
        layouts.choose_pivot_outputs_(model, tokens=(16,), repeats=1)
    assert {n for n, m in pivots.items() if m.tokens_as_columns} == chosen
