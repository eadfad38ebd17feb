"""The design space of Moar et al. (2024): which layers, which weight kinds, which rank.

A `Configuration` is one point: a method, a layer mask, a kind mask and a rank (absolute, a
fraction of each module's break-even rank, or a Tucker pair). Its exact size is computed from
the module shapes alone, without building anything. A `Space` (read from YAML) is the product
of the allowed layers, kinds, ranks and methods; it can be counted, enumerated when small,
sampled with a seed when large, or sampled by the paper's heuristics (leave the early layers
alone, never two adjacent layers).

YAML:
    model: smollm2-135m
    methods: [tucker]            # any compress method
    layers: [6-29]               # the layers a configuration may pick from (default: all)
    kinds: [q, k, v, o, gate, up, down]
    ranks: [1, 0.25]             # int = absolute; float in (0, 1] = fraction of break-even; [r1, r2]
    max_layers: 4                # at most this many layers per configuration (default: no limit)
    max_kinds: 1                 # at most this many kinds per configuration (default: no limit)
    sampler: heuristic           # all | random | heuristic | greedy
    samples: 40
    seed: 0
    skip_early: 6                # heuristic: layers below this index are never picked
"""

from __future__ import annotations

import itertools
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

from torch import nn

from ..core.errors import RankcutError
from ..core.modules import count_params
from ..core.ranks import factor_params
from ..core.targets import Target, all_candidates, num_layers, parse_layers
from ..methods.base import config_class

Rank = int | float | tuple[int, int]


@dataclass(frozen=True)
class Configuration:
    method: str
    layers: tuple[int, ...]
    kinds: tuple[str, ...]
    rank: Rank
    # explicit (layer, kind) cells instead of the layers × kinds product (the greedy sampler's
    # cuts); `layers` and `kinds` then just summarize them
    cells: tuple[tuple[int, str], ...] = ()

    @classmethod
    def of_cells(cls, method: str, cells: Sequence[tuple[int, str]], rank: Rank) -> "Configuration":
        cells = tuple((int(layer), kind) for layer, kind in cells)
        return cls(method, tuple(sorted({layer for layer, _ in cells})), tuple(dict.fromkeys(k for _, k in cells)),
                   rank, cells)

    def key(self) -> str:
        """A stable identity, used to resume sweeps without duplicates."""
        rank = "x".join(map(str, self.rank)) if isinstance(self.rank, tuple) else str(self.rank)
        if self.cells:
            return f"{self.method}|C{';'.join(f'{layer}:{kind}' for layer, kind in self.cells)}|r{rank}"
        return f"{self.method}|L{','.join(map(str, self.layers))}|K{','.join(self.kinds)}|r{rank}"

    def to_dict(self) -> dict[str, Any]:
        d = {"method": self.method, "layers": list(self.layers), "kinds": list(self.kinds),
             "rank": list(self.rank) if isinstance(self.rank, tuple) else self.rank}
        if self.cells:
            d["cells"] = [list(c) for c in self.cells]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Configuration":
        rank = tuple(d["rank"]) if isinstance(d["rank"], list) else d["rank"]
        if d.get("cells"):
            return cls.of_cells(d["method"], [tuple(c) for c in d["cells"]], rank)
        return cls(d["method"], tuple(d["layers"]), tuple(d["kinds"]), rank)


def module_rank(target: Target, rank: Rank) -> int | tuple[int, int]:
    """The rank a configuration's rank means for one module."""
    if isinstance(rank, tuple):
        return rank
    if isinstance(rank, float):
        return max(1, math.floor(rank * target.break_even_rank + 1e-9))
    return rank


