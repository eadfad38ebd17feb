"""Rank policies: how many singular directions each module keeps.

A policy is one of: a fixed rank (or a Tucker pair), a keep ratio (the fraction of the
module's parameters the factors may hold), or an energy fraction (smallest rank whose
singular values hold that share of the squared Frobenius norm). Fixed ranks and keep ratios
are checked against every module's shape before any factorization starts, so bad input fails
fast and leaves the model untouched.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import torch

from .errors import RankcutError


@dataclass(frozen=True)
class RankPolicy:
    rank: int | tuple[int, int] | None = None
    keep: float | None = None
    energy: float | None = None
    budget: float | None = None
    allow_growth: bool = False
    pivot: bool = False

    def __post_init__(self) -> None:
        given = [x is not None for x in (self.rank, self.keep, self.energy, self.budget)]
        if sum(given) != 1:
            raise RankcutError("give exactly one of rank, keep, energy or budget (e.g. --keep 0.5)")
        if self.budget is not None and not 0.0 < self.budget <= 1.0:
            raise RankcutError(f"budget {self.budget} is outside (0, 1]; e.g. --budget 0.5 keeps half "
                               "of the targeted parameters overall")
        if self.keep is not None and not 0.0 < self.keep <= 1.0:
            raise RankcutError(f"keep ratio {self.keep} is outside (0, 1]; e.g. --keep 0.5 keeps half")
        if self.energy is not None and not 0.0 < self.energy <= 1.0:
            raise RankcutError(f"energy fraction {self.energy} is outside (0, 1]; e.g. --energy 0.9")
        ranks = self.rank if isinstance(self.rank, tuple) else (self.rank,)
        if self.rank is not None and any(int(r) != r or r < 1 for r in ranks):
            raise RankcutError(f"rank {self.rank!r} must be a positive integer (or a pair for Tucker)")

    def describe(self) -> dict:
        if self.rank is not None:
            return {"rank": list(self.rank) if isinstance(self.rank, tuple) else self.rank}
        if self.budget is not None:
            return {"budget": self.budget}
        return {"keep": self.keep} if self.keep is not None else {"energy": self.energy}


def factor_params(out_features: int, in_features: int, rank: int | tuple[int, int], pivot: bool = False) -> int:
    """Numbers stored by the factors (bias excluded).

    `pivot`: the pivoted form (layers.PivotLowRankLinear) holds r of the output rows exactly as
    the r × in factor and the other rows as combinations of them, r·(out + in) − r² numbers:
    the r × r block that the plain form spends on those rows' coordinates is an identity.
    """
    if isinstance(rank, tuple):
        r_out, r_in = rank
        return out_features * r_out + r_out * r_in + r_in * in_features
    return rank * (out_features + in_features) - (rank * rank if pivot else 0)


def keep_rank(out_features: int, in_features: int, keep: float, pivot: bool = False) -> int:
    """Largest rank whose factors hold at most `keep` of the dense parameters (at least 1)."""
    m, n = out_features, in_features
    if pivot:  # r² − (m + n)·r + keep·m·n ≤ 0, the smaller root
        s = m + n
        rank = math.floor((s - math.sqrt(max(s * s - 4.0 * keep * m * n, 0.0))) / 2 + 1e-9)
        return max(1, min(rank, min(m, n)))
    return max(1, math.floor(keep * m * n / (m + n) + 1e-9))


def energy_rank(singular_values: torch.Tensor, energy: float) -> int:
    power = singular_values.double() ** 2
    total = float(power.sum())
    if total == 0.0:
        return 1
    cumulative = torch.cumsum(power, 0) / total
    return int(torch.searchsorted(cumulative, torch.tensor(energy - 1e-12, dtype=cumulative.dtype)).item()) + 1


def check_rank(name: str, out_features: int, in_features: int, rank: int | tuple[int, int],
               allow_growth: bool, pivot: bool = False) -> None:
    """Refuse ranks the matrix cannot have, and ranks that would make the module larger."""
    limits = (out_features, in_features)
    pair = rank if isinstance(rank, tuple) else (rank, rank)
    for r, limit, side in zip(pair, limits, ("output", "input")):
        if r > limit:
            raise RankcutError(
                f"rank {r} is larger than {name}'s {side} size {limit} "
                f"(shape {out_features}×{in_features}); use a rank ≤ {min(limits)}"
            )
    if not allow_growth and factor_params(out_features, in_features, rank, pivot) > out_features * in_features:
        breakeven = out_features * in_features / (out_features + in_features)
        raise RankcutError(
            f"rank {rank} on {name} ({out_features}×{in_features}) stores more numbers than the dense "
            f"matrix (break-even rank {breakeven:.1f}); lower the rank or pass --allow-growth"
        )


def resolve_rank(policy: RankPolicy, name: str, out_features: int, in_features: int,
                 singular_values: torch.Tensor | None = None) -> int | tuple[int, int]:
    """The rank this policy gives one module; `singular_values` is needed only for energy."""
    if policy.rank is not None:
        rank = policy.rank
    elif policy.keep is not None:
        rank = keep_rank(out_features, in_features, policy.keep, policy.pivot)
    elif policy.budget is not None:
        # Budgeted: factor at the largest useful rank now; `allocate_budget` cuts later.
        rank = budget_cap(out_features, in_features)
    else:
        if singular_values is None:
            raise ValueError("energy policy needs the singular values")
        rank = min(energy_rank(singular_values, policy.energy), min(out_features, in_features))
        if not policy.allow_growth and not policy.pivot:
            rank = min(rank, max(1, math.floor(out_features * in_features / (out_features + in_features))))
    check_rank(name, out_features, in_features, rank, policy.allow_growth, policy.pivot)
    return rank


def budget_cap(out_features: int, in_features: int) -> int:
    """The rank a one-pass budgeted module is factored at before the cut: the plain form's
    break-even rank, so the factors waiting for the cut never outweigh the dense matrix."""
    return max(1, math.floor(out_features * in_features / (out_features + in_features) + 1e-9))


@dataclass
class AllocationItem:
    name: str
    out_features: int
    in_features: int
    importance: torch.Tensor  # descending worth of each direction, comparable across items
    cap: int
    dense_at_cap: bool = False  # at its cap the module is kept dense: the last step costs up to m·n
    pivot: bool = False  # priced in the pivoted form: each further direction costs 2 fewer numbers

    def params(self, rank: Any) -> Any:
        """Numbers stored at `rank` (an int, or a float tensor of ranks)."""
        return factor_params(self.out_features, self.in_features, rank, self.pivot)

    def step_cost(self, rank: int) -> int:
        """Parameters added by going from `rank` to `rank + 1`."""
        if self.dense_at_cap and rank + 1 == self.cap:
            return self.out_features * self.in_features - self.params(rank)
        return self.params(rank + 1) - self.params(rank)

    def step_costs(self, start: int, stop: int) -> torch.Tensor:
        """`step_cost` of ranks start … stop − 1, without the dense jump."""
        r = torch.arange(start, stop, dtype=torch.float64)
        return self.params(r + 1) - self.params(r)


def allocate_budget(items: list[AllocationItem], budget_params: int, min_rank: int = 1) -> dict[str, int]:
    """Global allocation: take directions by worth per parameter until the budget is spent.

    Every module keeps at least `min_rank`. Because each module's worths are sorted, the greedy
    pick within a module is always a prefix, so a chosen count is a rank. Items that may stay
    dense first get the Lagrangian choice between their ranks and dense (`_lagrangian_start`),
    then the greedy tops up what budget is left.
    """
    start = {it.name: min(min_rank, it.cap) for it in items}
    if any(it.dense_at_cap for it in items):
        start = _lagrangian_start(items, budget_params, start)
    return _greedy_from(items, budget_params, start)


def _options(it: AllocationItem, lowest: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(worth kept, parameters) of each choice: ranks lowest … cap − 1, then dense (all the
    worth, m·n parameters); or ranks lowest … cap for an item that cannot stay dense."""
    worth = torch.cummin(it.importance.double().clamp(min=0), dim=0).values
    kept = torch.cat([worth.new_zeros(1), torch.cumsum(worth, 0)])
    top = it.cap - 1 if it.dense_at_cap else it.cap
    ranks = torch.arange(lowest, max(lowest, top) + 1)
    value, cost = kept[ranks.clamp(max=worth.numel())], it.params(ranks.double())
    if it.dense_at_cap:
        value = torch.cat([value, kept[-1:]])
        cost = torch.cat([cost, cost.new_tensor([float(it.out_features * it.in_features)])])
    return value, cost


