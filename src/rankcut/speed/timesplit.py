"""Where a forward's time goes, and how far a compressed model is from its speed-up's ceiling.

A speed-up alone does not say whether more was to be had. Factoring shrinks only the targeted
linear maps; attention, norms, activations, the head and the framework's per-call work stay
as they were, and bound the whole by Amdahl's law. This module times the targeted maps apart
from everything else (a clock read by forward hooks around each of them: on a CPU every
operation is synchronous, so the time between a module's pre- and post-hook is its own), in a
dense model and in one cut from it, on the same workload, interleaved. From the two splits it
reports the speed-up of the targeted maps themselves and the ceiling: the whole model's
speed-up had the targeted maps run in exactly the time their parameters predict (parameters =
FLOPs = bytes of a linear map at one dtype; a prefill is bound by the first, a decode step by the
last) while everything else ran as in the dense model.

The hooks cost about 4 µs a call on the 2-core CPU here (under 1 ms of a 60 ms SmolLM2
decoding step), nearly all of it outside the clocked span, so it lands in "everything else", the
same amount in both models. Split timings therefore run apart from the plain ones of
`rankcut.speed.bench`: the speed-ups to quote come from there; the split says why they are what
they are.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from ..core.embedding import EMBEDDING_FORM, TIED_HEAD_FORM
from ..core.errors import RankcutError
from ..core.record import record_of
from ..core.targets import all_candidates, kind_of
from .bench import is_linear_map, map_params
from .timing import DECODE_PROMPT, prefill_kwargs, sync_device

HEAD = "(head)"  # the label the clock gives the output head's time


@dataclass
class Split:
    """One workload's wall time (medians over repeats), and the part spent inside the targets."""

    total_s: float
    targets_s: float
    by_kind: dict[str, float] = field(default_factory=dict)  # targets_s, kind by kind (q, up, ...)
    head_s: float = 0.0  # inside the output head when it is not a target (a part of rest_s)

    @property
    def rest_s(self) -> float:
        return self.total_s - self.targets_s


@dataclass
class SplitComparison:
    workload: str
    dense: Split
    compressed: Split
    targets: int  # number of targeted modules timed
    targets_param_ratio: float  # compressed ÷ dense parameters of the targeted maps
    kind_param_ratio: dict[str, float] = field(default_factory=dict)  # the same, kind by kind

    @property
    def speedup(self) -> float:
        return _ratio(self.dense.total_s, self.compressed.total_s)

    @property
    def targets_speedup(self) -> float:
        return _ratio(self.dense.targets_s, self.compressed.targets_s)

    @property
    def targets_efficiency(self) -> float:
        """The targets' time per parameter, dense's ÷ compressed's: 1.0 when the factored maps
        run exactly as fast per number multiplied as the dense weights did."""
        return self.targets_speedup * self.targets_param_ratio

    @property
    def rest_speedup(self) -> float:
        return _ratio(self.dense.rest_s, self.compressed.rest_s)

    @property
    def ceiling(self) -> float:
        """The whole's speed-up had the targets taken dense time × their parameter ratio and
        the rest dense time. Not a law: a factor laid out better than the dense weight can beat
        it (`targets_efficiency` > 1), and the rest can change too (it ran 1.03–1.14× faster in
        SmolLM2's 50% model while decoding; the cause was not isolated)."""
        return _ratio(self.dense.total_s, self.dense.rest_s + self.dense.targets_s * self.targets_param_ratio)

    def by_kind(self) -> dict[str, dict[str, float]]:
        """Each kind's time, speed-up and speed per parameter: which maps hold the whole back."""
        out = {}
        for kind, ratio in self.kind_param_ratio.items():
            d, c = self.dense.by_kind.get(kind, 0.0), self.compressed.by_kind.get(kind, 0.0)
            speedup = _ratio(d, c)
            out[kind] = {"dense_s": d, "compressed_s": c, "speedup": speedup, "param_ratio": ratio,
                         "efficiency": speedup * ratio}
        return out

    def summary(self) -> dict[str, Any]:
        return {"workload": self.workload, "dense": {**asdict(self.dense), "rest_s": self.dense.rest_s},
                "compressed": {**asdict(self.compressed), "rest_s": self.compressed.rest_s},
                "targets": self.targets, "targets_param_ratio": self.targets_param_ratio,
                "speedup": self.speedup, "targets_speedup": self.targets_speedup,
                "targets_efficiency": self.targets_efficiency,
                "rest_speedup": self.rest_speedup, "ceiling": self.ceiling, "by_kind": self.by_kind()}


