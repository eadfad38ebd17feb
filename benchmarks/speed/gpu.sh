#!/usr/bin/env bash
# The GPU measurements of docs/large-models.md, as one script for a lent GPU machine (15 minutes).
# Run from the repository root with the project's environment set up (make setup). Each step
# writes its JSON under ${OUT:-gpu-results}/.
#   1. SmolLM2 compressed on the GPU and on the CPU: factors must agree within 1e-4 relative;
#   2. the ~1B shape compressed on the GPU (whiten 0.8, then the two-pass Fisher budget 0.8);
#   3. random-llama-2-7b compressed on the GPU, streamed, wall time;
#   4. prefill and decode, dense against 50% and 80% cuts, bf16, SmolLM2 and the 7B shape.
set -euo pipefail
OUT=${OUT:-gpu-results}
mkdir -p "$OUT"
PY=${PY:-.venv/bin/python}
RC="$PY -m rankcut.cli"
CAL="--calib-samples 8 --calib-seqlen 256"

nvidia-smi --query-gpu=name,memory.total --format=csv > "$OUT/gpu.txt"

$RC compress smollm2-135m --method whiten --keep 0.8 --device cuda --out "$OUT/smol-gpu" --json --overwrite > "$OUT/smol-gpu.json"
$RC compress smollm2-135m --method whiten --keep 0.8 --device cpu --out "$OUT/smol-cpu" --json --overwrite > "$OUT/smol-cpu.json"
$PY - "$OUT" <<'EOF' > "$OUT/smol-agreement.json"
import json, sys
import rankcut
out = sys.argv[1]
a, b = rankcut.load(f"{out}/smol-cpu").state_dict(), rankcut.load(f"{out}/smol-gpu").state_dict()
errs = {k: float((a[k].double() - b[k].double()).norm() / a[k].double().norm().clamp_min(1e-30)) for k in a}
print(json.dumps({"max_rel": max(errs.values()), "worst": max(errs, key=errs.get)}))
EOF

for method in "--method whiten --keep 0.8" "--method fisher --budget 0.8 --two-pass"; do
  tag=$(echo "$method" | tr -cd 'a-z0-9.')
  $RC compress random-llama-3.2-1b $method $CAL --device cuda --out "$OUT/1b-$tag" --json --overwrite > "$OUT/1b-$tag.json"
done

$RC compress random-llama-2-7b --method whiten --keep 0.8 $CAL --device cuda --offload disk \
    --out "$OUT/7b-w80" --json --overwrite > "$OUT/7b-w80.json"
$RC compress random-llama-2-7b --method svd --keep 0.5 --device cuda --offload disk \
    --out "$OUT/7b-s50" --json --overwrite > "$OUT/7b-s50.json"

$RC compress smollm2-135m --method svd --keep 0.5 --dtype bfloat16 --device cuda --out "$OUT/smol-s50" --json --overwrite > /dev/null
for cut in smol-gpu smol-s50; do
  $RC bench smollm2-135m --vs "$OUT/$cut" --device cuda --dtype bfloat16 --seqlen 512 --decode 64 --json > "$OUT/bench-$cut.json"
done
for cut in 7b-w80 7b-s50; do
  $RC bench random-llama-2-7b --vs "$OUT/$cut" --device cuda --dtype bfloat16 --seqlen 512 --decode 64 --json > "$OUT/bench-$cut.json"
done
