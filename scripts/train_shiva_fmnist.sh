#!/usr/bin/env bash
# Train the three Shiva artifacts the benchmarks use on a bundled model, with the recipe of the
# training curve (docs/shiva.md), exporting a curve point every 300 steps.  Resumable: run it again
# after an interruption; STOP_AFTER=N ends the current run cleanly after N more steps (a session's
# slice of a long run).  About 4-5 h per artifact on 2 CPU cores.
#   bash scripts/train_shiva_fmnist.sh                      # fmnist-dit -> runs/shiva/
#   MODEL=fmnist-mmdit bash scripts/train_shiva_fmnist.sh   # the SD3-style text model -> runs/shiva-mmdit/
#   python benchmarks/shiva_curve.py                        # the curve of what has been trained so far
set -euo pipefail
cd "$(dirname "$0")/.."
STAGES=${STAGES:-100,100,2200}
RECIPE=${RECIPE:---budget-gain 0.1 --lr-adapter 3e-3 --export-every 300}
MODEL=${MODEL:-fmnist-dit}
if [ "$MODEL" = fmnist-dit ]; then DIR=runs/shiva; else DIR="runs/shiva-${MODEL#fmnist-}"; fi
for spec in "0.8" "0.6" "0.6 --fixed-ratio"; do
    set -- $spec
    keep=$1; shift
    name="keep${keep}${1:+-fixed}"
    [ -f "$DIR/$name/shiva.json" ] && { echo "$DIR/$name: trained"; continue; }
    # shellcheck disable=SC2086
    .venv/bin/ditaccel train-shiva --model "$MODEL" --keep "$keep" --stage-steps "$STAGES" $RECIPE "$@" \
        ${STOP_AFTER:+--stop-after "$STOP_AFTER"} --out "$DIR/$name"
    [ -f "$DIR/$name/shiva.json" ] || { echo "$DIR/$name: stopped early (checkpoint kept); run again to resume"; exit 0; }
done
