"""``ditaccel train-text-reference``: reproduce a bundled text-conditioned reference model."""

from __future__ import annotations


HELP = ("train (or resume) a bundled text-conditioned model (fmnist-pixart: PixArt-style "
        "cross-attention; fmnist-mmdit: SD3-style joint attention, rectified flow) on captioned "
        "Fashion-MNIST with MiniLM-L6 text embeddings")


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
