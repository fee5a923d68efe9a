"""Saving images and grids (PNG, written atomically)."""

from __future__ import annotations

import io as _io
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .io import _atomic_replace


def to_pil(img: torch.Tensor) -> Image.Image:
    """(C, H, W) in [0, 1] -> PIL image (L or RGB)."""
    arr = (img.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(arr[..., 0], mode="L") if arr.shape[-1] == 1 else Image.fromarray(arr)


def save_png(image: Image.Image, path: Path) -> None:
    buf = _io.BytesIO()
    image.save(buf, format="PNG")
    _atomic_replace(Path(path), lambda f: f.write(buf.getvalue()))


def make_grid(images: torch.Tensor, nrow: int, pad: int = 2) -> torch.Tensor:
    n, c, h, w = images.shape
    rows = -(-n // nrow)
    grid = torch.ones(c, rows * (h + pad) + pad, nrow * (w + pad) + pad)
    for i in range(n):
        r, k = divmod(i, nrow)
        grid[:, pad + r * (h + pad): pad + r * (h + pad) + h, pad + k * (w + pad): pad + k * (w + pad) + w] = images[i]
    return grid


def save_grid(images: torch.Tensor, path: Path, nrow: int, scale: int = 2) -> None:
    img = to_pil(make_grid(images, nrow))
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    save_png(img, path)


def save_images(images: torch.Tensor, labels, folder: Path) -> None:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    import re

    for i, (img, y) in enumerate(zip(images, labels)):
        tag = f"c{int(y)}" if not isinstance(y, str) else re.sub(r"[^A-Za-z0-9]+", "-", y).strip("-")[:40]
        save_png(to_pil(img), folder / f"{i:05d}_{tag}.png")


def load_images(folder: Path) -> tuple[list[str], torch.Tensor]:
    """All PNG/JPEG images of a folder, sorted by name, as (N, C, H, W) in [0, 1]."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: not a folder of images")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    if not files:
        raise ValueError(f"{folder}: no .png/.jpg images in it")
    arrays = []
    for p in files:
        try:
            with Image.open(p) as im:
                a = np.asarray(im.convert("L") if im.mode in ("L", "I", "1") else im.convert("RGB"))
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            # (PIL raises UnidentifiedImageError, an OSError, for a file that is not an image)
            raise ValueError(f"{p}: not a readable image ({' '.join(str(e).split())[:120]}); "
                             "remove it or replace it with the right file") from None
        arrays.append(a[..., None] if a.ndim == 2 else a)
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        raise ValueError(f"{folder}: images differ in size/mode {sorted(shapes)}; use one size")
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255
    return [p.name for p in files], x


def _save_figure(fig, path: Path) -> None:
    buf = _io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    _atomic_replace(Path(path), lambda f: f.write(buf.getvalue()))


def plot_profile(profile, folder: Path) -> list[Path]:
    """Heatmaps of the cache error (step x layer; one per module and cache age) and of the best
    prune error (lowest over ratios and token scores), log colour scale.  Returns the files."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    e_c = profile.e_cache
    best_p = profile.e_prune.flatten(-2).nan_to_num(float("inf")).amin(-1)
    best_p = torch.where(torch.isinf(best_p), torch.nan, best_p)
    finite = torch.cat([e_c[torch.isfinite(e_c)], best_p[torch.isfinite(best_p)]]).clamp_min(1e-8)
    norm = LogNorm(vmin=float(finite.min()), vmax=float(finite.max())) if finite.numel() else None
    for name, table in (("cache_error", e_c), ("best_prune_error", best_p)):
        mods, ages = profile.modules, profile.intervals
        fig, axes = plt.subplots(len(mods), len(ages), figsize=(2.2 * len(ages) + 1, 2.4 * len(mods)),
                                 squeeze=False, sharex=True, sharey=True)
        for mi, m in enumerate(mods):
            for ai, n in enumerate(ages):
                ax = axes[mi][ai]
                im = ax.imshow(table[:, :, mi, ai].T.clamp_min(1e-8).numpy(), aspect="auto",
                               origin="lower", norm=norm, cmap="magma")
                ax.set_title(f"{m}, cache age {n}", fontsize=8)
                if ai == 0:
                    ax.set_ylabel("layer")
                if mi == len(mods) - 1:
                    ax.set_xlabel("step")
        fig.colorbar(im, ax=axes, shrink=0.8, label="1 - cos")
        title = "cache error E_c" if name == "cache_error" else "best prune error min E_p (over ratios, scores)"
        fig.suptitle(f"{title}: {profile.meta.get('model')} {profile.meta.get('sampler')}-{profile.num_steps}")
        path = folder / f"{name}.png"
        _save_figure(fig, path)
        plt.close(fig)
        files.append(path)
    return files


def plot_schedule(plan, path: Path) -> Path:
    """Anchors and the fraction of tokens computed per step, one line per module (mean over
    layers)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    frac = plan.computed_fraction()  # (T, L, M)
    steps = torch.arange(plan.num_steps)
    fig, ax = plt.subplots(figsize=(8, 3))
    for mi, m in enumerate(plan.modules):
        ax.step(steps, frac[:, :, mi].mean(1), where="mid", label=f"{m} (mean over layers)")
    a = steps[plan.anchors]
    ax.scatter(a, torch.ones_like(a, dtype=torch.float), marker="v", color="k", zorder=3, label="anchor")
    ax.set_ylim(-0.03, 1.08)
    ax.set_xlabel("sampling step")
    ax.set_ylabel("fraction of tokens computed")
    pred = plan.meta.get("predicted", {})
    extra = f", predicted {pred['speedup_flops']:.2f}x FLOPs" if pred else ""
    ax.set_title(f"{plan.method}: {int(plan.anchors.sum())} anchors of {plan.num_steps}{extra}")
    ax.legend(fontsize=7, loc="center right")
    _save_figure(fig, path)
    plt.close(fig)
    return Path(path)
