"""The ranks a model was cut to, per layer and kind, as a plot (`ranks.png` beside a saved model)."""

from __future__ import annotations

import io
from pathlib import Path

from torch import nn

from ..core.errors import RankcutError, installed, require
from ..core.fsutil import atomic_write_bytes
from ..core.record import record_of


def rank_fraction(record: dict) -> float:
    """A module's rank over its full rank: 1 for a module left (or put back) dense; the larger of
    a Tucker pair, which bounds the map's rank."""
    rank = record.get("rank")
    if rank is None:
        return 1.0
    if isinstance(rank, (list, tuple)):
        rank = max(rank)
    return min(1.0, rank / min(record["out_features"], record["in_features"]))


def plot_ranks_beside(model: nn.Module, folder: str | Path) -> Path | None:
    """`folder`/ranks.png, or None without matplotlib (an optional extra): the ranks are in the
    saved model's rankcut.json either way, so a missing plot never fails a finished run."""
    return plot_ranks(model, Path(folder) / "ranks.png") if installed("matplotlib") else None


def plot_ranks(model: nn.Module, path: str | Path) -> Path:
    """Rank per layer and kind, as a fraction of the module's full rank, written atomically: where
    a budget (or SoftLMs' thresholds) put the parameters, at a glance."""
    require("matplotlib", "plot", "the ranks plot")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modules = record_of(model).modules
    if not modules:
        raise RankcutError("the model has no compressed modules to plot")
    fig, ax = plt.subplots(figsize=(9, 4))
    kinds = list(dict.fromkeys(r["kind"] for r in modules.values()))
    for kind in kinds:
        rows = sorted((r["layer"], rank_fraction(r)) for r in modules.values()
                      if r["kind"] == kind and r["layer"] is not None)
        ax.plot([a for a, _ in rows], [b for _, b in rows], "o-", ms=3, label=kind)
    ax.set_xlabel("layer")
    ax.set_ylabel("rank / full rank (dense = 1)")
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: the lines fill the axes
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)
