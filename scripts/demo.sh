#!/usr/bin/env bash
# Install on a fresh machine of this kind (CPU only) and run the main job on the bundled model.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q torch==2.13.0
.venv/bin/pip install -q -e .
.venv/bin/ditaccel generate --model fmnist-dit --sampler ddim --steps 50 --cfg 3.0 \
    --classes 0,1,2,3,4,5,6,7,8,9 --n 8 --seed 0 --out grid.png --json stats.json "$@"
