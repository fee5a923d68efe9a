"""SODA against every peer at matched measured speedups (issue 5), on the bundled model.

Methods, each swept over its knob from light to aggressive:
- ours: FORA (interval), ToCa-style (interval, 10% of tokens recomputed), Δ-DiT-style (interval),
  SODA (target FLOP speedup) and SODA budgeted by measured latency (target latency speedup), both
  calibrated on 8 samples of other seeds;
- diffusers' hooks and cache-dit, attached by ``ditaccel.peers`` (see its docstring and
  notes/peers/REPORT.md for the plumbing they need on DiT).

Per configuration:
- fidelity: ``--n`` images (seeds 0..n-1, classes cycled) in batches of ``--batch``, under torch's
  FlopCounterMode (so every method's FLOPs are counted the same way, on the very run that is
  scored): PSNR, SSIM and Fréchet distance vs the full model's images, FD vs the real test set,
  classifier agreement;
- speed: one batch of ``--batch`` images, the full model and the configuration back to back,
  ``--repeats`` times (order alternating), after a warm-up; measured speedup = median of the
  per-pair ratios; execution efficiency = measured / FLOP speedup.

Writes results/peers-<sampler>.json, results/peers.md, Pareto plots (PSNR and FD vs measured
speedup) and README's ``peers`` block.

    python benchmarks/peers.py                 # DDIM-50, the full sweep
    python benchmarks/peers.py --quick         # a few points per method, under 10 minutes
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch
from tqdm import tqdm

from common import RESULTS, replace_block, save_json
from ditaccel.methods import make_plan, model_shape, soda
from ditaccel.metrics import feature_extractor, frechet_distance, psnr, ssim
from ditaccel.models.classifier import predict
from ditaccel.peers import PEERS, PeerUnavailable, attach_peer, calibrate_magcache
from ditaccel.pipeline import SAMPLERS
from ditaccel.registry import load_classifier_asset, load_pipeline
from ditaccel.runtime import apply, remove
from ditaccel.sampling import sample

OURS = {  # name -> (knob, sweep, quick sweep)
    "fora": ("interval", (2, 3, 4, 5, 6), (2,)),
    "toca": ("interval", (2, 3, 4, 5, 6), (3,)),
    "delta-dit": ("interval", (2, 3, 4, 6), (3,)),
    "soda": ("speedup", (1.5, 2.0, 2.5, 3.0, 3.5, 4.0), (2.0,)),
    "soda-latency": ("latency_speedup", (1.5, 2.0, 2.5, 3.0, 3.5, 4.0), (2.0,)),
}
QUICK_PEERS = {"fbc": (0.06,), "pab": (3,), "fastercache": (2,), "taylorseer": (3,), "magcache": (0.04,),
               "dbcache": (0.06,), "dbcache-taylorseer": (0.06,)}


@dataclass
class Config:
    method: str
    family: str        # "ours" or the peer's library
    knob: str
    value: float
    prepare: Callable  # pipe -> attach, where attach(pipe) -> detach(); calibration happens in prepare


def configs(pipe, args, prof, cal_run) -> list[Config]:
    steps = SAMPLERS[args.sampler][2]
    shape = model_shape(pipe.transformer, steps)
    out = []

    def planned(plan):
        def attach(p):
            apply(p, plan)
            return lambda: remove(p)
        return attach

    for method, (knob, sweep, quick) in OURS.items():
        for v in quick if args.quick else sweep:
            def prepare(p, method=method, knob=knob, v=v):
                if method.startswith("soda"):
                    return planned(soda.calibrate_soda(p, cal_run, prof, progress=False, **{knob: v}))
                if method == "toca":
                    return planned(make_plan("toca", shape, interval=int(v), ratio=0.1))
                return planned(make_plan(method, shape, interval=int(v)))
            out.append(Config(method, "ours", knob, v, prepare))
    ratios = {}
    for name, peer in PEERS.items():
        for v in QUICK_PEERS[name] if args.quick else peer.sweep:
            def prepare(p, name=name, peer=peer, v=v):
                if peer.needs_calibration and "ratios" not in ratios:
                    ratios["ratios"] = calibrate_magcache(p, cal_run, steps)
                attach_peer(p, name, v, steps, mag_ratios=ratios.get("ratios")).remove()  # fails early if unavailable
                return lambda q: attach_peer(q, name, v, steps, mag_ratios=ratios.get("ratios")).remove
            out.append(Config(name, peer.library, peer.knob, v, prepare))
    return out


def run_images(pipe, labels, args, seed=0):
    steps = SAMPLERS[args.sampler][2]
    return sample(pipe, labels, sampler=args.sampler, steps=steps, guidance_scale=args.cfg, seed=seed,
                  batch_size=args.batch, progress=False, count_flops=False)


def counted(pipe, labels, args):
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        images, _ = run_images(pipe, labels, args)
    return images, int(counter.get_total_flops())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sampler", default="ddim", choices=["ddim", "ddpm"])
    ap.add_argument("--n", type=int, default=None, help="fidelity samples (default 250, quick 32)")
    ap.add_argument("--batch", type=int, default=None, help="images per batch, also the timed batch (16, quick 8)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cfg", type=float, default=3.0)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", default=None, help="comma-separated methods to run (default: all)")
    ap.add_argument("--replot", action="store_true", help="redraw the table and plot from the saved JSON")
    args = ap.parse_args()
    if args.replot:
        stem = f"peers-{args.sampler}" + ("-quick" if args.quick else "")
        out = json.loads((RESULTS / f"{stem}.json").read_text())
        (RESULTS / f"{stem}.md").write_text(report(out) + "\n")
        plot(out, RESULTS / f"{stem}.png")
        return
    args.n = args.n or (16 if args.quick else 250)
    args.batch = args.batch or (8 if args.quick else 16)
    t0 = time.time()
    from soda import get_profile  # the benchmark's own cached SODA profiles

    pipe = load_pipeline("fmnist-dit", "bf16")
    steps = SAMPLERS[args.sampler][2]
    prof = get_profile(pipe, args.sampler, steps, args.cfg, 32, False)
    cal_labels = [i % 10 for i in range(8)]
    cal_run = lambda p: sample(p, cal_labels, sampler=args.sampler, steps=steps,  # noqa: E731
                               guidance_scale=args.cfg, seed=500_000, batch_size=8, progress=False,
                               count_flops=False)[0]
    classifier = load_classifier_asset()
    fx = feature_extractor()
    from ditaccel.data import load_fashion_mnist

    x_test, _ = load_fashion_mnist("test")
    real_feats = fx((x_test[:2000] + 1) / 2) if args.quick else fx((x_test + 1) / 2)
    labels = [i % 10 for i in range(args.n)]
    timed = labels[:args.batch]

    run_images(pipe, timed[:4], args)  # warm-up
    full, full_flops = counted(pipe, labels, args)
    full_feats = fx(full)

    def quality(images) -> dict:
        feats = fx(images)
        return {"psnr": psnr(full, images), "ssim": ssim(full, images),
                "fd_vs_full": frechet_distance(feats, full_feats), "fd_vs_test": frechet_distance(feats, real_feats),
                "class_agreement": float((predict(classifier, images * 2 - 1) == torch.tensor(labels)).float().mean())}

    rows = [{"method": "full", "family": "-", "knob": "-", "value": None, "flops": full_flops,
             "speedup_flops": 1.0, "speedup_measured": 1.0, **quality(full)}]
    only = set(args.only.split(",")) if args.only else None
    todo = [c for c in configs(pipe, args, prof, cal_run) if only is None or c.method in only]
    for c in tqdm(todo, desc=f"{args.sampler}: methods"):
        try:
            attach = c.prepare(pipe)
            detach = attach(pipe)
        except PeerUnavailable as e:
            print(f"skipping {c.method}: {e}")
            continue
        try:
            images, flops = counted(pipe, labels, args)
            ratios = []
            for r in range(args.repeats):  # the full model and the method back to back, order alternating
                walls = {}
                for which in (("full", "method") if r % 2 == 0 else ("method", "full")):
                    if which == "full":
                        detach()
                    t = time.perf_counter()
                    run_images(pipe, timed, args)
                    walls[which] = time.perf_counter() - t
                    if which == "full":
                        detach = attach(pipe)
                ratios.append(walls["full"] / walls["method"])
        finally:
            detach()
        row = {"method": c.method, "family": c.family, "knob": c.knob, "value": c.value, "flops": flops,
               "speedup_flops": full_flops / flops, "speedup_measured": statistics.median(ratios),
               "ratios": ratios, **quality(images)}
        row["efficiency"] = row["speedup_measured"] / row["speedup_flops"]
        rows.append(row)
        print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}), flush=True)
    out = {"sampler": args.sampler, "steps": steps, "n": args.n, "batch": args.batch, "repeats": args.repeats,
           "cfg": args.cfg, "quick": args.quick, "threads": torch.get_num_threads(),
           "total_s": time.time() - t0, "rows": rows}
    stem = f"peers-{args.sampler}" + ("-quick" if args.quick else "")
    save_json(stem, out)
    table = report(out)
    (RESULTS / f"{stem}.md").write_text(table + "\n")
    plot(out, RESULTS / f"{stem}.png")
    if not args.quick:
        replace_block(f"peers-{args.sampler}", table + f"\n\n![Pareto](benchmarks/results/{stem}.png)")
    print(table)


def goal_check(rows: list[dict], lo: float = 1.5, hi: float = 3.0, tol: float = 0.05) -> list[str]:
    """Where SODA is not the best: at each SODA point in [lo, hi] measured speedup, the methods
    within ``tol`` of its speedup that beat it on PSNR or FD vs the full model."""
    lines = []
    for s in (r for r in rows if r["method"] == "soda" and lo * (1 - tol) <= r["speedup_measured"] <= hi * (1 + tol)):
        near = [r for r in rows if r["method"] not in ("soda", "full")
                and abs(r["speedup_measured"] / s["speedup_measured"] - 1) <= tol]
        for r in near:
            worse = [f"PSNR {s['psnr']:.2f} < {r['psnr']:.2f}" if r["psnr"] > s["psnr"] else None,
                     f"FD {s['fd_vs_full']:.2f} > {r['fd_vs_full']:.2f}" if r["fd_vs_full"] < s["fd_vs_full"] else None]
            worse = [w for w in worse if w]
            if worse:
                lines.append(f"SODA at {s['speedup_measured']:.2f}x vs {r['method']} ({r['knob']}={r['value']:g}) at "
                             f"{r['speedup_measured']:.2f}x: " + ", ".join(worse))
    return lines


def report(out: dict) -> str:
    lines = ["| method | knob | measured speedup | FLOP speedup | efficiency | PSNR vs full | SSIM vs full | "
             "FD vs full | FD vs real test | classifier agreement |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(out["rows"], key=lambda r: (r["method"] != "full", r["method"], r["speedup_measured"])):
        if r["method"] == "full":
            lines.append(f"| full | - | 1.00x | 1.00x | - | - | - | - | {r['fd_vs_test']:.2f} | "
                         f"{100 * r['class_agreement']:.1f}% |")
            continue
        lines.append(f"| {r['method']} ({r['family']}) | {r['knob']}={r['value']:g} | {r['speedup_measured']:.2f}x | "
                     f"{r['speedup_flops']:.2f}x | {100 * r['efficiency']:.0f}% | {r['psnr']:.2f} | {r['ssim']:.4f} | "
                     f"{r['fd_vs_full']:.2f} | {r['fd_vs_test']:.2f} | {100 * r['class_agreement']:.1f}% |")
    misses = goal_check(out["rows"])
    lines += ["", f"{out['sampler'].upper()}-{out['steps']}, CFG {out['cfg']:g}, bf16, {out['n']} images (seeds "
              f"0..{out['n'] - 1}) in batches of {out['batch']}; measured speedup: median of {out['repeats']} "
              f"back-to-back pairs (full model, method) on one batch; FLOPs counted by torch's FlopCounterMode "
              f"on the scored run. Goal check (SODA best in PSNR and FD vs full at every matched speedup "
              f"1.5-3x, ±5%): " + ("met." if not misses else f"{len(misses)} misses:"), ""]
    lines += [f"- {m}" for m in misses]
    lines += ["", "Generated by `python benchmarks/peers.py" + (" --quick" if out["quick"] else "")
              + ("" if out["sampler"] == "ddim" else f" --sampler {out['sampler']}") + "`."]
    return "\n".join(lines)


def plot(out: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    methods = sorted({r["method"] for r in out["rows"]} - {"full"})
    markers = {"ours": "o", "diffusers": "s", "cache-dit": "^"}
    colors = plt.cm.tab20(range(20))
    for i, m in enumerate(methods):
        pts = sorted((r for r in out["rows"] if r["method"] == m), key=lambda r: r["speedup_measured"])
        style = dict(marker=markers.get(pts[0]["family"], "o"), color=colors[i % 20],
                     lw=2.5 if m.startswith("soda") else 1.2, ms=6 if m.startswith("soda") else 4)
        for ax, key in zip(axes, ("psnr", "fd_vs_full")):
            ax.plot([r["speedup_measured"] for r in pts], [r[key] for r in pts], label=m, **style)
    axes[0].set_ylabel("PSNR vs full model (dB)")
    axes[1].set_ylabel("Fréchet distance vs full model")
    axes[1].set_yscale("log")
    for ax in axes:
        ax.set_xlabel("measured wall-clock speedup")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7, ncol=2, title="o ours, ■ diffusers, ▲ cache-dit", title_fontsize=7)
    fig.suptitle(f"{out['sampler'].upper()}-{out['steps']} on fmnist-dit ({out['n']} images)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