@dataclass
class ModelShape:
    """What sizing needs to know about a model: its targets and total parameters."""

    total_params: int
    layers: int
    targets: list[Target]

    @classmethod
    def of(cls, model: nn.Module) -> "ModelShape":
        targets = [t for t in all_candidates(model) if t.layer is not None]
        return cls(count_params(model), num_layers(model), targets)

    @property
    def kinds(self) -> list[str]:
        seen: dict[str, None] = {}
        for t in self.targets:
            seen.setdefault(t.kind, None)
        return list(seen)

    def selected(self, config: Configuration) -> list[Target]:
        if config.cells:
            cells = set(config.cells)
            return [t for t in self.targets if any((t.layer, k) in cells for k in (t.kind, *t.aliases))]
        layers, kinds = set(config.layers), set(config.kinds)
        return [t for t in self.targets if t.layer in layers and any(t.matches_kind(k) for k in kinds)]

    def size(self, config: Configuration) -> int:
        """Exact parameter count of the model under `config`, without building it."""
        total = self.total_params
        for t in self.selected(config):
            total += factor_params(t.out_features, t.in_features, module_rank(t, config.rank)) - t.params
        return total

    def validate(self, config: Configuration, allow_growth: bool = False) -> None:
        if not config.layers:
            raise RankcutError("a configuration's layer mask is empty; pick at least one layer")
        if not config.kinds:
            raise RankcutError("a configuration's kind mask is empty; pick at least one kind")
        known = {k for t in self.targets for k in (t.kind, *t.aliases)}
        for k in config.kinds:
            if k not in known:
                raise RankcutError(f"unknown kind '{k}'; this model has {', '.join(sorted(known))}")
        past = [i for i in config.layers if not 0 <= i < self.layers]
        if past:
            raise RankcutError(f"layer {past[0]} is past the last layer (0-{self.layers - 1})")
        parts = config.rank if isinstance(config.rank, tuple) else (config.rank,)
        whole = all(isinstance(p, int) and not isinstance(p, bool) and p >= 1 for p in parts)
        fraction = len(parts) == 1 and isinstance(parts[0], float) and 0 < parts[0] <= 1
        if not (whole and len(parts) <= 2 or fraction):
            raise RankcutError(f"rank {config.rank!r}: give a positive integer, a pair of them (Tucker), or a "
                               "fraction of the break-even rank in (0, 1]")
        for t in self.selected(config):
            r = module_rank(t, config.rank)
            pair = r if isinstance(r, tuple) else (r, r)
            if pair[0] > t.out_features or pair[1] > t.in_features:
                raise RankcutError(f"rank {config.rank} is larger than {t.name} ({t.out_features}×{t.in_features})")
            if not allow_growth and factor_params(t.out_features, t.in_features, r) > t.params:
                raise RankcutError(f"rank {config.rank} is above {t.name}'s break-even rank "
                                   f"{t.break_even_rank:.1f}; lower it")


