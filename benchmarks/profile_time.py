"""How long SODA's profile takes: the bundled model's DDIM-50 profile of 32 trajectories (every
filler: plain reuse and first-order forecast errors, prune errors, module costs), as
``ditaccel profile --sampler ddim --steps 50`` makes it, beside plain sampling of the same 32
trajectories with the full model (the floor the error pass cannot go below: it runs them).

Writes results/profile_time.{json,md} and the ``profile-time`` block of docs/soda.md.

    python benchmarks/profile_time.py            # about 10 minutes on a 2-core fp32 CPU
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from common import RESULTS, ROOT, machine, publish
from ditaccel.cli.main import main as cli
from ditaccel.profiling import Profile
from ditaccel.registry import load_pipeline, resolve_dtype
from ditaccel.sampling import sample

GOAL_S = 120.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--dtype", default="auto", help="auto: bf16 where native, else fp32 (as `ditaccel profile`)")
    args = ap.parse_args()
    dtype = resolve_dtype(args.dtype)
    pipe = load_pipeline("fmnist-dit", dtype)
    pipe.set_progress_bar_config(disable=True)
    labels = [i % 10 for i in range(args.samples)]
    sample(pipe, labels[:2], sampler="ddim", steps=2, guidance_scale=3.0, progress=False)  # warm-up
    t0 = time.perf_counter()  # the CLI's defaults: CFG 3, seeds from 1000, one batch
    sample(pipe, labels, sampler="ddim", steps=args.steps, guidance_scale=3.0, seed=1000,
           batch_size=args.samples, progress=False, count_flops=False)
    plain_s = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:  # as the user runs it, artifact written included
        stem = Path(tmp) / "profile"
        t0 = time.perf_counter()
        rc = cli(["profile", "--sampler", "ddim", "--steps", str(args.steps), "--samples", str(args.samples),
                  "--dtype", dtype, "--out", str(stem)])
        total_s = time.perf_counter() - t0
        if rc:
            raise SystemExit(f"ditaccel profile failed (exit code {rc})")
        prof = Profile.load(stem)
    one = {"samples": args.samples, "steps": args.steps, "dtype": dtype, "plain_sampling_s": plain_s,
           "errors_s": prof.meta["profile_s"], "module_costs_s": prof.meta["cost_s"], "total_s": total_s,
           "sensitivity_s": prof.meta.get("sensitivity_s"), "sensitivity_samples": prof.meta.get("sensitivity_samples"),
           "sensitivity_steps": int(torch.isfinite(prof.step_sensitivity).sum()) if prof.step_sensitivity is not None else 0,
           "fillers": ["reuse", "forecast"] if prof.e_forecast is not None else ["reuse"],
           "intervals": prof.intervals, "ratios": prof.ratios, "token_scores": prof.token_scores,
           "goal_s": GOAL_S, "cpu": machine(), "threads": torch.get_num_threads(), "commit": commit()}
    # one column per dtype and CPU (the project's machines differ from session to session, and the
    # time with them: a faster CPU does not hide a slower one's miss), each from the last run on
    # such a machine, with the commit it measured
    try:
        held = json.loads((RESULTS / "profile_time.json").read_text()).get("runs", {})
    except (OSError, ValueError):
        held = {}
    key = f"{dtype}, {one['cpu']}"
    runs = {k: v for k, v in held.items() if k != key and "commit" in v and v.get("samples") == one["samples"]
            and v.get("steps") == one["steps"]}
    publish("profile_time", "profile-time", {"runs": {key: one, **runs}}, report)


def commit() -> str:
    """The checkout's commit (with ``+`` where it has uncommitted changes)."""
    def git(*a):
        return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    return (git("rev-parse", "--short", "HEAD") or "?") + ("+" if git("status", "--porcelain", "--", "src") else "")


def report(out: dict) -> str:
    runs = [out["runs"][k] for k in sorted(out["runs"])]
    first = runs[0]
    row = lambda label, key: f"| {label} | " + " | ".join(f"{r[key]:.0f}" for r in runs) + " |"  # noqa: E731
    lines = ["| part | " + " | ".join(f"seconds, {r['dtype']}, {r['cpu']}" for r in runs) + " |",
             "|---|" + "---|" * len(runs),
             row(f"error pass ({first['samples']} trajectories, {'/'.join(first['fillers'])} + prune errors)", "errors_s"),
             row("module costs (timed through the runtime)", "module_costs_s"),
             *([row(f"the images' sensitivity ({first['sensitivity_steps']} steps, {first['sensitivity_samples']} "
                    "samples, one sampling run each from its step on)", "sensitivity_s")]
               if all(r.get("sensitivity_s") for r in runs) else []),
             "| **profile in all** | " + " | ".join(f"**{r['total_s']:.0f}**" for r in runs) + " |",
             row("the same trajectories sampled by the full model alone", "plain_sampling_s")]
    lines.append("")
    for r in runs:
        met = "met" if r["total_s"] <= r["goal_s"] else "missed"
        lines.append(f"- {r['dtype']} on {r['cpu']}: goal under {r['goal_s']:.0f} s {met}; the error pass costs "
                     f"{r['errors_s'] / r['plain_sampling_s']:.2f}x plain sampling of its trajectories; "
                     f"{r['threads']} threads, commit {r['commit']}.")
    lines += ["", f"fmnist-dit, DDIM-{first['steps']}, CFG 3, cache ages {first['intervals'][0]}..{first['intervals'][-1]}, "
              f"{len(first['ratios'])} recompute fractions, token scores {', '.join(first['token_scores'])}; each "
              "column from the last run in that dtype on that CPU (`--dtype auto`: bf16 where native, else fp32). "
              "Generated by `python benchmarks/profile_time.py`."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
