"""``ditaccel train-reference`` and ``ditaccel train-classifier``: reproduce the bundled weights."""

from __future__ import annotations

from pathlib import Path


class Reference:
    HELP = "train (or resume) the bundled Fashion-MNIST DiT; checkpoints under --out"

    @staticmethod
    def add_arguments(p) -> None:
        from ..models.reference import PRESETS, TrainConfig

        d = TrainConfig()
        p.add_argument("--out", default="runs/reference",
                       help="run folder: checkpoint.{safetensors,json} and pipeline/ (default %(default)s)")
        p.add_argument("--export", default=None,
                       help="where to write the final diffusers pipeline folder (default OUT/pipeline)")
        p.add_argument("--preset", default=d.preset, choices=sorted(PRESETS))
        p.add_argument("--steps", type=int, default=d.steps)
        p.add_argument("--batch-size", type=int, default=d.batch_size)
        p.add_argument("--lr", type=float, default=d.lr)
        p.add_argument("--seed", type=int, default=d.seed)
        p.add_argument("--ckpt-every", type=int, default=d.ckpt_every)

    @staticmethod
    def run(args) -> int:
        from ..models.reference import TrainConfig, train_reference

        cfg = TrainConfig(preset=args.preset, steps=args.steps, batch_size=args.batch_size,
                          lr=args.lr, seed=args.seed, ckpt_every=args.ckpt_every)
        path = train_reference(args.out, cfg, export_to=args.export)
        print(f"pipeline written to {path}")
        return 0


class Classifier:
    HELP = "train the Fashion-MNIST classifier used to check class-conditioned samples"

    @staticmethod
    def add_arguments(p) -> None:
        from ..models.classifier import ClassifierTrainConfig

        d = ClassifierTrainConfig()
        p.add_argument("--out", default="runs/fmnist-classifier",
                       help="output stem: writes OUT.safetensors and OUT.json (default %(default)s)")
        p.add_argument("--epochs", type=int, default=d.epochs)
        p.add_argument("--seed", type=int, default=d.seed)

    @staticmethod
    def run(args) -> int:
        from ..models.classifier import ClassifierTrainConfig, train_classifier

        if args.epochs < 1:
            raise ValueError(f"--epochs must be >= 1, got {args.epochs}")
        acc = train_classifier(Path(args.out), ClassifierTrainConfig(epochs=args.epochs, seed=args.seed))
        print(f"test accuracy {acc:.4f}; written to {args.out}.safetensors/.json")
        return 0
