"""The contract between `compress_` and the ways of factorizing a weight.

As in torchao, a method is chosen by the type of its config object: each method module
registers a handler for its config class. A handler sees one dense weight (float64, out × in)
and returns factors; it never touches the model, so methods stay independent of module
swapping, calibration hooks and saving.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Callable, ClassVar, Protocol

import torch

from ..calibration.sources import Calibration
from ..core.errors import RankcutError
from ..core.ranks import RankPolicy, check_limits


@dataclass
class MethodConfig:
    """Fields every method shares: one rank policy (rank, keep, energy or budget), and the form
    the factors are stored in."""

    rank: int | tuple[int, int] | None = None
    keep: float | None = None
    energy: float | None = None
    budget: float | None = None
    allow_growth: bool = False
    # store each factored module pivoted (layers.PivotLowRankLinear): the same map in r² fewer
    # numbers, so a keep ratio or budget buys a higher rank
    pivot: bool = False
    # with a budget: by shape "OUTxIN", the highest rank whose factors run faster than dense on
    # the machine that measured it (rankcut.speed_limits). Each module then gets a rank up to its
    # limit or stays dense, so the budget still holds once every factored module is a fast one.
    speed_limits: dict[str, int] | None = None

    method_name = "base"
    # the layout of `to_dict` for this method; raised when a field's meaning changes, so that a
    # manifest written by a newer rankcut is refused instead of misread
    version: ClassVar[int] = 1
    needs: ClassVar[frozenset[str]] = frozenset()  # calibration statistics the method reads

    def __post_init__(self) -> None:
        if isinstance(self.rank, list):
            self.rank = tuple(self.rank)
        self.policy  # validate now, not halfway through a model
        calibration = getattr(self, "calibration", None)
        if isinstance(calibration, str):  # a text source by name or path: the default amounts of it
            self.calibration = Calibration(text=calibration)
        elif calibration is not None and not hasattr(calibration, "describe"):
            raise RankcutError(f"calibration={calibration!r}: give a text source (such as 'gensim-wiki', a train "
                               "split or a file path) or rankcut.Calibration(text=..., samples=..., seqlen=...)")
        if self.speed_limits is not None:
            if self.budget is None:
                raise RankcutError("speed_limits shape a budget's allocation: give budget=F with them (with "
                                   "keep, rank or energy, rankcut.speed.layouts.speed_up_ puts back dense each module "
                                   "not faster here)")
            self.speed_limits = check_limits(self.speed_limits)

    @property
    def policy(self) -> RankPolicy:
        return RankPolicy(rank=self.rank, keep=self.keep, energy=self.energy, budget=self.budget,
                          allow_growth=self.allow_growth, pivot=self.pivot)

    def to_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in asdict(self).items() if v is not None and not k.startswith("_")}
        if "calibration" in out:
            out["calibration"] = self.calibration.describe()
        if isinstance(out.get("rank"), tuple):
            out["rank"] = list(out["rank"])
        return {"method": self.method_name, "version": self.version, **out}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MethodConfig:
        """The config `to_dict` wrote (a manifest's `config`, or a module's): `MethodConfig.from_dict`
        picks the class by its method name, `SVD.from_dict` insists on its own."""
        if not isinstance(data, dict) or not isinstance(data.get("method"), str):
            raise RankcutError(f"{data!r} is not a method config: it needs a 'method' name (as to_dict writes)")
        target = config_class(data["method"])
        if cls is not MethodConfig and target is not cls:
            raise RankcutError(f"config for method '{data['method']}' given to {cls.__name__}.from_dict; use "
                               "MethodConfig.from_dict to take any method")
        version = data.get("version", 1)
        if not isinstance(version, int) or version > target.version:
            raise RankcutError(f"config of method '{data['method']}' has version {version!r}, newer than this "
                               f"rankcut's {target.version}; upgrade rankcut to read it")
        kwargs = {k: v for k, v in data.items() if k not in ("method", "version")}
        unknown = sorted(set(kwargs) - target.field_names())
        if unknown:
            raise RankcutError(f"config of method '{data['method']}' has unknown field(s) {', '.join(unknown)}")
        if isinstance(kwargs.get("calibration"), dict):
            kwargs["calibration"] = Calibration.from_dict(kwargs["calibration"])
        return target(**kwargs)

    @classmethod
    def field_names(cls) -> set[str]:
        return {f.name for f in fields(cls)}


@dataclass
class Factors:
    """W ≈ out_factor · core · in_factor (core absent in the two-factor form)."""

    out_factor: torch.Tensor
    in_factor: torch.Tensor
    core: torch.Tensor | None = None
    # squared singular values, in the method's own error metric, of every direction it saw:
    # what budgeted allocation compares across modules
    importance: torch.Tensor | None = None

    @property
    def rank(self) -> int | tuple[int, int]:
        if self.core is not None:
            return (self.core.shape[0], self.core.shape[1])
        return self.in_factor.shape[0]

    def product(self) -> torch.Tensor:
        inner = self.in_factor if self.core is None else self.core @ self.in_factor
        return self.out_factor @ inner


class Handler(Protocol):
    """A method's arithmetic on a float64 weight. With `overwrite` the caller hands over a copy
    the handler may write over (a 7B model's MLP weight is 360 MB in float64, and a second copy
    of it would set the compression's peak); without, `weight` is left as it was."""

    def __call__(self, weight: torch.Tensor, config: Any, name: str, stats: Any = None,
                 overwrite: bool = False) -> Factors: ...


_HANDLERS: dict[type, Handler] = {}
_BY_NAME: dict[str, type] = {}


def register_method(config_cls: type) -> Callable[[Handler], Handler]:
    def wrap(handler: Handler) -> Handler:
        _HANDLERS[config_cls] = handler
        _BY_NAME[config_cls.method_name] = config_cls
        return handler
    return wrap


def handler_for(config: MethodConfig) -> Handler:
    for cls in type(config).__mro__:
        if cls in _HANDLERS:
            return _HANDLERS[cls]
    raise RankcutError(f"no method registered for {type(config).__name__}: give a method config such as "
                       "rankcut.SVD(keep=0.5) or rankcut.Whiten(budget=0.8)")


def config_class(name: str) -> type:
    if name not in _BY_NAME:
        raise RankcutError(f"unknown method '{name}'; choose one of {', '.join(sorted(_BY_NAME))}")
    return _BY_NAME[name]


def method_names() -> list[str]:
    return sorted(_BY_NAME)
