"""Can SODA choose among its candidate plans without measuring them, and is measuring them on 8
samples enough?  For each FLOP budget, every plan calibration would measure (the caching-only
schedules of its first round: DP free / held to a spread / evenly spaced, each with reuse,
forecast or the per-segment filler; then fewer anchors with token pruning) is run on ``--n``
samples of seeds no profile or calibration saw.  Reported per budget:

- the rank correlation (Spearman) between the profile's predicted error and the measured MSE vs
  the full model on all ``--n`` samples;
- the pick of each rule, scored on the samples it did not see: the lowest predicted error, and
  calibration on the first 8 samples (the default calibration size); its MSE rank among the
  candidates on the other ``--n`` - 8 samples, and the spread there (how many standard errors,
  paired over the samples, it lies above the best candidate).

Writes results/soda_ranking.{json,md} and the ``soda-ranking`` block of docs/soda.md; each budget
goes to results/soda_ranking.partial.jsonl when done, so a stopped run resumes; budgets a finished
run measured with the same settings are kept (``--speedups 3,4`` after ``--speedups 2`` adds them).

    python benchmarks/soda_ranking.py                 # DDIM-50, budgets 2, 3, 4 (about 1 h on 2 cores)
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
from ditaccel.methods.soda.calibration import spread
from ditaccel.pipeline import SAMPLERS
from ditaccel.registry import load_pipeline, resolve_dtype
from ditaccel.runtime import RUNTIME_REVISION, apply, remove
from ditaccel.sampling import sample

STEM = "soda_ranking"
CALIBRATION = 8


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


def held_out(per: list[torch.Tensor], pick: int) -> dict:
    """The pick scored on samples it was not chosen on: its rank (1 = best) and z above the best."""
    means = [float(p.mean()) for p in per]
    best = min(range(len(per)), key=lambda i: means[i])
    rows = [{"mse_samples": p.tolist()} for p in per]
    spread(rows, best)
    return {"rank": 1 + sum(m < means[pick] for m in means), "z_above_best": rows[pick]["z_vs_chosen"],
            "mse": means[pick], "best_mse": means[best]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sampler", default="ddim", choices=["ddim", "ddpm"])
    ap.add_argument("--speedups", default="2,3,4")
    ap.add_argument("--n", type=int, default=24, help=f"samples per plan (the first {CALIBRATION} calibrate)")
    ap.add_argument("--seed", type=int, default=30_000)
    ap.add_argument("--cfg", type=float, default=3.0)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--replot", action="store_true", help="rewrite the table from the saved JSON")
    args = ap.parse_args()
    if args.replot:
        publish(STEM, "soda-ranking", json.loads((RESULTS / f"{STEM}.json").read_text()), report)
        return
    if args.n < CALIBRATION + 4:
        ap.error(f"--n must leave at least 4 samples beyond the {CALIBRATION} that calibrate")
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
        per, predicted = [], []
        for i, p in enumerate(plans):
            apply(pipe, p)
            try:
                images = sample(pipe, labels, **opts)[0].double()
            finally:
                remove(pipe)
            per.append((images - full).pow(2).flatten(1).mean(1))
            predicted.append(p.meta["predicted"]["error"])
            print(f"budget {s:g}: candidate {i + 1}/{len(plans)}: predicted {predicted[-1]:.4g}, "
                  f"MSE {float(per[-1].mean()):.3e}", flush=True)
        cal = [x[:CALIBRATION] for x in per]
        rest = [x[CALIBRATION:] for x in per]
        by_pred = min(range(len(plans)), key=lambda i: (predicted[i], i))
        by_cal = min(range(len(plans)), key=lambda i: (float(cal[i].mean()), i))
        row = {"budget": s, "candidates": len(plans),
               "spearman": spearman(predicted, [float(x.mean()) for x in per]),
               "predicted": held_out(rest, by_pred), "calibrated": held_out(rest, by_cal),
               "plans": [{"anchors": int(p.anchors.sum()), "pruned": p.pruned_modules(),
                          "schedule": p.meta["config"]["schedule"], "spread": p.meta["config"]["spread"],
                          "forecast": "segment" if p.fill is not None else p.forecast,
                          "predicted": predicted[i], "mse_samples": per[i].tolist()} for i, p in enumerate(plans)]}
        print(json.dumps({k: v for k, v in row.items() if k != "plans"}), flush=True)
        rows.append(row)
        with partial.open("a") as f:
            f.write(json.dumps(row) + "\n")
    out = {**settings, "steps": steps, "calibration": CALIBRATION, "speedups": args.speedups, "cpu": machine(),
           "threads": torch.get_num_threads(), "total_s": time.time() - t0, "rows": rows}
    publish(STEM, "soda-ranking", out, report)
    partial.unlink(missing_ok=True)


def report(out: dict) -> str:
    n_rest = out["n"] - out["calibration"]
    lines = ["| FLOP budget | candidates | Spearman (predicted error, measured MSE) | lowest predicted error: "
             f"rank on {n_rest} held-out samples | z above the best | calibrated on {out['calibration']}: rank | "
             "z above the best |", "|---|---|---|---|---|---|---|"]
    for r in sorted(out["rows"], key=lambda r: r["budget"]):
        p, c = r["predicted"], r["calibrated"]
        lines.append(f"| {r['budget']:g}x | {r['candidates']} | {r['spearman']:.2f} | {p['rank']} | "
                     f"{p['z_above_best']:.1f} | {c['rank']} | {c['z_above_best']:.1f} |")
    lines += ["", f"fmnist-dit, {out['sampler'].upper()}-{out['steps']}, CFG {out['cfg']:g}, {out['dtype']}; "
              f"every candidate of a default calibration run on {out['n']} samples (seeds {out['seed']}.., classes "
              f"cycled); the calibrated pick is made on the first {out['calibration']} and, like the predicted "
              f"pick, scored on the other {n_rest} (rank 1 = lowest MSE vs the full model; z: standard errors of "
              f"the paired per-sample difference). Generated by `python benchmarks/soda_ranking.py"
              + (f" --speedups {out['speedups']}" if out.get("speedups", "2,3,4") != "2,3,4" else "")
              + f"` on {out['cpu']}."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
