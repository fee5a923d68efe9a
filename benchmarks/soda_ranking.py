"""Can SODA choose among its candidate plans without measuring them, and on how many samples must
it measure them?  For each FLOP budget, every plan calibration would measure (the caching-only
schedules of its first round: DP held to a spread or free, sensitivity-weighted, evenly spaced,
each with forecast, the per-segment filler or reuse; then fewer anchors with token pruning) is run
on ``--n`` samples of seeds no profile or calibration saw.  Reported per budget:

- the rank correlation (Spearman) between each of the profile's predictions (the summed module
  error; the images' error, weighted by the profiled step sensitivity) and the measured error vs
  the full model (mean over samples of log MSE, i.e. of PSNR) on all ``--n`` samples, and between
  each measure calibration could score by (mean MSE, mean 1 - SSIM, the default score
  ``ln MSE + ln(1 - SSIM)``) and the perceptual feature distance to the full model's images
  (squared distance of EfficientNet-lite0 features per image, the features the benchmarks' FD
  reads: what a calibration by pixels alone misses);
- the pick of each rule, scored on the samples it did not see (the last ``--n`` - 16): the lowest
  of either prediction, and calibration (the one-standard-error rule in the candidates' order, on
  per-sample MSE or on the default score, ``soda.scores``) on the first 8 or 16 samples: how many
  dB of mean PSNR it lies below the best candidate there, and its mean feature distance over the
  best candidate's.

Writes results/soda_ranking.{json,md} and the ``soda-ranking`` block of docs/soda.md; each budget
goes to results/soda_ranking.partial.jsonl when done, so a stopped run resumes; budgets a finished
run measured with the same settings are kept (``--speedups 3,4`` after ``--speedups 2`` adds them).

    python benchmarks/soda_ranking.py                 # DDIM-50, budgets 2, 3, 4 (about 15 min on 2 cores, bf16)
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
from ditaccel.methods.soda.calibration import CRITERIA, prefer, scores
from ditaccel.methods.soda.planner import preference
from ditaccel.metrics import feature_extractor, ssim_per_image
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


def over_best(rest: list[torch.Tensor], pick: int) -> float:
    """The pick's mean feature distance over the least candidate's, on the held-out samples."""
    means = [float(f.mean()) for f in rest]
    return means[pick] / min(means) if min(means) > 0 else math.nan


def calibrated(mse: list[torch.Tensor], dis: list[torch.Tensor], criterion: str) -> int:
    """The pick of the one-standard-error rule (:func:`prefer`, within 1) in the candidates' order
    on per-sample scores (:func:`~ditaccel.methods.soda.calibration.scores` of MSE and 1 - SSIM),
    as calibrate_soda chooses."""
    return prefer([{"score_samples": scores(m, d, criterion).tolist()} for m, d in zip(mse, dis)], 1.0)


def calibrated_picks(per: list[torch.Tensor], dis: list[torch.Tensor]) -> dict[str, int]:
    """Each criterion's calibration pick (:func:`calibrated`) on the first 8 and 16 samples, by name."""
    return {f"calibrated_{n}_{on}": calibrated([x[:n] for x in per], [x[:n] for x in dis], on)
            for n in CALIBRATIONS for on in CRITERIA}


def preferred_order(plans: list[dict]) -> list[int]:
    """Indices of a row's saved ``plans`` in the order calibration lists them today (the caching-only
    schedules by :func:`~ditaccel.methods.soda.planner.preference`, then the pruning candidates),
    each group in its saved order."""
    return sorted(range(len(plans)), key=lambda i: (plans[i]["pruned"] > 0,
                                                    preference(plans[i]["schedule"], plans[i]["weighting"],
                                                               plans[i].get("pricing", "filler"))))


