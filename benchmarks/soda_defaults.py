"""Do SODA's defaults win?  The path a user types first: ``ditaccel profile`` (32 trajectories),
``ditaccel plan --profile P --speedup S`` with no other option (calibrated by default), then
sampling with that plan, against FORA at the same FLOP budget (interval S), for S = 2, 3 and 4;
also the plan from the profile alone (``--calibrate 0``).  Both are scored against
the full model on ``--n`` images of seeds that neither the profile (seeds 100000..) nor a
calibration (500000..) ever saw: PSNR and Fréchet distance (EfficientNet-lite0 features) vs the
full model's images, FD vs the Fashion-MNIST test set, FLOP speedups as counted on the scored run.

Writes results/soda_defaults.{json,md} and the ``soda-defaults`` block of docs/soda.md; each
finished row goes to results/soda_defaults.partial.jsonl first, so a stopped run resumes with the
same command (the profile resumes from its last batch, the full model's images are kept in
results/soda_defaults.full-<sampler>); the rows of a finished run with the same settings are kept (``--redo``
measures the asked samplers again).

    python benchmarks/soda_defaults.py                       # DDIM-50 and DDPM-250 (hours on 2 cores)
    python benchmarks/soda_defaults.py --samplers ddim       # DDIM-50 only
    python benchmarks/soda_defaults.py --methods fora        # some methods now, the rest later
    python benchmarks/soda_defaults.py --samplers ddim --redo  # DDIM-50 again after a planner change
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from common import RESULTS, load_reference, machine, publish, real_test_features, resume_partial, save_reference
from soda import get_profile, profile_stem
from ditaccel.cli.main import main as cli
from ditaccel.cli.plan import DEFAULT_CALIBRATION
from ditaccel.methods import make_plan, model_shape
from ditaccel.metrics import feature_extractor, frechet_distance, psnr
from ditaccel.pipeline import SAMPLERS
from ditaccel.plan import Plan
from ditaccel.registry import load_pipeline, resolve_dtype
from ditaccel.runtime import RUNTIME_REVISION, apply, remove
from ditaccel.sampling import sample

STEM = "soda_defaults"


METHODS = ("soda", "soda-uncalibrated", "fora")


def default_plan(prof_stem: Path, speedup: float, *extra: str) -> Plan:
    """What ``ditaccel plan --profile P --speedup S [extra]`` writes, run as the user runs it."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "plan.json"
        rc = cli(["plan", "--profile", str(prof_stem), "--speedup", f"{speedup:g}", *extra, "--out", str(out)])
        if rc:
            raise SystemExit(f"ditaccel plan failed (exit code {rc})")
        return Plan.load(out)


