"""``ditaccel generate``: sample a class- or text-conditional DiT pipeline and save a grid (and stats)."""

from __future__ import annotations

import math
from pathlib import Path

from .common import parse_classes

HELP = "generate samples for classes or prompts with a diffusers sampler; save a grid and stats"


def add_arguments(p) -> None:
    from ..pipeline import SAMPLERS
    from ..registry import DTYPES
    from .common import SEED, number

    p.add_argument("--model", default="fmnist-dit",
                   help="bundled model name or a local diffusers pipeline folder (default %(default)s)")
    p.add_argument("--sampler", default=None, choices=list(SAMPLERS),
                   help="default: the model's kind (ddim; euler for flow-matching models)")
    p.add_argument("--steps", type=number(int, 1), default=None,
                   help="sampling steps (default: ddim 50, ddpm 250, dpm++ 20, euler 28)")
    p.add_argument("--cfg", type=number(float, 1), default=1.5,
                   help="classifier-free guidance scale, >= 1 (1 = off; default %(default)s)")
    p.add_argument("--classes", default="0,1,2,3,4,5,6,7,8,9",
                   help="comma-separated class ids; one grid row per class (text models: the prompt "
                        "'a photo of a <class name>')")
    p.add_argument("--prompt", action="append", default=None,
                   help="text models: a prompt (repeat for several); one grid row per prompt, instead of --classes")
    p.add_argument("--n", type=number(int, 1), default=8, help="images per class (default %(default)s)")
    p.add_argument("--seed", type=SEED, default=0, help="image i uses seed + i (default %(default)s)")
    p.add_argument("--batch-size", type=number(int, 1), default=64)
    p.add_argument("--dtype", default="auto", choices=list(DTYPES),
                   help="transformer dtype; auto: bf16 where it is native (CUDA, AMX, AVX512-BF16), else "
                        "fp32; the sample itself stays float32 (default %(default)s)")
    p.add_argument("--out", default="grid.png", help="grid image (PNG)")
    p.add_argument("--save-dir", default=None, help="also write every image as a PNG here")
    p.add_argument("--json", default=None, help="write run statistics (wall_s, calls, flops, ...)")
    acc = p.add_argument_group("acceleration (one of --plan / --method / --shiva)")
    acc.add_argument("--shiva", default=None, metavar="ARTIFACT",
                     help="a trained Shiva artifact (the stem written by `ditaccel train-shiva`)")
    acc.add_argument("--compile", action="store_true",
                     help="run through torch.compile: a plan's step patterns as whole compiled programs "
                          "(--shiva: the blocks, one graph per token count); without a plan the full model. "
                          "One warm-up batch compiles first (minutes on a CPU), not counted in the times; "
                          "--compare then times the full model compiled too")
    acc.add_argument("--plan", default=None, help="a plan JSON (from `ditaccel plan` or Plan.save)")
    acc.add_argument("--method", default=None, choices=["fora", "toca", "delta-dit"],
                     help="plan with a baseline method: fora (--interval), toca (--interval, "
                          "--ratio, --token-score), delta-dit (--interval, --cached-blocks, --boundary)")
    acc.add_argument("--interval", type=number(int, 1), default=None, help="full-compute every N steps")
    acc.add_argument("--ratio", type=number(float, 0, 1, hi_open=True, what="a fraction in [0, 1)"), default=None, help="toca: fraction of tokens recomputed")
    acc.add_argument("--token-score", default=None, choices=["delta", "feature_mean"])
    acc.add_argument("--cached-blocks", type=number(float, 0, 1, what="a fraction in [0, 1]"), default=None, help="delta-dit: fraction of blocks cached")
    acc.add_argument("--boundary", type=number(float, 0, 1, what="a fraction in [0, 1]"), default=None, help="delta-dit: early-stage fraction of steps")
    acc.add_argument("--forecast", type=int, default=None, choices=[0, 1],
                     help="steps that reuse a module get its last output (0, default) or the first-order "
                          "forecast from its last two full outputs (1)")
    acc.add_argument("--compare", action="store_true",
                     help="also run the full model on the same seeds: speedups, PSNR, SSIM")
    acc.add_argument("--show-steps", action="store_true", help="print what was computed per step")


def build_plan(args, pipe):
    """The plan asked for on the command line, or None for the full model."""
    from ..io import model_fingerprint
    from ..methods import make_plan, model_shape
    from ..pipeline import SAMPLERS
    from ..plan import Plan

    options = {k: getattr(args, k) for k in ("interval", "ratio", "token_score", "cached_blocks",
                                             "boundary", "forecast") if getattr(args, k) is not None}
    if sum(bool(a) for a in (args.plan, args.method, args.shiva)) > 1:
        raise ValueError("give one of --plan, --method or --shiva, not several")
    if args.compare and not (args.plan or args.method or args.shiva):
        raise ValueError("--compare needs --plan, --method or --shiva (there is nothing to compare)")
    if args.plan:
        plan = Plan.load(args.plan)
        made_for = plan.meta.get("sampler")
        if made_for is not None and made_for != args.sampler:
            raise ValueError(f"the plan was made for the {made_for} sampler; sample with --sampler "
                             f"{made_for} or plan from a {args.sampler} profile")
        # checked here, before anything runs (apply checks again when the plan is attached)
        steps = args.steps or SAMPLERS[args.sampler][2]
        if plan.num_steps != steps:
            raise ValueError(f"the plan is for {plan.num_steps} sampling steps, not {steps}; sample with "
                             f"--steps {plan.num_steps} or make the plan from a {steps}-step profile")
        fp = plan.meta.get("fingerprint")
        if fp is not None and fp != model_fingerprint(pipe.transformer):
            raise ValueError(f"the plan {args.plan} was made for another model (fingerprint differs); "
                             "profile and plan this model")
        return plan
    if args.method:
        steps = args.steps or SAMPLERS[args.sampler][2]
        return make_plan(args.method, model_shape(pipe.transformer, steps), **options)
    if options:
        raise ValueError(f"--{next(iter(options)).replace('_', '-')} needs --method")
    if args.shiva:
        from ..methods.shiva.inference import load_shiva

        return load_shiva(args.shiva, pipe.transformer)  # checked here, applied once the run is set
    return None


