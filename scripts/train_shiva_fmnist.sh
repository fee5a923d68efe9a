#!/usr/bin/env bash
# Train the three Shiva artifacts the benchmarks use on a bundled model (resumable: run again
# after an interruption).  ~20 min each on 2 CPU cores.
#   bash scripts/train_shiva_fmnist.sh                      # fmnist-dit -> runs/shiva/
#   MODEL=fmnist-mmdit bash scripts/train_shiva_fmnist.sh   # the SD3-style text model -> runs/shiva-mmdit/
set -euo pipefail
cd "$(dirname "$0")/.."
STAGES=${STAGES:-200,200,200}
MODEL=${MODEL:-fmnist-dit}
if [ "$MODEL" = fmnist-dit ]; then DIR=runs/shiva; else DIR="runs/shiva-${MODEL#fmnist-}"; fi
for spec in "0.6" "0.8" "0.6 --fixed-ratio"; do
    set -- $spec
    keep=$1; shift
    name="keep${keep}${1:+-fixed}"
    [ -f "$DIR/$name/shiva.json" ] && { echo "$DIR/$name: trained"; continue; }
    .venv/bin/ditaccel train-shiva --model "$MODEL" --keep "$keep" --stage-steps "$STAGES" "$@" \
        --out "$DIR/$name"
done
