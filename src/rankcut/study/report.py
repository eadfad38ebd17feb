"""Sweep results (JSONL) to a table, a Pareto plot and a layer × kind sensitivity heatmap."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

from ..core.errors import RankcutError, require
from ..core.fsutil import atomic_dir
from .sweep import ResultsFile, pareto_front


def _task_score(metrics: dict[str, dict[str, float]]) -> float:
    """Mean of each task's headline accuracy (acc_norm where reported, else acc)."""
    values = [m.get("acc_norm", m.get("acc", m.get("accuracy"))) for m in metrics.values()]
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else float("nan")


def baselines_md(rows: list[dict[str, Any]]) -> str:
    base = [r for r in rows if r.get("kind") == "baseline"]
    if not base:
        return ""
    lines = ["", "Baselines (same sizes):", "", "| baseline | params | KL | proxy ppl |", "|---|---|---|---|"]
    for r in sorted(base, key=lambda r: (r["baseline"], -r["params"])):
        what = r["baseline"] + (f" L{','.join(map(str, r['layers']))}" if "layers" in r else "")
        lines.append(f"| {what} | {r['params']:,} | {r['proxy']['kl']:.4f} | {r['proxy']['perplexity']:.2f} |")
    return "\n".join(lines) + "\n"


def _family(row: dict[str, Any]) -> str:
    """Which series a benchmarked row belongs to: dense, a baseline, or the sweep's configurations."""
    if row.get("config") is None and not row.get("baseline"):
        return "dense"
    return row.get("baseline") or "configurations"


def _config_name(c: dict[str, Any]) -> str:
    if c.get("cells"):
        return f"{c['method']} cells {' '.join(f'{layer}:{kind}' for layer, kind in c['cells'])} r={c['rank']}"
    return f"{c['method']} L{','.join(map(str, c['layers']))} {'+'.join(c['kinds'])} r={c['rank']}"


def _front_name(row: dict[str, Any]) -> str:
    c = row.get("config")
    return _family(row) if c is None else _config_name(c)


