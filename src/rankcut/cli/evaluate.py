"""`rankcut eval`: score a model on benchmark tasks (rankcut's scorer or lm-evaluation-harness)."""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from ..core.errors import RankcutError, require
from ..core.fsutil import atomic_write_text, check_output_file
from ..core.machine import resolve_device
from ..core.modules import count_params
from ..core.version import __version__
from ..data.benchmarks import read_task_file, read_text_file
from ..evaluate.harness import run_lm_eval, task_specs
from ..evaluate.tasks import (
    check_limit,
    parse_tasks,
    run_task,
    run_task_file,
    run_text_file,
)
from ..io.models import load_model


def cmd_eval(args: argparse.Namespace) -> None:
    if args.tasks is None and not (args.text or args.task_file):
        raise RankcutError("say what to score: --tasks wikitext2,arc_easy,..., --text FILE or --task-file FILE.jsonl")
    tasks = parse_tasks(args.tasks) if args.tasks is not None else []
    check_limit(args.limit)
    if args.sample_seed is not None and args.limit is None:
        raise RankcutError("--sample-seed draws --limit questions at random: give --limit too")
    for path in args.text:  # a bad file is named before the model loads
        read_text_file(path)
    for path in args.task_file:
        read_task_file(path)
    if args.out:
        check_output_file(args.out)
    if args.harness == "lm-eval":
        require("lm_eval", "lmeval", "--harness lm-eval")
        if args.text or args.task_file or args.sample_seed is not None:
            raise RankcutError("--text, --task-file and --sample-seed are rankcut's scorer's; drop --harness lm-eval")
        task_specs(tasks, args.data_dir)  # a task with no offline form is refused before the model loads
    model = load_model(args.model).to(resolve_device(args.device))
    doc: dict[str, Any] = {"model": args.model, "rankcut_version": __version__,
                           "params": count_params(model), "limit": args.limit, "results": []}
    if args.sample_seed is not None:
        doc["sample_seed"] = args.sample_seed
    if args.harness == "lm-eval":
        doc["results"] = run_lm_eval(model, tasks, args.limit, data_dir=args.data_dir)
    else:
        runs = [(task, lambda t=task: run_task(model, t, data_dir=args.data_dir, limit=args.limit, seqlen=args.seqlen,
                                               progress=not args.json, sample_seed=args.sample_seed))
                for task in tasks]
        runs += [(f"text:{path}", lambda p=path: run_text_file(model, p, args.limit, args.seqlen, not args.json))
                 for path in args.text]
        runs += [(f"file:{path}", lambda p=path: run_task_file(model, p, args.limit, not args.json, args.sample_seed))
                 for path in args.task_file]
        for task, run in runs:
            t0 = time.perf_counter()
            result = run().to_dict()
            result["seconds"] = round(time.perf_counter() - t0, 2)
            doc["results"].append(result)
            if not args.json:
                metrics = ", ".join(f"{k}={v:.4g}" for k, v in result["metrics"].items()
                                    if not k.endswith("stderr") and isinstance(v, float))
                print(f"{task:<16} n={result['n']:<6} {metrics}  ({result['seconds']:.0f} s)")
    if args.out:
        atomic_write_text(args.out, json.dumps(doc, indent=2) + "\n")
    if args.json:
        print(json.dumps(doc, indent=2))
