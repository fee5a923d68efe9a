"""SODA against every peer at matched measured speedups, on a bundled model
(``--model``: the class-conditional fmnist-dit, default, or the text-conditioned fmnist-pixart).

Methods, each swept over its knob from light to aggressive:
- ours: FORA (interval), ToCa-style (interval, 10% of tokens recomputed), Δ-DiT-style (interval),
  SODA (target FLOP speedup) and SODA budgeted by measured latency (target latency speedup), both
  calibrated on 16 samples of other seeds;
- diffusers' hooks and cache-dit, attached by ``ditaccel.peers`` (see its docstring for the plumbing
  they need on DiT).

Per configuration:
- fidelity: ``--n`` images (seeds 0..n-1, classes cycled) in batches of ``--batch``, under torch's
  FlopCounterMode (so every method's FLOPs are counted the same way, on the very run that is
  scored): PSNR, SSIM and Fréchet distance vs the full model's images, FD vs the real test set,
  classifier agreement;
- speed: one batch of ``--batch`` images, the full model and the configuration back to back,
  ``--repeats`` times (order alternating), after a warm-up; measured speedup = median of the
  per-pair ratios; execution efficiency = measured / FLOP speedup.

The measurement itself is ``ditaccel.bench`` (also behind ``ditaccel bench``); this script adds
quality vs real data (FD vs the Fashion-MNIST test set, classifier agreement) and its page's block.
Writes results/peers-<sampler>[-quick].{json,md,png} and its page's ``peers-<sampler>`` block.

    python benchmarks/peers.py                        # DDIM-50, the full sweep
    python benchmarks/peers.py --sampler ddpm --n 32 --timed-batch 4 --dtype fp32   # DDPM-250 (as in
                                                      # docs; about 7 h on a 2-core fp32 CPU: stopped,
                                                      # it resumes from results/peers-ddpm.partial.jsonl,
                                                      # which is committed while the sweep is part way)
    python benchmarks/peers.py --sampler ddpm --n 32 --timed-batch 4 --dtype fp32 --retime
                                                      # resuming on another CPU (or after the runtime got
                                                      # faster; also on a finished sweep): those rows are
                                                      # timed again here first, so every speedup is from
                                                      # one machine and the current runtime
    python benchmarks/peers.py --quick                # one point per method, half the steps, 8 images:
                                                      # a smoke run, under 10 minutes
    python benchmarks/peers.py --seed 10000 --repeats 0   # fidelity only on other seeds (FD ranking check)
    python benchmarks/peers.py --only soda,soda-latency --merge   # re-measure some methods, keep the rest
    python benchmarks/peers.py --model fmnist-pixart --n 32 --timed-batch 4 --sweep fora=2,3 ...
                                                      # the PixArt-style text model (its page's
                                                      # command, two points per method)
    python benchmarks/peers.py --model fmnist-mmdit --quick   # the SD3-style model, Euler-28 (flow
                                                      # matching: its only sampler)
"""

from __future__ import annotations

import argparse
import functools
import json
import time
from collections import Counter

import torch

from common import (RESULTS, ROOT, load_reference, machine, real_test_features, replace_block, resume_partial,
                    save_json, save_reference)
from ditaccel.bench import (ABLATIONS, SODA, MeasureConfig, measure, merge, method_entries, parse_sweeps, plan_path, plot,
                            report, retime, stale_timing)
from ditaccel.io import remove_artifact, write_text
from ditaccel.methods.soda import CalibrationConfig
from ditaccel.metrics import feature_extractor, frechet_distance
from ditaccel.models.classifier import predict
from ditaccel.pipeline import SAMPLERS
from ditaccel.registry import BUNDLED, load_classifier_asset, load_pipeline
from ditaccel.runtime import RUNTIME_REVISION
from ditaccel.sampling import sample


