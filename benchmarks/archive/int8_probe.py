"""int8 factors on the CPU: dense and factored, each in float32 and with int8 dynamic quantization.

Session 3 measured weight-only int8 (`torch._weight_int8pack_mm`) at 0.02-0.29x the float32
speed and dropped it. PyTorch's dynamically quantized linear (fbgemm: int8 weights per output
channel, activations quantized per tensor on the fly, int8 x int8 products) is a different
kernel. This probe asks whether it pays for factors, and against what: it quantizes the targeted
linears only (the head and attention stay float32) of

  dense     the dense model            dense-int8     the same, its targets int8
  factored  a saved rankcut model      factored-int8  each factor an int8 linear

and scores each on wikitext2 and times all four interleaved in one run. The like-for-like
speed-up of the low-rank cut is factored/dense within one precision.

    python benchmarks/archive/int8_probe.py SAVED_DIR --out benchmarks/results/int8-probe.json
"""

from __future__ import annotations

import argparse
import copy
import sys
import warnings
from pathlib import Path

import torch
import sys as _sys
from pathlib import Path as _Path

_sys.path.insert(0, str(_Path(__file__).resolve().parents[1]))  # benchmarks/common.py
from common import emit_json
from torch import nn

import rankcut
from rankcut.core.layers import LowRankLinear
from rankcut.core.modules import compressed_modules, swap_module
from rankcut.core.targets import select_targets
from rankcut.evaluate.tasks import run_task
from rankcut.speed.bench import benchmark, ratios


def as_linears(model: nn.Module) -> list[str]:
    """Each plain factored module as two nn.Linear in sequence (the same map); their names."""
    names = []
    for name, layer in compressed_modules(model).items():
        if type(layer) is not LowRankLinear or layer.core is not None:
            raise SystemExit(f"{name}: only plain two-factor models (no --pivot, no three-factor Tucker)")
        rank = layer.in_factor.shape[0]
        first = nn.Linear(layer.in_features, rank, bias=False)
        second = nn.Linear(rank, layer.out_features, bias=layer.bias is not None)
        with torch.no_grad():
            first.weight.copy_(layer.in_factor)
            second.weight.copy_(layer.out_factor)
            if layer.bias is not None:
                second.bias.copy_(layer.bias)
        swap_module(model, name, nn.Sequential(first, second))
        names += [f"{name}.0", f"{name}.1"]
    return names


def quantized(model: nn.Module, names: list[str]) -> nn.Module:
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    with warnings.catch_warnings():  # torch.ao.quantization warns that torchao is its successor
        warnings.simplefilter("ignore")
        return quantize_dynamic(copy.deepcopy(model), {n: per_channel_dynamic_qconfig for n in names})


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("saved", type=Path, help="a plain factored model saved by rankcut")
    parser.add_argument("--eval-limit", type=int, default=4096, help="wikitext2 tokens (1024-token windows)")
    parser.add_argument("--decode", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    factored = rankcut.load(args.saved).eval()
    dense = rankcut.load_model(rankcut.record_of(factored).source).eval()
    targets = [t.name for t in select_targets(dense)]
    factor_names = as_linears(factored)
    models = {"dense": dense, "dense-int8": quantized(dense, targets),
              "factored": factored, "factored-int8": quantized(factored, factor_names)}
    doc: dict = {"settings": {k: str(v) for k, v in vars(args).items()}, "wikitext2": {}}
    for name, m in models.items():
        doc["wikitext2"][name] = run_task(m, "wikitext2", limit=args.eval_limit, seqlen=1024,
                                          progress=False).metrics["perplexity"]
        print(f"{name}: wikitext2 {doc['wikitext2'][name]:.2f}", file=sys.stderr)
    results = benchmark(models, seqlen=512, decode=args.decode, repeats=args.repeats)
    doc["timings"] = {n: {k: v for k, v in r.summary().items() if "_s" in k or "tokens" in k}
                      for n, r in results.items()}
    pairs = {"factored / dense (float32)": ("dense", "factored"),
             "factored-int8 / dense-int8": ("dense-int8", "factored-int8"),
             "dense-int8 / dense": ("dense", "dense-int8"),
             "factored-int8 / dense": ("dense", "factored-int8")}
    doc["speedups"] = {}
    for label, (base, other) in pairs.items():
        r = ratios(results[base], results[other])
        doc["speedups"][label] = {k: r[k] for k in r if "speedup" in k}
        print(f"{label}: prefill {r['prefill_speedup']:.2f}×, decode {r['decode_speedup']:.2f}×", file=sys.stderr)
    emit_json(doc, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
