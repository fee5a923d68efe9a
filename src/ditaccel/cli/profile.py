"""``ditaccel profile``: SODA's offline sensitivity profile of a model for one sampler and step count."""

from __future__ import annotations

from pathlib import Path


from .common import SEED, floats_list as _floats, number

HELP = "measure how sensitive each (step, layer, module) is to caching and token pruning"


def add_arguments(p) -> None:
    from ..pipeline import SAMPLERS
    from ..profiling import DEFAULT_RATIOS, ERRORS
    from ..registry import DTYPES

    p.add_argument("--model", default="fmnist-dit", help="bundled model name or a diffusers folder")
    p.add_argument("--sampler", default=None, choices=list(SAMPLERS),
                   help="default: the model's kind (ddim; euler for flow-matching models)")
    p.add_argument("--steps", type=number(int, 1), default=None, help="default: the sampler's")
    p.add_argument("--cfg", type=number(float, 1), default=3.0, help="guidance scale, >= 1 (1 = off; default %(default)s)")
    p.add_argument("--samples", type=number(int, 1), default=32, help="trajectories (classes cycled; default %(default)s)")
    p.add_argument("--seed", type=SEED, default=1000, help="first seed (default %(default)s, apart from evaluation seeds)")
    p.add_argument("--batch-size", type=number(int, 1), default=32)
    p.add_argument("--dtype", default="auto", choices=list(DTYPES),
                   help="transformer dtype; auto: bf16 where it is native (CUDA, AMX, AVX512-BF16), else fp32")
    p.add_argument("--intervals", default=None,
                   help="cache ages to measure, e.g. 1,2,3,4,5 (default: 1..5 up to 125 steps, "
                        "1..steps/25 beyond: the longest age bounds the fastest plan)")
    p.add_argument("--ratios", default=",".join(map(str, DEFAULT_RATIOS)),
                   help="recompute fractions to measure (default %(default)s)")
    p.add_argument("--token-scores", default="delta,feature_mean")
    p.add_argument("--error", default=ERRORS[0], choices=ERRORS,
                   help="error measure of the tables: 1 - cosine (the paper's) or the squared distance relative "
                        "to the fresh output (default %(default)s)")
    p.add_argument("--sensitivity-steps", type=number(int, 0), default=12,
                   help="steps at which the images' sensitivity to reusing the model's output is measured "
                        "(one sampling run of 4 samples each, the last three steps always; 0: none; "
                        "default %(default)s): what SODA's weighted schedule reads")
    p.add_argument("--timing-rows", type=number(int, 1), default=16,
                   help="batch rows the module costs are timed at: the rows you will sample, guidance "
                        "doubling them (default %(default)s: 8 images with guidance; at most the profile's batch)")
    p.add_argument("--out", required=True, help="artifact stem: writes OUT.safetensors and OUT.json")
    p.add_argument("--plot", default=None, help="also write heatmaps (PNG) into this folder")
    p.add_argument("--restart", action="store_true",
                   help="delete the checkpoint of an interrupted profile (OUT.partial.*) and start over "
                        "(default: resume from it)")


def run(args) -> int:
    from ..profiling import ProfileConfig, profile
    from ..registry import load_pipeline, resolve_dtype
    from ..viz import plot_profile

    if args.samples < 1:
        raise ValueError(f"--samples must be >= 1, got {args.samples}")
    intervals = None if args.intervals is None else _floats(args.intervals, "--intervals")
    if intervals is not None and any(x != int(x) for x in intervals):
        raise ValueError(f"--intervals must be whole steps (e.g. 1,2,3,4,5), got {args.intervals}")
    intervals = None if intervals is None else tuple(int(x) for x in intervals)
    if intervals is not None and args.steps is not None and max(intervals, default=0) > args.steps:
        raise ValueError(f"--intervals are cache ages in steps: at most --steps {args.steps}, got {args.intervals}")
    ratios = _floats(args.ratios, "--ratios")
    scores = tuple(s.strip() for s in args.token_scores.split(",") if s.strip())
    args.dtype = resolve_dtype(args.dtype, args.device)  # what ran is recorded, not 'auto'
    pipe = load_pipeline(args.model, args.dtype, args.device)
    from ..sampling import num_classes as classes_of

    num_classes = classes_of(pipe)
    from ..devices import check_memory

    # the sample list and its copy in the profile's metadata
    check_memory(args.samples * 64.0, f"--samples {args.samples}", "profile fewer samples")
    labels = [i % num_classes for i in range(args.samples)]
    from .. import distributed as dist
    from .. import io

    partial = Path(f"{args.out}.partial")  # resumable: the error sums after every batch
    if args.restart and dist.is_main():
        io.remove_artifact(partial)
    if io.artifact_exists(partial) and dist.is_main():
        print(f"resuming the interrupted profile from {partial}.safetensors (--restart starts over)")
    prof = profile(pipe, config=ProfileConfig(
        class_labels=labels, sampler=args.sampler, steps=args.steps, guidance_scale=args.cfg, seed=args.seed,
        batch_size=args.batch_size, intervals=intervals, ratios=ratios, token_scores=scores, checkpoint=partial,
        timing_rows=args.timing_rows, error=args.error, sensitivity_steps=args.sensitivity_steps))
    if not dist.is_main():  # the main process writes; the others only profiled their share
        return 0
    prof.meta["model_name"] = args.model
    prof.save(args.out)
    io.remove_artifact(partial)
    var = prof.variation()
    print(f"profiled {args.samples} samples x {prof.num_steps} steps in {prof.meta['profile_s']:.0f} s "
          f"(+{prof.meta['cost_s']:.0f} s measuring module costs"
          + (f", +{prof.meta['sensitivity_s']:.0f} s the images' sensitivity" if prof.meta.get("sensitivity_s") else "")
          + f") -> {args.out}.json/.safetensors")
    print(f"cache error across samples: coefficient of variation median {var['cv_median']:.2f}, "
          f"90th percentile {var['cv_p90']:.2f}")
    if args.plot:
        for f in plot_profile(prof, Path(args.plot)):
            print(f"plot: {f}")
    return 0
