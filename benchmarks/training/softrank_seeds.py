"""Adaptive (Fisher-allocated) against uniform ranks on MiniLM at 50%, over several seeds.

One fine-tune's dev score moves by a few examples from seed to seed (MRPC's 408 examples have a
standard error of ~8), about the size of the difference being asked about. So each arm runs the
same `rankcut softrank ... --static` fine-tune under several seeds (the seed draws the training
examples, their order and the Fisher examples), and the comparison is paired by seed: the mean
difference, its standard error, and how many seeds each arm won.

Each run's JSON is kept in --work and reused, so a killed benchmark resumes with the next run.

    python benchmarks/training/softrank_seeds.py --tasks sst2,mrpc --seeds 0,1,2 --work runs/ --out seeds.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

from tqdm.auto import tqdm

from rankcut.core.fsutil import atomic_write_text

INITS = ("fisher", "uniform")


def command(task: str, init: str, seed: int, out: Path, steps: int) -> list[str]:
    """Session 8's recipe (benchmarks/RESULTS.md, issue 7), one seed."""
    return ["rankcut", "softrank", "minilm-l6", "--task", task, "--budget", "0.5", "--method", "whiten",
            "--calib", task, "--steps", str(steps), "--batch-size", "32", "--lr", "1e-4", "--init", init,
            "--static", "--seed", str(seed), "--eval", "--out", str(out), "--overwrite", "--json"]


def run(task: str, init: str, seed: int, work: Path, steps: int) -> dict:
    record = work / f"mini-{task}-{init}-s{seed}.json"
    if record.is_file():
        return json.loads(record.read_text())
    argv = command(task, init, seed, work / record.stem, steps)
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{' '.join(argv)} failed:\n{done.stderr[-2000:]}")
    atomic_write_text(record, done.stdout)
    return json.loads(done.stdout)


def score(result: dict, key: str) -> float:
    return result["eval"]["metrics"][key]


def paired(a: list[float], b: list[float]) -> dict:
    diffs = [x - y for x, y in zip(a, b)]
    se = statistics.stdev(diffs) / len(diffs) ** 0.5 if len(diffs) > 1 else float("nan")
    return {"mean_difference": statistics.mean(diffs), "stderr": se, "differences": diffs,
            "wins": sum(d > 0 for d in diffs), "ties": sum(d == 0 for d in diffs), "losses": sum(d < 0 for d in diffs)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default="sst2,mrpc")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--steps", type=int, default=230)
    parser.add_argument("--work", type=Path, required=True, help="folder for each run's JSON and model")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    tasks = args.tasks.split(",")
    seeds = [int(s) for s in args.seeds.split(",")]
    args.work.mkdir(parents=True, exist_ok=True)
    jobs = [(t, i, s) for t in tasks for s in seeds for i in INITS]
    results = {job: run(*job, args.work, args.steps) for job in tqdm(jobs, desc="fine-tunes", unit="run")}

    summary: dict = {"seeds": seeds, "steps": args.steps, "tasks": {}}
    for task in tasks:
        metrics = ["accuracy", "f1"] if task == "mrpc" else ["accuracy"]
        dense = results[(task, INITS[0], seeds[0])]["dense_eval"]["metrics"]
        entry: dict = {"dense": {m: dense[m] for m in metrics}}
        print(f"\n{task} dev, 50% of the encoder's targeted parameters, seeds {seeds}")
        for m in metrics:
            arms = {i: [score(results[(task, i, s)], m) for s in seeds] for i in INITS}
            cmp = paired(arms["fisher"], arms["uniform"])
            entry[m] = {"per_seed": arms, "mean": {i: statistics.mean(v) for i, v in arms.items()}, "fisher_minus_uniform": cmp}
            print(f"  {m:8s} dense {dense[m]:.4f}")
            for i in INITS:
                print(f"  {m:8s} {i:8s} " + "  ".join(f"{v:.4f}" for v in arms[i])
                      + f"   mean {statistics.mean(arms[i]):.4f} ({statistics.mean(arms[i]) - dense[m]:+.4f} vs dense)")
            print(f"  {m:8s} fisher − uniform: mean {cmp['mean_difference']:+.4f} ± {cmp['stderr']:.4f} (paired s.e.), "
                  f"fisher ahead in {cmp['wins']} of {len(seeds)} seeds, tied in {cmp['ties']}")
        summary["tasks"][task] = entry
    if args.out:
        atomic_write_text(args.out, json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
