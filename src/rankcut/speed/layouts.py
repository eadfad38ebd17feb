"""Fast factorized inference: the same maps as the plain factors, fewer and better-shaped matmuls.

Five transforms, each exact up to float rounding:
- fold the Tucker core into whichever neighbouring factor leaves fewer parameters;
- lay out each pivoted layer's tokens as rows or as columns (see PivotLowRankLinear), chosen by
  timing the whole model's forward under each candidate: the cost of a strided output lands in
  whatever reads it (on SmolLM2, attention), so a layer timed alone cannot tell;
- store each factor in the memory order its matmul runs fastest in, chosen by timing both:
  a factor's values are unchanged, only its strides (a column-major factor is the transpose
  of a contiguous tensor, which BLAS reads without a copy). On the 2-core CPU a thin factor
  that expands (rank → 1,536 outputs) streams ~1.7× faster column-major at one token;
- modules that read the same input (q, k, v; gate and up; BERT's query, key, value) multiply
  it by their stacked first factors in one matmul; each member's `in_factor` becomes a view into
  the stack, so nothing is stored twice and the saved format is unchanged;
- a module that is not faster factored than dense at the measured workloads (decode and
  prefill token counts for a generating model, sentence and batch sizes for an encoder, on this
  machine) goes back to a dense `nn.Linear` holding B·A.

`speed_up_` folds cores, picks the layouts and makes the dense-fallback decision (decisions about
a machine, recorded in the manifest: the pivoted layers with tokens as columns, the factors
stored column-major, and form "dense-fallback"; `rankcut.load` applies them); stacking shared
inputs is opt-in (`Speed(fuse_shared_inputs=True)`, `rankcut.load(..., fast=True)`) because on
the 2-core CPU it was measured no faster than the plain factors (benchmarks/speed.py keeps
measuring it).
"""

from __future__ import annotations

import copy
import statistics
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from ..core.layers import LowRankLinear, PivotLowRankLinear
from ..core.layout import (
    column_major,
    fold_cores_,
    fuse_shared_inputs_,
    is_column_major,
    set_column_major_,
    set_row_major_,
    set_tokens_as_columns_,
)
from ..core.machine import describe_machine
from ..core.model_facts import context_length
from ..core.modules import compressed_modules, count_bytes, dense_form, swap_module
from ..core.record import record_of
from ..core.targets import feeds_attention
from .timing import (
    DECODER_TOKENS,
    _copies,
    _time_each,
    cold_bytes,
    geometric_mean,
    random_ids,
    time_prefill,
    workload_tokens,
)


@dataclass
class Speed:
    """What `speed_up_` does. `tokens`: the workloads the layout and dense-fallback decisions
    time, as token counts per matmul (1 = a decode step, 512 = a prefill); None takes the
    model's own (see `workload_tokens`)."""

    fold_core: bool = True
    choose_layout: bool = True
    pivot_outputs: bool = True
    fuse_shared_inputs: bool = False  # measured no faster on CPU: opt-in
    dense_fallback: bool = True
    tokens: tuple[int, ...] | None = None
    repeats: int = 7


@dataclass
class SpeedReport:
    folded: list[str] = field(default_factory=list)
    column_major: dict[str, list[str]] = field(default_factory=dict)  # module → its factors stored column-major
    fused_groups: list[list[str]] = field(default_factory=list)
    dense_fallback: list[str] = field(default_factory=list)
    timings: dict[str, dict[str, float]] = field(default_factory=dict)  # shape → factored/dense time ratios
    layout_timings: dict[str, dict[str, float]] = field(default_factory=dict)  # factor shape → column/row time
    pivot_outputs: str | None = None  # the chosen PIVOT_OUTPUTS candidate, when there are pivoted modules
    pivot_output_timings: dict[str, float] = field(default_factory=dict)  # candidate → whole forward, s


# How a factor meets its input, as the layers multiply: as x·Wᵀ (tokens as rows), or, for a
# pivoted layer laid out with tokens as columns (see PivotLowRankLinear), its first factor
# against a transposed view of the input and its second against the first's contiguous result.
# One token is always multiplied as rows.
PRODUCTS = ("linear", "pivot-in", "pivot-out")


