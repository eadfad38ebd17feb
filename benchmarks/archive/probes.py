"""Probes of ideas for the 50% cut of SmolLM2-135M (issue 5) that did not ship.

Each probe changes one thing against the best configuration (`Fisher(budget=0.5, pivot=True,
Calibration(two_pass=True, staged=True))`) or looks at one layer, and prints one JSON line per
figure; RESULTS.md ("Session 9") records what each gave. They patch the library from outside,
so nothing here is a supported option.

    python benchmarks/archive/probes.py allocation            # budget from the gate Fisher, training-free
    python benchmarks/archive/probes.py correct --pattern down_proj
    python benchmarks/archive/probes.py shrink --alpha 0.3 [--samples 128 --seqlen 64 --fisher-samples 32]
    python benchmarks/archive/probes.py heldout               # one layer's error, calibration vs held-out
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

import torch

import rankcut
from rankcut.calibration.sources import Calibration, calibration_ids
from rankcut.evaluate import run_task

MODEL = "smollm2-135m"


def _perplexity(model: torch.nn.Module) -> float:
    return run_task(model, "wikitext2", limit=16384, seqlen=1024, progress=False).metrics["perplexity"]


def _best_50(model: torch.nn.Module, calibration: Calibration) -> float:
    """Compress with the best 50% configuration; seconds taken."""
    start = time.perf_counter()
    config = rankcut.methods.config_class("fisher")(budget=0.5, pivot=True, calibration=calibration)
    rankcut.compress_(model, config, progress=False)
    return time.perf_counter() - start


def _shrunk(gram: torch.Tensor, alpha: float) -> torch.Tensor:
    """The Gram shrunk towards its diagonal: (1 − α)·XᵀX + α·diag(XᵀX)."""
    g = gram.double()
    return (1 - alpha) * g + alpha * torch.diag(g.diagonal())


def allocation(args: argparse.Namespace) -> None:
    """One-pass fisher factors cut at the budget, ranks allocated by the whitened Fisher spectra
    (the shipped rule) or by each direction's gate Fisher under next-token loss (softrank's
    `--init fisher`)."""
    from rankcut.compress.factor_cache import FactorCache
    from rankcut.core.ranks import allocate_targets, allocation_cap
    from rankcut.core.targets import select_targets
    from rankcut.study.sweep import applied_ranks
    from rankcut.train.data import LMData
    from rankcut.train.softrank import SoftRank, direction_fisher

    model = rankcut.load_model(MODEL).eval()
    targets = select_targets(model)
    cache = FactorCache(model, MODEL, "fisher", calibration=Calibration())
    saved = Path(args.fisher_file)
    if saved.is_file():
        fisher = torch.load(saved)
    else:
        data = LMData(model, SoftRank(batch_size=4, seqlen=128))
        fisher = direction_fisher(model, targets, cache, data, args.examples)
        torch.save(fisher, saved)
    budget = int(args.budget * sum(t.params for t in targets))
    rules = {"spectrum": cache.importance,
             "gate-fisher": {n: f.sort(descending=True).values for n, f in fisher.items()}}
    for rule, worths in rules.items():
        ranks = allocate_targets(targets, worths, budget)
        cut = {t.name: ranks[t.name] for t in targets if ranks[t.name] < allocation_cap(t)}
        with applied_ranks(model, cut, cache):
            print(json.dumps({"probe": "allocation", "rule": rule, "budget": args.budget,
                              "dense_modules": len(targets) - len(cut), "perplexity": _perplexity(model)}), flush=True)


def correct(args: argparse.Namespace) -> None:
    """Error-corrected fit (dense outputs through X_cᵀX_d) for the modules matching a pattern only."""
    import rankcut.methods.fisher as fisher_method

    plain = fisher_method.weighted_svd

    def selective(weight, policy, name, input_weight=None, output_weight=None, cross=None):  # noqa: ANN001, ANN202
        cross = cross if re.search(args.pattern, name) else None
        return plain(weight, policy, name, input_weight=input_weight, output_weight=output_weight, cross=cross)

    fisher_method.weighted_svd = selective
    model = rankcut.load_model(MODEL)
    seconds = _best_50(model, Calibration(samples=args.samples, two_pass=True, staged=True, correct=True))
    print(json.dumps({"probe": "correct", "pattern": args.pattern, "seconds": seconds,
                      "perplexity": _perplexity(model)}), flush=True)


def shrink(args: argparse.Namespace) -> None:
    """Whitening by XᵀX shrunk towards its diagonal: (1 − α)·XᵀX + α·diag(XᵀX)."""
    import rankcut.methods.fisher as fisher_method
    from rankcut.methods.weighted import whitening

    def shrunk(gram: torch.Tensor, damp: float):  # noqa: ANN202
        return whitening(_shrunk(gram, args.alpha), damp)

    fisher_method.whitening = shrunk
    model = rankcut.load_model(MODEL)
    seconds = _best_50(model, Calibration(samples=args.samples, seqlen=args.seqlen, fisher_samples=args.fisher_samples,
                                          two_pass=True, staged=True))
    print(json.dumps({"probe": "shrink", "alpha": args.alpha, "samples": args.samples, "seqlen": args.seqlen,
                      "seconds": seconds, "perplexity": _perplexity(model)}), flush=True)


def heldout(args: argparse.Namespace) -> None:
    """Relative output error of whitened truncation of a few modules, fitted on calibration windows
    and measured on other windows of the same text (seed 1), for several calibration layouts, plain
    and with the Gram shrunk 0.3 towards its diagonal."""
    from rankcut.core.ranks import RankPolicy
    from rankcut.methods.weighted import weighted_svd, whitening

    model = rankcut.load_model(MODEL).eval()
    probes = [(5, "mlp.gate_proj", 209), (5, "mlp.up_proj", 209), (15, "mlp.up_proj", 209),
              (25, "mlp.gate_proj", 209), (12, "self_attn.q_proj", 100)]
    modules = [model.get_submodule(f"model.layers.{layer}.{kind}") for layer, kind, _ in probes]

    def inputs(ids: torch.Tensor) -> list[torch.Tensor]:
        seen: list[list[torch.Tensor]] = [[] for _ in modules]
        hooks = [m.register_forward_hook(lambda _m, i, _o, j=j: seen[j].append(i[0].reshape(-1, i[0].shape[-1]).double()))
                 for j, m in enumerate(modules)]
        with torch.no_grad():
            for start in range(0, ids.shape[0], 8):
                model(ids[start:start + 8])
        for h in hooks:
            h.remove()
        return [torch.cat(x) for x in seen]

    def truncated(w: torch.Tensor, gram: torch.Tensor, rank: int) -> torch.Tensor:
        factors = weighted_svd(w, RankPolicy(rank=rank), "probe", input_weight=whitening(gram, 1e-4))
        return factors.out_factor @ factors.in_factor

    def error(w: torch.Tensor, approx: torch.Tensor, x: torch.Tensor) -> float:
        return float((x @ (w - approx).T).square().sum() / (x @ w.T).square().sum())

    held = inputs(calibration_ids(model, Calibration(samples=32, seed=1)))
    for samples, seqlen in ((32, 256), (128, 64), (128, 256), (512, 64)):
        fitted = inputs(calibration_ids(model, Calibration(samples=samples, seqlen=seqlen, seed=0)))
        for (layer, kind, rank), m, x, x_held in zip(probes, modules, fitted, held):
            w = m.weight.detach().double()
            gram = x.T @ x
            plain = truncated(w, gram, rank)
            shrunk = truncated(w, _shrunk(gram, 0.3), rank)
            print(json.dumps({"probe": "heldout", "calibration": f"{samples}x{seqlen}", "module": f"{layer}.{kind}",
                              "rank": rank, "calibration_error": error(w, plain, x),
                              "heldout_error": error(w, plain, x_held),
                              "heldout_error_shrunk": error(w, shrunk, x_held)}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="probe", required=True)
    p = sub.add_parser("allocation")
    p.add_argument("--budget", type=float, default=0.5)
    p.add_argument("--examples", type=int, default=256)
    p.add_argument("--fisher-file", default="gate_fisher.pt", help="the gate Fisher is kept here and reused")
    p = sub.add_parser("correct")
    p.add_argument("--pattern", default="down_proj")
    p.add_argument("--samples", type=int, default=32)
    p = sub.add_parser("shrink")
    p.add_argument("--alpha", type=float, default=0.3)
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--fisher-samples", type=int, default=8)
    sub.add_parser("heldout")
    args = parser.parse_args()
    torch.set_num_threads(2)
    {"allocation": allocation, "correct": correct, "shrink": shrink, "heldout": heldout}[args.probe](args)


if __name__ == "__main__":
    main()
