import os

# The default run computes on the CPU, also on a GPU machine (the CUDA checks are in
# tests/test_cuda.py); DITACCEL_DEVICE=cuda runs the CLI tests on the GPU instead.
os.environ.setdefault("DITACCEL_DEVICE", "cpu")

import pytest
import torch
from diffusers import DDIMScheduler, DiTTransformer2DModel

from ditaccel.models.reference import NOISE_SCHEDULE
from ditaccel.pipeline import DiTPixelPipeline


def tiny_dit(out_channels: int = 1, seed: int = 0) -> DiTTransformer2DModel:
    torch.manual_seed(seed)
    model = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=1,
                                  out_channels=out_channels, num_layers=2, sample_size=8,
                                  patch_size=2, num_embeds_ada_norm=4, norm_type="ada_norm_zero")
    # diffusers initialises the adaLN modulation randomly, so this tiny model is not the identity.
    return model.eval()


def timed_like_flops(prof, share=0.9):
    """``prof`` (a SODA profile) with module times proportional to their FLOPs (``share`` of a
    full call in the modules): the times a tiny model measures on a shared machine are noise, and
    SODA offers partial recompute only where the profile measured it faster than the full module."""
    import dataclasses

    f = prof.module_flops.double()[0]                       # (M, R + 1), one layer
    ms = f / f[:, -1].sum() * share * prof.step_ms / prof.num_layers
    return dataclasses.replace(prof, module_ms=ms.float(), reuse_ms=(1 - share) * prof.step_ms, decollapse_ms=0.0,
                               forecast_ms=None)


@pytest.fixture
def tiny_pipe():
    pipe = DiTPixelPipeline(transformer=tiny_dit(), scheduler=DDIMScheduler(**NOISE_SCHEDULE))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def tiny_pipe_dir(tmp_path, tiny_pipe):
    path = tmp_path / "tiny-pipe"
    tiny_pipe.save_pretrained(path, safe_serialization=True)
    return path
