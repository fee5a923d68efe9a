import math

import pytest
import torch

from ditaccel import metrics


def _images(n=6, c=1, size=28, seed=0):
    g = torch.Generator().manual_seed(seed)
    return 0.2 + 0.6 * torch.rand(n, c, size, size, generator=g)  # in [0.2, 0.8]: no clipping


def test_identical_images_give_inf_psnr_and_unit_ssim():
    x = _images()
    assert metrics.psnr(x, x) == math.inf
    assert metrics.ssim(x, x) == pytest.approx(1.0, abs=1e-12)


def test_constant_offset_gives_known_psnr():
    x = _images()
    # MSE = 0.1^2 = 0.01 -> PSNR = 10 log10(1 / 0.01) = 20 dB
    assert metrics.psnr(x, x + 0.1) == pytest.approx(20.0, abs=1e-5)
    assert metrics.psnr(x, x - 0.01) == pytest.approx(40.0, abs=1e-4)


def test_gaussian_noise_gives_expected_psnr_and_lower_ssim():
    x = _images(n=8, size=64)
    noise = 0.05 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    # E[MSE] = sigma^2 -> PSNR ~ 10 log10(1 / 0.0025) = 26.02 dB
    assert metrics.psnr(x, x + noise) == pytest.approx(26.02, abs=0.1)
    s_small = metrics.ssim(x, x + noise)
    s_big = metrics.ssim(x, x + 4 * noise)
    assert 0 < s_big < s_small < 1


def test_ssim_of_structure_change_is_low():
    x = _images()
    assert metrics.ssim(x, x.flip(-1)) < 0.2


def test_shape_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match="differ in shape"):
        metrics.psnr(_images(n=2), _images(n=3))


def test_frechet_distance_on_known_gaussians():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(4000, 8, generator=g, dtype=torch.float64)
    assert metrics.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    shift = torch.tensor([3.0, 0, 0, 0, 0, 0, 0, 4.0], dtype=torch.float64)
    # Same covariance, means 5 apart -> FD = 25 exactly.
    assert metrics.frechet_distance(a, a + shift) == pytest.approx(25.0, abs=1e-6)
    # Scaling by 2: covariance 4C vs C -> tr(C + 4C - 2*2C) = tr(C) ~ 8.
    assert metrics.frechet_distance(a, 2 * a) == pytest.approx(8.0, rel=0.1)


def test_image_frechet_distance_uses_real_features():
    x = _images(n=8)
    assert metrics.image_frechet_distance(x, x) == pytest.approx(0.0, abs=1e-3)
    feats = metrics.feature_extractor()(x)
    assert feats.shape == (8, 1280)
    assert metrics.image_frechet_distance(x, 1 - x) > 1.0


def test_flops_of_linear_layer():
    lin = torch.nn.Linear(16, 32, bias=False)
    assert metrics.transformer_flops(lin, torch.randn(5, 16)) == 2 * 5 * 16 * 32


def test_ssim_on_images_smaller_than_the_window():
    x = _images(size=8)
    assert metrics.ssim(x, x) == pytest.approx(1.0, abs=1e-12)
    assert metrics.ssim(x, x.flip(-1)) < 0.5


def test_features_are_fp32_whatever_the_cpu(monkeypatch):
    # FD compares numbers from different sessions and machines: the default extractor must not
    # switch to bf16 where the CPU has it (it did, and FD vs the test set moved by percents)
    from ditaccel import registry

    monkeypatch.setattr(registry, "native_bf16", lambda *a, **k: True)
    fx = metrics.FeatureExtractor()
    x = torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", enabled=False):
        ref = fx(x)
    assert not fx.bf16 and torch.equal(fx(x), ref)
    fast = metrics.FeatureExtractor(bf16=True)
    assert fast.bf16 and not torch.equal(fast(x), ref)  # opting in does change the numbers


def test_flops_count_attention_on_every_backend():
    """The CPU's fused attention kernel is counted like CUDA's and like the math fallback."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from ditaccel.metrics import flop_counter

    q, k, v = torch.randn(2, 3, 16, 8), torch.randn(2, 3, 20, 8), torch.randn(2, 3, 20, 8)
    expected = 4 * 2 * 3 * 16 * 20 * 8  # Q K^T and P V
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.MATH):
        with sdpa_kernel(backend), flop_counter() as c:
            torch.nn.functional.scaled_dot_product_attention(q, k, v)
        assert c.get_total_flops() == expected, backend


def test_op_counter_counts_dispatched_ops():
    from ditaccel.metrics import OpCounter

    x = torch.randn(4, 4)
    with OpCounter() as c:
        y = x @ x
        (y + 1).relu_()
    assert c.counts["mm"] == 1 and c.counts["add"] == 1 and c.counts["relu_"] == 1 and c.total == 3