@torch.no_grad()
def column_to_row_time(rows: int, cols: int, tokens: tuple[int, ...], repeats: int = 7,
                       dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                       sweep_bytes: int | None = None, product: str = "linear") -> dict[int, float]:
    """Time of a (rows × cols) factor's product (see PRODUCTS) stored column-major over stored
    row-major, per token count."""
    if product not in PRODUCTS:
        raise ValueError(f"product {product!r}: one of {', '.join(PRODUCTS)}")
    device = torch.device(device)
    g = torch.Generator(device=device).manual_seed(0)
    out = {}
    for t in tokens:
        x = torch.randn(1, t, cols, generator=g, dtype=dtype, device=device)
        if product == "linear" or t == 1:
            multiply: Callable[[torch.Tensor], object] = lambda w: F.linear(x, w)  # noqa: E731
        else:
            xt = x[0].T if product == "pivot-in" else x[0].T.contiguous()
            multiply = lambda w: torch.mm(w, xt)  # noqa: E731
        prototype = torch.randn(rows, cols, generator=g, dtype=dtype, device=device)
        row = _copies(prototype.clone, rows * cols * x.element_size(), t, device, sweep_bytes)  # a copy: no RNG
        col = [column_major(w) for w in row]
        out[t] = _time_each(multiply, col, repeats, device) / _time_each(multiply, row, repeats, device)
    return out


# A budget gives nearly every module its own rank; timing each factor shape exactly took a
# minute on SmolLM2's 210 modules. Which layout streams faster changes smoothly with the rank,
# so rank-sized dimensions are timed at the nearest multiple of this.
RANK_BUCKET = 32


def _rank_bucket(n: int, features: tuple[int, ...]) -> int:
    """A factor dimension as timed: a layer's own width as it is, a rank-sized one bucketed."""
    return n if n in features else max(RANK_BUCKET, RANK_BUCKET * round(n / RANK_BUCKET))


@torch.no_grad()
def choose_layouts_(model: nn.Module, tokens: tuple[int, ...] = DECODER_TOKENS, repeats: int = 7
                    ) -> tuple[dict[str, list[str]], dict[str, dict[str, float]]]:
    """Store each factor (plain or pivoted) column-major where that is faster on balance
    (geometric mean of its time ratios over `tokens` < 1), back row-major otherwise. Factor
    shapes are timed once each (rank-sized dimensions bucketed, see RANK_BUCKET), multiplied as
    their layer multiplies them."""
    timings: dict[str, dict[str, float]] = {}
    chosen: dict[str, list[str]] = {}
    state = record_of(model)
    sweep = cold_bytes(model, next(model.parameters()).device)
    for name, layer in compressed_modules(model).items():
        pivot = type(layer) is PivotLowRankLinear
        if not (pivot or type(layer) is LowRankLinear) or layer.core is not None or layer.shared_input is not None:
            continue
        columns = []
        features = (layer.in_features, layer.out_features)
        as_columns = pivot and layer.tokens_as_columns
        for factor in ("in_factor", "out_factor"):
            w = getattr(layer, factor)
            product = ("pivot-in" if factor == "in_factor" else "pivot-out") if as_columns else "linear"
            rows, cols = (_rank_bucket(n, features) for n in w.shape)
            key = f"{rows}x{cols}" + ("" if product == "linear" else f" {product}")
            if key not in timings:
                ratios = column_to_row_time(rows, cols, tokens, repeats, w.dtype, w.device, sweep, product=product)
                timings[key] = {str(t): r for t, r in ratios.items()}
            if geometric_mean(timings[key].values()) < 1.0:
                columns.append(factor)
                if not is_column_major(w):
                    set_column_major_(layer, factor)
            else:
                set_row_major_(layer, factor)
        record = state.modules.get(name)
        if record is not None:
            record.pop("column_major", None)
            if columns:
                record["column_major"] = columns
        if columns:
            chosen[name] = columns
    return chosen, timings


