#!/usr/bin/env bash
# The design-space study of issue #6 on SmolLM2-135M, as recorded in RESULTS.md.
# `bash benchmarks/sweeps/sweeps.sh` runs every stage; `bash benchmarks/sweeps/sweeps.sh 2 3` only those.
# Each sweep resumes where it stopped if killed; rerunning a finished one writes nothing new.
set -euo pipefail
R=benchmarks/results
S=benchmarks/sweeps
mkdir -p "$R" "$S" out
export TRANSFORMERS_VERBOSITY=error
T() { /usr/bin/time -f "%e s wall, %M KiB peak" "$@"; }
STAGES="${*:-1 2 3}"

for stage in $STAGES; do case $stage in
1)  # The 210-cell sensitivity map: every (layer, kind) alone at rank 1 (Tucker-2), KL proxy on 2,048 news tokens.
    T .venv/bin/rankcut sweep smollm2-135m --space benchmarks/spaces/smollm2-sensitivity.yaml \
      --results $S/sensitivity.jsonl --proxy-tokens 2048 --json > $R/sweep-sensitivity.json
    .venv/bin/rankcut report $S/sensitivity.jsonl --out $S/sensitivity ;;
2)  # The paper's recipe (rank 1 on all kinds of 2-18 non-adjacent layers past layer 4), 40 seeded samples,
    # with layer dropping and the budgeted whitened allocation at the same sizes (on the proxy);
    # zero-shot (50 questions each) on the configurations' Pareto front (~2 min per model on 2 cores).
    T .venv/bin/rankcut sweep smollm2-135m --space benchmarks/spaces/smollm2-recipe.yaml \
      --results $S/recipe.jsonl --proxy-tokens 2048 --baselines --baseline-method whiten \
      --tasks zero-shot-six --limit 50 --no-front-baselines --json > $R/sweep-recipe.json
    .venv/bin/rankcut report $S/recipe.jsonl --out $S/recipe ;;
3)  # One configuration of the recipe compressed from scratch (no factor cache), for the per-configuration cost.
    T .venv/bin/rankcut compress smollm2-135m --method tucker --rank 1 --layers 8,12,16,20 \
      --out out/smol-recipe-4 --overwrite --json > $R/sweep-from-scratch.json ;;
esac; done
