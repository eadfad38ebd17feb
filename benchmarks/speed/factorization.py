"""How fast, and how exact, each way of finding a weight's top-r directions is, on a real model's weights.

For every targeted weight W of the model, at the rank a `--keep` policy gives it, times:
- `svd64`: torch.linalg.svd in float64 (the textbook reference);
- `gram` : eigh of the smaller Gram matrix in float64, what rankcut's methods use today
           (rankcut.methods.weighted.gram_svd);
- `lowrank-q{k}`: torch.svd_lowrank (randomized, float32), oversampling and power iterations as given.

and reports each one's total time against `gram`, and its excess truncation error:
‖W − W_r‖_F / ‖W − W_r*‖_F − 1, where W_r* is the exact rank-r truncation (from `svd64`).
Eckart–Young makes W_r* the optimum, so the excess is ≥ 0 and says how far from it a method
lands. The median and worst case over the weights are printed.

    python benchmarks/speed/factorization.py --model smollm2-135m --keep 0.5
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import rankcut  # noqa: E402
from rankcut.core.ranks import keep_rank  # noqa: E402
from rankcut.core.targets import dense_weight, select_targets  # noqa: E402
from rankcut.methods.weighted import gram_svd  # noqa: E402


def truncation_error(w: torch.Tensor, u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, r: int) -> float:
    approx = (u[:, :r] * s[:r]) @ vh[:r]
    return float((w - approx.to(w.dtype)).norm())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--keep", type=float, default=0.5)
    parser.add_argument("--oversample", type=int, default=10)
    parser.add_argument("--niter", default="2,4", help="power iterations of svd_lowrank to try")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--limit", type=int, default=None, help="only the first N weights")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = rankcut.load_model(args.model)
    targets = select_targets(model)[: args.limit]
    ways = ["svd64", "gram"] + [f"lowrank-q{args.oversample}-n{n}" for n in args.niter.split(",")]
    seconds = dict.fromkeys(ways, 0.0)
    excess: dict[str, list[float]] = {w: [] for w in ways}
    for target in targets:
        w = dense_weight(model.get_submodule(target.name)).detach().double()
        r = keep_rank(w.shape[0], w.shape[1], args.keep, False)
        t0 = time.perf_counter()
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        seconds["svd64"] += time.perf_counter() - t0
        best = truncation_error(w, u, s, vh, r)
        excess["svd64"].append(0.0)
        t0 = time.perf_counter()
        u, s, vh = gram_svd(w)
        seconds["gram"] += time.perf_counter() - t0
        excess["gram"].append(truncation_error(w, u, s, vh, r) / best - 1)
        w32 = w.float()
        for n in args.niter.split(","):
            way = f"lowrank-q{args.oversample}-n{n}"
            t0 = time.perf_counter()
            u, s, v = torch.svd_lowrank(w32, q=min(r + args.oversample, *w.shape), niter=int(n))
            seconds[way] += time.perf_counter() - t0
            excess[way].append(truncation_error(w, u.double(), s.double(), v.double().T, r) / best - 1)
    print(f"{args.model}: {len(targets)} weights at keep {args.keep} ({args.threads} threads)")
    print(f"{'way':<18} {'seconds':>8} {'vs gram':>8} {'median excess':>14} {'worst excess':>13}")
    for way in ways:
        print(f"{way:<18} {seconds[way]:>8.2f} {seconds['gram'] / seconds[way]:>7.2f}x "
              f"{statistics.median(excess[way]):>14.2e} {max(excess[way]):>13.2e}")


if __name__ == "__main__":
    main()
