"""``ditaccel bench``: every acceleration method, ours and the peers, swept over its knob on your
model, with measured speedup (interleaved with the full model, median of repeats), FLOP speedup and
fidelity to the full model; a table, a JSON file and Pareto plots."""

from __future__ import annotations

from pathlib import Path

from .common import parse_classes

HELP = "benchmark SODA, FORA, ToCa, Δ-DiT and peer caches (diffusers, cache-dit) on a model"


def add_arguments(p) -> None:
    from ..bench import METHOD_NAMES
    from ..pipeline import SAMPLERS
    from ..registry import DTYPES

    p.add_argument("--model", default="fmnist-dit", help="bundled model name or a diffusers pipeline folder "
                   "(class-conditional: DiTPipeline or ours)")
    p.add_argument("--sampler", default=None, choices=list(SAMPLERS),
                   help="default: the model's kind (ddim; euler for flow-matching models)")
    p.add_argument("--steps", type=int, default=None, help="default: the sampler's")
    p.add_argument("--cfg", type=float, default=3.0, help="guidance scale (default %(default)s)")
    p.add_argument("--classes", default=None, help="class labels to cycle (default: the first ten)")
    p.add_argument("--n", type=int, default=32, help="scored images (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="first seed of the scored images")
    p.add_argument("--batch-size", type=int, default=16, help="images per batch of the scored run")
    p.add_argument("--timed-batch", type=int, default=8, help="images in the timed batch")
    p.add_argument("--repeats", type=int, default=3, help="timing pairs, full model vs method (0: no timing)")
    p.add_argument("--methods", default=None, help=f"comma-separated, from {','.join(METHOD_NAMES)} (default: all)")
    p.add_argument("--sweep", action="append", metavar="METHOD=V1,V2",
                   help="values of a method's knob instead of its default sweep (repeatable)")
    p.add_argument("--quick", action="store_true", help="one knob value per method")
    p.add_argument("--profile", default=None, help="SODA profile stem (default: made once and cached)")
    p.add_argument("--profile-samples", type=int, default=32)
    p.add_argument("--calibrate", type=int, default=8, metavar="N",
                   help="samples (other seeds) SODA's and MagCache's calibration runs on")
    p.add_argument("--dtype", default="auto", choices=list(DTYPES),
                       help="transformer dtype; auto: bf16 where it is native (CUDA, AMX, AVX512-BF16), else fp32")
    p.add_argument("--out", default="ditaccel-bench", help="folder for bench.json, bench.md, bench.png")
    p.add_argument("--cache-dir", default=None, help="where a profile is kept (default $XDG_CACHE_HOME/ditaccel)")


def run(args) -> int:
    from .. import bench, io
    from ..pipeline import SAMPLERS
    from ..registry import load_pipeline, resolve_dtype
    from ..sampling import sample
    from .common import cache_dir, cached_profile

    if args.n < 2:
        raise ValueError(f"--n must be >= 2 (Fréchet distance needs two images), got {args.n}")
    if args.batch_size < 1 or args.timed_batch < 1 or args.repeats < 0 or args.calibrate < 1:
        raise ValueError("--batch-size, --timed-batch and --calibrate must be >= 1, --repeats >= 0")
    if args.profile_samples < 1:
        raise ValueError(f"--profile-samples must be >= 1, got {args.profile_samples}")
    methods = bench.check_methods([m.strip() for m in args.methods.split(",") if m.strip()]
                                  if args.methods else list(bench.METHOD_NAMES))
    sweeps = bench.parse_sweeps(args.sweep)
    stray = sorted(set(sweeps) - set(methods))
    if stray:
        raise ValueError(f"--sweep names {', '.join(stray)}, which --methods leaves out")
    if args.steps is not None and args.steps < 2:
        raise ValueError(f"--steps must be >= 2, got {args.steps}")
    args.dtype = resolve_dtype(args.dtype, args.device)  # what ran is recorded, not 'auto'
    pipe = load_pipeline(args.model, args.dtype, args.device)
    from ..pipeline import default_sampler, make_scheduler
    from ..sampling import num_classes as classes_of

    args.sampler = args.sampler or default_sampler(pipe.scheduler)
    make_scheduler(args.sampler, pipe.scheduler.config)  # a sampler that does not fit fails here
    steps = args.steps or SAMPLERS[args.sampler][2]
    if steps < 2:
        raise ValueError(f"--steps must be >= 2, got {steps}")
    try:
        num_classes = classes_of(pipe)
    except ValueError:
        raise ValueError(f"{args.model} is neither class- nor text-conditioned; benchmark it in Python "
                         "with ditaccel.bench.measure(pipe, run, timed, entries)") from None
    classes = parse_classes(args.classes, num_classes, default=list(range(min(10, num_classes))))
    opts = dict(sampler=args.sampler, steps=steps, guidance_scale=args.cfg, progress=False, count_flops=False)
    labels = [classes[i % len(classes)] for i in range(args.n)]
    cal_labels = [classes[i % len(classes)] for i in range(args.calibrate)]
    timed_labels = labels[:args.timed_batch]

    def scored(p):
        return sample(p, labels, seed=args.seed, batch_size=args.batch_size, **opts)[0]

    def calibration(p):
        return sample(p, cal_labels, seed=500_000, batch_size=args.calibrate, **opts)[0]

    def timed(p):
        return sample(p, timed_labels, seed=args.seed, batch_size=args.timed_batch, **opts)

    prof = None
    if any(m.startswith("soda") for m in methods):
        if args.profile:
            from ..io import model_fingerprint
            from ..profiling import Profile

            prof = Profile.load(args.profile)
            prof.check_for(fingerprint=model_fingerprint(pipe.transformer), sampler=args.sampler, num_steps=steps)
        else:
            prof = cached_profile(pipe, sampler=args.sampler, steps=steps, cfg=args.cfg, samples=args.profile_samples,
                                  folder=cache_dir(args.cache_dir), classes=classes)
    entries = bench.method_entries(pipe, steps, methods=methods, quick=args.quick, sweeps=sweeps, profile=prof,
                                   calibration_run=calibration, timed_run=timed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)  # fail on an unwritable folder before the long part
    from .. import distributed as dist

    if dist.is_main():
        print(f"{len(entries)} configurations, {args.n} scored images each, {args.repeats} timing pairs on "
              f"{args.timed_batch} images" + (f", split over {dist.size()} processes" if dist.size() > 1 else ""))
    res = bench.measure(pipe, scored, timed, entries, bench.MeasureConfig(repeats=args.repeats))
    if not dist.is_main():  # the main process gathered every row and writes them
        return 0
    result = {"model": args.model, "sampler": args.sampler, "steps": steps, "cfg": args.cfg, "n": args.n,
              "seed": args.seed, "batch": args.batch_size, "timed_batch": args.timed_batch, "repeats": args.repeats,
              "description": f"{args.model}, {args.sampler}-{steps}, CFG {args.cfg:g}, {args.dtype}, {args.n} images; "
                             f"measured speedup: median of {args.repeats} pairs (full model, method) on "
                             f"{args.timed_batch} images.", **res}
    io.write_json(out / "bench.json", result)
    table = bench.report(result)
    io.write_text(out / "bench.md", table + "\n")
    if args.repeats:
        bench.plot(result, out / "bench.png", f"{args.model}: {args.sampler}-{steps}, {args.n} images")
    print(table)
    print(f"-> {out / 'bench.json'}, {out / 'bench.md'}" + (f", {out / 'bench.png'}" if args.repeats else ""))
    return 0


