"""rankcut's scorer against lm-evaluation-harness, item by item, on the same model and items.

For each task that lm-eval can read offline from the data folder (rankcut.evaluate.harness's
task configs, lm-eval's own templates; HellaSwag through `reconstructed_hellaswag`, its context
fields rebuilt from the local file), lm-eval scores the first N items with `log_samples`, and
rankcut's scorer scores the same N from its own readers. Per task it prints:
- whether the (context, continuation) strings are identical, item by item;
- max and median |Δ log-likelihood| per choice;
- the share of items where acc (and acc_norm) pick the same answer;
- both scorers' metrics.

    python benchmarks/quality/lm_eval_agreement.py --model smollm2-135m --limit 200 --tqa-limit 100 \
        --out benchmarks/results/lm_eval_agreement.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import rankcut  # noqa: E402
from rankcut.core.fsutil import atomic_write_text  # noqa: E402
from rankcut.core.machine import describe_machine  # noqa: E402
from rankcut.data.benchmarks import READERS, find_data_dir  # noqa: E402
from rankcut.evaluate.harness import (  # noqa: E402
    LM_EVAL_NAMES,
    reconstructed_hellaswag,
    task_specs,
)
from rankcut.evaluate.scoring import loglikelihoods  # noqa: E402
from rankcut.evaluate.tasks import (  # noqa: E402
    NORM_TASKS,
    score_lambada,
    score_mc2,
    score_multiple_choice,
)


def _argmax(xs: list[float]) -> int:
    return max(range(len(xs)), key=xs.__getitem__)


def lm_eval_samples(model, task: str, limit: int, data_dir) -> tuple[list[dict], dict]:
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    wrapped = HFLM(pretrained=model, tokenizer=rankcut.get_tokenizer(model), batch_size=8)
    specs = [reconstructed_hellaswag(data_dir)] if task == "hellaswag" else task_specs([task], data_dir)
    out = lm_eval.simple_evaluate(model=wrapped, tasks=specs, limit=limit, log_samples=True)
    name = LM_EVAL_NAMES.get(task, task)
    samples = sorted(out["samples"][name], key=lambda s: s["doc_id"])
    return samples, out["results"][name]


def compare(model, task: str, limit: int, data_dir) -> dict:
    t0 = time.perf_counter()
    samples, theirs = lm_eval_samples(model, task, limit, data_dir)
    t_lm = time.perf_counter() - t0
    questions = READERS[task](data_dir)[:limit]
    t0 = time.perf_counter()
    ours_scores = loglikelihoods(model, [q.pairs() for q in questions], progress=False, desc=task)
    if task.startswith("truthfulqa_mc2"):  # the metrics as `rankcut eval` computes them from these scores
        ours_metrics = score_mc2(questions, ours_scores)
    elif task == "lambada":
        ours_metrics = score_lambada(ours_scores)
    else:
        ours_metrics = score_multiple_choice(questions, ours_scores, task)
    t_ours = time.perf_counter() - t0
    deltas, same_strings, same_acc, same_norm, norm_items = [], 0, 0, 0, 0
    for q, row, s in zip(questions, ours_scores, samples):
        pairs = [(a[0], a[1]) for a in s["arguments"]]  # lm-eval's (context, continuation) per choice
        same_strings += int(pairs == q.pairs())
        their_lls = [float(r[0]) for r in s["filtered_resps"]]
        our_lls = [sc.loglik for sc in row]
        deltas += [abs(a - b) for a, b in zip(our_lls, their_lls)]
        if task == "lambada":
            same_acc += int(bool(s["filtered_resps"][0][1]) == row[0].greedy)
            continue
        same_acc += int(_argmax(our_lls) == _argmax(their_lls))
        if task in NORM_TASKS:
            norm_items += 1
            lengths = [len(c.removeprefix(" ")) for _, c in q.pairs()]
            their_lengths = [len(c.removeprefix(" ")) for _, c in pairs]
            same_norm += int(_argmax([ll / n for ll, n in zip(our_lls, lengths)])
                             == _argmax([ll / n for ll, n in zip(their_lls, their_lengths)]))
    n = len(questions)
    row = {"task": task, "items": n, "strings_identical": same_strings / n,
           "max_abs_dloglik": max(deltas), "median_abs_dloglik": statistics.median(deltas),
           "same_acc_pick": same_acc / n, "same_acc_norm_pick": same_norm / norm_items if norm_items else None,
           "rankcut": {k: v for k, v in ours_metrics.items() if not k.endswith("stderr")},
           "lm_eval": {k.split(",")[0]: v for k, v in theirs.items() if "stderr" not in k and k != "alias"},
           "seconds": {"lm_eval": round(t_lm, 1), "rankcut": round(t_ours, 1)}}
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--limit", type=int, default=200)
    parser.add_argument("--tasks", default="arc_easy,arc_challenge,hellaswag,winogrande,boolq,lambada,mmlu,truthfulqa_mc2")
    parser.add_argument("--tqa-limit", type=int, default=100, help="items of TruthfulQA (its set is small)")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    data_dir = find_data_dir(args.data_dir)
    model = rankcut.load_model(args.model)
    rows = []
    for task in args.tasks.split(","):
        row = compare(model, task, args.tqa_limit if task.startswith("truthfulqa") else args.limit, data_dir)
        rows.append(row)
        norm = "" if row["same_acc_norm_pick"] is None else f" acc_norm {row['same_acc_norm_pick']:.1%}"
        print(f"{task:<14} n={row['items']} strings identical {row['strings_identical']:.0%}  "
              f"|Δll| max {row['max_abs_dloglik']:.2e} median {row['median_abs_dloglik']:.2e}  "
              f"same pick: acc {row['same_acc_pick']:.1%}{norm}  rankcut {row['rankcut']}  lm-eval {row['lm_eval']}",
              flush=True)
    if args.out:
        doc = {"model": args.model, "limit": args.limit, "machine": describe_machine("cpu"),
               "date": time.strftime("%Y-%m-%d"), "rows": rows}
        atomic_write_text(args.out, json.dumps(doc, indent=2) + "\n")


if __name__ == "__main__":
    main()
