"""Streamed compression (`--offload disk`) beside in-memory compression, from one run each.

Each compression runs as its own `rankcut compress ... --json` process, so each peak resident
memory is its own. Printed side by side: peak memory above the process's baseline (the Python
runtime and libraries before the model is read), as a fraction of the float32 model's bytes;
wall time by stage (load, compress and its split: calibration forwards and statistics,
gradients, factorization, reading and writing blocks; save); and, when both were run, whether
the two outputs hold the same ranks and factors (max relative error over every tensor) and
their wikitext2 perplexity (first 16,384 tokens, 1,024-token windows).

    python benchmarks/speed/streaming.py --model smollm2-135m --method whiten --keep 0.8
    python benchmarks/speed/streaming.py --model random-llama-2-7b --method whiten --keep 0.8 \\
        --only streamed --calib-samples 8 --checkpoint /tmp/ck7b      # resumable: rerun the same line

`random-*` models are seeded random weights in published shapes: their times and memory are
real, their perplexity means nothing.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def compress(model: str, args: argparse.Namespace, offload: str, out: Path) -> dict:
    argv = [sys.executable, "-m", "rankcut.cli", "compress", model, "--method", args.method, "--offload", offload,
            "--calib-samples", str(args.calib_samples), "--calib-seqlen", str(args.calib_seqlen),
            "--device", args.device, "--out", str(out), "--json", "--overwrite"]
    argv += ["--budget", str(args.budget)] if args.budget else ["--keep", str(args.keep)]
    argv += ["--two-pass"] if args.two_pass else []
    if args.checkpoint and offload == "disk":
        argv += ["--checkpoint", args.checkpoint] + (["--resume"] if (Path(args.checkpoint) / "progress.json").is_file()
                                                     else [])
    done = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT)
    if done.returncode:
        sys.exit(f"{offload}: {done.stderr.strip().splitlines()[-1] if done.stderr.strip() else done.returncode}")
    return json.loads(done.stdout)


def perplexity(folder: Path) -> float:
    argv = [sys.executable, "-m", "rankcut.cli", "eval", str(folder), "--tasks", "wikitext2", "--limit", "16384",
            "--seqlen", "1024", "--json"]
    done = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, check=True)
    return json.loads(done.stdout)["results"][0]["metrics"]["perplexity"]


def same_factors(a: Path, b: Path) -> tuple[bool, float]:
    import rankcut

    ma, mb = rankcut.load(a), rankcut.load(b)
    ranks = {n: r.get("rank") for n, r in rankcut.record_of(ma).modules.items()}
    same = ranks == {n: r.get("rank") for n, r in rankcut.record_of(mb).modules.items()}
    sa, sb = ma.state_dict(), mb.state_dict()
    err = max(float((sa[k].double() - sb[k].double()).norm() / sa[k].double().norm().clamp_min(1e-30))
              for k in sa) if sa.keys() == sb.keys() else float("inf")
    return same, err


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--method", default="whiten")
    p.add_argument("--keep", type=float, default=0.8)
    p.add_argument("--budget", type=float, default=None)
    p.add_argument("--two-pass", action="store_true")
    p.add_argument("--calib-samples", type=int, default=32)
    p.add_argument("--calib-seqlen", type=int, default=256)
    p.add_argument("--device", default="auto")
    p.add_argument("--only", choices=["memory", "streamed"], default=None)
    p.add_argument("--checkpoint", default=None, help="streamed run: checkpoint folder (resumes if it holds one)")
    p.add_argument("--ppl", action="store_true", help="also score both outputs on wikitext2")
    p.add_argument("--out", default=None, help="keep the outputs here (default: a temporary folder)")
    p.add_argument("--json", default=None, help="write the figures here")
    args = p.parse_args()

    work = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="rankcut-streaming-"))
    runs = {}
    for name, offload in (("memory", "none"), ("streamed", "disk")):
        if args.only and args.only != name:
            continue
        runs[name] = compress(args.model, args, offload, work / name)
    rows = {}
    for name, r in runs.items():
        f32_bytes = r["params_before"] * 4
        above = r["peak_rss_mb"] - r["runtime_rss_mb"]
        rows[name] = {"peak_rss_mb": r["peak_rss_mb"], "above_runtime_mb": round(above, 1),
                      "above_over_f32_model": round(above * 2**20 / f32_bytes, 3), "dtype": r["dtype"],
                      "params": [r["params_before"], r["params_after"]], "seconds": r["seconds"],
                      "stages": r["stage_seconds"]}
        print(f"{name:>9}: peak {r['peak_rss_mb']:,.0f} MB, {above:,.0f} MB above the runtime = "
              f"{rows[name]['above_over_f32_model']:.3f}× the float32 model ({f32_bytes / 2**20:,.0f} MB); "
              f"{r['seconds']:.1f} s; {r['params_before']:,} → {r['params_after']:,} params ({r['dtype']})")
        print("           " + ", ".join(f"{k} {v:.1f} s" for k, v in r["stage_seconds"].items()))
    if len(runs) == 2:
        a, b = rows["memory"], rows["streamed"]
        print(f"streamed / memory: peak above runtime {b['above_runtime_mb'] / a['above_runtime_mb']:.2f}×, "
              f"time {b['seconds'] / a['seconds']:.2f}×")
        same, err = same_factors(work / "memory", work / "streamed")
        rows["equivalence"] = {"same_ranks": same, "max_rel_error": err}
        print(f"same ranks: {same}; max relative error of any tensor: {err:.2e}")
        if args.ppl:
            ppl = {name: perplexity(work / name) for name in runs}
            rows["wikitext2"] = ppl
            print("wikitext2 perplexity: " + ", ".join(f"{k} {v:.4g}" for k, v in ppl.items()))
    if args.json:
        Path(args.json).write_text(json.dumps({"model": args.model, "args": vars(args), **rows}, indent=2) + "\n")
    if not args.out:
        import shutil

        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