def run(args) -> int:
    import torch

    from ..metrics import psnr, ssim
    from ..runtime import apply, remove
    from ..runtime.summary import format_table

    from .. import io
    from ..pipeline import SAMPLERS
    from ..registry import load_pipeline, resolve_dtype
    from ..sampling import sample
    from ..viz import save_grid, save_images

    if args.n < 1:
        raise ValueError(f"--n must be >= 1, got {args.n}")
    if args.steps is not None and args.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {args.steps}")
    out = Path(args.out)
    if out.suffix.lower() != ".png":
        raise ValueError(f"--out must name a .png file, got {args.out}")
    args.dtype = resolve_dtype(args.dtype, args.device)  # what ran is recorded, not 'auto'
    pipe = load_pipeline(args.model, args.dtype, args.device)
    from ..pipeline import default_sampler, make_scheduler
    from ..sampling import is_text_pipeline, num_classes as classes_of

    args.sampler = args.sampler or default_sampler(pipe.scheduler)
    make_scheduler(args.sampler, pipe.scheduler.config)  # a sampler that does not fit fails here
    if args.prompt is not None:
        if not is_text_pipeline(pipe):
            raise ValueError(f"{args.model} is class-conditional: use --classes, not --prompt")
        if not all(p.strip() for p in args.prompt):
            raise ValueError("--prompt is empty; give the text to draw, e.g. --prompt 'a dark coat'")
        rows = list(args.prompt)
    else:
        rows = parse_classes(args.classes, classes_of(pipe))
    from ..sampling import check_run

    check_run(pipe, len(rows) * args.n, steps=args.steps or SAMPLERS[args.sampler][2], guidance_scale=args.cfg,
              seed=args.seed, scheduler=make_scheduler(args.sampler, pipe.scheduler.config))
    labels = [c for c in rows for _ in range(args.n)]
    pipe.set_progress_bar_config(disable=False, leave=False)
    plan = build_plan(args, pipe)
    shiva = None
    if args.shiva:
        shiva, plan = plan, None
    run = dict(sampler=args.sampler, steps=args.steps, guidance_scale=args.cfg, seed=args.seed,
               batch_size=args.batch_size)
    full = None
    steps = args.steps or SAMPLERS[args.sampler][2]
    if (plan is not None or shiva is not None) and args.compare:
        if args.compile:  # compiled against compiled
            _compile_full(pipe, steps, labels, run)
        full_images, full = sample(pipe, labels, **run)
        remove(pipe)
    if plan is not None:
        apply(pipe, plan, compile=args.compile)
    elif shiva is None and args.compile:
        _compile_full(pipe, steps, labels, run)
    if shiva is not None:
        from ..methods.shiva.inference import apply_shiva

        from ..pipeline import make_scheduler

        plan = apply_shiva(pipe, shiva, steps, scheduler=make_scheduler(args.sampler, pipe.scheduler.config),
                           compile=args.compile)
    if args.compile and (plan is not None):
        _warm_up(pipe, labels, run)
    images, stats = sample(pipe, labels, **run)
    save_grid(images, out, nrow=args.n)
    if args.save_dir:
        save_images(images, labels, Path(args.save_dir))
    info = {"model": args.model, "dtype": args.dtype, "threads": torch.get_num_threads(),
            **stats.to_dict(), **({"plan": plan.tag(), "forecast": plan.forecast} if plan is not None else {})}
    if plan is not None and args.show_steps:
        print(format_table(stats.per_step, plan.modules))
    if full is not None:
        info.update(flops_full=full.flops, wall_s_full=full.wall_s,
                    speedup_flops=full.flops / max(1, stats.flops),
                    speedup_measured=full.wall_s / stats.wall_s,
                    psnr=psnr(full_images, images), ssim=ssim(full_images, images))
        print(f"vs full model: {info['speedup_flops']:.2f}x fewer FLOPs, "
              f"{info['speedup_measured']:.2f}x faster, PSNR {info['psnr']:.2f} dB, SSIM {info['ssim']:.4f}")
    if args.json:
        io.write_json(args.json, info)
    print(f"{len(labels)} images, {stats.calls} transformer calls, {stats.flops / 1e9:.1f} GFLOP, "
          f"{stats.wall_s:.2f} s -> {out}")
    return 0


def _warm_up(pipe, labels: list, run: dict) -> None:
    """One batch (and the smaller last one, if any), untimed: the compiled programs of these batch
    sizes are made here."""
    import time

    from ..sampling import sample

    t0 = time.perf_counter()
    sizes = {min(len(labels), run["batch_size"]), len(labels) % run["batch_size"]} - {0}
    for n in sorted(sizes):
        sample(pipe, labels[:n], **{**run, "progress": False, "count_flops": False})
    print(f"compiled in {time.perf_counter() - t0:.0f} s (one warm-up batch, not counted below)")


def _compile_full(pipe, steps: int, labels: list, run: dict) -> None:
    """The unaccelerated model, compiled the same way (the full plan: one program)."""
    from ..methods import model_shape
    from ..plan import full_plan
    from ..runtime import apply

    shape = model_shape(pipe.transformer, steps)
    apply(pipe, full_plan(steps, shape.num_layers, shape.num_tokens, shape.modules), compile=True)
    _warm_up(pipe, labels, run)