def with_timings(rows_all: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The benchmarked rows, each with its paired timing (`timing|KEY` rows) folded in; the dense
    row gets speed-up 1 and the median of the dense timings. A sweep benchmarked before timings
    were paired keeps the one-off `prefill_ms` it recorded, marked unpaired."""
    timings = {r["front_key"]: r for r in rows_all if r.get("kind") == "timing"}
    dense_ms = sorted(t["dense_prefill_ms"] for t in timings.values())
    out = []
    for r in rows_all:
        if r.get("kind") != "front":
            continue
        r = dict(r)
        t = timings.get(r["key"])
        if t is not None:
            r.update(prefill_ms=t["prefill_ms"], prefill_speedup=t["prefill_speedup"], paired=True)
        elif _family(r) == "dense" and dense_ms:
            r.update(prefill_ms=dense_ms[len(dense_ms) // 2], prefill_speedup=1.0, paired=True)
        else:
            r["paired"] = False
        out.append(r)
    return out


def front_of(rows: list[dict[str, Any]], x: Callable[[dict[str, Any]], float], larger_x_better: bool
             ) -> list[dict[str, Any]]:
    """Rows no other row beats on both the x axis and mean task accuracy, in x order."""
    sign = -1.0 if larger_x_better else 1.0
    return pareto_front(rows, cost=lambda r: sign * x(r), loss=lambda r: -_task_score(r["tasks"]))


def table_md(rows: list[dict[str, Any]], front_rows: list[dict[str, Any]]) -> str:
    dense = rows[0]["dense_params"] if rows else None
    lines = ["| configuration | params | size cut | KL | proxy ppl |", "|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: r["params"]):
        name = _config_name(r["config"])
        lines.append(f"| {name} | {r['params']:,} | {1 - r['params'] / dense:.1%} | {r['proxy']['kl']:.4f} "
                     f"| {r['proxy']['perplexity']:.2f} |")
    if front_rows:
        tasks = sorted({t for r in front_rows for t in r["tasks"]})
        paired = any(r.get("paired") and "prefill_speedup" in r for r in front_rows)
        lines += ["", "Full benchmarks on the proxy's Pareto front"
                  + (" (prefill: one proxy window, each model timed in turn with dense; speed-up = dense ms ÷ "
                     "model ms, both medians):" if paired else
                     " (prefill ms: one-off timings of each model alone, not paired with dense):"), "",
                  "| model | params | prefill ms | speed-up | " + " | ".join(tasks) + " | mean |",
                  "|---|---|---|---|" + "---|" * (len(tasks) + 1)]
        for r in sorted(front_rows, key=lambda r: (-r["params"], _family(r))):
            name = _front_name(r)
            cells = []
            for t in tasks:
                m = r["tasks"].get(t, {})
                v = m.get("acc_norm", m.get("acc", m.get("perplexity")))
                cells.append("" if v is None else f"{v:.3f}")
            # in a paired table a row not yet timed shows nothing, not an old one-off figure
            ms = f"{r['prefill_ms']:.1f}" if "prefill_ms" in r and (r.get("paired") or not paired) else ""
            speedup = f"{r['prefill_speedup']:.2f}×" if r.get("paired") and "prefill_speedup" in r else ""
            lines.append(f"| {name} | {r['params']:,} | {ms} | {speedup} | " + " | ".join(cells)
                         + f" | {_task_score(r['tasks']):.3f} |")
    return "\n".join(lines) + "\n"


def _accuracy_panel(ax: Any, rows: list[dict[str, Any]], x: Callable[[dict[str, Any]], float], label: str,
                    larger_x_better: bool) -> None:
    """Every benchmarked model as a point by family, and the front of the best accuracy for the x
    axis as a step line (connecting every point would draw a curve no model lies on)."""
    for family, style in (("configurations", "o"), ("drop-layers", "x"), ("dense", "*")):
        pts = [r for r in rows if _family(r) == family]
        if pts:
            ax.scatter([x(r) for r in pts], [_task_score(r["tasks"]) for r in pts], marker=style,
                       s=90 if family == "dense" else 30, color={"dense": "red", "drop-layers": "black"}.get(family),
                       label=family)
    budget = [r for r in rows if _family(r).startswith("budget")]
    if budget:
        ax.scatter([x(r) for r in budget], [_task_score(r["tasks"]) for r in budget], marker="^", color="green",
                   label=_family(budget[0]))
    front = front_of(rows, x, larger_x_better)
    if len(front) > 1:
        ax.step([x(r) for r in front], [_task_score(r["tasks"]) for r in front], where="post", color="red",
                alpha=0.5, label="best accuracy front")
    ax.set_xlabel(label)
    ax.set_ylabel("mean task accuracy")
    ax.legend(fontsize=8)


REPORT_FILES = frozenset({"table.md", "pareto.png", "sensitivity.png", "summary.json"})


def write_report(results_path: str | Path, out: str | Path, overwrite: bool = False) -> Path:
    """Write the report's files into `out`; a rerun replaces an earlier report there, and a folder
    holding anything else is refused unless `overwrite`."""
    require("matplotlib", "plot", "the report's plots")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows_all = ResultsFile(results_path).rows() if Path(results_path).is_file() else None
    if not rows_all:
        raise RankcutError(f"{results_path} has no results; run `rankcut sweep` first")
    rows = [r for r in rows_all if r.get("kind") == "config"]
    front_rows = with_timings(rows_all)
    with atomic_dir(out, overwrite=overwrite, replaceable=REPORT_FILES) as tmp:
        (tmp / "table.md").write_text(table_md(rows, front_rows) + baselines_md(rows_all))
        fig, axes = plt.subplots(1, 3 if front_rows else 1, figsize=(16 if front_rows else 6, 4.5), squeeze=False)
        ax = axes[0][0]
        ax.scatter([r["params"] / 1e6 for r in rows], [r["proxy"]["kl"] for r in rows], s=12, alpha=0.6,
                   label="configurations")
        front = pareto_front(rows)
        ax.plot([r["params"] / 1e6 for r in front], [r["proxy"]["kl"] for r in front], "r.-", label="Pareto front")
        baselines = [r for r in rows_all if r.get("kind") == "baseline"]
        for name, marker in (("drop-layers", "kx"), ):
            pts = [r for r in baselines if r["baseline"] == name and len(r.get("layers", [])) > 0]
            if pts:
                ax.plot([r["params"] / 1e6 for r in pts], [r["proxy"]["kl"] for r in pts], marker, label=name)
        budget_pts = sorted([r for r in baselines if r["baseline"].startswith("budget")], key=lambda r: r["params"])
        if budget_pts:
            ax.plot([r["params"] / 1e6 for r in budget_pts], [r["proxy"]["kl"] for r in budget_pts], "g^-",
                    label=budget_pts[0]["baseline"])
        ax.set_xlabel("parameters (M)")
        ax.set_ylabel("KL to dense (proxy)")
        ax.set_yscale("log")
        ax.legend()
        if front_rows:
            _accuracy_panel(axes[0][1], front_rows, lambda r: r["params"] / 1e6, "parameters (M)", False)
            if any(r.get("paired") for r in front_rows):
                timed = [r for r in front_rows if r.get("paired")]
                _accuracy_panel(axes[0][2], timed, lambda r: r["prefill_speedup"],
                                "prefill speed-up over dense (paired, proxy window)", True)
            else:
                timed = [r for r in front_rows if "prefill_ms" in r]
                _accuracy_panel(axes[0][2], timed, lambda r: r["prefill_ms"],
                                "prefill ms (one-off, not paired with dense)", False)
        fig.tight_layout()
        fig.savefig(tmp / "pareto.png", dpi=120)
        plt.close(fig)
        single = [r for r in rows if len(r["config"]["layers"]) == 1 and len(r["config"]["kinds"]) == 1
                  and not r["config"].get("cells")]
        if single:
            layers = sorted({r["config"]["layers"][0] for r in single})
            kinds = list(dict.fromkeys(r["config"]["kinds"][0] for r in single))
            grid = [[float("nan")] * len(kinds) for _ in layers]
            for r in single:
                grid[layers.index(r["config"]["layers"][0])][kinds.index(r["config"]["kinds"][0])] = r["proxy"]["kl"]
            fig, ax = plt.subplots(figsize=(1 + 0.8 * len(kinds), 1 + 0.25 * len(layers)))
            from matplotlib.colors import LogNorm

            positive = [v for row in grid for v in row if v > 0]
            norm = LogNorm(min(positive), max(positive)) if len(positive) > 1 else None  # spans decades
            im = ax.imshow(grid, aspect="auto", cmap="viridis", norm=norm)
            ax.set_xticks(range(len(kinds)), kinds)
            ax.set_yticks(range(len(layers)), layers)
            ax.set_xlabel("kind")
            ax.set_ylabel("layer")
            fig.colorbar(im, label="KL to dense (log scale)")
            fig.tight_layout()
            fig.savefig(tmp / "sensitivity.png", dpi=120)
            plt.close(fig)
        (tmp / "summary.json").write_text(json.dumps({"configurations": len(rows), "front": len(front),
                                                      "benchmarked": len(front_rows)}, indent=2))
    return Path(out)
