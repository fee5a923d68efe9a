"""Can SODA choose among its candidate plans without measuring them, and on how many samples must
it measure them?  For each FLOP budget, every plan calibration would measure (the caching-only
schedules of its first round: DP held to a spread or free, sensitivity-weighted, evenly spaced,
each with forecast, the per-segment filler or reuse; then fewer anchors with token pruning) is run
on ``--n`` samples of seeds no profile or calibration saw.  Reported per budget:

- the rank correlation (Spearman) between each of the profile's predictions (the summed module
  error; the images' error, weighted by the profiled step sensitivity) and the measured error vs
  the full model (mean over samples of log MSE, i.e. of PSNR) on all ``--n`` samples;
- the pick of each rule, scored on the samples it did not see (the last ``--n`` - 16): the lowest
  of either prediction, and calibration (the one-standard-error rule in the candidates' order,
  on per-sample MSE as calibrate_soda does, or on per-sample PSNR) on the first 8 or 16 samples:
  how many dB of mean PSNR it lies below the best candidate there.

Writes results/soda_ranking.{json,md} and the ``soda-ranking`` block of docs/soda.md; each budget
goes to results/soda_ranking.partial.jsonl when done, so a stopped run resumes; budgets a finished
run measured with the same settings are kept (``--speedups 3,4`` after ``--speedups 2`` adds them).

    python benchmarks/soda_ranking.py                 # DDIM-50, budgets 2, 3, 4 (about 30 min on 2 cores, bf16)
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch

from common import RESULTS, machine, publish, resume_partial
from soda import get_profile
from ditaccel.methods import soda
from ditaccel.methods.soda.calibration import prefer
from ditaccel.pipeline import SAMPLERS
from ditaccel.registry import load_pipeline, resolve_dtype
from ditaccel.runtime import RUNTIME_REVISION, apply, remove
from ditaccel.sampling import sample

STEM = "soda_ranking"
CALIBRATIONS = (8, 16)  # calibration sizes compared; the held-out samples are those after the largest


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman's rank correlation (average ranks for ties)."""
    def ranks(x):
        t = torch.tensor(x, dtype=torch.float64)
        order = t.argsort()
        r = torch.empty_like(t)
        r[order] = torch.arange(len(x), dtype=torch.float64)
        for v in t.unique():  # ties share their mean rank
            m = t == v
            r[m] = r[m].mean()
        return r
    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = float((ra.pow(2).sum() * rb.pow(2).sum()).sqrt())
    return float((ra * rb).sum()) / den if den > 0 else math.nan


def plans_for(prof, speedup: float) -> list:
    """The plans a default calibration measures for this budget (its first round: every schedule
    and filler), and the pruning candidates of its second round on the default schedule and filler
    (the DP's free schedule, filler chosen per segment), duplicates dropped."""
    cfg = soda.Config(speedup=speedup)
    out = soda.schedules(cfg, prof)
    for q in soda.candidates(cfg, prof)[1:]:
        if not any(torch.equal(q.anchors, r.anchors) and torch.equal(q.tokens, r.tokens)
                   and torch.equal(q.fill_grid(), r.fill_grid()) for r in out):
            out.append(q)
    return out


def psnr(per: torch.Tensor) -> torch.Tensor:
    """Per-sample PSNR (dB) from per-sample MSE (images in [0, 1])."""
    return -10 * per.clamp_min(1e-30).log10()


def below_best(rest: list[torch.Tensor], pick: int) -> float:
    """How many dB of mean PSNR the pick lies below the best candidate on the held-out samples."""
    means = [float(psnr(p).mean()) for p in rest]
    return max(means) - means[pick]