def _lagrangian_start(items: list[AllocationItem], budget_params: int, lowest: dict[str, int]) -> dict[str, int]:
    """Choose every item's rank, or dense, to maximize Σ worth − λ·Σ parameters, with the
    price λ bisected to the cheapest one within the budget. Going dense buys a module's whole
    tail of worth at once, a step the one-direction-at-a-time greedy cannot see."""
    opts = [_options(it, lowest[it.name]) for it in items]

    def choose(price: float) -> tuple[list[int], float]:
        picks = [int(torch.argmax(v - price * c)) for v, c in opts]
        return picks, float(sum(c[i] for (_, c), i in zip(opts, picks)))

    lo, hi = 0.0, max(float((v[1:] - v[:-1]).max() / (c[1:] - c[:-1]).min()) if v.numel() > 1 else 0.0
                      for v, c in opts) * 2 + 1e-30
    picks, spent = choose(hi)
    if spent > budget_params:
        return lowest  # nothing but the minimum fits; the greedy reports it
    for _ in range(100):
        mid = (lo + hi) / 2
        trial, cost = choose(mid)
        if cost <= budget_params:
            hi, picks = mid, trial
        else:
            lo = mid
    start = {}
    for it, pick, (v, _) in zip(items, picks, opts):
        dense = it.dense_at_cap and pick == v.numel() - 1
        start[it.name] = it.cap if dense else lowest[it.name] + pick
    return start


