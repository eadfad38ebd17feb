"""Linears alone: a stack of SmolLM2-shaped linears, dense against factored at 50%, eager and
under each `torch.compile` mode of `speed.py`, so a mode's effect on the matmuls can be told
apart from its effect on a whole model (attention, norms, the KV cache, `generate`).

Each layer is q, o (576 → 576) and gate, up, down (576 ↔ 1,536) with random weights; factored
layers hold two linears at the rank that keeps half of each module's parameters. The 30 layers'
weights (398 MB dense) do not fit in cache, as a model's do not. Medians of interleaved repeats.

    python benchmarks/archive/autotune_probe.py --tokens 1
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
import torch.nn.functional as F
import sys as _sys
from pathlib import Path as _Path

_sys.path.insert(0, str(_Path(__file__).resolve().parents[1] / "speed"))  # benchmarks/speed/speed.py
from speed import COMPILE_MODES, compile_in_mode  # noqa: E402
from torch import nn

HIDDEN, INTERMEDIATE = 576, 1536


def _linear(n_in: int, n_out: int, keep: float | None) -> nn.Module:
    if keep is None:
        return nn.Linear(n_in, n_out, bias=False)
    rank = int(keep * n_in * n_out / (n_in + n_out))
    return nn.Sequential(nn.Linear(n_in, rank, bias=False), nn.Linear(rank, n_out, bias=False))


class LinearStack(nn.Module):
    def __init__(self, layers: int, keep: float | None) -> None:
        super().__init__()
        def many(n_in: int, n_out: int) -> nn.ModuleList:
            return nn.ModuleList(_linear(n_in, n_out, keep) for _ in range(layers))
        self.q, self.o = many(HIDDEN, HIDDEN), many(HIDDEN, HIDDEN)
        self.gate, self.up = many(HIDDEN, INTERMEDIATE), many(HIDDEN, INTERMEDIATE)
        self.down = many(INTERMEDIATE, HIDDEN)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for q, o, gate, up, down in zip(self.q, self.o, self.gate, self.up, self.down):
            x = x + o(q(x))
            x = x + down(F.silu(gate(x)) * up(x))
        return x


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=1)
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--keep", type=float, default=0.5)
    p.add_argument("--modes", default="eager," + ",".join(COMPILE_MODES))
    p.add_argument("--repeats", type=int, default=30)
    args = p.parse_args()
    torch.manual_seed(0)
    x = torch.randn(1, args.tokens, HIDDEN)
    models, compile_s = {}, {}
    with torch.no_grad():
        for mode in args.modes.split(","):
            for name, keep in (("dense", None), ("factored", args.keep)):
                m = LinearStack(args.layers, keep).eval()
                t0 = time.perf_counter()
                if mode == "eager":
                    m(x)
                else:
                    compile_in_mode(m, mode, lambda: m(x))
                compile_s[f"{name}+{mode}"] = time.perf_counter() - t0
                models[f"{name}+{mode}"] = m
        times: dict[str, list[float]] = {n: [] for n in models}
        for _ in range(args.repeats):
            for n, fn in models.items():
                t0 = time.perf_counter()
                fn(x)
                times[n].append(time.perf_counter() - t0)
    ms = {n: 1e3 * statistics.median(v) for n, v in times.items()}
    out = {"tokens": args.tokens, "threads": torch.get_num_threads(), "ms": ms, "compile_s": compile_s,
           "speedup": {mode: ms[f"dense+{mode}"] / ms[f"factored+{mode}"] for mode in args.modes.split(",")}}
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
