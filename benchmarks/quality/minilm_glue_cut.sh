#!/usr/bin/env bash
# MiniLM-L6 on SST-2 and MRPC at 50% of the block matrices kept, without fine-tuning the cut:
# each method compresses the dense classifier fine-tuned by the GLUE recipe (cached by
# `rankcut eval minilm-l6 --tasks sst2,mrpc`), calibrated on the task's own training text, and
# the cut is scored on the dev set as it is. The gradient methods (fisher, kfac) score each
# calibration window against a label drawn from the classifier's own prediction.
# Run from the repository root after `make setup`; one JSON line per (task, method) is appended
# to benchmarks/results/minilm-glue-cut.jsonl.
set -euo pipefail
R=benchmarks/results
OUT=${OUT:-out/minilm-glue-cut}
mkdir -p "$R" "$OUT"
export TRANSFORMERS_VERBOSITY=error
rc() { .venv/bin/rankcut "$@"; }
rc eval minilm-l6 --tasks sst2,mrpc --json > "$OUT/dense.json"  # fine-tunes and caches the classifiers once
GLUE=${RANKCUT_CACHE:-$HOME/.cache/rankcut}/glue
for task in ${TASKS:-sst2 mrpc}; do
  for method in ${METHODS:-svd whiten fisher kfac}; do
    extra=""
    [ "$method" != svd ] && extra="--two-pass --calib $task"
    start=$(date +%s)
    rc compress "$GLUE/minilm-l6-$task" --method "$method" --budget 0.5 $extra \
       --out "$OUT/$task-$method" --overwrite --json > "$OUT/$task-$method-compress.json"
    took=$(( $(date +%s) - start ))
    rc eval "$OUT/$task-$method" --tasks "$task" --json > "$OUT/$task-$method-eval.json"
    python3 - "$task" "$method" "$took" "$OUT" >> "$R/minilm-glue-cut.jsonl" <<'PY'
import json, sys, datetime
task, method, took, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
comp = json.load(open(f"{out}/{task}-{method}-compress.json"))
ev = json.load(open(f"{out}/{task}-{method}-eval.json"))
print(json.dumps({"task": task, "method": method, "budget": 0.5, "compress_s": took,
                  "params_after": comp.get("params_after"), "result": ev.get("results", ev),
                  "date": datetime.date.today().isoformat()}))
PY
  done
done
