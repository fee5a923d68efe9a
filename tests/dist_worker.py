"""Run by tests/test_distributed.py under ``accelerate launch``: a few Shiva training steps on the
tiny test model, data parallel.  ``python -m tests.dist_worker OUT [STOP_AFTER]``."""

import sys

import torch

from ditaccel.methods.shiva.train import ShivaTrainConfig, train_shiva
from tests.conftest import tiny_dit

DATA = (torch.rand(64, 1, 8, 8, generator=torch.Generator().manual_seed(3)) * 2 - 1, torch.arange(64) % 4)
# every stage, with the exploration noise of stages 1-2 on, so the split of the noise is tested too
CFG = ShivaTrainConfig(keep=0.5, warmup_steps=2, policy_steps=2, joint_steps=2, batch_size=8, distill_every=1,
                       multiple=4, ckpt_every=1, lr_policy=0.05, lr_adapter=1e-2)

if __name__ == "__main__":
    stop = int(sys.argv[2]) if len(sys.argv) > 2 else None
    train_shiva(tiny_dit(), sys.argv[1], CFG, DATA, progress=False, stop_after=stop)
