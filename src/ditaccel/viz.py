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
    for i, (img, y) in enumerate(zip(images, labels)):
        save_png(to_pil(img), folder / f"{i:05d}_c{int(y)}.png")


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
        with Image.open(p) as im:
            a = np.asarray(im.convert("L") if im.mode in ("L", "I", "1") else im.convert("RGB"))
        arrays.append(a[..., None] if a.ndim == 2 else a)
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        raise ValueError(f"{folder}: images differ in size/mode {sorted(shapes)}; use one size")
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255
    return [p.name for p in files], x
