"""``ditaccel train-classifier``: reproduce the bundled Fashion-MNIST classifier."""

from __future__ import annotations

from pathlib import Path

HELP = "train the Fashion-MNIST classifier used to check class-conditioned samples"


def add_arguments(p) -> None:
    from ..models.classifier import ClassifierTrainConfig

    d = ClassifierTrainConfig()
    p.add_argument("--out", default="runs/fmnist-classifier",
                   help="output stem: writes OUT.safetensors and OUT.json (default %(default)s)")
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--seed", type=int, default=d.seed)


def run(args) -> int:
    from ..models.classifier import ClassifierTrainConfig, train_classifier

    if args.epochs < 1:
        raise ValueError(f"--epochs must be >= 1, got {args.epochs}")
    acc = train_classifier(Path(args.out), ClassifierTrainConfig(epochs=args.epochs, seed=args.seed))
    print(f"test accuracy {acc:.4f}; written to {args.out}.safetensors/.json")
    return 0
