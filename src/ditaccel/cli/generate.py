"""``ditaccel generate``: sample a class-conditional DiT pipeline and save a grid (and stats)."""

from __future__ import annotations

import math
from pathlib import Path

HELP = "generate class-conditional samples with a diffusers sampler; save a grid and stats"


def add_arguments(p) -> None:
    from ..pipeline import SAMPLERS
    from ..registry import DTYPES

    p.add_argument("--model", default="fmnist-dit",
                   help="bundled model name or a local diffusers pipeline folder (default %(default)s)")
    p.add_argument("--sampler", default="ddim", choices=list(SAMPLERS))
    p.add_argument("--steps", type=int, default=None,
                   help="sampling steps (default: ddim 50, ddpm 250, dpm++ 20)")
    p.add_argument("--cfg", type=float, default=1.5, help="classifier-free guidance scale (1 = off)")
    p.add_argument("--classes", default="0,1,2,3,4,5,6,7,8,9",
                   help="comma-separated class ids; one grid row per class")
    p.add_argument("--n", type=int, default=8, help="images per class (default %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--dtype", default="bf16", choices=list(DTYPES),
                   help="transformer dtype; the sample itself stays float32 (default %(default)s)")
    p.add_argument("--out", default="grid.png", help="grid image (PNG)")
    p.add_argument("--save-dir", default=None, help="also write every image as a PNG here")
    p.add_argument("--json", default=None, help="write run statistics (wall_s, calls, flops, ...)")


def parse_classes(text: str, num_classes: int) -> list[int]:
    try:
        classes = [int(c) for c in text.split(",") if c.strip() != ""]
    except ValueError:
        raise ValueError(f"--classes must be comma-separated integers like 0,1,2, got {text!r}") from None
    if not classes:
        raise ValueError("--classes is empty; give at least one class id, e.g. --classes 0,1,2")
    bad = [c for c in classes if not 0 <= c < num_classes]
    if bad:
        raise ValueError(f"--classes {bad} out of range: this model has classes 0..{num_classes - 1}")
    return classes


def run(args) -> int:
    import torch

    from .. import io
    from ..registry import load_pipeline
    from ..sampling import sample
    from ..viz import save_grid, save_images

    if args.n < 1:
        raise ValueError(f"--n must be >= 1, got {args.n}")
    if args.steps is not None and args.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {args.steps}")
    out = Path(args.out)
    if out.suffix.lower() != ".png":
        raise ValueError(f"--out must name a .png file, got {args.out}")
    pipe = load_pipeline(args.model, args.dtype)
    num_classes = int(pipe.transformer.config.num_embeds_ada_norm)
    classes = parse_classes(args.classes, num_classes)
    labels = [c for c in classes for _ in range(args.n)]
    pipe.set_progress_bar_config(disable=False, leave=False)
    images, stats = sample(pipe, labels, sampler=args.sampler, steps=args.steps,
                           guidance_scale=args.cfg, seed=args.seed, batch_size=args.batch_size)
    save_grid(images, out, nrow=args.n)
    if args.save_dir:
        save_images(images, labels, Path(args.save_dir))
    info = {"model": args.model, "dtype": args.dtype, "threads": torch.get_num_threads(),
            **stats.to_dict()}
    if args.json:
        io.write_json(args.json, info)
    print(f"{len(labels)} images, {stats.calls} transformer calls, {stats.flops / 1e9:.1f} GFLOP, "
          f"{stats.wall_s:.2f} s -> {out}")
    return 0
