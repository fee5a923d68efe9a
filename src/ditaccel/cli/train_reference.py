"""``ditaccel train-reference``: reproduce the bundled class-conditional reference DiT."""

from __future__ import annotations


HELP = "train (or resume) the bundled Fashion-MNIST DiT; checkpoints under --out"


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


def run(args) -> int:
    from ..models.reference import TrainConfig, train_reference

    cfg = TrainConfig(preset=args.preset, steps=args.steps, batch_size=args.batch_size,
                      lr=args.lr, seed=args.seed, ckpt_every=args.ckpt_every)
    path = train_reference(args.out, cfg, export_to=args.export)
    print(f"pipeline written to {path}")
    return 0