# How a pivoted model's layers lay out their tokens (see PivotLowRankLinear), as whole-model
# candidates: which layers multiply with tokens as columns. Where that pays depends on what reads
# a layer's output, so it is timed on the whole model, not layer by layer: alone, each layer is
# faster with tokens as columns; on SmolLM2 the strided q, k, v sent attention to its slow path.
PIVOT_OUTPUTS = ("rows", "columns-outside-attention", "columns")


def pivot_output_candidates(pivots: dict[str, PivotLowRankLinear]) -> dict[str, set[str]]:
    """Each distinct PIVOT_OUTPUTS candidate: the names of the pivoted modules it lays out with
    tokens as columns."""
    outside = {n for n in pivots if not feeds_attention(n)}
    candidates = {"rows": set(), "columns-outside-attention": outside, "columns": set(pivots)}
    distinct: dict[str, set[str]] = {}
    for name in PIVOT_OUTPUTS:  # the first candidate of each distinct set stands for it
        if all(candidates[name] != other for other in distinct.values()):
            distinct[name] = candidates[name]
    return distinct


def _longest_input(model: nn.Module, tokens: int) -> int:
    """`tokens`, or the model's context length where that is shorter (a position table of 256)."""
    cap = context_length(model)
    return tokens if cap is None else min(tokens, cap)


@torch.no_grad()
def choose_pivot_outputs_(model: nn.Module, tokens: tuple[int, ...] = DECODER_TOKENS, repeats: int = 7
                          ) -> tuple[str | None, dict[str, float]]:
    """Time one whole forward over the largest of `tokens` (one sequence) under each
    PIVOT_OUTPUTS candidate, interleaved, and keep the fastest. (None, {}) without pivoted
    modules; one token is multiplied as rows in every candidate, so decoding is not timed."""
    pivots = {n: m for n, m in compressed_modules(model).items() if isinstance(m, PivotLowRankLinear)}
    if not pivots:
        return None, {}
    candidates = pivot_output_candidates(pivots)
    if len(candidates) == 1:
        (only,) = candidates
        set_tokens_as_columns_(model, candidates[only])
        return only, {}
    ids = random_ids(model, 1, _longest_input(model, max(tokens)))
    was_training = model.training
    before = {n for n, m in pivots.items() if m.tokens_as_columns}
    model.eval()
    runs: dict[str, list[float]] = {name: [] for name in candidates}
    try:
        for name, names in candidates.items():  # a first, untimed call of each
            set_tokens_as_columns_(model, names)
            time_prefill(model, ids)
        for _ in range(max(1, min(repeats, 5))):
            for name, names in candidates.items():
                set_tokens_as_columns_(model, names)
                runs[name].append(time_prefill(model, ids))
    except BaseException:
        set_tokens_as_columns_(model, before)  # no half-made choice left behind
        raise
    finally:
        model.train(was_training)
    seconds = {name: statistics.median(r) for name, r in runs.items()}
    chosen = min(seconds, key=seconds.__getitem__)
    set_tokens_as_columns_(model, candidates[chosen])
    return chosen, seconds


@torch.no_grad()
def factored_to_dense_ratio(out_features: int, in_features: int, rank: int, tokens: tuple[int, ...],
                            repeats: int = 7, dtype: torch.dtype = torch.float32,
                            pivot: bool = False, column_major_factors: Iterable[str] = (),
                            device: torch.device | str = "cpu", sweep_bytes: int | None = None,
                            tokens_as_columns: bool = False) -> dict[int, float]:
    """Time of the factored map (plain, or pivoted; factors in the given layout; a pivoted one
    with its tokens as rows or columns) over the dense one, per token count, here."""
    device = torch.device(device)
    g = torch.Generator(device=device).manual_seed(0)
    kw = {"generator": g, "dtype": dtype, "device": device}
    column_major_factors = tuple(column_major_factors)

    plain = LowRankLinear.from_factors(torch.randn(out_features, rank, **kw),
                                       torch.randn(rank, in_features, **kw), dtype=dtype)
    prototype = PivotLowRankLinear.from_low_rank(plain) if pivot else plain
    if pivot:
        prototype.tokens_as_columns = tokens_as_columns

    def factored() -> nn.Module:  # a copy in its own memory, in the layout asked for
        layer = copy.deepcopy(prototype)
        for factor in column_major_factors:
            set_column_major_(layer, factor)
        return layer

    factored_bytes = count_bytes(prototype)
    out = {}
    for t in tokens:
        x = torch.randn(1, t, in_features, **kw)
        weight = torch.randn(out_features, in_features, **kw)
        dense = _copies(weight.clone, out_features * in_features * x.element_size(), t, device, sweep_bytes)
        layers = _copies(factored, factored_bytes, t, device, sweep_bytes)
        out[t] = (_time_each(lambda layer: layer(x), layers, repeats, device)
                  / _time_each(lambda w: F.linear(x, w), dense, repeats, device))
    return out