def _greedy_from(items: list[AllocationItem], budget_params: int, ranks: dict[str, int]) -> dict[str, int]:
    ranks = dict(ranks)
    spent = sum(it.params(ranks[it.name]) if ranks[it.name] < it.cap or not it.dense_at_cap
                else it.out_features * it.in_features for it in items)
    if spent > budget_params:
        raise RankcutError(f"budget of {budget_params:,} parameters is below the minimum of rank "
                           f"{min(ranks.values())} everywhere ({spent:,}); raise --budget or target fewer modules")
    scores, owners = [], []
    for idx, it in enumerate(items):
        worth = it.importance[ranks[it.name]:it.cap].double()
        # Enforce the prefix property even if a method's worths are not perfectly sorted (in
        # the pivoted form later directions are also cheaper: the worth per parameter may rise).
        score = worth / it.step_costs(ranks[it.name], ranks[it.name] + worth.numel())
        scores.append(torch.cummin(score, dim=0).values)
        owners.append(torch.full((worth.numel(),), idx, dtype=torch.long))
    if not scores:
        return ranks
    score = torch.cat(scores)
    owner = torch.cat(owners)
    for pos in torch.argsort(score, descending=True, stable=True).tolist():
        it = items[int(owner[pos])]
        cost = it.step_cost(ranks[it.name])
        if spent + cost > budget_params:
            continue
        ranks[it.name] += 1
        spent += cost
    return ranks


def allocation_cap(target: Any, pivot: bool = False, full_range: bool = False,
                   limits: Mapping[str, int] | None = None) -> int:
    """The rank at which an allocated module is kept dense instead (exact, for no more than m·n).

    The plain form's break-even rank, unless the factors are computed after the allocation
    (`full_range`, so none wait at a cap) and stored pivoted: then any rank below min(m, n)
    is smaller than dense. With speed `limits` (see rankcut.speed.limits), also one above the
    highest rank that runs faster than dense here."""
    if pivot and full_range:
        cap = min(target.out_features, target.in_features)
    else:
        cap = budget_cap(target.out_features, target.in_features)
    if limits is not None:
        cap = min(cap, limit_of(limits, target.out_features, target.in_features, target.name) + 1)
    return cap