def _ratio(a: float, b: float) -> float:
    """a ÷ b; NaN where b is no time at all (too short a workload to clock), not an error."""
    return a / b if b > 0 else float("nan")


def target_names(dense: nn.Module, compressed: nn.Module) -> list[str]:
    """The compressed model's targets (what `rankcut.json` records, modules put back dense
    included), or, for a model that records none, every linear map rankcut could factorize."""
    # a factored embedding is a lookup, not a map, and a head tied to it is clocked as the head
    recorded = [n for n, r in record_of(compressed).modules.items()
                if r.get("form") not in (EMBEDDING_FORM, TIED_HEAD_FORM)]
    names = recorded or [t.name for t in all_candidates(compressed)]
    if not names:
        raise RankcutError("the compared model has no linear maps to time: give a compressed model "
                           "(a folder saved by `rankcut compress`) as --vs")
    dense_modules, compressed_modules = dict(dense.named_modules()), dict(compressed.named_modules())
    missing = [n for n in names if n not in dense_modules or n not in compressed_modules]
    if missing:
        raise RankcutError(f"{len(missing)} targeted module(s) (first: {missing[0]}) are not in both models: "
                           "compare a compressed model with the dense model it was cut from")
    not_maps = [n for n in names if not is_linear_map(dense_modules[n]) or not is_linear_map(compressed_modules[n])]
    if not_maps:
        raise RankcutError(f"module {not_maps[0]} is not a linear map in both models: compare a compressed "
                           "model with the dense model it was cut from")
    return names


def target_kinds(names: list[str]) -> dict[str, str]:
    """Each target's kind as `rankcut info` names it (q, k, v, o, gate, up, down; query, ...)."""
    return {n: kind_of(n)[0] for n in names}