def full_images(pipe, labels, sampler: str, settings: dict, opts: dict) -> tuple[torch.Tensor, int]:
    """The full model's scored images and FLOPs for ``sampler``, kept in results/soda_defaults.full-<sampler>
    (a resumed or extended run scores against the same images without sampling them again: half
    an hour at DDPM-250 on a 2-core CPU)."""
    stem, kind = RESULTS / f"{STEM}.full-{sampler}", "soda-defaults-reference"
    key = {**settings, "sampler": sampler, "steps": opts["steps"]}
    kept = load_reference(stem, kind, key)
    if kept is not None:
        print(f"{sampler}: the full model's images from {stem.name}", flush=True)
        return kept
    print(f"{sampler}-{opts['steps']}: full model, {len(labels)} images", flush=True)
    images, stats = sample(pipe, labels, **opts)
    save_reference(stem, kind, key, images, stats.flops)
    return images, int(stats.flops)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--samplers", default="ddim,ddpm", help="comma-separated: ddim (50 steps), ddpm (250)")
    ap.add_argument("--speedups", default="2,3,4", help="FLOP budgets; FORA runs interval S")
    ap.add_argument("--methods", default=",".join(METHODS),
                    help="comma-separated subset of " + ", ".join(METHODS) + " (the others' rows are kept)")
    ap.add_argument("--n", type=int, default=64, help="scored images (classes cycled)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seed", type=int, default=20_000, help="first evaluation seed")
    ap.add_argument("--cfg", type=float, default=3.0)
    ap.add_argument("--dtype", default="auto", help="auto: bf16 where native, else fp32")
    ap.add_argument("--profile-samples", type=int, default=32)
    ap.add_argument("--redo", action="store_true",
                    help="measure the asked samplers again (after a change to the planner) instead of keeping "
                         "a finished run's rows")
    args = ap.parse_args()
    samplers = args.samplers.split(",")
    if any(s not in ("ddim", "ddpm") for s in samplers):
        ap.error(f"--samplers takes ddim and/or ddpm, got {args.samplers!r}")
    methods = args.methods.split(",")
    if any(m not in METHODS for m in methods):
        ap.error(f"--methods takes {', '.join(METHODS)}, got {args.methods!r}")
    speedups = [int(s) for s in args.speedups.split(",")]
    if any(s < 2 for s in speedups):
        ap.error("--speedups are FORA intervals: integers >= 2")
    args.dtype = resolve_dtype(args.dtype)
    pipe = load_pipeline("fmnist-dit", args.dtype)
    pipe.set_progress_bar_config(disable=True)
    fx = feature_extractor()
    real = real_test_features(fx)
    labels = [i % 10 for i in range(args.n)]
    settings = {k: getattr(args, k) for k in ("n", "batch", "seed", "cfg", "dtype", "profile_samples")}
    settings["plan_calibration"] = DEFAULT_CALIBRATION  # what `ditaccel plan` does by default
    settings["runtime_revision"] = RUNTIME_REVISION
    partial = RESULTS / f"{STEM}.partial.jsonl"
    # rows of a finished run with these settings are kept: a later run adds samplers or budgets
    _, rows = resume_partial(partial, settings, RESULTS / f"{STEM}.json",
                             keep=lambda r: not args.redo or r["sampler"] not in samplers)
    done = {(r["sampler"], r["method"], r["budget"]) for r in rows}
    t0 = time.time()
    for sampler in samplers:
        steps = SAMPLERS[sampler][2]
        opts = dict(sampler=sampler, steps=steps, guidance_scale=args.cfg, seed=args.seed,
                    batch_size=args.batch, progress=False)
        todo = [(m, s) for s in speedups for m in METHODS if m in methods and (sampler, m, s) not in done]
        if not todo:
            continue
        get_profile(pipe, sampler, steps, args.cfg, args.profile_samples, False)
        stem = profile_stem(sampler, steps, args.cfg, args.profile_samples)
        full, full_flops = full_images(pipe, labels, sampler, settings, opts)
        ffeats = fx(full)
        for method, s in todo:
            plan = (default_plan(stem, s) if method == "soda"
                    else default_plan(stem, s, "--calibrate", "0") if method == "soda-uncalibrated"
                    else make_plan("fora", model_shape(pipe.transformer, steps), interval=s))
            apply(pipe, plan)
            try:
                images, stats = sample(pipe, labels, **opts)
            finally:
                remove(pipe)
            feats = fx(images)
            row = {"sampler": sampler, "steps": steps, "method": method, "budget": s,
                   "speedup_flops": full_flops / stats.flops, "psnr": psnr(full, images),
                   "fd_vs_full": frechet_distance(feats, ffeats), "fd_vs_test": frechet_distance(feats, real),
                   "anchors": int(plan.anchors.sum()),
                   "fill": None if plan.fill is None else float(plan.fill_grid().float().mean()),
                   "pruned": plan.pruned_modules()}
            print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
            rows.append(row)
            with partial.open("a") as f:
                f.write(json.dumps(row) + "\n")
    out = {**settings, "cpu": machine(), "threads": torch.get_num_threads(), "total_s": time.time() - t0,
           "rows": rows}
    publish(STEM, "soda-defaults", out, report)
    partial.unlink(missing_ok=True)


def report(out: dict) -> str:
    by = {(r["sampler"], r["method"], r["budget"]): r for r in out["rows"]}
    lines = ["| sampler | budget | method | FLOP speedup | PSNR vs full | FD vs full | FD vs real | anchors | "
             "beats FORA (PSNR and FD) |", "|---|---|---|---|---|---|---|---|---|"]
    names = {"soda": "SODA, defaults", "soda-uncalibrated": "SODA, `--calibrate 0`", "fora": "FORA"}
    wins = total = 0
    for sampler, s in sorted({(k[0], k[2]) for k in by}):
        f = by.get((sampler, "fora", s))
        for m in METHODS:
            r = by.get((sampler, m, s))
            if r is None:
                continue
            win = "-"
            if m != "fora" and f is not None:
                won = r["psnr"] > f["psnr"] and r["fd_vs_full"] < f["fd_vs_full"]
                win = "yes" if won else "no"
                if m == "soda":
                    wins, total = wins + won, total + 1
            lines.append(f"| {sampler.upper()}-{r['steps']} | {s}x | {names[m]} | {r['speedup_flops']:.2f}x | "
                         f"{r['psnr']:.2f} | {r['fd_vs_full']:.2f} | {r['fd_vs_test']:.2f} | {r['anchors']} | {win} |")
    verdict = (f"beat FORA interval S in both PSNR and FD vs the full model in {wins} of {total} settings" if total
               else "are not measured yet (the run stopped before them; the same command resumes it)")
    lines += ["", f"SODA's defaults (`ditaccel plan --profile P --speedup S`, nothing else: calibrated on "
              f"{out['plan_calibration']} samples) {verdict}. fmnist-dit, CFG {out['cfg']:g}, {out['dtype']}, {out['n']} images (seeds "
              f"{out['seed']}..{out['seed'] + out['n'] - 1}, classes cycled); profiles of {out['profile_samples']} "
              f"trajectories of seeds 100000.., calibration seeds 500000... "
              f"Generated by `python benchmarks/soda_defaults.py` on {out['cpu']}."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
