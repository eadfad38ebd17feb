"""`rankcut eval`: score a model on benchmark tasks (rankcut's scorer or lm-evaluation-harness)."""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from ..core.errors import require
from ..core.fsutil import atomic_write_text, check_output_file
from ..core.modules import count_params
from ..core.version import __version__
from ..evaluate.harness import run_lm_eval, task_specs
from ..evaluate.tasks import parse_tasks, run_task
from ..io.models import load_model


def cmd_eval(args: argparse.Namespace) -> None:
    tasks = parse_tasks(args.tasks)
    if args.out:
        check_output_file(args.out)
    if args.harness == "lm-eval":
        require("lm_eval", "lmeval", "--harness lm-eval")
        task_specs(tasks, args.data_dir)  # a task with no offline form is refused before the model loads
    model = load_model(args.model)
    doc: dict[str, Any] = {"model": args.model, "rankcut_version": __version__,
                           "params": count_params(model), "limit": args.limit, "results": []}
    if args.harness == "lm-eval":
        doc["results"] = run_lm_eval(model, tasks, args.limit, data_dir=args.data_dir)
    else:
        for task in tasks:
            t0 = time.perf_counter()
            result = run_task(model, task, data_dir=args.data_dir, limit=args.limit,
                              seqlen=args.seqlen, progress=not args.json).to_dict()
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
