"""A small CNN trained on Fashion-MNIST; it checks that class-conditioned samples show their class.

Reproduce the bundled weights with ``ditaccel train-classifier``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .. import io
from ..data import load_fashion_mnist

KIND = "fmnist-classifier"


class FashionClassifier(nn.Module):
    """Input (B, 1, 28, 28) in [-1, 1]; output logits (B, 10)."""

    def __init__(self, width: int = 32):
        super().__init__()

        def block(cin, cout):
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(),
                                 nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU())

        self.features = nn.Sequential(block(1, width), nn.MaxPool2d(2),          # 14x14
                                      block(width, 2 * width), nn.MaxPool2d(2),  # 7x7
                                      block(2 * width, 4 * width), nn.AdaptiveAvgPool2d(1))
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(0.3), nn.Linear(4 * width, 10))
        self.width = width

    def forward(self, x):
        return self.head(self.features(x))


@dataclass(frozen=True)
class ClassifierTrainConfig:
    epochs: int = 2
    batch_size: int = 128
    lr: float = 2e-3
    seed: int = 0


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    # Random shifts of up to 2 pixels; no flips (shoes in Fashion-MNIST all face left).
    pad = F.pad(x, (2, 2, 2, 2), value=-1.0)
    dx, dy = torch.randint(0, 5, (2,), generator=gen).tolist()
    return pad[..., dy:dy + 28, dx:dx + 28]


def train_classifier(out_stem: str | Path, cfg: ClassifierTrainConfig = ClassifierTrainConfig(),
                     progress: bool = True) -> float:
    """Train, write ``out_stem.{safetensors,json}``, return test accuracy."""
    torch.manual_seed(cfg.seed)
    x, y = load_fashion_mnist("train")
    xt, yt = load_fashion_mnist("test")
    model = FashionClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=1e-4)
    steps = cfg.epochs * (len(x) // cfg.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=steps)
    gen = torch.Generator().manual_seed(cfg.seed)
    bar = tqdm(total=steps, desc="train-classifier", disable=not progress)
    for _ in range(cfg.epochs):
        model.train()
        perm = torch.randperm(len(x), generator=gen)
        for i in range(len(x) // cfg.batch_size):
            idx = perm[i * cfg.batch_size:(i + 1) * cfg.batch_size]
            loss = F.cross_entropy(model(_augment(x[idx], gen)), y[idx], label_smoothing=0.05)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    acc = accuracy(model, xt, yt)
    io.save_artifact(out_stem, KIND, model.state_dict(),
                     {"width": model.width, "test_accuracy": acc, "train_config": asdict(cfg)})
    return acc


@torch.no_grad()
def predict(model: FashionClassifier, x: torch.Tensor, batch: int = 1000) -> torch.Tensor:
    model.eval()
    return torch.cat([model(x[i:i + batch]).argmax(1) for i in range(0, len(x), batch)])


def accuracy(model: FashionClassifier, x: torch.Tensor, y: torch.Tensor) -> float:
    return (predict(model, x) == y).float().mean().item()


def load_classifier(stem: str | Path) -> FashionClassifier:
    tensors, meta = io.load_artifact(stem, KIND)
    model = FashionClassifier(width=int(meta["width"]))
    model.load_state_dict(tensors)
    return model.eval()
