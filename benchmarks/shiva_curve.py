"""Shiva's training curve: class agreement and FD vs real data against training steps.

Every artifact a run exported along the way (``ditaccel train-shiva --export-every N``:
``<run>/steps/shiva-<step>.{safetensors,json}``) is run at its trained keep on the same images as
the full model (``ditaccel.bench.measure``, fidelity only): classifier agreement with the class
asked for, FD vs the Fashion-MNIST test set, PSNR vs the full model.  Rows are keyed by the
artifact's tensor digest, so a run trained further adds its new points alone and a retrained run's
points are measured afresh.  Writes results/shiva_curve{-model}.{json,md,png} and the
``shiva-curve`` block of docs/shiva.md (fmnist-dit).

    bash scripts/train_shiva_fmnist.sh          # runs/shiva/keep*: the recipe, a point every 300 steps
    python benchmarks/shiva_curve.py            # every exported point under runs/shiva
    python benchmarks/shiva_curve.py --replot                      # table, block and plot from the JSON
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from common import RESULTS, ROOT, fidelity_rows, machine, publish
from ditaccel.bench import Entry
from ditaccel.methods.shiva.inference import apply_shiva, load_shiva, remove_shiva
from ditaccel.pipeline import SAMPLERS, default_sampler, make_scheduler
from ditaccel.registry import load_pipeline
from ditaccel.runtime import RUNTIME_REVISION

# the bars, relative to the full model: (agreement points lost, FD vs real increase)
TARGETS = {0.8: (0.03, 0.10), 0.6: (0.08, 0.25)}


def points(runs: Path) -> list[tuple[str, int, Path, dict]]:
    """(run name, step, artifact stem, its metadata) of every exported artifact under ``runs``."""
    out = []
    for meta_path in sorted(runs.glob("*/steps/shiva-*.json")):
        meta = json.loads(meta_path.read_text())
        out.append((meta_path.parent.parent.name, int(meta_path.stem.split("-")[1]), meta_path.with_suffix(""), meta))
    return out


def curve_entry(run: str, step: int, stem: Path, meta: dict, sampler: str, steps: int) -> Entry:
    def prepare(pipe):
        art = load_shiva(stem, pipe.transformer)

        def attach(p):
            apply_shiva(p, art, steps, scheduler=make_scheduler(sampler, p.scheduler.config))
            return lambda: remove_shiva(p)
        return attach
    # the digest keys the row: a run retrained with other settings is measured afresh
    return Entry(f"{run}@{step}#{meta['tensors_sha256'][:12]}", run, "step", step, prepare)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="fmnist-dit", choices=["fmnist-dit", "fmnist-mmdit"])
    ap.add_argument("--runs", default=None, help="folder of training runs, each with steps/shiva-*.json "
                    "(default runs/shiva, runs/shiva-mmdit for fmnist-mmdit: scripts/train_shiva_fmnist.sh's)")
    ap.add_argument("--sampler", default=None, choices=list(SAMPLERS), help="default: the model's own")
    ap.add_argument("--steps", type=int, default=None, help="default: the sampler's")
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--cfg", type=float, default=3.0)
    ap.add_argument("--real", type=int, default=1000, help="Fashion-MNIST test images for FD vs real data")
    ap.add_argument("--replot", action="store_true", help="rewrite the table, block and plot from the saved JSON")
    args = ap.parse_args()
    tag = "" if args.model == "fmnist-dit" else f"-{args.model}"
    stem = f"shiva_curve{tag}"
    if args.replot:
        out = json.loads((RESULTS / f"{stem}.json").read_text())
        plot(out, RESULTS / f"{stem}.png")
        publish(stem, f"shiva-curve{tag}", out, report)
        return
    runs = Path(args.runs or ROOT / "runs" / ("shiva" + tag.replace("-fmnist", "")))
    found = points(runs)
    if not found:
        raise SystemExit(f"no exported artifacts under {runs}/*/steps: train with "
                         f"`bash scripts/train_shiva_fmnist.sh` (or train-shiva --export-every N --out {runs}/keep0.8) first")
    t0 = time.time()
    pipe = load_pipeline(args.model, "fp32")
    pipe.set_progress_bar_config(disable=True)
    sampler = args.sampler or default_sampler(pipe.scheduler)
    steps = args.steps or SAMPLERS[sampler][2]
    entries = [curve_entry(run, step, s, meta, sampler, steps) for run, step, s, meta in found]
    settings = {"model": args.model, "sampler": sampler, "steps": steps, "n": args.n, "batch": args.batch,
                "cfg": args.cfg, "real": args.real, "runtime_revision": RUNTIME_REVISION}
    wanted = {e.method for e in entries}
    res = fidelity_rows(stem, settings, pipe, [i % 10 for i in range(args.n)], entries, sampler=sampler, steps=steps,
                        cfg=args.cfg, batch=args.batch, real=args.real, keep=lambda r: r["method"] in wanted)
    keeps = {run: meta["keep"] for run, _, _, meta in found}
    recipes = {run: {k: meta["config"][k] for k in ("warmup_steps", "policy_steps", "joint_steps", "lr_adapter",
                                                    "budget_gain", "adapter", "batch_size")}
               for run, _, _, meta in found}
    out = {**settings, "runs": str(runs.relative_to(ROOT)) if runs.is_relative_to(ROOT) else str(runs),
           "keeps": keeps, "recipes": recipes, "cpu": machine(), "threads": torch.get_num_threads(),
           "total_s": time.time() - t0, **res}
    plot(out, RESULTS / f"{stem}.png")
    publish(stem, f"shiva-curve{tag}", out, report)
    (RESULTS / f"{stem}.partial.jsonl").unlink(missing_ok=True)


def _runs(out: dict) -> dict[str, list[dict]]:
    by: dict[str, list[dict]] = {}
    for r in out["rows"][1:]:
        by.setdefault(r["family"], []).append(r)
    return {k: sorted(v, key=lambda r: r["value"]) for k, v in sorted(by.items())}


def report(out: dict) -> str:
    full = out["rows"][0]
    lines = ["| run (keep) | step | agreement | FD vs real | PSNR vs full | meets the bar |", "|---|---|---|---|---|---|"]
    for run, rows in _runs(out).items():
        keep = out["keeps"][run]
        bar = TARGETS.get(round(keep, 2))
        for r in rows:
            ok = "-" if bar is None else (
                "yes" if r["class_agreement"] >= full["class_agreement"] - bar[0] - 1e-9
                and r["fd_vs_test"] <= full["fd_vs_test"] * (1 + bar[1]) else "no")
            lines.append(f"| {run} ({keep:g}) | {int(r['value'])} | {r['class_agreement']:.0%} | "
                         f"{r['fd_vs_test']:.1f} | {r['psnr']:.1f} | {ok} |")
    recipe = "; ".join(f"{run}: stages {c['warmup_steps']},{c['policy_steps']},{c['joint_steps']}, "
                       f"adapter {c['adapter']} lr {c['lr_adapter']:g}, budget gain {c['budget_gain']:g}, "
                       f"batch {c['batch_size']}" for run, c in out["recipes"].items())
    bars = ", ".join(f"keep {k:g}: agreement within {100 * a:.0f} points and FD within +{100 * f:.0f}%"
                     for k, (a, f) in TARGETS.items())
    lines += ["", f"Full model: agreement {full['class_agreement']:.0%}, FD vs real {full['fd_vs_test']:.1f}. "
              f"The bar ({bars} of the full model's). {out['model']}, {out['sampler'].upper()}-{out['steps']}, "
              f"CFG {out['cfg']:g}, fp32, {out['n']} images (seeds 0..{out['n'] - 1}, classes cycled), each artifact "
              f"at its trained keep; FD vs real: the first {out['real']} test images. Runs ({out['runs']}): {recipe}. "
              f"Generated by `python benchmarks/shiva_curve.py"
              f"{' --model ' + out['model'] if out['model'] != 'fmnist-dit' else ''}` on {out['cpu']}."]
    return "\n".join(lines) + "\n"


def plot(out: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    full = out["rows"][0]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for run, rows in _runs(out).items():
        s = [r["value"] for r in rows]
        line, = axes[0].plot(s, [100 * r["class_agreement"] for r in rows], marker="o", label=run)
        axes[1].plot(s, [r["fd_vs_test"] for r in rows], marker="o", label=run, color=line.get_color())
        bar = TARGETS.get(round(out["keeps"][run], 2))
        if bar is not None:
            axes[0].axhline(100 * (full["class_agreement"] - bar[0]), color=line.get_color(), ls=":", lw=0.8)
            axes[1].axhline(full["fd_vs_test"] * (1 + bar[1]), color=line.get_color(), ls=":", lw=0.8)
    axes[0].axhline(100 * full["class_agreement"], color="k", lw=0.8, label="full model")
    axes[1].axhline(full["fd_vs_test"], color="k", lw=0.8, label="full model")
    axes[0].set_ylabel("classifier agreement (%)")
    axes[1].set_ylabel("FD vs real (lower is better)")
    for ax in axes:
        ax.set_xlabel("training steps")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{out['model']}, {out['sampler'].upper()}-{out['steps']}: Shiva along training "
                 "(dotted: the bar for that keep)")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


if __name__ == "__main__":
    main()
