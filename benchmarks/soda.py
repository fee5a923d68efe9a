"""SODA on the bundled model: the paper's ablation at one FLOP budget, and SODA with
other samplers.

Variants, all at the same FLOP budget (that of K evenly spaced anchors, K = round(T / speedup)):

- fixed: K evenly spaced anchors, reuse in between (FORA-style caching on a fixed schedule);
- OFS+DCS: K anchors chosen by the DP on the profiled cache error, reuse in between;
- OFS+UAS: the fixed schedule's kind (evenly spaced anchors) + sensitivity-aware pruning;
- SODA: DP schedule + sensitivity-aware pruning (both token scores: delta, feature_mean);
- SODA (calibrated): SODA's choices measured on 8 samples of other seeds (``ditaccel.calibrate_soda``):
  the anchor schedule (DP free or held to 2, 1.5, 1 x the even gap), then 0-3 fewer anchors with
  pruning; the closest to the full model is kept.

Token scores compared directly: the fixed schedule, reuse in between, attention recomputed on 20%
or 50% of the tokens chosen by each score.

Every variant samples the same seeds as the full model; fidelity is measured against the full
model's images (PSNR, SSIM, Fréchet distance) and against real data (FD vs the real test set,
classifier agreement).  Profiles are made with other seeds than the evaluation.

    python benchmarks/soda.py                  # DDIM-50, what docs/ shows
    python benchmarks/soda.py --extra          # also DDPM-250 and DPM-Solver++-20 (fewer samples)
    python benchmarks/soda.py --only ddim      # rerun one sampler, keep the others' results
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from common import RESULTS, ROOT, replace_block, save_json
from ditaccel.data import load_fashion_mnist
from ditaccel.io import remove_artifact
from ditaccel.methods import soda
from ditaccel.metrics import feature_extractor, frechet_distance, psnr, ssim
from ditaccel.models.classifier import predict
from ditaccel.pipeline import SAMPLERS
from ditaccel.profiling import Profile, ProfileConfig, ages_suffix, profile
from ditaccel.registry import load_classifier_asset, load_pipeline
from ditaccel.runtime import apply, remove
from ditaccel.sampling import sample
from ditaccel.viz import plot_profile, plot_schedule, save_grid

PROFILES = ROOT / "runs" / "profiles"


def profile_stem(sampler: str, steps: int, cfg: float, samples: int, model: str = "fmnist-dit"):
    """Where :func:`get_profile` keeps this profile (its name also tells rows made with it apart)."""
    tag = "fmnist" if model == "fmnist-dit" else model  # the DiT's profiles keep their old names
    return PROFILES / f"{tag}-{sampler}{steps}-cfg{cfg:g}-s{samples}{ages_suffix(steps)}"


def get_profile(pipe, sampler: str, steps: int, cfg: float, samples: int, reprofile: bool,
                model: str = "fmnist-dit") -> Profile:
    stem = profile_stem(sampler, steps, cfg, samples, model)
    if stem.with_suffix(".json").exists() and not reprofile:
        prof = Profile.load(stem)
        from ditaccel.io import model_fingerprint

        prof.check_for(fingerprint=model_fingerprint(pipe.transformer), sampler=sampler, num_steps=steps)
        return prof
    labels = [i % 10 for i in range(samples)]
    # in batches of 8 with a checkpoint after each: a long profile (DDPM-250 takes hours on a
    # 2-core CPU) stopped part way resumes where it stopped when the benchmark is run again
    PROFILES.mkdir(parents=True, exist_ok=True)
    partial = stem.with_name(stem.name + "-partial")
    prof = profile(pipe, config=ProfileConfig(class_labels=labels, sampler=sampler, steps=steps, guidance_scale=cfg,
                                              seed=100_000, batch_size=min(8, samples), checkpoint=partial))
    prof.save(stem)
    remove_artifact(partial)
    return prof


def variants(prof: Profile, speedup: float, names: list[str], pipe=None, cal_run=None) -> dict:
    k = max(1, round(prof.num_steps / speedup))
    fixed = soda.plan(soda.Config(anchors=k, prune=False, schedule="uniform"), prof)
    budget = fixed.meta["predicted"]["speedup_flops"]
    all_plans = {
        "fixed": lambda: fixed,
        "OFS+DCS": lambda: soda.plan(soda.Config(anchors=k, prune=False), prof),
        "OFS+UAS": lambda: soda.plan(soda.Config(speedup=budget, schedule="uniform", token_score="delta"), prof),
        "SODA (delta)": lambda: soda.plan(soda.Config(speedup=budget, token_score="delta"), prof),
        "SODA (feature_mean)": lambda: soda.plan(soda.Config(speedup=budget, token_score="feature_mean"), prof),
        "SODA (calibrated)": lambda: soda.calibrate_soda(pipe, cal_run, prof, speedup=budget, token_score="delta"),
    }
    return {name: all_plans[name]() for name in names}


def score_plans(prof: Profile, speedup: float) -> dict:
    """The fixed schedule, reuse in between, attention recomputed on a fraction of the tokens that
    each token score picks: the scores compared on equal terms."""
    from dataclasses import replace

    from ditaccel.plan import FULL, REUSE, Plan

    k = max(1, round(prof.num_steps / speedup))
    anchors = soda.uniform_schedule(prof.num_steps, k)
    out = {}
    for frac in (0.2, 0.5):
        tokens = torch.full((prof.num_steps, prof.num_layers, len(prof.modules)), FULL, dtype=torch.int32)
        tokens[~anchors] = REUSE
        tokens[~anchors, :, prof.modules.index("attn")] = prof.tokens_for_ratio(frac)
        for score in prof.token_scores:
            p = Plan(num_tokens=prof.num_tokens, modules=prof.modules, anchors=anchors, tokens=tokens,
                     token_score=score, method="fixed+attn")
            out[f"attention {frac:.0%} by {score}"] = replace(p, meta={"predicted": soda.predict(p, prof)})
    return out


def evaluate(pipe, plan, labels, run, full, real_feats, fx, classifier) -> tuple[torch.Tensor, dict]:
    if plan is not None:
        apply(pipe, plan)
    images, stats = sample(pipe, labels, **run)
    remove(pipe)
    feats = fx(images)
    row = {"wall_s": stats.wall_s, "cpu_s": stats.cpu_s, "flops": stats.flops,
           "fd_vs_test": frechet_distance(feats, real_feats),
           "class_agreement": float((predict(classifier, images * 2 - 1) == torch.tensor(labels)).float().mean())}
    if full is not None:
        f_images, f_stats, f_feats = full
        row.update(speedup_flops=f_stats.flops / stats.flops, speedup_wall=f_stats.wall_s / stats.wall_s,
                   speedup_cpu=f_stats.cpu_s / stats.cpu_s, psnr=psnr(f_images, images),
                   ssim=ssim(f_images, images), fd_vs_full=frechet_distance(feats, f_feats))
    if plan is not None:
        row.update(anchors=int(plan.anchors.sum()), predicted=plan.meta.get("predicted"))
    return images, row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=250, help="evaluation samples (DDIM-50)")
    ap.add_argument("--speedup", type=float, default=2.5)
    ap.add_argument("--cfg", type=float, default=3.0)
    ap.add_argument("--profile-samples", type=int, default=32)
    ap.add_argument("--extra", action="store_true", help="also DDPM-250 and DPM-Solver++-20")
    ap.add_argument("--extra-n", type=int, default=60)
    ap.add_argument("--reprofile", action="store_true")
    ap.add_argument("--only", default=None, help="rerun only this sampler; keep the others from soda.json")
    ap.add_argument("--calibration-samples", type=int, default=8)
    ap.add_argument("--dtype", default="bf16")
    args = ap.parse_args()
    t0 = time.time()
    pipe = load_pipeline("fmnist-dit", args.dtype)
    classifier = load_classifier_asset()
    fx = feature_extractor()
    x_test, _ = load_fashion_mnist("test")
    real_feats = fx((x_test + 1) / 2)
    settings = [("ddim", args.n, ["fixed", "OFS+DCS", "OFS+UAS", "SODA (delta)", "SODA (feature_mean)",
                                  "SODA (calibrated)"])]
    if args.extra or args.only:
        settings += [("ddpm", args.extra_n, ["fixed", "SODA (delta)", "SODA (calibrated)"]),
                     ("dpm++", args.extra_n, ["fixed", "SODA (delta)", "SODA (calibrated)"])]
    kept = []
    if args.only:
        if args.only not in [s[0] for s in settings]:
            raise SystemExit(f"--only must be one of {[s[0] for s in settings]}")
        settings = [s for s in settings if s[0] == args.only]
        old = json.loads((RESULTS / "soda.json").read_text())
        kept = [r for r in old["results"] if r["sampler"] != args.only]
        args.extra = args.extra or len(kept) > 0
    results = []
    for sampler, n, names in settings:
        steps = SAMPLERS[sampler][2]
        prof = get_profile(pipe, sampler, steps, args.cfg, args.profile_samples, args.reprofile)
        labels = [i % 10 for i in range(n)]
        run = dict(sampler=sampler, steps=steps, guidance_scale=args.cfg, seed=0, batch_size=50,
                   progress=True)
        f_images, f_row = evaluate(pipe, None, labels, run, None, real_feats, fx, classifier)
        f_stats = type("S", (), {"flops": f_row["flops"], "wall_s": f_row["wall_s"], "cpu_s": f_row["cpu_s"]})
        full = (f_images, f_stats, fx(f_images))
        rows = [{"setting": f"{sampler}-{steps}", "variant": "full", **f_row}]
        cal_labels = [i % 10 for i in range(args.calibration_samples)]
        cal_run = lambda p: sample(p, cal_labels, **{**run, "seed": 500_000, "progress": False})[0]  # noqa: E731
        plans = variants(prof, args.speedup, names, pipe, cal_run)
        if sampler == "ddim":
            plans.update(score_plans(prof, args.speedup))
        for name, plan in plans.items():
            images, row = evaluate(pipe, plan, labels, run, full, real_feats, fx, classifier)
            rows.append({"setting": f"{sampler}-{steps}", "variant": name, **row})
            print(json.dumps({k: v for k, v in rows[-1].items() if k != "predicted"}), flush=True)
            if sampler == "ddim" and name == "SODA (delta)":
                side = torch.stack([f_images[:20], images[:20]], 1).flatten(0, 1)
                save_grid(side, RESULTS / "soda_vs_full.png", nrow=10)
                plot_schedule(plan, RESULTS / "soda_schedule.png")
        if sampler == "ddim":
            plot_profile(prof, RESULTS / "soda_profile")
        for row, plan in zip(rows[1:], plans.values()):
            if "calibration" in plan.meta:
                row["calibration"] = plan.meta["calibration"]
                row["pruned_modules"] = plan.pruned_modules()
        results.append({"sampler": sampler, "steps": steps, "n": n, "profile_variation": prof.variation(),
                        "profile_s": prof.meta.get("profile_s"), "cost_s": prof.meta.get("cost_s"),
                        "rows": rows})
    order = {"ddim": 0, "ddpm": 1, "dpm++": 2}
    results = sorted(kept + results, key=lambda r: order.get(r["sampler"], 9))
    out = {"cfg": args.cfg, "speedup": args.speedup, "profile_samples": args.profile_samples,
           "threads": torch.get_num_threads(), "total_s": time.time() - t0, "results": results}
    save_json("soda", out)
    lines = ["| setting | variant | anchors | FLOP speedup | wall-clock speedup | CPU-time speedup | "
             "PSNR vs full | SSIM vs full | FD vs full | FD vs real test | classifier agreement |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    score_rows = []
    for res in results:
        for r in res["rows"]:
            if r["variant"].startswith("attention "):
                score_rows.append(r)
                continue
            full_row = r["variant"] == "full"
            cell = (lambda k, f: "-" if full_row else format(r[k], f))
            lines.append(f"| {r['setting']} (n={res['n']}) | {r['variant']} | {r.get('anchors', res['steps'])} | "
                         f"{'1.00x' if full_row else cell('speedup_flops', '.2f') + 'x'} | "
                         f"{'1.00x' if full_row else cell('speedup_wall', '.2f') + 'x'} | "
                         f"{'1.00x' if full_row else cell('speedup_cpu', '.2f') + 'x'} | "
                         f"{cell('psnr', '.2f')} | {cell('ssim', '.4f')} | {cell('fd_vs_full', '.2f')} | "
                         f"{r['fd_vs_test']:.2f} | {100 * r['class_agreement']:.1f}% |")
    lines.append("")
    cal = [(res["sampler"], r) for res in results for r in res["rows"] if "calibration" in r]
    if cal:
        lines.append("SODA (calibrated) kept: " + "; ".join(
            f"{s}: {r['anchors']} anchors, {r['pruned_modules']} pruned (step, layer, module)s "
            f"(candidate {r['calibration']['chosen'] + 1} of {len(r['calibration']['rows'])})" for s, r in cal) + ".")
        lines.append("")
    if score_rows:
        lines += ["Token scores on equal terms (DDIM-50, the fixed schedule, reuse in between, attention "
                  "recomputed on a fraction of the tokens each score picks):", "",
                  "| variant | FLOP speedup | PSNR vs full | SSIM vs full | FD vs full |", "|---|---|---|---|---|"]
        lines += [f"| {r['variant']} | {r['speedup_flops']:.2f}x | {r['psnr']:.2f} | {r['ssim']:.4f} | "
                  f"{r['fd_vs_full']:.2f} |" for r in score_rows]
        lines.append("")
    var = results[0]["profile_variation"]
    lines.append(f"CFG {args.cfg:g}, {args.dtype}, evaluation seeds 0..n-1 (classes cycled), profiles from "
                 f"{args.profile_samples} other trajectories (DDIM-50 profile: {results[0]['profile_s']:.0f} s "
                 f"+ {results[0]['cost_s']:.0f} s module costs; the cache error varies across samples with "
                 f"a median coefficient of variation of {var['cv_median']:.2f}, 90th percentile "
                 f"{var['cv_p90']:.2f}). All accelerated variants of a setting in the first table have the "
                 f"FLOP budget of round(T / {args.speedup:g}) evenly spaced anchors. Wall-clock speedups are single runs "
                 "on a noisy shared machine. Generated by `python benchmarks/soda.py"
                 + (" --extra" if args.extra else "") + "`.")
    table = "\n".join(lines)
    (RESULTS / "soda.md").write_text(table + "\n")
    replace_block("soda", table)
    print(table)


if __name__ == "__main__":
    main()
