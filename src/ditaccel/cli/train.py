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


class Shiva:
    HELP = ("train Shiva's token router and keep-ratio policy (and adapters) on a frozen DiT "
            "(class-conditional, or a bundled text model: captions as it was trained)")

    @staticmethod
    def add_arguments(p) -> None:
        from ..methods.shiva.train import ADAPTERS, ShivaTrainConfig

        d = ShivaTrainConfig()
        p.add_argument("--model", default="fmnist-dit",
                       help="bundled model name or a diffusers pipeline folder trained on Fashion-MNIST "
                            "(28x28x1; 10 classes, or captions for text models; the training data) "
                            "(default %(default)s)")
        p.add_argument("--keep", type=float, default=d.keep, help="target mean keep ratio of the routed blocks")
        p.add_argument("--out", required=True,
                       help="run folder: checkpoint.{safetensors,json} (resumed when present) and the "
                            "artifact shiva.{safetensors,json}")
        p.add_argument("--stage-steps", default=f"{d.warmup_steps},{d.policy_steps},{d.joint_steps}",
                       help="steps of the three stages: router warm-up, policy learning, joint tuning")
        p.add_argument("--fixed-ratio", action="store_true",
                       help="keep the ratio at --keep everywhere (no policy learning): the ablation")
        p.add_argument("--adapter", default=d.adapter, choices=list(ADAPTERS))
        p.add_argument("--adapter-rank", type=int, default=d.adapter_rank)
        p.add_argument("--batch-size", type=int, default=d.batch_size)
        p.add_argument("--seed", type=int, default=d.seed)
        p.add_argument("--ckpt-every", type=int, default=d.ckpt_every)
        p.add_argument("--stop-after", type=int, default=None,
                       help="stop after this many more steps (a checkpoint); run again to resume")

    @staticmethod
    def run(args) -> int:
        from ..data import load_fashion_mnist
        from ..methods.shiva.train import ShivaTrainConfig, train_shiva
        from ..registry import load_pipeline

        try:
            stages = [int(v) for v in args.stage_steps.split(",")]
        except ValueError:
            stages = []
        if len(stages) != 3:
            raise ValueError(f"--stage-steps takes three integers like 150,150,150, got {args.stage_steps!r}")
        from ..pipeline import is_flow_config
        from ..sampling import is_text_pipeline

        pipe = load_pipeline(args.model, "fp32", args.device)
        cfg = ShivaTrainConfig(keep=args.keep, objective="flow" if is_flow_config(pipe.scheduler.config) else "epsilon", adaptive=not args.fixed_ratio, warmup_steps=stages[0],
                               policy_steps=stages[1], joint_steps=stages[2], adapter=args.adapter,
                               adapter_rank=args.adapter_rank, batch_size=args.batch_size, seed=args.seed,
                               ckpt_every=args.ckpt_every)
        tf = pipe.transformer
        text = is_text_pipeline(pipe)
        shape = (tf.config.in_channels, tf.config.sample_size,
                 10 if text else getattr(tf.config, "num_embeds_ada_norm", None))
        if shape != (1, 28, 10):
            raise ValueError(f"{args.model}: train-shiva trains on Fashion-MNIST, so the model must take 28x28x1 "
                             f"images with 10 classes or captions (this one: {shape[0]} channels, size {shape[1]}, "
                             f"{shape[2]} classes)")
        stem = train_shiva(tf, args.out, cfg, load_fashion_mnist("train"), stop_after=args.stop_after)
        from .. import distributed as dist

        if dist.is_main():
            print(f"{'checkpoint' if stem.name == 'checkpoint' else 'Shiva artifact'} written to {stem}"
                  f".{{safetensors,json}}")
        return 0


class TextReference:
    HELP = ("train (or resume) a bundled text-conditioned model (fmnist-pixart: PixArt-style "
            "cross-attention; fmnist-mmdit: SD3-style joint attention, rectified flow) on captioned "
            "Fashion-MNIST with MiniLM-L6 text embeddings")

    @staticmethod
    def add_arguments(p) -> None:
        from ..models.text_reference import PRESETS, TextTrainConfig

        d = TextTrainConfig()
        p.add_argument("--preset", required=True, choices=sorted(PRESETS))
        p.add_argument("--out", default=None,
                       help="run folder: checkpoint.{safetensors,json} (resumed when present) and "
                            "pipeline/ (default runs/PRESET)")
        p.add_argument("--export", default=None,
                       help="where to write the final diffusers pipeline folder (default OUT/pipeline)")
        p.add_argument("--steps", type=int, default=d.steps)
        p.add_argument("--batch-size", type=int, default=d.batch_size)
        p.add_argument("--lr", type=float, default=d.lr)
        p.add_argument("--warm-start", default=d.warm_start,
                       help="class-conditional DiT to start from (bundled name or folder), or 'none' "
                            "(default %(default)s)")
        p.add_argument("--seed", type=int, default=d.seed)
        p.add_argument("--ckpt-every", type=int, default=d.ckpt_every)
        p.add_argument("--stop-after", type=int, default=None,
                       help="stop after this many more steps (a checkpoint); run again to resume")

    @staticmethod
    def run(args) -> int:
        from ..models.text_reference import TextTrainConfig, train_text_reference

        warm = None if str(args.warm_start).lower() == "none" else args.warm_start
        cfg = TextTrainConfig(preset=args.preset, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                              warm_start=warm, seed=args.seed, ckpt_every=args.ckpt_every)
        if args.stop_after is not None and args.stop_after < 1:
            raise ValueError(f"--stop-after must be >= 1, got {args.stop_after}")
        path = train_text_reference(args.out or f"runs/{args.preset}", cfg, export_to=args.export,
                                    stop_after=args.stop_after)
        print(f"{'checkpoint' if path.name == 'checkpoint' else 'pipeline'} written to {path}")
        return 0
