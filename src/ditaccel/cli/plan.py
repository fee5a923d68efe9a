"""``ditaccel plan``: a SODA plan from a profile, for a FLOP or wall-clock budget (optionally calibrated)."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path


from .common import SEED, number

HELP = "plan SODA (DP anchor schedule + sensitivity-aware pruning) from a profile"
# calibration samples by default: the profile's predicted error alone ranks SODA's candidates
# worse than measuring them (benchmarks/soda_defaults.py, benchmarks/soda_ranking.py), and 8
# samples often cannot tell them apart
DEFAULT_CALIBRATION = 16


def add_arguments(p) -> None:
    from ..methods.soda import CRITERIA, CalibrationConfig
    from ..methods.soda import Config as d
    p.add_argument("--profile", required=True, help="profile stem (from `ditaccel profile --out`)")
    budget = p.add_mutually_exclusive_group(required=True)
    budget.add_argument("--speedup", type=number(float, 1, lo_open=True), help="target FLOP speedup (> 1)")
    budget.add_argument("--latency-speedup", type=number(float, 1, lo_open=True),
                        help="target wall-clock speedup: with --calibrate, measured on the calibration "
                             "samples; without, predicted by the profile's latency model")
    budget.add_argument("--anchors", type=number(int, 1), help="number of full-compute steps")
    p.add_argument("--no-prune", action="store_true", help="caching only (OFS+DCS)")
    p.add_argument("--schedule", default="dp", choices=["dp", "uniform"])
    p.add_argument("--spread", type=number(float, 1), default=None,
                   help="dp: keep anchors at most SPREAD x the even gap apart (>= 1; --calibrate "
                        "measures free, 2, 1.5 and 1 unless given)")
    p.add_argument("--forecast", type=int, default=None, choices=[0, 1],
                   help="what steps that do not recompute a module get: 0 its last output, 1 the "
                        "first-order forecast from its last two full outputs (default: whichever the "
                        "profile measured lower, per segment and module; --calibrate also measures "
                        "both everywhere unless given)")
    p.add_argument("--gating", default=None, choices=["now", "cached"],
                   help="on steps where every block reuses: add the reused outputs with this step's gates "
                        "(now) or with the gates they were computed with (cached); default: now, and "
                        "--calibrate measures both")
    p.add_argument("--token-score", default=None, choices=["delta", "feature_mean"])
    p.add_argument("--lam", type=number(float, 0), default=d.lam,
                   help="slope of the pruned fraction in the step's relative cache error (>= 0; default %(default)s)")
    p.add_argument("--rho-max", type=number(float, 0, 1, lo_open=True, hi_open=True, what="a fraction in (0, 1)"),
                   default=d.rho_max, help="largest fraction of tokens pruned (default %(default)s)")
    p.add_argument("--model", default=None, help="check the profile belongs to this model (and "
                   "calibrate on it; default: the profile's model)")
    p.add_argument("--calibrate", type=number(int, 0), default=None, metavar="N",
                   help="measure SODA's candidate plans for the budget on N samples (seeds from "
                        "--calibrate-seed) and keep the one closest to the full model (with "
                        "--latency-speedup: the closest one that reaches the target speed); default: "
                        f"{DEFAULT_CALIBRATION} with a speedup budget and a profile made by `ditaccel profile`, "
                        "0 (the profile's prediction alone, seconds) otherwise")
    p.add_argument("--calibrate-seed", type=SEED, default=500_000)
    p.add_argument("--criterion", default=CalibrationConfig.criterion, choices=list(CRITERIA),
                   help="what 'closest to the full model' means when calibrating: log MSE plus log "
                        "(1 - SSIM) per sample (default), or the mean MSE alone")
    p.add_argument("--out", required=True, help="plan JSON")
    p.add_argument("--plot", default=None, help="also write the schedule plot (PNG)")


def run(args) -> int:
    from ..methods import soda
    from ..profiling import Profile as P
    from ..viz import plot_schedule

    if not args.out.endswith(".json"):
        raise ValueError(f"--out must name a .json file, got {args.out}")
    cfg = soda.Config(speedup=args.speedup, latency_speedup=args.latency_speedup, anchors=args.anchors,
                      prune=not args.no_prune, schedule=args.schedule, spread=args.spread, token_score=args.token_score,
                      lam=args.lam, rho_max=args.rho_max, forecast=args.forecast, gating=args.gating)
    if args.calibrate is not None and args.calibrate < 0:
        raise ValueError(f"--calibrate must be >= 0, got {args.calibrate}")
    if args.calibrate and args.anchors is not None:
        raise ValueError("--calibrate chooses how to spend a speedup budget: give --speedup or "
                         "--latency-speedup, not --anchors")
    prof = P.load(args.profile)
    if args.calibrate is None:  # by default where it can: a speedup budget, a profile of class labels
        can = args.anchors is None and prof.meta.get("class_labels") is not None and bool(prof.meta.get("sampler"))
        args.calibrate = DEFAULT_CALIBRATION if can else 0
        if can:
            print(f"calibrating on {args.calibrate} samples (seeds from {args.calibrate_seed}; --calibrate 0 "
                  "plans from the profile alone)")
    pipe = None
    if args.model or args.calibrate:
        from ..io import model_fingerprint
        from ..registry import load_pipeline

        model = args.model or prof.meta.get("model_name") or "fmnist-dit"
        # in the precision it was profiled in (profiles from before it was recorded: auto)
        pipe = load_pipeline(model, prof.meta.get("dtype") or "auto", args.device)
        prof.check_for(fingerprint=model_fingerprint(pipe.transformer))
    if args.calibrate:
        plan = _calibrated(pipe, prof, cfg, args.calibrate, args.calibrate_seed, args.criterion)
    else:
        plan = soda.plan(cfg, prof)
    plan.save(args.out)
    pred = plan.meta["predicted"]
    print(f"{plan.method}: {int(plan.anchors.sum())} anchors of {plan.num_steps} steps; predicted "
          f"{pred['speedup_flops']:.2f}x FLOPs, {pred['speedup_latency']:.2f}x latency, "
          f"summed error {pred['error']:.3g} -> {args.out}")
    if args.plot:
        print(f"plot: {plot_schedule(plan, Path(args.plot))}")
    return 0


def _calibrated(pipe, prof, cfg, n: int, seed: int, criterion: str):
    """SODA's candidates for ``cfg``'s budget measured on ``n`` class-conditional samples of the
    profile's sampler and guidance; prints the calibration table."""
    from ..methods import soda
    from ..sampling import sample

    if prof.meta.get("class_labels") is None or not prof.meta.get("sampler"):
        raise ValueError("this profile was made with a custom run function; calibrate it in Python "
                         "with ditaccel.calibrate_soda(pipe, run, profile, speedup=...)")
    from ..devices import check_memory
    from ..sampling import image_numel

    # the full model's images and a candidate's (float32), and the batch being made
    check_memory(n * image_numel(pipe) * 4 * 3.0, f"--calibrate {n}", "calibrate on fewer samples")
    classes = sorted(set(prof.meta["class_labels"]))
    labels = [classes[i % len(classes)] for i in range(n)]

    def run(p):
        return sample(p, labels, sampler=prof.meta["sampler"], steps=prof.num_steps,
                      guidance_scale=prof.meta["guidance_scale"], seed=seed, batch_size=n, progress=False)[0]

    # a wall-clock budget is measured on the calibration samples themselves
    best = soda.calibrate_soda(pipe, run, prof, soda.CalibrationConfig(timed=run if cfg.latency_speedup else None,
                                                                       criterion=criterion), **asdict(cfg))
    cal = best.meta["calibration"]
    print(f"{'candidate':>10} {'anchors':>8} {'schedule':>9} {'forecast':>9} {'gating':>7} {'pruned':>7} {'predicted err':>14} "
          f"{'PSNR vs full':>13} {'SSIM':>7} {'z vs kept':>10}" + (f" {'measured speedup':>17}" if "timed" in cal else ""))
    for i, r in enumerate(cal["rows"]):
        mark = " <- kept" if i == cal["chosen"] else ""
        sched = r.get("schedule", "dp")
        sched = sched if sched != "dp" else "free" if r["spread"] is None else f"{r['spread']:g}"
        sched += {"sensitivity": " w", "structure": " ws"}.get(r.get("weighting"), "")
        sched += " rp" if r.get("pricing") == "reuse" else ""  # (anchors priced by plain reuse)
        speed = (f" {r['speedup_measured']:>16.2f}x" if "speedup_measured" in r else f" {'-':>17}") if "timed" in cal else ""
        print(f"{i:>10} {r['anchors']:>8} {sched:>9} {r['forecast']:>9} {r.get('gating', 'now'):>7} {r['pruned_modules']:>7} "
              f"{r['predicted_error']:>14.4g} {r['psnr']:>11.2f}dB {r['ssim']:>7.4f} {r['z_vs_chosen']:>10.1f}{speed}{mark}")
    z = cal.get("margin_z")
    if z is not None and z < 0 and "timed" not in cal:
        print(f"kept the preferred plan (more even schedule, forecast, caching only) over one that measured "
              f"{-z:.1f} standard errors closer on these {cal['samples']} samples: within the noise; calibrate on "
              "more (--calibrate N) to tell them apart")
    elif z is not None and z < 2 and "timed" not in cal:
        print(f"the runner-up is {z:.1f} standard errors (paired over the {cal['samples']} samples) from the kept "
              "plan: these samples barely tell them apart; calibrate on more (--calibrate N) to be surer")
    return best
