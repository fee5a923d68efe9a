"""Which tokens skip a block matters more than how many: fidelity against keep ratio for Shiva's
routing with non-learned scores and, where artifacts exist, the trained router with and without
its DoRA adapters.

Every block but the first runs on exactly k tokens per (step, layer) (the runtime's routing: the
other tokens skip the block, their residual stream unchanged; the first block is never routed);
the same k everywhere (exact counts, no rounding) for the non-learned scores:
- random: a fresh uniform score per (step, layer, call), seeded;
- norm: the token's norm (largest kept);
- mean-distance: distance of the token from its sample's mean token (largest kept);
- block-update (bound): the size of the update the block gives each token, the block run in full
  once more to know it (largest kept): not a method (it costs more than the full model), the best
  a router could do that predicts each token's update exactly, block by block;
- X+streak: score X, but a token that skipped the blocks just before comes first, the longer its
  streak of skipped blocks the earlier (the streak is read from the residual stream: a token that
  skipped the previous block reaches this one unchanged), so no token skips two blocks in a row
  while the skipped ones fit in the next block's budget;
- router / router+dora: a trained artifact's router and its adaptive ratios shifted to the keep
  (as ``apply_shiva(..., keep=)``), without and with its adapters merged; router+dora+streak: the
  latter with the skip streak leading the router's scores (``--artifacts``: a folder of
  keep*/shiva artifacts from ``scripts/train_shiva_fmnist.sh``; skipped where none).

Scored with ``ditaccel.bench.measure`` (fidelity only): PSNR and FD vs the full model on the same
noise, FD vs the Fashion-MNIST test set, classifier agreement with the class asked for.  Writes
results/shiva_routing{-model}.{json,md,png} and the ``shiva-routing`` block of docs/shiva.md
(fmnist-dit).

    python benchmarks/shiva_routing.py                      # fmnist-dit, DDIM-20, 32 images
    python benchmarks/shiva_routing.py --replot             # table, block and plot from the JSON
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
import zlib
from pathlib import Path

import torch

from common import RESULTS, ROOT, fidelity_rows, machine, publish
from ditaccel.bench import Entry
from ditaccel.methods.shiva.inference import apply_shiva, load_shiva, remove_shiva
from ditaccel.methods.shiva.policy import plan_from_ratios
from ditaccel.pipeline import make_scheduler
from ditaccel.registry import load_pipeline
from ditaccel.runtime import RUNTIME_REVISION, apply, remove
from ditaccel.runtime.adapters import find_blocks, image_tokens, modules_of


def norm_score(x, call):
    return x.float().norm(dim=-1)


def mean_distance(x, call):
    return (x.float() - x.float().mean(1, keepdim=True)).norm(dim=-1)


class RandomScore:
    """A uniform score drawn afresh for every (step, layer, guidance branch), from ``seed``."""

    def __init__(self, seed: int = 0):
        self.seed = seed

    def __call__(self, x, call):
        key = zlib.crc32(repr((self.seed, call.step, call.layer, call.branch)).encode())
        g = torch.Generator().manual_seed(key)
        return torch.rand(x.shape[:2], generator=g).to(x.device)


class Streak:
    """``base``'s score, led by each token's streak of blocks skipped just before this one.

    A token that skipped the previous routed block reaches this one with its residual stream
    unchanged (exactly: the runtime scatters the computed tokens back), so the streak is read off
    the block inputs kept in the transformer call's memo; the base score, as a rank in [0, 1),
    orders tokens with equal streaks."""

    def __init__(self, base):
        self.base = base

    def __call__(self, x, call):
        scores = self.base(x, call)
        rank = scores.argsort(dim=1).argsort(dim=1).float() / scores.shape[1]
        memo = call.memo
        if memo is None:  # (compiled step programs have no per-call memo: the base score alone)
            return rank
        prev = memo.get(id(self))
        if prev is None or prev[0].shape != x.shape or prev[2] != call.layer - 1:
            streak = torch.zeros(x.shape[:2], device=x.device)
        else:
            streak = torch.where((x == prev[0]).all(-1), prev[1] + 1, torch.zeros_like(prev[1]))
        memo[id(self)] = (x.detach(), streak, call.layer)
        return streak + rank


class BlockUpdate:
    """A bound, not a method: the size of the update the block would give each token
    (``|block(x)_i - x_i|``, the block run once more in full on all tokens), largest kept: what a
    router that knew each token's update exactly would pick, block by block."""

    def __init__(self, transformer):
        self.blocks = [(block, spec) for _, block, spec in find_blocks(transformer)]

    def __call__(self, x, call):
        block, spec = self.blocks[call.layer]
        # the class's forward: the block without the routing hook on this instance
        out = type(block).forward(block, **call.block_kwargs)
        out = out if spec.image_output is None else out[spec.image_output]
        return (out.float() - x.float()).norm(dim=-1)


