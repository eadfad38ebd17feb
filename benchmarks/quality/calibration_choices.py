"""Calibration and Fisher settings of budget-fisher on SmolLM2-135M, judged on a held-out slice.

A setting is chosen on one part of WikiText-2 test and reported on another, so that picking the
best of many does not flatter the reported figure: `select` is tokens 131,072–163,840 (32
windows of 1024), `report` the first 16,384 tokens (the slice every table here uses). Each
setting runs in a fresh process; rows are appended to a JSONL file and a rerun skips the
settings already there, so a killed run resumes.

    python benchmarks/quality/calibration_choices.py --results benchmarks/results/calibration_choices.jsonl
    python benchmarks/quality/calibration_choices.py --results benchmarks/results/calibration_choices.jsonl --table

A setting is JSON: {"budget": F, "calib": {Calibration fields}, "fisher": {Fisher fields}}.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

SELECT = (131072, 131072 + 32768)
REPORT = (0, 16384)

DEFAULT_SETTINGS = [
    {},
    {"calib": {"samples": 8, "seqlen": 1024, "fisher_samples": 2}},
    {"calib": {"samples": 16, "seqlen": 512, "fisher_samples": 4}},
    {"calib": {"samples": 64, "seqlen": 128, "fisher_samples": 16}},
    {"calib": {"fisher_samples": 16}},
    {"fisher": {"damp": 0.001}},
    *({"fisher": {"fisher_damp": d}} for d in (0.001, 0.1, 0.3, 1.0, 3.0, 10.0, 100.0)),
    {"budget": 0.5},
    {"budget": 0.5, "fisher": {"fisher_damp": 0.3}},
    {"budget": 0.5, "calib": {"two_pass": True, "samples": 128}},
]


def key(setting: dict) -> str:
    return json.dumps(setting, sort_keys=True)


def run_one(setting: dict) -> dict:
    import rankcut
    from rankcut.data.benchmarks import find_data_dir, wikitext2
    from rankcut.evaluate.perplexity import perplexity, tokenize_text

    model = rankcut.load_model("smollm2-135m")
    calib = rankcut.Calibration(**setting.get("calib", {}))
    config = rankcut.Fisher(budget=setting.get("budget", 0.8), calibration=calib, **setting.get("fisher", {}))
    t0 = time.perf_counter()
    report = rankcut.compress_(model, config, progress=False)
    seconds = time.perf_counter() - t0
    ids = tokenize_text(model, wikitext2(find_data_dir()))
    row = {"setting": setting, "compress_s": round(seconds, 1),
           "left_dense": sum(r["rank"] is None for r in report.modules.values()),
           "targets_kept": sum(r["params"] for r in report.modules.values())
           / sum(r["dense_params"] for r in report.modules.values())}
    for name, (a, b) in (("select", SELECT), ("report", REPORT)):
        row[name] = perplexity(model, ids[a:b], seqlen=1024, progress=False).perplexity
    return row


def dense_row() -> dict:
    import rankcut
    from rankcut.data.benchmarks import find_data_dir, wikitext2
    from rankcut.evaluate.perplexity import perplexity, tokenize_text

    model = rankcut.load_model("smollm2-135m")
    ids = tokenize_text(model, wikitext2(find_data_dir()))
    return {"setting": "dense", **{name: perplexity(model, ids[a:b], seqlen=1024, progress=False).perplexity
                                   for name, (a, b) in (("select", SELECT), ("report", REPORT))}}


def table(path: Path) -> str:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    dense = next((r for r in rows if r["setting"] == "dense"), None)
    out = ["| setting | keep | select ppl | report ppl | report ÷ dense | left dense | s (shared cores: upper bound) |",
           "|---|---|---|---|---|---|---|"]
    if dense:
        out.append(f"| dense | 1.0 | {dense['select']:.2f} | {dense['report']:.2f} | 1.00 | | |")
    for r in rows:
        if r["setting"] == "dense":
            continue
        s = dict(r["setting"])
        keep = s.pop("budget", 0.8)
        ratio = f"{r['report'] / dense['report']:.3f}" if dense else ""
        out.append(f"| `{json.dumps(s) if s else 'defaults'}` | {keep} | {r['select']:.2f} | {r['report']:.2f} | "
                   f"{ratio} | {r['left_dense']} | {r['compress_s']:.0f} |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--results", default="benchmarks/results/calibration_choices.jsonl")
    ap.add_argument("--settings", help="a JSON list of settings (default: the grid in this file)")
    ap.add_argument("--table", action="store_true")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    path = Path(args.results)
    if args.one:
        row = dense_row() if args.one == '"dense"' else run_one(json.loads(args.one))
        print(json.dumps(row))
        return
    if args.table:
        print(table(path))
        return
    settings = json.loads(args.settings) if args.settings else DEFAULT_SETTINGS
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    finished = {key(r["setting"]) for r in rows}
    for setting in ["dense", *settings]:
        if key(setting) in finished:
            continue
        cmd = [sys.executable, __file__, "--one", json.dumps(setting)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TRANSFORMERS_VERBOSITY": "error"})
        if proc.returncode != 0:
            print(f"{setting}: failed\n{proc.stderr[-2000:]}", file=sys.stderr)
            continue
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as fh:  # one line per finished run: a killed sweep loses nothing
            fh.write(json.dumps(row) + "\n")
        print(f"{setting}: select {row['select']:.2f} report {row['report']:.2f}", flush=True)


if __name__ == "__main__":
    main()
