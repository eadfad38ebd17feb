"""One row per quality idea: a method config given as JSON, compressed and scored on wikitext2.

Each spec runs in a fresh process (its own wall time and peak memory) and is appended to a JSONL
file under its name; a rerun skips names already there. Spec: {"method": NAME, any of that
config's fields, "calibration": {Calibration fields}}, exactly what `MethodConfig.from_dict` reads.

    python benchmarks/quality/ideas.py --name f80 --spec '{"method": "fisher", "budget": 0.8, "pivot": true,
        "calibration": {"two_pass": true}}'
    python benchmarks/quality/ideas.py --table
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

DEFAULT_RESULTS = Path(__file__).resolve().parents[1] / "results" / "quality-ideas.jsonl"


def whole_model_budget(model, targets: str, fraction: float) -> float:  # noqa: ANN001
    """The budget over `targets` that leaves `fraction` of the whole model's parameters (what is
    not targeted stays as it is)."""
    import rankcut
    from rankcut.compress.embedding import split_embedding_targets
    from rankcut.core.targets import select_targets

    rest, named = split_embedding_targets(targets)
    targeted = sum(t.params for t in select_targets(model, rest)) if rest else 0
    if named:
        targeted += model.get_input_embeddings().weight.numel()
    total = rankcut.count_params(model)
    budget = (fraction * total - (total - targeted)) / targeted
    if not 0 < budget <= 1:
        raise SystemExit(f"{fraction:.0%} of the model cannot be reached by cutting {targets} alone")
    return budget


def run_one(name: str, spec: dict, model_name: str, limit: int, seqlen: int, targets: str = "all-linear",
            whole: float | None = None, save: str | None = None, mlp_channels: float | None = None,
            mlp_select: str = "leverage", attn_channels: float | None = None,
            attn_value: float | None = None) -> dict:
    import torch

    import rankcut
    from rankcut.core.targets import select_targets
    from rankcut.evaluate import run_task

    model = rankcut.load_model(model_name)
    row = {"name": name, "spec": spec, "model": model_name, "limit": limit, "seqlen": seqlen, "targets": targets,
           "threads": torch.get_num_threads(), "dense_params": rankcut.count_params(model)}
    linear = sum(t.params for t in select_targets(model, "all-linear"))
    t0 = time.perf_counter()
    from rankcut.calibration.sources import Calibration

    calibration = Calibration.from_dict(spec["calibration"]) if "calibration" in spec else None
    if attn_channels is not None:  # attention's head channels first, jointly (Q·K, V·O)
        from rankcut.compress.attention import cut_attention_channels_

        cut_attention_channels_(model, attn_channels, calibration, progress=False, value_keep=attn_value)
        row.update(attn_channels=attn_channels, attn_value=attn_value)
    if mlp_channels is not None:  # the MLPs' channels, jointly; the spec then cuts `targets`
        from rankcut.compress.channels import cut_mlp_channels_

        cut_mlp_channels_(model, mlp_channels, calibration, select=mlp_select, progress=False)
        row.update(mlp_channels=mlp_channels, mlp_select=mlp_select)
    if spec:
        if whole is not None:
            spec = {**spec, "budget": whole_model_budget(model, targets, whole)}
            row.update(whole=whole, budget=spec["budget"])
        config = rankcut.MethodConfig.from_dict(spec)
        report = rankcut.compress_(model, config, targets=targets, progress=False)
        modules = report.modules.values()
        row["targets_kept"] = sum(r["params"] for r in modules) / sum(r["dense_params"] for r in modules)
        row["left_dense"] = sum(r["rank"] is None for r in modules)
    if spec or mlp_channels is not None or attn_channels is not None:
        row["compress_s"] = time.perf_counter() - t0
    row["params"] = rankcut.count_params(model)
    row["linear_kept"] = 1 - (row["dense_params"] - row["params"]) / linear  # the blocks' linear maps
    row["model_kept"] = row["params"] / row["dense_params"]
    if save:
        rankcut.save(model, save, overwrite=True)
    row["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result = run_task(model, "wikitext2", limit=limit, seqlen=seqlen, progress=False)
    row.update({k: result.metrics[k] for k in ("perplexity", "perplexity_stderr", "tokens")})
    return row


def table(path: Path) -> str:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    dense = {r["model"]: r["perplexity"] for r in rows if not r["spec"]}
    out = ["| name | targets | kept (targets / model) | wikitext2 | × dense | compression | spec |",
           "|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = r["perplexity"] / dense[r["model"]] if r["model"] in dense else float("nan")
        kept = f"{r['targets_kept']:.3f} / {r['params'] / r['dense_params']:.3f}" if "targets_kept" in r else \
            f"– / {r['params'] / r['dense_params']:.3f}"
        secs = f"{r['compress_s']:.0f} s" if "compress_s" in r else ""
        out.append(f"| {r['name']} | {r.get('targets', 'all-linear')} | {kept} | {r['perplexity']:.2f} | {ratio:.3f} "
                   f"| {secs} | `{json.dumps(r['spec'])}` |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--results", type=Path, default=DEFAULT_RESULTS)
    ap.add_argument("--name", help="the row's name (dense: an empty spec)")
    ap.add_argument("--spec", default="{}", help="the method config as to_dict writes it")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--limit", type=int, default=16384)
    ap.add_argument("--seqlen", type=int, default=1024)
    ap.add_argument("--targets", default="all-linear", help="as `rankcut compress --targets` (embed, head too)")
    ap.add_argument("--whole", type=float, help="the budget set so that this fraction of the whole model is kept")
    ap.add_argument("--save", help="also save the cut model here (for `rankcut bench`)")
    ap.add_argument("--mlp-channels", type=float, help="first keep this fraction of the MLPs' channels (Nyström)")
    ap.add_argument("--mlp-select", default="leverage", help="how the channels are chosen: leverage or output")
    ap.add_argument("--attn-channels", type=float, help="first keep this fraction of attention's head channels")
    ap.add_argument("--attn-value", type=float, help="with --attn-channels: a different fraction for V·O")
    ap.add_argument("--table", action="store_true")
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.table:
        print(table(args.results))
        return
    spec = json.loads(args.spec)
    if args.one:
        print(json.dumps(run_one(args.name, spec, args.model, args.limit, args.seqlen, args.targets, args.whole,
                                 args.save, args.mlp_channels, args.mlp_select, args.attn_channels,
                                 args.attn_value)))
        return
    if args.results.exists() and any(json.loads(line)["name"] == args.name
                                     for line in args.results.read_text().splitlines() if line.strip()):
        print(f"{args.name}: already in {args.results}")
        return
    cmd = [sys.executable, __file__, "--one", "--name", args.name, "--spec", args.spec, "--model", args.model,
           "--limit", str(args.limit), "--seqlen", str(args.seqlen), "--targets", args.targets]
    cmd += ["--whole", str(args.whole)] if args.whole is not None else []
    cmd += ["--save", args.save] if args.save else []
    cmd += ["--mlp-channels", str(args.mlp_channels), "--mlp-select", args.mlp_select] \
        if args.mlp_channels is not None else []
    cmd += ["--attn-channels", str(args.attn_channels)] if args.attn_channels is not None else []
    cmd += ["--attn-value", str(args.attn_value)] if args.attn_value is not None else []
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TRANSFORMERS_VERBOSITY": "error"})
    if proc.returncode != 0:
        sys.exit(f"{args.name}: failed\n{proc.stderr[-3000:]}")
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    args.results.parent.mkdir(parents=True, exist_ok=True)
    with open(args.results, "a") as fh:
        fh.write(json.dumps(row) + "\n")
    print(f"{args.name:<24} kept={row.get('targets_kept', 1):.3f} ppl={row['perplexity']:.2f} "
          f"compress={row.get('compress_s', 0):.0f}s", flush=True)


if __name__ == "__main__":
    main()