SCORES = {"random": lambda tf: RandomScore(), "norm": lambda tf: norm_score, "mean-distance": lambda tf: mean_distance,
          "random+streak": lambda tf: Streak(RandomScore()), "mean-distance+streak": lambda tf: Streak(mean_distance),
          "block-update (bound)": BlockUpdate}


def routed_entry(label: str, family: str, keep: float, score, ratios) -> Entry:
    """The runtime's routing with a non-learned ``score(transformer)`` (a router score, as
    ``SCORES`` makes them) and keep ratios ``ratios(layers)`` (a (steps, layers) table, column 0
    at 1), exact counts (no rounding), as the bench entry ``label``."""
    def prepare(pipe):
        tf = pipe.transformer
        plan = plan_from_ratios(ratios(len(find_blocks(tf))), image_tokens(tf), modules_of(tf), 1)

        def attach(p):
            apply(p, plan, router=score(tf))
            return lambda: remove(p)
        return attach
    return Entry(label, family, "keep", keep, prepare)


def uniform_ratios(keep: float, steps: int, layers: int) -> torch.Tensor:
    """Keep ratios (steps, layers): ``keep`` in every block but the first."""
    ratios = torch.full((steps, layers), keep, dtype=torch.float64)
    ratios[:, 0] = 1.0
    return ratios


def score_entry(name: str, keep: float, steps: int) -> Entry:
    return routed_entry(f"{name}@{keep:g}", name, keep, SCORES[name], lambda layers: uniform_ratios(keep, steps, layers))


def router_entry(stem: Path, keep: float, sampler: str, steps: int, adapters: bool, streak: bool = False) -> Entry:
    name = ("router+dora" if adapters else "router") + ("+streak" if streak else "")

    def prepare(pipe):
        art = load_shiva(stem, pipe.transformer)
        if not adapters:  # apply_shiva merges no adapters where the artifact has none
            art = dataclasses.replace(art, adapters={})
        sched = make_scheduler(sampler, pipe.scheduler.config)

        def attach(p):
            plan = apply_shiva(p, art, steps, scheduler=sched, keep=keep)
            if streak:  # the same plan (and adapters), the router's scores led by the skip streak
                remove(p)
                apply(p, plan, router=Streak(art.router), check_fingerprint=False)
            return lambda: remove_shiva(p)
        return attach
    return Entry(f"{name}[{stem.parent.name}]@{keep:g}", name, "keep", keep, prepare)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="fmnist-dit", choices=["fmnist-dit", "fmnist-mmdit"])
    ap.add_argument("--keeps", default="0.96,0.9,0.8,0.6")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--cfg", type=float, default=3.0)
    ap.add_argument("--artifacts", default=None, help="folder of keep*/shiva artifacts (default runs/shiva for "
                    "fmnist-dit, runs/shiva-mmdit for fmnist-mmdit)")
    ap.add_argument("--real", type=int, default=1000, help="Fashion-MNIST test images for FD vs real data")
    ap.add_argument("--replot", action="store_true", help="rewrite the table, block and plot from the saved JSON")
    args = ap.parse_args()
    tag = "" if args.model == "fmnist-dit" else f"-{args.model}"
    stem = f"shiva_routing{tag}"
    if args.replot:
        out = json.loads((RESULTS / f"{stem}.json").read_text())
        plot(out, RESULTS / f"{stem}.png")
        publish(stem, f"shiva-routing{tag}", out, report)
        return
    t0 = time.time()
    pipe = load_pipeline(args.model, "fp32")
    pipe.set_progress_bar_config(disable=True)
    from ditaccel.pipeline import default_sampler

    sampler = default_sampler(pipe.scheduler)
    keeps = [float(k) for k in args.keeps.split(",")]
    entries = [score_entry(name, k, args.steps) for k in keeps for name in SCORES]
    folder = Path(args.artifacts or ROOT / "runs" / ("shiva" + tag.replace("-fmnist", "")))
    stems = sorted(p.with_suffix("") for p in folder.glob("keep*/shiva.json") if "fixed" not in p.parent.name)
    if not stems:
        print(f"no Shiva artifacts under {folder}: the trained router's rows are left out", flush=True)
    for s in stems:
        entries += [router_entry(s, k, sampler, args.steps, a, st) for k in keeps
                    for a, st in ((False, False), (True, False), (True, True))]
    # rows of a stopped run, or of a finished one with the same settings, are kept (artifacts trained
    # later add their rows alone), scored against the same full-model images, kept beside them
    settings = {"model": args.model, "steps": args.steps, "n": args.n, "batch": args.batch, "cfg": args.cfg,
                "real": args.real, "runtime_revision": RUNTIME_REVISION}
    res = fidelity_rows(stem, settings, pipe, [i % 10 for i in range(args.n)], entries, sampler=sampler,
                        steps=args.steps, cfg=args.cfg, batch=args.batch, real=args.real)
    out = {**settings, "sampler": sampler, "keeps": keeps, "artifacts": [str(s.relative_to(ROOT)) if s.is_relative_to(ROOT) else str(s)
                                                           for s in stems],
           "cpu": machine(), "threads": torch.get_num_threads(), "total_s": time.time() - t0, **res}
    plot(out, RESULTS / f"{stem}.png")
    publish(stem, f"shiva-routing{tag}", out, report)
    (RESULTS / f"{stem}.partial.jsonl").unlink(missing_ok=True)


