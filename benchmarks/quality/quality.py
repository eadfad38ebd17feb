"""Training-free compression quality on SmolLM2-135M: wikitext2 perplexity per method and keep.

Each (method, keep) runs in a fresh process so that its wall time and peak memory are its own;
rows are appended to a JSONL file as they finish and a rerun skips the rows already there, so
a killed run resumes. `--table` prints the markdown table from the file.

    python benchmarks/quality/quality.py --results benchmarks/quality/quality.jsonl
    python benchmarks/quality/quality.py --results benchmarks/quality/quality.jsonl --table
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

# budget-X: one calibration pass, the budget cut at the end; budget2-X: the budget's ranks from
# a first pass, then every block calibrated on the outputs of the blocks already cut;
# X-pivot: factors stored pivoted (the same map in r² fewer numbers: a higher rank per budget);
# +option: one of OPTIONS on top (e.g. budget2-fisher-pivot+staged)
METHODS = ["svd", "whiten", "asvd", "fisher", "budget-whiten", "budget-fisher", "budget2-fisher",
           "fisher-pivot", "budget-fisher-pivot", "budget2-fisher-pivot", "budget2-fisher-pivot+staged"]
OPTIONS = {"staged": {"staged": True}}  # Calibration fields: inside each block too, input group by group


def run_one(method: str, keep: float, limit: int, seqlen: int, samples: int) -> dict:
    import torch

    import rankcut
    from rankcut.evaluate import run_task

    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    model = rankcut.load_model("smollm2-135m")
    model_bytes = rankcut.count_bytes(model)
    rss_loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    row = {"method": method, "keep": keep, "limit": limit, "seqlen": seqlen, "threads": torch.get_num_threads()}
    if method != "dense":
        name, *options = method.split("+")
        base = name.removeprefix("budget-").removeprefix("budget2-").removesuffix("-pivot")
        cls = rankcut.methods.config_class(base)
        policy = {"budget": keep} if name.startswith("budget") else {"keep": keep}
        policy["pivot"] = name.endswith("-pivot")
        extra = {k: v for option in options for k, v in OPTIONS[option].items()}
        calibration = rankcut.Calibration(samples=samples, seqlen=256, two_pass=name.startswith("budget2-"), **extra)
        kwargs = {"calibration": calibration} if cls.needs else {}
        t0 = time.perf_counter()
        report = rankcut.compress_(model, cls(**policy, **kwargs), progress=False)
        row["compress_s"] = time.perf_counter() - t0
        row["peak_rss_compress_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        row["targets_kept"] = (sum(r["params"] for r in report.modules.values())
                               / sum(r["dense_params"] for r in report.modules.values()))
        row["ranks"] = sorted(r["rank"] for r in report.modules.values() if r["rank"] is not None)
        row["left_dense"] = sum(r["rank"] is None for r in report.modules.values())
    row["params"] = rankcut.count_params(model)
    row["model_mb"] = model_bytes / 2**20
    row["rss_before_load_mb"] = rss0 / 1024
    row["rss_after_load_mb"] = rss_loaded / 1024
    result = run_task(model, "wikitext2", limit=limit, seqlen=seqlen, progress=False)
    row.update({"perplexity": result.metrics["perplexity"], "perplexity_stderr": result.metrics["perplexity_stderr"],
                "tokens": result.metrics["tokens"]})
    return row


def done(path: Path) -> set[tuple[str, float]]:
    if not path.exists():
        return set()
    return {(r["method"], r["keep"]) for r in map(json.loads, path.read_text().splitlines()) if r}


def table(path: Path) -> str:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    dense = next((r for r in rows if r["method"] == "dense"), None)
    keeps = sorted({r["keep"] for r in rows if r["method"] != "dense"}, reverse=True)
    methods = [m for m in METHODS if any(r["method"] == m for r in rows)]
    get = {(r["method"], r["keep"]): r for r in rows}
    out = ["| method | " + " | ".join(f"keep {k:g}" for k in keeps) + " |", "|---|" + "---|" * len(keeps)]
    if dense:
        out.append(f"| dense | {dense['perplexity']:.2f} (all) |" + " |" * (len(keeps) - 1))
    for m in methods:
        cells = []
        for k in keeps:
            r = get.get((m, k))
            cells.append("" if r is None else f"{r['perplexity']:.2f} ({r['compress_s']:.0f} s)")
        out.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--results", default="benchmarks/quality/quality.jsonl")
    ap.add_argument("--methods", default="dense," + ",".join(METHODS))
    ap.add_argument("--keeps", default="0.8,0.6,0.5")
    ap.add_argument("--limit", type=int, default=16384)
    ap.add_argument("--seqlen", type=int, default=1024)
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--table", action="store_true")
    ap.add_argument("--one", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    path = Path(args.results)
    if args.one:
        print(json.dumps(run_one(args.one[0], float(args.one[1]), args.limit, args.seqlen, args.samples)))
        return
    if args.table:
        print(table(path))
        return
    finished = done(path)
    todo = [("dense", 1.0)] if "dense" in args.methods.split(",") else []
    todo += [(m, float(k)) for k in args.keeps.split(",") for m in args.methods.split(",") if m != "dense"]
    for method, keep in todo:
        if (method, keep) in finished:
            continue
        cmd = [sys.executable, __file__, "--one", method, str(keep), "--limit", str(args.limit),
               "--seqlen", str(args.seqlen), "--samples", str(args.samples)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TRANSFORMERS_VERBOSITY": "error"})
        if proc.returncode != 0:
            print(f"{method} {keep}: failed\n{proc.stderr[-2000:]}", file=sys.stderr)
            continue
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        with open(path, "a") as fh:  # one line per finished run: a killed sweep loses nothing
            fh.write(json.dumps(row) + "\n")
        print(f"{method:<14} keep={keep:<4} ppl={row['perplexity']:.2f} "
              f"compress={row.get('compress_s', 0):.0f}s", flush=True)


if __name__ == "__main__":
    main()