def allocate_targets(targets: list, worths: dict[str, torch.Tensor], budget_params: int,
                     pivot: bool = False, full_range: bool = False,
                     limits: Mapping[str, int] | None = None) -> dict[str, int]:
    """`allocate_budget` over targets (anything with name, out_features, in_features); a module
    given its `allocation_cap` is kept dense. `pivot`: ranks priced in the pivoted form.

    A module whose cap is rank 1 (no rank runs faster than dense here) has no choice: it stays
    dense and its m·n parameters come out of the budget before the others share it."""
    caps = {t.name: allocation_cap(t, pivot, full_range, limits) for t in targets}
    fixed = forced_dense(targets, budget_params, pivot, full_range, limits)
    left = budget_params - sum(t.out_features * t.in_features for t in fixed)
    items = [AllocationItem(t.name, t.out_features, t.in_features, worths[t.name],
                            cap=caps[t.name], dense_at_cap=True, pivot=pivot)
             for t in targets if caps[t.name] > 1]
    ranks = allocate_budget(items, left) if items else {}
    ranks.update({t.name: caps[t.name] for t in fixed})
    return ranks


def forced_dense(targets: list, budget_params: int, pivot: bool = False, full_range: bool = False,
                 limits: Mapping[str, int] | None = None) -> list:
    """The targets that no rank makes faster than dense here (cap 1), so they stay dense; or an
    error when their dense parameters alone exceed the budget (checked before any calibration)."""
    fixed = [t for t in targets if allocation_cap(t, pivot, full_range, limits) <= 1]
    taken = sum(t.out_features * t.in_features for t in fixed)
    if taken > budget_params:
        shapes = ", ".join(sorted({shape_key(t.out_features, t.in_features) for t in fixed}))
        why = ("run no faster factored than dense here" if limits is not None
               else "are too small to factor (no rank holds fewer numbers)")
        raise RankcutError(f"{len(fixed)} targeted modules {why} (shapes {shapes}), and kept dense they alone "
                           f"take {taken:,} parameters, more than the budget's {budget_params:,}: raise "
                           "--budget, target other modules" + (", or drop --speed" if limits is not None else ""))
    return fixed


# ------------------------------------------------------------------ speed limits, as config data
# (measured by rankcut.speed.limits; kept here, beside the allocation that reads them)


def shape_key(out_features: int, in_features: int) -> str:
    return f"{out_features}x{in_features}"


def size_limit(out_features: int, in_features: int, pivot: bool = False) -> int:
    """The highest rank a budget may give a module factored (one less than its `allocation_cap`
    without speed limits; for pivoted factors computed after the allocation, below min(m, n))."""
    if pivot:
        return min(out_features, in_features) - 1
    return budget_cap(out_features, in_features) - 1


def check_limits(limits: Any) -> dict[str, int]:
    """A speed-limits map (shape "OUTxIN" → a rank ≥ 0) as a config field, or what is wrong with it."""
    if not isinstance(limits, Mapping):
        raise RankcutError(f"speed_limits maps a shape such as '576x1536' to a rank, not a {type(limits).__name__}")
    clean = {}
    for key, rank in limits.items():
        parts = str(key).split("x")
        if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise RankcutError(f"speed_limits key {key!r}: a shape written OUTxIN, such as '576x1536'")
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
            raise RankcutError(f"speed_limits[{key!r}] = {rank!r}: a rank, an integer ≥ 0")
        clean[str(key)] = rank
    return clean


def limit_of(limits: Mapping[str, int], out_features: int, in_features: int, name: str) -> int:
    """A module's speed limit, or an error naming how to measure the missing shape."""
    key = shape_key(out_features, in_features)
    if key not in limits:
        raise RankcutError(f"speed_limits has no entry for {name}'s shape {key}: measure the limits "
                           "for these targets with rankcut.speed_limits(model, targets)")
    return limits[key]