def _by_family(out: dict) -> dict[str, list[dict]]:
    fams: dict[str, list[dict]] = {}
    for r in out["rows"][1:]:
        fam = r["family"] if not r["family"].startswith("router") else r["method"].split("@")[0]
        fams.setdefault(fam, []).append(r)
    return fams


def report(out: dict) -> str:
    full = out["rows"][0]
    keeps = out["keeps"]
    fams = _by_family(out)
    head = "| score | " + " | ".join(f"keep {k:g}: PSNR / agreement / FD vs real" for k in keeps) + " |"
    lines = [head, "|" + "---|" * (len(keeps) + 1)]
    for fam, rows in fams.items():
        at = {r["value"]: r for r in rows}
        cells = [f"{at[k]['psnr']:.1f} / {at[k]['class_agreement']:.0%} / {at[k]['fd_vs_test']:.1f}" if k in at else "-"
                 for k in keeps]
        lines.append(f"| {fam} | " + " | ".join(cells) + " |")
    best = {k: max((r for rows in fams.values() for r in rows if r["value"] == k), key=lambda r: r["psnr"])
            for k in keeps}
    lines += ["", f"Full model: classifier agreement {full['class_agreement']:.0%}, FD vs real {full['fd_vs_test']:.1f}. "
              "Highest PSNR vs the full model per keep: "
              + ", ".join(f"{k:g}: {best[k]['method'].split('@')[0]} ({best[k]['psnr']:.1f} dB)" for k in keeps) + ". "
              f"{out['model']}, {out['sampler'].upper()}-{out['steps']}, CFG {out['cfg']:g}, fp32, {out['n']} images "
              f"(seeds 0..{out['n'] - 1}, classes cycled); every block but the first runs exactly round(keep x tokens) "
              "tokens (the others skip it unchanged); FD vs real: the first "
              f"{out['real']} test images. "
              + ("No trained artifact was measured. " if not out["artifacts"] else
                 f"router[...]: the artifacts {', '.join(out['artifacts'])}, ratios shifted to each keep. ")
              + f"Generated by `python benchmarks/shiva_routing.py{' --model ' + out['model'] if out['model'] != 'fmnist-dit' else ''}` "
              f"on {out['cpu']}."]
    return "\n".join(lines) + "\n"


def plot(out: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    full = out["rows"][0]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for fam, rows in _by_family(out).items():
        rows = sorted(rows, key=lambda r: r["value"])
        ks = [r["value"] for r in rows]
        style = "--" if "streak" in fam else "-"
        axes[0].plot(ks, [r["psnr"] for r in rows], style, marker="o", label=fam)
        axes[1].plot(ks, [100 * r["class_agreement"] for r in rows], style, marker="o", label=fam)
    axes[1].axhline(100 * full["class_agreement"], color="k", lw=0.8, label="full model")
    axes[0].set_ylabel("PSNR vs full model (dB)")
    axes[1].set_ylabel("classifier agreement (%)")
    for ax in axes:
        ax.set_xlabel("keep (tokens per routed block)")
        ax.invert_xaxis()
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7)
    fig.suptitle(f"{out['model']}, {out['sampler'].upper()}-{out['steps']}: which tokens skip a block")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


if __name__ == "__main__":
    main()