def head_name(model: nn.Module, names: list[str]) -> str | None:
    """The output head's module name, unless it is a target or the model has none (an encoder)."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if head is None:
        return None
    name = next((n for n, m in model.named_modules() if m is head), None)
    return None if name in names else name


class _TargetClock:
    """Forward hooks that add up the wall time spent inside the named modules (and, apart,
    inside the `head` module)."""

    def __init__(self, model: nn.Module, names: list[str], kinds: dict[str, str] | None = None,
                 head: str | None = None) -> None:
        self.model, self.names, self.seconds, self._handles = model, names, 0.0, []
        self.kinds, self.head = kinds or {}, head
        self.by_kind: dict[str, float] = {}
        self.head_seconds = 0.0
        self._cuda = next(model.parameters()).device.type == "cuda"

    def restart(self) -> None:
        self.seconds, self.head_seconds, self.by_kind = 0.0, 0.0, {}

    def _clocked(self) -> list[str]:
        return self.names + ([self.head] if self.head is not None else [])

    def __enter__(self) -> "_TargetClock":
        modules = dict(self.model.named_modules())
        for name in self._clocked():
            modules[name].__dict__["_rankcut_kind"] = HEAD if name == self.head else self.kinds.get(name)
            self._handles.append(modules[name].register_forward_pre_hook(self._start))
            self._handles.append(modules[name].register_forward_hook(self._stop))
        return self

    def _start(self, module: nn.Module, args: Any) -> None:
        if self._cuda:
            sync_device(self.model)
        module._rankcut_t0 = time.perf_counter()

    def _stop(self, module: nn.Module, args: Any, output: Any) -> None:
        if self._cuda:
            sync_device(self.model)
        seconds = time.perf_counter() - module.__dict__.pop("_rankcut_t0")
        kind = module.__dict__.get("_rankcut_kind")
        if kind is HEAD:
            self.head_seconds += seconds
            return
        self.seconds += seconds
        if kind is not None:
            self.by_kind[kind] = self.by_kind.get(kind, 0.0) + seconds

    def __exit__(self, *exc: Any) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        modules = dict(self.model.named_modules())
        for name in self._clocked():
            for key in ("_rankcut_t0", "_rankcut_kind"):
                modules[name].__dict__.pop(key, None)


def time_split(model: nn.Module, names: list[str], run: Callable[[], Any], kinds: dict[str, str] | None = None,
               head: str | None = None, after_first_forward: bool = False) -> Split:
    """One run of `run()`: its wall time and the part inside the modules `names` (with `kinds`,
    a name → kind map, also that part kind by kind; with `head`, a module's name, the part inside
    it, counted in the rest). `after_first_forward`: clock only what follows the end of the
    model's first forward, as in `generate`, whose first forward is the prompt's and every later
    one a decoding step: the steps timed within one run, not as the difference of two runs."""
    with _TargetClock(model, names, kinds, head) as clock:
        started: list[float] = []

        def first_forward_done(module: nn.Module, args: Any, output: Any) -> None:
            if not started:
                sync_device(model)
                clock.restart()
                started.append(time.perf_counter())

        handle = model.register_forward_hook(first_forward_done) if after_first_forward else None
        try:
            sync_device(model)
            t0 = time.perf_counter()
            run()
            sync_device(model)
            total = time.perf_counter() - (started[0] if after_first_forward and started else t0)
        finally:
            if handle is not None:
                handle.remove()
    if after_first_forward and not started:
        raise RankcutError("the workload never called the model's forward: nothing to split")
    return Split(total, clock.seconds, clock.by_kind, clock.head_seconds)


def _median_split(splits: list[Split]) -> Split:
    kinds = {k for s in splits for k in s.by_kind}
    return Split(statistics.median(s.total_s for s in splits), statistics.median(s.targets_s for s in splits),
                 {k: statistics.median(s.by_kind.get(k, 0.0) for s in splits) for k in sorted(kinds)},
                 statistics.median(s.head_s for s in splits))


def _per_step(split: Split, steps: int) -> Split:
    return Split(split.total_s / steps, split.targets_s / steps, {k: v / steps for k, v in split.by_kind.items()},
                 split.head_s / steps)


def check_decode(decode: int) -> None:
    if decode == 1:
        raise RankcutError("a decoding step is timed after the prompt's forward, which yields the first new "
                           "token: give --decode 2 or more")


@torch.no_grad()
def compare_splits(dense: nn.Module, compressed: nn.Module, ids: torch.Tensor, decode: int = 0,
                   prompt: torch.Tensor | None = None, repeats: int = 5) -> list[SplitComparison]:
    """Split timings of the prefill of `ids` (logits for the last position, as `rankcut.speed.bench`
    times it) and, with `decode` ≥ 2, of one greedy decoding step (the mean over the `decode` − 1
    steps that follow the prompt's forward in a `generate` of `decode` new tokens after `prompt`,
    default the first 32 tokens of `ids`, as `rankcut.speed.bench` decodes): dense and compressed
    interleaved, medians over `repeats` (half as many for decoding)."""
    check_decode(decode)

    names = target_names(dense, compressed)
    kinds = target_kinds(names)
    modules_d, modules_c = dict(dense.named_modules()), dict(compressed.named_modules())
    param_ratio = sum(map_params(modules_c[n]) for n in names) / sum(map_params(modules_d[n]) for n in names)
    kind_ratio = {k: sum(map_params(modules_c[n]) for n in names if kinds[n] == k)
                  / sum(map_params(modules_d[n]) for n in names if kinds[n] == k)
                  for k in dict.fromkeys(kinds.values())}
    models = {"dense": dense, "compressed": compressed}
    heads = {key: head_name(model, names) for key, model in models.items()}

    prompt = ids[:, :DECODE_PROMPT] if prompt is None else prompt

    def forward(tokens: torch.Tensor) -> Callable[[nn.Module], Callable[[], Any]]:
        def bind(model: nn.Module) -> Callable[[], Any]:
            kwargs = prefill_kwargs(model)
            return lambda: model(input_ids=tokens, **kwargs)
        return bind

    def generation(model: nn.Module) -> Callable[[], Any]:
        return lambda: model.generate(prompt, max_new_tokens=decode, min_new_tokens=decode, do_sample=False,
                                      pad_token_id=0)

    workloads: dict[str, dict[str, Any]] = {
        f"prefill {ids.shape[0]}×{ids.shape[1]}": {"run": forward(ids), "repeats": repeats}}
    if decode:
        workloads[f"decode step ({decode} new tokens after {prompt.shape[1]})"] = {
            "run": generation, "steps": decode - 1, "repeats": max(1, repeats // 2)}
    results = []
    for workload, parts in workloads.items():
        splits: dict[str, list[Split]] = {k: [] for k in models}
        for key, model in models.items():  # warm-up
            time_split(model, names, parts["run"](model), head=heads[key])
        steps = parts.get("steps")
        for _ in range(parts["repeats"]):
            for key, model in models.items():
                split = time_split(model, names, parts["run"](model), kinds, heads[key],
                                   after_first_forward=bool(steps))
                splits[key].append(_per_step(split, steps) if steps else split)
        results.append(SplitComparison(workload, _median_split(splits["dense"]), _median_split(splits["compressed"]),
                                       len(names), param_ratio, kind_ratio))
    return results
