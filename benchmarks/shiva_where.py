"""Where to route: fidelity at one mean keep ratio when the skipped tokens are spread over every
block, or gathered in some steps or some layers (the freedom Shiva's adaptive policy has).

At mean keep ``m`` (over the routed blocks: every block but the first, every step), a schedule
either routes every block at ``m`` or routes about half of the (step, layer) cells at the ratio
``q`` that keeps the mean ``m`` (``2m - 1`` for exactly half) and runs the others in full:
- every block: ``m`` everywhere (the fixed-ratio ablation's plan);
- noisy steps / clean steps: the first (noisiest) or the last half of the steps;
- every other step: the even steps;
- every other layer: the odd routed layers (no token skips two blocks in a row);
- early layers / late layers: the first or the last half of the routed layers.

Tokens are picked by two non-learned scores of ``shiva_routing.py``: random+streak (the best one
there: a token that skipped the block before comes first) and block-update (bound): the size of
each token's update, the block run once more in full to know it (not a method; the best any
router that predicts updates block by block could do).  The question it answers: how much of the
gap to the full model a policy could close by placing the budget, before any training.

Scored with ``ditaccel.bench.measure`` (fidelity only): classifier agreement, FD vs the
Fashion-MNIST test set, PSNR vs the full model on the same noise.  Writes
results/shiva_where{-model}.{json,md} and the ``shiva-where`` block of docs/shiva.md (fmnist-dit).

    python benchmarks/shiva_where.py                      # fmnist-dit, DDIM-20, 32 images
    python benchmarks/shiva_where.py --replot             # table and block from the JSON
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from common import RESULTS, fidelity_rows, machine, publish
from ditaccel.registry import load_pipeline
from ditaccel.runtime import RUNTIME_REVISION
from shiva_routing import SCORES as ROUTING_SCORES
from shiva_routing import routed_entry, uniform_ratios

SCORES = {name: ROUTING_SCORES[name] for name in ("random+streak", "block-update (bound)")}


def _first_half(n: int) -> torch.Tensor:
    return torch.arange(n) < n // 2


# schedule name -> the (steps, routed layers) cells it routes
SCHEDULES = {
    "every block": lambda s, r: torch.ones(s, r, dtype=torch.bool),
    "noisy steps": lambda s, r: _first_half(s)[:, None].expand(s, r),
    "clean steps": lambda s, r: ~_first_half(s)[:, None].expand(s, r),
    "every other step": lambda s, r: (torch.arange(s) % 2 == 0)[:, None].expand(s, r),
    "every other layer": lambda s, r: (torch.arange(r) % 2 == 0)[None, :].expand(s, r),
    "early layers": lambda s, r: _first_half(r)[None, :].expand(s, r),
    "late layers": lambda s, r: ~_first_half(r)[None, :].expand(s, r),
}


def schedule(name: str, keep: float, steps: int, layers: int) -> torch.Tensor:
    """Keep ratios (steps, layers) with mean ``keep`` over the routed layers (1..layers-1);
    column 0 is 1 (never routed).  See the module docstring for the names."""
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; choose one of {', '.join(SCHEDULES)}")
    cells = SCHEDULES[name](steps, layers - 1)
    share = float(cells.double().mean())
    # the routed cells' ratio that makes the mean ``keep`` (q = 2 keep - 1 where half are routed)
    q = 1 - (1 - keep) / share
    if q <= 0:
        raise ValueError(f"mean keep {keep} cannot be met by routing {share:.0%} of the blocks")
    ratios = uniform_ratios(1.0, steps, layers)
    ratios[:, 1:].masked_fill_(cells, q)
    return ratios


def entry(score: str, where: str, keep: float, steps: int):
    return routed_entry(f"{score}|{where}@{keep:g}", score, keep, SCORES[score],
                        lambda layers: schedule(where, keep, steps, layers))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="fmnist-dit", choices=["fmnist-dit", "fmnist-mmdit"])
    ap.add_argument("--keeps", default="0.8,0.6")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--cfg", type=float, default=3.0)
    ap.add_argument("--real", type=int, default=1000, help="Fashion-MNIST test images for FD vs real data")
    ap.add_argument("--replot", action="store_true", help="rewrite the table and block from the saved JSON")
    args = ap.parse_args()
    tag = "" if args.model == "fmnist-dit" else f"-{args.model}"
    stem = f"shiva_where{tag}"
    if args.replot:
        publish(stem, f"shiva-where{tag}", json.loads((RESULTS / f"{stem}.json").read_text()), report)
        return
    t0 = time.time()
    pipe = load_pipeline(args.model, "fp32")
    pipe.set_progress_bar_config(disable=True)
    from ditaccel.pipeline import default_sampler

    sampler = default_sampler(pipe.scheduler)
    keeps = [float(k) for k in args.keeps.split(",")]
    entries = [entry(s, w, k, args.steps) for k in keeps for w in SCHEDULES for s in SCORES]
    settings = {"model": args.model, "steps": args.steps, "n": args.n, "batch": args.batch, "cfg": args.cfg,
                "real": args.real, "runtime_revision": RUNTIME_REVISION}
    res = fidelity_rows(stem, settings, pipe, [i % 10 for i in range(args.n)], entries, sampler=sampler,
                        steps=args.steps, cfg=args.cfg, batch=args.batch, real=args.real)
    out = {**settings, "sampler": sampler, "keeps": keeps, "cpu": machine(), "threads": torch.get_num_threads(),
           "total_s": time.time() - t0, **res}
    publish(stem, f"shiva-where{tag}", out, report)
    (RESULTS / f"{stem}.partial.jsonl").unlink(missing_ok=True)


BAR = {0.8: (0.03, 0.10), 0.6: (0.08, 0.25)}  # issue 37's bar: agreement points lost, FD vs real rise


def report(out: dict) -> str:
    full = out["rows"][0]
    scores = list(SCORES)
    lines = ["| mean keep | routed where | " + " | ".join(f"{s}: agreement / FD vs real / PSNR" for s in scores) + " |",
             "|" + "---|" * (len(scores) + 2)]
    at = {r["method"]: r for r in out["rows"][1:]}
    for k in out["keeps"]:
        for w in SCHEDULES:
            cells = []
            for s in scores:
                r = at.get(f"{s}|{w}@{k:g}")
                if r is None:
                    cells.append("-")
                    continue
                bar = BAR.get(k)
                ok = bar is not None and (full["class_agreement"] - r["class_agreement"] <= bar[0] + 1e-9
                                          and r["fd_vs_test"] <= full["fd_vs_test"] * (1 + bar[1]))
                cells.append(f"{r['class_agreement']:.0%} / {r['fd_vs_test']:.1f} / {r['psnr']:.1f}" + (" (bar met)" if ok else ""))
            lines.append(f"| {k:g} | {w} | " + " | ".join(cells) + " |")
    lines += ["", f"Full model: classifier agreement {full['class_agreement']:.0%}, FD vs real {full['fd_vs_test']:.1f}. "
              "The other schedules route about half of the cells, at the ratio that keeps the mean (2 x keep - 1 for "
              "exactly half), and run the rest in full. "
              "Bar met: issue 37's bar for that keep (0.8: agreement within 3 points and FD vs real within +10% of "
              "the full model's; 0.6: 8 points and +25%). "
              f"{out['model']}, {out['sampler'].upper()}-{out['steps']}, CFG {out['cfg']:g}, fp32, {out['n']} images "
              f"(seeds 0..{out['n'] - 1}, classes cycled), no training; FD vs real: the first {out['real']} test images. "
              f"Generated by `python benchmarks/shiva_where.py{' --model ' + out['model'] if out['model'] != 'fmnist-dit' else ''}` "
              f"on {out['cpu']}."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