@dataclass
class Space:
    model: str
    methods: list[str]
    layers: list[int]
    kinds: list[str]
    ranks: list[Rank]
    max_layers: int | None = None
    max_kinds: int | None = None
    sampler: str = "all"
    samples: int = 40
    seed: int = 0
    skip_early: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_yaml(cls, path: str | Path, shape: ModelShape | None = None) -> "Space":
        import yaml

        path = Path(path)
        if not path.is_file():
            raise RankcutError(f"space file {path} does not exist")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise RankcutError(f"space file {path} is not valid YAML ({' '.join(str(exc).split())})") from None
        return cls.from_dict(raw, shape, source=str(path))

    @classmethod
    def from_dict(cls, raw: dict[str, Any], shape: ModelShape | None = None, source: str = "space") -> "Space":
        if not isinstance(raw, dict):
            raise RankcutError(f"{source}: give a mapping of fields (model: ..., methods: [...], ...), "
                               f"not a {type(raw).__name__}")
        known = {"model", "methods", "layers", "kinds", "ranks", "max_layers", "max_kinds", "sampler", "samples", "seed",
                 "skip_early", "tasks", "proxy", "baselines", "proxy_tokens", "front_tasks", "limit"}
        unknown = set(raw) - known
        if unknown:
            raise RankcutError(f"{source}: unknown field(s) {', '.join(sorted(unknown))}")
        if "model" not in raw:
            raise RankcutError(f"{source}: missing 'model'")
        layers_spec = raw.get("layers")
        layers = list(range(shape.layers)) if layers_spec in (None, "all") and shape else \
            parse_layers(",".join(map(str, layers_spec)) if isinstance(layers_spec, list) else layers_spec) or []
        ranks = [tuple(r) if isinstance(r, list) else r for r in raw.get("ranks", [1])]
        space = cls(model=raw["model"], methods=list(raw.get("methods", ["tucker"])), layers=layers,
                    kinds=list(raw.get("kinds", shape.kinds if shape else [])), ranks=ranks,
                    max_layers=raw.get("max_layers"), max_kinds=raw.get("max_kinds"),
                    sampler=raw.get("sampler", "all"),
                    samples=int(raw.get("samples", 40)), seed=int(raw.get("seed", 0)),
                    skip_early=int(raw.get("skip_early", 0)),
                    extra={k: raw[k] for k in raw if k not in cls.__dataclass_fields__})
        if shape is not None:
            space.validate(shape)
        return space

    def validate(self, shape: ModelShape) -> None:
        for m in self.methods:
            config_class(m)
        if not self.layers or not self.kinds or not self.ranks:
            raise RankcutError("the space has an empty layer, kind or rank list")
        if self.sampler not in ("all", "random", "heuristic", "greedy"):
            raise RankcutError(f"unknown sampler '{self.sampler}'; use all, random, heuristic or greedy")
        for r in self.ranks:
            if isinstance(r, float) and not 0 < r <= 1:
                raise RankcutError(f"rank fraction {r} is outside (0, 1]")
            shape.validate(Configuration(self.methods[0], tuple(self.layers), tuple(self.kinds), r))

    def count(self) -> int:
        """Configurations in the space: non-empty layer subsets × non-empty kind subsets × ranks × methods."""
        def subsets(n: int, most: int | None) -> int:
            return sum(math.comb(n, k) for k in range(1, min(most or n, n) + 1))

        return (subsets(len(self.layers), self.max_layers) * subsets(len(self.kinds), self.max_kinds)
                * len(self.ranks) * len(self.methods))

    def enumerate(self, limit: int = 100_000) -> Iterator[Configuration]:
        if self.count() > limit:
            raise RankcutError(f"the space has {self.count():,} configurations; sample it instead "
                               "(sampler: random or heuristic)")
        top = self.max_layers or len(self.layers)
        for k in range(1, top + 1):
            for layers in itertools.combinations(self.layers, k):
                for nk in range(1, (self.max_kinds or len(self.kinds)) + 1):
                    for kinds in itertools.combinations(self.kinds, nk):
                        for rank in self.ranks:
                            for method in self.methods:
                                yield Configuration(method, layers, kinds, rank)

    def cells(self) -> list[Configuration]:
        """Every (layer, kind) alone, at the space's first method and rank: what greedy ranks."""
        return [Configuration(self.methods[0], (layer,), (kind,), self.ranks[0])
                for layer in self.layers if layer >= self.skip_early for kind in self.kinds]

    def greedy(self, sensitivity: dict[str, float]) -> list[Configuration]:
        """Cuts grown one (layer, kind) at a time, least sensitive first, by the single-cell
        proxy losses in `sensitivity` (key → loss): `samples` cuts of 2, 3, ... cells. The order
        is fixed by the single-cell losses (not re-measured after each addition), so the whole
        path costs one proxy run per cell plus one per cut."""
        singles = self.cells()
        missing = [c.key() for c in singles if c.key() not in sensitivity]
        if missing:
            raise RankcutError(f"greedy needs every single cell's proxy loss first; missing {missing[0]}")
        order = sorted(singles, key=lambda c: sensitivity[c.key()])
        return [Configuration.of_cells(self.methods[0], [(c.layers[0], c.kinds[0]) for c in order[:n]],
                                       self.ranks[0])
                for n in range(2, min(self.samples, len(order) - 1) + 2)]

    def sample(self) -> list[Configuration]:
        """`samples` distinct configurations by the space's sampler, reproducible by seed."""
        if self.sampler == "greedy":
            return self.cells()  # the first round; `greedy` builds the cuts from their results
        if self.sampler == "all":
            return list(self.enumerate())
        rng = random.Random(self.seed)
        out: dict[str, Configuration] = {}
        pool = [i for i in self.layers if i >= self.skip_early] if self.sampler == "heuristic" else self.layers
        if not pool:
            raise RankcutError(f"skip_early={self.skip_early} leaves no layer to pick")
        attempts = 0
        while len(out) < min(self.samples, self.count()) and attempts < 100 * self.samples:
            attempts += 1
            top = min(self.max_layers or len(pool), len(pool))
            k = rng.randint(1, top)
            layers = sorted(rng.sample(pool, k))
            if self.sampler == "heuristic":
                layers = non_adjacent(layers)
                kinds = tuple(self.kinds)  # the paper's recipe: every kind of the chosen layers
            else:
                most = min(self.max_kinds or len(self.kinds), len(self.kinds))
                kinds = tuple(sorted(rng.sample(self.kinds, rng.randint(1, most)), key=self.kinds.index))
            config = Configuration(rng.choice(self.methods), tuple(layers), kinds, rng.choice(self.ranks))
            out.setdefault(config.key(), config)
        return list(out.values())


def non_adjacent(layers: Sequence[int]) -> list[int]:
    """Drop every layer that directly follows one already kept."""
    kept: list[int] = []
    for i in sorted(layers):
        if not kept or i - kept[-1] > 1:
            kept.append(i)
    return kept
