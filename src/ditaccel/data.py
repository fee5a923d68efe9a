"""Fashion-MNIST from the Debian package ``dataset-fashion-mnist`` (IDX files, no download)."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import torch

CLASS_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
               "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")

_SEARCH = ("/usr/share/datasets/fashion-mnist",)


def dataset_dir() -> Path:
    for d in filter(None, (os.environ.get("DITACCEL_FASHION_MNIST"), *_SEARCH)):
        if (Path(d) / "train-images-idx3-ubyte.gz").is_file():
            return Path(d)
    raise FileNotFoundError(
        "Fashion-MNIST not found: run `apt-get install dataset-fashion-mnist` or set "
        "DITACCEL_FASHION_MNIST to a folder with the four *-ubyte.gz files")


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def load_fashion_mnist(split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """Images as float in [-1, 1], shape (N, 1, 28, 28), and int64 labels (N,)."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', not {split!r}")
    prefix = "train" if split == "train" else "t10k"
    d = dataset_dir()
    images = _read_idx(d / f"{prefix}-images-idx3-ubyte.gz")
    labels = _read_idx(d / f"{prefix}-labels-idx1-ubyte.gz")
    x = torch.from_numpy(images.copy()).float().div_(127.5).sub_(1.0).unsqueeze(1)
    return x, torch.from_numpy(labels.astype(np.int64))