def add_picks(out: dict) -> dict:
    """``out`` with every calibration criterion's picks scored again from the per-sample
    measurements it saved, the candidates in today's order (:func:`preferred_order`): a run made
    before the order changed is brought up to date on --replot."""
    held = max(CALIBRATIONS)
    for r in out["rows"]:
        order = preferred_order(r["plans"])
        per, dis, feat = ([torch.tensor(r["plans"][i][k], dtype=torch.float64) for i in order]
                          for k in ("mse_samples", "dssim_samples", "feature_samples"))
        rest, rest_feat = [x[held:] for x in per], [x[held:] for x in feat]
        for k, i in calibrated_picks(per, dis).items():
            r["picks"][k] = {"index": order[i], "below_best_db": below_best(rest, i),
                             "feature_over_best": over_best(rest_feat, i)}
    return out


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
        publish(STEM, "soda-ranking", add_picks(json.loads((RESULTS / f"{STEM}.json").read_text())), report)
        return
    if args.n < max(CALIBRATIONS) + 8:
        ap.error(f"--n must leave at least 8 samples beyond the {max(CALIBRATIONS)} that calibrate")
    dtype = resolve_dtype(args.dtype)
    pipe = load_pipeline("fmnist-dit", dtype)
    pipe.set_progress_bar_config(disable=True)
    steps = SAMPLERS[args.sampler][2]
    prof = get_profile(pipe, args.sampler, steps, args.cfg, 32, False)
    fx = feature_extractor()
    labels = [i % 10 for i in range(args.n)]
    opts = dict(sampler=args.sampler, steps=steps, guidance_scale=args.cfg, seed=args.seed, batch_size=args.n,
                progress=False, count_flops=False)
    settings = {"sampler": args.sampler, "n": args.n, "seed": args.seed, "cfg": args.cfg, "dtype": dtype,
                "runtime_revision": RUNTIME_REVISION, "features": "bf16" if fx.bf16 else "fp32"}
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
            full_feats = fx(full.float()).double()
        plans = plans_for(prof, s)
        per, dis, feat, predicted, image = [], [], [], [], []
        for i, p in enumerate(plans):
            apply(pipe, p)
            try:
                images = sample(pipe, labels, **opts)[0].double()
            finally:
                remove(pipe)
            per.append((images - full).pow(2).flatten(1).mean(1))
            dis.append(1 - ssim_per_image(full, images))
            feat.append((fx(images.float()).double() - full_feats).pow(2).sum(1))
            predicted.append(p.meta["predicted"]["error"])
            image.append(p.meta["predicted"].get("image_error", math.nan))
            print(f"budget {s:g}: candidate {i + 1}/{len(plans)}: predicted {predicted[-1]:.4g} / {image[-1]:.4g}, "
                  f"PSNR {float(psnr(per[-1]).mean()):.2f}", flush=True)
        held = max(CALIBRATIONS)
        rest, rest_feat = [x[held:] for x in per], [x[held:] for x in feat]
        log_mse = [float(x.clamp_min(1e-30).log().mean()) for x in per]
        feature = [float(x.mean()) for x in feat]
        picks = {"predicted": min(range(len(plans)), key=lambda i: (predicted[i], i)),
                 "predicted_image": min(range(len(plans)), key=lambda i: (image[i], i))}
        picks.update(calibrated_picks(per, dis))
        row = {"budget": s, "candidates": len(plans),
               "spearman": spearman(predicted, log_mse), "spearman_image": spearman(image, log_mse),
               "feature_spearman": {on: spearman([float(x.mean()) for x in v], feature) for on, v in (
                   ("mse", per), ("dssim", dis), ("mse+ssim", [scores(m, d) for m, d in zip(per, dis)]))},
               "picks": {k: {"index": i, "below_best_db": below_best(rest, i), "feature_over_best": over_best(rest_feat, i)}
                         for k, i in picks.items()},
               "plans": [{"anchors": int(p.anchors.sum()), "pruned": p.pruned_modules(),
                          "schedule": p.meta["config"]["schedule"], "spread": p.meta["config"]["spread"],
                          "weighting": p.meta["config"].get("weighting", "none"),
                          "pricing": p.meta["config"].get("pricing", "filler"),
                          "forecast": "segment" if p.fill is not None else p.forecast,
                          "predicted": predicted[i], "predicted_image": image[i],
                          "mse_samples": per[i].tolist(), "dssim_samples": dis[i].tolist(),
                          "feature_samples": feat[i].tolist()} for i, p in enumerate(plans)]}
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
    names = {"mse": "MSE", "mse+ssim": "MSE+SSIM score"}
    rules = [("predicted", "lowest predicted error"), ("predicted_image", "lowest predicted image error")] + [
        (f"calibrated_{n}_{on}", f"calibrated on {n} ({names[on]})") for n in out["calibrations"] for on in CRITERIA]
    rows = sorted(out["rows"], key=lambda r: r["budget"])
    lines = ["| FLOP budget | candidates | predicted error vs PSNR | predicted image error vs PSNR | "
             "MSE vs feature distance | 1 - SSIM vs feature distance | MSE+SSIM score vs feature distance |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        fs = r["feature_spearman"]
        lines.append(f"| {r['budget']:g}x | {r['candidates']} | {r['spearman']:.2f} | {r['spearman_image']:.2f} | "
                     f"{fs['mse']:.2f} | {fs['dssim']:.2f} | {fs['mse+ssim']:.2f} |")
    lines += ["", "| FLOP budget | " + " | ".join(name for _, name in rules) + " |", "|---|" + "---|" * len(rules)]
    for r in rows:
        lines.append(f"| {r['budget']:g}x | " + " | ".join(
            f"{r['picks'][k]['below_best_db']:.2f} dB, {r['picks'][k]['feature_over_best']:.2f}x" for k, _ in rules) + " |")
    lines += ["", f"fmnist-dit, {out['sampler'].upper()}-{out['steps']}, CFG {out['cfg']:g}, {out['dtype']}; "
              f"every candidate of a default calibration run on {out['n']} samples (seeds {out['seed']}.., classes "
              f"cycled). First table: Spearman rank correlations over the candidates, on all {out['n']} samples "
              f"(1: the same order), of each prediction with the measured mean log MSE vs the full model, and of "
              f"each measure calibration can score by with the mean feature distance to the full model's images "
              f"(squared distance of {out.get('features', 'fp32')} EfficientNet-lite0 features per image: what the "
              f"benchmarks' FD reads). Second table: each rule's pick scored on the last {held} samples, which no "
              f"rule saw: dB of mean PSNR vs the full model below the best candidate there, and its mean feature "
              f"distance over the least candidate's (0 dB and 1x: it picked the best). Calibrated: the "
              f"one-standard-error rule in the candidates' order on the first 8 or 16 samples, on per-sample MSE "
              f"or on the default score ln MSE + ln(1 - SSIM) (`calibrate_soda`). Generated by "
              f"`python benchmarks/soda_ranking.py"
              + (f" --speedups {out['speedups']}" if out.get("speedups", "2,3,4") != "2,3,4" else "")
              + f"` on {out['cpu']}."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