@torch.no_grad()
def dense_fallback_(model: nn.Module, tokens: tuple[int, ...] = DECODER_TOKENS, repeats: int = 7
                    ) -> tuple[list[str], dict[str, dict[str, float]]]:
    """Put back as dense every factored module that is not faster than dense on balance
    (geometric mean of its time ratios over `tokens` ≥ 1), each timed in its own layout.
    Shapes are timed once each."""
    timings: dict[str, dict[str, float]] = {}
    fallback = []
    state = record_of(model)
    sweep = cold_bytes(model, next(model.parameters()).device)
    for name, layer in compressed_modules(model).items():
        if layer.core is not None:
            continue
        pivot = isinstance(layer, PivotLowRankLinear)
        as_columns = pivot and layer.tokens_as_columns
        columns = tuple(f for f in ("in_factor", "out_factor") if is_column_major(getattr(layer, f)))
        key = (f"{layer.out_features}x{layer.in_features}@{layer.in_factor.shape[0]}{'p' if pivot else ''}"
               + ("|tokens-as-columns" if as_columns else "") + "".join(f"|{f}:col" for f in columns))
        if key not in timings:
            ratios = factored_to_dense_ratio(layer.out_features, layer.in_features, layer.in_factor.shape[0],
                                             tokens, repeats, layer.in_factor.dtype, pivot, columns,
                                             layer.in_factor.device, sweep, as_columns)
            timings[key] = {str(t): r for t, r in ratios.items()}
        mean = geometric_mean(timings[key].values())
        record = state.modules.get(name)
        if mean < 1.0 or (record is not None and record.get("transposed")):
            continue  # faster factored; or GPT-2's Conv1D, whose saved dense form is (in × out)
        swap_module(model, name, dense_form(layer))
        if record is not None:
            record["form"] = "dense-fallback"
            record["params"] = record["dense_params"]
            record.pop("column_major", None)
        fallback.append(name)
    return fallback, timings


def speed_up_(model: nn.Module, config: Speed = Speed()) -> SpeedReport:
    """Apply the fast path in place (see the module docstring); returns what was done."""
    report = SpeedReport()
    tokens = config.tokens or workload_tokens(model)
    if config.fold_core:
        report.folded = fold_cores_(model)
    if config.pivot_outputs:
        report.pivot_outputs, report.pivot_output_timings = choose_pivot_outputs_(model, tokens, config.repeats)
    if config.choose_layout:
        report.column_major, report.layout_timings = choose_layouts_(model, tokens, config.repeats)
    if config.dense_fallback:
        report.dense_fallback, report.timings = dense_fallback_(model, tokens, config.repeats)
    if config.fuse_shared_inputs:
        report.fused_groups = fuse_shared_inputs_(model)
    state = record_of(model)
    report.column_major = {n: c for n, c in report.column_major.items() if n not in report.dense_fallback}
    state.speed = {"dense_fallback": report.dense_fallback, "tokens": list(tokens),
                      "timings": report.timings, "layout_timings": report.layout_timings,
                      "column_major": len(report.column_major),
                      "machine": describe_machine(next(model.parameters()).device)}
    if report.pivot_outputs is not None:
        state.speed["pivot_outputs"] = {"chosen": report.pivot_outputs,
                                           "forward_s": report.pivot_output_timings}
    return report
