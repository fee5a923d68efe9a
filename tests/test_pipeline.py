import pytest
import torch

from ditaccel.pipeline import DiTPixelPipeline, make_scheduler
from ditaccel.sampling import sample
from tests.conftest import tiny_dit


@pytest.mark.parametrize("sampler,steps", [("ddim", 5), ("ddpm", 6), ("dpm++", 4)])
def test_every_sampler_runs_and_counts_calls(tiny_pipe, sampler, steps):
    images, stats = sample(tiny_pipe, [0, 1, 2], sampler=sampler, steps=steps,
                           guidance_scale=2.0, progress=False)
    assert images.shape == (3, 1, 8, 8)
    assert 0 <= images.min() and images.max() <= 1
    assert stats.calls == steps  # one call per step: both CFG halves share a batch
    assert stats.flops == stats.flops_per_call * steps > 0


def test_seeded_per_image_whatever_the_batching(tiny_pipe):
    a, _ = sample(tiny_pipe, [0, 1, 2, 3], steps=4, seed=7, batch_size=4, progress=False)
    b, _ = sample(tiny_pipe, [0, 1, 2, 3], steps=4, seed=7, batch_size=3, progress=False)
    c, _ = sample(tiny_pipe, [0, 1, 2, 3], steps=4, seed=8, batch_size=4, progress=False)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert (a - c).abs().max() > 1e-2


def test_ddpm_noise_is_seeded(tiny_pipe):
    a, _ = sample(tiny_pipe, [0, 1], sampler="ddpm", steps=5, seed=3, progress=False)
    b, _ = sample(tiny_pipe, [0, 1], sampler="ddpm", steps=5, seed=3, progress=False)
    assert torch.equal(a, b)


def test_guidance_changes_output_and_doubles_rows(tiny_pipe):
    _, s_cfg = sample(tiny_pipe, [1, 2], steps=3, guidance_scale=3.0, progress=False)
    _, s_off = sample(tiny_pipe, [1, 2], steps=3, guidance_scale=1.0, progress=False)
    assert s_cfg.flops == 2 * s_off.flops  # CFG runs a conditional and a null row per image
    a, _ = sample(tiny_pipe, [1, 2], steps=3, guidance_scale=3.0, progress=False)
    b, _ = sample(tiny_pipe, [1, 2], steps=3, guidance_scale=1.0, progress=False)
    assert (a - b).abs().max() > 1e-3


def test_cfg_matches_manual_combination(tiny_pipe):
    """One DDIM step done by hand: eps = uncond + s (cond - uncond) with the null class id."""
    tf = tiny_pipe.transformer
    sched = make_scheduler("ddim", tiny_pipe.scheduler.config)
    tiny_pipe.scheduler = sched
    gen = [torch.Generator().manual_seed(0)]
    out = tiny_pipe(class_labels=[2], guidance_scale=2.5, generator=gen, num_inference_steps=1,
                    output_type="pt").images
    x = torch.randn((1, 1, 8, 8), generator=torch.Generator().manual_seed(0))
    sched.set_timesteps(1)
    t = sched.timesteps[0]
    with torch.no_grad():
        cond = tf(x, timestep=t.expand(1), class_labels=torch.tensor([2])).sample
        unc = tf(x, timestep=t.expand(1), class_labels=torch.tensor([4])).sample  # null = 4
    ref = sched.step(unc + 2.5 * (cond - unc), t, x).prev_sample
    torch.testing.assert_close(out, (ref / 2 + 0.5).clamp(0, 1), atol=1e-5, rtol=0)


def test_learned_sigma_output_is_split():
    pipe = DiTPixelPipeline(transformer=tiny_dit(out_channels=2),
                            scheduler=make_scheduler("ddim", {"num_train_timesteps": 1000}))
    pipe.set_progress_bar_config(disable=True)
    images, _ = sample(pipe, [0], steps=2, progress=False)
    assert images.shape == (1, 1, 8, 8)


def test_bad_labels_and_scheduler_restored(tiny_pipe):
    before = tiny_pipe.scheduler
    with pytest.raises(ValueError, match=r"class_labels must be in \[0, 3\]"):
        sample(tiny_pipe, [9], steps=2, progress=False)
    assert tiny_pipe.scheduler is before
    with pytest.raises(ValueError, match="unknown sampler"):
        sample(tiny_pipe, [0], sampler="heun", progress=False)
    with pytest.raises(ValueError, match="does not fit this model"):  # a flow sampler on an epsilon model
        sample(tiny_pipe, [0], sampler="euler", progress=False)
    assert tiny_pipe.scheduler is before


def test_bf16_transformer_keeps_float32_sample(tiny_pipe):
    ref, _ = sample(tiny_pipe, [0, 1], steps=3, progress=False)
    tiny_pipe.transformer.to(torch.bfloat16)
    low, _ = sample(tiny_pipe, [0, 1], steps=3, progress=False)
    assert low.dtype == torch.float32
    assert (ref - low).abs().max() < 0.1


def test_auto_dtype_is_bf16_only_where_bf16_is_native(monkeypatch):
    from ditaccel import registry

    monkeypatch.setattr(registry, "native_bf16", lambda device=None: False)
    assert registry.resolve_dtype("auto") == "fp32" and registry.resolve_dtype("bf16") == "bf16"
    monkeypatch.setattr(registry, "native_bf16", lambda device=None: True)
    assert registry.resolve_dtype("auto") == "bf16" and registry.resolve_dtype("fp32") == "fp32"
    with pytest.raises(ValueError, match="unknown dtype"):
        registry.resolve_dtype("int8")
