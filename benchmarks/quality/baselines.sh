#!/usr/bin/env bash
# The dense baselines and the best training-free compression, as recorded in RESULTS.md.
# Run from the repository root after `make setup`; each step writes one JSON document.
set -euo pipefail
R=benchmarks/results
mkdir -p "$R" out
rc() { .venv/bin/rankcut "$@"; }
export TRANSFORMERS_VERBOSITY=error

# MiniLM on GLUE: fine-tune by the documented recipe (cached), score on dev
/usr/bin/time -f "%e s wall, %M KiB peak" .venv/bin/rankcut eval minilm-l6 --tasks sst2,mrpc,rte,stsb --out $R/minilm-glue.json

# SmolLM2-135M dense: wikitext2 (first 65,536 tokens, 2048-token windows) and the zero-shot tasks (100 each)
rc eval smollm2-135m --tasks wikitext2 --limit 65536 --seqlen 2048 --out $R/smollm2-dense-wikitext2.json
rc eval smollm2-135m --tasks arc_easy,arc_challenge,hellaswag,winogrande,mmlu,truthfulqa_mc1,truthfulqa_mc2,boolq,lambada \
   --limit 100 --out $R/smollm2-dense-zeroshot.json

# Best training-free method at 80% of the targeted parameters: Fisher-weighted whitening, global
# budget (modules at their break-even rank kept dense), two calibration passes
/usr/bin/time -f "%e s wall, %M KiB peak" .venv/bin/rankcut compress smollm2-135m --method fisher --budget 0.8 --two-pass --out out/smol-fisher2-b0.8 --overwrite
rc eval out/smol-fisher2-b0.8 --tasks wikitext2 --limit 65536 --seqlen 2048 --out $R/smollm2-fisher2-b0.8-wikitext2.json
rc eval out/smol-fisher2-b0.8 --tasks zero-shot-six --limit 100 --out $R/smollm2-fisher2-b0.8-zeroshot.json
rc bench smollm2-135m --vs out/smol-fisher2-b0.8 --seqlen 512 --decode 32 --repeats 5 --json > $R/smollm2-fisher2-b0.8-bench.json
