#!/usr/bin/env bash
# Train the three Shiva artifacts the benchmarks use on the bundled model (resumable: run again
# after an interruption).  ~20 min each on 2 CPU cores.
set -euo pipefail
cd "$(dirname "$0")/.."
STAGES=${STAGES:-200,200,200}
for spec in "0.6" "0.8" "0.6 --fixed-ratio"; do
    set -- $spec
    keep=$1; shift
    name="keep${keep}${1:+-fixed}"
    [ -f "runs/shiva/$name/shiva.json" ] && { echo "runs/shiva/$name: trained"; continue; }
    .venv/bin/ditaccel train-shiva --model fmnist-dit --keep "$keep" --stage-steps "$STAGES" "$@" \
        --out "runs/shiva/$name"
done