def calibrated(cal: list[torch.Tensor], on: str) -> int:
    """The pick of the one-standard-error rule (:func:`prefer`, within 1) in the candidates' order,
    on per-sample MSE (as calibrate_soda measures) or on per-sample negative PSNR."""
    vals = cal if on == "mse" else [-psnr(p) for p in cal]
    return prefer([{"mse": float(v.mean()), "mse_samples": v.tolist()} for v in vals], 1.0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sampler", default="ddim", choices=["ddim", "ddpm"])
    ap.add_argument("--speedups", default="2,3,4")
    ap.add_argument("--n", type=int, default=48,
                    help=f"samples per plan (the first {max(CALIBRATIONS)} calibrate, the rest are held out)")
    ap.add_argument("--seed", type=int, default=30_000)
    ap.add_argument("--cfg", type=float, default=3.0)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--replot", action="store_true", help="rewrite the table from the saved JSON")
    args = ap.parse_args()
    if args.replot:
        publish(STEM, "soda-ranking", json.loads((RESULTS / f"{STEM}.json").read_text()), report)
        return
    if args.n < max(CALIBRATIONS) + 8:
        ap.error(f"--n must leave at least 8 samples beyond the {max(CALIBRATIONS)} that calibrate")
    dtype = resolve_dtype(args.dtype)
    pipe = load_pipeline("fmnist-dit", dtype)
    pipe.set_progress_bar_config(disable=True)
    steps = SAMPLERS[args.sampler][2]
    prof = get_profile(pipe, args.sampler, steps, args.cfg, 32, False)
    labels = [i % 10 for i in range(args.n)]
    opts = dict(sampler=args.sampler, steps=steps, guidance_scale=args.cfg, seed=args.seed, batch_size=args.n,
                progress=False, count_flops=False)
    settings = {"sampler": args.sampler, "n": args.n, "seed": args.seed, "cfg": args.cfg, "dtype": dtype,
                "runtime_revision": RUNTIME_REVISION}
    partial = RESULTS / f"{STEM}.partial.jsonl"
    asked = [float(x) for x in args.speedups.split(",")]
    # budgets measured by an earlier run with these settings are kept
    _, rows = resume_partial(partial, settings, RESULTS / f"{STEM}.json", keep=lambda r: r["budget"] not in asked)
    args.speedups = ",".join(sorted({*args.speedups.split(","), *(f"{r['budget']:g}" for r in rows)}, key=float))
    t0 = time.time()
    full = None
    for s in [float(x) for x in args.speedups.split(",")]:
        if any(r["budget"] == s for r in rows):
            continue
        if full is None:
            full = sample(pipe, labels, **opts)[0].double()
        plans = plans_for(prof, s)
        per, predicted, image = [], [], []
        for i, p in enumerate(plans):
            apply(pipe, p)
            try:
                images = sample(pipe, labels, **opts)[0].double()
            finally:
                remove(pipe)
            per.append((images - full).pow(2).flatten(1).mean(1))
            predicted.append(p.meta["predicted"]["error"])
            image.append(p.meta["predicted"].get("image_error", math.nan))
            print(f"budget {s:g}: candidate {i + 1}/{len(plans)}: predicted {predicted[-1]:.4g} / {image[-1]:.4g}, "
                  f"PSNR {float(psnr(per[-1]).mean()):.2f}", flush=True)
        held = max(CALIBRATIONS)
        rest = [x[held:] for x in per]
        log_mse = [float(x.clamp_min(1e-30).log().mean()) for x in per]
        picks = {"predicted": min(range(len(plans)), key=lambda i: (predicted[i], i)),
                 "predicted_image": min(range(len(plans)), key=lambda i: (image[i], i))}
        for n_cal in CALIBRATIONS:
            for on in ("mse", "psnr"):
                picks[f"calibrated_{n_cal}_{on}"] = calibrated([x[:n_cal] for x in per], on)
        row = {"budget": s, "candidates": len(plans),
               "spearman": spearman(predicted, log_mse), "spearman_image": spearman(image, log_mse),
               "picks": {k: {"index": i, "below_best_db": below_best(rest, i)} for k, i in picks.items()},
               "plans": [{"anchors": int(p.anchors.sum()), "pruned": p.pruned_modules(),
                          "schedule": p.meta["config"]["schedule"], "spread": p.meta["config"]["spread"],
                          "weighting": p.meta["config"].get("weighting", "none"),
                          "forecast": "segment" if p.fill is not None else p.forecast,
                          "predicted": predicted[i], "predicted_image": image[i],
                          "mse_samples": per[i].tolist()} for i, p in enumerate(plans)]}
        print(json.dumps({k: v for k, v in row.items() if k != "plans"}), flush=True)
        rows.append(row)
        with partial.open("a") as f:
            f.write(json.dumps(row) + "\n")
    out = {**settings, "steps": steps, "calibrations": list(CALIBRATIONS), "speedups": args.speedups, "cpu": machine(),
           "threads": torch.get_num_threads(), "total_s": time.time() - t0, "rows": rows}
    publish(STEM, "soda-ranking", out, report)
    partial.unlink(missing_ok=True)


def report(out: dict) -> str:
    held = out["n"] - max(out["calibrations"])
    rules = [("predicted", "lowest predicted error"), ("predicted_image", "lowest predicted image error")] + [
        (f"calibrated_{n}_{on}", f"calibrated on {n} ({'MSE' if on == 'mse' else 'PSNR'})")
        for n in out["calibrations"] for on in ("mse", "psnr")]
    lines = ["| FLOP budget | candidates | Spearman: predicted error | Spearman: predicted image error | "
             + " | ".join(name for _, name in rules) + " |", "|---|---|---|---|" + "---|" * len(rules)]
    for r in sorted(out["rows"], key=lambda r: r["budget"]):
        lines.append(f"| {r['budget']:g}x | {r['candidates']} | {r['spearman']:.2f} | {r['spearman_image']:.2f} | "
                     + " | ".join(f"{r['picks'][k]['below_best_db']:.2f}" for k, _ in rules) + " |")
    lines += ["", f"fmnist-dit, {out['sampler'].upper()}-{out['steps']}, CFG {out['cfg']:g}, {out['dtype']}; "
              f"every candidate of a default calibration run on {out['n']} samples (seeds {out['seed']}.., classes "
              f"cycled). Spearman: between a prediction and the measured mean log MSE vs the full model over all "
              f"{out['n']} (1: the same order). Each rule's pick is scored on the last {held} samples, which no "
              f"rule saw: dB of mean PSNR vs the full model below the best candidate there (0: it picked the best). "
              f"Calibrated: the one-standard-error rule in the candidates' order on the first 8 or 16 samples, on "
              f"per-sample MSE (as `calibrate_soda`) or PSNR. Generated by `python benchmarks/soda_ranking.py"
              + (f" --speedups {out['speedups']}" if out.get("speedups", "2,3,4") != "2,3,4" else "")
              + f"` on {out['cpu']}."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
