"""How far the 50% models' speed-ups are from their ceilings: the targeted linear maps timed
apart from everything else, dense and compressed, in one run (`rankcut.timesplit`).

For each model: dense, and the same model cut to `--keep` of its targeted parameters (uniform
SVD ranks; speed depends on the ranks only), given `speed_up_`'s layouts and dense fallback,
saved and loaded back, as `speed.py` builds it. First the plain figures (`rankcut.bench`, no
hooks), then the split ones (hooks on every targeted module), each interleaved over the
repeats. The ceiling is the whole model's speed-up had the targeted maps taken dense's time ×
their parameter ratio and everything else dense's time.

    python benchmarks/speed/ceiling.py --out benchmarks/results/ceiling.json
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
import sys as _sys
from pathlib import Path as _Path

_sys.path.insert(0, str(_Path(__file__).resolve().parents[1]))  # benchmarks/common.py
from common import emit_json

import rankcut
from rankcut.speed.bench import benchmark, ratios
from rankcut.speed.layouts import speed_up_
from rankcut.speed.timesplit import compare_splits
from rankcut.speed.timing import random_ids


def cut(name: str, keep: float, folder: Path) -> torch.nn.Module:
    model = rankcut.load_model(name)
    rankcut.compress_(model, rankcut.SVD(keep=keep), progress=False)
    speed_up_(model)
    rankcut.save(model, folder)
    return rankcut.load(folder)


def measure(name: str, keep: float, batch: int, seqlen: int, decode: int, repeats: int, folder: Path) -> dict:
    dense, compressed = rankcut.load_model(name).eval(), cut(name, keep, folder).eval()
    plain = benchmark({"dense": dense, "compressed": compressed}, seqlen=seqlen, batch=batch, decode=decode,
                      repeats=repeats)
    ids = random_ids(dense, batch, seqlen)
    splits = compare_splits(dense, compressed, ids, decode=decode, repeats=repeats)
    for s in splits:
        print(f"{name} {keep:.0%}, {s.workload}: whole {s.speedup:.2f}× (targets {s.targets_speedup:.2f}×, "
              f"rest {s.rest_speedup:.2f}×; targets at {s.targets_efficiency:.2f}× dense's speed per parameter), "
              f"ceiling {s.ceiling:.2f}×; dense spends "
              f"{s.dense.rest_s / s.dense.total_s:.0%} outside the targets", file=sys.stderr)
    return {"model": name, "keep": keep, "batch": batch, "seqlen": seqlen, "decode": decode,
            "params": {"dense": rankcut.count_params(dense), "compressed": rankcut.count_params(compressed)},
            "dense_fallback": len((rankcut.record_of(compressed).speed or {}).get("dense_fallback", [])),
            "without_hooks": {"dense": plain["dense"].summary(), "compressed": plain["compressed"].summary(),
                              "ratios": ratios(plain["dense"], plain["compressed"])},
            "split": [s.summary() for s in splits]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keep", type=float, default=0.5)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--decode", type=int, default=64, help="new tokens per decode timing (decoder)")
    parser.add_argument("--only", choices=["decoder", "encoder"], default=None)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(2)
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        if args.only in (None, "decoder"):
            runs.append(measure("smollm2-135m", args.keep, 1, 512, args.decode, args.repeats, Path(tmp) / "dec"))
        if args.only in (None, "encoder"):
            runs.append(measure("minilm-l6", args.keep, 32, 128, 0, args.repeats, Path(tmp) / "enc"))
    emit_json({"command": "python " + " ".join(sys.argv), "threads": torch.get_num_threads(),
               "torch": torch.__version__, "runs": runs}, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