def model_sampler(model: str, sampler: str | None) -> str:
    """The sampler a bundled ``model`` is benchmarked with: ``sampler``, or by default the one it
    is meant for (``ditaccel.pipeline.default_sampler``: euler for the flow-matching fmnist-mmdit,
    else ddim).  ValueError where ``sampler`` does not fit the model (``make_scheduler``'s)."""
    from ditaccel.pipeline import default_sampler, make_scheduler
    from ditaccel.registry import resolve_model

    config = json.loads((resolve_model(model) / "scheduler" / "scheduler_config.json").read_text())
    sampler = sampler or default_sampler(config)
    make_scheduler(sampler, config)
    return sampler


# the defaults of a full run and of --quick, a smoke run of the whole benchmark that finishes in 10
# minutes on a bare 2-core fp32 CPU (profile included): half the sampler's steps, 8 images, a timed
# batch of 2, an 8-sample profile and SODA calibrated on 4 samples (its calibration is most of a
# quick run's time)
DEFAULTS = {False: dict(n=96, batch=16, timed_batch=8, step_divisor=1, profile_samples=32, calibration_samples=16),
            True: dict(n=8, batch=8, timed_batch=2, step_divisor=2, profile_samples=8, calibration_samples=4)}


def stem_of(args) -> str:
    return (f"peers-{args.sampler}" + (f"-{args.model}" if args.model != "fmnist-dit" else "")
            + ("-quick" if args.quick else "")
            + (f"-seed{args.seed}" if args.seed else "") + ("-notime" if not args.repeats else ""))


def write_partial(path, lines: list[dict]) -> None:
    """The partial file rewritten whole (atomically): its header, then one row per line."""
    write_text(path, "\n".join(json.dumps(x) for x in lines) + "\n")


def scored_features(row: dict) -> str:
    """The precision of the features a row was scored on.  Rows from before the extractor was fp32
    everywhere name none: the CPU that scored them tells (a bf16-native one scored in bf16); for a
    row timed again elsewhere that is the CPU that timed it before."""
    if "features" in row:
        return row["features"]
    cpu = (row.get("timed_before") or {}).get("cpu") or row.get("cpu", "")
    return "bf16" if "bf16:" in cpu else "fp32"


def command_of(args) -> str:
    parts = ["python benchmarks/peers.py"]
    if args.model != "fmnist-dit":
        parts.append(f"--model {args.model}")
    if args.sampler != model_sampler(args.model, None):
        parts.append(f"--sampler {args.sampler}")
    if args.quick:
        parts.append("--quick")
    if args.dtype == "fp32":  # (auto is bf16 where native)
        parts.append("--dtype fp32")
    if args.seed:
        parts.append(f"--seed {args.seed}")
    parts += [f"--{k.replace('_', '-')} {getattr(args, k)}" for k, v in DEFAULTS[args.quick].items()
              if k in ("n", "batch", "timed_batch") and getattr(args, k) not in (None, v)]
    if args.repeats != 3:
        parts.append(f"--repeats {args.repeats}")
    parts += [f"--sweep {item}" for item in args.sweep or []]
    return " ".join(parts)


def describe(out: dict) -> str:
    model = out.get("model", "fmnist-dit")
    conds = "classes cycled" if model == "fmnist-dit" else "prompts \"a photo of a <class name>\", classes cycled"
    return (f"{model}, {out['sampler'].upper()}-{out['steps']}, CFG {out['cfg']:g}, {out.get('dtype', 'bf16')}, "
            f"{out['n']} images (seeds {out.get('seed', 0)}..{out.get('seed', 0) + out['n'] - 1}, {conds}) "
            f"in batches of {out['batch']}; "
            f"measured speedup: median of {out['repeats']} back-to-back pairs (full model, method) on one batch of "
            f"{out.get('timed_batch', out['batch'])}; FLOPs counted by torch's FlopCounterMode on the scored run."
            + (f" FD on {out['features']} EfficientNet-lite0 features." if "features" in out else "")
            + (f" SODA's profile: {out['profile_samples']} samples of other seeds"
               + (f", cache ages 1..{out['profile_ages'][-1]}" if "profile_ages" in out else "")
               + f"; calibration: {out.get('calibration_samples', 8)} more"
               + (" (scored by log MSE + log(1 - SSIM) per sample)" if out.get("calibration_criterion") == "mse+ssim"
                  else "")
               + ("; soda-latency's budget timed on the timed batch." if "profile_ages" in out else ".")
               if "profile_samples" in out else "")
            + _machines(out))


