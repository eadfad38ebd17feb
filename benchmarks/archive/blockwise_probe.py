"""Probe for issue 7 (did not ship): train each compressed block towards the dense block before
healing, as block-wise reconstruction does for quantization.

Block i of the compressed model is fed its own stream's inputs (the blocks already trained) and
fitted by Adam to the dense block's outputs on the dense stream, one block at a time, so a step
costs one block's forward and backward and no head. `--norm global` divides the squared error by
the target's mean square; `--norm channel` by each channel's variance (SmolLM2's residual stream
has massive-activation channels from block 11 on, which dominate the global form).
RESULTS.md (issue 7, "Session 19") compares it with `rankcut heal` over about the same seconds.

    python benchmarks/archive/blockwise_probe.py PIVOT_DIR --samples 64 --epochs 2 --lr 1e-4 --norm global \
        --out benchmarks/results/softrank/blockwise-probe-s19.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import rankcut
from rankcut.calibration.hooks import BlockReplay
from rankcut.calibration.sources import Calibration, calibration_ids
from rankcut.train.loop import evaluate_task


def channel_weights(targets: list[torch.Tensor], norm: str) -> torch.Tensor:
    flat = torch.cat([t.reshape(-1, t.shape[-1]) for t in targets])
    if norm == "channel":
        return 1.0 / flat.var(0).clamp_min(1e-6)
    return torch.full((flat.shape[1],), 1.0 / flat.pow(2).mean().item())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("compressed", help="a saved compressed SmolLM2-135M")
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--norm", choices=["global", "channel"], default="global")
    ap.add_argument("--eval-limit", type=int, default=4096, help="wikitext2 tokens scored before and after")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    torch.manual_seed(0)
    student = rankcut.load(args.compressed)
    dense = rankcut.load_model("smollm2-135m")
    dense.requires_grad_(False)
    before = evaluate_task(student, "lm", limit=args.eval_limit, progress=False)["metrics"]["perplexity"]
    ids = calibration_ids(student, Calibration(text="gensim-wiki", samples=args.samples, seqlen=args.seqlen, seed=1))
    t0 = time.perf_counter()
    stream, dense_stream = BlockReplay(student, ids, args.batch), BlockReplay(dense, ids, args.batch)
    blocks = []
    for i, block in enumerate(stream.blocks):
        targets = list(dense_stream.run(i))
        weights = channel_weights(targets, args.norm)

        def error() -> float:
            outs = list(stream.run(i))
            return sum(((o - t).pow(2) * weights).mean().item() for o, t in zip(outs, targets)) / len(outs)

        start = error()
        params = [p for p in block.parameters() if p.is_floating_point()]
        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.Adam(params, lr=args.lr)
        for _ in range(args.epochs):
            for j in torch.randperm(len(targets)).tolist():
                block_args, block_kwargs = stream.inputs[j]
                out = block(*block_args, **block_kwargs)
                out = out[0] if isinstance(out, tuple) else out
                loss = ((out - targets[j]).pow(2) * weights).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        for p in params:
            p.requires_grad_(False)
        blocks.append({"block": i, "error_before": start, "error_after": error()})
        print(json.dumps(blocks[-1]), flush=True)
        stream.advance(i)
        dense_stream.advance(i)
    train_s = time.perf_counter() - t0
    after = evaluate_task(student, "lm", limit=args.eval_limit, progress=False)["metrics"]["perplexity"]
    summary = {"settings": {k: str(v) for k, v in vars(args).items()}, "train_seconds": train_s,
               "perplexity_before": before, "perplexity_after": after, "blocks": blocks}
    print(json.dumps({k: v for k, v in summary.items() if k != "blocks"}))
    if args.out:
        args.out.write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
