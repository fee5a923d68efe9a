"""``ditaccel demo``: SODA end to end on the bundled model, in a few minutes on a laptop CPU."""

from __future__ import annotations

from pathlib import Path

HELP = "profile the bundled model, plan SODA for 2x and 3x, compare with the full model"


def add_arguments(p) -> None:
    from ..pipeline import SAMPLERS

    p.add_argument("--sampler", default="ddim", choices=list(SAMPLERS))
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--cfg", type=float, default=3.0)
    p.add_argument("--speedups", default="2,3", help="target FLOP speedups (default %(default)s)")
    p.add_argument("--n", type=int, default=50, help="images per run (classes cycled; default %(default)s)")
    p.add_argument("--profile-samples", type=int, default=32)
    p.add_argument("--calibrate", type=int, default=8, metavar="N",
                   help="choose among SODA's candidate plans by measuring them on N samples of other "
                        "seeds (0: trust the planner's prediction; default %(default)s)")
    p.add_argument("--out", default="ditaccel-demo", help="folder for the grid, plots, plans, table")
    p.add_argument("--cache-dir", default=None,
                   help="where the profile is kept and reused (default $XDG_CACHE_HOME/ditaccel)")
    p.add_argument("--reprofile", action="store_true", help="profile again even if a cached one fits")


def run(args) -> int:
    import torch

    from .. import io
    from ..methods import soda
    from ..metrics import feature_extractor, frechet_distance, psnr, ssim
    from ..pipeline import SAMPLERS
    from ..registry import load_pipeline
    from ..runtime import apply, remove
    from ..sampling import sample
    from ..viz import plot_profile, plot_schedule, save_grid
    from .common import cache_dir, cached_profile, floats_list

    speedups = floats_list(args.speedups, "--speedups")
    if not speedups or any(s <= 1 for s in speedups):
        raise ValueError(f"--speedups must be numbers > 1, got {args.speedups}")
    if args.n < 1 or args.profile_samples < 1 or args.calibrate < 0:
        raise ValueError("--n and --profile-samples must be >= 1, --calibrate >= 0")
    steps = args.steps or SAMPLERS[args.sampler][2]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pipe = load_pipeline("fmnist-dit", "bf16", args.device)
    prof = cached_profile(pipe, sampler=args.sampler, steps=steps, cfg=args.cfg, samples=args.profile_samples,
                          folder=cache_dir(args.cache_dir), reprofile=args.reprofile)
    plot_profile(prof, out / "profile")

    labels = [i % 10 for i in range(args.n)]
    run = dict(sampler=args.sampler, steps=steps, guidance_scale=args.cfg, seed=0, batch_size=64)
    print(f"full model, {args.n} images ...")
    full, fstats = sample(pipe, labels, **run)
    fx = feature_extractor()
    ffeats = fx(full)
    rows, grids = [], [full[:10]]
    for s in speedups:
        if args.calibrate:
            cal_labels = [i % 10 for i in range(args.calibrate)]
            print(f"SODA {s:g}x: measuring its candidate plans on {args.calibrate} calibration samples ...")
            plan = soda.calibrate_soda(
                pipe, lambda p: sample(p, cal_labels, **{**run, "seed": 500_000, "progress": False})[0],
                prof, speedup=s)
        else:
            plan = soda.plan(soda.Config(speedup=s), prof)
        plan.save(out / f"soda-x{s:g}.json")
        plot_schedule(plan, out / f"soda-x{s:g}-schedule.png")
        apply(pipe, plan)
        print(f"SODA {s:g}x, {args.n} images ...")
        images, stats = sample(pipe, labels, **run)
        remove(pipe)
        grids.append(images[:10])
        rows.append({"plan": f"SODA {s:g}x", "anchors": int(plan.anchors.sum()), "pruned_modules": plan.pruned_modules(),
                     "speedup_measured": fstats.wall_s / stats.wall_s, "speedup_flops": fstats.flops / stats.flops,
                     "psnr": psnr(full, images), "ssim": ssim(full, images),
                     "fd_vs_full": frechet_distance(fx(images), ffeats)})
    save_grid(torch.cat(grids), out / "full_vs_soda.png", nrow=10)
    head = f"{'plan':>10} {'anchors':>8} {'pruned':>7} {'measured':>9} {'FLOPs':>7} {'PSNR':>8} {'SSIM':>7} {'FD vs full':>11}"
    lines = [head] + [f"{r['plan']:>10} {r['anchors']:>8} {r['pruned_modules']:>7} {r['speedup_measured']:>8.2f}x {r['speedup_flops']:>6.2f}x "
                      f"{r['psnr']:>6.2f}dB {r['ssim']:>7.4f} {r['fd_vs_full']:>11.2f}" for r in rows]
    table = "\n".join(lines)
    (out / "table.txt").write_text(table + "\n")
    io.write_json(out / "results.json", {"sampler": args.sampler, "steps": steps, "cfg": args.cfg,
                                         "n": args.n, "full_wall_s": fstats.wall_s, "rows": rows})
    print(table)
    print("measured: wall-clock speedup of one run each (a busy machine moves it; FLOPs do not move)")
    print(f"full model vs SODA (rows: full, then each speedup) -> {out / 'full_vs_soda.png'}; plots and plans in {out}/")
    return 0