def _brief(row: dict) -> str:
    """A measured row as one JSON line for the log (floats rounded, the replaced timing left out)."""
    return json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items() if k != "timed_before"})


def _machines(out: dict) -> str:
    """Where the method rows were timed, when that was more than one machine (a resumed sweep)."""
    counts = Counter(r["cpu"] for r in out["rows"] if r.get("cpu"))
    if len(counts) < 2:
        return ""
    return " Rows timed on: " + "; ".join(f"{c} ({k} rows)" for c, k in counts.items()) + "."


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="fmnist-dit", choices=list(BUNDLED))
    ap.add_argument("--dtype", default="auto", help="auto: bf16 where native, else fp32")
    ap.add_argument("--sampler", default=None, choices=["ddim", "ddpm", "euler"],
                    help="default: the one the model is meant for (ddim; euler for the flow-matching fmnist-mmdit)")
    ap.add_argument("--n", type=int, default=None, help="fidelity samples (default 96, quick 8)")
    ap.add_argument("--batch", type=int, default=None, help="images per scored batch (16, quick 8)")
    ap.add_argument("--timed-batch", type=int, default=None, help="images in the timed batch (8, quick 2)")
    ap.add_argument("--repeats", type=int, default=3, help="timing pairs (0: fidelity only)")
    ap.add_argument("--seed", type=int, default=0, help="first seed of the scored images")
    ap.add_argument("--cfg", type=float, default=3.0)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", default=None, help="comma-separated methods to run (default: all)")
    ap.add_argument("--sweep", action="append", default=None, metavar="METHOD=V1,V2,...",
                    help="this method's knob values instead of its default sweep (repeatable)")
    ap.add_argument("--merge", action="store_true",
                    help="with --only: replace those methods' rows in the saved results, keep the rest")
    ap.add_argument("--replot", action="store_true", help="redraw the table and plot from the saved JSON")
    ap.add_argument("--retime", nargs="?", const="stale", choices=["stale", "all"], default=None,
                    help="resuming (or on a finished sweep): time again on this machine the rows timed on another "
                         "CPU, and our methods' rows timed with an older runtime (images and FLOPs kept), so that "
                         "every speedup comes from one machine and the current runtime; 'all': every row, in one "
                         "pass (a stopped pass resumes where it stopped), with --repeats pairs each")
    args = ap.parse_args()
    try:
        args.sampler = model_sampler(args.model, args.sampler)
    except ValueError as e:
        ap.error(f"{args.model}: {e}")
    stem = stem_of(args)
    if args.retime and not args.repeats:
        ap.error("--retime times rows again: it needs --repeats of at least 1")
    if args.merge and not args.only:
        ap.error("--merge needs --only METHODS (the methods to re-measure)")
    try:
        sweeps = parse_sweeps(args.sweep)
    except ValueError as e:
        ap.error(str(e))
    if args.replot:
        out = json.loads((RESULTS / f"{stem}.json").read_text())
        args.n, args.batch, args.timed_batch = out["n"], out["batch"], out.get("timed_batch", 8)
        args.sweep = args.sweep or out.get("sweep")
        finish(out, stem, args)
        return
    for k, v in DEFAULTS[args.quick].items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    t0 = time.time()
    from soda import get_profile, profile_stem  # the benchmark's own cached SODA profiles
    from ditaccel.profiling import ages_suffix, default_intervals

    from ditaccel.registry import resolve_dtype

    args.dtype = resolve_dtype(args.dtype)
    pipe = load_pipeline(args.model, args.dtype)
    steps = SAMPLERS[args.sampler][2] // args.step_divisor
    # made when a SODA row is first measured (cached under runs/profiles/): a resumed sweep past its
    # SODA rows does not profile again
    prof = functools.cache(lambda: get_profile(pipe, args.sampler, steps, args.cfg, args.profile_samples, False,
                                               model=args.model))
    cal_labels = [i % 10 for i in range(args.calibration_samples)]
    opts = dict(sampler=args.sampler, steps=steps, guidance_scale=args.cfg, progress=False, count_flops=False)
    cal_run = lambda p: sample(p, cal_labels, seed=500_000, batch_size=len(cal_labels), **opts)[0]  # noqa: E731
    labels = [i % 10 for i in range(args.n)]
    run = lambda p: sample(p, labels, seed=args.seed, batch_size=args.batch, **opts)[0]  # noqa: E731
    timed_labels = labels[:args.timed_batch]
    timed = lambda p: sample(p, timed_labels, seed=args.seed, batch_size=args.timed_batch, **opts)  # noqa: E731
    classifier = load_classifier_asset()
    fx = feature_extractor()

    real_feats = real_test_features(fx, 2000 if args.quick else 10_000)  # cached under runs/cache/

    def extra(images) -> dict:
        return {"fd_vs_test": frechet_distance(fx(images), real_feats),
                "class_agreement": float((predict(classifier, images * 2 - 1) == torch.tensor(labels)).float().mean())}

    methods = args.only.split(",") if args.only else None
    # SODA's calibrated plans depend on the profile and the calibration samples only: kept (and
    # committed, as the plans the rows were scored with) for the other seed sets, for re-runs and
    # for --retime (delete results/plans/<run>/ after changing SODA); --quick's profile is another
    # one, so its plans are kept apart
    # SODA rows record the profile they were planned on (its name says the samples and cache ages)
    profile_name = profile_stem(args.sampler, steps, args.cfg, args.profile_samples, args.model).name
    ages = default_intervals(steps)
    plan_dir = RESULTS / "plans" / (f"peers-{args.sampler}" + (f"-{args.model}" if args.model != "fmnist-dit" else "")
                                    + ("-quick" if args.quick else "")
                                    + ages_suffix(steps))
    # soda-latency's budget is timed on the very batch the benchmark times
    entries = method_entries(pipe, steps, methods=methods, quick=args.quick, sweeps=sweeps, profile=prof,
                             calibration_run=cal_run, timed_run=timed, plan_dir=plan_dir)

    # every finished row goes to a partial file at once: a run that fails later (or is stopped)
    # resumes from it with the same command
    partial = RESULTS / f"{stem}.partial.jsonl"
    settings = {k: getattr(args, k) for k in ("model", "dtype", "sampler", "n", "batch", "timed_batch",
                                              "repeats", "seed", "cfg", "quick", "sweep", "only")}
    final = RESULTS / f"{stem}.json"
    if args.retime and not partial.exists() and final.exists() and not args.only:
        # a finished sweep timed again (on another CPU, or after the runtime got faster): its rows
        # resume as a stopped run's would, with the full model's images it kept
        done = json.loads(final.read_text())
        # 'all' times every row again, so it may take another number of timing pairs
        loose = {"only", "repeats"} if args.retime == "all" else {"only"}
        if all(done.get(k) == v for k, v in settings.items() if k not in loose):
            seeded = [r for r in done["rows"] if r["method"] != "full"]
            for why in done.get("skipped", []):  # "method: knob=value: reason" (a SODA budget out of reach)
                method, rest = why.split(": ", 1)
                if "=" in rest.split(": ", 1)[0]:
                    seeded.append({"method": method, "value": float(rest.split(": ", 1)[0].split("=")[1]),
                                   "skipped": why, "cpu": done.get("cpu")})
            write_partial(partial, [{"settings": settings}, *seeded])
            print(f"--retime: resuming the finished sweep in {final.name} ({len(seeded)} rows)", flush=True)
    header, resumed = resume_partial(partial, settings)
    # the full model's scored images, kept beside the partial rows (committed with them): a resumed
    # sweep scores against the very images its earlier rows were scored against, without sampling
    # them again (a quarter of an hour at DDPM-250 on a 2-core CPU)
    reference = RESULTS / f"{stem}.partial-full"
    full = load_reference(reference, "peers-reference", settings) if resumed else None
    if full is not None:
        print(f"resuming: the full model's images from {reference.name}", flush=True)
    if not resumed:
        remove_artifact(reference)

    def keep_full(images, flops):
        save_reference(reference, "peers-reference", settings, images, flops)

    # rows scored on features of another precision do not compare (FD moves by percents): measured
    # again in full. Rows from before the extractor was fp32 everywhere say it by their CPU: a
    # bf16-native one scored in bf16
    features = "bf16" if fx.bf16 else "fp32"
    other = [r for r in resumed if "skipped" not in r and scored_features(r) != features]
    if other:
        print(f"measuring {len(other)} rows again in full (scored on {'fp32' if features == 'bf16' else 'bf16'} "
              "features): " + ", ".join(f"{r['method']}={r['value']:g}" for r in other), flush=True)
        resumed = [r for r in resumed if r not in other]

    # SODA rows planned on another profile (fewer cache ages, before the ages grew with the step
    # count; rows from then name none) are measured again in full, their skips tried again
    stale = [r for r in resumed if r["method"] in (*SODA, *ABLATIONS) and r.get("profile", "") != profile_name]
    if stale:
        print(f"measuring {len(stale)} SODA rows again in full (planned on another profile than {profile_name}): "
              + ", ".join(f"{r['method']}={r['value']:g}" for r in stale), flush=True)
        resumed = [r for r in resumed if r not in stale]

    cpu = machine()

    def show(row):
        # a sweep too long for one session resumes on whatever machine the next one gets: each row
        # says where it was timed. Its speedup is a ratio within its own pairs, but how much of a
        # method's FLOP saving shows up in wall-clock time depends on the CPU (a faster one leaves
        # more of a step to fixed per-call costs), so --retime times every row on one machine
        row["cpu"], row["features"] = cpu, features
        if args.retime == "all":  # measured in full by this pass: not measured again when it resumes
            row["retime_pass"] = header["retime_pass"]
        if row["method"] in (*SODA, *ABLATIONS):
            row["profile"] = profile_name
        print(_brief(row), flush=True)
        with partial.open("a") as f:  # a skip record too (a SODA budget out of reach): not tried again
            f.write(json.dumps(row) + "\n")

    if args.retime:
        # timed on another CPU, or ours timed with an older (slower) runtime; with 'all', every row not
        # yet timed by this pass (named in the partial file's header, so that a stopped pass resumes)
        if args.retime == "all":
            header.setdefault("retime_pass", time.strftime("%Y-%m-%dT%H:%M:%S"))
        pass_id = header.get("retime_pass") if args.retime == "all" else None
        elsewhere = [r for r in resumed if "skipped" in r and r.get("cpu") != cpu
                     or "skipped" not in r and (stale_timing(r, cpu, args.dtype) if pass_id is None
                                                else r.get("retime_pass") != pass_id)]
        # soda-latency calibrates by this machine's clock, and a SODA row whose plan was not kept
        # cannot be rebuilt as scored: those are measured again in full (and budgets another CPU
        # could not reach are tried again), the others timed again
        # (with 'all', a soda-latency row calibrated by this machine's clock and the current runtime keeps its plan)
        again = [r for r in elsewhere if r["method"] == "soda-latency" and stale_timing(r, cpu, args.dtype) or "skipped" in r
                 or (r["method"] in (*SODA, *ABLATIONS) and not plan_path(plan_dir, r["method"], r["knob"], r["value"]).exists())]
        if again:
            print(f"--retime: measuring {len(again)} rows again in full: "
                  + ", ".join(f"{r['method']}={r['value']:g}" for r in again), flush=True)
        resumed = [r for r in resumed if r not in again]
        for r in again:  # their kept plans were timed by another machine's clock: calibrated again
            if r["method"] == "soda-latency":
                plan_path(plan_dir, r["method"], r["knob"], r["value"]).unlink(missing_ok=True)
        todo = [r for r in elsewhere if r not in again]
        kept = {(r["method"], r["value"]): r for r in resumed}

        for r in todo:  # named before the rows' CPU is overwritten (old rows say it by the CPU that scored them)
            r["features"] = scored_features(r)

        def keep_retimed(row):
            row["cpu"] = cpu
            if pass_id is not None:
                row["retime_pass"] = pass_id
            print(_brief(row), flush=True)
            kept[(row["method"], row["value"])] = row
            # the partial file rewritten whole (atomically) after each row: a stopped retime resumes
            write_partial(partial, [header, *kept.values()])

        write_partial(partial, [header, *kept.values()])

        retime(pipe, timed, entries, todo, repeats=args.repeats, on_row=keep_retimed)
        resumed = list(kept.values())

    res = measure(pipe, run, timed, entries, MeasureConfig(repeats=args.repeats, extra=extra, feature_extractor=fx,
                                                           on_row=show, resumed=resumed, full=full, on_full=keep_full))
    res["resumed_rows"] = sum("skipped" not in r for r in resumed)
    res["retimed_rows"] = sum("timed_before" in r for r in res["rows"])
    out = {"model": args.model, "dtype": args.dtype, "sampler": args.sampler, "steps": steps, "n": args.n, "seed": args.seed, "batch": args.batch,
           "timed_batch": args.timed_batch, "repeats": args.repeats, "cfg": args.cfg, "quick": args.quick,
           "sweep": args.sweep, "profile_samples": args.profile_samples, "profile_ages": list(ages),
           "runtime_revision": RUNTIME_REVISION, **({"retime_pass": header["retime_pass"]} if "retime_pass" in header else {}),
           "calibration_samples": args.calibration_samples, "calibration_criterion": CalibrationConfig().criterion,
           "threads": torch.get_num_threads(), "cpu": cpu, "features": features, "total_s": time.time() - t0, **res}
    if args.merge:
        planned = {k: out[k] for k in ("calibration_samples", "calibration_criterion", "profile_samples", "profile_ages")}
        out = merge(json.loads((RESULTS / f"{stem}.json").read_text()), out)
        if set(methods) & {*SODA, *ABLATIONS}:  # the SODA rows now say how they were calibrated and planned
            out.update(planned)
    save_json(stem, out)
    partial.unlink(missing_ok=True)  # the reference stays: a later --retime of the finished sweep uses it
    finish(out, stem, args)


def finish(out: dict, stem: str, args) -> None:
    out = {**out, "description": describe(out), "command": command_of(args)}
    table = report(out)
    (RESULTS / f"{stem}.md").write_text(table + "\n")
    print(table)
    if not out["repeats"]:
        return  # fidelity only: no speed axis to plot
    model = out.get("model", "fmnist-dit")
    plot(out, RESULTS / f"{stem}.png", f"{out['sampler'].upper()}-{out['steps']} on {model} ({out['n']} images)")
    if not args.quick and not args.seed:
        block = f"peers-{args.sampler}" + (f"-{model}" if model != "fmnist-dit" else "")
        replace_block(block, table + f"\n\n![Pareto](benchmarks/results/{stem}.png)")


if __name__ == "__main__":
    main()
